"""Every TCG EK profile end to end: swtpm provisioned per profile, the SDK, a served instance.

Low range (L-1 RSA 2048, L-2 P-256: policy-authorised EK) and high range (H-1 RSA 2048,
H-2 P-256, H-3 P-384, H-6 RSA 3072: EK with userWithAuth). Plus the EK certificate chain
in NV (0x01C00100) for a group that trusts only the vendor root, vendors by name, and a
bulk EK allowlist imported from real `tpm2_createek` output.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from tpm2_pytss.internal.templates import ek_rsa2048
from tpm2_pytss.types import TPM2B_PUBLIC

from device_sdk.attest import AttestedEnrollment, device_id_of
from device_sdk.est import EstError
from device_sdk.tpm import TpmDevice
from device_sdk.tpm_templates import EK_PROFILES
from simulators.manufacturer import ALL_SLOTS, Manufacturer
from simulators.served import ServedInstance
from simulators.swtpm import SwtpmInstance
from tests.support.attest_helpers import AttestClient, roots_file
from tests.support.fixtures import db_count
from tests.test_ek_vendor_certificates import _flip, _real

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker



@pytest.fixture(scope="module")
def manufacturer(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    return Manufacturer.create(tmp_path_factory.mktemp("vendor"), name="Profile TPM Vendor")


@pytest.fixture(scope="module")
def server(est_instance: ServedInstance, manufacturer: Manufacturer,
           tmp_path_factory: pytest.TempPathFactory) -> ServedInstance:
    directory = tmp_path_factory.mktemp("roots")
    both = roots_file(directory, manufacturer.ca_certificate_pems)
    root_only = directory / "root-only.pem"
    root_only.write_text(manufacturer.ca_certificate_pems[1])
    est_instance.cli("group", "create", "ek-profiles", "--auth", "tpm", "--ek-roots", str(both))
    est_instance.cli("group", "create", "ek-root-only", "--auth", "tpm", "--ek-roots",
                     str(root_only))
    est_instance.cli("group", "create", "ek-bulk", "--auth", "tpm", "--ek-policy", "allowlist")
    return est_instance


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[SwtpmInstance]:
    with SwtpmInstance(tmp_path / "tpm") as instance:
        yield instance


def spki_sha256(certificate) -> str:
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@pytest.mark.parametrize("profile", list(EK_PROFILES))
def test_every_ek_profile_enrolls_end_to_end(server: ServedInstance, manufacturer: Manufacturer,
                                             swtpm: SwtpmInstance, profile: str) -> None:
    provisioned = manufacturer.provision(swtpm.tcti, slots=(ALL_SLOTS[profile],))
    ek = provisioned.ek(profile)
    assert ek.nv_index == EK_PROFILES[profile].cert_index
    with TpmDevice(swtpm.tcti) as tpm:
        assert tpm.read_ek_certificate(profile) == ek.certificate_der
        with AttestedEnrollment(server.url, server.trust_anchor, tpm, "ek-profiles") as client:
            certificate = client.enroll()  # the SDK finds the profile by its certificate
        assert tpm.transient_handles() == []
    device_id = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert device_id == spki_sha256(ek.certificate) == device_id_of(ek.public_area)
    shown = server.cli_json("devices", "show", device_id, "--evidence")
    (evidence,) = shown["evidence"]
    assert base64.b64decode(evidence["raw"]["ek_certificate"]) == ek.certificate_der
    assert base64.b64decode(evidence["raw"]["ek_public"]) == ek.public_area


def test_ek_chain_from_nv_lets_a_root_only_group_verify(server: ServedInstance,
                                                        manufacturer: Manufacturer,
                                                        tmp_path: Path) -> None:
    with SwtpmInstance(tmp_path / "without") as instance:
        manufacturer.provision(instance.tcti)
        with TpmDevice(instance.tcti) as tpm:
            assert tpm.ek_certificate_chain() == []
            with AttestedEnrollment(server.url, server.trust_anchor, tpm, "ek-root-only",
                                    attempts=1) as client, pytest.raises(EstError) as refused:
                client.enroll()
    assert refused.value.code == "ek.untrusted"
    with SwtpmInstance(tmp_path / "with") as instance:
        provisioned = manufacturer.provision(instance.tcti, ek_chain=True)
        with TpmDevice(instance.tcti) as tpm:
            chain = tpm.ek_certificate_chain()
            assert chain == [manufacturer.ek_ca_certificate.public_bytes(
                serialization.Encoding.DER)]
            with AttestedEnrollment(server.url, server.trust_anchor, tpm,
                                    "ek-root-only") as client:
                certificate = client.enroll()
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        spki_sha256(provisioned.ecc_ek.certificate)


def test_group_trusting_vendors_by_name(server: ServedInstance, tmp_path: Path) -> None:
    server.cli("group", "create", "by-vendor", "--auth", "tpm", "--ek-vendors",
               "stmicro,infineon")
    groups = {g["name"]: g for g in server.cli_json("group", "list")}
    assert "by-vendor" in groups
    server.cli("group", "set-ek-vendors", "by-vendor", "nuvoton,google-cloud")
    refused = server.cli("group", "set-ek-vendors", "by-vendor", "acme", check=False)
    assert refused.returncode != 0 and "unknown TPM vendor" in refused.stderr
    # the Nuvoton roots that cryptography cannot parse, given as --ek-roots (issue 11)
    bundle = (Path(__file__).parent.parent / "enroll_server" / "ek_vendors" / "nuvoton.pem")
    server.cli("group", "create", "nuvoton-pem", "--auth", "tpm", "--ek-roots", str(bundle))
    missing = server.cli("group", "create", "no-trust", "--auth", "tpm", check=False)
    assert missing.returncode != 0 and "--ek-vendors" in missing.stderr


def test_allow_ek_from_a_directory_and_a_csv_of_tpm2_createek_output(
        server: ServedInstance, tmp_path: Path) -> None:  # fmt: skip
    outputs = tmp_path / "createek"
    outputs.mkdir()
    ids = []
    for number in range(2):
        with SwtpmInstance(tmp_path / f"tpm{number}") as instance:
            env = {"TPM2TOOLS_TCTI": instance.tcti, "PATH": "/usr/bin:/bin"}
            rsa_pub, ecc_pem = outputs / f"dev{number}-rsa.pub", outputs / f"dev{number}-ecc.pem"
            subprocess.run(["tpm2_createek", "-c", str(tmp_path / "ek.ctx"), "-G", "rsa",
                            "-u", str(rsa_pub)], env=env, check=True, capture_output=True)
            subprocess.run(["tpm2_flushcontext", "-t"], env=env, check=True)
            subprocess.run(["tpm2_createek", "-c", str(tmp_path / "ek2.ctx"), "-G", "ecc",
                            "-f", "pem", "-u", str(ecc_pem)], env=env, check=True,
                           capture_output=True)
            ids += [device_id_of(rsa_pub.read_bytes())]
            ids += [hashlib.sha256(serialization.load_pem_public_key(ecc_pem.read_bytes())
                                   .public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat
                                                 .SubjectPublicKeyInfo)).hexdigest()]
    out = server.cli("group", "allow-ek", "ek-bulk", "--from", str(outputs)).stdout
    assert "Allowed 4 of 4 EKs" in out
    assert db_count(server, "ek_allowlist_entry", f"ek_sha256 IN ({','.join(repr(i) for i in ids)})"
                    ) == 4
    # the same EKs as a CSV (one added, the rest already there); a bad row stops everything
    csv_file = tmp_path / "eks.csv"
    rows = ["ek_public,note"] + [
        f"{base64.b64encode((outputs / f'dev{n}-rsa.pub').read_bytes()).decode()},rack {n}"
        for n in range(2)]
    csv_file.write_text("\n".join(rows) + "\n")
    assert "Allowed 0 of 2 EKs" in server.cli("group", "allow-ek", "ek-bulk", "--from",
                                               str(csv_file)).stdout
    csv_file.write_text("\n".join([*rows, "not-base64!,bad"]) + "\n")
    refused = server.cli("group", "allow-ek", "ek-bulk", "--from", str(csv_file), "--remove",
                         check=False)
    assert refused.returncode != 0 and "line 4" in refused.stderr
    assert db_count(server, "ek_allowlist_entry", f"ek_sha256 IN ({','.join(repr(i) for i in ids)})"
                    ) == 4  # nothing removed


def _public_area_for(der: bytes) -> bytes:
    """A TCG L-1 EK public area around a real EK certificate's RSA key (no TPM needed: the
    challenge step checks the certificate and the key, activation would need the TPM)."""
    key = x509.load_der_x509_certificate(der).public_key()
    public = TPM2B_PUBLIC.unmarshal(ek_rsa2048.template.marshal())[0]
    public.publicArea.unique.rsa = key.public_numbers().n.to_bytes(256, "big")
    return public.marshal()


def test_server_accepts_a_real_stmicro_ek_as_read_from_nv_and_refuses_a_tampered_one(
        server: ServedInstance, swtpm: SwtpmInstance) -> None:  # fmt: skip
    """A group trusting the built-in store by vendor name issues a challenge for a real
    ST33HTPHAHD8 EK certificate padded to 1600 bytes (as the TPM returns it)."""
    server.cli("group", "create", "real-stm", "--auth", "tpm", "--ek-vendors", "stmicro")
    der = _real("stm-rsa-ek-st33htphahd8.pem")
    with TpmDevice(swtpm.tcti) as tpm:
        client = AttestClient(server, tpm, "real-stm")
        _, ak_public, _ = tpm.attestation_key()
        request = {"ek_public": base64.b64encode(_public_area_for(der)).decode(),
                   "ak_public": base64.b64encode(ak_public).decode(),
                   "ek_certificate": base64.b64encode(der + b"\xff" * (1600 - len(der))
                                                      ).decode()}
        challenge = client.challenge(request)
        assert challenge["device_id"] == spki_sha256_der(der)
        tampered = dict(request, ek_certificate=base64.b64encode(
            _flip(der, len(der) // 3)).decode(), ek_public=base64.b64encode(
            _public_area_for(_flip(der, len(der) // 3))).decode())
        response = client.post("challenge", tampered)
        assert response.status_code == 403 and response.headers["X-Error-Code"] == "ek.untrusted"
        client.close()
    server.cli("group", "set-ek-vendors", "real-stm", "infineon")
    with TpmDevice(swtpm.tcti) as tpm:
        client = AttestClient(server, tpm, "real-stm")
        response = client.post("challenge", request)
        assert response.status_code == 403 and response.headers["X-Error-Code"] == "ek.untrusted"
        client.close()


def spki_sha256_der(der: bytes) -> str:
    return spki_sha256(x509.load_der_x509_certificate(der))
