"""Certificate profiles: what a device certificate looks like (RFC 5280 profile).

A profile is derived from the enrollment group and the verified device identity; the
signer applies it without branching on how the device authenticated.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Device identities become MQTT topic levels and broker usernames (FIELD-NOTES, MQTT):
# no '/', '+', '#', NUL, spaces or anything outside this set.
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
GROUP_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

# Key types a group may allow; names used in config, the database and the CLI.
KEY_TYPES = ("ec-p256", "ec-p384", "rsa")
MIN_RSA_BITS = 2048


# keyUsage of every end-entity certificate that only signs (RFC 5280 4.2.1.3): TLS
# server/client, OCSP responder, notice signer.
DIGITAL_SIGNATURE_ONLY = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False)

# Broker usernames of the service itself (relays: svc.relay.<name>): no device
# may ever be issued one, or it would get a relay's ACL (the ACL file is global).
SERVICE_IDENTITY_PREFIX = "svc."


def is_topic_safe(identifier: str) -> bool:
    """Usable as a device id: a safe topic level, and not a reserved service identity."""
    return (DEVICE_ID_PATTERN.fullmatch(identifier) is not None
            and not identifier.lower().startswith(SERVICE_IDENTITY_PREFIX))


def key_type_of(public_key: object) -> str:
    """The KEY_TYPES name of a public key, or a descriptive name for refused ones."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(
            public_key.curve.name, f"ec-{public_key.curve.name}")
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa"
    return type(public_key).__name__


def device_san_uri(device_id: str) -> str:
    """The SAN URI naming a device (RFC 9039 style URN, our own namespace)."""
    return f"urn:tpm-enroll:device:{device_id}"


@dataclass(frozen=True)
class CertProfile:
    """Everything the signer needs besides the key: a complete, checked template."""

    device_id: str
    group: str
    lifetime: dt.timedelta
    backdate: dt.timedelta
    crl_url: str
    ocsp_url: str
    ca_issuers_url: str

    def __post_init__(self) -> None:
        if not is_topic_safe(self.device_id):
            raise ValueError("device id is not topic safe")
        if self.lifetime <= dt.timedelta(0):
            raise ValueError("lifetime must be positive")

    def subject(self) -> x509.Name:
        """CN = device id, nothing else: the broker username and the renewal subject
        (RFC 7030 4.2.2 wants it repeated verbatim) stay trivial."""
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)])

    def validity(self, issuer: x509.Certificate, now: dt.datetime) -> tuple[dt.datetime,
                                                                           dt.datetime]:
        """notBefore backdated for device clock skew (SECURITY-CHECKLIST 28); notAfter
        never beyond the issuer's (RFC 5280 6.1.3 would make the tail unverifiable)."""
        not_before = max(now - self.backdate, issuer.not_valid_before_utc)
        not_after = min(now + self.lifetime, issuer.not_valid_after_utc)
        if not_after <= now:
            raise ValueError("issuing CA is expired")
        return not_before, not_after

    def extensions(self, public_key: object,
                   issuer: x509.Certificate) -> list[tuple[x509.ExtensionType, bool]]:
        """The device certificate extensions (RFC 5280 4.2), with their criticality."""
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.KeyUsage(digital_signature=True, content_commitment=False,
                           key_encipherment=is_rsa, data_encipherment=False,
                           key_agreement=False, key_cert_sign=False, crl_sign=False,
                           encipher_only=False, decipher_only=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            (x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(device_san_uri(self.device_id))]), False),
            (x509.SubjectKeyIdentifier.from_public_key(public_key), False),  # type: ignore[arg-type]
            (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                issuer_ski.value), False),
            (x509.CRLDistributionPoints([x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(self.crl_url)],
                relative_name=None, reasons=None, crl_issuer=None)]), False),
            (x509.AuthorityInformationAccess([
                x509.AccessDescription(x509.AuthorityInformationAccessOID.OCSP,
                                       x509.UniformResourceIdentifier(self.ocsp_url)),
                x509.AccessDescription(x509.AuthorityInformationAccessOID.CA_ISSUERS,
                                       x509.UniformResourceIdentifier(self.ca_issuers_url)),
            ]), False),
        ]


# Names of issuing CA generations ("issuing-ca", "issuing-ca-2", ...): a URL path
# segment, a PKCS#11 label and a file stem at once.
CA_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
FIRST_CA_NAME = "issuing-ca"


def revocation_urls(public_url: str, ca_name: str = FIRST_CA_NAME) -> dict[str, str]:
    """CRL, OCSP and CA-issuer URLs under the server's public base URL, for the issuing
    CA generation ca_name: /crl/<name>.crl and /ca/<name>.der name it forever (a
    certificate carries them for life), /ocsp answers for every generation."""
    if CA_NAME_PATTERN.fullmatch(ca_name) is None:
        raise ValueError("CA name is not URL safe")
    base = public_url.rstrip("/")
    return {"crl_url": f"{base}/crl/{ca_name}.crl", "ocsp_url": f"{base}/ocsp",
            "ca_issuers_url": f"{base}/ca/{ca_name}.der"}
