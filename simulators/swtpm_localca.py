"""swtpm's own EK tooling: swtpm_setup --create-ek-cert with a private swtpm_localca CA.

Real-world EK certificates are not all made by our simulated manufacturer; these are the
ones swtpm itself makes (subject "CN=unknown", manufacturer "id:00001014"), so tests can
check the verifier against a second, independent EK certificate maker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .manufacturer import ProvisioningError

SWTPM_LOCALCA_DIR = Path("/var/lib/swtpm-localca")  # default statedir in /etc/swtpm-localca.conf
SWTPM_LOCALCA_ISSUER, SWTPM_LOCALCA_ROOT = "issuercert.pem", "swtpm-localca-rootca-cert.pem"
# What swtpm_setup 0.7.1 --create-ek-cert makes: (persistent handle, EK cert NV index).
SWTPM_SETUP_RSA_EK = (0x81010001, 0x01C00002)  # RSA-2048, template L-1
SWTPM_SETUP_ECC_EK = (0x81010016, 0x01C00016)  # ECC NIST P-384, high-range template H-3


def swtpm_localca_ca_certificates(localca_dir: str | os.PathLike[str] = SWTPM_LOCALCA_DIR,
                                  ) -> tuple[str, str]:  # fmt: skip
    """(issuer, root) PEMs of a swtpm_localca CA: the trust anchors for its EK certs.

    swtpm_localca creates them on first use in its statedir (SWTPM_LOCALCA_DIR for the
    system config): the root "swtpm-localca-rootca" and the issuer "swtpm-localca".
    """
    base = Path(localca_dir)
    return ((base / SWTPM_LOCALCA_ISSUER).read_text(), (base / SWTPM_LOCALCA_ROOT).read_text())


def provision_with_swtpm_setup(
    state_dir: str | os.PathLike[str], *, localca_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False, timeout: float = 120.0,
) -> tuple[str, str]:  # fmt: skip
    """Run ``swtpm_setup --tpm2 --create-ek-cert`` on ``state_dir`` with a private localca.

    Everything (configs, temp files, and the CA unless ``localca_dir`` names a directory
    to reuse across a fleet) lives in a temp dir: nothing is written to /etc or /var/lib.
    The TPM gets the EKs and certificates listed in SWTPM_SETUP_RSA_EK / _ECC_EK.
    Returns the (issuer, root) CA certificate PEMs; swtpm must not be running on state_dir.
    Existing TPM state is an error unless ``overwrite``.
    """
    for tool in ("swtpm_setup", "swtpm_localca"):
        if shutil.which(tool) is None:
            raise ProvisioningError(f"{tool} not found: apt-get install swtpm-tools")
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="enroll-swtpm-setup-") as tmp:
        work = Path(tmp)
        ca_dir = Path(localca_dir) if localca_dir is not None else work / "localca"
        ca_dir.mkdir(parents=True, exist_ok=True)
        (work / "swtpm-localca.conf").write_text(
            f"statedir = {ca_dir}\nsigningkey = {ca_dir}/signkey.pem\n"
            f"issuercert = {ca_dir}/{SWTPM_LOCALCA_ISSUER}\ncertserial = {ca_dir}/certserial\n"
        )
        (work / "swtpm-localca.options").write_text(
            "--platform-manufacturer Simulated\n--platform-version 2.1\n--platform-model swtpm\n"
        )
        (work / "swtpm_setup.conf").write_text(
            f"create_certs_tool = {shutil.which('swtpm_localca')}\n"
            f"create_certs_tool_config = {work}/swtpm-localca.conf\n"
            f"create_certs_tool_options = {work}/swtpm-localca.options\n"
            "active_pcr_banks = sha256\n"
        )
        command = [
            "swtpm_setup", "--tpm2", "--tpmstate", f"dir://{Path(state_dir).resolve()}",
            "--create-ek-cert", "--config", f"{work}/swtpm_setup.conf",
            "--logfile", f"{work}/setup.log", *(["--overwrite"] if overwrite else []),
        ]  # fmt: skip
        env = {**os.environ, "TMPDIR": tmp, "XDG_CONFIG_HOME": f"{tmp}/xdg"}
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env,
            start_new_session=True,
        )  # fmt: skip
        if result.returncode != 0:
            log = work / "setup.log"
            raise ProvisioningError(
                f"swtpm_setup failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
                + (log.read_text(errors="replace") if log.exists() else "")
            )
        return swtpm_localca_ca_certificates(ca_dir)
