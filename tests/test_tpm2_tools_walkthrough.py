"""docs/tpm2-tools-walkthrough.md, executed: attested enrollment with tpm2-tools, openssl
(tpm2 provider), curl and jq only, against a real swtpm and the session's served instance.

The doc's ```sh blocks (device), ```sh operator blocks and, for the boot-state variant,
its ```sh pcr blocks run in document order in one `bash -euo pipefail` process in a
temporary directory. The ```sh setup block is not run: the test exports its variables
instead, so the doc and this test cannot drift apart. Variants: ECC EK + ECC AK,
RSA EK + RSA AK, an EK certificate made by swtpm_setup/swtpm_localca (trusted through
swtpm_localca's CA), and a group with a PCR policy (the tools also send a quote).

Each variant gets a fresh swtpm and its own uniquely named group. A missing tool fails
the tests (it never skips them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from tpm2_pytss import TPM2B_PUBLIC

from simulators.manufacturer import Manufacturer
from simulators.served import BIN, ServedInstance
from simulators.swtpm import SwtpmInstance
from simulators.swtpm_localca import provision_with_swtpm_setup

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

DOC = Path(__file__).resolve().parents[1] / "docs" / "tpm2-tools-walkthrough.md"
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
SETUP_VARIABLES = {"INSTANCE", "GROUP", "EST_URL", "CA_CHAIN", "EK_ALG", "AK_ALG",
                   "TPM2TOOLS_TCTI", "TPM2OPENSSL_TCTI"}
BLOCK_TAGS = {"setup", "operator", "pcr"}
# What the walkthrough and this test run, and the Debian 12 package of each.
REQUIRED_TOOLS = {
    **dict.fromkeys(("tpm2_nvread", "tpm2_createek", "tpm2_createak", "tpm2_flushcontext",
                     "tpm2_readpublic", "tpm2_createprimary", "tpm2_evictcontrol",
                     "tpm2_create", "tpm2_load", "tpm2_encodeobject", "tpm2_startauthsession",
                     "tpm2_policysecret", "tpm2_activatecredential", "tpm2_certifycreation",
                     "tpm2_quote", "tpm2_pcrread", "tpm2_pcrextend"), "tpm2-tools"),
    "swtpm": "swtpm", "swtpm_setup": "swtpm-tools", "swtpm_localca": "swtpm-tools",
    "openssl": "openssl", "curl": "curl", "jq": "jq", "base64": "coreutils",
"sha256sum": "coreutils", "cmp": "diffutils", "awk": "mawk",
    "bash": "bash",
}
# "Firmware" the boot-state variant measures before reading the reference PCRs.
BOOT_MEASUREMENTS = {0: "a1" * 32, 7: "b7" * 32}
PCR_SELECTION = {"sha256": [0, 1, 2, 7]}  # what the doc's `tpm2_pcrread` line reads


@dataclass(frozen=True)
class Block:
    tags: frozenset[str]
    line: int  # of the opening fence in the doc
    body: str


def doc_blocks() -> list[tuple[str, Block]]:
    text = DOC.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        language, *tags = match["info"].split() or [""]
        blocks.append((language, Block(frozenset(tags), text.count("\n", 0, match.start()) + 1,
                                       match["body"])))
    return blocks


def shell_blocks() -> list[Block]:
    return [block for language, block in doc_blocks() if language == "sh"]


def runnable_blocks(pcr_policy: bool) -> list[Block]:
    return [b for b in shell_blocks()
            if "setup" not in b.tags and (pcr_policy or "pcr" not in b.tags)]


def script_from_doc(pcr_policy: bool) -> str:
    """The blocks to run as one bash script; each one echoes where it comes from."""
    parts = ["set -euo pipefail",
             "trap 'echo \"!!! command failed (exit $?): $BASH_COMMAND\" >&2' ERR"]
    for number, block in enumerate(runnable_blocks(pcr_policy)):
        kind = " ".join(sorted(block.tags)) or "device"
        parts += [f"echo {shlex.quote(f'=== block {number} ({kind}, {DOC.name}:{block.line})')}",
                  block.body]
    return "\n".join(parts) + "\n"


def missing_tools() -> list[str]:
    missing = [f"{tool} (apt-get install {package})"
               for tool, package in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    if "openssl" not in " ".join(missing) and not tpm2_openssl_module().exists():
        missing.append(f"{tpm2_openssl_module()} (apt-get install tpm2-openssl)")
    return missing


def tpm2_openssl_module() -> Path:
    """Where OpenSSL looks for the tpm2 provider (OPENSSL_MODULES or its MODULESDIR)."""
    directory = os.environ.get("OPENSSL_MODULES")
    if not directory:
        version = subprocess.run(["openssl", "version", "-m"], capture_output=True, text=True)
        found = re.search(r'MODULESDIR: "([^"]+)"', version.stdout)
        directory = found[1] if found else "/usr/lib/ossl-modules"
    return Path(directory) / "tpm2.so"


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        pytest.fail("the tpm2-tools walkthrough needs: " + ", ".join(missing), pytrace=False)


# -- the variants ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    ek_alg: str
    ak_alg: str
    ek_maker: str  # "manufacturer" (simulators.manufacturer) or "swtpm_setup"
    pcr_policy: bool = False


VARIANTS = [
    Variant("ecc", "ecc", "ecc", "manufacturer"),
    Variant("rsa", "rsa", "rsa", "manufacturer"),
    Variant("swtpm-localca", "rsa", "ecc", "swtpm_setup"),  # its low-range EK is RSA-2048
    Variant("pcr-policy", "ecc", "ecc", "manufacturer", pcr_policy=True),
]


@dataclass(frozen=True)
class Run:
    """One executed walkthrough: its files, output and what the TPM was given."""

    instance: ServedInstance
    variant: Variant
    group: str
    workdir: Path
    output: str
    ek_certificate: x509.Certificate  # as the manufacturer (or swtpm_setup) wrote it to NV
    ek_roots: list[x509.Certificate]

    def file(self, name: str) -> Path:
        path = self.workdir / name
        assert path.exists(), (f"{DOC.name} no longer writes {name}; update this test.\n"
                               f"--- script output ---\n{self.output}")
        return path

    def output_of(self, snippet: str) -> str:
        """What the one block whose source contains snippet printed."""
        blocks = runnable_blocks(self.variant.pcr_policy)
        matches = [i for i, b in enumerate(blocks) if snippet in b.body]
        assert len(matches) == 1, f"{len(matches)} blocks contain {snippet!r}; expected one"
        start = self.output.index(f"=== block {matches[0]} (")
        following = self.output.find(f"=== block {matches[0] + 1} (", start)
        return self.output[start:following if following >= 0 else None]


def tool(tcti: str, cwd: Path, *command: str) -> str:
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def run_walkthrough(instance: ServedInstance, variant: Variant, tpm: SwtpmInstance,
                    workdir: Path, ek_roots_pem: str) -> tuple[str, str]:
    """Runs the doc's blocks; returns (group name, script output)."""
    group = f"tools-{variant.name}-{uuid.uuid4().hex[:8]}"  # the instance is shared
    (workdir / "vendor-roots.pem").write_text(ek_roots_pem)
    shutil.copyfile(instance.trust_anchor, workdir / "ca-chain.pem")
    exports = {"INSTANCE": str(instance.dir), "GROUP": group, "EST_URL": instance.url,
               "CA_CHAIN": "ca-chain.pem", "EK_ALG": variant.ek_alg,
               "AK_ALG": variant.ak_alg, "TPM2TOOLS_TCTI": tpm.tcti,
               "TPM2OPENSSL_TCTI": tpm.tcti}
    assert set(exports) == SETUP_VARIABLES
    script = workdir / "walkthrough.sh"
    script.write_text(script_from_doc(variant.pcr_policy))
    env = {**os.environ, **instance.env, **exports,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        result = subprocess.run(["bash", str(script)], cwd=workdir, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{DOC.name} ({variant.name}) did not finish in {exc.timeout}s; "
                    f"script: {script}\n--- output so far ---\n{exc.output}", pytrace=False)
    if result.returncode != 0:
        log_tail = "\n".join(instance.log_text().splitlines()[-40:])
        pytest.fail(f"{DOC.name} ({variant.name}): a documented command failed (bash exit "
                    f"{result.returncode}); script: {script}, files: {workdir}\n"
                    f"variables: {exports}\n--- script output ---\n{result.stdout}\n"
                    f"--- server log (tail) ---\n{log_tail}", pytrace=False)
    return group, result.stdout


@pytest.fixture(scope="module")
def manufacturer(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    return Manufacturer.create(tmp_path_factory.mktemp("tpm-vendor"))


@pytest.fixture(scope="module", params=VARIANTS, ids=[v.name for v in VARIANTS])
def run(request: pytest.FixtureRequest, est_instance: ServedInstance,
        manufacturer: Manufacturer, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One walkthrough per variant, on a fresh swtpm; stopped before the tests look."""
    require_tools()
    variant: Variant = request.param
    tmp_path = tmp_path_factory.mktemp(f"tools-{variant.name}")
    workdir = tmp_path / "device"
    workdir.mkdir()
    state = tmp_path / "tpm-state"
    if variant.ek_maker == "swtpm_setup":
        roots_pem = "".join(provision_with_swtpm_setup(state))  # (issuer, root) of its CA
    with SwtpmInstance(state) as tpm:
        if variant.ek_maker == "manufacturer":
            provisioned = manufacturer.provision(tpm.tcti)
            roots_pem = "".join(manufacturer.ca_certificate_pems)
            ek = provisioned.ecc_ek if variant.ek_alg == "ecc" else provisioned.rsa_ek
            ek_certificate = ek.certificate
        else:
            tool(tpm.tcti, tmp_path, "tpm2_nvread", "0x01c00002", "-o", "nv-ek.der")
            ek_certificate = x509.load_der_x509_certificate((tmp_path / "nv-ek.der").read_bytes())
        if variant.pcr_policy:
            for pcr, digest in BOOT_MEASUREMENTS.items():
                tool(tpm.tcti, tmp_path, "tpm2_pcrextend", f"{pcr}:sha256={digest}")
        group, output = run_walkthrough(est_instance, variant, tpm, workdir, roots_pem)
        if variant.pcr_policy:  # the TPM still holds what the policy was made from
            current = tool(tpm.tcti, tmp_path, "tpm2_pcrread", "sha256:0,1,2,7")
            assert current == (workdir / "reference.yaml").read_text()
    return Run(est_instance, variant, group, workdir, output, ek_certificate,
               x509.load_pem_x509_certificates(roots_pem.encode()))


# -- the doc itself ---------------------------------------------------------------------------


def test_all_tools_the_walkthrough_uses_are_installed():
    assert not missing_tools(), "missing: " + ", ".join(missing_tools())


def test_the_doc_has_one_setup_block_defining_exactly_what_the_test_provides():
    setup = [b for b in shell_blocks() if "setup" in b.tags]
    assert len(setup) == 1, "expected exactly one ```sh setup block"
    assigned = set(re.findall(r"^(?:export )?([A-Z_][A-Z0-9_]*)=", setup[0].body, re.MULTILINE))
    assert assigned == SETUP_VARIABLES, (
        "the setup block and the variables this test exports differ; update both")
    assert "GROUP=fleet" in setup[0].body
    for language, block in doc_blocks():
        assert language in {"sh", "text"}, f"{DOC.name}:{block.line}: unknown block {language!r}"
        assert block.tags <= BLOCK_TAGS, f"{DOC.name}:{block.line}: unknown tags {block.tags}"
    device = [b for b in shell_blocks() if not b.tags]
    assert len(device) >= 9
    operator = [b.body for b in shell_blocks() if "operator" in b.tags]
    assert any("group create \"$GROUP\" --auth tpm --ek-roots vendor-roots.pem" in body
               for body in operator)
    assert any("group set-pcrs" in body for body in operator)
    assert any("devices show \"$DEVICE_ID\" --evidence" in body for body in operator)


def test_the_device_steps_use_certifycreation_with_the_nonce_never_tpm2_certify():
    device = "".join(b.body for b in shell_blocks() if not b.tags)
    assert re.search(r"^tpm2_certifycreation .*-q nonce\.bin", device, re.MULTILINE)
    assert not re.search(r"^\s*tpm2_certify\s", device, re.MULTILINE)
    assert re.search(r"TPM2_CertifyCreation \(TPM 2\.0 Part 3,\s+18\.3\)", DOC.read_text())


def test_the_awk_line_in_the_doc_extracts_exactly_the_device_blocks(tmp_path: Path):
    require_tools()
    program = re.search(r"`awk '(?P<program>[^']+)' docs/tpm2-tools-walkthrough\.md`",
                        DOC.read_text())
    assert program, "the doc no longer shows how to extract the device script"
    extracted = subprocess.run(["awk", program["program"], str(DOC)], capture_output=True,
                               text=True, check=True).stdout
    assert extracted == "".join(b.body for b in shell_blocks() if not b.tags)


# -- the walkthrough, run -------------------------------------------------------------------


def test_the_walkthrough_enrolls_the_tpm_under_its_ek_identity(run: Run):
    ek_spki = run.ek_certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    device_id = hashlib.sha256(ek_spki).hexdigest()
    challenge = json.loads(run.file("challenge.json").read_text())
    assert challenge["device_id"] == device_id
    assert (challenge["quote"] is not None) == run.variant.pcr_policy

    certificate = x509.load_pem_x509_certificate(run.file("device.crt.pem").read_bytes())
    assert certificate.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                device_id)])
    check = subprocess.run(["openssl", "verify", "-CAfile", str(run.instance.trust_anchor),
                            str(run.file("device.crt.pem"))], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip().endswith(": OK")

    # The certified key is the TPM key the tools created, and the EK the tools sent is the
    # one in the EK certificate the manufacturer (or swtpm_setup) put into NV.
    key_area = TPM2B_PUBLIC.unmarshal(run.file("key.pub").read_bytes())[0].publicArea
    assert certificate.public_key() == serialization.load_der_public_key(key_area.to_der())
    ek_area = TPM2B_PUBLIC.unmarshal(run.file("ek.pub").read_bytes())[0].publicArea
    assert ek_area.to_der() == ek_spki
    assert run.file("ek.der").read_bytes() == run.ek_certificate.public_bytes(
        serialization.Encoding.DER)
    issuers = [c for c in run.ek_roots if c.subject == run.ek_certificate.issuer]
    assert len(issuers) == 1
    run.ek_certificate.verify_directly_issued_by(issuers[0])

    # What the doc's own inspection step printed.
    printed = run.output_of("EK_SHA256=")
    assert f"device id {device_id}, EK SHA-256 {device_id}" in printed
    assert "device.crt.pem: OK" in printed
    assert "device.crt.pem certifies the TPM key in device.key.pem" in printed


def test_the_server_keeps_the_evidence_the_tools_sent(run: Run):
    certificate = x509.load_pem_x509_certificate(run.file("device.crt.pem").read_bytes())
    device_id = json.loads(run.file("challenge.json").read_text())["device_id"]
    shown = json.loads(run.instance.cli("devices", "show", device_id, "--evidence",
                                        "--json").stdout)
    assert (shown["device_id"], shown["group"], shown["status"]) == (
        device_id, run.group, "active")
    assert [c["serial"] for c in shown["certificates"]] == [format(certificate.serial_number,
                                                                   "x")]
    (evidence,) = shown["evidence"]
    assert evidence["serial"] == format(certificate.serial_number, "x")
    assert evidence["certify_type"] == "creation"  # TPM2_CertifyCreation, not TPM2_Certify
    assert evidence["nonce"] == run.file("nonce.bin").read_bytes().hex()
    assert evidence["ak_name"] == run.file("ak.name").read_bytes().hex() == shown["ak_name"]
    assert evidence["ek_certificate"]["issuer"] == run.ek_certificate.issuer.rfc4514_string()
    assert evidence["ek_certificate"]["serial"] == format(run.ek_certificate.serial_number, "x")
    raw = {name: base64.b64decode(value) for name, value in evidence["raw"].items()}
    for field, file in (("ek_certificate", "ek.der"), ("ek_public", "ek.pub"),
                        ("ak_public", "ak.pub"), ("device_key_public", "key.pub"),
                        ("certify_info", "certify.info"),
                        ("certify_signature", "certify.sig")):
        assert raw[field] == run.file(file).read_bytes(), field
    if run.variant.pcr_policy:
        assert evidence["quote"]["pcrs"] == PCR_SELECTION
        assert raw["quote_info"] == run.file("quote.info").read_bytes()
        assert raw["quote_signature"] == run.file("quote.sig").read_bytes()
    else:
        assert evidence["quote"] is None
        assert "quote_info" not in raw and not (run.workdir / "quote.info").exists()
    # The operator's view, as the doc shows it.
    printed = run.output_of("--evidence")
    assert f"device key name  {evidence['device_key_name']} (creation)" in printed
    assert bool(re.search(r"^  quote +\{'sha256'", printed, re.MULTILINE)) == \
        run.variant.pcr_policy
