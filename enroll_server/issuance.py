"""Issuer: the last step every issuing path shares (EST token, bootstrap and
re-enrollment, TPM-attested enrollment).

    vetted CSR + identity -> certificate profile -> the repository's issuing transaction
    (re-checks, sign, store, success audit) -> CRL rebuild if a renewal revoked at once

Manual approval (RFC 7030 4.2.3) is decided here too, before issuing.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from typing import Any

from cryptography import x509

from .ca.profiles import CertProfile, revocation_urls
from .ca.signer import Signer
from .config import Settings
from .credentials import Identity, RequestContext
from .errors import PendingApproval, PolicyRefused
from .policy.csr import VettedCsr
from .store.records import CertificateRecord, DeviceRecord
from .store.repository import Issuance, Repository

Admit = Callable[[DeviceRecord | None], None]


class Issuer:
    def __init__(self, settings: Settings, repository: Repository, signer: Signer,
                 clock: Callable[[], dt.datetime],
                 crls_changed: Callable[[list[str]], Any] | None = None) -> None:
        self.settings = settings
        self.repository = repository
        self.signer = signer
        self.clock = clock
        self.crls_changed = crls_changed  # told when a renewal revoked its predecessor

    def issue(self, identity: Identity, csr: VettedCsr, ctx: RequestContext, action: str,
              admit: Admit, **tpm: Any) -> x509.Certificate:
        """Sign and store in the repository's issuing transaction, which runs ``admit``
        on the locked device row and re-checks the token and the presented certificate
        (store/devices.py). ``tpm``: ak_name, reset_count, evidence (Issuance fields)."""
        current = identity.current_certificate
        now = self.clock()
        issuance = Issuance(
            device_id=identity.device_id, group_id=identity.group.id, method=identity.method,
            identity_pin=identity.identity_pin, known_device=identity.known_device,
            issuer=self.signer.name, supersede_grace=identity.group.supersede_grace, now=now,
            token_id=identity.token.id if identity.token is not None else None,
            presented_certificate_id=current.id if current is not None else None,
            audit={"actor": f"device:{identity.device_id}", "action": action,
                   "outcome": "success", "group": identity.group.name,
                   "remote_addr": ctx.remote_addr}, **tpm)
        profile = self.profile_for(identity)
        issued = self.repository.issue(
            issuance, admit, lambda: self.signer.issue(csr.csr.public_key(), profile, now),
            self.renew_at)
        if issued.revoked_now and self.crls_changed is not None:
            self.crls_changed(list(issued.revoked_now))
        return issued.certificate

    def replay(self, identity: Identity, replay: CertificateRecord, ctx: RequestContext,
               action: str) -> x509.Certificate:
        """An idempotent retry of a request whose response was lost: the same credential
        and the same key get the same certificate back, nothing new is signed."""
        certificate = x509.load_der_x509_certificate(replay.der)
        self.repository.audit(
            actor=f"device:{identity.device_id}", action=action, outcome="success",
            device_id=identity.device_id, group=identity.group.name,
            remote_addr=ctx.remote_addr,
            detail={"serial": str(certificate.serial_number), "via": identity.method,
                    "not_after": certificate.not_valid_after_utc.isoformat()})
        return certificate

    def require_approval(self, identity: Identity, key_sha256: str) -> None:
        """RFC 7030 4.2.3: the first request is held for an operator (202 + Retry-After);
        once approved, the same credential and key go through."""
        state = self.repository.approval_state(identity.group.id, identity.device_id,
                                               key_sha256, identity.credential_pin)
        if state == "approved":
            return
        if state == "conflict":
            raise PolicyRefused("This key is already pending under another credential.",
                                code="enroll.pending_conflict")
        if state == "rejected":
            raise PolicyRefused("An operator rejected this enrollment request.",
                                code="enroll.rejected")
        raise PendingApproval(self.settings.server.manual_approval_retry_seconds)

    def renew_at(self, certificate: x509.Certificate) -> dt.datetime:
        """When the renewal-due notice goes out: a point of the lifetime plus jitter, so a
        fleet enrolled together does not renew together."""
        notices = self.settings.notices
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        # A million steps: over a 365-day lifetime and 5 % jitter, ~1.6 s apart.
        share = notices.renewal_fraction + secrets.randbelow(10**6) / 10**6 * (
            notices.renewal_jitter_fraction)
        return start + (end - start) * share

    def profile_for(self, identity: Identity) -> CertProfile:
        return CertProfile(
            device_id=identity.device_id, group=identity.group.name,
            lifetime=identity.group.lifetime,
            backdate=dt.timedelta(seconds=self.settings.issuance.backdate_seconds),
            **revocation_urls(self.settings.server.public_url, self.signer.name))
