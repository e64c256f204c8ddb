"""EnrollmentService: the one place that orders an enrollment.

    shape (no crypto) -> authenticate -> CSR signature -> group policy -> identity pin
    -> approval -> sign -> store (one transaction) -> audit

Every refusal raises an EnrollError and is audited here with its internal detail; the
database is left untouched except for the audit row (and a pending-approval row, which
is a decision, not a refusal).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import peewee as pw
from cryptography import x509

from .ca.profiles import CertProfile, revocation_urls
from .ca.signer import Signer
from .config import Settings
from .errors import Conflict, EnrollError, PendingApproval, PolicyRefused, ServiceUnavailable
from .identity import Identity, authenticate_enroll, authenticate_reenroll
from .policy.csr import (
    KeyPolicy,
    check_key,
    check_signature,
    decode_est_base64,
    parse_csr,
    public_key_sha256,
    requested_common_name,
)
from .store.models import Certificate, Device, EnrollmentGroup, PendingRequest, utcnow
from .store.repository import Repository

Binder = Callable[[Device, Certificate], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestContext:
    """What the HTTP layer learnt about the caller, from the real TLS session."""

    remote_addr: str | None = None
    group_label: str | None = None
    bearer_token: str | None = None
    client_certificate: x509.Certificate | None = None


def key_policy(group: EnrollmentGroup) -> KeyPolicy:
    return KeyPolicy(tuple(t for t in group.key_types.split(",") if t), group.min_rsa_bits)


class EnrollmentService:
    def __init__(self, settings: Settings, repository: Repository, signer: Signer,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.settings = settings
        self.repository = repository
        self.signer = signer
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))

    # -- RFC 7030 4.2.1 ---------------------------------------------------------------
    def simpleenroll(self, ctx: RequestContext, body: bytes) -> x509.Certificate:
        return self.audited("est.simpleenroll", ctx, lambda: self._enroll(ctx, body, False))

    # -- RFC 7030 4.2.2 ---------------------------------------------------------------
    def simplereenroll(self, ctx: RequestContext, body: bytes) -> x509.Certificate:
        return self.audited("est.simplereenroll", ctx,
                             lambda: self._enroll(ctx, body, True))

    def _enroll(self, ctx: RequestContext, body: bytes,
                renewal: bool) -> tuple[x509.Certificate, Identity]:
        csr = parse_csr(decode_est_base64(body))
        with self.repository.transaction(readonly=True):  # checks only; issuing re-checks
            identity = (authenticate_reenroll(self.repository, ctx, csr, self.clock())
                        if renewal else
                        authenticate_enroll(self.repository, ctx, csr, self.clock()))
        check_signature(csr)
        check_key(csr, key_policy(identity.group))
        common_name = requested_common_name(csr)
        if not renewal and common_name not in (None, identity.device_id):
            raise PolicyRefused("The CSR's CN does not match the enrolling identity.",
                                code="csr.identity_mismatch",
                                detail=f"CN {common_name!r} vs {identity.device_id!r}")
        key_sha256 = public_key_sha256(csr.public_key())
        replay = identity.replay_certificate
        if replay is not None and replay.public_key_sha256 == key_sha256:
            # Idempotent retry of a request whose response was lost: the same credential
            # and the same key get the same certificate back, nothing new is signed.
            return x509.load_der_x509_certificate(bytes(replay.der)), identity
        if identity.replay_refusal is not None:
            raise identity.replay_refusal
        if identity.group.requires_approval and not renewal:
            self.require_approval(identity, key_sha256)
        return self.issue(identity, csr), identity

    def require_approval(self, identity: Identity, key_sha256: str) -> None:
        with self.repository.transaction():
            pending = self.repository.pending_request(key_sha256)
            if pending is None:
                PendingRequest.create(group=identity.group, device_id=identity.device_id,
                                      public_key_sha256=key_sha256,
                                      credential=identity.credential_pin)
            elif pending.credential != identity.credential_pin:
                raise PolicyRefused("This key is already pending under another credential.",
                                    code="enroll.pending_conflict")
            elif pending.status == "rejected":
                raise PolicyRefused("An operator rejected this enrollment request.",
                                    code="enroll.rejected")
            elif pending.status == "approved":
                return
        raise PendingApproval(self.settings.server.manual_approval_retry_seconds)

    def issue(self, identity: Identity, csr: x509.CertificateSigningRequest,
              bind: Binder | None = None) -> x509.Certificate:
        """Sign and store in one transaction. ``bind(device, certificate_row)`` runs in
        that transaction after the row is written (pins, evidence); raising refuses."""
        profile = self.profile_for(identity)
        for _attempt in range(3):
            try:
                with self.repository.transaction():
                    return self._issue_once(identity, csr, profile, bind)
            except pw.IntegrityError as exc:  # a serial collision: sign again
                last_error = exc
        raise EnrollError(code="ca.serial_collision",
                          detail=f"three serial collisions: {last_error}")

    def _issue_once(self, identity: Identity, csr: x509.CertificateSigningRequest,
                    profile: CertProfile, bind: Binder | None) -> x509.Certificate:
        repo = self.repository
        if identity.token is not None and not repo.consume_token(identity.token,
                                                                 identity.device_id):
            raise identity.token_race_refusal()
        device = repo.device(identity.device_id)
        if device is None:
            device = Device.create(device_id=identity.device_id, group=identity.group,
                                   enrolled_by=identity.method, status="active",
                                   identity_pin=identity.identity_pin)
        elif not identity.known_device:  # enrolled by a concurrent request meanwhile
            raise Conflict("This device identity is already enrolled.",
                           code="identity.taken",
                           detail=f"device {identity.device_id} enrolled concurrently")
        self._require_active_ca()
        certificate = self.signer.issue(csr.public_key(), profile, self.clock())
        Device.update(updated_at=utcnow()).where(Device.id == device.id).execute()
        repo.supersede_active_certificates(device)
        row = repo.record_certificate(device, certificate, identity.method,
                                      renew_at=self.renew_at(certificate),
                                      issuer=self.signer.name)
        if bind is not None:
            bind(device, row)
        PendingRequest.delete().where(
            PendingRequest.device_id == identity.device_id).execute()
        return certificate

    def _require_active_ca(self) -> None:
        """Inside the issuing transaction: this process's CA must still be the active one.
        After `enroll-server ca rotate` a server that has not reloaded yet (SIGHUP) would
        sign with a retired CA; it answers 503 + Retry-After until it reloads."""
        active = self.repository.active_ca_name()
        if active is not None and active != self.signer.name:
            log.error("issuing CA %r was retired (the active CA is %r): reload this "
                      "server (SIGHUP) to issue from the new CA", self.signer.name, active)
            raise ServiceUnavailable(
                "The issuing CA is being rotated; retry shortly.", code="ca.rotated",
                retry_after=10, detail=f"this process signs with retired CA "
                                       f"{self.signer.name!r}; active is {active!r}")

    def renew_at(self, certificate: x509.Certificate) -> dt.datetime:
        """When the renewal-due notice goes out: a point of the lifetime plus jitter, so a
        fleet enrolled together does not renew together."""
        notices = self.settings.notices
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        share = notices.renewal_fraction + secrets.randbelow(1000) / 1000 * (
            notices.renewal_jitter_fraction)
        return start + (end - start) * share

    def profile_for(self, identity: Identity) -> CertProfile:
        group = identity.group
        return CertProfile(
            device_id=identity.device_id, group=group.name,
            lifetime=dt.timedelta(days=group.lifetime_days),
            backdate=dt.timedelta(seconds=self.settings.issuance.backdate_seconds),
            **revocation_urls(self.settings.server.public_url, self.signer.name))

    def audited(self, action: str, ctx: RequestContext,
                 work: Callable[[], tuple[x509.Certificate, Identity]]) -> x509.Certificate:
        try:
            certificate, identity = work()
        except EnrollError as error:
            outcome = ("pending" if isinstance(error, PendingApproval) else
                       "error" if error.status >= 500 else "refused")
            self.repository.audit(
                actor=getattr(error, "actor", None) or _actor(ctx), action=action,
                outcome=outcome, code=error.code, device_id=getattr(error, "device_id", None),
                group=ctx.group_label, remote_addr=ctx.remote_addr, detail=error.detail)
            raise
        self.repository.audit(
            actor=f"device:{identity.device_id}", action=action, outcome="success",
            device_id=identity.device_id, group=identity.group.name,
            remote_addr=ctx.remote_addr,
            detail={"serial": str(certificate.serial_number), "via": identity.method,
                    "not_after": certificate.not_valid_after_utc.isoformat()})
        return certificate


def _actor(ctx: RequestContext) -> str:
    if ctx.client_certificate is not None:
        return "tls:" + ctx.client_certificate.subject.rfc4514_string()[:100]
    return "bearer" if ctx.bearer_token else "anonymous"
