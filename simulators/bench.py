"""`enroll-sim bench est`: EST simpleenroll throughput and latency against a real instance,
next to the bare in-process issuance rate of the same kind of CA signer.

One run:
  1. `enroll-server init` a private instance (SoftHSM CA key, SQLite) in a temp dir;
  2. pre-generate N distinct P-256 keys + CSRs, and N one-time tokens inserted in bulk;
  3. measure the bare issuance rate in this process, single-threaded: base64 + parse +
     verify CSR + key policy + build + sign (PKCS#11) + DER; no HTTP, no database;
  4. serve the instance (gunicorn gthread over TLS, rate limit lifted) and run C clients
     spread over P processes, each client on ONE keep-alive TLS connection: a warm-up
     (handshakes, lazy PKCS#11 login, imports), then the measured phase;
  5. stop every process and remove the temp dir, also on Ctrl-C or SIGTERM.

Client processes are spawned (not forked): this process holds a PKCS#11 session, which
a forked child must not inherit (FIELD-NOTES, HSM).
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import os
import secrets
import shutil
import signal
import sqlite3
import ssl
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sdk.est import decode_certs_only

from .bench_report import Progress, machine_info, process_tree_cpu_seconds
from .bench_report import no_progress as _no_progress
from .bench_report import percentile as _percentile
from .bench_report import signals_held as _signals_held
from .bench_rig import ClientPool, Shared
from .served import ServedInstance, ServerProcessError, unthrottled

# From the issue: at 16 clients, HTTPS rate >= 15% of the bare issuance rate, p99 < 50 ms.
TARGET_RATIO = 0.15
TARGET_P99_MS = 50.0
ENROLL_PATH = "/.well-known/est/simpleenroll"
DEVICE_PREFIX = "bench"


@dataclass(frozen=True)
class EstBenchOptions:
    requests: int = 2000
    clients: int = 16
    processes: int = 2
    workers: int = 2
    threads: int = 8
    warmup: int = 100
    bare_seconds: float = 2.0
    timeout: float = 30.0
    keep: bool = False  # keep the instance directory (and server log) for inspection


# -- workload ------------------------------------------------------------------------------

def make_csr_bodies(count: int, progress: Progress = _no_progress) -> list[bytes]:
    """count CSRs for distinct P-256 keys, CN bench-000000..., as EST bodies (RFC 8951)."""
    bodies = []
    for index in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"{DEVICE_PREFIX}-{index:06d}")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(
            key, hashes.SHA256())
        bodies.append(base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)))
        if index % 250 == 0:
            progress(f"generating keys and CSRs {index}/{count}", False)
    progress(f"generated {count} keys and CSRs", True)
    return bodies


def create_tokens(settings: Any, count: int, group_name: str = "default") -> list[str]:
    """count one-time token secrets for group_name, inserted in one transaction (the
    bulk equivalent of Repository.create_token: only SHA-256 of each secret is stored)."""
    from enroll_server.store.db import open_database
    from enroll_server.store.repository import Repository

    tokens = ["et_" + secrets.token_urlsafe(32) for _ in range(count)]
    database = open_database(settings.database.url, settings.instance_dir)
    try:
        Repository(database).create_tokens(
            group_name, tokens, dt.timedelta(seconds=settings.issuance.token_ttl_seconds),
            "operator:bench")
    finally:
        database.close()
    return tokens


# -- the bare issuance rate ----------------------------------------------------------------

def bare_issuance_rate(settings: Any, bodies: list[bytes], seconds: float) -> dict[str, Any]:
    """Issuances per second of the signing path alone, single-threaded, with a signer
    built exactly as the server builds its own (services.load_signer: PKCS#11 here)."""
    from enroll_server.ca.profiles import KEY_TYPES, CertProfile, revocation_urls
    from enroll_server.policy.csr import KeyPolicy, decode_est_base64, vet_csr
    from enroll_server.services import load_signer

    signer = load_signer(settings)  # exports SOFTHSM2_CONF before the module loads
    policy = KeyPolicy(KEY_TYPES)
    urls = revocation_urls(settings.server.public_url)
    lifetime = dt.timedelta(days=365)
    backdate = dt.timedelta(seconds=settings.issuance.backdate_seconds)

    def issue_one(body: bytes) -> bytes:
        csr = vet_csr(decode_est_base64(body), policy)  # what every issuing path runs
        profile = CertProfile(device_id=csr.common_name or "bench",
                              group="default", lifetime=lifetime, backdate=backdate, **urls)
        certificate = signer.issue(csr.csr.public_key(), profile)
        return certificate.public_bytes(serialization.Encoding.DER)

    for body in bodies[:50]:  # warm-up: C_Login + self-test, caches
        issue_one(body)
    count = 0
    cpu_start, start = time.process_time(), time.perf_counter()
    deadline = start + seconds
    while True:
        issue_one(bodies[count % len(bodies)])
        count += 1
        if count % 32 == 0 and time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return {"issuances": count, "seconds": round(elapsed, 3),
            "issuances_per_second": round(count / elapsed, 1),
            "cpu_ms_per_issuance": round(1000 * cpu / count, 3),
            "signer": type(signer.private_key).__name__}


# -- load clients (run in spawned processes) -----------------------------------------------

class _Connection(http.client.HTTPSConnection):
    """One keep-alive TLS connection; counts (re)connects so lost keep-alive shows up."""

    connects = 0

    def connect(self) -> None:
        self.connects += 1
        super().connect()


def _post(connection: _Connection, body: bytes, token: str) -> tuple[str | None, bytes]:
    """POST one simpleenroll; (None, body) on 200, else (error key, b"")."""
    try:
        connection.request("POST", ENROLL_PATH, body=body, headers={
            "Content-Type": "application/pkcs10", "Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        payload = response.read()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()  # reconnects on the next request
        return f"connection {type(exc).__name__}", b""
    if response.status != 200:
        return f"{response.status} {response.getheader('X-Error-Code', '')}".strip(), b""
    return None, payload


def _check_issued(payload: bytes, device_id: str) -> str | None:
    """Warm-up answers are decoded and checked: the benchmark must measure real work."""
    try:
        (certificate,) = decode_certs_only(payload)
        cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    except (ValueError, IndexError) as exc:
        return f"bad response {type(exc).__name__}"
    return None if cn == device_id else "bad response wrong CN"


def client_process(host: str, port: int, trust_anchor: str, threads: int,
                   warmup: list[tuple[int, bytes, str]], work: list[tuple[bytes, str]],
                   timeout: float, shared: Shared) -> None:
    """threads clients, one connection each: warm-up, report ready, wait, then take
    requests from the shared index until the work list is exhausted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    context = ssl.create_default_context(cafile=trust_anchor)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: Counter[str] = Counter()
    warm_errors: Counter[str] = Counter()
    last_done = [0.0] * threads
    connects = [0] * threads
    lock = threading.Lock()
    ready = threading.Barrier(threads + 1)

    def client(slot: int) -> None:
        connection = _Connection(host, port, context=context, timeout=timeout)
        try:
            for device_index, body, token in warmup[slot::threads]:
                error, payload = _post(connection, body, token)
                error = error or _check_issued(payload,
                                               f"{DEVICE_PREFIX}-{device_index:06d}")
                if error:
                    with lock:
                        warm_errors[error] += 1
        except BaseException:
            ready.abort()  # the process fails fast instead of hanging at the barrier
            raise
        ready.wait()
        shared.wait_start()
        mine = latencies[slot]
        for index in shared.take(len(work)):
            body, token = work[index]
            began = time.perf_counter()
            error, _ = _post(connection, body, token)
            mine.append(time.perf_counter() - began)
            last_done[slot] = time.monotonic()
            if error:
                with lock:
                    errors[error] += 1
        connects[slot] = connection.connects
        connection.close()

    pool = [threading.Thread(target=client, args=(slot,), daemon=True)
            for slot in range(threads)]
    for thread in pool:
        thread.start()
    ready.wait()
    shared.ready(os.getpid())
    shared.wait_start()
    cpu_start = sum(os.times()[:2])
    for thread in pool:
        thread.join()
    shared.finished({
        "latencies": [x for slot in latencies for x in slot], "errors": dict(errors),
        "warmup_errors": dict(warm_errors), "last_done": max(last_done),
        "connects": sum(connects), "cpu_seconds": sum(os.times()[:2]) - cpu_start})


# -- the run -------------------------------------------------------------------------------

def _instance_settings(instance: ServedInstance) -> Any:
    from enroll_server.config import load_settings

    return load_settings(instance.config, environ={**os.environ, **instance.env})


def _certificates_recorded(instance: ServedInstance) -> int:
    uri = f"file:{instance.dir / 'enroll.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10) as connection:
        return connection.execute("SELECT COUNT(*) FROM certificate WHERE issued_via = "
                                  "'token'").fetchone()[0]


def run_est_bench(options: EstBenchOptions,
                  progress: Progress = _no_progress) -> dict[str, Any]:
    """Run the whole benchmark once; returns the report (see docs/performance.md)."""
    if options.requests < 1 or options.clients < 1:
        raise ValueError("requests and clients must be at least 1")
    clients = options.clients
    processes = max(1, min(options.processes, clients))
    warmup = max(options.warmup, clients)  # every connection handshakes before the clock
    tmp = Path(tempfile.mkdtemp(prefix="enroll-bench-"))
    instance: ServedInstance | None = None
    pool: ClientPool | None = None
    try:
        progress("initialising an instance (root CA, SoftHSM token, SQLite)", False)
        instance = ServedInstance(directory=tmp / "instance", env=unthrottled(
            workers=str(options.workers), threads=str(options.threads)))
        progress(f"instance ready in {tmp}", True)
        settings = _instance_settings(instance)
        bodies = make_csr_bodies(warmup + options.requests, progress)
        began = time.perf_counter()
        tokens = create_tokens(settings, warmup + options.requests)
        progress(f"created {len(tokens)} one-time tokens in "
                 f"{time.perf_counter() - began:.2f} s (bulk insert)", True)

        progress(f"measuring bare issuance rate ({options.bare_seconds:g} s, 1 thread)",
                 False)
        bare = bare_issuance_rate(settings, bodies, options.bare_seconds)
        progress(f"bare issuance: {bare['issuances_per_second']:.0f}/s", True)

        progress(f"starting gunicorn: {options.workers} workers x {options.threads} "
                 "threads", False)
        instance.start()
        assert instance.process is not None
        master_pid = instance.process.pid
        progress(f"serving {instance.url}", True)

        pool = ClientPool()
        warm_items = [(i, bodies[i], tokens[i]) for i in range(warmup)]
        work = list(zip(bodies[warmup:], tokens[warmup:], strict=True))
        for number in range(processes):
            threads = len(range(number, clients, processes))
            # The warm-up items of this process's clients: slot k gets every threads-th.
            pool.spawn(client_process, "127.0.0.1", instance.port, str(instance.trust_anchor),
                       threads, warm_items[number::processes], work, options.timeout)

        def server_alive() -> None:
            _check_server(instance)

        progress(f"warm-up: {warmup} enrollments over {clients} connections", False)
        pool.wait_ready(server_alive, timeout=120)
        progress("warm-up done", True)

        cpu_before = process_tree_cpu_seconds(master_pid)
        t0 = pool.go()
        reports = pool.collect(options.requests, "enrolling", progress, server_alive)
        elapsed = max(r["last_done"] for r in reports) - t0
        server_cpu = process_tree_cpu_seconds(master_pid) - cpu_before
        progress(f"measured {options.requests} enrollments in {elapsed:.2f} s", True)
        recorded = _certificates_recorded(instance)
    finally:
        with _signals_held():
            if pool is not None:
                pool.close()
            if instance is not None:
                instance.stop()
            if not options.keep:
                shutil.rmtree(tmp, ignore_errors=True)

    return _report(options, processes, warmup, bare, reports, elapsed, server_cpu,
                   recorded, str(tmp) if options.keep else None)


def _check_server(instance: ServedInstance) -> None:
    if not instance.alive():
        raise ServerProcessError("server exited during the benchmark:\n"
                                 + instance.log_text()[-4000:])


def _report(options: EstBenchOptions, processes: int, warmup: int, bare: dict[str, Any],
            reports: list[dict[str, Any]], elapsed: float, server_cpu: float, recorded: int,
            kept_dir: str | None) -> dict[str, Any]:
    latencies = sorted(x for r in reports for x in r["latencies"])
    errors: Counter[str] = Counter()
    warm_errors: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors"])
        warm_errors.update(r["warmup_errors"])
    error_count = sum(errors.values())
    ok = len(latencies) - error_count
    rate = ok / elapsed if elapsed > 0 else 0.0
    ratio = rate / bare["issuances_per_second"]
    p99_ms = 1000 * _percentile(latencies, 0.99)
    per_ok = max(ok, 1)
    return {
        "benchmark": "est.simpleenroll",
        "machine": machine_info(),
        "settings": {**asdict(options), "processes": processes, "warmup": warmup,
                     "ca_backend": "pkcs11 (SoftHSM)", "database": "sqlite (WAL)",
                     "server": "gunicorn gthread over TLS"},
        "https": {
            "requests": len(latencies), "enrollments": ok, "seconds": round(elapsed, 3),
            "enrollments_per_second": round(rate, 1),
            "latency_ms": {name: round(1000 * _percentile(latencies, q), 2)
                           for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))}
            | {"max": round(1000 * latencies[-1], 2) if latencies else None,
               "mean": round(1000 * statistics.fmean(latencies), 2) if latencies else None},
            "errors": error_count, "errors_by_code": dict(errors.most_common()),
            "warmup_errors": dict(warm_errors),
            "connections": sum(r["connects"] for r in reports),
            "server_cpu_ms_per_enrollment": round(1000 * server_cpu / per_ok, 3),
            "server_cpu_utilisation": round(server_cpu / elapsed / (os.cpu_count() or 1), 3)
            if elapsed > 0 else None,
            "client_cpu_ms_per_enrollment": round(
                1000 * sum(r["cpu_seconds"] for r in reports) / per_ok, 3),
            "certificates_recorded": recorded,
        },
        "bare": bare,
        "ratio": round(ratio, 4),
        "targets": {"ratio_min": TARGET_RATIO, "p99_ms_max": TARGET_P99_MS,
                    "ratio_met": ratio >= TARGET_RATIO, "p99_met": p99_ms < TARGET_P99_MS,
                    "applies_at_clients": 16},
        "kept_instance_dir": kept_dir,
    }
