"""Pure checks of a PKCS#10 request (RFC 2986) against an enrollment group's key policy.

Every issuing path (EST token, bootstrap and re-enrollment, TPM-attested enrollment) and
the benchmarks take a request through the same two steps:

    read_csr(der)            shape only, no crypto: DER, subject rules, the key's hash;
    vet_csr(request, ...)    the vetting: signature (proof of possession), the group's
                             key policy, and the CN the credential allows.

Order matters for cost: shape checks first (no crypto), then the signature, then policy.
Every refusal is a typed error with a stable code; nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from asn1crypto import csr as asn1_csr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from ..ca.profiles import KEY_TYPES, MIN_RSA_BITS, is_topic_safe, key_type_of
from ..errors import BadRequest, PolicyRefused

_BASE64_ALPHABET = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True)
class CsrRequest:
    """A PKCS#10 request whose shape is checked; not yet its signature or key."""

    csr: x509.CertificateSigningRequest
    common_name: str | None  # the single CN it asks for
    key_sha256: str  # hex SHA-256 of its SubjectPublicKeyInfo: how a key is recognised


@dataclass(frozen=True)
class VettedCsr(CsrRequest):
    """A request that passed ``vet_csr``: only these are ever signed."""

    key_type: str = ""


def read_csr(der: bytes) -> CsrRequest:
    """DER PKCS#10 with nothing around it, a subject that can become a topic level, and
    the key's hash (for identity pins and idempotent retries). No signature check."""
    csr = parse_csr(der)
    return CsrRequest(csr, requested_common_name(csr), public_key_sha256(csr.public_key()))


def vet_csr(request: CsrRequest | bytes, policy: KeyPolicy, *,
            device_id: str | None = None) -> VettedCsr:
    """The one vetting of a certificate request, used by every issuing path.

    RFC 2986 4.2 proof of possession (the signature), the group's key policy
    (SECURITY-CHECKLIST 6), and, with ``device_id``, a CN that is absent or exactly the
    device id the credential enrolls (the certificate's subject is CN=<device id>)."""
    if isinstance(request, bytes):
        request = read_csr(request)
    check_signature(request.csr)
    key_type = check_key(request.csr, policy)
    if device_id is not None and request.common_name not in (None, device_id):
        raise PolicyRefused("The CSR's CN must be the device id this credential enrolls.",
                            code="csr.identity_mismatch",
                            detail=f"CN {request.common_name!r} vs {device_id!r}")
    return VettedCsr(request.csr, request.common_name, request.key_sha256, key_type)


@dataclass(frozen=True)
class KeyPolicy:
    allowed_key_types: tuple[str, ...] = ("ec-p256", "ec-p384")
    min_rsa_bits: int = MIN_RSA_BITS

    def __post_init__(self) -> None:
        unknown = set(self.allowed_key_types) - set(KEY_TYPES)
        if unknown:
            raise ValueError(f"unknown key types: {sorted(unknown)}")
        if self.min_rsa_bits < MIN_RSA_BITS:
            raise ValueError(f"min_rsa_bits must be at least {MIN_RSA_BITS}")


def decode_est_base64(body: bytes) -> bytes:
    """RFC 8951 3: EST bodies are base64 (RFC 4648 4) with optional line breaks.

    Strict: any character outside the alphabet and whitespace, or bad padding, refuses.
    """
    compact = bytes(b for b in body if b not in _WHITESPACE)
    if not compact:
        raise BadRequest("The request body is empty.", code="csr.empty")
    if not set(compact) <= _BASE64_ALPHABET:
        raise BadRequest("The body is not base64 (RFC 8951).", code="csr.not_base64")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("The body is not valid base64 (RFC 8951).",
                         code="csr.not_base64") from None


# ecdsa-with-SHA256/384/512 AlgorithmIdentifiers with explicit NULL parameters, which RFC
# 5758 3.2 forbids but tpm2-openssl 1.1.1 (Debian 12) writes (fixed upstream, PR #150).
_ECDSA_WITH_NULL = {
    bytes.fromhex("300c06082a8648ce3d04030205 00".replace(" ", "")): 2,
    bytes.fromhex("300c06082a8648ce3d04030305 00".replace(" ", "")): 3,
    bytes.fromhex("300c06082a8648ce3d04030405 00".replace(" ", "")): 4,
}


def _drop_ecdsa_null_parameters(der: bytes) -> bytes:
    """The same request with the outer signatureAlgorithm's NULL removed, if that is its
    only flaw. signatureAlgorithm is outside the signed part (RFC 2986 4.2), so the
    signature still covers exactly what the device signed; a NULL anywhere else stays."""
    try:
        request = asn1_csr.CertificationRequest.load(der, strict=True)
        algorithm = request["signature_algorithm"]
        if algorithm["algorithm"].dotted not in ("1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3",
                                                 "1.2.840.10045.4.3.4"):
            return der
        if algorithm["parameters"].native is not None or algorithm.dump() not in _ECDSA_WITH_NULL:
            return der
        fixed = asn1_csr.CertificationRequest({
            "certification_request_info": request["certification_request_info"],
            "signature_algorithm": {"algorithm": algorithm["algorithm"].native},
            "signature": request["signature"]})
        return fixed.dump(force=False)
    except (ValueError, TypeError, KeyError):
        return der


def parse_csr(der: bytes) -> x509.CertificateSigningRequest:
    """DER PKCS#10 with nothing before or after it."""
    try:
        return x509.load_der_x509_csr(der)
    except ValueError as exc:
        repaired = _drop_ecdsa_null_parameters(der)
        if repaired != der:
            return parse_csr(repaired)
        if "ExtraData" in str(exc):
            raise BadRequest("The CSR has trailing bytes after its DER encoding.",
                             code="csr.trailing_data") from None
        raise BadRequest("The CSR is not a valid DER PKCS#10 request.",
                         code="csr.malformed", detail=f"parse error: {exc}") from None


def public_key_sha256(public_key: object) -> str:
    """Hex SHA-256 of the SubjectPublicKeyInfo: how a key is recognised across requests."""
    spki = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def check_signature(csr: x509.CertificateSigningRequest) -> None:
    """RFC 2986 4.2: the requester proves possession by signing the request."""
    try:
        valid = csr.is_signature_valid
    except Exception:  # noqa: BLE001 - unsupported algorithms raise various errors
        valid = False
    if not valid:
        raise BadRequest("The CSR signature does not verify.", code="csr.bad_signature")


def check_key(csr: x509.CertificateSigningRequest, policy: KeyPolicy) -> str:
    """The CSR's key type, if the group allows it (SECURITY-CHECKLIST 6)."""
    try:
        public_key = csr.public_key()
    except Exception:  # noqa: BLE001 - unknown key algorithms
        raise PolicyRefused("The CSR key algorithm is not supported.",
                            code="csr.key_type_not_allowed") from None
    key_type = key_type_of(public_key)
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < policy.min_rsa_bits:
            raise PolicyRefused(f"RSA keys must have at least {policy.min_rsa_bits} bits.",
                                code="csr.weak_key",
                                detail=f"RSA key of {public_key.key_size} bits")
        if public_key.public_numbers().e < 65537:
            raise PolicyRefused("RSA public exponent is too small.", code="csr.weak_key")
    if key_type not in policy.allowed_key_types:
        raise PolicyRefused("This key type is not allowed for the enrollment group; allowed: "
                            + ", ".join(policy.allowed_key_types) + ".",
                            code="csr.key_type_not_allowed", detail=f"key type {key_type}")
    return key_type


def requested_common_name(csr: x509.CertificateSigningRequest) -> str | None:
    """The single CN the CSR asks for, or None. Refuses subjects that could not become a
    topic level or broker username (SECURITY-CHECKLIST 7)."""
    try:
        subject = csr.subject
        list(subject)  # decodes every attribute value
    except ValueError:
        raise BadRequest("The subject is not valid (e.g. invalid UTF-8).",
                         code="csr.bad_subject") from None
    for rdn in subject.rdns:
        if len(rdn) != 1:
            raise BadRequest("Multi-valued RDNs are not accepted in the subject.",
                             code="csr.bad_subject")
    common_names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) > 1:
        raise BadRequest("The subject has more than one CN.", code="csr.bad_subject")
    for attribute in subject:
        value = attribute.value
        if isinstance(value, bytes):
            raise BadRequest("Subject attributes must be strings.", code="csr.bad_subject")
        if attribute.oid == NameOID.COMMON_NAME and not is_topic_safe(value):
            raise BadRequest("The CN must be 1-64 characters of A-Z a-z 0-9 . _ - "
                             "(it becomes an MQTT topic level).", code="csr.bad_subject")
        if any(ch in value for ch in "/+#\x00") or not value.isprintable():
            raise BadRequest("Subject attributes may not contain '/', '+', '#', NUL or "
                             "control characters.", code="csr.bad_subject")
    return common_names[0].value if common_names else None  # type: ignore[return-value]
