"""Endorsement key checks: EK certificate chain, EK public <-> certificate, EK allowlist.

EK certificates (TCG EK Credential Profile for TPM Family 2.0, section 3) are not web PKI
certificates: the subject is empty, the subjectAltName is a *critical* directoryName with
tcg-at-tpmManufacturer/Model/Version, keyUsage is keyEncipherment (RSA) or keyAgreement
(ECC), and the EKU, when present, is tcg-kp-EKCertificate (2.23.133.8.1). Vendor CA
certificates carry encodings a strict DER parser refuses (``ek_cert``). So the path is
built here, RFC 5280 6.1 reduced to what EK chains need, the same way for every
certificate: issuer name (RFC 5280 7.1 comparison) + signature over the exact tbs bytes,
validity of every certificate at ``now``, CA:true and keyCertSign on issuers,
pathLenConstraint, SHA-2 signatures, RSA >= 2048 bits, no unhandled critical extension,
and a maximum depth. Name constraints and policy processing are not implemented: a
certificate that marks them critical is refused (fail closed).
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Iterable, Sequence

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.types import TPMT_PUBLIC

from enroll_server.attestation.ek_cert import (
    CertificateProblem,
    EkCertificate,
    as_ek_certificate,
    load_certificate_bytes,
    signature_problem,
)
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
MAX_CHAIN_CERTIFICATES = 8  # untrusted intermediates a device may send (ek_chain)
# Path building tries every candidate issuer by name; a device can send certificates that
# all share one name and sign each other, so the signature checks per path are bounded.
MAX_SIGNATURE_CHECKS = 64
_BASIC_CONSTRAINTS, _KEY_USAGE, _EKU, _SAN = "2.5.29.19", "2.5.29.15", "2.5.29.37", "2.5.29.17"
_HANDLED_EXTENSIONS = frozenset({
    _BASIC_CONSTRAINTS, _KEY_USAGE, _EKU, _SAN, "2.5.29.35", "2.5.29.14", "2.5.29.32",
    "2.5.29.9", "2.5.29.31", "1.3.6.1.5.5.7.1.1",
})  # fmt: skip
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
# TCG EK templates (EK Credential Profile 2.0, B.3): a restricted decryption key bound to
# this TPM. userWithAuth/adminWithPolicy differ between low and high range templates.
EK_REQUIRED_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
)  # fmt: skip

Certificate = EkCertificate | x509.Certificate


def load_ek_certificate(data: bytes, field: str = "ek_certificate") -> EkCertificate:
    """One DER certificate; NV padding after it (all 0x00 or all 0xFF) is tolerated.

    Some TPMs return the whole EK certificate NV index (TCG EK Credential Profile 2.2.1.5)
    padded past the DER length (STMicro pads to 1600 bytes with 0xFF); any other trailing
    byte is refused. Vendor encoding quirks are read as ``ek_cert`` explains.
    """
    return load_certificate_bytes(data, field)


def load_ek_chain(blobs: Sequence[bytes], field: str = "ek_chain") -> list[EkCertificate]:
    """The untrusted EK CA certificates a device read from its NV chain indices."""
    if len(blobs) > MAX_CHAIN_CERTIFICATES:
        raise MalformedEvidence(field, f"more than {MAX_CHAIN_CERTIFICATES} certificates")
    return [load_certificate_bytes(blob, field) for blob in blobs]


def _describe(certificate: EkCertificate) -> str:
    return certificate.describe()


def _valid_at(certificate: EkCertificate, now: dt.datetime) -> bool:
    return certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def _extension_problem(certificate: EkCertificate) -> str | None:
    """Critical extensions this verifier does not process, or handled ones it cannot read."""
    for extension in certificate.extensions:
        if extension.critical and extension.oid not in _HANDLED_EXTENSIONS:
            return f"unhandled critical extension {extension.oid}"
    try:
        for oid, spec in ((_BASIC_CONSTRAINTS, asn1_x509.BasicConstraints),
                          (_KEY_USAGE, asn1_x509.KeyUsage),
                          (_EKU, asn1_x509.ExtKeyUsageSyntax),
                          (_SAN, asn1_x509.GeneralNames)):
            extension = certificate.extension(oid)
            if extension is not None:
                spec.load(extension.value, strict=True).native  # noqa: B018 (parse all)
    except (ValueError, TypeError, KeyError) as exc:
        return f"unreadable extension: {exc}"
    return None


def _basic_constraints(certificate: EkCertificate) -> tuple[bool, int | None] | None:
    extension = certificate.extension(_BASIC_CONSTRAINTS)
    if extension is None:
        return None
    value = asn1_x509.BasicConstraints.load(extension.value).native
    return bool(value["ca"]), value["path_len_constraint"]


def _key_usage(certificate: EkCertificate) -> set[str] | None:
    extension = certificate.extension(_KEY_USAGE)
    return None if extension is None else set(asn1_x509.KeyUsage.load(extension.value).native)


def _key_problem(certificate: EkCertificate) -> str | None:
    try:
        key = certificate.public_key()
    except CertificateProblem as exc:
        return str(exc)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        return f"RSA key of {key.key_size} bits"
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve,
                                                                       _ALLOWED_CURVES):
        return f"curve {key.curve.name} not allowed"
    return None


def _issuer_problem(issuer: EkCertificate, intermediates_below: int) -> str | None:
    """RFC 5280 6.1.4 (k), (l), (n) for a certificate that signed another one."""
    problem = _extension_problem(issuer) or _key_problem(issuer)
    if problem:
        return problem
    constraints = _basic_constraints(issuer)
    if constraints is None:
        return "issuer has no basicConstraints"
    is_ca, path_length = constraints
    if not is_ca:
        return "issuer is not a CA (basicConstraints CA:false)"
    if path_length is not None and intermediates_below > path_length:
        return f"pathLenConstraint {path_length} exceeded"
    usage = _key_usage(issuer)
    if usage is not None and "key_cert_sign" not in usage:
        return "issuer keyUsage lacks keyCertSign"
    return None


def _leaf_problem(leaf: EkCertificate) -> str | None:
    problem = _extension_problem(leaf) or _key_problem(leaf)
    if problem:
        return problem
    constraints = _basic_constraints(leaf)
    if constraints is not None and constraints[0]:
        return "EK certificate is a CA certificate"
    extension = leaf.extension(_EKU)
    if extension is None:
        return None
    usages = [purpose.dotted for purpose in asn1_x509.ExtKeyUsageSyntax.load(extension.value)]
    if TCG_KP_EK_CERTIFICATE.dotted_string not in usages:
        return "extendedKeyUsage present without tcg-kp-EKCertificate"
    return None


def verify_ek_certificate(
    ek_certificate: Certificate, trusted_roots: Sequence[Certificate],
    intermediates: Sequence[Certificate] = (), *, now: dt.datetime,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> list[EkCertificate]:  # fmt: skip
    """The path EK certificate -> ... -> trusted root, or EkUntrusted / EkExpired.

    ``trusted_roots`` are the configured manufacturer trust anchors (usually self-signed
    roots; an EK issuing CA may be configured as an anchor too). ``intermediates`` are
    untrusted helpers, e.g. the vendor intermediates of the built-in store or the chain the
    device read from its NV. Every certificate in the path must be valid at ``now``
    (timezone aware). Depth-first over the candidates whose subject matches the issuer
    name; the first complete path wins. Trust is decided first: an expired certificate
    from an unknown CA is ek.untrusted, ek.expired means the path exists but a certificate
    on it is outside its validity.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone aware")
    leaf = as_ek_certificate(ek_certificate)
    problem = _leaf_problem(leaf)
    if problem:
        raise EkUntrusted(detail=f"EK certificate {_describe(leaf)}: {problem}")
    roots = [as_ek_certificate(root) for root in trusted_roots]
    anchors = {root.fingerprint_sha256 for root in roots}
    pool = roots + [c for c in map(as_ek_certificate, intermediates)
                    if c.fingerprint_sha256 not in anchors]
    problems: list[str] = []
    expired: list[str] = []
    checks = [0]

    def extend(path: list[EkCertificate]) -> list[EkCertificate] | None:
        child = path[-1]
        seen = {c.fingerprint_sha256 for c in path}
        for issuer in pool:
            fingerprint = issuer.fingerprint_sha256
            if issuer.subject_key != child.issuer_key or fingerprint in seen:
                continue
            problem = _issuer_problem(issuer, len(path) - 1)
            if not problem:
                checks[0] += 1
                if checks[0] > MAX_SIGNATURE_CHECKS:
                    raise EkUntrusted(detail=f"path building for {_describe(leaf)} gave up "
                                             f"after {MAX_SIGNATURE_CHECKS} signature checks")
                signature = signature_problem(child, issuer.public_key())
                problem = signature and f"signature by {_describe(issuer)}: {signature}"
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

    path = extend([leaf])
    if path is not None:
        if not _valid_at(leaf, now):
            raise EkExpired(detail=f"EK certificate {_describe(leaf)} valid "
                                   f"{leaf.not_valid_before_utc} .. "
                                   f"{leaf.not_valid_after_utc}, now {now}")  # fmt: skip
        return path
    if expired:
        raise EkExpired(detail="; ".join(expired + problems))
    raise EkUntrusted(detail=f"no path from {_describe(leaf)} issued by {leaf.issuer_text} "
                             "to a trusted root"
                             + (": " + "; ".join(problems) if problems else ""))  # fmt: skip


def check_ek_attributes(ek_public: TPMT_PUBLIC) -> None:
    """A TCG-template EK: restricted decryption key, fixedTPM/fixedParent, TPM generated."""
    attributes = ek_public.objectAttributes
    if (attributes & EK_REQUIRED_ATTRIBUTES) != EK_REQUIRED_ATTRIBUTES or (
        attributes & TPMA_OBJECT.SIGN_ENCRYPT
    ):
        raise EkAttributes(detail=f"EK objectAttributes {attributes!s}")


def check_ek_public(ek_public: bytes, ek_certificate: Certificate) -> TPMT_PUBLIC:
    """The EK public area (TPM2B_PUBLIC) has EK attributes and the certificate's key."""
    public = parse_public(ek_public, "ek_public")
    check_ek_attributes(public)
    tpm_key = spki_der(public_key(public, "ek_public"))
    ek_certificate = as_ek_certificate(ek_certificate)
    try:
        certificate_key = ek_certificate.public_key()
    except CertificateProblem:
        certificate_key = None
    if certificate_key is None or not hmac.compare_digest(tpm_key, spki_der(certificate_key)):
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
    path: Sequence[Certificate], crls: Sequence[x509.CertificateRevocationList],
) -> None:  # fmt: skip
    """No certificate on the EK path is on a CRL of its issuer (SECURITY-CHECKLIST 9).

    ``path`` is verify_ek_certificate's answer (EK certificate first, trust anchor last).
    A CRL counts only for the issuer that signed it (RFC 5280 6.3.3 (f)); others are
    ignored. CRLs are configured by the operator (`group set-ek-crls`) and refreshed by
    them: the verifier does no network I/O, so a CRL past its nextUpdate still counts.
    """
    path = [as_ek_certificate(certificate) for certificate in path]
    for child, issuer in zip(path, path[1:], strict=False):
        for crl in crls:
            crl_issuer = asn1_x509.Name.load(crl.issuer.public_bytes()).hashable
            if crl_issuer != issuer.subject_key or not crl.is_signature_valid(
                    issuer.public_key()):
                continue
            entry = crl.get_revoked_certificate_by_serial_number(child.serial_number)
            if entry is not None:
                raise EkRevoked(detail=f"{_describe(child)} revoked on "
                                       f"{entry.revocation_date_utc} (CRL of "
                                       f"{_describe(issuer)})")  # fmt: skip
