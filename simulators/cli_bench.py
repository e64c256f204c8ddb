"""`enroll-sim bench est|attest|revoke`: the benchmarks, each against its own freshly
initialised, served instance (registered on the root group by simulators.cli)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .cli_common import count, mark, progress_printer, report_options, server_options

BENCH_EST_EPILOG = """\b
Examples:
  enroll-sim bench est                          # 2000 enrollments, 16 clients
  enroll-sim bench est --clients 1              # latency of one device at a time
  enroll-sim bench est --workers 4 --threads 4  # another gunicorn layout
  enroll-sim bench est --requests 60 --clients 4 --json

\b
Targets (16 clients): HTTPS rate >= 0.15 x bare issuance rate, p99 < 50 ms.
Exit status 1 when any measured request failed (the numbers are then not valid).
"""


@click.group(epilog="""\b
Examples:
  enroll-sim bench est
  enroll-sim bench est --clients 4 --requests 500 --json > est-bench.json
  enroll-sim bench attest --devices 50 --concurrency 1
  enroll-sim bench revoke --agents 200 --revocations 100
""")
def bench() -> None:
    """Benchmarks, each against its own freshly initialised, served instance."""


@bench.command("est", epilog=BENCH_EST_EPILOG)
@click.option("--requests", "requests_", default=2000, show_default=True,
              type=click.IntRange(min=1), help="Measured enrollments (after the warm-up).")
@click.option("--clients", default=16, show_default=True, type=click.IntRange(min=1),
              help="Concurrent clients, each on one keep-alive TLS connection.")
@click.option("--processes", default=2, show_default=True, type=click.IntRange(min=1),
              help="Client processes the clients are spread over (GIL).")
@click.option("--warmup", default=100, show_default=True, type=click.IntRange(min=0),
              help="Unmeasured enrollments first (at least one per client).")
@click.option("--bare-seconds", default=2.0, show_default=True,
              type=click.FloatRange(min=0.1), help="Duration of the bare issuance measure.")
@server_options
@report_options
def est(requests_: int, clients: int, processes: int, workers: int, threads: int,
        warmup: int, bare_seconds: float, keep: bool, as_json: bool, quiet: bool) -> None:
    """EST simpleenroll throughput and latency over HTTPS, against the bare issuance rate.

    Initialises a private instance (SoftHSM CA key, SQLite) in a temp dir, creates the
    CSRs and one-time tokens up front, measures the in-process issuance rate of the same
    PKCS#11 signer (one thread), then serves the instance and enrolls with concurrent
    clients. Everything is stopped and removed at the end, also on Ctrl-C.
    """
    from .bench import EstBenchOptions, run_est_bench

    options = EstBenchOptions(requests=requests_, clients=clients, processes=processes,
                              workers=workers, threads=threads, warmup=warmup,
                              bare_seconds=bare_seconds, keep=keep)
    report = run_est_bench(options, progress=progress_printer(quiet))
    click.echo(json.dumps(report, indent=2) if as_json else format_est_report(report))
    if report["https"]["errors"]:
        sys.exit(1)


BENCH_ATTEST_EPILOG = """\b
Examples:
  enroll-sim bench attest                       # 50 swtpm devices, 4 at a time
  enroll-sim bench attest --concurrency 1       # one device at a time: pure latency
  enroll-sim bench attest --devices 200 --concurrency 8 --workers 2 --threads 8
  enroll-sim bench attest --devices 3 --concurrency 2 --json > attest-bench.json

\b
Targets: server CPU < 3 ms per attested enrollment; device p50 < 300 ms on swtpm.
Exit status 1 when any measured enrollment failed (the numbers are then not valid).
"""


@bench.command("attest", epilog=BENCH_ATTEST_EPILOG)
@click.option("--devices", default=50, show_default=True, type=click.IntRange(min=1),
              help="Measured devices (swtpm), each enrolling once (after the warm-up).")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(min=1),
              help="Client processes enrolling at the same time, one device each.")
@click.option("--warmup", default=4, show_default=True, type=click.IntRange(min=0),
              help="Extra devices enrolled first, unmeasured (at least one per client).")
@server_options
@report_options
def attest(devices: int, concurrency: int, warmup: int, workers: int, threads: int,
           keep: bool, as_json: bool, quiet: bool) -> None:
    """TPM-attested enrollment of swtpm devices through the device SDK, end to end.

    Initialises a private instance (SoftHSM CA key, SQLite), a test TPM manufacturer and
    a group that trusts it; starts and provisions one swtpm per device (EK certificates
    in NV; timed separately); then serves the instance and enrolls every device through
    device_sdk.attest.AttestedEnrollment from concurrent client processes. Reports the
    device's wall time per enrollment and where it goes (TPM, HTTPS, the rest), and the
    server's own CPU per enrollment from /proc. Every swtpm and server process and the
    temp dir are removed at the end, also on Ctrl-C.
    """
    from .bench_attest import AttestBenchOptions, format_attest_report, run_attest_bench

    options = AttestBenchOptions(devices=devices, concurrency=concurrency, warmup=warmup,
                                 workers=workers, threads=threads, keep=keep)
    report = run_attest_bench(options, progress=progress_printer(quiet))
    click.echo(json.dumps(report, indent=2) if as_json else format_attest_report(report))
    if report["enrollments"]["failed"]:
        sys.exit(1)


@bench.command("revoke", epilog="""\b
Examples:
  enroll-sim bench revoke                          # 200 agents, a burst of 100
  enroll-sim bench revoke --agents 50 --revocations 20 --json
\b
Targets: revoke call -> verified notice at the device p99 < 500 ms (100 revocations,
200 agents); CRL with 100,000 entries built in < 2 s; OCSP >= 5,000 responses/s.""")
@click.option("--agents", default=200, show_default=True, type=click.IntRange(min=1),
              help="Devices enrolled and connected to the broker as agents.")
@click.option("--revocations", default=100, show_default=True, type=click.IntRange(min=1),
              help="How many of them are revoked in one burst.")
@click.option("--crl-entries", default=100_000, show_default=True,
              type=click.IntRange(min=1))
@click.option("--ocsp-seconds", default=5.0, show_default=True,
              type=click.FloatRange(min=0.5))
@click.option("--ocsp-clients", default=4, show_default=True, type=click.IntRange(min=1))
@report_options
def revoke(agents: int, revocations: int, crl_entries: int, ocsp_seconds: float,
           ocsp_clients: int, as_json: bool, quiet: bool) -> None:
    """Revocation latency to connected devices, CRL build time, OCSP throughput.

    A private instance, broker and relay; AGENTS devices enrolled over EST and connected
    over mTLS, each verifying the signed notices it gets; a burst of REVOCATIONS through
    the operator API, timed from each call to the verified notice at its device.
    """
    from .bench_revoke import render, run_revoke_bench

    if revocations > agents:
        raise click.BadParameter("at most --agents", param_hint="--revocations")
    report = run_revoke_bench(agents, revocations, crl_entries, ocsp_seconds, ocsp_clients,
                              progress=progress_printer(quiet))
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
    if report["latency"]["missing"]:
        sys.exit(1)


def format_est_report(report: dict[str, Any]) -> str:
    machine, settings, https = report["machine"], report["settings"], report["https"]
    bare, targets, latency = report["bare"], report["targets"], https["latency_ms"]
    at_target_load = settings["clients"] == targets["applies_at_clients"]

    def target(text: str, met: bool) -> str:
        return f"{text:<10}{mark(met)}" if at_target_load else f"({text})"

    rows = [
        ("HTTPS enrollments/s", f"{https['enrollments_per_second']:.1f}", ""),
        ("latency p50", f"{latency['p50']:.1f} ms", ""),
        ("latency p90", f"{latency['p90']:.1f} ms", ""),
        ("latency p99", f"{latency['p99']:.1f} ms",
         target(f"< {targets['p99_ms_max']:g} ms", targets["p99_met"])),
        ("latency max", f"{latency['max']:.1f} ms", ""),
        ("errors", str(https["errors"]),
         ", ".join(f"{k}: {v}" for k, v in https["errors_by_code"].items())),
        ("bare issuance/s (1 thread)", f"{bare['issuances_per_second']:.0f}", ""),
        ("ratio HTTPS / bare", f"{report['ratio']:.3f}",
         target(f">= {targets['ratio_min']:g}", targets["ratio_met"])),
        ("server CPU per enrollment", f"{https['server_cpu_ms_per_enrollment']:.2f} ms",
         f"({100 * (https['server_cpu_utilisation'] or 0):.0f}% of all CPUs)"),
        ("client CPU per enrollment", f"{https['client_cpu_ms_per_enrollment']:.2f} ms", ""),
        ("bare CPU per issuance", f"{bare['cpu_ms_per_issuance']:.2f} ms", ""),
    ]
    lines = [
        "EST simpleenroll benchmark",
        f"  machine  {machine['cpus']} CPUs ({machine['cpu_model']}), Python "
        f"{machine['python']}, {machine['openssl']}; load average "
        f"{machine['load_average_1min']} at start",
        f"  server   gunicorn gthread {settings['workers']} workers x {settings['threads']} "
        f"threads over TLS, CA key {settings['ca_backend']}, {settings['database']}",
        f"  load     {count(settings['clients'], 'client')} in "
        f"{count(settings['processes'], 'process')}, one keep-alive connection each "
        f"({https['connections']} TLS connects); "
        f"{https['requests']} measured after {settings['warmup']} warm-up",
        "",
        f"  {'metric':<28}{'value':>12}   target",
    ]
    lines += [f"  {name:<28}{value:>12}   {note}".rstrip() for name, value, note in rows]
    if https["certificates_recorded"] != https["enrollments"] + settings["warmup"]:
        lines.append(f"  note: {https['certificates_recorded']} certificates recorded in "
                     "the database (warm-up included)")
    if report.get("kept_instance_dir"):
        lines.append(f"  instance kept in {report['kept_instance_dir']}")
    return "\n".join(lines)
