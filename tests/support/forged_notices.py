"""Notices a device must refuse, made the ways an attacker (or a test) could make them."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys

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


_SIGN_IN_CHILD = """
import datetime as dt, json, sys
from enroll_server.ca import delegated
from enroll_server.config import load_settings
from enroll_server.notify.notices import Notice, sign_notice
from enroll_server.services import delegates_dir, load_signer
fields = json.loads(sys.stdin.read())
for name in ("issued_at", "expires_at"):
    fields[name] = dt.datetime.fromisoformat(fields[name])
settings = load_settings(sys.argv[1])
signer = delegated.notice_signer(delegates_dir(settings), load_signer(settings))
print(sign_notice(Notice(**fields), signer.key, list(signer.chain)))
"""


def genuinely_signed(instance: ServedInstance, notice: Notice) -> str:
    """``notice`` signed by the instance's own notice-signing key, as the relay signs. The
    key is in the instance's HSM token, so a child process signs (as a relay would)."""
    fields = {"device_id": notice.device_id, "type": notice.type, "serial": notice.serial,
              "sequence": notice.sequence, "issued_at": notice.issued_at.isoformat(),
              "expires_at": notice.expires_at.isoformat(), "group": notice.group,
              "reason": notice.reason, "extra": dict(notice.extra)}
    result = subprocess.run([sys.executable, "-c", _SIGN_IN_CHILD, str(instance.config)],
                            input=json.dumps(fields), capture_output=True, text=True,
                            timeout=120, check=True)
    return result.stdout.strip()
