"""`make demo`: a whole instance, served for real, enrolling a device over EST.

Creates ./demo-instance afresh (CA key in a SoftHSM token), serves it over TLS, then acts
as an operator (CLI) and as a device (EST client): enroll with a one-time token,
re-enroll over mTLS with the issued certificate, and show what the operator sees.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sdk.est import EstClient, EstError

from .served import ServedInstance

DEMO_DIR = Path("demo-instance")


def say(text: str) -> None:
    print(f"\n== {text}")


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str
             ) -> x509.CertificateSigningRequest:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(
        key, hashes.SHA256())


def main() -> None:
    started = time.monotonic()
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    say("Creating an instance in ./demo-instance (root CA, issuing CA key in SoftHSM)")
    instance = ServedInstance(directory=DEMO_DIR.resolve() / "instance")
    print(f"   config: {instance.config}")
    with instance:
        say(f"Serving EST over TLS at {instance.url} (gunicorn, 2 worker processes)")
        token = instance.token("default")
        print(f"   operator created a one-time token: {token[:10]}...")
        device_id = "sensor-0001"
        key = ec.generate_private_key(ec.SECP256R1())
        with EstClient(instance.url, instance.trust_anchor) as client:
            chain = client.cacerts()
            print(f"   /cacerts: {[c.subject.rfc4514_string() for c in chain]}")
            say(f"Device {device_id} enrolls with the token (EST simpleenroll)")
            certificate = client.simpleenroll(make_csr(key, device_id), token=token)
            print(f"   issued serial {certificate.serial_number:x}")
            print(f"   subject {certificate.subject.rfc4514_string()}, valid until "
                  f"{certificate.not_valid_after_utc:%Y-%m-%d}")
            say("The same token again is refused (single use)")
            try:
                client.simpleenroll(make_csr(ec.generate_private_key(ec.SECP256R1()),
                                             device_id), token=token)
            except EstError as error:
                print(f"   refused: {error}")
        with tempfile.TemporaryDirectory() as tmp:
            cert_path, key_path = Path(tmp, "device.pem"), Path(tmp, "device.key")
            cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
            key_path.write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            say("Device re-enrolls with a new key over mTLS (EST simplereenroll)")
            new_key = ec.generate_private_key(ec.SECP256R1())
            with EstClient(instance.url, instance.trust_anchor, client_cert=cert_path,
                           client_key=key_path) as client:
                renewed = client.simplereenroll(make_csr(new_key, device_id))
            print(f"   new serial {renewed.serial_number:x}; the old one is superseded")
        say("What the operator sees")
        print(instance.cli("devices", "show", device_id).stdout)
        print(instance.cli("certs", "list").stdout)
    print(f"Done in {time.monotonic() - started:.1f} s; the instance is kept in "
          f"{DEMO_DIR}/ (serve it again with: .venv/bin/enroll-server serve --config "
          f"{instance.config})")


if __name__ == "__main__":
    main()
