"""Signed device notices: revocation, renewal due, CA rotation (JWS, RFC 7515).

A notice is a JWT-shaped claims set (RFC 7519 4) signed as a JWS Compact Serialization
(RFC 7515 7.1) with ES256 or ES384 (RFC 7518 3.4) by a dedicated notice-signing key. The
key's certificate, issued by the device CA, travels in the x5c header (RFC 7515 4.1.6)
followed by the issuing CA, so a device that trusts its CA verifies notices without any
other key distribution. device_sdk.notices is the verifying side (it keeps its own copy
of the constants below, since the device SDK never imports the server).

Pure: no Flask, no database, no MQTT. The outbox relay publishes what sign_notice returns.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enroll_server.ca.profiles import DIGITAL_SIGNATURE_ONLY, GROUP_NAME_PATTERN, is_topic_safe
from enroll_server.ca.signer import signature_hash

NOTICE_TYPES = ("revocation", "renewal_due", "ca_rotation")

# RFC 7515 4.1.9 / RFC 8725 3.11: explicit typing, so a notice is never mistaken for (or
# replayed as) another kind of JWT signed under the same CA.
NOTICE_TYP = "tpm-enroll-notice+jwt"

# The project's private OID arc: a UUID-derived OID (ITU-T X.667 / RFC 4122 "2.25.<UUID as
# an integer>"), which needs no registration. Sub-arc .1 is the notice-signing extended
# key usage (RFC 5280 4.2.1.12). Device certificates carry only id-kp-clientAuth, so a
# device key can never sign a notice. Must equal device_sdk.notices.NOTICE_SIGNING_EKU.
TPM_ENROLL_OID_ARC = "2.25.239345125169379312074460888417539569493"
NOTICE_SIGNING_EKU = x509.ObjectIdentifier(f"{TPM_ENROLL_OID_ARC}.1")

# MQTT topics (MQTT 5.0 4.7): device ids and group names are single topic levels.
NOTICE_TOPIC = "{prefix}/{group}/devices/{device_id}/notices"
# Gateways subscribe here. It carries the same per-device revocation JWS that goes to the
# device's own topic: its audience stays the revoked device.
FLEET_REVOCATION_TOPIC = "{prefix}/{group}/revocations"

# JWS alg (RFC 7518 3.1) for each notice-signing curve, with its hash (RFC 7518 3.4).
_ALGORITHMS: dict[str, tuple[str, hashes.HashAlgorithm]] = {
    "secp256r1": ("ES256", hashes.SHA256()),
    "secp384r1": ("ES384", hashes.SHA384()),
}
_SERIAL = re.compile(r"[1-9][0-9]{0,48}")  # RFC 5280 4.1.2.2: positive, at most 20 octets
_MAX_JSON_INT = 2**53 - 1  # I-JSON (RFC 7493 2.2): integers every JSON parser keeps exactly
_CRL_REASONS = frozenset(reason.value for reason in x509.ReasonFlags)  # RFC 5280 5.3.1
NOTICE_CERT_BACKDATE = dt.timedelta(minutes=5)  # device clock skew (SECURITY-CHECKLIST 28)


def _check_group(group: str) -> None:
    if not isinstance(group, str) or GROUP_NAME_PATTERN.fullmatch(group) is None:
        raise ValueError("group name is not topic safe")


def _check_device_id(device_id: str) -> None:
    # is_topic_safe refuses '/', '+', '#', NUL and anything else outside [A-Za-z0-9._-].
    if not isinstance(device_id, str) or not is_topic_safe(device_id):
        raise ValueError("device id is not topic safe")


def topic_for(group: str, device_id: str, prefix: str = "fleet") -> str:
    """The device's own notice topic: <prefix>/<group>/devices/<device_id>/notices
    (prefix: mqtt.topic_prefix, "fleet" by default)."""
    _check_group(group)
    _check_device_id(device_id)
    return NOTICE_TOPIC.format(prefix=prefix, group=group, device_id=device_id)


def fleet_revocation_topic(group: str, prefix: str = "fleet") -> str:
    """The group's revocation topic for gateways: <prefix>/<group>/revocations."""
    _check_group(group)
    return FLEET_REVOCATION_TOPIC.format(prefix=prefix, group=group)


def _numeric_date(moment: dt.datetime) -> int:
    """RFC 7519 2 NumericDate, whole seconds (sub-second precision is not needed)."""
    if not isinstance(moment, dt.datetime) or moment.tzinfo is None:
        raise ValueError("notice times must be timezone-aware datetimes")
    return int(moment.timestamp())


@dataclass(frozen=True)
class Notice:
    """One notice to one device; sequence is per device and strictly increasing."""

    device_id: str
    type: str
    serial: str  # the device certificate's serial number, decimal
    sequence: int
    issued_at: dt.datetime
    expires_at: dt.datetime
    group: str
    reason: str | None = None  # revocation: an RFC 5280 5.3.1 CRLReason name
    extra: Mapping[str, object] = field(default_factory=dict)  # e.g. {"renew_after": ...}

    def __post_init__(self) -> None:
        _check_device_id(self.device_id)
        _check_group(self.group)
        if self.type not in NOTICE_TYPES:
            raise ValueError(f"unknown notice type {self.type!r}")
        if not isinstance(self.serial, str) or _SERIAL.fullmatch(self.serial) is None:
            raise ValueError("serial must be a positive decimal string of at most 20 octets")
        if (isinstance(self.sequence, bool) or not isinstance(self.sequence, int)
                or not 0 <= self.sequence <= _MAX_JSON_INT):
            raise ValueError("sequence must be an integer in 0 .. 2**53-1")
        if _numeric_date(self.expires_at) <= _numeric_date(self.issued_at):
            raise ValueError("expires_at must be after issued_at")
        if self.reason is not None:
            if not isinstance(self.reason, str) or not 0 < len(self.reason) <= 64:
                raise ValueError("reason must be a short string")
            if self.type == "revocation" and self.reason not in _CRL_REASONS:
                raise ValueError("a revocation reason must be an RFC 5280 CRLReason name")
        if not all(isinstance(name, str) for name in self.extra):
            raise ValueError("extra keys must be strings")
        json.dumps(dict(self.extra), allow_nan=False)  # TypeError/ValueError if not JSON
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    def to_claims(self) -> dict[str, object]:
        """The JWT claims set (RFC 7519 4): registered sub/aud/iat/exp plus private claims.

        sub and aud are both the device: the notice is about it and only for it.
        """
        claims: dict[str, object] = {
            "sub": self.device_id,
            "aud": self.device_id,
            "iat": _numeric_date(self.issued_at),
            "exp": _numeric_date(self.expires_at),
            "type": self.type,
            "serial": self.serial,
            "seq": self.sequence,
            "group": self.group,
        }
        if self.reason is not None:
            claims["reason"] = self.reason
        if self.extra:
            claims["extra"] = dict(self.extra)
        return claims


def issue_notice_signing_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                                     notice_public_key: ec.EllipticCurvePublicKey,
                                     lifetime: dt.timedelta, now: dt.datetime) -> x509.Certificate:
    """An end-entity certificate for the notice-signing key, issued by the device CA.

    keyUsage digitalSignature only and the NOTICE_SIGNING_EKU, both critical (RFC 5280
    4.2.1.3, 4.2.1.12: a critical EKU limits the key to the listed purposes); never
    outlives the CA (SECURITY-CHECKLIST 18). Keep the lifetime short: devices do not
    check revocation of this certificate.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone aware")
    if lifetime <= dt.timedelta(0):
        raise ValueError("lifetime must be positive")
    if (not isinstance(notice_public_key, ec.EllipticCurvePublicKey)
            or notice_public_key.curve.name not in _ALGORITHMS):
        raise ValueError("the notice-signing key must be EC P-256 or P-384 (ES256/ES384)")
    not_before = max(now - NOTICE_CERT_BACKDATE, ca_cert.not_valid_before_utc)
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError("issuing CA is expired")
    try:
        issuer_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    organization = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    subject = x509.Name([*organization[:1],
                         x509.NameAttribute(NameOID.COMMON_NAME, "Notice signer")])
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca_cert.subject).public_key(notice_public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(DIGITAL_SIGNATURE_ONLY, critical=True)
            .add_extension(x509.ExtendedKeyUsage([NOTICE_SIGNING_EKU]), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(notice_public_key),
                           critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, signature_hash(ca_key)))


def _b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 2, Appendix C)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_chain(key: ec.EllipticCurvePrivateKey,
                 certificate_chain: Sequence[x509.Certificate]) -> None:
    """Refuse a misconfigured signer before signing anything a device would reject."""
    if not certificate_chain:
        raise ValueError("the notice-signing certificate chain is empty")
    leaf = certificate_chain[0]
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        raise ValueError("the first certificate is not the notice-signing key's")
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if NOTICE_SIGNING_EKU not in usages:
        raise ValueError("the certificate lacks the notice-signing extended key usage")
    for child, issuer in zip(certificate_chain, certificate_chain[1:], strict=False):
        child.verify_directly_issued_by(issuer)  # RFC 7515 4.1.6: each certifies the one before


def sign_notice(notice: Notice, key: ec.EllipticCurvePrivateKey,
                certificate_chain: Sequence[x509.Certificate]) -> str:
    """The notice as a JWS Compact Serialization (RFC 7515 7.1), alg ES256 or ES384.

    certificate_chain is the notice-signing certificate, then its issuing CA (and, if
    wanted, the CAs above it): the x5c header, standard base64 DER (RFC 7515 4.1.6).

    The signing step is done here with key.sign() rather than joserfc.jws.
    serialize_compact: joserfc 1.8 turns every key into a JWK dict before signing
    (alg.check_key -> key.check_use("sig") -> BaseKey.dict_value -> private_numbers()),
    which a non-extractable PKCS#11 key (enroll_server.ca.keys.Pkcs11PrivateKey) refuses.
    Devices verify with joserfc (device_sdk.notices); the tests check both agree.
    """
    curve_name = key.curve.name
    if curve_name not in _ALGORITHMS:
        raise ValueError("the notice-signing key must be EC P-256 or P-384 (ES256/ES384)")
    alg, hash_algorithm = _ALGORITHMS[curve_name]
    _check_chain(key, certificate_chain)
    header = {
        "alg": alg,
        "typ": NOTICE_TYP,
        "x5c": [base64.b64encode(certificate.public_bytes(serialization.Encoding.DER))
                .decode("ascii") for certificate in certificate_chain],
    }
    header_segment = _b64url(json.dumps(header, separators=(",", ":")).encode())
    payload_segment = _b64url(json.dumps(notice.to_claims(), separators=(",", ":"),
                                         sort_keys=True).encode())
    signing_input = f"{header_segment}.{payload_segment}".encode("ascii")  # RFC 7515 5.1
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hash_algorithm)))
    # RFC 7518 3.4: the JWS signature is R || S, each big-endian, padded to the curve size.
    size = (key.curve.key_size + 7) // 8
    signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return f"{header_segment}.{payload_segment}.{_b64url(signature)}"
