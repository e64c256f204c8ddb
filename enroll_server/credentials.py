"""Who is enrolling over EST: turns the caller's credential into a device identity, or
refuses.

Three credentials (each a small, separately testable check):
- a one-time enrollment token (HTTP Bearer), created by an operator for a group;
- a bootstrap (factory / IDevID) certificate over mTLS from a CA the group trusts;
- for re-enrollment, the device's current certificate over mTLS (RFC 7030 4.2.2).

These checks read a snapshot; the issuing transaction re-checks what a concurrent
request could change (store/devices.py). Identities are pinned: a device id first
enrolled with one bootstrap key can never be taken over by another (SECURITY-CHECKLIST
15).
"""

from __future__ import annotations

import datetime as dt
import hmac
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from .ca.profiles import is_topic_safe
from .errors import BadRequest, Conflict, EnrollError, Forbidden, NotFound, Unauthorized
from .policy.csr import CsrRequest, public_key_sha256
from .policy.group import GroupPolicy
from .store.records import CertificateRecord, DeviceRecord, TokenRecord
from .store.repository import Repository, naive_utc


@dataclass(frozen=True)
class RequestContext:
    """What the HTTP layer learnt about the caller, from the real TLS session."""

    remote_addr: str | None = None
    group_label: str | None = None
    bearer_token: str | None = None
    client_certificate: x509.Certificate | None = None

    @property
    def actor(self) -> str:
        """Who the audit log says asked, before the credential is checked."""
        if self.client_certificate is not None:
            return "tls:" + self.client_certificate.subject.rfc4514_string()[:100]
        return "bearer" if self.bearer_token else "anonymous"


@dataclass
class Identity:
    device_id: str
    group: GroupPolicy
    method: str  # "token", "bootstrap", "reenroll", "tpm"
    identity_pin: str = ""  # what pins the device id (bootstrap key hash, EK)
    credential_pin: str = ""  # what a pending request is bound to
    token: TokenRecord | None = None
    current_certificate: CertificateRecord | None = None
    # Whether the device id was already enrolled when the credential was checked. Issuing
    # re-checks it in its own transaction: an id enrolled meanwhile by a concurrent
    # request is identity.taken, never overwritten (SECURITY-CHECKLIST 15).
    known_device: bool = False
    # Set when this is a retry of a request that already succeeded.
    replay_certificate: CertificateRecord | None = None
    replay_refusal: EnrollError | None = None


def token_used() -> EnrollError:
    return Unauthorized("The enrollment token has already been used.", code="auth.token_used")


def refuse_if_revoked(device: DeviceRecord | None) -> None:
    """The admission rule of every EST path (checked again when issuing)."""
    if device is not None and device.revoked:
        raise Forbidden("This device has been revoked.", code="device.revoked")


def group_for_label(repository: Repository, label: str | None) -> GroupPolicy:
    try:
        return repository.group_policy(label or "default")
    except NotFound:
        raise NotFound("Unknown EST label (enrollment group).",
                       code="est.unknown_label") from None


def authenticate_enroll(repository: Repository, ctx: RequestContext, request: CsrRequest,
                        now: dt.datetime) -> Identity:
    """simpleenroll: a token wins over a TLS certificate when both are presented."""
    if ctx.group_label:
        group_for_label(repository, ctx.group_label)  # an unknown label is 404 for all
    if ctx.bearer_token:
        return _by_token(repository, ctx, request, now)
    if ctx.client_certificate is not None:
        return _by_bootstrap_certificate(repository, ctx, request, now)
    raise Unauthorized("Present an enrollment token (Bearer) or a bootstrap certificate.",
                       code="auth.required")


def _by_token(repository: Repository, ctx: RequestContext, request: CsrRequest,
              now: dt.datetime) -> Identity:
    token = repository.find_token(ctx.bearer_token or "")
    if token is None:
        raise Unauthorized("The enrollment token is not valid.", code="auth.token_invalid")
    group = repository.group_policy_by_id(token.group_id)
    if ctx.group_label and ctx.group_label != group.name:
        raise Forbidden("The enrollment token belongs to another enrollment group.",
                        code="auth.token_group_mismatch")
    group.require_method("token")
    device_id = token.device_id or request.common_name
    if not device_id:
        raise BadRequest("The CSR must name the device in its CN (or use a token bound to "
                         "a device).", code="csr.missing_cn")
    identity = Identity(device_id=device_id, group=group, method="token", token=token,
                        credential_pin="token:" + token.token_sha256)
    if token.used_at is not None:
        device = repository.device(device_id)
        if token.used_by_device == device_id and device is not None:
            identity.replay_certificate = repository.active_certificate_for_key(
                device.id, request.key_sha256)
        if identity.replay_certificate is None:
            raise token_used()
        identity.replay_refusal = token_used()
        return identity
    if naive_utc(now) >= token.expires_at:
        raise Unauthorized("The enrollment token has expired; ask the operator for a new "
                           "one.", code="auth.token_expired")
    device = repository.device(device_id)
    if device is not None:
        refuse_if_revoked(device)
        if token.device_id != device_id or device.group_id != group.id:
            raise Conflict("This device identity is already enrolled; an operator must "
                           "issue a token bound to it to re-provision.",
                           code="identity.taken", detail=f"device {device_id}")
        identity.known_device = True
    return identity


def _by_bootstrap_certificate(repository: Repository, ctx: RequestContext,
                              request: CsrRequest, now: dt.datetime) -> Identity:
    group = group_for_label(repository, ctx.group_label)
    group.require_method("bootstrap")
    leaf = ctx.client_certificate
    assert leaf is not None  # authenticate_enroll checked it
    if not group.bootstrap_roots:
        raise Unauthorized("The enrollment group trusts no bootstrap CA.",
                           code="auth.bootstrap_untrusted")
    try:
        verifier = (verification.PolicyBuilder()
                    .store(verification.Store(list(group.bootstrap_roots))).time(now)
                    .extension_policies(
                        ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                        ee_policy=verification.ExtensionPolicy.permit_all())
                    .build_client_verifier())
        verifier.verify(leaf, list(group.bootstrap_intermediates))
    except verification.VerificationError as exc:
        raise Unauthorized("The client certificate is not a valid bootstrap certificate "
                           "for this enrollment group.", code="auth.bootstrap_untrusted",
                           detail=f"bootstrap verification failed: {exc}") from None
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    device_id = str(names[0].value) if len(names) == 1 else ""
    if not is_topic_safe(device_id):
        raise Forbidden("The bootstrap certificate's CN is not a usable device id.",
                        code="auth.bootstrap_bad_identity")
    pin = "bootstrap:" + public_key_sha256(leaf.public_key())
    identity = Identity(device_id=device_id, group=group, method="bootstrap",
                        identity_pin=pin, credential_pin=pin)
    device = repository.device(device_id)
    if device is not None:
        refuse_if_revoked(device)
        if not hmac.compare_digest(device.identity_pin, pin) or device.group_id != group.id:
            raise Conflict("This device identity is pinned to another credential.",
                           code="identity.taken", detail=f"device {device_id}")
        identity.known_device = True
        # Same bootstrap key and same device key: a retry, answered with the same cert.
        identity.replay_certificate = repository.active_certificate_for_key(
            device.id, request.key_sha256)
    return identity


def authenticate_reenroll(repository: Repository, ctx: RequestContext, request: CsrRequest,
                          now: dt.datetime) -> Identity:
    """RFC 7030 4.2.2: authorised by the certificate being renewed, presented over TLS."""
    if ctx.group_label:
        group_for_label(repository, ctx.group_label)
    leaf = ctx.client_certificate
    if leaf is None:
        raise Unauthorized("Re-enrollment needs the current device certificate over TLS.",
                           code="auth.required")
    current = repository.certificate_by_fingerprint(leaf.fingerprint(hashes.SHA256()).hex())
    if current is None:
        raise Unauthorized("The client certificate was not issued by this service.",
                           code="auth.unknown_certificate")
    device = repository.device_by_pk(current.device_id)
    group = repository.group_policy_by_id(device.group_id)
    if ctx.group_label and ctx.group_label != group.name:
        raise Forbidden("The certificate belongs to another enrollment group.",
                        code="auth.group_mismatch")
    refuse_if_revoked(device)
    naive_now = naive_utc(now)
    status = current.effective_status(naive_now)
    if status == "revoked":
        raise Forbidden("The client certificate has been revoked.", code="cert.revoked")
    if not current.not_before <= naive_now < current.not_after:
        raise Unauthorized("The client certificate has expired; enroll again with a fresh "
                           "credential.", code="cert.expired")
    _require_same_names(request, leaf)
    identity = Identity(device_id=device.device_id, group=group, method="reenroll",
                        identity_pin=device.identity_pin, current_certificate=current,
                        known_device=True)
    if status == "superseded":
        # The renewal succeeded but the device never got the answer: return the newer
        # certificate for the same key, and refuse anything else.
        identity.replay_certificate = repository.active_certificate_for_key(
            device.id, request.key_sha256)
        identity.replay_refusal = Forbidden("The client certificate has been superseded.",
                                            code="cert.superseded")
        if identity.replay_certificate is None:
            raise identity.replay_refusal
    return identity


def _require_same_names(request: CsrRequest, current: x509.Certificate) -> None:
    """RFC 7030 4.2.2: Subject and SubjectAltName identical to the certificate being
    renewed. A CSR without a SAN is accepted (the server derives the SAN anyway)."""
    csr = request.csr
    if csr.subject != current.subject:
        raise PolicyRefusedNames("The CSR subject differs from the current certificate.")
    try:
        csr_san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    try:
        cert_san = current.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        cert_san = None
    if csr_san != cert_san:
        raise PolicyRefusedNames("The CSR subjectAltName differs from the current "
                                 "certificate.")


class PolicyRefusedNames(Forbidden):
    code = "reenroll.names_changed"
