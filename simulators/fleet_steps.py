"""The steps a fleet run takes against either target (simulators.fleet): the devices'
roles and jobs, running them in worker processes, choosing the revoked share, the
revoked devices' second boot, and the report."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from .bench_report import Progress, machine_info
from .bench_rig import map_processes
from .deployment import Deployment
from .fleet_devices import DeviceJob, DeviceResult, device_worker, revoked_worker
from .fleet_notices import RevocationOutcome
from .fleet_options import FleetOptions
from .fleet_report import device_records, failed_phases, failure_counts, ms_summary
from .fleet_rig import GROUP


def roles(options: FleetOptions, rng: random.Random) -> list[str]:
    names = (["good"] * options.devices + ["rogue"] * options.rogue
             + ["tampered"] * options.tampered + ["flaky"] * options.flaky)
    rng.shuffle(names)
    return names


def device_jobs(options: FleetOptions, rng: random.Random, deployment: Deployment,
                vendor: Path, rogue_vendor: Path, workdir: Path,
                firmware: bytes | None) -> list[DeviceJob]:
    return [DeviceJob(index, role, deployment.url, str(deployment.trust_anchor),
                      deployment.group, str(rogue_vendor if role == "rogue" else vendor),
                      str(workdir / "tpms"), firmware)
            for index, role in enumerate(roles(options, rng))]


def run_devices(jobs: list[DeviceJob], concurrency: int,
                progress: Progress) -> list[DeviceResult]:
    def shown(result: DeviceResult, finished: int) -> None:
        progress(f"devices {finished}/{len(jobs)}", finished == len(jobs))

    return map_processes(device_worker, [(job,) for job in jobs], concurrency, shown)


def choose_victims(rng: random.Random, results: list[DeviceResult],
                   fraction: float) -> list[DeviceResult]:
    """The revoked share: at least one device when a fraction is asked for."""
    enrolled = [r for r in results if r.enrolled and r.renewed]
    count = round(len(enrolled) * fraction)
    if fraction > 0 and enrolled:
        count = max(1, count)
    return rng.sample(enrolled, count)


def readmissions(jobs: list[DeviceJob], victims: list[DeviceResult],
                 concurrency: int) -> dict[str, str]:
    """What each revoked device got when it tried a fresh attested enrollment."""
    codes = map_processes(revoked_worker, [(jobs[v.index],) for v in victims], concurrency)
    return {victim.device_id: code for victim, code in zip(victims, codes, strict=True)}


def finish_report(options: FleetOptions, results: list[DeviceResult],
                  revocations: dict[str, RevocationOutcome], readmitted: dict[str, str],
                  checks: dict[str, tuple[bool, str]], invariants: dict[str, Any],
                  started: float, setup_seconds: float,
                  ocsp: dict[str, str] | None = None) -> dict[str, Any]:
    records = device_records(results, revocations, readmitted, ocsp)
    failed = failed_phases(records) + sum(not held for held, _ in checks.values())
    ok = [r for r in results if r.enrolled]
    latencies = [o.latency_ms for o in revocations.values()
                 if o.notified and o.latency_ms is not None]
    deployment = options.deployment
    return {
        "benchmark": "fleet", "machine": machine_info(), "seed": options.seed,
        "server": deployment.url if deployment else "private instance",
        "group": deployment.group if deployment else GROUP,
        "options": {"devices": options.devices, "concurrency": options.concurrency,
                    "revoke_fraction": options.revoke_fraction, "chaos": list(options.chaos),
                    "rogue": options.rogue, "tampered": options.tampered,
                    "flaky": options.flaky},
        "succeeded": len(ok), "failed": len(results) - len(ok),
        "failures": failure_counts(results),
        "provision_ms": ms_summary([r.provision_ms for r in ok]),
        "enroll_ms": ms_summary([r.enroll_ms for r in ok]),
        "renew_ms": ms_summary([r.renew_ms for r in ok if r.renewed]),
        "revocation_notice_ms": ms_summary(latencies),
        "swtpm_peak_kib": max((r.swtpm_peak_kib for r in ok), default=0),
        "network_drops": sum(r.network_drops for r in results),
        "setup_seconds": round(setup_seconds, 1),
        "wall_seconds": round(time.monotonic() - started, 1),
        "invariants": invariants,
        "checks": {name: [held, detail] for name, (held, detail) in checks.items()},
        "devices": records, "failed_cases": failed, "passed": failed == 0,
    }
