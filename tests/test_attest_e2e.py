"""TPM-attested enrollment end to end: swtpm devices, the device SDK, a served instance.

The happy paths go through the SDK and `enroll-device`; the refusals send genuine swtpm
evidence changed in exactly one way (SECURITY-CHECKLIST 9-15) and check the whole refusal
contract: 4xx + stable code, nothing written but one audit row, nothing expected echoed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from device_sdk.attest import AttestedEnrollment
from device_sdk.tpm import TpmDevice
from simulators.manufacturer import Manufacturer, ProvisionedTpm
from simulators.served import ServedInstance
from simulators.swtpm import SwtpmInstance
from tests.support.attest_helpers import (
    AttestClient,
    Snapshot,
    assert_attest_refused,
    roots_file,
    unb64,
)

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def manufacturer(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    return Manufacturer.create(tmp_path_factory.mktemp("vendor"))


@pytest.fixture(scope="module")
def server(est_instance: ServedInstance, manufacturer: Manufacturer,
           tmp_path_factory: pytest.TempPathFactory) -> ServedInstance:
    roots = roots_file(tmp_path_factory.mktemp("roots"), manufacturer.ca_certificate_pems)
    est_instance.cli("group", "create", "tpm-e2e", "--auth", "tpm", "--ek-roots", str(roots))
    est_instance.cli("group", "create", "tpm-pcr", "--auth", "tpm", "--ek-roots", str(roots))
    est_instance.cli("group", "create", "tpm-allow", "--auth", "tpm", "--ek-policy",
                     "allowlist")
    return est_instance


@pytest.fixture
def swtpm(tmp_path: Path, manufacturer: Manufacturer) -> Iterator[tuple[SwtpmInstance,
                                                                         ProvisionedTpm]]:
    with SwtpmInstance(tmp_path / "tpm") as instance:
        yield instance, manufacturer.provision(instance.tcti)


@pytest.fixture
def device(swtpm: tuple[SwtpmInstance, ProvisionedTpm]) -> Iterator[TpmDevice]:
    with TpmDevice(swtpm[0].tcti) as tpm:
        yield tpm


@pytest.fixture
def client(server: ServedInstance, device: TpmDevice) -> Iterator[AttestClient]:
    attest = AttestClient(server, device, "tpm-e2e")
    yield attest
    attest.close()


def ek_device_id(provisioned: ProvisionedTpm, kind: str = "ecc") -> str:
    ek = provisioned.ecc_ek if kind == "ecc" else provisioned.rsa_ek
    spki = ek.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def common_name(certificate: x509.Certificate) -> str:
    return certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def enroll_device_cli(server: ServedInstance, tcti: str, state: Path, group: str,
                      *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "enroll-device"), "enroll", "--server", server.url, "--server-ca",
         str(server.trust_anchor), "--tcti", tcti, "--state-dir", str(state), "--group", group,
         "--json", *extra], capture_output=True, text=True, timeout=120)


# -- the happy paths -------------------------------------------------------------------


def test_enroll_device_cli_enrolls_a_swtpm_and_a_rerun_changes_nothing(
        server: ServedInstance, swtpm: tuple[SwtpmInstance, ProvisionedTpm],
        tmp_path: Path) -> None:  # fmt: skip
    instance, provisioned = swtpm
    first = enroll_device_cli(server, instance.tcti, tmp_path / "state", "tpm-e2e")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    device_id = ek_device_id(provisioned)
    assert (result["outcome"], result["device_id"]) == ("enrolled", device_id)
    certificate = x509.load_pem_x509_certificate(Path(result["certificate"]).read_bytes())
    assert common_name(certificate) == device_id
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(server.trust_anchor),
                             result["certificate"]], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert Path(result["key"]).read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")

    again = enroll_device_cli(server, instance.tcti, tmp_path / "state", "tpm-e2e")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["outcome"] == "already-enrolled"
    shown = server.cli_json("devices", "show", device_id, "--evidence")
    assert shown["enrolled_by"] == "tpm" and len(shown["certificates"]) == 1
    (evidence,) = shown["evidence"]
    assert evidence["serial"] == format(certificate.serial_number, "x")
    assert evidence["certify_type"] == "certify"
    assert "Simulated TPM Vendor" in evidence["ek_certificate"]["issuer"]
    assert unb64(evidence["raw"]["ek_certificate"]) == provisioned.ecc_ek.certificate_der


def test_rsa_ek_enrolls_with_its_own_identity(server: ServedInstance, device: TpmDevice,
                                              swtpm: tuple[SwtpmInstance, ProvisionedTpm]
                                              ) -> None:  # fmt: skip
    with AttestedEnrollment(server.url, server.trust_anchor, device, "tpm-e2e",
                            ek_kind="rsa") as enrollment:
        certificate = enrollment.enroll()
    assert common_name(certificate) == ek_device_id(swtpm[1], "rsa")
    assert ek_device_id(swtpm[1], "rsa") != ek_device_id(swtpm[1], "ecc")


def test_reenrollment_keeps_the_identity_and_rotating_the_key_gets_a_new_certificate(
        server: ServedInstance, device: TpmDevice) -> None:  # fmt: skip
    with AttestedEnrollment(server.url, server.trust_anchor, device, "tpm-e2e") as enrollment:
        first = enrollment.enroll()
        second = enrollment.enroll()
        device.rotate_device_key()
        rotated = enrollment.enroll()
    device_id = common_name(first)
    assert common_name(second) == common_name(rotated) == device_id
    assert first.public_key() == second.public_key() != rotated.public_key()
    statuses = {c["serial"]: c["status"] for c in
                server.cli_json("certs", "list", "--device", device_id)}
    assert statuses == {format(first.serial_number, "x"): "superseded",
                        format(second.serial_number, "x"): "superseded",
                        format(rotated.serial_number, "x"): "active"}


def test_allowlist_group_takes_only_listed_eks(server: ServedInstance, device: TpmDevice,
                                               tmp_path: Path) -> None:  # fmt: skip
    client = AttestClient(server, device, "tpm-allow")
    request = client.challenge_request()
    del request["ek_certificate"]  # an allowlisted EK needs no certificate
    before = Snapshot.take(server)
    response = client.post("challenge", request)
    assert_attest_refused(server, before, response, 403, "ek.not_allowlisted",
                          "attest.challenge")
    ek_public = tmp_path / "ek.pub"
    ek_public.write_bytes(unb64(request["ek_public"]))
    server.cli("group", "allow-ek", "tpm-allow", "--ek-public", str(ek_public))
    challenge = client.challenge(request)
    response = client.post("enroll", client.evidence(challenge))
    assert response.status_code == 200, response.text
    client.close()


def test_boot_state_policy_admits_good_firmware_and_refuses_a_changed_pcr(
        server: ServedInstance, swtpm: tuple[SwtpmInstance, ProvisionedTpm],
        tmp_path: Path) -> None:  # fmt: skip
    instance, _ = swtpm
    env = {"TPM2TOOLS_TCTI": instance.tcti}
    pcrread = subprocess.run(["tpm2_pcrread", "sha256:0,1,2,3,7"], capture_output=True,
                             text=True, env=env, check=True).stdout
    (tmp_path / "golden.yaml").write_text(pcrread)
    server.cli("group", "set-pcrs", "tpm-pcr", "--pcrread", str(tmp_path / "golden.yaml"))
    with TpmDevice(instance.tcti) as tpm:
        client = AttestClient(server, tpm, "tpm-pcr")
        challenge = client.challenge()
        assert challenge["quote"] == {"pcrs": {"sha256": [0, 1, 2, 3, 7]}}
        assert client.post("enroll", client.evidence(challenge)).status_code == 200
        # no quote although the policy asks for one
        evidence = client.evidence(client.challenge())
        del evidence["quote_info"], evidence["quote_signature"]
        before = Snapshot.take(server)
        assert_attest_refused(server, before, client.post("enroll", evidence), 403,
                              "quote.pcr_selection", "attest.enroll")
        client.close()
    subprocess.run(["tpm2_pcrextend", "7:sha256=" + "ab" * 32], env=env, check=True)
    with TpmDevice(instance.tcti) as tpm:
        client = AttestClient(server, tpm, "tpm-pcr")
        evidence = client.evidence(client.challenge())
        before = Snapshot.take(server)
        assert_attest_refused(server, before, client.post("enroll", evidence), 403,
                              "quote.pcr_mismatch", "attest.enroll")
        client.close()



def test_enroll_device_exit_status_tells_a_refusal_from_a_temporary_failure(
        server: ServedInstance, swtpm: tuple[SwtpmInstance, ProvisionedTpm],
        tmp_path: Path) -> None:  # fmt: skip
    instance, provisioned = swtpm
    refused = enroll_device_cli(server, instance.tcti, tmp_path / "a", "default")
    assert refused.returncode == 3, refused.stderr
    answer = json.loads(refused.stdout)
    assert (answer["outcome"], answer["http_status"], answer["code"], answer["retry"]) == (
        "error", 403, "auth.method_not_allowed", False)
    assert answer["device_id"] == ek_device_id(provisioned)  # support can find it
    unreachable = subprocess.run(
        [str(BIN / "enroll-device"), "enroll", "--server", "https://localhost:1",
         "--server-ca", str(server.trust_anchor), "--tcti", instance.tcti, "--state-dir",
         str(tmp_path / "b"), "--attempts", "2", "--max-backoff", "0", "--json"],
        capture_output=True, text=True, timeout=120)
    assert unreachable.returncode == 75, unreachable.stderr
    answer = json.loads(unreachable.stdout)
    assert (answer["code"], answer["retry"]) == ("client.retries_exhausted", True)
    assert not (tmp_path / "b" / "device.crt.pem").exists()


def test_a_group_with_approval_holds_a_tpm_device_until_an_operator_approves(
        server: ServedInstance, device: TpmDevice, manufacturer: Manufacturer,
        tmp_path: Path) -> None:  # fmt: skip
    roots = roots_file(tmp_path, manufacturer.ca_certificate_pems)
    server.cli("group", "create", "tpm-approval", "--auth", "tpm", "--ek-roots", str(roots),
               "--approval")
    client = AttestClient(server, device, "tpm-approval")
    held = client.post("enroll", client.evidence(client.challenge()))
    assert (held.status_code, held.headers["X-Error-Code"]) == (202, "enroll.pending_approval")
    assert int(held.headers["Retry-After"]) >= 1
    device_id = ek_device_id_of(device)
    pending = [p["device_id"] for p in server.cli_json("devices", "pending")]
    assert device_id in pending
    assert server.cli_json("devices", "list", "--group", "tpm-approval") == []  # not enrolled
    server.cli("devices", "approve", device_id)
    approved = client.post("enroll", client.evidence(client.challenge()))
    assert approved.status_code == 200, approved.text
    assert server.cli_json("devices", "show", device_id)["enrolled_by"] == "tpm"
    client.close()


def ek_device_id_of(device: TpmDevice) -> str:
    from device_sdk.attest import device_id_of

    return device_id_of(device.endorsement_key("ecc")[1])
