"""Certificates of the CA hierarchy itself: root, issuing CA, TLS server (RFC 5280 4.2).

    root CA (EC P-384, file key, encrypted; meant to be kept offline)
      |- issuing CA 1 (EC P-256, key in the PKCS#11 token or a file), pathLen 0
      |    |- device certificates (profiles.py)
      |    `- the EST listener's TLS server certificate
      `- issuing CA 2, 3 ... (`enroll-server ca rotate`, same token): new device
           certificates; the older generations only sign CRLs and OCSP responders
"""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .profiles import DIGITAL_SIGNATURE_ONLY
from .signer import signature_hash

CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False)


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_root_ca(key: ec.EllipticCurvePrivateKey, organization: str,
                 years: int = 20) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = _name(f"{organization} Root CA", organization)
    public_key = key.public_key()
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365 * years))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False)
            .sign(key, signature_hash(key)))


def make_issuing_ca(issuing_public_key: ec.EllipticCurvePublicKey,
                    root_certificate: x509.Certificate, root_key: ec.EllipticCurvePrivateKey,
                    organization: str, years: int = 10, generation: int = 1
                    ) -> x509.Certificate:
    """Issuing CA number ``generation``: every generation has its own subject name
    ("<organization> Issuing CA <n>"), so CRLs, OCSP CertIDs and chains never confuse
    the generations (RFC 5280 5.1.2.3, RFC 6960 4.1.1)."""
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=365 * years), root_certificate.not_valid_after_utc)
    if not_after <= now:
        raise ValueError("the root CA is expired")
    root_ski = root_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return (x509.CertificateBuilder()
            .subject_name(_name(f"{organization} Issuing CA {generation}", organization))
            .issuer_name(root_certificate.subject).public_key(issuing_public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(issuing_public_key),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                root_ski.value), critical=False)
            .sign(root_key, signature_hash(root_key)))


def make_tls_server_certificate(server_public_key: ec.EllipticCurvePublicKey,
                                issuing_certificate: x509.Certificate, issuing_key: object,
                                hostnames: list[str], days: int = 825) -> x509.Certificate:
    """The EST listener's certificate (RFC 7030 3.6: clients check it like RFC 6125)."""
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    issuer_ski = issuing_certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier)
    not_after = min(now + dt.timedelta(days=days), issuing_certificate.not_valid_after_utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
            .issuer_name(issuing_certificate.subject).public_key(server_public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(DIGITAL_SIGNATURE_ONLY, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_public_key),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                issuer_ski.value), critical=False)
            .sign(issuing_key, hashes.SHA256()))  # type: ignore[arg-type]
