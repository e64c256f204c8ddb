"""The wire formats are tpm2-tools' own: tpm2-tools 5.4 files verify without our SDK.

Drives swtpm with the tpm2-tools binaries only (createek, createak, create, load,
activatecredential, certify, quote, pcrread) and feeds their output files to the verifier.
tpm2-tools 5.4 ``tpm2_certify`` has no qualifying-data option: it always sends the fixed
extraData 00 ff 55 aa, so a tools-only client cannot bind certify to a server nonce (the
quote can, ``tpm2_quote -q``).

``.venv/bin/python -m tests.test_attestation_tools DIR`` records the files to DIR.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from enroll_server.attestation import credential, quote, tpm_structs, verify
from tests.support.tpm_evidence import swtpm

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker

TOOLS_CERTIFY_EXTRA_DATA = bytes.fromhex("00ff55aa")  # hard-coded in tpm2_certify 5.4
NONCE = bytes.fromhex("5e7e4a1d" * 8)
DEVICE_KEY_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign"


class Tools:
    """Runs tpm2-tools against one TPM in a work directory; flushes transients after each."""

    def __init__(self, tcti: str, work: Path) -> None:
        self.env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
        self.work = work

    def __call__(self, *command: str, flush: bool = True) -> str:
        result = subprocess.run(command, cwd=self.work, env=self.env, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        if flush:
            subprocess.run(["tpm2_flushcontext", "-t"], cwd=self.work, env=self.env,
                           capture_output=True, timeout=60, check=True)  # fmt: skip
        return result.stdout

    def read(self, name: str) -> bytes:
        return (self.work / name).read_bytes()


def run_tools_flow(tools: Tools) -> dict[str, str]:
    """The device side with tpm2-tools; returns what the server issued (hex)."""
    tools("tpm2_pcrextend", "0:sha256=" + "11" * 32, flush=False)
    tools("tpm2_createek", "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub")
    tools("tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256",
          "-s", "ecdsa", "-u", "ak.pub", "-n", "ak.name", "-r", "ak.priv")  # fmt: skip
    tools("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "srk.ctx")
    tools("tpm2_create", "-C", "srk.ctx", "-G", "ecc256", "-a", DEVICE_KEY_ATTRIBUTES,
          "-u", "device_key.pub", "-r", "device_key.priv")  # fmt: skip
    tools("tpm2_load", "-C", "srk.ctx", "-u", "device_key.pub", "-r", "device_key.priv",
          "-c", "device_key.ctx")  # fmt: skip
    # server side: challenge for the AK name it computes itself
    ak_name = tpm_structs.object_name(verify.check_ak_public(tools.read("ak.pub")))
    secret = credential.new_secret()
    blob = credential.to_tools_credential(
        *credential.make_credential_challenge(tools.read("ek.pub"), ak_name, secret))
    (tools.work / "credential.bin").write_bytes(blob)
    tools("tpm2_createek", "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub", flush=False)
    tools("tpm2_startauthsession", "--policy-session", "-S", "session.ctx", flush=False)
    tools("tpm2_policysecret", "-S", "session.ctx", "-c", "e", flush=False)
    tools("tpm2_activatecredential", "-c", "ak.ctx", "-C", "ek.ctx", "-i", "credential.bin",
          "-o", "activated_secret.bin", "-P", "session:session.ctx", flush=False)  # fmt: skip
    tools("tpm2_flushcontext", "session.ctx")
    tools("tpm2_certify", "-c", "device_key.ctx", "-C", "ak.ctx", "-g", "sha256",
          "-o", "certify_info.bin", "-s", "certify_signature.bin")  # fmt: skip
    tools("tpm2_quote", "-c", "ak.ctx", "-l", "sha256:0,1,2,7", "-q", NONCE.hex(), "-g",
          "sha256", "-m", "quote_info.bin", "-s", "quote_signature.bin")  # fmt: skip
    (tools.work / "pcrread.yaml").write_text(tools("tpm2_pcrread", "sha256:0,1,2,7"))
    return {"secret": secret.hex(), "nonce": NONCE.hex()}


def check_tools_files(directory: Path, issued: dict[str, str]) -> None:
    """Everything the verifier must accept from the tools' files, as they were written."""

    def read(name: str) -> bytes:
        return (directory / name).read_bytes()

    ak = verify.check_ak_public(read("ak.pub"))
    assert tpm_structs.object_name(ak) == read("ak.name")  # tpm2_createak -n: raw Name
    credential.check_activated_secret(bytes.fromhex(issued["secret"]), read("activated_secret.bin"))
    verify.verify_certify(read("certify_info.bin"), read("certify_signature.bin"), read("ak.pub"),
                          TOOLS_CERTIFY_EXTRA_DATA, read("device_key.pub"))  # fmt: skip
    policy = quote.golden_pcr_policy(quote.parse_tpm2_pcrread(read("pcrread.yaml").decode()),
                                     {"sha256": [0, 1, 2, 7]})  # fmt: skip
    quote.verify_quote(read("quote_info.bin"), read("quote_signature.bin"), read("ak.pub"),
                       bytes.fromhex(issued["nonce"]), policy)  # fmt: skip


@contextlib.contextmanager
def tools_run() -> Iterator[tuple[Path, dict[str, str]]]:
    if shutil.which("tpm2_createak") is None:
        raise RuntimeError("tpm2-tools not installed (apt-get install tpm2-tools)")
    with swtpm() as tcti, tempfile.TemporaryDirectory(prefix="attestation-tools-") as work:
        yield Path(work), run_tools_flow(Tools(tcti, Path(work)))


def test_tpm2_tools_files_verify_byte_for_byte() -> None:
    with tools_run() as (work, issued):
        certify_info = (work / "certify_info.bin").read_bytes()
        assert certify_info[:4] == b"\xffTCG"  # TPMS_ATTEST, no TPM2B_ATTEST size
        assert (work / "quote_info.bin").read_bytes()[:4] == b"\xffTCG"
        ek_public = (work / "ek.pub").read_bytes()
        assert int.from_bytes(ek_public[:2], "big") == len(ek_public) - 2  # TPM2B_PUBLIC
        assert (work / "certify_signature.bin").read_bytes()[:2] == b"\x00\x18"  # ECDSA
        check_tools_files(work, issued)


def test_tpm2_certify_5_4_cannot_carry_a_server_nonce() -> None:
    from enroll_server.attestation import verdict

    with tools_run() as (work, _):
        with pytest.raises(verdict.CertifyNonceMismatch):
            verify.verify_certify((work / "certify_info.bin").read_bytes(),
                                  (work / "certify_signature.bin").read_bytes(),
                                  (work / "ak.pub").read_bytes(), NONCE,
                                  (work / "device_key.pub").read_bytes())  # fmt: skip


def record(directory: Path) -> None:
    names = ("ek.pub", "ak.pub", "ak.name", "device_key.pub", "credential.bin",
             "activated_secret.bin", "certify_info.bin", "certify_signature.bin",
             "quote_info.bin", "quote_signature.bin", "pcrread.yaml")  # fmt: skip
    with tools_run() as (work, issued):
        directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(work / name, directory / name)
        version = subprocess.run(["tpm2_createak", "-v"], capture_output=True, text=True)
        issued["recorded_with"] = version.stdout.strip()
        (directory / "manifest.json").write_text(json.dumps(issued, indent=2) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/attestation/tpm2-tools"))
