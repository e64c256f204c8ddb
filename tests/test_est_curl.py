"""docs/est-with-curl.md, executed: the documented openssl + curl commands, over real TLS.

Every ```sh block of the walkthrough runs, in document order, in one
`bash -euo pipefail` process in a temporary directory, against the session's served
instance (gunicorn, SoftHSM CA key). The one ```sh setup block is not run. The test
provides its variables instead (INSTANCE, SERVER, TA, DEVICE_ID, TOKEN), so the doc and
this test cannot drift apart: a renamed file, a changed flag or a new variable in the
doc shows up here.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from simulators.served import BIN, ServedInstance
from tests.support.fixtures import db_count

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

DOC = Path(__file__).resolve().parents[1] / "docs" / "est-with-curl.md"
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
SETUP_VARIABLES = {"INSTANCE", "SERVER", "TA", "DEVICE_ID", "TOKEN"}


@dataclass(frozen=True)
class Block:
    info: str
    line: int  # of the opening fence in the doc
    body: str


def doc_blocks() -> list[Block]:
    text = DOC.read_text()
    return [Block(m["info"].strip(), text.count("\n", 0, m.start()) + 1, m["body"])
            for m in FENCE.finditer(text)]


def runnable_blocks() -> list[Block]:
    return [b for b in doc_blocks() if b.info == "sh"]


def marker(number: int, block: Block) -> str:
    return f"=== block {number} ({DOC.name}:{block.line})"


def script_from_doc() -> str:
    """The ```sh blocks as one bash script; each one echoes where it comes from."""
    parts = ["set -euo pipefail",
             "trap 'echo \"!!! command failed (exit $?): $BASH_COMMAND\" >&2' ERR"]
    for number, block in enumerate(runnable_blocks()):
        parts += [f"echo {shlex.quote(marker(number, block))}", block.body]
    return "\n".join(parts) + "\n"


@dataclass(frozen=True)
class Walkthrough:
    instance: ServedInstance
    workdir: Path
    device_id: str
    output: str

    def output_of(self, snippet: str) -> str:
        """What the one ```sh block whose source contains snippet printed."""
        blocks = runnable_blocks()
        matches = [i for i, b in enumerate(blocks) if snippet in b.body]
        assert len(matches) == 1, (f"{len(matches)} ```sh blocks in {DOC.name} contain "
                                   f"{snippet!r}; expected exactly one")
        number = matches[0]
        start = self.output.index(marker(number, blocks[number]) + "\n")
        end = (self.output.index(marker(number + 1, blocks[number + 1]))
               if number + 1 < len(blocks) else len(self.output))
        return self.output[start:end]

    def file(self, name: str) -> Path:
        path = self.workdir / name
        assert path.exists(), (f"{DOC.name} no longer writes {name}; update this test.\n"
                               f"--- script output ---\n{self.output}")
        return path

    def certificate(self, name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.file(name).read_bytes())

    def private_key(self, name: str):
        return serialization.load_pem_private_key(self.file(name).read_bytes(), None)


@pytest.fixture(scope="module")
def walkthrough(est_instance: ServedInstance, tmp_path_factory) -> Walkthrough:
    workdir = tmp_path_factory.mktemp("est-with-curl")
    device_id = f"sensor-{uuid.uuid4().hex[:10]}"  # the instance is shared by the session
    exports = {"INSTANCE": str(est_instance.dir), "SERVER": est_instance.url,
               "TA": str(est_instance.trust_anchor), "DEVICE_ID": device_id,
               "TOKEN": est_instance.token("default")}
    assert set(exports) == SETUP_VARIABLES
    script = workdir / "est-with-curl.sh"
    script.write_text(script_from_doc())
    env = {**os.environ, **exports, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        result = subprocess.run(["bash", str(script)], cwd=workdir, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{DOC.name} did not finish in {exc.timeout}s; script: {script}\n"
                    f"--- output so far ---\n{exc.output}", pytrace=False)
    if result.returncode != 0:
        log_tail = "\n".join(est_instance.log_text().splitlines()[-40:])
        pytest.fail(f"{DOC.name}: a documented command failed (bash exit "
                    f"{result.returncode}); script: {script}, files: {workdir}\n"
                    f"variables: {exports}\n--- script output ---\n{result.stdout}\n"
                    f"--- server log (tail) ---\n{log_tail}", pytrace=False)
    return Walkthrough(est_instance, workdir, device_id, result.stdout)


# -- the doc itself ----------------------------------------------------------------------
def test_the_doc_has_one_setup_block_defining_exactly_what_the_test_provides():
    setup = [b for b in doc_blocks() if b.info == "sh setup"]
    assert len(setup) == 1, "expected exactly one ```sh setup block"
    assigned = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", setup[0].body, re.MULTILINE))
    assert assigned == SETUP_VARIABLES, (
        "the setup block and the variables this test exports differ; update both")
    assert "SERVER=https://localhost:8443" in setup[0].body
    assert "TA=instance/ca/ca-chain.pem" in setup[0].body
    runnable = [b for b in doc_blocks() if b.info == "sh"]
    assert len(runnable) >= 8
    other = {b.info for b in doc_blocks()} - {"sh", "sh setup", "text"}
    assert not other, f"blocks this test neither runs nor knows: {other}"


# -- enrollment ----------------------------------------------------------------------------
def test_cacerts_and_csrattrs_steps_decode_what_the_server_sent(walkthrough):
    anchors = x509.load_pem_x509_certificates(
        walkthrough.instance.trust_anchor.read_bytes())
    fetched = x509.load_pem_x509_certificates(walkthrough.file("cacerts.pem").read_bytes())
    assert {c.fingerprint(hashes.SHA256()) for c in fetched} == \
        {c.fingerprint(hashes.SHA256()) for c in anchors}
    printed = walkthrough.output_of("openssl asn1parse")
    assert ":ecdsa-with-SHA256" in printed
    assert ":prime256v1" in printed


def test_the_enrolled_certificate_verifies_and_names_the_device(walkthrough):
    certificate = walkthrough.certificate("device.pem")
    trust_anchor = str(walkthrough.instance.trust_anchor)
    check = subprocess.run(["openssl", "verify", "-CAfile", trust_anchor,
                            str(walkthrough.file("device.pem"))],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip().endswith(": OK")

    chain = x509.load_pem_x509_certificates(walkthrough.instance.trust_anchor.read_bytes())
    roots = [c for c in chain if c.subject == c.issuer]
    intermediates = [c for c in chain if c.subject != c.issuer]
    assert len(roots) == 1 and len(intermediates) == 1
    verifier = (verification.PolicyBuilder()
                .store(verification.Store(roots))
                .time(dt.datetime.now(dt.UTC))
                .build_client_verifier())
    verified = verifier.verify(certificate, intermediates)
    assert verified.chain == [certificate, intermediates[0], roots[0]]

    assert certificate.subject == x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, walkthrough.device_id)])
    assert certificate.public_key() == walkthrough.private_key("device.key").public_key()
    printed = walkthrough.output_of("-show_chain device.pem")
    assert printed.count("device.pem: OK") == 2
    assert "device.pem certifies the key in device.key" in printed


# -- the error step --------------------------------------------------------------------------
def test_reusing_the_token_printed_401_and_auth_token_used(walkthrough):
    assert walkthrough.file("error.txt").read_text().splitlines() == [
        "error: auth.token_used", "The enrollment token has already been used."]
    headers = walkthrough.file("error-headers.txt").read_text()
    assert headers.startswith("HTTP/1.1 401")
    assert re.search(r"^X-Error-Code: auth\.token_used\r?$", headers,
                     re.MULTILINE | re.IGNORECASE)
    printed = walkthrough.output_of("-o error.txt")
    assert "HTTP 401\ncurl exit status: 0\nerror: auth.token_used\n" in printed
    assert "X-Error-Code: auth.token_used" in printed
    # The --fail-with-body variant: the body is still printed, and curl exits 22.
    printed = walkthrough.output_of('|| echo "curl exit status: $?"')
    assert "error: auth.token_used\n" in printed
    assert printed.endswith("curl exit status: 22\n")


# -- re-enrollment ---------------------------------------------------------------------------
def test_reenrollment_rekeys_the_same_subject_and_supersedes_the_old_certificate(
        walkthrough):
    old = walkthrough.certificate("device.pem")
    new = walkthrough.certificate("device-renewed.pem")
    check = subprocess.run(["openssl", "verify", "-CAfile",
                            str(walkthrough.instance.trust_anchor),
                            str(walkthrough.file("device-renewed.pem"))],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    chain = x509.load_pem_x509_certificates(walkthrough.instance.trust_anchor.read_bytes())
    (issuer,) = [c for c in chain if c.subject == new.issuer]
    new.verify_directly_issued_by(issuer)

    assert new.subject == old.subject
    assert new.public_key() != old.public_key()
    assert new.public_key() == walkthrough.private_key("device-renewed.key").public_key()
    assert new.serial_number != old.serial_number
    instance = walkthrough.instance
    assert db_count(instance, "certificate",
                    f"serial = '{old.serial_number}' AND status = 'superseded'") == 1
    assert db_count(instance, "certificate",
                    f"serial = '{new.serial_number}' AND status = 'active'") == 1
    # The operator's view, as the doc shows it.
    listing = walkthrough.output_of("certs list")
    assert re.search(rf"^{new.serial_number:x}\s+{walkthrough.device_id}\s+active\s+reenroll",
                     listing, re.MULTILINE)
    assert re.search(rf"^{old.serial_number:x}\s+{walkthrough.device_id}\s+superseded\s+token",
                     listing, re.MULTILINE)
