"""Endorsement key checks: EK certificate chain, EK public <-> certificate, EK allowlist.

EK certificates (TCG EK Credential Profile for TPM Family 2.0, section 3) are not web PKI
certificates: the subject is empty, the subjectAltName is a *critical* directoryName with
tcg-at-tpmManufacturer/Model/Version, keyUsage is keyEncipherment (RSA) or keyAgreement
(ECC), and the EKU, when present, is tcg-kp-EKCertificate (2.23.133.8.1). cryptography's
``PolicyBuilder().build_client_verifier()`` refuses them by default ("required EKU not
found"), and its web PKI CA profile (CA/B Forum rules) would also refuse vendor CA
certificates that predate those rules. So the path is built here, RFC 5280 6.1 reduced to
what EK chains need: issuer name + signature (``verify_directly_issued_by``), validity of
every certificate at ``now``, CA:true and keyCertSign on issuers, pathLenConstraint,
SHA-2 signatures, no unhandled critical extension, and a maximum depth. Name constraints
and policy processing are not implemented: a certificate that marks them critical is
refused (fail closed).
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.types import TPMT_PUBLIC

from enroll_server.attestation.tpm_structs import (
    key_identity,
    parse_public,
    public_key,
    spki_der,
)
from enroll_server.attestation.verdict import (
    EkAttributes,
    EkExpired,
    EkNotAllowlisted,
    EkPublicMismatch,
    EkRevoked,
    EkUntrusted,
    MalformedEvidence,
)

TCG_KP_EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")  # EK Credential Profile 5
DEFAULT_MAX_DEPTH = 5  # certificates in a path, leaf and trust anchor included
_HANDLED_EXTENSIONS = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.CERTIFICATE_POLICIES,
    ExtensionOID.SUBJECT_DIRECTORY_ATTRIBUTES, ExtensionOID.CRL_DISTRIBUTION_POINTS,
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
})  # fmt: skip
_SIGNATURE_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
# TCG EK templates (EK Credential Profile 2.0, B.3): a restricted decryption key bound to
# this TPM. userWithAuth/adminWithPolicy differ between low and high range templates.
EK_REQUIRED_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
)  # fmt: skip


def load_ek_certificate(data: bytes, field: str = "ek_certificate") -> x509.Certificate:
    """One DER certificate; NV padding after it (all 0x00 or all 0xFF) is tolerated.

    Some TPMs return the whole EK certificate NV index (TCG EK Credential Profile 2.2.1.5)
    padded past the DER length; any other trailing byte is refused.
    """
    if not isinstance(data, bytes) or len(data) < 4 or data[0] != 0x30:
        raise MalformedEvidence(field, "not a DER certificate")
    if data[1] < 0x80:
        length = 2 + data[1]
    else:
        octets = data[1] & 0x7F
        if octets < 1 or octets > 3 or len(data) < 2 + octets:
            raise MalformedEvidence(field, "not a DER certificate")
        length = 2 + octets + int.from_bytes(data[2:2 + octets], "big")
    padding = data[length:]
    if length > len(data):
        raise MalformedEvidence(field, "truncated")
    if padding.strip(b"\x00") and padding.strip(b"\xff"):
        raise MalformedEvidence(field, f"{len(padding)} trailing bytes after the certificate")
    try:
        return x509.load_der_x509_certificate(data[:length])
    except ValueError as exc:
        raise MalformedEvidence(field, "not a DER certificate", detail=f"{field}: {exc}") from exc


def _describe(certificate: x509.Certificate) -> str:
    subject = certificate.subject.rfc4514_string() or "<empty subject>"
    return f"{subject} (serial {certificate.serial_number:x})"


def _valid_at(certificate: x509.Certificate, now: dt.datetime) -> bool:
    return certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def _extension_problem(certificate: x509.Certificate) -> str | None:
    """Unparseable extensions or critical ones this verifier does not process."""
    try:
        extensions = certificate.extensions
    except ValueError as exc:  # duplicate or undecodable extension
        return f"bad extensions: {exc}"
    for extension in extensions:
        if extension.critical and extension.oid not in _HANDLED_EXTENSIONS:
            return f"unhandled critical extension {extension.oid.dotted_string}"
    return None


def _signature_problem(child: x509.Certificate, issuer: x509.Certificate) -> str | None:
    try:
        if not isinstance(child.signature_hash_algorithm, _SIGNATURE_HASHES):
            return f"signature hash {child.signature_hash_algorithm} not allowed"
        child.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return f"signature by {_describe(issuer)} does not verify: {exc!r}"
    return None


def _issuer_problem(issuer: x509.Certificate, intermediates_below: int) -> str | None:
    """RFC 5280 6.1.4 (k), (l), (n) for a certificate that signed another one."""
    problem = _extension_problem(issuer)
    if problem:
        return problem
    extensions = issuer.extensions
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "issuer has no basicConstraints"
    if not constraints.ca:
        return "issuer is not a CA (basicConstraints CA:false)"
    if constraints.path_length is not None and intermediates_below > constraints.path_length:
        return f"pathLenConstraint {constraints.path_length} exceeded"
    try:
        if not extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            return "issuer keyUsage lacks keyCertSign"
    except x509.ExtensionNotFound:
        pass
    key = issuer.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        return f"issuer RSA key of {key.key_size} bits"
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return f"issuer key type {type(key).__name__} not allowed"
    return None


def _leaf_problem(leaf: x509.Certificate) -> str | None:
    problem = _extension_problem(leaf)
    if problem:
        return problem
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "EK certificate is a CA certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if TCG_KP_EK_CERTIFICATE not in usages:
        return "extendedKeyUsage present without tcg-kp-EKCertificate"
    return None


def verify_ek_certificate(
    ek_certificate: x509.Certificate, trusted_roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (), *, now: dt.datetime,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> list[x509.Certificate]:  # fmt: skip
    """The path EK certificate -> ... -> trusted root, or EkUntrusted / EkExpired.

    ``trusted_roots`` are the configured manufacturer trust anchors (usually self-signed
    roots; an EK issuing CA may be configured as an anchor too). ``intermediates`` are
    untrusted helpers, e.g. sent by the device or fetched from the AIA URL. Every
    certificate in the path must be valid at ``now`` (timezone aware). Depth-first over
    the candidates whose subject equals the issuer name; the first complete path wins.
    Trust is decided first: an expired certificate from an unknown CA is ek.untrusted,
    ek.expired means the path exists but a certificate on it is outside its validity.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone aware")
    problem = _leaf_problem(ek_certificate)
    if problem:
        raise EkUntrusted(detail=f"EK certificate {_describe(ek_certificate)}: {problem}")
    anchors = {root.fingerprint(hashes.SHA256()) for root in trusted_roots}
    pool = list(trusted_roots) + [c for c in intermediates
                                  if c.fingerprint(hashes.SHA256()) not in anchors]
    problems: list[str] = []
    expired: list[str] = []

    def extend(path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        child = path[-1]
        seen = {c.fingerprint(hashes.SHA256()) for c in path}
        for issuer in pool:
            fingerprint = issuer.fingerprint(hashes.SHA256())
            if issuer.subject != child.issuer or fingerprint in seen:
                continue
            problem = _signature_problem(child, issuer) or _issuer_problem(issuer, len(path) - 1)
            if problem:
                problems.append(f"{_describe(child)} <- {_describe(issuer)}: {problem}")
                continue
            if not _valid_at(issuer, now):
                expired.append(f"{_describe(issuer)} valid {issuer.not_valid_before_utc} .. "
                               f"{issuer.not_valid_after_utc}, now {now}")  # fmt: skip
                continue
            if fingerprint in anchors:
                return [*path, issuer]
            if len(path) + 1 >= max_depth:
                problems.append(f"path longer than {max_depth} at {_describe(issuer)}")
                continue
            found = extend([*path, issuer])
            if found:
                return found
        return None

    path = extend([ek_certificate])
    if path is not None:
        if not _valid_at(ek_certificate, now):
            raise EkExpired(detail=f"EK certificate {_describe(ek_certificate)} valid "
                                   f"{ek_certificate.not_valid_before_utc} .. "
                                   f"{ek_certificate.not_valid_after_utc}, now {now}")  # fmt: skip
        return path
    if expired:
        raise EkExpired(detail="; ".join(expired + problems))
    raise EkUntrusted(detail=f"no path from {_describe(ek_certificate)} issued by "
                             f"{ek_certificate.issuer.rfc4514_string()} to a trusted root"
                             + (": " + "; ".join(problems) if problems else ""))  # fmt: skip


def check_ek_attributes(ek_public: TPMT_PUBLIC) -> None:
    """A TCG-template EK: restricted decryption key, fixedTPM/fixedParent, TPM generated."""
    attributes = ek_public.objectAttributes
    if (attributes & EK_REQUIRED_ATTRIBUTES) != EK_REQUIRED_ATTRIBUTES or (
        attributes & TPMA_OBJECT.SIGN_ENCRYPT
    ):
        raise EkAttributes(detail=f"EK objectAttributes {attributes!s}")


def check_ek_public(ek_public: bytes, ek_certificate: x509.Certificate) -> TPMT_PUBLIC:
    """The EK public area (TPM2B_PUBLIC) has EK attributes and the certificate's key."""
    public = parse_public(ek_public, "ek_public")
    check_ek_attributes(public)
    tpm_key = spki_der(public_key(public, "ek_public"))
    certificate_key = ek_certificate.public_key()
    if not isinstance(certificate_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) or (
        not hmac.compare_digest(tpm_key, spki_der(certificate_key))
    ):
        raise EkPublicMismatch(detail=f"EK public {key_identity(public_key(public))} vs "
                                      f"certificate {_describe(ek_certificate)}")  # fmt: skip
    return public


def check_ek_allowlisted(identity: str, allowlist: Iterable[str]) -> None:
    """The EK identity (hex SHA-256 of its SPKI) is on the allowlist; constant time.

    Every entry is compared (no early exit), entries are normalised to lower case.
    """
    probe = identity.strip().lower().encode()
    listed = False
    for entry in allowlist:
        listed |= hmac.compare_digest(probe, entry.strip().lower().encode())
    if not listed:
        raise EkNotAllowlisted(detail=f"EK {identity} not on the allowlist")


def load_ek_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """Manufacturer CRLs as an operator configures them: PEM (several) or one DER."""
    if b"-----BEGIN X509 CRL-----" in data:
        blocks = data.split(b"-----END X509 CRL-----")
        return [x509.load_pem_x509_crl(block + b"-----END X509 CRL-----\n")
                for block in blocks if b"-----BEGIN X509 CRL-----" in block]
    return [x509.load_der_x509_crl(data)] if data.strip() else []


def check_ek_revocation(
    path: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList],
) -> None:  # fmt: skip
    """No certificate on the EK path is on a CRL of its issuer (SECURITY-CHECKLIST 9).

    ``path`` is verify_ek_certificate's answer (EK certificate first, trust anchor last).
    A CRL counts only for the issuer that signed it (RFC 5280 6.3.3 (f)); others are
    ignored. CRLs are configured by the operator (`group set-ek-crls`) and refreshed by
    them: the verifier does no network I/O, so a CRL past its nextUpdate still counts.
    """
    for child, issuer in zip(path, path[1:], strict=False):
        for crl in crls:
            if crl.issuer != issuer.subject or not crl.is_signature_valid(
                    issuer.public_key()):  # type: ignore[arg-type]
                continue
            entry = crl.get_revoked_certificate_by_serial_number(child.serial_number)
            if entry is not None:
                raise EkRevoked(detail=f"{_describe(child)} revoked on "
                                       f"{entry.revocation_date_utc} (CRL of "
                                       f"{_describe(issuer)})")  # fmt: skip
