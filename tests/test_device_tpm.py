"""device_sdk.tpm against a real swtpm (no mocks, no server): keys, evidence, byte formats.

Formats are pinned against tpm2-tools 5.4 and tpm2-openssl 1.1.1 driving the same swtpm.
swtpm serves one client at a time, so every tool runs after the TpmDevice is closed.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from tpm2_pytss import (
    ESYS_TR,
    TPM2_ALG,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_CLOCK_INFO,
    TPMT_SIGNATURE,
)
from tpm2_pytss.constants import TPM2_GENERATED, TPM2_ST
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.utils import make_credential

from device_sdk.tpm import (
    AK_HANDLE,
    DEVICE_KEY_HANDLE,
    SRK_HANDLE,
    EkKind,
    TpmDevice,
    TpmError,
    TpmStateError,
    ak_template,
)
from simulators.manufacturer import Manufacturer, ProvisionedTpm
from simulators.swtpm import SwtpmInstance

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

AK_ATTRIBUTES = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                 | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
                 | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT)  # fmt: skip
DEVICE_KEY_ATTRIBUTES = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                         | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
                         | TPMA_OBJECT.SIGN_ENCRYPT)  # fmt: skip
NONCE = bytes(range(32))


# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def manufacturer(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    return Manufacturer.create(tmp_path_factory.mktemp("manufacturer"))


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[SwtpmInstance]:
    with SwtpmInstance(tmp_path / "tpm-state") as tpm:
        yield tpm


@pytest.fixture
def provisioned(swtpm: SwtpmInstance, manufacturer: Manufacturer) -> ProvisionedTpm:
    return manufacturer.provision(swtpm.tcti)


@pytest.fixture
def device(swtpm: SwtpmInstance, provisioned: ProvisionedTpm) -> Iterator[TpmDevice]:
    with TpmDevice(swtpm.tcti) as tpm:
        yield tpm


def tool(swtpm: SwtpmInstance, cwd: Path, *command: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    environment = {**os.environ, "TPM2TOOLS_TCTI": swtpm.tcti,
                   "TPM2OPENSSL_TCTI": swtpm.tcti, **(env or {})}  # fmt: skip
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result


def public_key(tpm2b_public: bytes) -> ec.EllipticCurvePublicKey:
    area = TPM2B_PUBLIC.unmarshal(tpm2b_public)[0].publicArea
    return serialization.load_der_public_key(area.to_der())  # type: ignore[return-value]


def spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_tpm_signature(signer_public: bytes, signature: bytes, message: bytes) -> None:
    """Check a marshalled TPMT_SIGNATURE (ECDSA-SHA256) over ``message`` with cryptography."""
    parsed, used = TPMT_SIGNATURE.unmarshal(signature)
    assert used == len(signature)
    assert (parsed.sigAlg, parsed.signature.ecdsa.hash) == (TPM2_ALG.ECDSA, TPM2_ALG.SHA256)
    r = int.from_bytes(bytes(parsed.signature.ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(parsed.signature.ecdsa.signatureS), "big")
    public_key(signer_public).verify(encode_dss_signature(r, s), message,
                                     ec.ECDSA(hashes.SHA256()))


def parse_attest(attest: bytes) -> TPMS_ATTEST:
    parsed, used = TPMS_ATTEST.unmarshal(attest)
    assert used == len(attest), "TPMS_ATTEST must be the whole field (no TPM2B size prefix)"
    assert parsed.magic == TPM2_GENERATED.VALUE
    return parsed


def without_clock_and_extra_data(attest: bytes) -> bytes:
    parsed = parse_attest(attest)
    parsed.clockInfo, parsed.firmwareVersion, parsed.extraData = TPMS_CLOCK_INFO(), 0, b""
    return parsed.marshal()


# -- EK ----------------------------------------------------------------------------------


def test_ek_certificates_are_read_from_nv_and_match_the_persistent_eks(
    device: TpmDevice, provisioned: ProvisionedTpm
) -> None:
    for kind, provisioned_ek in (("ecc", provisioned.ecc_ek), ("rsa", provisioned.rsa_ek)):
        der = device.read_ek_certificate(kind)
        assert der == provisioned_ek.certificate_der
        handle, ek_public = device.endorsement_key(kind)
        assert handle == provisioned_ek.persistent_handle
        assert ek_public == provisioned_ek.public_area
        certificate_key = x509.load_der_x509_certificate(der).public_key()
        area = TPM2B_PUBLIC.unmarshal(ek_public)[0].publicArea
        assert spki(certificate_key) == area.to_der()  # type: ignore[arg-type]
    assert device.transient_handles() == []


def test_ek_without_persistent_handle_is_recreated_like_tpm2_createek(
    swtpm: SwtpmInstance, tmp_path: Path
) -> None:
    with TpmDevice(swtpm.tcti) as device:  # an unprovisioned TPM: no EK, no certificate
        assert device.read_ek_certificate("ecc") is None
        ours = {kind: device.endorsement_key(kind) for kind in ("ecc", "rsa")}
        assert device.transient_handles() == []
    for kind, (handle, ek_public) in ours.items():
        assert handle is None
        tool(swtpm, tmp_path, "tpm2_createek", "-G", kind, "-u", f"{kind}.pub", "-c", "ek.ctx")
        tool(swtpm, tmp_path, "tpm2_flushcontext", "-t")
        assert (tmp_path / f"{kind}.pub").read_bytes() == ek_public


# -- AK and device key -------------------------------------------------------------------


def test_ak_and_device_key_are_created_once_and_survive_a_reboot(
    swtpm: SwtpmInstance, provisioned: ProvisionedTpm
) -> None:
    with TpmDevice(swtpm.tcti) as device:
        first = (device.attestation_key(), device.device_key())
        again = (device.attestation_key(), device.device_key())
    swtpm.restart()  # same state dir: a power cycle
    with TpmDevice(swtpm.tcti) as device:
        after_reboot = (device.attestation_key(), device.device_key())
        pem = device.tss2_private_key_pem()
    assert first == again == after_reboot
    (ak_handle, ak_public, ak_name), (key_handle, key_public) = first
    assert (ak_handle, key_handle) == (AK_HANDLE, DEVICE_KEY_HANDLE)
    assert ak_name == bytes(TPM2B_PUBLIC.unmarshal(ak_public)[0].get_name())
    assert TSSPrivKey.from_pem(pem).public.marshal() == key_public


def test_key_attributes_are_what_the_verifier_requires(device: TpmDevice) -> None:
    ak = TPM2B_PUBLIC.unmarshal(device.attestation_key()[1])[0].publicArea
    key = TPM2B_PUBLIC.unmarshal(device.device_key()[1])[0].publicArea
    assert ak.objectAttributes == AK_ATTRIBUTES
    assert key.objectAttributes == DEVICE_KEY_ATTRIBUTES
    for area in (ak, key):
        assert (area.type, area.nameAlg) == (TPM2_ALG.ECC, TPM2_ALG.SHA256)
        assert area.parameters.eccDetail.curveID == 3  # TPM_ECC_NIST_P256
    assert ak.parameters.eccDetail.scheme.scheme == TPM2_ALG.ECDSA
    assert ak.parameters.eccDetail.scheme.details.ecdsa.hashAlg == TPM2_ALG.SHA256
    srk = device.esapi.read_public(device.esapi.tr_from_tpmpublic(SRK_HANDLE))[0].publicArea
    assert srk.objectAttributes & (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT)


def test_a_foreign_key_at_the_ak_handle_is_refused_and_left_alone(device: TpmDevice) -> None:
    esapi = device.esapi
    template = ak_template()
    template.publicArea.objectAttributes = DEVICE_KEY_ATTRIBUTES  # unrestricted: not an AK
    handle, foreign, _, _, _ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template)
    esapi.evict_control(ESYS_TR.OWNER, handle, AK_HANDLE)
    esapi.flush_context(handle)
    with pytest.raises(TpmStateError):
        device.attestation_key()
    still_there = esapi.read_public(esapi.tr_from_tpmpublic(AK_HANDLE))[0]
    assert still_there.marshal() == foreign.marshal()


def test_rotate_device_key_replaces_the_key_and_its_tss2_blob(device: TpmDevice) -> None:
    ak_before, (_, key_before) = device.attestation_key(), device.device_key()
    handle, key_after = device.rotate_device_key()
    assert handle == DEVICE_KEY_HANDLE and key_after != key_before
    assert device.device_key()[1] == key_after
    assert device.attestation_key() == ak_before
    assert TSSPrivKey.from_pem(device.tss2_private_key_pem()).public.marshal() == key_after
    assert device.transient_handles() == []


# -- credential activation, certify, quote, CSR ----------------------------------------


@pytest.mark.parametrize("kind", ["ecc", "rsa"])
def test_activate_credential_recovers_the_secret_for_this_ak(device: TpmDevice,
                                                             kind: EkKind) -> None:
    _, ek_public = device.endorsement_key(kind)
    _, _, ak_name = device.attestation_key()
    secret = os.urandom(32)
    blob, encrypted = make_credential(TPM2B_PUBLIC.unmarshal(ek_public)[0], secret, ak_name)
    assert device.activate_credential(blob.marshal(), encrypted.marshal(), kind) == secret
    assert device.transient_handles() == []


def test_activate_credential_fails_for_a_credential_bound_to_another_name(
    device: TpmDevice,
) -> None:
    _, ek_public = device.endorsement_key("ecc")
    device.attestation_key()
    other_name = b"\x00\x0b" + hashlib.sha256(b"another key").digest()
    blob, encrypted = make_credential(TPM2B_PUBLIC.unmarshal(ek_public)[0], b"s" * 32, other_name)
    with pytest.raises(TpmError) as refused:
        device.activate_credential(blob.marshal(), encrypted.marshal())
    assert refused.value.code & 0x3F == 0x1F  # TPM_RC_INTEGRITY
    assert device.transient_handles() == []
    with pytest.raises(ValueError, match="trailing"):
        device.activate_credential(blob.marshal() + b"\0", encrypted.marshal())


def test_certify_binds_the_device_key_to_the_nonce_under_the_ak(device: TpmDevice) -> None:
    _, ak_public, _ = device.attestation_key()
    _, key_public = device.device_key()
    certify_info, signature = device.certify(NONCE)
    attest = parse_attest(certify_info)
    assert attest.type == TPM2_ST.ATTEST_CERTIFY
    assert bytes(attest.extraData) == NONCE
    assert bytes(attest.attested.certify.name) == bytes(
        TPM2B_PUBLIC.unmarshal(key_public)[0].get_name())
    verify_tpm_signature(ak_public, signature, certify_info)
    tampered = bytearray(certify_info)
    tampered[-1] ^= 1
    with pytest.raises(InvalidSignature):
        verify_tpm_signature(ak_public, signature, bytes(tampered))


def test_quote_covers_the_selected_pcrs_and_the_nonce(device: TpmDevice) -> None:
    _, ak_public, _ = device.attestation_key()
    quote_info, signature = device.quote(NONCE, {"sha256": [7, 0, 1, 2]})
    attest = parse_attest(quote_info)
    assert attest.type == TPM2_ST.ATTEST_QUOTE
    assert bytes(attest.extraData) == NONCE
    selection = attest.attested.quote.pcrSelect
    assert selection.count == 1 and selection.pcrSelections[0].hash == TPM2_ALG.SHA256
    _, _, values = device.esapi.pcr_read(TPML_PCR_SELECTION.parse("sha256:0,1,2,7"))
    expected = hashlib.sha256(b"".join(bytes(d) for d in values.digests[: values.count]))
    assert bytes(attest.attested.quote.pcrDigest) == expected.digest()
    verify_tpm_signature(ak_public, signature, quote_info)
    with pytest.raises(ValueError):
        device.quote(NONCE, {"sha256": [24]})


def test_csr_is_signed_in_the_tpm_by_the_device_key(device: TpmDevice) -> None:
    _, key_public = device.device_key()
    csr = device.csr("3f" * 32)
    assert csr.is_signature_valid
    assert spki(csr.public_key()) == spki(public_key(key_public))  # type: ignore[arg-type]
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "3f" * 32
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)


# -- byte formats against tpm2-tools, the TSS2 key against tpm2-openssl --------------------


def test_wire_bytes_have_the_layout_tpm2_tools_writes(
    swtpm: SwtpmInstance, provisioned: ProvisionedTpm, tmp_path: Path
) -> None:
    with TpmDevice(swtpm.tcti) as device:
        _, ak_public, ak_name = device.attestation_key()
        _, key_public = device.device_key()
        _, ek_public = device.endorsement_key("ecc")
        ek_certificate = device.read_ek_certificate("ecc")
        certify_info, certify_signature = device.certify(NONCE)
        quote_info, quote_signature = device.quote(NONCE, {"sha256": [0, 1, 2, 7]})
    (tmp_path / "nonce").write_bytes(NONCE)
    tool(swtpm, tmp_path, "tpm2_readpublic", "-c", hex(AK_HANDLE), "-o", "ak.pub", "-n", "ak.name")
    tool(swtpm, tmp_path, "tpm2_readpublic", "-c", hex(DEVICE_KEY_HANDLE), "-o", "key.pub")
    tool(swtpm, tmp_path, "tpm2_readpublic", "-c", "0x81010002", "-o", "ek.pub")
    tool(swtpm, tmp_path, "tpm2_getekcertificate", "-o", "rsa-ek.der", "-o", "ecc-ek.der")
    # tpm2-tools 5.4's tpm2_certify has no qualifying-data option (it sends 00ff55aa):
    # compare everything but extraData and the clock.
    tool(swtpm, tmp_path, "tpm2_certify", "-c", hex(DEVICE_KEY_HANDLE), "-C", hex(AK_HANDLE),
         "-g", "sha256", "-o", "certify.attest", "-s", "certify.sig")
    tool(swtpm, tmp_path, "tpm2_quote", "-c", hex(AK_HANDLE), "-l", "sha256:0,1,2,7",
         "-q", NONCE.hex(), "-g", "sha256", "-m", "quote.attest", "-s", "quote.sig")
    files = {name: (tmp_path / name).read_bytes() for name in (
        "ak.pub", "ak.name", "key.pub", "ek.pub", "ecc-ek.der", "certify.attest",
        "certify.sig", "quote.attest", "quote.sig")}  # fmt: skip
    assert (files["ak.pub"], files["ak.name"]) == (ak_public, ak_name)
    assert (files["key.pub"], files["ek.pub"]) == (key_public, ek_public)
    assert files["ecc-ek.der"] == ek_certificate
    assert bytes(parse_attest(files["quote.attest"]).extraData) == NONCE
    assert bytes(parse_attest(files["certify.attest"]).extraData) == bytes.fromhex("00ff55aa")
    assert len(quote_info) == len(files["quote.attest"])
    for ours, theirs in ((certify_info, files["certify.attest"]),
                         (quote_info, files["quote.attest"])):  # fmt: skip
        assert ours[:4] == theirs[:4] == b"\xffTCG"  # TPM_GENERATED_VALUE, no size prefix
        assert without_clock_and_extra_data(ours) == without_clock_and_extra_data(theirs)
    for signature, attest, theirs in ((certify_signature, certify_info, "certify"),
                                      (quote_signature, quote_info, "quote")):  # fmt: skip
        verify_tpm_signature(ak_public, signature, attest)
        verify_tpm_signature(ak_public, files[f"{theirs}.sig"], files[f"{theirs}.attest"])
        assert len(signature) == len(files[f"{theirs}.sig"])


def test_tss2_key_file_works_with_the_tpm2_openssl_provider(
    swtpm: SwtpmInstance, provisioned: ProvisionedTpm, tmp_path: Path
) -> None:
    key_file = tmp_path / "device.key.tss.pem"
    with TpmDevice(swtpm.tcti) as device:
        _, key_public = device.device_key()
        device.write_tss2_private_key(key_file)
        assert device.transient_handles() == []
    pem = key_file.read_bytes()
    assert pem.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    tss_key = TSSPrivKey.from_pem(pem)
    assert (tss_key.parent, tss_key.empty_auth) == (SRK_HANDLE, True)
    provider = ("-provider", "tpm2", "-provider", "default")
    exported = tool(swtpm, tmp_path, "openssl", "pkey", *provider, "-in", str(key_file), "-pubout")
    device_key = public_key(key_public)
    assert serialization.load_pem_public_key(exported.stdout.encode()) == device_key
    # and the provider signs with it inside the TPM (straight to swtpm, no resource manager)
    (tmp_path / "message").write_bytes(b"signed by the TPM through tpm2-openssl")
    tool(swtpm, tmp_path, "openssl", "pkeyutl", *provider, "-sign", "-rawin", "-digest",
         "sha256", "-inkey", str(key_file), "-in", "message", "-out", "message.sig")
    device_key.verify((tmp_path / "message.sig").read_bytes(),
                      (tmp_path / "message").read_bytes(), ec.ECDSA(hashes.SHA256()))


def test_no_operation_leaves_a_transient_object_loaded(device: TpmDevice, tmp_path: Path) -> None:
    _, ek_public = device.endorsement_key("ecc")
    _, _, ak_name = device.attestation_key()
    blob, encrypted = make_credential(TPM2B_PUBLIC.unmarshal(ek_public)[0], b"k" * 32, ak_name)
    operations = {
        "read_ek_certificate": lambda: device.read_ek_certificate("rsa"),
        "endorsement_key": lambda: device.endorsement_key("rsa"),
        "attestation_key": device.attestation_key,
        "device_key": device.device_key,
        "activate_credential": lambda: device.activate_credential(blob.marshal(),
                                                                  encrypted.marshal()),
        "certify": lambda: device.certify(NONCE),
        "quote": lambda: device.quote(NONCE, {"sha256": [0]}),
        "csr": lambda: device.csr("device"),
        "write_tss2_private_key": lambda: device.write_tss2_private_key(tmp_path / "k.pem"),
        "rotate_device_key": device.rotate_device_key,
    }
    for name, operation in operations.items():
        operation()
        assert device.transient_handles() == [], name
