"""Certificate revocation lists for the issuing CA (RFC 5280 5), and the holder that serves
the last good one.

Pure: no I/O, no framework, no database. The caller reads the revoked serials, calls
build_crl (usually through CrlCache.rebuild) and publishes CrlCache.current().der.

cryptography's CertificateRevocationListBuilder copies its entry list on every
add_revoked_certificate, so adding 100k entries one by one is quadratic (24.6 s in
FIELD-NOTES). build_crl builds every RevokedCertificate once and hands the whole list to
the builder's constructor: linear, 0.7-0.9 s for 100k entries on the reference machine
(simulators/bench_revocation.py measures it).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterable
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


@dataclass(frozen=True)
class CrlSnapshot:
    """A CRL that passed CrlCache's checks, with what a publisher needs to know about it."""

    der: bytes
    built_at: dt.datetime
    crl_number: int
    this_update: dt.datetime
    next_update: dt.datetime
    entries: int


class CrlCache:
    """Holds the last good CRL of one issuer; a failed rebuild never replaces it.

    SECURITY: relying parties must keep getting a valid CRL while the HSM is down or the
    database read fails, so a rebuild that raises, returns something that is not a CRL of
    this issuer with a valid signature, or does not increase the CRL number (RFC 5280
    5.2.3: monotonically increasing) leaves the published CRL untouched. The error is
    re-raised to the caller and kept in last_error.

    Thread-safe: readers never wait for a build; rebuilds run one at a time.
    """

    def __init__(self, issuer_certificate: x509.Certificate,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self._issuer = issuer_certificate
        self._clock = clock
        self._published: CrlSnapshot | None = None
        self._rebuild_lock = threading.Lock()
        self.last_error: str | None = None  # for health reports and the audit log
        self.failed_rebuilds = 0

    def current(self) -> CrlSnapshot | None:
        """The last good CRL, or None before the first successful rebuild."""
        return self._published  # one reference read: atomic

    def rebuild(self, build: Callable[[], bytes]) -> CrlSnapshot:
        """Run build() and publish its DER if it is an acceptable successor."""
        with self._rebuild_lock:
            try:
                published = self._check(build())
            except Exception as exc:  # any failure at all keeps the last good CRL
                self.failed_rebuilds += 1
                self.last_error = f"CRL rebuild failed: {type(exc).__name__}: {exc}"
                raise
            self._published, self.last_error = published, None
            return published

    def _check(self, der: bytes) -> CrlSnapshot:
        crl = x509.load_der_x509_crl(der)
        if crl.issuer != self._issuer.subject:
            raise ValueError("CRL issuer does not match the CA certificate")
        if not crl.is_signature_valid(self._issuer.public_key()):  # type: ignore[arg-type]
            raise ValueError("CRL signature does not verify with the CA public key")
        crl_number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        previous = self._published
        if previous is not None and crl_number <= previous.crl_number:
            raise ValueError(f"CRL number {crl_number} does not increase on "
                             f"{previous.crl_number} (RFC 5280 5.2.3)")
        if crl.next_update_utc is None:
            raise ValueError("CRL has no nextUpdate (RFC 5280 5.1.2.5)")
        return CrlSnapshot(der=der, built_at=self._clock(), crl_number=crl_number,
                            this_update=crl.last_update_utc, next_update=crl.next_update_utc,
                            entries=len(crl))
