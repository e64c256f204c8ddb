"""One device image in a temporary root, for tests/test_firmware_hooks.py: the hooks of
firmware-hooks/ installed under usr/libexec/enroll-device, its own
/etc/enroll-device.conf, /var/lib/enroll-device and /run/enroll-device, and a TPM (TCTI).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from cryptography import x509

from device_sdk.state import DeviceState
from simulators.served import BIN, ServedInstance

HOOKS = Path(__file__).resolve().parents[2] / "firmware-hooks"
SCRIPTS = ("enroll-device-lib.sh", "measure-firmware.sh", "first-boot-enroll.sh",
           "enroll-device-agent.sh")
PCR = 13  # ENROLL_PCR: the PCR measure-firmware.sh extends
PLAIN_GROUP = "fw-hooks"  # ENROLL_GROUP unless a test configures another


class Device:
    """One device image in ``root``: the hooks installed, its config, its swtpm."""

    def __init__(self, root: Path, tcti: str, server: ServedInstance | None) -> None:
        self.root = root
        self.tcti = tcti
        self.libexec = root / "usr/libexec/enroll-device"
        self.conf = root / "etc/enroll-device.conf"
        self.state = root / "var/lib/enroll-device"
        self.runtime = root / "run/enroll-device"
        self.status_file = self.state / "first-boot.status"
        self.libexec.mkdir(parents=True)
        self.conf.parent.mkdir(parents=True)
        if server is None:  # a trust anchor file that is never used
            (root / "server-ca.pem").write_text("not used\n")
        for script in SCRIPTS:
            shutil.copy2(HOOKS / script, self.libexec / script)
        self.settings = {
            "ENROLL_SERVER": server.url if server else "https://localhost:1",
            "ENROLL_SERVER_CA": str(server.trust_anchor if server else root / "server-ca.pem"),
            "ENROLL_GROUP": PLAIN_GROUP,
            "ENROLL_TCTI": tcti,
            "ENROLL_STATE_DIR": str(self.state),
            "ENROLL_STATUS_FILE": str(self.status_file),
            "ENROLL_RUNTIME_DIR": str(self.runtime),
            "ENROLL_DEVICE_BIN": str(BIN / "enroll-device"),
            "ENROLL_BROKER": "localhost:8883",
            "ENROLL_FIRMWARE_IMAGE": "",
            "ENROLL_PCR": str(PCR),
            # tiny backoff: the retry tests run in milliseconds
            "ENROLL_RETRY_ATTEMPTS": "3",
            "ENROLL_RETRY_INITIAL_MS": "1",
            "ENROLL_RETRY_MAX_MS": "4",
            "ENROLL_PROBE_TIMEOUT": "10",
            "ENROLL_HTTP_TIMEOUT": "60",
            "ENROLL_TIME_FLOOR": "1700000000",
        }
        self.configure()

    def configure(self, **changes: str) -> None:
        """Rewrite etc/enroll-device.conf: the shipped file with values replaced."""
        self.settings |= changes
        lines = []
        for line in (HOOKS / "enroll-device.conf").read_text().splitlines():
            key = line.partition("=")[0]
            if key in self.settings:
                line = f"{key}='{self.settings[key]}'"
            lines.append(line)
        text = "\n".join(lines) + "\n"
        assert all(f"\n{key}=" in text for key in self.settings), "a key is not in the file"
        self.conf.write_text(text)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        return env | {"ENROLL_DEVICE_CONF": str(self.conf), "TMPDIR": str(self.root)}

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.libexec / script), *args], capture_output=True,
                              text=True, env=self.env(), timeout=240)

    def measure(self) -> subprocess.CompletedProcess[str]:
        return self.run("measure-firmware.sh")

    def enroll(self) -> subprocess.CompletedProcess[str]:
        return self.run("first-boot-enroll.sh")

    def status(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.status_file.read_text().splitlines())

    def marker(self) -> dict[str, str]:
        text = (self.runtime / "firmware-measured").read_text()
        return dict(line.split("=", 1) for line in text.splitlines())

    def pcr(self) -> bytes:
        out = subprocess.run(["tpm2_pcrread", f"sha256:{PCR}"], capture_output=True,
                             text=True, env={**os.environ, "TPM2TOOLS_TCTI": self.tcti},
                             check=True).stdout
        (value,) = re.findall(rf"^\s*{PCR}\s*:\s*0x([0-9A-Fa-f]{{64}})\s*$", out, re.M)
        return bytes.fromhex(value)

    def certificate(self) -> x509.Certificate | None:
        return DeviceState(self.state).certificate()
