"""`enroll-device`: the device side of enrollment."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from .est import EstClient, EstError

EPILOG = """\b
Examples:
  enroll-device cacerts --server https://est.example.net:8443 --server-ca ca-chain.pem
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Enroll this device with an enrollment server over EST (RFC 7030)."""


@main.command()
@click.option("--server", required=True, help="Server base URL, e.g. https://host:8443.")
@click.option("--server-ca", required=True, type=click.Path(exists=True, path_type=Path),
              help="The server's trust anchor (RFC 7030 3.6.1 explicit TA).")
@click.option("--group", "label", help="EST label (enrollment group).")
def cacerts(server: str, server_ca: Path, label: str | None) -> None:
    """Print the CA certificates (EST /cacerts) as PEM."""
    with EstClient(server, server_ca, label) as client:
        for certificate in client.cacerts():
            click.echo(certificate.public_bytes(serialization.Encoding.PEM).decode(), nl=False)


def run() -> None:
    try:
        main(standalone_mode=True)
    except EstError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(3)
