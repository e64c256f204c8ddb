"""`make demo`: a whole instance, served for real, enrolling devices over EST.

Creates ./demo-instance afresh (CA key in a SoftHSM token), serves it over TLS, then acts
as an operator (CLI) and as a device (EST client): enroll with a one-time token,
re-enroll over mTLS with the issued certificate, and show what the operator sees.

Then TPM attestation: a simulated TPM manufacturer provisions three software TPMs
(swtpm) with EK certificates, a group trusts that manufacturer, and each device enrolls
through the device SDK (device_sdk.attest) with no token at all; a fourth TPM, from a
manufacturer the group does not trust, is refused (ek.untrusted). Every swtpm is
stopped and its state removed at the end.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sdk.attest import AttestedEnrollment
from device_sdk.est import EstClient, EstError
from device_sdk.tpm import TpmDevice

from . import demo_fleet
from .manufacturer import Manufacturer
from .served import ServedInstance
from .swtpm import SwtpmInstance

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
        attested_enrollment(instance)
    demo_fleet.run()
    print(f"Done in {time.monotonic() - started:.1f} s; the instance is kept in "
          f"{DEMO_DIR}/ (serve it again with: .venv/bin/enroll-server serve --config "
          f"{instance.config})")


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms"


def _vendor(manufacturer: Manufacturer) -> str:
    subject = manufacturer.root_certificate.subject
    return str(subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value)


def _enroll_with_tpm(instance: ServedInstance, tcti: str) -> tuple[x509.Certificate, float]:
    """What a device runs on first boot (enroll-device enroll does the same)."""
    began = time.perf_counter()
    with TpmDevice(tcti) as tpm, AttestedEnrollment(instance.url, instance.trust_anchor,
                                                    tpm, "fleet") as client:
        certificate = client.enroll()
    return certificate, time.perf_counter() - began


def attested_enrollment(instance: ServedInstance) -> None:
    """Three genuine TPMs enroll by attestation; one from an unknown vendor is refused."""
    say("TPM attestation: a TPM manufacturer, and a group that trusts it")
    maker = Manufacturer.create(DEMO_DIR / "manufacturer", name="Simulated TPM Vendor")
    roots = DEMO_DIR / "manufacturer" / "ek-roots.pem"
    roots.write_text("".join(maker.ca_certificate_pems))
    print(f"   the vendor's EK CAs: {maker.root_certificate.subject.rfc4514_string()} and "
          f"{maker.ek_ca_certificate.subject.rfc4514_string()}")
    instance.cli("group", "create", "fleet", "--auth", "tpm", "--ek-roots", str(roots))
    print(f"   operator: enroll-server group create fleet --auth tpm --ek-roots {roots}")
    print("   (no tokens: any genuine TPM of this vendor may enroll into 'fleet')")
    stranger = Manufacturer.create(name="Unknown TPM Vendor")
    with tempfile.TemporaryDirectory(prefix="demo-tpms-") as states, \
            contextlib.ExitStack() as tpms:
        say("The factory: 4 software TPMs get their EKs and EK certificates (in NV)")
        devices = []
        for number, vendor in enumerate([maker, maker, maker, stranger], start=1):
            tpm = tpms.enter_context(SwtpmInstance(Path(states) / f"tpm-{number}"))
            provisioned = vendor.provision(tpm.tcti)
            devices.append(tpm)
            print(f"   TPM {number}: made by {_vendor(vendor)!r}, swtpm up in "
                  f"{_ms(tpm.start_seconds)}, provisioned in "
                  f"{_ms(provisioned.timings['total'])}")
        timings = []
        for number, tpm in enumerate(devices[:3], start=1):
            say(f"Device {number} boots and enrolls with TPM attestation (no token)")
            certificate, seconds = _enroll_with_tpm(instance, tpm.tcti)
            timings.append(seconds)
            cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            print(f"   enrolled in {_ms(seconds)}: challenge with its EK certificate, "
                  "ActivateCredential, Certify of its TPM key, CSR signed in the TPM")
            print(f"   device id = SHA-256 of its EK: {cn[:16]}...; serial "
                  f"{certificate.serial_number:x}")
        say("Device 4 tries the same with its TPM from \"Unknown TPM Vendor\"")
        try:
            _enroll_with_tpm(instance, devices[3].tcti)
        except EstError as error:
            refusal = f"refused: {error.status} {error.code}"
            print(f"   device 4 {refusal}: {error.message}")
            print("   (refused at the challenge: nothing stored but an audit event)")
        else:
            raise SystemExit("demo: a TPM from an untrusted manufacturer was enrolled")
    say("What the operator sees for the group 'fleet'")
    print(instance.cli("devices", "list", "--group", "fleet").stdout)
    print(instance.cli("audit", "--limit", "4").stdout)
    print(f"   In short: 3 devices enrolled by TPM attestation in "
          f"{1000 * min(timings):.0f}-{_ms(max(timings))} each (swtpm; real TPMs are 10-100x "
          f"slower per command), device 4 {refusal}. The swtpm processes are stopped.")


if __name__ == "__main__":
    main()
