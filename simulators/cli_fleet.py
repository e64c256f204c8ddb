"""`enroll-sim fleet` and `enroll-sim manufacturer` (registered by simulators.cli)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .cli_common import keep_option, progress_printer, report_options

FLEET_EPILOG = """\b
Examples:
  enroll-sim fleet --devices 20
  enroll-sim fleet --devices 1000 --concurrency 6 --json > fleet.json
  enroll-sim fleet --devices 20 --chaos broker,server,relay --rogue 1 --tampered 1 --flaky 1
\b
  # against a staging deployment (its operator added M/root.pem to group "ci" once):
  enroll-sim manufacturer init --dir M
  enroll-sim fleet --server https://est.staging:8443 --server-ca ca-chain.pem \\
      --group ci --manufacturer M --devices 10 --seed 1 --junit fleet.xml \\
      --operator-token-file operator.token \\
      --broker mqtts://mqtt.staging:8883 --broker-ca ca-chain.pem
\b
  # load: 5 enrollments/s for 60 s after a 10 s ramp, with a plot
  enroll-sim fleet --rate 5 --duration 60 --ramp 10 --concurrency 8 --plot load.png
\b
Exit status: 0 every device phase and fleet check passed; 1 something failed (the
report, and --junit, say which device, phase and refusal code); 2 the run could not
start (bad option, server unreachable, no manufacturer). The operator credential can
also come from $ENROLL_OPERATOR_TOKEN."""


def _broker(_ctx: click.Context, _param: click.Parameter,
            value: str | None) -> tuple[str, int] | None:
    from .deployment import parse_broker

    if value is None:
        return None
    try:
        return parse_broker(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error


@click.command(epilog=FLEET_EPILOG)
@click.option("--devices", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(min=1),
              help="Device worker processes.")
@click.option("--revoke-fraction", default=0.1, show_default=True,
              type=click.FloatRange(0, 1),
              help="Share of enrolled devices revoked (at least one when above 0).")
@click.option("--chaos", default="", help="Comma-separated: broker, server, relay "
                                          "(private instance only).")
@click.option("--chaos-interval", default=4.0, show_default=True,
              type=click.FloatRange(min=0.2), help="Seconds between chaos events (jittered).")
@click.option("--rogue", default=0, show_default=True, type=click.IntRange(min=0),
              help="Extra devices whose TPM comes from an unknown manufacturer.")
@click.option("--tampered", default=0, show_default=True, type=click.IntRange(min=0),
              help="Extra devices booting firmware off the group's PCR policy.")
@click.option("--flaky", default=0, show_default=True, type=click.IntRange(min=0),
              help="Extra devices whose network drops mid-enrollment.")
@click.option("--seed", type=int, help="Random seed: roles, the revoked share, chaos order, "
                                       "the same test case names.")
@click.option("--server", help="An existing deployment's URL, e.g. https://est:8443 "
                               "(default: start a private instance).")
@click.option("--server-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The server's trust anchor (its ca-chain.pem).")
@click.option("--group", help="Enrollment group (TPM attestation) [default: fleet].")
@click.option("--manufacturer", type=click.Path(file_okay=False, path_type=Path),
              help="A simulated TPM manufacturer made by `enroll-sim manufacturer init`.")
@click.option("--operator-token-file", type=click.Path(exists=True, dir_okay=False,
                                                       path_type=Path),
              help="The operator credential: revoke a share through the operator API.")
@click.option("--broker", callback=_broker,
              help="MQTT broker mqtts://HOST:PORT: revoked devices must get their notice.")
@click.option("--broker-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The broker's trust anchor [default: the server's].")
@click.option("--firmware", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Firmware image measured into PCR 13 before the first boot.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path),
              help="Write JUnit XML: a test case per device and phase.")
@click.option("--rate", type=click.FloatRange(min=0.01),
              help="Load mode: start this many enrollments per second.")
@click.option("--duration", default=30.0, show_default=True, type=click.FloatRange(min=1),
              help="Load mode: seconds of load.")
@click.option("--ramp", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Load mode: seconds to ramp linearly up to --rate.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Load mode: draw latency and errors over time (.png or .svg).")
@keep_option
@report_options
def fleet(**options: Any) -> None:
    """N swtpm devices through first boot, renewal and revocation, concurrently.

    Each device: swtpm + EK certificates from a simulated manufacturer, firmware measured
    into PCR 13, attested first-boot enrollment, an attested renewal; then a share of the
    fleet is revoked, and each revoked device must learn it from a verified notice and be
    refused when it boots again. Without --server the fleet starts its own instance,
    broker and relay (and can --chaos them); with --server it uses only that deployment's
    public and operator APIs. Ends with a report (table, --json, --junit) and removes
    every process it started.
    """
    from .fleet import FleetSetupError, render, run_fleet

    quiet, as_json, junit = options["quiet"], options["as_json"], options["junit"]
    try:
        fleet_options = _fleet_options(options)
        report = run_fleet(fleet_options, progress=progress_printer(quiet))
    except FleetSetupError as error:
        if junit is not None:
            _setup_error_junit(junit, str(error))
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    if junit is not None:
        from .fleet_junit import write_junit

        write_junit(report, junit)
    if options["plot"] is not None and report.get("benchmark") == "fleet.load":
        from .fleet_plot import plot_load

        plot_load(report, options["plot"])
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif report.get("benchmark") == "fleet.load":
        from .fleet_load import render_load

        click.echo(render_load(report))
    else:
        click.echo(render(report))
    if not report["passed"]:
        sys.exit(1)


def _fleet_options(options: dict[str, Any]) -> Any:
    from .deployment import Deployment
    from .fleet import CHAOS_KINDS, GROUP, FleetOptions, FleetSetupError

    kinds = tuple(k.strip() for k in options["chaos"].split(",") if k.strip())
    if set(kinds) - set(CHAOS_KINDS):
        raise click.BadParameter(f"choose from {', '.join(CHAOS_KINDS)}", param_hint="--chaos")
    if options["plot"] is not None:
        if options["rate"] is None:
            raise click.BadParameter("needs --rate (the load mode)", param_hint="--plot")
        if options["plot"].suffix.lower() not in (".png", ".svg"):
            raise click.BadParameter("a .png or .svg file", param_hint="--plot")
    token_file = options["operator_token_file"]
    token = (token_file.read_text().strip() if token_file
             else os.environ.get("ENROLL_OPERATOR_TOKEN") or None)
    deployment = None
    if options["server"]:
        if options["server_ca"] is None:
            raise click.BadParameter("--server needs --server-ca (the server's trust "
                                     "anchor, its ca-chain.pem)", param_hint="--server-ca")
        if options["group"] is None:
            raise click.BadParameter("--server needs --group (a TPM group whose EK roots "
                                     "include the manufacturer's root.pem)",
                                     param_hint="--group")
        deployment = Deployment(options["server"], options["server_ca"], options["group"],
                                token, options["broker"], options["broker_ca"])
    else:
        for name in ("server_ca", "operator_token_file", "broker", "broker_ca", "firmware"):
            if options[name] is not None:
                raise FleetSetupError(f"--{name.replace('_', '-')} needs --server (a private "
                                      "instance brings its own)")
        if options["group"] not in (None, GROUP):
            raise FleetSetupError(f"a private instance's group is {GROUP!r}; --group is for "
                                  "--server")
    firmware = options["firmware"].read_bytes() if options["firmware"] else None
    return FleetOptions(
        devices=options["devices"], concurrency=options["concurrency"],
        revoke_fraction=options["revoke_fraction"], chaos=kinds,
        chaos_interval=options["chaos_interval"], seed=options["seed"],
        rogue=options["rogue"], tampered=options["tampered"], flaky=options["flaky"],
        keep=options["keep"], deployment=deployment, manufacturer=options["manufacturer"],
        firmware=firmware, rate=options["rate"], duration=options["duration"],
        ramp=options["ramp"])


def _setup_error_junit(path: Path, message: str) -> None:
    """A JUnit file with one error case, so that CI shows why nothing ran."""
    from .fleet_junit import write_junit

    write_junit({"devices": [], "checks": {}, "setup_error": message}, path)


@click.group(epilog="""\b
Examples:
  enroll-sim manufacturer init --dir ./tpm-vendor
  enroll-server group create ci --auth tpm --ek-roots ./tpm-vendor/root.pem
  enroll-sim fleet --server URL --server-ca ca.pem --group ci --manufacturer ./tpm-vendor
""")
def manufacturer() -> None:
    """A persistent simulated TPM manufacturer (EK CA) for fleets against a deployment."""


@manufacturer.command("init")
@click.option("--dir", "directory", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the manufacturer's CA certificates and keys go (created).")
@click.option("--name", default="Simulated TPM Vendor", show_default=True,
              help="Organisation name in its CA certificates.")
def manufacturer_init(directory: Path, name: str) -> None:
    """Create a simulated TPM manufacturer: a root CA and an EK issuing CA.

    Writes DIR/root.pem: the certificates an enrollment group trusts for this
    manufacturer's TPMs (the root and its EK issuing CA); give it to the operator once
    (`enroll-server group create G --auth tpm --ek-roots DIR/root.pem`). The private keys
    stay in DIR (test material, never a real CA). An existing manufacturer is never
    overwritten.
    """
    from .manufacturer import Manufacturer

    if (directory / Manufacturer.EK_CA_KEY).exists() or (directory / "root.pem").exists():
        raise click.ClickException(f"{directory} already holds a manufacturer; use it as "
                                   "it is (--manufacturer), or pick another --dir")
    maker = Manufacturer.create(directory, name)
    bundle = directory / "root.pem"
    ek_ca, root = maker.ca_certificate_pems
    bundle.write_text(root + ek_ca)
    click.echo(f"manufacturer {name!r} in {directory}\n"
               f"  trust anchors for the group: {bundle}\n"
               f"  next: enroll-server group create <group> --auth tpm --ek-roots {bundle}")
