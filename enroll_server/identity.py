"""Who is enrolling: turns the caller's credential into a device identity, or refuses.

Three credentials (each a small, separately testable check):
- a one-time enrollment token (HTTP Bearer), created by an operator for a group;
- a bootstrap (factory / IDevID) certificate over mTLS from a CA the group trusts;
- for re-enrollment, the device's current certificate over mTLS (RFC 7030 4.2.2).

Identities are pinned: a device id first enrolled with one bootstrap key can never be
taken over by another (SECURITY-CHECKLIST 15).
"""

from __future__ import annotations

import datetime as dt
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from .ca.profiles import is_topic_safe
from .errors import BadRequest, Conflict, EnrollError, Forbidden, NotFound, Unauthorized
from .policy.csr import public_key_sha256, requested_common_name
from .store.models import Certificate, EnrollmentGroup, EnrollmentToken
from .store.repository import Repository, naive_utc

if TYPE_CHECKING:
    from .enrollment import RequestContext


@dataclass
class Identity:
    device_id: str
    group: EnrollmentGroup
    method: str  # "token", "bootstrap", "reenroll"
    identity_pin: str = ""  # what pins the device id (bootstrap key hash)
    credential_pin: str = ""  # what a pending request is bound to
    token: EnrollmentToken | None = None
    current_certificate: Certificate | None = None
    # Whether the device id was already enrolled when the credential was checked. Issuing
    # re-checks it in its own transaction: an id enrolled meanwhile by a concurrent
    # request is identity.taken, never overwritten (SECURITY-CHECKLIST 15).
    known_device: bool = False
    # Set when this is a retry of a request that already succeeded.
    replay_certificate: Certificate | None = None
    replay_refusal: EnrollError | None = None

    def token_race_refusal(self) -> EnrollError:
        return Unauthorized("The enrollment token has already been used.",
                            code="auth.token_used")


def group_for_label(repository: Repository, label: str | None) -> EnrollmentGroup:
    try:
        return repository.group(label or "default")
    except NotFound:
        raise NotFound("Unknown EST label (enrollment group).",
                       code="est.unknown_label") from None


def _require_method(group: EnrollmentGroup, method: str) -> None:
    if method not in group.auth_methods.split(","):
        raise Forbidden(f"The enrollment group does not accept {method} authentication.",
                        code="auth.method_not_allowed")


def authenticate_enroll(repository: Repository, ctx: RequestContext,
                        csr: x509.CertificateSigningRequest, now: dt.datetime) -> Identity:
    """simpleenroll: a token wins over a TLS certificate when both are presented."""
    if ctx.group_label:
        group_for_label(repository, ctx.group_label)  # an unknown label is 404 for all
    if ctx.bearer_token:
        return _by_token(repository, ctx, csr, now)
    if ctx.client_certificate is not None:
        return _by_bootstrap_certificate(repository, ctx, csr, now)
    raise Unauthorized("Present an enrollment token (Bearer) or a bootstrap certificate.",
                       code="auth.required")


def _by_token(repository: Repository, ctx: RequestContext, csr: x509.CertificateSigningRequest,
              now: dt.datetime) -> Identity:
    token = repository.find_token(ctx.bearer_token)
    if token is None:
        raise Unauthorized("The enrollment token is not valid.", code="auth.token_invalid")
    group = token.group
    if ctx.group_label and ctx.group_label != group.name:
        raise Forbidden("The enrollment token belongs to another enrollment group.",
                        code="auth.token_group_mismatch")
    _require_method(group, "token")
    device_id = token.device_id or requested_common_name(csr)
    if not device_id:
        raise BadRequest("The CSR must name the device in its CN (or use a token bound to "
                         "a device).", code="csr.missing_cn")
    identity = Identity(device_id=device_id, group=group, method="token", token=token,
                        credential_pin="token:" + token.token_sha256)
    if token.used_at is not None:
        device = repository.device(device_id)
        if token.used_by_device == device_id and device is not None:
            identity.replay_certificate = repository.active_certificate_for_key(
                device, public_key_sha256(csr.public_key()))
        if identity.replay_certificate is None:
            raise Unauthorized("The enrollment token has already been used.",
                               code="auth.token_used")
        identity.replay_refusal = identity.token_race_refusal()
        return identity
    if naive_utc(now) >= token.expires_at:
        raise Unauthorized("The enrollment token has expired; ask the operator for a new "
                           "one.", code="auth.token_expired")
    device = repository.device(device_id)
    if device is not None:
        _refuse_if_revoked(device)
        if token.device_id != device_id or device.group_id != group.id:
            raise Conflict("This device identity is already enrolled; an operator must "
                           "issue a token bound to it to re-provision.",
                           code="identity.taken", detail=f"device {device_id}")
        identity.known_device = True
    return identity


def _refuse_if_revoked(device) -> None:
    if device.status == "revoked":
        raise Forbidden("This device has been revoked.", code="device.revoked")


def bootstrap_trust(group: EnrollmentGroup) -> tuple[list[x509.Certificate],
                                                      list[x509.Certificate]]:
    """The group's bootstrap bundle split into roots (self-issued) and intermediates."""
    certificates = (x509.load_pem_x509_certificates(group.bootstrap_ca_pem.encode())
                    if group.bootstrap_ca_pem.strip() else [])
    roots = [c for c in certificates if c.issuer == c.subject]
    return roots, [c for c in certificates if c.issuer != c.subject]


def _by_bootstrap_certificate(repository: Repository, ctx: RequestContext,
                              csr: x509.CertificateSigningRequest,
                              now: dt.datetime) -> Identity:
    group = group_for_label(repository, ctx.group_label)
    _require_method(group, "bootstrap")
    leaf = ctx.client_certificate
    roots, intermediates = bootstrap_trust(group)
    if not roots:
        raise Unauthorized("The enrollment group trusts no bootstrap CA.",
                           code="auth.bootstrap_untrusted")
    try:
        verifier = (verification.PolicyBuilder()
                    .store(verification.Store(roots)).time(now)
                    .extension_policies(
                        ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                        ee_policy=verification.ExtensionPolicy.permit_all())
                    .build_client_verifier())
        verifier.verify(leaf, intermediates)
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
        _refuse_if_revoked(device)
        if not hmac.compare_digest(device.identity_pin, pin) or device.group_id != group.id:
            raise Conflict("This device identity is pinned to another credential.",
                           code="identity.taken", detail=f"device {device_id}")
        identity.known_device = True
        # Same bootstrap key and same device key: a retry, answered with the same cert.
        identity.replay_certificate = repository.active_certificate_for_key(
            device, public_key_sha256(csr.public_key()))
    return identity


def authenticate_reenroll(repository: Repository, ctx: RequestContext,
                          csr: x509.CertificateSigningRequest, now: dt.datetime) -> Identity:
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
    device = current.device
    group = device.group
    if ctx.group_label and ctx.group_label != group.name:
        raise Forbidden("The certificate belongs to another enrollment group.",
                        code="auth.group_mismatch")
    _refuse_if_revoked(device)
    if current.status == "revoked":
        raise Forbidden("The client certificate has been revoked.", code="cert.revoked")
    naive_now = naive_utc(now)
    if not current.not_before <= naive_now < current.not_after:
        raise Unauthorized("The client certificate has expired; enroll again with a fresh "
                           "credential.", code="cert.expired")
    _require_same_names(csr, leaf)
    identity = Identity(device_id=device.device_id, group=group, method="reenroll",
                        identity_pin=device.identity_pin, current_certificate=current,
                        known_device=True)
    if current.status == "superseded":
        # The renewal succeeded but the device never got the answer: return the newer
        # certificate for the same key, and refuse anything else.
        identity.replay_certificate = repository.active_certificate_for_key(
            device, public_key_sha256(csr.public_key()))
        identity.replay_refusal = Forbidden("The client certificate has been superseded.",
                                            code="cert.superseded")
        if identity.replay_certificate is None:
            raise identity.replay_refusal
    return identity


def _require_same_names(csr: x509.CertificateSigningRequest,
                        current: x509.Certificate) -> None:
    """RFC 7030 4.2.2: Subject and SubjectAltName identical to the certificate being
    renewed. A CSR without a SAN is accepted (the server derives the SAN anyway)."""
    requested_common_name(csr)  # shape checks first
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

