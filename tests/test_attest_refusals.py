"""The negative corpus over HTTP (SECURITY-CHECKLIST 9-15): genuine swtpm evidence changed
in exactly one way. Each refusal is a 4xx with a stable code, writes nothing but one audit
row, and never echoes the expected secret, nonce or names. The pure verifier has a finer
corpus (tests/test_attestation_live.py); this one proves the endpoints apply every check.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from tpm2_pytss import TPM2B_PUBLIC, TPMA_OBJECT, TPMS_ATTEST
from tpm2_pytss.constants import TPM2_ST

from device_sdk.tpm import TpmDevice, TpmError
from simulators.manufacturer import Manufacturer
from simulators.served import ServedInstance
from simulators.swtpm import SwtpmInstance
from tests.support.attest_helpers import (
    AttestClient,
    Snapshot,
    assert_attest_refused,
    b64,
    ek_crl,
    roots_file,
    unb64,
    write_db,
)
from tests.support.est_helpers import csr_der, ec_key, make_csr

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

GROUP = "tpm-refusals"


@pytest.fixture(scope="module")
def vendor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vendor")


@pytest.fixture(scope="module")
def manufacturer(vendor_dir: Path) -> Manufacturer:
    return Manufacturer.create(vendor_dir)


@pytest.fixture(scope="module")
def server(est_instance: ServedInstance, manufacturer: Manufacturer,
           tmp_path_factory: pytest.TempPathFactory) -> ServedInstance:
    roots = roots_file(tmp_path_factory.mktemp("roots"), manufacturer.ca_certificate_pems)
    est_instance.cli("group", "create", GROUP, "--auth", "tpm", "--ek-roots", str(roots))
    est_instance.cli("group", "create", GROUP + "-2", "--auth", "tpm", "--ek-roots",
                     str(roots))
    return est_instance


@pytest.fixture(scope="module")
def device(manufacturer: Manufacturer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmDevice]:
    """One provisioned swtpm for the module: refusals never enroll it."""
    with SwtpmInstance(tmp_path_factory.mktemp("tpm")) as instance:
        manufacturer.provision(instance.tcti)
        with TpmDevice(instance.tcti) as tpm:
            yield tpm


@pytest.fixture
def client(server: ServedInstance, device: TpmDevice) -> Iterator[AttestClient]:
    attest = AttestClient(server, device, GROUP)
    yield attest
    attest.close()


def _remarshal(attest: bytes, **changes: int) -> bytes:
    parsed = TPMS_ATTEST.unmarshal(attest)[0]
    for name, value in changes.items():
        setattr(parsed, name, value)
    return parsed.marshal()


def _with_attributes(public: bytes, add: int = 0, remove: int = 0) -> bytes:
    parsed = TPM2B_PUBLIC.unmarshal(public)[0]
    parsed.publicArea.objectAttributes = (parsed.publicArea.objectAttributes | add) & ~remove
    return parsed.marshal()


# -- challenge step: what the device claims to be -----------------------------------------

ChallengeChange = Callable[[dict[str, Any], TpmDevice], None]


def _rsa_ek_public_with_ecc_certificate(request: dict[str, Any], tpm: TpmDevice) -> None:
    request["ek_public"] = b64(tpm.endorsement_key("rsa")[1])


def _no_ek_certificate(request: dict[str, Any], tpm: TpmDevice) -> None:
    del request["ek_certificate"]


def _ak_with_decrypt(request: dict[str, Any], tpm: TpmDevice) -> None:
    request["ak_public"] = b64(_with_attributes(unb64(request["ak_public"]),
                                                add=TPMA_OBJECT.DECRYPT))


def _ak_not_restricted(request: dict[str, Any], tpm: TpmDevice) -> None:
    request["ak_public"] = b64(_with_attributes(unb64(request["ak_public"]),
                                                remove=TPMA_OBJECT.RESTRICTED))


def _junk_ek_public(request: dict[str, Any], tpm: TpmDevice) -> None:
    request["ek_public"] = b64(unb64(request["ek_public"])[:-3])


@pytest.mark.parametrize(("change", "status", "code"), [
    (_rsa_ek_public_with_ecc_certificate, 403, "ek.public_mismatch"),
    (_no_ek_certificate, 400, "evidence.malformed"),
    (_ak_with_decrypt, 403, "ak.attributes"),
    (_ak_not_restricted, 403, "ak.attributes"),
    (_junk_ek_public, 400, "evidence.malformed"),
], ids=lambda value: getattr(value, "__name__", str(value)).strip("_"))
def test_challenge_refusals(server: ServedInstance, client: AttestClient, device: TpmDevice,
                            change: ChallengeChange, status: int, code: str) -> None:
    request = client.challenge_request()
    change(request, device)
    before = Snapshot.take(server)
    response = client.post("challenge", request)
    assert_attest_refused(server, before, response, status, code, "attest.challenge")


def test_ek_certificate_from_an_untrusted_manufacturer_is_refused(
        server: ServedInstance, tmp_path: Path) -> None:  # fmt: skip
    rogue = Manufacturer.create(tmp_path / "rogue")
    with SwtpmInstance(tmp_path / "tpm") as instance:
        rogue.provision(instance.tcti)
        with TpmDevice(instance.tcti) as tpm:
            client = AttestClient(server, tpm, GROUP)
            before = Snapshot.take(server)
            response = client.post("challenge", client.challenge_request())
            client.close()
    assert_attest_refused(server, before, response, 403, "ek.untrusted", "attest.challenge")


def test_an_ek_certificate_on_the_manufacturers_crl_is_refused(
        server: ServedInstance, client: AttestClient, device: TpmDevice, vendor_dir: Path,
        tmp_path: Path) -> None:  # fmt: skip
    """SECURITY-CHECKLIST 9: the vendor revoked this TPM's EK certificate."""
    roots = roots_file(tmp_path, Manufacturer.load(vendor_dir).ca_certificate_pems)
    server.cli("group", "create", GROUP + "-crl", "--auth", "tpm", "--ek-roots", str(roots))
    serial = x509.load_der_x509_certificate(device.read_ek_certificate("ecc")).serial_number
    crl = tmp_path / "vendor.crl"
    crl.write_bytes(ek_crl(vendor_dir, [serial]))
    server.cli("group", "set-ek-crls", GROUP + "-crl", "--crl", str(crl))
    client.base = client.base.replace(f"/{GROUP}/", f"/{GROUP}-crl/")
    before = Snapshot.take(server)
    response = client.post("challenge", client.challenge_request())
    assert_attest_refused(server, before, response, 403, "ek.revoked", "attest.challenge")
    other = tmp_path / "other.crl"  # a CRL that lists other TPMs only: no effect
    other.write_bytes(ek_crl(vendor_dir, [serial + 1]))
    server.cli("group", "set-ek-crls", GROUP + "-crl", "--crl", str(other))
    assert client.post("challenge", client.challenge_request()).status_code == 200


def test_group_without_tpm_attestation_refuses_challenges(server: ServedInstance,
                                                          client: AttestClient) -> None:
    client.base = client.base.replace(f"/{GROUP}/", "/default/")
    before = Snapshot.take(server)
    response = client.post("challenge", client.challenge_request())
    assert_attest_refused(server, before, response, 403, "auth.method_not_allowed",
                          "attest.challenge")


# -- enroll step: the evidence answering a genuine challenge ------------------------------

EnrollChange = Callable[[dict[str, Any], TpmDevice, dict[str, Any]], None]


def _wrong_secret(body: dict[str, Any], tpm: TpmDevice, challenge: dict[str, Any]) -> None:
    body["activated_secret"] = b64(bytes(32))


def _certify_with_another_nonce(body: dict[str, Any], tpm: TpmDevice,
                                challenge: dict[str, Any]) -> None:
    info, signature = tpm.certify(b"\x01" * 32)
    body["certify_info"], body["certify_signature"] = b64(info), b64(signature)


def _certify_signature_over_another_message(body: dict[str, Any], tpm: TpmDevice,
                                            challenge: dict[str, Any]) -> None:
    _, signature = tpm.certify(b"\x02" * 32)  # by the same AK, over other bytes
    body["certify_signature"] = b64(signature)


def _certify_wrong_magic(body: dict[str, Any], tpm: TpmDevice,
                         challenge: dict[str, Any]) -> None:
    body["certify_info"] = b64(_remarshal(unb64(body["certify_info"]), magic=0xFF544348))


def _certify_retyped_as_quote(body: dict[str, Any], tpm: TpmDevice,
                              challenge: dict[str, Any]) -> None:
    info = bytearray(unb64(body["certify_info"]))
    info[4:6] = int(TPM2_ST.ATTEST_QUOTE).to_bytes(2, "big")
    body["certify_info"] = b64(bytes(info))


def _certified_key_is_not_the_one_sent(body: dict[str, Any], tpm: TpmDevice,
                                       challenge: dict[str, Any]) -> None:
    body["device_key_public"] = b64(tpm.attestation_key()[1])


def _device_key_claimed_without_fixed_tpm(body: dict[str, Any], tpm: TpmDevice,
                                          challenge: dict[str, Any]) -> None:
    # An imported (software) key has fixedTPM clear; claiming the TPM key's attributes
    # does not help either, since the certified Name covers the attributes.
    body["device_key_public"] = b64(_with_attributes(unb64(body["device_key_public"]),
                                                     remove=TPMA_OBJECT.FIXEDTPM))


def _csr_of_a_software_key(body: dict[str, Any], tpm: TpmDevice,
                           challenge: dict[str, Any]) -> None:
    body["csr"] = b64(csr_der(make_csr(ec_key(), challenge["device_id"])))


def _unknown_challenge(body: dict[str, Any], tpm: TpmDevice, challenge: dict[str, Any]) -> None:
    body["challenge_id"] = "no-such-challenge"


def _truncated_certify(body: dict[str, Any], tpm: TpmDevice, challenge: dict[str, Any]) -> None:
    body["certify_info"] = b64(unb64(body["certify_info"])[:10])


def _not_base64(body: dict[str, Any], tpm: TpmDevice, challenge: dict[str, Any]) -> None:
    body["csr"] = "%%% not base64 %%%"


def _unknown_field(body: dict[str, Any], tpm: TpmDevice, challenge: dict[str, Any]) -> None:
    body["quote_inf"] = body["certify_info"]


@pytest.mark.parametrize(("change", "status", "code"), [
    (_wrong_secret, 403, "credential.wrong_secret"),
    (_certify_with_another_nonce, 403, "certify.nonce_mismatch"),
    (_certify_signature_over_another_message, 403, "certify.bad_signature"),
    (_certify_wrong_magic, 403, "certify.bad_magic"),
    (_certify_retyped_as_quote, 403, "certify.wrong_type"),
    (_certified_key_is_not_the_one_sent, 403, "certify.name_mismatch"),
    (_device_key_claimed_without_fixed_tpm, 403, "certify.name_mismatch"),
    (_csr_of_a_software_key, 403, "csr.key_mismatch"),
    (_unknown_challenge, 403, "challenge.unknown"),
    (_truncated_certify, 400, "evidence.malformed"),
    (_not_base64, 400, "request.invalid_field"),
    (_unknown_field, 400, "request.invalid_field"),
], ids=lambda value: getattr(value, "__name__", str(value)).strip("_"))
def test_enroll_refusals(server: ServedInstance, client: AttestClient, device: TpmDevice,
                         change: EnrollChange, status: int, code: str) -> None:
    challenge = client.challenge()
    body = client.evidence(challenge)
    secret = body["activated_secret"]
    change(body, device, challenge)
    before = Snapshot.take(server)
    response = client.post("enroll", body)
    assert_attest_refused(server, before, response, status, code, "attest.enroll",
                          challenge["nonce"], unb64(challenge["nonce"]).hex(), secret,
                          unb64(secret).hex())


def test_a_challenge_is_single_use_even_after_a_refusal(server: ServedInstance,
                                                        client: AttestClient) -> None:
    challenge = client.challenge()
    body = client.evidence(challenge)
    genuine_secret = body["activated_secret"]
    body["activated_secret"] = b64(bytes(32))
    assert client.post("enroll", body).status_code == 403
    body["activated_secret"] = genuine_secret  # guessing again on the same challenge
    before = Snapshot.take(server)
    response = client.post("enroll", body)
    assert_attest_refused(server, before, response, 403, "challenge.reused", "attest.enroll")


def test_an_expired_challenge_is_refused(server: ServedInstance, client: AttestClient) -> None:
    challenge = client.challenge()
    body = client.evidence(challenge)
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).replace(tzinfo=None)
    write_db(server, "UPDATE attestation_challenge SET expires_at = ? WHERE challenge_id = ?",
             past.isoformat(sep=" "), challenge["challenge_id"])
    before = Snapshot.take(server)
    response = client.post("enroll", body)
    assert_attest_refused(server, before, response, 403, "challenge.expired", "attest.enroll")


def test_a_challenge_answers_only_under_its_own_group(server: ServedInstance,
                                                      client: AttestClient) -> None:
    body = client.evidence(client.challenge())
    client.base = client.base.replace(f"/{GROUP}/", f"/{GROUP}-2/")
    before = Snapshot.take(server)
    response = client.post("enroll", body)
    assert_attest_refused(server, before, response, 403, "challenge.unknown", "attest.enroll")


def test_too_many_open_challenges_for_one_ek_are_refused(server: ServedInstance,
                                                         client: AttestClient) -> None:
    write_db(server, "DELETE FROM attestation_challenge")
    for _ in range(8):  # attestation.max_open_challenges
        client.challenge()
    before = Snapshot.take(server)
    response = client.post("challenge", client.challenge_request())
    assert int(response.headers["Retry-After"]) >= 1
    assert_attest_refused(server, before, response, 429, "challenge.too_many",
                          "attest.challenge")
    write_db(server, "DELETE FROM attestation_challenge")


def test_another_tpm_cannot_take_over_an_enrolled_identity(
        server: ServedInstance, manufacturer: Manufacturer, tmp_path: Path) -> None:  # fmt: skip
    """Device B presents device A's (public) EK and certificate with B's own AK: the pinned
    AK refuses it; even after an operator unpins, B cannot activate A's credential."""
    with SwtpmInstance(tmp_path / "a") as tpm_a, SwtpmInstance(tmp_path / "b") as tpm_b:
        manufacturer.provision(tpm_a.tcti)
        manufacturer.provision(tpm_b.tcti)
        with TpmDevice(tpm_a.tcti) as device_a:
            client_a = AttestClient(server, device_a, GROUP)
            a_claim = client_a.challenge_request()
            challenge = client_a.challenge(a_claim)
            assert client_a.post("enroll", client_a.evidence(challenge)).status_code == 200
            client_a.close()
        with TpmDevice(tpm_b.tcti) as device_b:
            client_b = AttestClient(server, device_b, GROUP)
            claim = dict(a_claim, ak_public=b64(device_b.attestation_key()[1]))
            before = Snapshot.take(server)
            response = client_b.post("challenge", claim)
            assert_attest_refused(server, before, response, 409, "identity.ak_mismatch",
                                  "attest.challenge")
            server.cli("devices", "unpin-ak", challenge["device_id"])
            stolen = client_b.challenge(claim)
            with pytest.raises(TpmError):  # TPM_RC_INTEGRITY: not this TPM's EK
                device_b.activate_credential(unb64(stolen["credential_blob"]),
                                             unb64(stolen["encrypted_secret"]), "ecc")
            body = client_b.evidence(stolen, secret=bytes(32))  # so it can only guess
            before = Snapshot.take(server)
            response = client_b.post("enroll", body)
            assert_attest_refused(server, before, response, 403, "credential.wrong_secret",
                                  "attest.enroll")
            client_b.close()
