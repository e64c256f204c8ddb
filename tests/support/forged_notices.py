"""Notices a device must refuse, made the ways an attacker (or a test) could make them."""

from __future__ import annotations

import base64
import datetime as dt
import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enroll_server.notify.notices import (
    NOTICE_SIGNING_EKU,
    NOTICE_TYP,
    Notice,
    issue_notice_signing_certificate,
)
from simulators.served import ServedInstance


def rogue_chain() -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
    """A notice signer (right EKU and all) under a CA the device does not trust."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Rogue CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    signer = issue_notice_signing_certificate(ca_key, ca, key.public_key(),
                                              dt.timedelta(days=1), now)
    assert NOTICE_SIGNING_EKU in signer.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    return key, [signer, ca]


def jws_signed_by(notice: Notice, key: ec.EllipticCurvePrivateKey,
                  chain: list[x509.Certificate]) -> str:
    """An ES256 notice JWS by any key (sign_notice refuses a signer without the EKU)."""
    def b64url(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"alg": "ES256", "typ": NOTICE_TYP, "x5c": [
        base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]}
    signing_input = (b64url(json.dumps(header).encode()) + "."
                     + b64url(json.dumps(notice.to_claims()).encode()))
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def genuine_signer(instance: ServedInstance) -> tuple[ec.EllipticCurvePrivateKey,
                                                        list[x509.Certificate]]:
    """The instance's own notice-signing key and chain (as the relay signs with)."""
    key = serialization.load_pem_private_key(
        (instance.dir / "ca/notice-signer.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    certificate = x509.load_pem_x509_certificate(
        (instance.dir / "ca/notice-signer.pem").read_bytes())
    issuing_ca = x509.load_pem_x509_certificates(instance.trust_anchor.read_bytes())[0]
    return key, [certificate, issuing_ca]
