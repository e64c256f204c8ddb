"""The sensor application against a real (private) tpm-enroll service, through the
tpm_enroll_testing fixtures: a served instance, a TPM-attested group trusting a
simulated manufacturer, the broker with the relay, and a factory-provisioned swtpm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent


def sensor(command: str, server, group: str, device, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sensor_app", command, "--server", server.url,
            "--server-ca", str(server.trust_anchor), "--group", group, "--tcti", device.tcti,
            "--state-dir", str(device.state_dir), *extra]


def wait_for_line(path: Path, text: str, process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def test_first_boot_enrolls_through_the_sdk_and_a_revocation_locks_the_sensor_down(
        enroll_server, enroll_tpm_group, enroll_broker, enroll_device, enroll_operator,
        tmp_path):
    env = {**os.environ, **enroll_device.env}
    booted = subprocess.run(sensor("first-boot", enroll_server, enroll_tpm_group,
                                   enroll_device), cwd=EXAMPLE, env=env, capture_output=True,
                            text=True, timeout=120)
    assert booted.returncode == 0, booted.stderr
    device_id = booted.stdout.split("enrolled as ")[1].strip()
    assert enroll_operator.device(device_id)["status"] == "active"

    log = tmp_path / "sensor.log"
    with open(log, "w") as out:
        serving = subprocess.Popen(sensor("serve", enroll_server, enroll_tpm_group,
                                          enroll_device, "--broker", enroll_broker.address),
                                   cwd=EXAMPLE, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for_line(log, '"connected"', serving, 120), log.read_text()
        enroll_operator.revoke(device_id, reason="keyCompromise")
        assert serving.wait(120) == 10, log.read_text()
    finally:
        if serving.poll() is None:
            serving.kill()
            serving.wait()

    events = [json.loads(line) for line in log.read_text().splitlines()
              if line.startswith("{")]
    revoked = [e for e in events if e["event"] == "revoked"]
    assert revoked and revoked[-1]["source"] == "notice"  # the signed notice, verified
    assert events[-1]["event"] == "sensor_lockdown"
    lockdown = json.loads((enroll_device.state_dir / "lockdown.json").read_text())
    assert lockdown == {"reason": "keyCompromise", "revoked_by": "notice"}
    assert enroll_operator.device(device_id)["status"] == "revoked"
