"""A simulated TPM device for agent tests: swtpm (factory-provisioned by the test
manufacturer) behind tpm2-abrmd on a private D-Bus, enrolled with `enroll-device enroll`
(TPM-attested), running `enroll-device agent --json` as a subprocess.

Also: publishing arbitrary notices with mosquitto_pub under the relay's identity
certificate (the only identity the broker lets write a device's notice topic).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from simulators.abrmd import TabrmdInstance
from simulators.manufacturer import Manufacturer
from simulators.served import ServedInstance
from simulators.swtpm import SwtpmInstance
from tests.support.fleet import RevocationRig

BIN = Path(sys.executable).parent
Event = dict[str, Any]


class AgentDevice:
    def __init__(self, workdir: Path, manufacturer: Manufacturer, instance: ServedInstance,
                 rig: RevocationRig, group: str) -> None:
        self.workdir, self.instance, self.rig, self.group = workdir, instance, rig, group
        self.state_dir = workdir / "state"
        self.stdout_path = workdir / "agent.jsonl"
        self.stderr_path = workdir / "agent.stderr"
        self.process: subprocess.Popen[bytes] | None = None
        self.swtpm = SwtpmInstance(workdir / "tpm")
        self.rm: TabrmdInstance | None = None
        try:
            self.swtpm.start()
            manufacturer.provision(self.swtpm.tcti)  # before tpm2-abrmd takes the swtpm
            self.rm = TabrmdInstance(self.swtpm.tcti)
            self.rm.start()
        except BaseException:
            self.close()
            raise
        self.device_id = ""

    @property
    def env(self) -> dict[str, str]:
        assert self.rm is not None
        return {**os.environ, **self.rm.env}

    @property
    def tcti(self) -> str:
        assert self.rm is not None
        return self.rm.tcti

    def enroll(self) -> dict[str, Any]:
        result = subprocess.run(
            [str(BIN / "enroll-device"), "enroll", "--server", self.instance.url,
             "--server-ca", str(self.instance.trust_anchor), "--tcti", self.tcti,
             "--state-dir", str(self.state_dir), "--group", self.group, "--json"],
            capture_output=True, text=True, timeout=120, env=self.env)
        assert result.returncode == 0, result.stderr
        enrolled = json.loads(result.stdout)
        self.device_id = enrolled["device_id"]
        return enrolled

    # -- the agent process ---------------------------------------------------------------

    def agent_command(self, *extra: str) -> list[str]:
        return [str(BIN / "enroll-device"), "agent", "--state-dir", str(self.state_dir),
                "--tcti", self.tcti, "--server", self.instance.url, "--server-ca",
                str(self.instance.trust_anchor), "--broker", f"localhost:{self.rig.broker.port}",
                "--renew-jitter", "0.5", "--max-backoff", "2", "--json", *extra]

    def start_agent(self, *extra: str) -> None:
        """The agent in its own session; SIGTERM (its clean stop) if this process dies."""
        assert self.process is None or self.process.poll() is not None
        command = self.agent_command(*extra)
        if shutil.which("setpriv"):
            command = ["setpriv", "--pdeathsig", "TERM", "--", *command]
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(command, stdout=out,
                                            stderr=err, env=self.env,
                                            start_new_session=True)

    def run_agent(self, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.agent_command(*extra), capture_output=True, text=True,
                              timeout=timeout, env=self.env)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop_agent(self, timeout: float = 30) -> int | None:
        """SIGTERM (the documented clean shutdown); SIGKILL only if it hangs."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode

    def events(self) -> list[Event]:
        if not self.stdout_path.exists():
            return []
        lines = self.stdout_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events() if e["event"] == name]

    def wait_event(self, predicate: Callable[[list[Event]], bool], timeout: float = 60,
                   what: str = "event") -> list[Event]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events()
            if predicate(events):
                return events
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.1)
        events = self.events()
        assert predicate(events), (f"no {what} within {timeout}s; agent rc="
                                   f"{self.process.poll() if self.process else None}\n"
                                   f"{self.log_tail()}")
        return events

    def log_tail(self) -> str:
        out = self.stdout_path.read_text()[-4000:] if self.stdout_path.exists() else ""
        err = self.stderr_path.read_text()[-2000:] if self.stderr_path.exists() else ""
        return f"--- agent stdout ---\n{out}\n--- agent stderr ---\n{err}"

    # -- state dir ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "status.json").read_text())

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.state_dir / "device.crt.pem").read_bytes())

    @property
    def topic(self) -> str:
        return f"fleet/{self.group}/devices/{self.device_id}/notices"

    def close(self) -> None:
        try:
            self.stop_agent()
        finally:
            try:
                if self.rm is not None:
                    self.rm.close()
            finally:
                self.swtpm.close()


def publish_as_relay(instance: ServedInstance, rig: RevocationRig, topic: str,
                     payload: str, retain: bool = False) -> None:
    """mosquitto_pub with the relay's identity, on the service listener (QoS 1)."""
    args = ["mosquitto_pub", *rig.relay_args(), "-i", f"test-publisher-{os.getpid()}",
            "-t", topic, "-q", "1", "-m", payload]
    if retain:
        args.append("-r")
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def read_retained(instance: ServedInstance, rig: RevocationRig, topic: str) -> str:
    """The retained message on topic (as the relay identity, which may read fleet/#)."""
    result = subprocess.run(
        ["mosquitto_sub", *rig.relay_args(), "-i", f"test-reader-{os.getpid()}", "-t", topic,
         "-C", "1", "-W", "5", "--retained-only"], capture_output=True, text=True, timeout=30)
    return result.stdout.strip()
