"""`enroll-sim fleet --rate R --duration D [--ramp S]`: attested first-boot enrollments
started on a fixed schedule (open loop), with latency percentiles and errors over time.

Enrollment number i is due at ``schedule(R, D, S)[i]`` seconds after the start: the rate
rises linearly from 0 to R over the first S seconds, then stays at R until D. C worker
processes (simulators.bench_rig.ClientPool) each take the next due enrollment, start and
provision a fresh swtpm *before* it is due (not measured), wait for its time, then
enroll through the device SDK with one attempt (a 429/503 is counted, not retried).

Latency is measured from the *scheduled* start, so a worker that fell behind adds its lag
to the latency instead of hiding it (no coordinated omission); ``lag_ms`` says how late
the workers started, ``service_ms`` the time from the actual start. When lag grows, the
machine (or C) cannot keep up with R: raise --concurrency or lower --rate.

Against a private instance (default) or a deployment (``--server``, as the fleet does).
"""

from __future__ import annotations

import math
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .bench_report import Progress, machine_info, percentile
from .bench_rig import ClientPool, Shared
from .deployment import Deployment
from .fleet_options import FleetOptions
from .fleet_rig import GROUP
from .served import ServedInstance, ServerProcessError, unthrottled

WINDOWS = 30  # about this many points over the run


def schedule(rate: float, duration: float, ramp: float = 0.0) -> list[float]:
    """Due times (seconds from the start) of the enrollments: N(t) = R t^2 / 2S during
    the ramp, then R per second; every enrollment due before ``duration``."""
    ramp = min(ramp, duration)
    offsets = []
    index = 0
    while True:
        if ramp > 0 and index < rate * ramp / 2:
            due = math.sqrt(2 * index * ramp / rate)
        else:
            due = ramp + (index - rate * ramp / 2) / rate
        if due >= duration:
            return offsets
        offsets.append(round(due, 6))
        index += 1


def load_worker(url: str, trust_anchor: str, group: str, manufacturer_dir: str,
                firmware: bytes | None, offsets: list[float], timeout: float,
                shared: Shared) -> None:
    """One client process: for each enrollment it takes, a provisioned swtpm waits for
    the due time, then enrolls once."""
    from device_sdk.attest import AttestedEnrollment
    from device_sdk.tpm import TpmDevice

    from .bench_attest import error_key
    from .fleet_devices import measure_firmware
    from .manufacturer import Manufacturer
    from .swtpm import SwtpmInstance

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    maker = Manufacturer.load(manufacturer_dir)
    shared.ready()
    started_at = shared.wait_start()
    records = []
    for index in shared.take(len(offsets)):
        record: dict[str, Any] = {"index": index, "due": offsets[index], "error": None}
        try:
            with SwtpmInstance() as swtpm:
                maker.provision(swtpm.tcti)
                with TpmDevice(swtpm.tcti) as tpm, AttestedEnrollment(
                        url, Path(trust_anchor), tpm, group, timeout, attempts=1) as client:
                    if firmware is not None:
                        measure_firmware(tpm, firmware)
                    time.sleep(max(0.0, started_at + offsets[index] - time.monotonic()))
                    record["start"] = time.monotonic() - started_at
                    try:
                        client.enroll()
                    except Exception as error:  # noqa: BLE001 - counted by kind
                        record["error"] = error_key(error)
                    record["end"] = time.monotonic() - started_at
                    record["device_id"] = client.device_id
        except Exception as error:  # noqa: BLE001 - the simulator failed, not the server
            record["error"] = f"simulator {type(error).__name__}: {str(error)[:100]}"
        records.append(record)
    shared.finished(records)


def run_load(options: FleetOptions, progress: Progress) -> dict[str, Any]:
    from .manufacturer import Manufacturer

    assert options.rate is not None
    workdir = Path(tempfile.mkdtemp(prefix="enroll-fleet-load-"))
    instance: ServedInstance | None = None
    pool: ClientPool | None = None
    try:
        deployment = options.deployment
        vendor = options.manufacturer or workdir / "vendor"
        maker = Manufacturer.load_or_create(vendor)
        if deployment is None:
            progress("initialising a private instance (SoftHSM CA key, SQLite)", False)
            instance = ServedInstance(directory=workdir / "instance", env=unthrottled())
            roots = workdir / "ek-roots.pem"
            roots.write_text("".join(maker.ca_certificate_pems))
            instance.cli("group", "create", GROUP, "--auth", "tpm", "--ek-roots", str(roots))
            instance.start()
            deployment = Deployment(instance.url, instance.trust_anchor, GROUP)
            progress(f"serving {instance.url}", True)
        offsets = schedule(options.rate, options.duration, options.ramp)
        pool = ClientPool()
        for _ in range(options.concurrency):
            pool.spawn(load_worker, deployment.url, str(deployment.trust_anchor),
                       deployment.group, str(vendor), options.firmware, offsets, 60.0)
        running = instance

        def server_alive() -> None:
            if running is not None and not running.alive():
                raise ServerProcessError("server exited during the load:\n"
                                         + running.log_text()[-4000:])

        pool.wait_ready(server_alive)
        progress(f"{len(offsets)} enrollments at {options.rate:g}/s for "
                 f"{options.duration:g} s (ramp {options.ramp:g} s), "
                 f"{options.concurrency} workers", True)
        pool.go()
        reports = pool.collect(len(offsets), "enrolling", progress, server_alive,
                               timeout=options.duration + 600)
        records = sorted((r for report in reports for r in report), key=lambda r: r["index"])
        progress(f"done: {len(records)} enrollments", True)
    finally:
        if pool is not None:
            pool.close()
        if instance is not None:
            instance.stop()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return load_report(options, deployment, records)


def _ms(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {name: round(1000 * percentile(ordered, q), 1) if ordered else None
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))}


def windows(records: list[dict[str, Any]], duration: float) -> list[dict[str, Any]]:
    """Per time window (by due time): started, succeeded, errors by code, latency
    percentiles (from the due time) and the rate of finished enrollments."""
    width = max(1.0, duration / WINDOWS)
    out = []
    for number in range(math.ceil(duration / width)):
        low, high = number * width, (number + 1) * width
        due = [r for r in records if low <= r["due"] < high]
        ended = [r for r in records if "end" in r and low <= r["end"] < high]
        ok = [r for r in due if r["error"] is None]
        out.append({"t": round(low, 2), "width": round(width, 2), "started": len(due),
                    "succeeded": len(ok), "failed": len(due) - len(ok),
                    "errors": dict(Counter(r["error"] for r in due if r["error"])),
                    "finished_per_second": round(len(ended) / width, 2),
                    "latency_ms": _ms([r["end"] - r["due"] for r in ok])})
    return out


def load_report(options: FleetOptions, deployment: Deployment,
                records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r["error"] is None]
    errors = Counter(r["error"] for r in records if r["error"])
    measured = [r for r in records if "end" in r]
    elapsed = max((r["end"] for r in measured), default=0.0)
    devices = [{"name": f"enrollment-{r['index']:05d}", "index": r["index"],
                "device_id": r.get("device_id"), "phases": {"enroll": _phase(r)}}
               for r in records]
    failed = len(records) - len(ok)
    return {
        "benchmark": "fleet.load", "machine": machine_info(), "seed": options.seed,
        "server": deployment.url if options.deployment else "private instance",
        "group": deployment.group,
        "options": {"rate": options.rate, "duration": options.duration,
                    "ramp": options.ramp, "concurrency": options.concurrency},
        "enrollments": {"scheduled": len(records), "succeeded": len(ok), "failed": failed,
                        "errors_by_code": dict(errors.most_common())},
        "achieved_per_second": round(len(ok) / elapsed, 2) if elapsed else 0.0,
        "latency_ms": _ms([r["end"] - r["due"] for r in ok]),
        "service_ms": _ms([r["end"] - r["start"] for r in ok]),
        "lag_ms": _ms([r["start"] - r["due"] for r in measured]),
        "windows": windows(records, options.duration),
        "devices": devices, "checks": {}, "failed_cases": failed, "passed": failed == 0,
    }


def _phase(record: dict[str, Any]) -> dict[str, Any]:
    ms = round(1000 * (record["end"] - record["due"]), 1) if "end" in record else None
    if record["error"] is None:
        return {"outcome": "passed", "ms": ms}
    kind = "error" if record["error"].startswith("simulator ") else "failed"
    return {"outcome": kind, "ms": ms, "code": record["error"].split(" ")[-1],
            "message": f"enrollment due at {record['due']:.2f} s: {record['error']}"}


def render_load(report: dict[str, Any]) -> str:
    options, enrollments = report["options"], report["enrollments"]
    latency, lag = report["latency_ms"], report["lag_ms"]
    lines = [
        f"load: {options['rate']:g} enrollments/s for {options['duration']:g} s "
        f"(ramp {options['ramp']:g} s), {options['concurrency']} workers, "
        f"against {report['server']}",
        f"  enrollments  {enrollments['succeeded']}/{enrollments['scheduled']} succeeded, "
        f"achieved {report['achieved_per_second']}/s",
        f"  latency      p50 {latency['p50']} ms  p90 {latency['p90']} ms  p99 "
        f"{latency['p99']} ms  max {latency['max']} ms (from the due time)",
        f"  worker lag   p50 {lag['p50']} ms  p99 {lag['p99']} ms",
        f"  errors       {enrollments['errors_by_code'] or 'none'}",
        "",
        f"  {'t (s)':>6} {'started':>8} {'ok':>5} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for window in report["windows"]:
        lat = window["latency_ms"]
        lines.append(f"  {window['t']:>6g} {window['started']:>8} {window['succeeded']:>5} "
                     f"{window['failed']:>7} {lat['p50'] or '-':>8} {lat['p99'] or '-':>8}")
    lines.append(f"  result: {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)
