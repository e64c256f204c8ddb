"""`enroll-device`: the device side of enrollment."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import TPM2B_PUBLIC

from .attest import AttestedEnrollment
from .est import EstClient, EstError
from .state import DeviceState, EnrollmentStatus
from .tpm import TpmDevice, TpmError

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


ENROLL_EPILOG = """\b
Examples:
  # first boot on a device (kernel resource manager):
  enroll-device enroll --server https://est.example.net:8443 --server-ca ca-chain.pem \\
      --tcti device:/dev/tpmrm0 --state-dir /var/lib/enroll-device
  # a software TPM, enrollment group "lab", machine-readable result:
  enroll-device enroll --server https://localhost:8443 --server-ca ca.pem \\
      --tcti swtpm:port=2321 --state-dir ./state --group lab --json

\b
Running it again is harmless: with a valid, unexpired certificate for the TPM's current
device key in --state-dir it reports that and exits 0 (--force enrolls anyway).
Exit status: 0 enrolled or already enrolled, 3 refused by the server, 4 TPM error.
"""


@main.command(epilog=ENROLL_EPILOG)
@click.option("--server", required=True, help="Server base URL, e.g. https://host:8443.")
@click.option("--server-ca", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The server's trust anchor (RFC 7030 3.6.1 explicit TA).")
@click.option("--tcti", required=True,
              help='TPM connection: "device:/dev/tpmrm0", "swtpm:port=2321", "tabrmd:".')
@click.option("--state-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the certificate, chain, TSS2 key file and status.json live.")
@click.option("--group", "label", help="EST label (enrollment group).")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds per HTTP exchange (real TPMs are slow; keep it generous).")
@click.option("--force", is_flag=True, help="Enroll even if a valid certificate is present.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def enroll(server: str, server_ca: Path, tcti: str, state_dir: Path, label: str | None,
           timeout: float, force: bool, as_json: bool) -> None:
    """Prove this TPM to the server and store a device certificate (TPM-attested EST)."""
    state = DeviceState(state_dir)
    with TpmDevice(tcti) as tpm:
        _, device_key_public = tpm.device_key()
        public_area = TPM2B_PUBLIC.unmarshal(device_key_public)[0].publicArea
        device_key = serialization.load_der_public_key(public_area.to_der())
        status = None if force else state.status()
        if status is not None and state.current_certificate(device_key) is not None:
            _report("already-enrolled", status, state, as_json)
            return
        with AttestedEnrollment(server, server_ca, tpm, label, timeout) as client:
            certificate = client.enroll()
            chain = client.cacerts()
        status = state.save(certificate, chain, tpm.tss2_private_key_pem())
    _report("enrolled", status, state, as_json)


def _report(outcome: str, status: EnrollmentStatus, state: DeviceState, as_json: bool) -> None:
    files = {"certificate": str(state.certificate_path), "chain": str(state.chain_path),
             "key": str(state.key_path)}
    if as_json:
        click.echo(json.dumps({"outcome": outcome, **dataclasses.asdict(status), **files}))
        return
    click.echo(f"{outcome}: device {status.device_id}, serial {status.serial}, "
               f"valid until {status.not_after}")
    for name, path in files.items():
        click.echo(f"  {name}: {path}")


def run() -> None:
    try:
        main(standalone_mode=True)
    except EstError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(3)
    except TpmError as error:
        click.echo(f"error: TPM: {error}", err=True)
        sys.exit(4)
