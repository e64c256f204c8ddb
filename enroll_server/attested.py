"""AttestationService: the one place that orders a TPM-attested enrollment.

Two requests (docs/protocol.md, "TPM-attested enrollment"):

challenge:  group allows tpm -> EK (certificate chain to the group's manufacturer roots, or
            the allowlist) -> EK public = certificate key -> identity = H(EK SPKI) -> device
            not revoked, AK = the pinned AK -> AK attributes -> MakeCredential + nonce,
            stored single-use with a short TTL (only the secret's hash is kept).
enroll:     consume the challenge (committed before anything else: a refused attempt
            burns it) -> activated secret -> CSR signature and key policy -> TPM2_Certify
            by the AK with the nonce, of the key in the CSR -> quote vs golden PCRs ->
            issue; in the issuing transaction: AK pin re-checked, resetCount recorded,
            evidence archived.

The checks themselves are the pure functions of ``attestation``; this module only looks
things up, orders the calls and writes. Refusals are audited by EnrollmentService.audited.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from . import attestation as att
from . import ek_vendors
from .attestation.quote import PcrMap
from .config import Settings
from .enrollment import EnrollmentService, RequestContext, key_policy
from .errors import Conflict, EnrollError, Forbidden, PolicyRefused, RateLimited
from .identity import Identity, group_for_label
from .policy.csr import (
    check_key,
    check_signature,
    parse_csr,
    public_key_sha256,
    requested_common_name,
)
from .store.models import (
    AttestationChallenge,
    AttestationEvidence,
    Certificate,
    Device,
    EkAllowlistEntry,
    EnrollmentGroup,
)
from .store.repository import Repository, naive_utc


@dataclass(frozen=True)
class ChallengeRequest:
    ek_public: bytes
    ak_public: bytes
    ek_certificate: bytes | None = None
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


def pcr_policy(group: EnrollmentGroup) -> PcrMap | None:
    return att.pcr_policy_from_json(json.loads(group.pcr_policy)) if group.pcr_policy else None


def ek_trust_anchors(group: EnrollmentGroup) -> list[att.EkCertificate]:
    """Every certificate the operator configured (roots and EK issuing CAs) is an anchor,
    and so is every anchor of the built-in store's vendors the group trusts."""
    return list(_parsed_roots(group.ek_roots_pem)) + list(
        ek_vendors.trust_for(group.ek_vendors or "")[0])


def ek_vendor_intermediates(group: EnrollmentGroup) -> list[att.EkCertificate]:
    """Vendor EK issuing CAs of the built-in store: untrusted helpers, never anchors."""
    return list(ek_vendors.trust_for(group.ek_vendors or "")[1])


def ek_crls(group: EnrollmentGroup) -> list[x509.CertificateRevocationList]:
    return list(_parsed_crls(group.ek_crls_pem))


# Parsed once per distinct configuration, not on every challenge: manufacturer CRLs can
# hold many thousands of entries. Keyed by the stored text, so a change is seen at once.
@functools.lru_cache(maxsize=16)
def _parsed_roots(pem: str) -> tuple[att.EkCertificate, ...]:
    return tuple(att.load_pem_certificates(pem)) if pem.strip() else ()


@functools.lru_cache(maxsize=16)
def _parsed_crls(pem: str) -> tuple[x509.CertificateRevocationList, ...]:
    return tuple(att.load_ek_crls(pem.encode())) if pem.strip() else ()


def _secret_hash(secret: bytes) -> bytes:
    return hashlib.sha256(b"tpm-enroll credential secret\0" + secret).digest()


class AttestationService:
    def __init__(self, settings: Settings, repository: Repository,
                 enrollment: EnrollmentService,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.settings = settings
        self.repository = repository
        self.enrollment = enrollment
        self.clock = clock or enrollment.clock

    # -- step 1 ------------------------------------------------------------------------
    def challenge(self, ctx: RequestContext, request: ChallengeRequest) -> Challenge:
        return self._audited_challenge(ctx, lambda: self._challenge(ctx, request))

    def _challenge(self, ctx: RequestContext, request: ChallengeRequest) -> Challenge:
        now = self.clock()
        with self.repository.transaction(readonly=True):
            group = group_for_label(self.repository, ctx.group_label)
            _require_tpm(group)
            device_id = self._check_endorsement(group, request, now)
            device = self.repository.device(device_id)
            allowlist = self._allowlisted(group, device_id) \
                if group.ek_policy == "allowlist" else None
        if allowlist is not None:
            att.check_ek_allowlisted(device_id, allowlist)
        ak_name = att.object_name(att.check_ak_public(request.ak_public))
        _check_pin(device, ak_name, device_id)
        secret = att.new_secret()
        id_object, encrypted_secret = att.make_credential_challenge(
            request.ek_public, ak_name, secret)
        policy = pcr_policy(group)
        challenge = Challenge(
            challenge_id=secrets.token_urlsafe(24), device_id=device_id, id_object=id_object,
            encrypted_secret=encrypted_secret, nonce=att.new_nonce(),
            expires_at=now + dt.timedelta(seconds=self.settings.attestation.challenge_ttl_seconds),
            pcr_selection={bank: sorted(pcrs) for bank, pcrs in policy.items()} if policy else None)
        self._store(group, request, challenge, ak_name, secret, now)
        return challenge

    def _check_endorsement(self, group: EnrollmentGroup, request: ChallengeRequest,
                           now: dt.datetime) -> str:
        """The EK is genuine (manufacturer chain) or listed; returns the device identity."""
        public = att.parse_public(request.ek_public, "ek_public")
        device_id = att.ek_identity(public)
        if request.ek_certificate is not None:
            certificate = att.load_ek_certificate(request.ek_certificate)
            att.check_ek_public(request.ek_public, certificate)
            if group.ek_policy != "allowlist":
                chain = att.load_ek_chain(list(request.ek_chain))
                path = att.verify_ek_certificate(certificate, ek_trust_anchors(group),
                                                 ek_vendor_intermediates(group) + chain, now=now)
                att.check_ek_revocation(path, ek_crls(group))
        elif group.ek_policy != "allowlist":
            raise att.MalformedEvidence("ek_certificate", "required: this enrollment group "
                                        "trusts TPMs by their manufacturer's certificate")
        return device_id

    def _allowlisted(self, group: EnrollmentGroup, device_id: str) -> list[str]:
        """The allowlist entry for this EK, if any: one indexed lookup (the EK hash is
        public, nothing to hide by scanning every entry), checked by the pure verifier."""
        return [entry.ek_sha256 for entry in
                EkAllowlistEntry.select(EkAllowlistEntry.ek_sha256)
                .where((EkAllowlistEntry.group == group)
                       & (EkAllowlistEntry.ek_sha256 == device_id))]

    def _store(self, group: EnrollmentGroup, request: ChallengeRequest, challenge: Challenge,
               ak_name: bytes, secret: bytes, now: dt.datetime) -> None:
        with self.repository.transaction():
            if secrets.randbelow(CLEANUP_ONE_IN) == 0:  # amortised: not on every request
                AttestationChallenge.delete().where(
                    AttestationChallenge.expires_at < naive_utc(now)).execute()
            open_challenges = AttestationChallenge.select().where(
                (AttestationChallenge.device_id == challenge.device_id)
                & AttestationChallenge.used_at.is_null()).count()
            if open_challenges >= self.settings.attestation.max_open_challenges:
                raise RateLimited(self.settings.attestation.challenge_ttl_seconds,
                                  code="challenge.too_many",
                                  detail=f"{open_challenges} open challenges")
            AttestationChallenge.create(
                challenge_id=challenge.challenge_id, group=group,
                device_id=challenge.device_id, ek_public=request.ek_public,
                ek_certificate=request.ek_certificate, ak_public=request.ak_public,
                ak_name=ak_name.hex(), secret_sha256=_secret_hash(secret).hex(),
                nonce=challenge.nonce, expires_at=naive_utc(challenge.expires_at))

    # -- step 2 ------------------------------------------------------------------------
    def enroll(self, ctx: RequestContext, request: AttestedRequest) -> x509.Certificate:
        return self.enrollment.audited("attest.enroll", ctx, lambda: self._enroll(ctx, request))

    def _enroll(self, ctx: RequestContext,
                request: AttestedRequest) -> tuple[x509.Certificate, Identity]:
        now = self.clock()
        challenge = self._consume(ctx, request.challenge_id, now)
        device_id = challenge.device_id
        try:
            return self._verify_and_issue(challenge, request)
        except EnrollError as error:
            error.device_id = device_id  # type: ignore[attr-defined]
            raise

    def _consume(self, ctx: RequestContext, challenge_id: str,
                 now: dt.datetime) -> AttestationChallenge:
        """Look up and burn the challenge, committed whatever follows (single use)."""
        with self.repository.transaction():
            row = self.repository.challenge(challenge_id)
            if row is not None and row.group.name != (ctx.group_label or "default"):
                row = None  # a challenge answers only under the label it was issued for
            expires_at = row.expires_at.replace(tzinfo=dt.UTC) if row else None
            att.check_challenge(expires_at, bool(row and row.used_at), now,
                                challenge_id=challenge_id[:64])
            if not self.repository.consume_challenge(row, naive_utc(now)):
                att.check_challenge(expires_at, True, now, challenge_id=challenge_id[:64])
        return row

    def _verify_and_issue(self, challenge: AttestationChallenge,
                          request: AttestedRequest) -> tuple[x509.Certificate, Identity]:
        group = challenge.group
        ak_public = bytes(challenge.ak_public)
        nonce = bytes(challenge.nonce)
        att.check_activated_secret(bytes.fromhex(challenge.secret_sha256),
                                   _secret_hash(request.activated_secret))
        csr = parse_csr(request.csr)
        check_signature(csr)
        check_key(csr, key_policy(group))
        att.verify_certify(request.certify_info, request.certify_signature, ak_public, nonce,
                           request.device_key_public)
        att.check_csr_key(request.device_key_public, csr.public_key())
        common_name = requested_common_name(csr)
        if common_name not in (None, challenge.device_id):
            raise PolicyRefused("The CSR's CN must be the device id the server derived "
                                "from the EK.", code="csr.identity_mismatch",
                                detail=f"CN {common_name!r}")
        with self.repository.transaction(readonly=True):
            device = self.repository.device(challenge.device_id)
        reset_count = self._check_quote(group, request, ak_public, nonce, device)
        identity = Identity(device_id=challenge.device_id, group=group, method="tpm",
                            identity_pin="ek:" + challenge.device_id,
                            credential_pin="ek:" + challenge.device_id,
                            known_device=device is not None)
        if device is None and group.requires_approval:
            self.enrollment.require_approval(identity, public_key_sha256(csr.public_key()))

        def bind(device: Device, certificate: Certificate) -> None:
            _check_pin(device, bytes.fromhex(challenge.ak_name), challenge.device_id)
            updates = {"ak_name": challenge.ak_name}
            if reset_count is not None:
                updates["last_reset_count"] = reset_count
            Device.update(**updates).where(Device.id == device.id).execute()
            AttestationEvidence.create(
                certificate=certificate, ek_certificate=challenge.ek_certificate,
                ek_public=challenge.ek_public, ak_public=ak_public,
                certify_info=request.certify_info,
                certify_signature=request.certify_signature,
                device_key_public=request.device_key_public, quote_info=request.quote_info,
                quote_signature=request.quote_signature, nonce=nonce)

        return self.enrollment.issue(identity, csr, bind), identity

    def _check_quote(self, group: EnrollmentGroup, request: AttestedRequest, ak_public: bytes,
                     nonce: bytes, device: Device | None) -> int | None:
        """The boot state against the group's golden PCRs; returns the quoted resetCount."""
        policy = pcr_policy(group)
        if request.quote_info is None or request.quote_signature is None:
            if policy:
                raise att.verdict.QuotePcrSelection(detail="no quote sent, policy requires one")
            return None
        result = att.verify_quote(request.quote_info, request.quote_signature, ak_public,
                                  nonce, policy)
        att.check_reset_count(device.last_reset_count if device else None, result.clock)
        return result.clock.reset_count

    def _audited_challenge(self, ctx: RequestContext,
                           work: Callable[[], Challenge]) -> Challenge:
        """Refused challenges are audited; issued ones are not (the enroll step is)."""
        try:
            return work()
        except EnrollError as error:
            self.repository.audit(
                actor="anonymous", action="attest.challenge",
                outcome="error" if error.status >= 500 else "refused", code=error.code,
                group=ctx.group_label, remote_addr=ctx.remote_addr, detail=error.detail)
            raise


def _require_tpm(group: EnrollmentGroup) -> None:
    if "tpm" not in group.auth_methods.split(","):
        raise Forbidden("The enrollment group does not accept TPM attestation.",
                        code="auth.method_not_allowed")


def _check_pin(device: Device | None, ak_name: bytes, device_id: str) -> None:
    """A device id belongs to the TPM (EK) and, once enrolled, to its first AK."""
    if device is None:
        return
    if device.status == "revoked":
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
