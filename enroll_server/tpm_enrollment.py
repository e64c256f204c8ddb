"""TpmEnrollment: orders a TPM-attested enrollment (docs/protocol.md).

Two requests:

challenge:  group allows tpm -> EK (certificate chain to the group's manufacturer roots and
            trusted vendors, helped by the device's EK chain; or the allowlist) -> EK
            public = certificate key -> identity = H(EK SPKI) -> device not revoked,
            AK = the pinned AK -> AK attributes -> MakeCredential + nonce,
            stored single-use with a short TTL (only the secret's hash is kept), within
            the EK's quota of open challenges.
enroll:     consume the challenge (committed before anything else: a refused attempt
            burns it) -> activated secret -> CSR vetting -> TPM2_Certify by the AK with
            the nonce, of the key in the CSR -> quote vs golden PCRs -> issue; in the
            issuing transaction: device admitted and AK pin re-checked on the locked row,
            resetCount recorded, evidence archived.

The checks themselves are the pure functions of ``attestation`` and ``policy``; this
module only looks things up, orders the calls and asks the repository to write.
Refusals are audited at the HTTP edge (http/common.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from . import attestation as att
from .config import Settings
from .credentials import Identity, RequestContext, group_for_label
from .errors import Conflict, EnrollError, Forbidden, RateLimited
from .issuance import Issuer
from .policy.csr import read_csr, vet_csr
from .policy.group import GroupPolicy
from .store.records import ChallengeRecord, DeviceRecord
from .store.repository import Repository, naive_utc


@dataclass(frozen=True)
class ChallengeRequest:
    ek_public: bytes
    ak_public: bytes
    ek_certificate: bytes | None = None
    # EK CA certificates the TPM holds (EK Credential Profile 2.2.1.5.2): untrusted helpers
    ek_chain: tuple[bytes, ...] | list[bytes] = ()


@dataclass(frozen=True)
class Challenge:
    challenge_id: str
    device_id: str
    id_object: bytes  # TPM2B_ID_OBJECT
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET
    nonce: bytes
    expires_at: dt.datetime
    pcr_selection: dict[str, list[int]] | None


@dataclass(frozen=True)
class AttestedRequest:
    challenge_id: str
    activated_secret: bytes
    device_key_public: bytes
    certify_info: bytes
    certify_signature: bytes
    csr: bytes  # DER PKCS#10
    quote_info: bytes | None = None
    quote_signature: bytes | None = None


CLEANUP_ONE_IN = 64  # one challenge request in this many also deletes expired challenges


def _secret_hash(secret: bytes) -> bytes:
    return hashlib.sha256(b"tpm-enroll credential secret\0" + secret).digest()


class TpmEnrollment:
    def __init__(self, settings: Settings, repository: Repository, issuer: Issuer,
                 clock: Callable[[], dt.datetime]) -> None:
        self.settings = settings
        self.repository = repository
        self.issuer = issuer
        self.clock = clock

    # -- step 1 ------------------------------------------------------------------------
    def challenge(self, ctx: RequestContext, request: ChallengeRequest) -> Challenge:
        now = self.clock()
        with self.repository.snapshot():
            group = group_for_label(self.repository, ctx.group_label)
            group.require_method("tpm")
            device_id = self._check_endorsement(group, request, now)
            device = self.repository.device(device_id)
            allowlist = self.repository.allowlisted(group.id, device_id) \
                if group.allowlist_only else None
        if allowlist is not None:
            att.check_ek_allowlisted(device_id, allowlist)
        ak_name = att.object_name(att.check_ak_public(request.ak_public))
        check_pin(device, ak_name, device_id)
        secret = att.new_secret()
        id_object, encrypted_secret = att.make_credential_challenge(
            request.ek_public, ak_name, secret)
        policy = group.pcr_policy
        challenge = Challenge(
            challenge_id=secrets.token_urlsafe(24), device_id=device_id, id_object=id_object,
            encrypted_secret=encrypted_secret, nonce=att.new_nonce(),
            expires_at=now + dt.timedelta(seconds=self.settings.attestation.challenge_ttl_seconds),
            pcr_selection={bank: sorted(pcrs) for bank, pcrs in policy.items()} if policy else None)
        self._store(group, request, challenge, ak_name, secret, now)
        return challenge

    def _check_endorsement(self, group: GroupPolicy, request: ChallengeRequest,
                           now: dt.datetime) -> str:
        """The EK is genuine (manufacturer chain) or listed; returns the device identity."""
        public = att.parse_public(request.ek_public, "ek_public")
        device_id = att.ek_identity(public)
        if request.ek_certificate is not None:
            certificate = att.load_ek_certificate(request.ek_certificate)
            att.check_ek_public(request.ek_public, certificate)
            if not group.allowlist_only:
                chain = att.load_ek_chain(list(request.ek_chain))
                path = att.verify_ek_certificate(
                    certificate, list(group.ek_trust_anchors),
                    list(group.ek_vendor_intermediates) + chain, now=now)
                att.check_ek_revocation(path, list(group.ek_crls))
        elif not group.allowlist_only:
            raise att.MalformedEvidence("ek_certificate", "required: this enrollment group "
                                        "trusts TPMs by their manufacturer's certificate")
        return device_id

    def _store(self, group: GroupPolicy, request: ChallengeRequest, challenge: Challenge,
               ak_name: bytes, secret: bytes, now: dt.datetime) -> None:
        limit = self.settings.attestation.max_open_challenges
        open_challenges = self.repository.store_challenge(
            {"challenge_id": challenge.challenge_id, "group": group.id,
             "device_id": challenge.device_id, "ek_public": request.ek_public,
             "ek_certificate": request.ek_certificate, "ak_public": request.ak_public,
             "ak_name": ak_name.hex(), "secret_sha256": _secret_hash(secret).hex(),
             "nonce": challenge.nonce, "expires_at": naive_utc(challenge.expires_at)},
            now, limit, clean_expired=secrets.randbelow(CLEANUP_ONE_IN) == 0)
        if open_challenges >= limit:
            raise RateLimited(self.settings.attestation.challenge_ttl_seconds,
                              code="challenge.too_many",
                              detail=f"{open_challenges} open challenges")

    # -- step 2 ------------------------------------------------------------------------
    def enroll(self, ctx: RequestContext, request: AttestedRequest) -> x509.Certificate:
        now = self.clock()
        challenge = self._consume(ctx, request.challenge_id, now)
        try:
            return self._verify_and_issue(ctx, challenge, request)
        except EnrollError as error:
            error.about(device_id=challenge.device_id)
            raise

    def _consume(self, ctx: RequestContext, challenge_id: str,
                 now: dt.datetime) -> ChallengeRecord:
        """Look up and burn the challenge, committed whatever follows (single use)."""
        row, won = self.repository.take_challenge(challenge_id, ctx.group_label or "default",
                                                  now)
        expires_at = row.expires_at.replace(tzinfo=dt.UTC) if row else None
        att.check_challenge(expires_at, row is not None and not won, now,
                            challenge_id=challenge_id[:64])
        assert row is not None  # check_challenge refused an unknown one
        return row

    def _verify_and_issue(self, ctx: RequestContext, challenge: ChallengeRecord,
                          request: AttestedRequest) -> x509.Certificate:
        group = self.repository.group_policy_by_id(challenge.group_id)
        att.check_activated_secret(bytes.fromhex(challenge.secret_sha256),
                                   _secret_hash(request.activated_secret))
        csr = vet_csr(read_csr(request.csr), group.key_policy, device_id=challenge.device_id)
        att.verify_certify(request.certify_info, request.certify_signature,
                           challenge.ak_public, challenge.nonce, request.device_key_public)
        att.check_csr_key(request.device_key_public, csr.csr.public_key())
        device = self.repository.read(lambda: self.repository.device(challenge.device_id))
        reset_count = self._check_quote(group, request, challenge, device)
        identity = Identity(device_id=challenge.device_id, group=group, method="tpm",
                            identity_pin="ek:" + challenge.device_id,
                            credential_pin="ek:" + challenge.device_id,
                            known_device=device is not None)
        if device is None and group.requires_approval:
            self.issuer.require_approval(identity, csr.key_sha256)
        ak_name = bytes.fromhex(challenge.ak_name)
        evidence = {
            "ek_certificate": challenge.ek_certificate, "ek_public": challenge.ek_public,
            "ak_public": challenge.ak_public, "certify_info": request.certify_info,
            "certify_signature": request.certify_signature,
            "device_key_public": request.device_key_public,
            "quote_info": request.quote_info, "quote_signature": request.quote_signature,
            "nonce": challenge.nonce}
        return self.issuer.issue(
            identity, csr, ctx, "attest.enroll",
            lambda current: check_pin(current, ak_name, challenge.device_id),
            ak_name=challenge.ak_name, reset_count=reset_count, evidence=evidence)

    def _check_quote(self, group: GroupPolicy, request: AttestedRequest,
                     challenge: ChallengeRecord, device: DeviceRecord | None) -> int | None:
        """The boot state against the group's golden PCRs; returns the quoted resetCount."""
        if request.quote_info is None or request.quote_signature is None:
            if group.pcr_policy:
                raise att.verdict.QuotePcrSelection(detail="no quote sent, policy requires one")
            return None
        result = att.verify_quote(request.quote_info, request.quote_signature,
                                  challenge.ak_public, challenge.nonce, group.pcr_policy)
        att.check_reset_count(device.last_reset_count if device else None, result.clock)
        return result.clock.reset_count


def check_pin(device: DeviceRecord | None, ak_name: bytes, device_id: str) -> None:
    """A device id belongs to the TPM (EK) and, once enrolled, to its first AK; a revoked
    device is refused. Checked on the challenge, and again on the locked row when
    issuing."""
    if device is None:
        return
    if device.revoked:
        raise Forbidden("This device has been revoked.", code="device.revoked")
    if device.enrolled_by != "tpm":
        raise Conflict("This device identity is already enrolled by other means.",
                       code="identity.taken", detail=f"device {device_id} by "
                                                     f"{device.enrolled_by}")
    if device.ak_name and not hmac.compare_digest(device.ak_name, ak_name.hex()):
        raise Conflict("This device is enrolled with another attestation key; an operator "
                       "must re-admit it (enroll-server devices unpin-ak).",
                       code="identity.ak_mismatch",
                       detail=f"AK {ak_name.hex()} vs pinned {device.ak_name}")
