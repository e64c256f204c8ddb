"""The issuing CA: one interface over interchangeable key backends (file or PKCS#11).

The signer never decides *whether* to issue; it builds exactly what the profile says and
signs it. Serial numbers are 159 random bits from the OS CSPRNG (RFC 5280 4.1.2.2 caps
serials at 20 octets; CA/B BR 7.1 asks for at least 64 random bits); uniqueness is then
enforced by the database's unique index.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .profiles import CertProfile


class CAKey(Protocol):
    """What a CA key backend offers: cryptography's private key interface."""

    def public_key(self) -> object: ...


def signature_hash(key: object) -> hashes.HashAlgorithm:
    """SHA-384 for P-384 (and larger) CA keys, SHA-256 otherwise (RFC 5480 4)."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


class RetiredCA(RuntimeError):
    """A retired CA generation signs CRLs and OCSP responder certificates, never a device
    certificate."""


@dataclass
class Signer:
    ca_certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    # Certificates above the issuing CA, up to and including the root (for cacerts).
    chain: tuple[x509.Certificate, ...] = ()
    # The CA generation's stable name (IssuingCa.name): its PKCS#11 key label or key
    # file stem, and the last segment of its CRL and CA-issuer URLs.
    name: str = "issuing-ca"
    retired: bool = False

    def issue(self, public_key: object, profile: CertProfile,
              now: dt.datetime | None = None) -> x509.Certificate:
        """Build and sign a device certificate for public_key as the profile says."""
        if self.retired:
            raise RetiredCA(f"issuing CA {self.name!r} is retired: it signs no certificates")
        now = now or dt.datetime.now(dt.UTC)
        not_before, not_after = profile.validity(self.ca_certificate, now)
        builder = (
            x509.CertificateBuilder()
            .subject_name(profile.subject())
            .issuer_name(self.ca_certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )
        for extension, critical in profile.extensions(public_key, self.ca_certificate):
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(self.private_key, signature_hash(self.private_key))

    def ca_certificates(self) -> list[x509.Certificate]:
        """The issuing CA first, then its chain: what EST /cacerts returns."""
        return [self.ca_certificate, *self.chain]
