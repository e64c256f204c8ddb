"""The simulated TPM factory against real swtpm processes and real tpm2-tools (no mocks).

Pins: EK certificates land in NV where tpm2_nvread / tpm2_getekcertificate find them, chain
to the manufacturer's EK CA and root, certify exactly the persistent EKs, which are the
keys tpm2_createek derives; state survives a reboot; swtpm_setup's own EK certificates
chain to the CA it returns; and no swtpm process outlives its instance.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss import ESAPI, TPM2B_PUBLIC
from tpm2_pytss.constants import TPMA_NV

from simulators.manufacturer import (
    EK_CERT_NV_ATTRIBUTES,
    EK_ECC,
    EK_RSA,
    TCG_AT_TPM_MANUFACTURER,
    TCG_AT_TPM_MODEL,
    TCG_AT_TPM_VERSION,
    TCG_KP_EK_CERTIFICATE,
    Manufacturer,
    ProvisionedTpm,
    ProvisioningError,
)
from simulators.swtpm import SwtpmError, SwtpmInstance
from simulators.swtpm_localca import (
    SWTPM_LOCALCA_DIR,
    SWTPM_SETUP_ECC_EK,
    SWTPM_SETUP_RSA_EK,
    provision_with_swtpm_setup,
)

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

_timings: list[str] = []
SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def pids_running_on(path: Path) -> list[str]:
    """PIDs of swtpm processes whose command line names `path` (their state dir)."""
    result = subprocess.run(["pgrep", "-f", f"swtpm socket .*{path}"], capture_output=True,
                            text=True)  # fmt: skip
    return result.stdout.split()


def tpm2_tool(tpm: SwtpmInstance, *args: str, cwd: Path | None = None) -> bytes:
    result = subprocess.run(
        list(args), env={**os.environ, "TPM2TOOLS_TCTI": tpm.tcti}, capture_output=True,
        cwd=cwd, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"{args} failed: {result.stderr.decode()}"
    return result.stdout


def read_persistent_public(tpm: SwtpmInstance, handle: int) -> TPM2B_PUBLIC:
    """TPM2_ReadPublic on a persistent handle."""
    with ESAPI(tpm.tcti) as esapi:
        esys_handle = esapi.tr_from_tpmpublic(handle)
        public, _, _ = esapi.read_public(esys_handle)
        esapi.tr_close(esys_handle)
    return public


def verify_chain(certificate: x509.Certificate, chain: list[x509.Certificate]) -> None:
    """Each certificate directly issued by the next; the last one self-signed CA."""
    for child, parent in zip([certificate, *chain], chain, strict=False):
        child.verify_directly_issued_by(parent)
    chain[-1].verify_directly_issued_by(chain[-1])
    for ca in chain:
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


class _TimingReport:
    """Late-registered plugin: prints the measured times in pytest's terminal summary."""

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if _timings:
            terminalreporter.section("simulated TPM provisioning times")
            for line in _timings:
                terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def tmp_root(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Path]:
    """Parent of every state dir here; on teardown no swtpm may still run on any of them."""
    if not request.config.pluginmanager.has_plugin("simulated-tpm-timings"):
        request.config.pluginmanager.register(_TimingReport(), "simulated-tpm-timings")
    root = tmp_path_factory.mktemp("simtpm")
    yield root
    leftovers = pids_running_on(root)
    assert not leftovers, f"swtpm processes outlived the tests: {leftovers}"


@pytest.fixture(scope="module")
def manufacturer(tmp_root: Path) -> Manufacturer:
    return Manufacturer.create(tmp_root / "vendor", name="Simulated TPM Vendor")


@pytest.fixture(scope="module")
def device(
    tmp_root: Path, manufacturer: Manufacturer
) -> Iterator[tuple[SwtpmInstance, ProvisionedTpm]]:
    with SwtpmInstance(tmp_root / "device-1") as tpm:
        provisioned = manufacturer.provision(tpm.tcti)
        _timings.append(
            "provision (ms): "
            + ", ".join(f"{k} {v * 1000:.1f}" for k, v in provisioned.timings.items())
        )
        yield tpm, provisioned


def test_ek_certificates_are_in_nv_where_tpm2_tools_read_them(
    device: tuple[SwtpmInstance, ProvisionedTpm], tmp_path: Path
) -> None:
    tpm, provisioned = device
    for ek in provisioned.eks:
        der = tpm2_tool(tpm, "tpm2_nvread", f"0x{ek.nv_index:08x}")
        assert der == ek.certificate_der
        assert x509.load_der_x509_certificate(der) == ek.certificate
    tpm2_tool(tpm, "tpm2_getekcertificate", "-o", "rsa.der", "-o", "ecc.der", cwd=tmp_path)
    assert (tmp_path / "rsa.der").read_bytes() == provisioned.rsa_ek.certificate_der
    assert (tmp_path / "ecc.der").read_bytes() == provisioned.ecc_ek.certificate_der
    with ESAPI(tpm.tcti) as esapi:
        for ek in provisioned.eks:
            nv_handle = esapi.tr_from_tpmpublic(ek.nv_index)
            nv_public, _ = esapi.nv_read_public(nv_handle)
            esapi.tr_close(nv_handle)
            attributes = nv_public.nvPublic.attributes
            required = EK_CERT_NV_ATTRIBUTES | TPMA_NV.WRITTEN | TPMA_NV.WRITELOCKED
            assert attributes == required, str(TPMA_NV(attributes))
            assert nv_public.nvPublic.dataSize == len(ek.certificate_der)


def test_ek_certificate_chains_to_manufacturer_ek_ca_and_root(
    device: tuple[SwtpmInstance, ProvisionedTpm], manufacturer: Manufacturer, tmp_path: Path
) -> None:
    _, provisioned = device
    ek_ca, root = manufacturer.ca_certificates
    assert ek_ca != root and root.subject == root.issuer
    assert ek_ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    (tmp_path / "root.pem").write_text(manufacturer.ca_certificate_pems[1])
    (tmp_path / "ek-ca.pem").write_text(manufacturer.ca_certificate_pems[0])
    for ek in provisioned.eks:
        verify_chain(ek.certificate, [ek_ca, root])
        # an independent verifier: OpenSSL's path validation (critical SAN, empty subject)
        (tmp_path / "ek.pem").write_bytes(ek.certificate.public_bytes(serialization.Encoding.PEM))
        result = subprocess.run(
            ["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "ek-ca.pem", "ek.pem"],
            cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    impostor = Manufacturer.create(name="Simulated TPM Vendor")  # same names, other keys
    assert impostor.ek_ca_certificate.subject == ek_ca.subject
    with pytest.raises(InvalidSignature):
        provisioned.rsa_ek.certificate.verify_directly_issued_by(impostor.ek_ca_certificate)


def test_ek_certificate_follows_tcg_ek_credential_profile(
    device: tuple[SwtpmInstance, ProvisionedTpm], manufacturer: Manufacturer
) -> None:
    _, provisioned = device
    identity = provisioned.identity
    assert identity.manufacturer == "id:49424D00"  # swtpm reports TPM_PT_MANUFACTURER "IBM"
    for ek in provisioned.eks:
        cert, ext = ek.certificate, ek.certificate.extensions
        assert cert.version == x509.Version.v3
        assert cert.subject == x509.Name([])
        assert cert.issuer == manufacturer.ek_ca_certificate.subject
        assert cert.not_valid_after_utc == dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
        san = ext.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.critical
        (directory_name,) = san.value.get_values_for_type(x509.DirectoryName)
        attributes = {a.oid: a.value for a in directory_name}
        assert attributes == {
            TCG_AT_TPM_MANUFACTURER: identity.manufacturer,
            TCG_AT_TPM_MODEL: identity.model,
            TCG_AT_TPM_VERSION: identity.version,
        }
        basic = ext.get_extension_for_class(x509.BasicConstraints)
        assert basic.critical and basic.value.ca is False
        usage = ext.get_extension_for_class(x509.KeyUsage)
        assert usage.critical and not usage.value.digital_signature
        is_rsa = ek.slot is EK_RSA
        assert usage.value.key_encipherment is is_rsa
        assert usage.value.key_agreement is not is_rsa
        assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            TCG_KP_EK_CERTIFICATE
        ]
        aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ek_ca_ski = manufacturer.ek_ca_certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        assert aki.key_identifier == ek_ca_ski.digest
        # TPMSpecification {"2.0", level 0, revision} in subjectDirectoryAttributes
        sda = ext.get_extension_for_oid(x509.ObjectIdentifier("2.5.29.9")).value
        assert b"\x06\x05\x67\x81\x05\x02\x10" in sda.value and b"\x0c\x032.0" in sda.value


def test_ek_certificate_certifies_the_persistent_ek(
    device: tuple[SwtpmInstance, ProvisionedTpm],
) -> None:
    tpm, provisioned = device
    for ek, key_type in ((provisioned.rsa_ek, rsa.RSAPublicKey),
                         (provisioned.ecc_ek, ec.EllipticCurvePublicKey)):  # fmt: skip
        public = read_persistent_public(tpm, ek.persistent_handle)
        assert public.marshal() == ek.public_area
        tpm_key = serialization.load_der_public_key(public.publicArea.to_der())
        assert isinstance(tpm_key, key_type)
        assert tpm_key.public_bytes(*SPKI) == ek.certificate.public_key().public_bytes(*SPKI)
    assert provisioned.ecc_ek.certificate.public_key().curve.name == "secp256r1"
    assert provisioned.rsa_ek.certificate.public_key().key_size == 2048


def test_ek_public_area_is_what_tpm2_createek_derives(
    device: tuple[SwtpmInstance, ProvisionedTpm], tmp_path: Path
) -> None:
    tpm, provisioned = device
    assert tpm2_tool(tpm, "tpm2_getcap", "handles-transient") == b""  # provision() flushed
    for algorithm, ek in (("rsa", provisioned.rsa_ek), ("ecc", provisioned.ecc_ek)):
        tpm2_tool(tpm, "tpm2_createek", "-G", algorithm, "-c", f"{algorithm}.ctx",
                  "-u", f"{algorithm}.pub", cwd=tmp_path)  # fmt: skip
        # tpm2_createek leaves its primary loaded: without a resource manager, flush it
        tpm2_tool(tpm, "tpm2_flushcontext", "--transient-object")
        assert (tmp_path / f"{algorithm}.pub").read_bytes() == ek.public_area
    assert provisioned.rsa_ek.slot.template_name == "L-1"
    assert provisioned.ecc_ek.slot.template_name == "L-2"


def test_second_provisioning_is_refused_and_changes_nothing(
    device: tuple[SwtpmInstance, ProvisionedTpm], manufacturer: Manufacturer
) -> None:
    tpm, provisioned = device
    with pytest.raises(ProvisioningError, match="already provisioned"):
        manufacturer.provision(tpm.tcti)
    assert tpm2_tool(tpm, "tpm2_nvread", "0x01c00002") == provisioned.rsa_ek.certificate_der
    assert read_persistent_public(tpm, EK_ECC.persistent_handle).marshal() == (
        provisioned.ecc_ek.public_area
    )


def test_reboot_keeps_ek_and_certificate(tmp_root: Path, manufacturer: Manufacturer) -> None:
    state = tmp_root / "device-reboot"
    with SwtpmInstance(state) as tpm:
        provisioned = manufacturer.provision(tpm.tcti)
        first_pid = tpm.pid
        tpm.restart()
        assert tpm.pid != first_pid and pids_running_on(state) == [str(tpm.pid)]
        for ek in provisioned.eks:
            assert read_persistent_public(tpm, ek.persistent_handle).marshal() == ek.public_area
            assert tpm2_tool(tpm, "tpm2_nvread", f"0x{ek.nv_index:08x}") == ek.certificate_der
    assert pids_running_on(state) == []
    assert (state / "tpm2-00.permall").exists()  # a given state dir is never removed
    # power on again as a new process on the same state: still the same device
    with SwtpmInstance(state) as tpm:
        assert tpm2_tool(tpm, "tpm2_nvread", "0x01c0000a") == provisioned.ecc_ek.certificate_der


def test_restart_moves_to_a_new_port_when_the_old_one_is_taken(tmp_root: Path) -> None:
    import socket

    with SwtpmInstance(tmp_root / "device-port") as tpm:
        old_port = tpm.port
        tpm.stop()
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", old_port))
            squatter.listen()
            tpm.start()
            assert tpm.port != old_port and tpm.tcti.endswith(f"port={tpm.port}")
            assert len(tpm2_tool(tpm, "tpm2_getrandom", "8")) == 8


def test_manufacturer_reloads_from_directory_and_issues_for_a_fleet(
    tmp_root: Path, manufacturer: Manufacturer
) -> None:
    reloaded = Manufacturer.load(tmp_root / "vendor")
    assert reloaded.ca_certificates == manufacturer.ca_certificates
    assert oct((tmp_root / "vendor" / Manufacturer.EK_CA_KEY).stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        manufacturer.save(tmp_root / "vendor")
    ek_ca, root = manufacturer.ca_certificates
    for number in range(5):
        started = time.perf_counter()
        with SwtpmInstance() as tpm:
            state_dir, pid = tpm.state_dir, tpm.pid
            provisioned = reloaded.provision(tpm.tcti)
        _timings.append(
            f"fleet TPM {number}: swtpm start {tpm.start_seconds * 1000:.1f} ms, provision "
            f"{provisioned.timings['total'] * 1000:.1f} ms (RSA EK "
            f"{provisioned.timings['create_ek_rsa'] * 1000:.1f} ms), start+provision+stop "
            f"{(time.perf_counter() - started) * 1000:.1f} ms"
        )
        for ek in provisioned.eks:
            verify_chain(ek.certificate, [ek_ca, root])
        assert not state_dir.exists()  # a temp state dir goes with its instance
        assert pids_running_on(state_dir) == [] and pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_swtpm_setup_ek_certificates_chain_to_the_returned_localca(tmp_root: Path) -> None:
    system_ca_before = sorted(os.listdir(SWTPM_LOCALCA_DIR)) if SWTPM_LOCALCA_DIR.exists() else None
    state = tmp_root / "device-swtpm-setup"
    started = time.perf_counter()
    issuer_pem, root_pem = provision_with_swtpm_setup(state, localca_dir=tmp_root / "localca")
    first = time.perf_counter() - started
    started = time.perf_counter()
    provision_with_swtpm_setup(tmp_root / "device-swtpm-setup-2", localca_dir=tmp_root / "localca")
    _timings.append(f"swtpm_setup --create-ek-cert: {first * 1000:.0f} ms with new localca, "
                    f"{(time.perf_counter() - started) * 1000:.0f} ms reusing it")  # fmt: skip
    issuer = x509.load_pem_x509_certificate(issuer_pem.encode())
    root = x509.load_pem_x509_certificate(root_pem.encode())
    with SwtpmInstance(state) as tpm:
        for persistent_handle, nv_index in (SWTPM_SETUP_RSA_EK, SWTPM_SETUP_ECC_EK):
            certificate = x509.load_der_x509_certificate(
                tpm2_tool(tpm, "tpm2_nvread", f"0x{nv_index:08x}")
            )
            verify_chain(certificate, [issuer, root])
            public = read_persistent_public(tpm, persistent_handle).publicArea.to_der()
            tpm_key = serialization.load_der_public_key(public)
            assert tpm_key.public_bytes(*SPKI) == certificate.public_key().public_bytes(*SPKI)
    with pytest.raises(ProvisioningError, match="swtpm_setup failed"):
        provision_with_swtpm_setup(state, localca_dir=tmp_root / "localca")  # no --overwrite
    system_ca_after = sorted(os.listdir(SWTPM_LOCALCA_DIR)) if SWTPM_LOCALCA_DIR.exists() else None
    assert system_ca_after == system_ca_before


def test_missing_swtpm_binary_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SwtpmError, match="apt-get install swtpm"):
        SwtpmInstance().start()


def test_stop_leaves_no_swtpm_process(tmp_root: Path) -> None:
    state = tmp_root / "device-stop"
    with pytest.raises(RuntimeError, match="boom"), SwtpmInstance(state) as tpm:
        pid = tpm.pid
        assert pids_running_on(state) == [str(pid)]
        raise RuntimeError("boom")
    assert pids_running_on(state) == []
    assert not tpm.running
