"""`enroll-sim`: simulators and benchmarks that drive a real enrollment service.

The root group; the commands live in simulators.cli_bench (bench est|attest|revoke) and
simulators.cli_fleet (fleet, manufacturer), which import only simulators.cli_common."""

from __future__ import annotations

import signal
import sys

import click

from .cli_bench import bench
from .cli_fleet import fleet, manufacturer

EPILOG = """\b
Examples:
  enroll-sim bench est
  enroll-sim bench est --clients 4 --requests 500
  enroll-sim bench est --json > est-bench.json
  enroll-sim bench attest
  enroll-sim bench attest --devices 50 --concurrency 1
  enroll-sim bench revoke --agents 200 --revocations 100
  enroll-sim fleet --devices 1000 --concurrency 6
  enroll-sim fleet --devices 20 --chaos broker,server,relay
  enroll-sim manufacturer init --dir ./tpm-vendor
  enroll-sim fleet --server https://est.staging:8443 --server-ca ca.pem --group ci \\
      --manufacturer ./tpm-vendor --junit fleet.xml
  enroll-sim fleet --rate 5 --duration 60 --plot load.png
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Simulators and benchmarks for the enrollment service."""


main.add_command(bench)
main.add_command(fleet)
main.add_command(manufacturer)


def run() -> None:
    """Console-script entry point (enroll-sim). SIGTERM cleans up like Ctrl-C."""
    from .served import ServerProcessError

    received = [signal.SIGINT]

    def terminate(signum: int, frame: object) -> None:
        received[0] = signal.Signals(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted; every process was stopped and removed", err=True)
        sys.exit(128 + received[0])
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except ServerProcessError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except RuntimeError as error:  # BenchError, SwtpmError and friends
        click.echo(f"error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
