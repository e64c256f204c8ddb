"""The second half of `make demo`: five swtpm devices live through the firmware hooks.

A server (SQLite, SoftHSM), Mosquitto configured by `enroll-server broker-config`, the
relay, and a group whose PCR policy is the good firmware's measurement. Each device is a
swtpm behind tpm2-abrmd with the factory's EK certificates, and runs what a device image
ships (firmware-hooks/): measure-firmware.sh, first-boot-enroll.sh, then the agent
(enroll-device agent, TLS to the broker with the key inside the TPM). Device 5 boots
tampered firmware. Then: a renewal-due notice renews device 1 by itself; device 2 is
revoked, its agent learns it from the signed notice and stops, and the broker refuses it
when it comes back. Everything is stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

from simulators.abrmd import TabrmdInstance
from simulators.fleet import BAD_FIRMWARE, FIRMWARE_PCR, GOOD_FIRMWARE, GROUP, Rig
from simulators.manufacturer import Manufacturer
from simulators.served import BIN
from simulators.swtpm import SwtpmInstance

HOOKS = Path(__file__).resolve().parent.parent / "firmware-hooks"


def say(text: str) -> None:
    print(text, flush=True)


class Device:
    """One simulated device: its TPM, its resource manager, its root with the hooks."""

    def __init__(self, name: str, root: Path, manufacturer: Manufacturer, rig: Rig,
                 firmware: bytes) -> None:
        self.name, self.root, self.rig = name, root, rig
        self.swtpm = SwtpmInstance(root / "tpm")
        self.swtpm.start()
        manufacturer.provision(self.swtpm.tcti)
        self.rm = TabrmdInstance(self.swtpm.tcti)
        self.rm.start()
        self.state = root / "var/lib/enroll-device"
        (root / "lib/firmware").mkdir(parents=True)
        (root / "lib/firmware/device-firmware.bin").write_bytes(firmware)
        (root / "etc").mkdir()
        settings = {
            "ENROLL_SERVER": rig.instance.url, "ENROLL_SERVER_CA": str(rig.instance.trust_anchor),
            "ENROLL_GROUP": GROUP, "ENROLL_TCTI": self.rm.tcti, "ENROLL_STATE_DIR": str(self.state),
            "ENROLL_STATUS_FILE": str(self.state / "first-boot.status"),
            "ENROLL_RUNTIME_DIR": str(root / "run/enroll-device"),
            "ENROLL_DEVICE_BIN": str(BIN / "enroll-device"),
            "ENROLL_BROKER": f"localhost:{rig.broker_port}",
            "ENROLL_FIRMWARE_IMAGE": str(root / "lib/firmware/device-firmware.bin"),
            "ENROLL_PCR": str(FIRMWARE_PCR), "ENROLL_RETRY_ATTEMPTS": "3",
            "ENROLL_RETRY_INITIAL_MS": "200", "ENROLL_RETRY_MAX_MS": "1000",
            "ENROLL_TIME_FLOOR": "1700000000"}
        lines = []
        for line in (HOOKS / "enroll-device.conf").read_text().splitlines():
            key = line.partition("=")[0]
            lines.append(f"{key}='{settings[key]}'" if key in settings else line)
        self.conf = root / "etc/enroll-device.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.agent: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.rm.env, "ENROLL_DEVICE_CONF": str(self.conf)}

    def hook(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(HOOKS / script)], capture_output=True, text=True,
                              env=self.env, timeout=300)

    def status(self) -> dict:
        path = self.state / "status.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def first_boot_status(self) -> dict[str, str]:
        path = self.state / "first-boot.status"
        if not path.exists():
            return {}
        return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)

    def start_agent(self) -> None:
        log = open(self.root / "agent.log", "ab")  # noqa: SIM115 - owned by the process
        self.agent = subprocess.Popen(
            ["sh", str(HOOKS / "enroll-device-agent.sh"), "--renew-jitter", "0.5",
             "--max-backoff", "2", "--json"], stdout=log, stderr=subprocess.STDOUT,
            env=self.env, start_new_session=True)
        log.close()

    def events(self, name: str) -> list[dict]:
        path = self.root / "agent.log"
        if not path.exists():
            return []
        events = []
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == name:
                    events.append(event)
        return events

    def close(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            os.killpg(self.agent.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.agent.wait(15)
        self.rm.close()
        self.swtpm.close()


def wait(predicate, timeout: float = 30.0) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def run() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="enroll-demo-fleet-"))
    rig = Rig(workdir)
    devices: list[Device] = []
    started = time.monotonic()
    try:
        say("\n== A small fleet through first boot, renewal and revocation ==")
        manufacturer = Manufacturer.create(workdir / "vendor")
        roots = workdir / "ek-roots.pem"
        roots.write_text("".join(manufacturer.ca_certificate_pems))
        rig.start(roots, workdir / "vendor")
        say(f"server, Mosquitto (mTLS, per-device ACL, CRL) and relay up; group {GROUP!r} "
            f"requires PCR {FIRMWARE_PCR} = the good firmware's measurement")
        for number in range(1, 6):
            firmware = BAD_FIRMWARE if number == 5 else GOOD_FIRMWARE
            devices.append(Device(f"device {number}", workdir / f"device-{number}",
                                  manufacturer, rig, firmware))
        enrolled = _first_boot(devices)
        for device in enrolled:
            device.start_agent()
        seconds = wait(lambda: all(d.events("connected") for d in enrolled), 60)
        say(f"agents of the {len(enrolled)} enrolled devices connected to the broker over "
            f"TLS 1.3 with their TPM keys ({seconds or 0:.1f} s)")
        _renewal(rig, enrolled[0])
        _revocation(rig, enrolled[1])
        _offline_revocation(rig, enrolled[2])
        say(f"\ndone in {time.monotonic() - started:.0f} s; stopping every process")
    finally:
        for device in devices:
            device.close()
        rig.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _first_boot(devices: list[Device]) -> list[Device]:
    enrolled = []
    for device in devices:
        measured = device.hook("measure-firmware.sh")
        began = time.monotonic()
        result = device.hook("first-boot-enroll.sh")
        took = time.monotonic() - began
        if result.returncode == 0:
            status = device.status()
            say(f"{device.name}: firmware measured into PCR {FIRMWARE_PCR}, first boot "
                f"enrolled in {took:.1f} s: device id {status['device_id'][:16]}..., "
                f"serial {status['serial'][:12]}...")
            enrolled.append(device)
        else:
            code = device.first_boot_status().get("error_code", "?")
            say(f"{device.name}: firmware measured (exit {measured.returncode}), first boot "
                f"REFUSED: {code} (exit {result.returncode}); it has no certificate, and "
                "the operator sees why in the audit log")
    return enrolled


def _renewal(rig: Rig, device: Device) -> None:
    before = device.status()["serial"]
    with sqlite3.connect(rig.instance.dir / "enroll.db", timeout=30) as db:
        db.execute("UPDATE certificate SET renew_at = '2000-01-01 00:00:00' WHERE serial = ?",
                   (str(int(before, 16)),))
    seconds = wait(lambda: device.status().get("serial") not in (None, before), 60)
    if seconds is None:
        say(f"{device.name}: renewal did not happen in 60 s (see its agent.log)")
        return
    say(f"{device.name}: its certificate reached its renewal point; the relay sent a signed "
        f"renewal-due notice and the agent renewed over EST with its TPM key in "
        f"{seconds:.1f} s: serial {before[:12]}... -> {device.status()['serial'][:12]}...")


def _revocation(rig: Rig, device: Device) -> None:
    device_id = device.status()["device_id"]
    began = time.monotonic()
    rig.instance.cli("revoke", "--device", device_id, "--reason", "keyCompromise")
    wait(lambda: device.agent is not None and device.agent.poll() is not None, 30)
    say(f"{device.name}: operator revoked it (keyCompromise); its agent verified the signed "
        f"notice and stopped with exit {device.agent.returncode if device.agent else '?'}, "
        f"{time.monotonic() - began:.1f} s after the revoke command started; status.json: "
        f"{device.status().get('state')}")
    say(f"{device.name}: `openssl ocsp` says {_ocsp(rig, device)}; the CRL lists it")


def _offline_revocation(rig: Rig, device: Device) -> None:
    """Revoked while powered off: no notice can reach it, the broker refuses it."""
    if device.agent is not None:
        os.killpg(device.agent.pid, signal.SIGTERM)
        device.agent.wait(15)
    device_id = device.status()["device_id"]
    rig.instance.cli("revoke", "--device", device_id, "--reason", "cessationOfOperation")
    time.sleep(1.5)  # the relay brings the broker's CRL up to date
    device.start_agent()  # powered on again
    wait(lambda: device.agent is not None and device.agent.poll() is not None, 60)
    unavailable = len(device.events("broker_unavailable"))
    revoked = device.events("revoked")
    say(f"{device.name}: revoked while powered off (cessationOfOperation); on power-up the "
        f"broker refused its TLS connection{f' ({unavailable}x)' if unavailable else ''}, the "
        f"agent checked the CA's signed CRL (source {revoked[-1].get('source') if revoked else '?'}"
        f") and exited {device.agent.returncode if device.agent else '?'}")


def _ocsp(rig: Rig, device: Device) -> str:
    chain = rig.instance.trust_anchor.read_text()
    issuer = rig.workdir / "issuing-ca.pem"
    issuer.write_text(chain.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
    revoked = sorted(device.state.glob("device.crt.pem.revoked-*"))
    cert = revoked[-1] if revoked else device.state / "device.crt.pem"
    result = subprocess.run(["openssl", "ocsp", "-issuer", str(issuer), "-cert", str(cert),
                             "-url", rig.instance.url + "/ocsp", "-CAfile",
                             str(rig.instance.trust_anchor)], capture_output=True, text=True,
                            timeout=30)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith(str(cert))), "")
    return line.split(": ", 1)[1] if ": " in line else "no answer"


if __name__ == "__main__":
    run()
