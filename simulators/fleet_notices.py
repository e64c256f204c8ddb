"""The revocation phase against a deployment: revoke through the operator API and check
the notice where it matters, at the device.

Each revoked device boots again from its kept swtpm state, behind tpm2-abrmd (a resource
manager, as /dev/tpmrm0 on hardware), and runs the real `enroll-device agent` from the
state dir its first boot wrote: TLS 1.3 to the broker with the key inside its TPM, its
own notice topic, every notice verified (signer chained to the CA, audience, sequence,
expiry). Once its agent is connected, the device is revoked through the operator API;
the agent must log `revoked` with source "notice" and exit 10. Devices go in batches of
``concurrency`` (each needs a swtpm, a D-Bus, tpm2-abrmd and a Python process).

Waits are for events, with generous bounds (no sleep-and-hope): "connected" before the
revocation, the agent's exit after it. A notice published before the agent subscribes
still arrives: it is retained on the device's topic.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bench_report import Progress
from .deployment import Deployment
from .device import SimulatedDevice
from .fleet_devices import DeviceJob
from .operator_api import OperatorApi, OperatorApiError
from .processes import die_with_parent, start_group, stop_group
from .served import BIN

EXIT_REVOKED = 10  # device_sdk.agent.EXIT_REVOKED
CONNECT_TIMEOUT = 180.0  # bounds, not expectations: a busy machine may need them
REVOKED_TIMEOUT = 180.0


@dataclass
class RevocationOutcome:
    device_id: str
    revoked_by_api: bool = False
    api_error: str | None = None
    checked_at: str | None = None  # where the notice was awaited: "device", "gateway"
    notified: bool = False  # a revocation notice was verified there
    source: str | None = None  # how the device learnt it: notice, crl, est
    latency_ms: float | None = None  # API call -> the agent's "revoked" event
    agent_exit: int | None = None
    detail: str = ""  # the agent's last events, for a failure message


class DeviceAgent:
    """One device booted again: its swtpm (kept state), tpm2-abrmd, `enroll-device agent`."""

    def __init__(self, job: DeviceJob, deployment: Deployment, log_dir: Path) -> None:
        self.job = job
        self.events_path = log_dir / f"{job.name}.agent.jsonl"
        self.stderr_path = log_dir / f"{job.name}.agent.stderr"
        self.process: subprocess.Popen[bytes] | None = None
        # The device boots again: its kept TPM state (job.tpm_dir), a resource manager.
        self.device = SimulatedDevice(job.state_dir, tpm_dir=job.tpm_dir)
        try:
            self.device.start()
            assert deployment.broker_address is not None
            command = [str(BIN / "enroll-device"), "agent", "--state-dir", str(job.state_dir),
                       "--tcti", self.device.tcti, "--server", deployment.url, "--server-ca",
                       str(deployment.trust_anchor), "--broker", deployment.broker_address,
                       "--group", deployment.group, "--max-backoff", "2", "--json"]
            if deployment.broker_ca is not None:
                command += ["--broker-ca", str(deployment.broker_ca)]
            with open(self.events_path, "ab") as out, open(self.stderr_path, "ab") as err:
                self.process = start_group(die_with_parent(command), log=err, stdout=out,
                                           env={**os.environ, **self.device.env})
        except BaseException:
            self.close()
            raise

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        events = []
        for line in self.events_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    events.append(event)
        return events

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def summary(self) -> str:
        names = [e.get("event", "?") + (f"({e['code']})" if e.get("code") else "")
                 for e in self.events()[-6:]]
        err = self.stderr_path.read_text(errors="replace")[-300:] if \
            self.stderr_path.exists() else ""
        return f"agent events: {', '.join(names) or 'none'}" + (f"; stderr: {err}" if err
                                                                   else "")

    def close(self) -> None:
        try:
            stop_group(self.process, 15)
        finally:
            self.device.close()  # keeps the TPM state: the readmission check boots it again


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def _epoch(timestamp: str) -> float:
    return dt.datetime.fromisoformat(timestamp).timestamp()


def revoke_at_devices(deployment: Deployment, victims: list[tuple[DeviceJob, str]],
                      concurrency: int, log_dir: Path,
                      progress: Progress) -> dict[str, RevocationOutcome]:
    """Revoke each (job, device id) through the operator API; with a broker, each with
    its agent connected, and record what the device saw."""
    outcomes: dict[str, RevocationOutcome] = {}
    with OperatorApi(deployment.url, deployment.trust_anchor,
                     deployment.operator_token) as api:
        for start in range(0, len(victims), max(1, concurrency)):
            batch = victims[start:start + max(1, concurrency)]
            if deployment.broker is None:
                for _job, device_id in batch:
                    outcomes[device_id] = _revoke(api, device_id)
            else:
                outcomes.update(_revoke_batch(api, deployment, batch, log_dir))
            progress(f"revoked {len(outcomes)}/{len(victims)} devices", False)
    return outcomes


def _revoke(api: OperatorApi, device_id: str) -> RevocationOutcome:
    outcome = RevocationOutcome(device_id)
    try:
        result = api.revoke(device_id)
        outcome.revoked_by_api = device_id in result.get("devices", [device_id])
    except OperatorApiError as error:
        outcome.api_error = error.code or str(error)
    return outcome


def _revoke_batch(api: OperatorApi, deployment: Deployment,
                  batch: list[tuple[DeviceJob, str]],
                  log_dir: Path) -> dict[str, RevocationOutcome]:
    agents: dict[str, DeviceAgent] = {}
    outcomes: dict[str, RevocationOutcome] = {}
    try:
        for job, device_id in batch:
            agents[device_id] = DeviceAgent(job, deployment, log_dir)
        _wait(lambda: all(a.events("connected") or a.exited() for a in agents.values()),
              CONNECT_TIMEOUT)
        called: dict[str, float] = {}
        for device_id, agent in agents.items():
            if not agent.events("connected"):
                outcomes[device_id] = RevocationOutcome(
                    device_id, checked_at="device",
                    detail="never connected to the broker; " + agent.summary())
                continue
            called[device_id] = time.time()
            outcomes[device_id] = _revoke(api, device_id)
            outcomes[device_id].checked_at = "device"
        _wait(lambda: all(agents[d].exited() for d in called), REVOKED_TIMEOUT)
        for device_id in called:
            agent, outcome = agents[device_id], outcomes[device_id]
            revoked = agent.events("revoked")
            outcome.agent_exit = agent.process.poll() if agent.process else None
            if revoked:
                outcome.source = revoked[-1].get("source")
                outcome.latency_ms = round(
                    1000 * (_epoch(revoked[-1]["ts"]) - called[device_id]), 1)
            outcome.notified = (outcome.source == "notice"
                                and outcome.agent_exit == EXIT_REVOKED)
            outcome.detail = agent.summary()
    finally:
        for agent in agents.values():
            agent.close()
    return outcomes
