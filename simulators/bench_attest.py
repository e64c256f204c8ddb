"""`enroll-sim bench attest`: TPM-attested enrollment of swtpm devices, end to end through
the device SDK (device_sdk.attest.AttestedEnrollment), against a real served instance.

One run:
  1. `enroll-server init` a private instance (SoftHSM CA key, SQLite) in a temp dir, a
     test TPM manufacturer (simulators.manufacturer) and a group "fleet" (--auth tpm) that
     trusts its EK roots;
  2. start W + K swtpm processes and factory-provision each (EKs persisted, EK certificates
     in NV): timed and reported on their own, not part of the enrollment numbers;
  3. serve the instance (gunicorn gthread over TLS, rate limit lifted) and spawn C client
     processes. Each enrolls one device at a time, as the device would on its first boot:
     open the TPM, a new TLS connection, challenge (EK + certificate + AK),
     TPM2_ActivateCredential, TPM2_Certify, a CSR signed in the TPM, enroll. The first W
     devices are the warm-up (at least one per client process: imports, TLS, the server
     workers' lazy PKCS#11 login); then the K measured ones from a shared counter;
  4. stop every client, swtpm and server process and remove the temp dir, also on Ctrl-C
     or SIGTERM.

The SDK runs with attempts=1: a 429/503 is counted under its error code instead of being
retried (with backoff) inside the measured time. Each device's ESAPI calls and HTTP
requests are timed in the client (a proxy around the ESAPI object and the httpx client),
which splits the device's wall time into TPM, HTTP and the rest. The report and its text
form: simulators.bench_attest_report.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.x509.oid import NameOID

from device_sdk.attest import AttestedEnrollment
from device_sdk.est import EstError
from device_sdk.tpm import TpmDevice, TpmError

from .bench_attest_report import (  # re-exported: simulators.cli imports format_attest_report
    TARGET_DEVICE_P50_MS,  # noqa: F401
    TARGET_SERVER_CPU_MS,  # noqa: F401
    attest_report,
    format_attest_report,  # noqa: F401
)
from .bench_report import (
    Progress,
    cpu_seconds,
    no_progress,
    percentile,
    process_tree_cpu_seconds,
    progress_bar,
    signals_held,
)
from .bench_rig import ClientPool, Shared
from .served import ServedInstance, ServerProcessError, unthrottled

GROUP = "fleet"


@dataclass(frozen=True)
class AttestBenchOptions:
    devices: int = 50
    concurrency: int = 4
    warmup: int = 4  # at least one per client process
    workers: int = 2
    threads: int = 8
    timeout: float = 60.0
    keep: bool = False  # keep the instance directory (and server log) for inspection


# -- the device side (runs in spawned client processes) --------------------------------------

class _Timer:
    """Seconds per (kind, name) for one enrollment, and how many calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = {"tpm": defaultdict(float),
                                                      "http": defaultdict(float)}
        self.calls: dict[str, dict[str, int]] = {"tpm": defaultdict(int),
                                                 "http": defaultdict(int)}

    def add(self, kind: str, name: str, seconds: float) -> None:
        self.seconds[kind][name] += seconds
        self.calls[kind][name] += 1

    def total(self, kind: str) -> float:
        return sum(self.seconds[kind].values())


class _TimedEsapi:
    """Times every ESAPI call (TSS marshalling + the round trip to the TPM)."""

    def __init__(self, esapi: Any, timer: _Timer) -> None:
        self._esapi, self._timer = esapi, timer

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._esapi, name)
        if not callable(attribute):
            return attribute

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return attribute(*args, **kwargs)
            finally:
                self._timer.add("tpm", name, time.perf_counter() - began)

        return timed


class _TimedTpmDevice(TpmDevice):
    """A TpmDevice whose ESAPI calls are timed (the connect included)."""

    def __init__(self, tcti: str, timer: _Timer) -> None:
        super().__init__(tcti)
        self._timer = timer

    def __enter__(self) -> _TimedTpmDevice:
        began = time.perf_counter()
        super().__enter__()
        self._timer.add("tpm", "connect", time.perf_counter() - began)
        self._esapi = _TimedEsapi(self._esapi, self._timer)  # type: ignore[assignment]
        return self


def _time_http(client: Any, timer: _Timer) -> None:
    request = client.http.request

    def timed(method: str, url: str, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return request(method, url, **kwargs)
        finally:
            timer.add("http", "/".join(url.rsplit("/", 2)[-2:]), time.perf_counter() - began)

    client.http.request = timed


_CAUSE = re.compile(r"EST (\d+) ([\w.\-]+)")


def error_key(error: Exception) -> str:
    """A stable key for a failed enrollment: "<status> <code>", "tpm 0x..", ..."""
    if isinstance(error, EstError):
        if error.code == "client.retries_exhausted":  # attempts=1: what the one attempt got
            cause = _CAUSE.search(error.message)
            if cause:
                return f"{cause.group(1)} {cause.group(2)}"
            transport = re.search(r": (\w+Error|\w+Timeout)\b", error.message)
            return f"connection {transport.group(1)}" if transport else error.code
        return f"{error.status} {error.code}".strip()
    if isinstance(error, TpmError):
        return f"tpm 0x{error.code:x}"
    return type(error).__name__


def enroll_device(url: str, trust_anchor: str, tcti: str, label: str | None,
                  timeout: float) -> dict[str, Any]:
    """One first-boot enrollment, timed; never raises for a refused or failed one."""
    timer = _Timer()
    error = None
    began = time.perf_counter()
    try:
        with _TimedTpmDevice(tcti, timer) as tpm, \
                AttestedEnrollment(url, Path(trust_anchor), tpm, label, timeout,
                                   attempts=1) as client:
            _time_http(client, timer)
            certificate = client.enroll()
            cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            if cn != client.device_id:
                error = "client.wrong_cn"
    except Exception as exc:  # counted by kind: one bad device must not end the run
        error = error_key(exc)
    wall = time.perf_counter() - began
    return {"error": error, "wall": wall, "tpm": timer.total("tpm"),
            "http": timer.total("http"), "finished": time.monotonic(),
            "tpm_calls": {k: (timer.calls["tpm"][k], v) for k, v in timer.seconds["tpm"].items()},
            "http_calls": {k: (timer.calls["http"][k], v)
                           for k, v in timer.seconds["http"].items()}}


def client_process(url: str, trust_anchor: str, label: str, timeout: float,
                   warmup: list[str], work: list[str], shared: Shared) -> None:
    """Warm-up devices, report ready, wait, then enroll devices from the shared index."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    warm_errors = Counter(r["error"] for r in
                          (enroll_device(url, trust_anchor, tcti, label, timeout)
                           for tcti in warmup) if r["error"])
    shared.ready(os.getpid())
    shared.wait_start()
    cpu_start = sum(os.times()[:2])
    records = [enroll_device(url, trust_anchor, work[index], label, timeout)
               for index in shared.take(len(work))]
    shared.finished({"records": records, "warmup_errors": dict(warm_errors),
                     "cpu_seconds": sum(os.times()[:2]) - cpu_start})


# -- the run -----------------------------------------------------------------------------------

def _provision(count: int, directory: Path, manufacturer: Any, tpms: list[Any],
               progress: Progress) -> dict[str, Any]:
    """Start and factory-provision count swtpms (appended to tpms as they start)."""
    from .swtpm import SwtpmInstance

    starts, provisions = [], []
    began = time.perf_counter()
    for index in range(count):
        tpm = SwtpmInstance(directory / f"{index:05d}")
        tpms.append(tpm)
        tpm.start()
        starts.append(tpm.start_seconds)
        step = time.perf_counter()
        manufacturer.provision(tpm.tcti)
        provisions.append(time.perf_counter() - step)
        progress(f"provisioning TPMs {progress_bar(index + 1, count)}", False)
    seconds = time.perf_counter() - began
    progress(f"started and provisioned {count} swtpm TPMs in {seconds:.2f} s", True)

    def summary(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {"p50": round(1000 * percentile(ordered, 0.5), 2),
                "max": round(1000 * ordered[-1], 2)}

    return {"tpms": count, "seconds": round(seconds, 3), "swtpm_start_ms": summary(starts),
            "provision_ms": summary(provisions),
            "what": "swtpm start; RSA-2048 + ECC P-256 EKs persisted, their certificates "
                    "signed by the test manufacturer and written to NV"}


def _count_rows(instance: ServedInstance, sql: str) -> int:
    uri = f"file:{instance.dir / 'enroll.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10) as connection:
        return connection.execute(sql).fetchone()[0]


def run_attest_bench(options: AttestBenchOptions,
                     progress: Progress = no_progress) -> dict[str, Any]:
    """Run the whole benchmark once; returns the report (see docs/performance.md)."""
    from .manufacturer import Manufacturer

    if options.devices < 1 or options.concurrency < 1:
        raise ValueError("devices and concurrency must be at least 1")
    processes = min(options.concurrency, options.devices)
    warmup = max(options.warmup, processes)
    tmp = Path(tempfile.mkdtemp(prefix="enroll-bench-attest-"))
    instance: ServedInstance | None = None
    tpms: list[Any] = []
    pool: ClientPool | None = None
    try:
        progress("initialising an instance (root CA, SoftHSM token, SQLite)", False)
        instance = ServedInstance(directory=tmp / "instance", env=unthrottled(
            workers=str(options.workers), threads=str(options.threads)))
        manufacturer = Manufacturer.create(tmp / "manufacturer")
        roots = tmp / "manufacturer" / "ek-roots.pem"
        roots.write_text("".join(manufacturer.ca_certificate_pems))
        instance.cli("group", "create", GROUP, "--auth", "tpm", "--ek-roots", str(roots))
        progress(f"instance ready in {tmp}, group {GROUP!r} trusts the test manufacturer",
                 True)
        provisioning = _provision(warmup + options.devices, tmp / "tpm", manufacturer, tpms,
                                  progress)

        progress(f"starting gunicorn: {options.workers} workers x {options.threads} "
                 "threads", False)
        instance.start()
        assert instance.process is not None
        master_pid = instance.process.pid
        progress(f"serving {instance.url}", True)

        pool = ClientPool()  # spawned: never fork a process holding TPM/TLS state
        tctis = [tpm.tcti for tpm in tpms]
        warm, work = tctis[:warmup], tctis[warmup:]
        for number in range(processes):
            pool.spawn(client_process, instance.url, str(instance.trust_anchor), GROUP,
                       options.timeout, warm[number::processes], work)

        def server_alive() -> None:
            _check_server(instance)

        progress(f"warm-up: {warmup} devices over {processes} client processes", False)
        pool.wait_ready(server_alive, timeout=300)
        progress(f"warm-up done ({warmup} devices)", True)

        swtpm_pids = [tpm.pid for tpm in tpms[warmup:] if tpm.pid]
        server_before, swtpm_before = (process_tree_cpu_seconds(master_pid),
                                       cpu_seconds(swtpm_pids))
        t0 = pool.go()
        reports = pool.collect(options.devices, "enrolling", progress, server_alive,
                               timeout=120 + options.devices * options.timeout, tick=0.25)
        records = [record for report in reports for record in report["records"]]
        elapsed = max(record["finished"] for record in records) - t0
        server_cpu = process_tree_cpu_seconds(master_pid) - server_before
        swtpm_cpu = cpu_seconds(swtpm_pids) - swtpm_before
        progress(f"enrolled {options.devices} devices in {elapsed:.2f} s", True)
        recorded = {
            "certificates": _count_rows(instance, "SELECT COUNT(*) FROM certificate "
                                                  "WHERE issued_via = 'tpm'"),
            "evidence": _count_rows(instance, "SELECT COUNT(*) FROM attestation_evidence")}
    finally:
        with signals_held():
            if pool is not None:
                pool.close()
            for tpm in tpms:
                tpm.close()
            if instance is not None:
                instance.stop()
            if not options.keep:
                shutil.rmtree(tmp, ignore_errors=True)

    report_options = {**asdict(options), "processes": processes, "warmup": warmup}
    return attest_report(report_options, GROUP, provisioning, reports, records,
                         elapsed, server_cpu, swtpm_cpu, recorded,
                         str(tmp) if options.keep else None)


def _check_server(instance: ServedInstance) -> None:
    if not instance.alive():
        raise ServerProcessError("server exited during the benchmark:\n"
                                 + instance.log_text()[-4000:])
