"""Certificate revocation lists for the issuing CA (RFC 5280 5): building one, and checking
a build before it replaces the published one.

Pure: no I/O, no framework, no database. revocation.CrlPublisher reads the revoked
serials, calls build_crl and check_crl, and stores the result (PublishedCrl): a failed
build or check adds nothing, so the last good CRL keeps being served.

cryptography's CertificateRevocationListBuilder copies its entry list on every
add_revoked_certificate, so adding 100k entries one by one is quadratic (24.6 s in
FIELD-NOTES). build_crl builds every RevokedCertificate once and hands the whole list to
the builder's constructor: linear, 0.7-0.9 s for 100k entries on the reference machine
(simulators/bench_revocation.py measures it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .signer import signature_hash

# RFC 5280 4.1.2.2 / 5.2.3: serials and CRL numbers are at most 20 octets, and positive.
_MAX_TWENTY_OCTETS = 1 << 159

# One shared, immutable reasonCode extension per reason (RFC 5280 5.3.1). "unspecified"
# SHOULD NOT be encoded: the entry simply carries no reasonCode. "removeFromCRL" only has
# a meaning in delta CRLs, which this CA does not issue.
_REASON_EXTENSIONS: dict[x509.ReasonFlags, list[x509.Extension[x509.ExtensionType]]] = {
    reason: [x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(reason))]
    for reason in x509.ReasonFlags
    if reason not in (x509.ReasonFlags.unspecified, x509.ReasonFlags.remove_from_crl)
}
_NO_EXTENSIONS: list[x509.Extension[x509.ExtensionType]] = []


@dataclass(frozen=True)
class RevokedEntry:
    """One revoked certificate: a row of the CRL's revokedCertificates (RFC 5280 5.1.2.6)."""

    serial: int
    revoked_at: dt.datetime
    reason: x509.ReasonFlags | None = None

    def __post_init__(self) -> None:
        if not 0 < self.serial < _MAX_TWENTY_OCTETS:
            raise ValueError("serial must be a positive integer of at most 20 octets")
        if self.revoked_at.tzinfo is None:
            raise ValueError("revoked_at must be timezone-aware")
        if self.reason is x509.ReasonFlags.remove_from_crl:
            raise ValueError("removeFromCRL belongs in delta CRLs only (RFC 5280 5.3.1)")


def _revoked_certificate(entry: RevokedEntry) -> x509.RevokedCertificate:
    """The builder's constructor form skips its per-call checks; RevokedEntry did them."""
    return x509.RevokedCertificateBuilder(
        serial_number=entry.serial, revocation_date=entry.revoked_at,
        extensions=_REASON_EXTENSIONS.get(entry.reason, _NO_EXTENSIONS)).build()


def _authority_key_identifier(issuer_certificate: x509.Certificate
                              ) -> x509.AuthorityKeyIdentifier:
    """From the issuer's SKI, so CRL and certificates name the key alike (RFC 5280 5.2.1)."""
    try:
        ski = issuer_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_certificate.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def build_crl(signer_key: object, issuer_certificate: x509.Certificate,
              entries: Iterable[RevokedEntry], crl_number: int, this_update: dt.datetime,
              next_update: dt.datetime) -> bytes:
    """A complete v2 CRL (RFC 5280 5.1) in DER, signed by signer_key.

    Carries the CRL Number (5.2.3) and Authority Key Identifier (5.2.1) extensions and a
    reasonCode per entry (5.3.1). A serial listed twice is listed once, with its first
    entry. Raises ValueError before signing anything if the key does not belong to
    issuer_certificate, the CRL number is out of range, or nextUpdate is not after
    thisUpdate (5.1.2.5).
    """
    if not 0 <= crl_number < _MAX_TWENTY_OCTETS:
        raise ValueError("CRL number must be a non-negative integer of at most 20 octets")
    if this_update.tzinfo is None or next_update.tzinfo is None:
        raise ValueError("thisUpdate and nextUpdate must be timezone-aware")
    if next_update <= this_update:
        raise ValueError("nextUpdate must be later than thisUpdate")
    if signer_key.public_key() != issuer_certificate.public_key():  # type: ignore[attr-defined]
        raise ValueError("the signing key does not belong to the CRL issuer certificate")

    seen: set[int] = set()
    revoked: list[x509.RevokedCertificate] = []
    for entry in entries:
        if entry.serial not in seen:
            seen.add(entry.serial)
            revoked.append(_revoked_certificate(entry))

    builder = (
        x509.CertificateRevocationListBuilder(revoked_certificates=revoked)
        .issuer_name(issuer_certificate.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(crl_number), critical=False)  # 5.2.3: non-critical
        .add_extension(_authority_key_identifier(issuer_certificate), critical=False)
    )
    crl = builder.sign(signer_key, signature_hash(signer_key))  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.DER)


def check_crl(der: bytes, issuer_certificate: x509.Certificate,
              previous_number: int | None) -> x509.CertificateRevocationList:
    """Is ``der`` fit to replace the published CRL? Raises ValueError if not.

    SECURITY: relying parties must keep getting a valid CRL, so a build that is not a CRL
    of this issuer with a valid signature (a faulty HSM, a wrong key), has no nextUpdate
    (5.1.2.5), or does not increase the CRL number (5.2.3) is never published; the
    caller keeps serving the last good one.
    """
    crl = x509.load_der_x509_crl(der)
    if crl.issuer != issuer_certificate.subject:
        raise ValueError("CRL issuer does not match the CA certificate")
    if not crl.is_signature_valid(issuer_certificate.public_key()):  # type: ignore[arg-type]
        raise ValueError("CRL signature does not verify with the CA public key")
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    if previous_number is not None and number <= previous_number:
        raise ValueError(f"CRL number {number} does not increase on {previous_number} "
                         "(RFC 5280 5.2.3)")
    if crl.next_update_utc is None:
        raise ValueError("CRL has no nextUpdate (RFC 5280 5.1.2.5)")
    return crl
