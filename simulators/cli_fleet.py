"""`enroll-sim bench revoke` and `enroll-sim fleet` (registered on import by cli.py)."""

from __future__ import annotations

import json
import sys

import click

from .cli import _progress_printer, bench, main


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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
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
                              progress=_progress_printer(quiet))
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
    if report["latency"]["missing"]:
        sys.exit(1)


@main.command(epilog="""\b
Examples:
  enroll-sim fleet --devices 20
  enroll-sim fleet --devices 1000 --concurrency 6 --json > fleet.json
  enroll-sim fleet --devices 20 --chaos broker,server,relay --rogue 1 --tampered 1 --flaky 1
\b
Exit status 0 when every invariant holds (see the report), 1 otherwise.""")
@click.option("--devices", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(min=1),
              help="Device worker processes.")
@click.option("--revoke-fraction", default=0.1, show_default=True,
              type=click.FloatRange(0, 1), help="Share of enrolled devices revoked.")
@click.option("--chaos", default="", help="Comma-separated: broker, server, relay.")
@click.option("--chaos-interval", default=4.0, show_default=True,
              type=click.FloatRange(min=0.2), help="Seconds between chaos events (jittered).")
@click.option("--rogue", default=0, show_default=True, type=click.IntRange(min=0),
              help="Extra devices whose TPM comes from an unknown manufacturer.")
@click.option("--tampered", default=0, show_default=True, type=click.IntRange(min=0),
              help="Extra devices booting firmware off the group's PCR policy.")
@click.option("--flaky", default=0, show_default=True, type=click.IntRange(min=0),
              help="Extra devices whose network drops mid-enrollment.")
@click.option("--seed", type=int, help="Random seed (which devices are revoked, chaos order).")
@click.option("--keep", is_flag=True, help="Keep the work directory (logs, TPM states).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def fleet(devices: int, concurrency: int, revoke_fraction: float, chaos: str,
          chaos_interval: float, rogue: int, tampered: int, flaky: int, seed: int | None,
          keep: bool, as_json: bool, quiet: bool) -> None:
    """N swtpm devices through first boot, renewal and revocation, concurrently.

    Each device: swtpm + factory EK certificates, firmware measured into PCR 13, attested
    first-boot enrollment, an attested renewal; then a share of the fleet is revoked and
    a gateway on the fleet revocation topic must receive a verified notice for each.
    Ends with a report (table, or --json) and removes every process it started.
    """
    from .fleet import CHAOS_KINDS, FleetOptions, render, run_fleet

    kinds = tuple(k.strip() for k in chaos.split(",") if k.strip())
    if set(kinds) - set(CHAOS_KINDS):
        raise click.BadParameter(f"choose from {', '.join(CHAOS_KINDS)}", param_hint="--chaos")
    options = FleetOptions(devices=devices, concurrency=concurrency,
                           revoke_fraction=revoke_fraction, chaos=kinds,
                           chaos_interval=chaos_interval, seed=seed, rogue=rogue,
                           tampered=tampered, flaky=flaky, keep=keep)
    report = run_fleet(options, progress=_progress_printer(quiet))
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
    if not report["passed"]:
        sys.exit(1)
