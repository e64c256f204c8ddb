"""EST wire encodings (RFC 7030 4.1.3, 4.2.3, 4.5.2 with RFC 8951): pure, no I/O."""

from __future__ import annotations

import base64

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from pyasn1.codec.der import encoder
from pyasn1.type import univ
from pyasn1_modules import rfc7030

PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
CSRATTRS = "application/csrattrs"
PKCS10 = "application/pkcs10"

OID_ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_SHA256_WITH_RSA = "1.2.840.113549.1.1.11"
_CURVE_OIDS = {"ec-p256": "1.2.840.10045.3.1.7", "ec-p384": "1.3.132.0.34"}


def base64_lines(der: bytes) -> bytes:
    """RFC 8951 3: base64 of the DER; line breaks every 64 characters are allowed."""
    return base64.encodebytes(der)


def certs_only(certificates: list[x509.Certificate]) -> bytes:
    """A degenerate CMS SignedData holding just certificates (RFC 7030 4.1.3, 4.2.3)."""
    der = pkcs7.serialize_certificates(certificates, serialization.Encoding.DER)
    return base64_lines(der)


def csr_attributes(allowed_key_types: tuple[str, ...]) -> bytes:
    """CsrAttrs (RFC 7030 4.5.2) telling the client which keys and signatures to use.

    For EC keys an Attribute {id-ecPublicKey, {curve}} per allowed curve (as in the RFC's
    example), ecdsa-with-SHA256 as the signature algorithm; for RSA the bare OIDs.
    """
    csr_attrs = rfc7030.CsrAttrs()
    index = 0

    def add_oid(oid: str) -> None:
        nonlocal index
        choice = rfc7030.AttrOrOID()
        choice["oid"] = univ.ObjectIdentifier(oid)
        csr_attrs[index] = choice
        index += 1

    if any(t.startswith("ec-") for t in allowed_key_types):
        add_oid(OID_ECDSA_WITH_SHA256)
    for key_type in allowed_key_types:
        if key_type in _CURVE_OIDS:
            attribute = rfc7030.Attribute()
            attribute["attrType"] = univ.ObjectIdentifier(OID_EC_PUBLIC_KEY)
            attribute["attrValues"][0] = univ.ObjectIdentifier(_CURVE_OIDS[key_type])
            choice = rfc7030.AttrOrOID()
            choice["attribute"] = attribute
            csr_attrs[index] = choice
            index += 1
    if "rsa" in allowed_key_types:
        add_oid(OID_RSA_ENCRYPTION)
        add_oid(OID_SHA256_WITH_RSA)
    return base64_lines(encoder.encode(csr_attrs))
