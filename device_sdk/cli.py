"""`enroll-device`: the device side of enrollment."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
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
Exit status: 0 enrolled or already enrolled; 3 refused by the server (a 4xx: retrying
will not help, an operator must act; the code says why); 4 TPM error; 75 temporary
failure (server unreachable or busy, approval pending, retries exhausted: try later).
With --json a failure prints {"outcome": "error", "http_status", "code", "message",
"device_id", "retry": true|false} on stdout too.
"""
EXIT_REFUSED, EXIT_TPM, EXIT_TEMPFAIL = 3, 4, 75  # 75: EX_TEMPFAIL (sysexits.h)
TRANSIENT_STATUSES = frozenset({0, 202, 408, 429}) | frozenset(range(500, 600))


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
@click.option("--attempts", default=6, show_default=True, type=click.IntRange(1, 100),
              help="Attempts on connection errors, 429 and 503 before exit 75.")
@click.option("--max-backoff", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Longest wait between attempts, seconds (full jitter below it).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def enroll(server: str, server_ca: Path, tcti: str, state_dir: Path, label: str | None,
           timeout: float, force: bool, attempts: int, max_backoff: float,
           as_json: bool) -> None:
    """Prove this TPM to the server and store a device certificate (TPM-attested EST)."""
    clients: list[AttestedEnrollment] = []  # to name the device in an error
    try:
        _enroll(server, server_ca, tcti, state_dir, label, timeout, force, attempts,
                max_backoff, as_json, clients.append)
    except EstError as error:
        _fail(error, clients[0].device_id if clients else None, as_json)


def _fail(error: EstError, device_id: str | None, as_json: bool) -> None:
    """One line for people and logs, the JSON for scripts, and the exit status."""
    retry = error.status in TRANSIENT_STATUSES or error.code == "client.bad_response"
    if as_json:
        click.echo(json.dumps({"outcome": "error", "http_status": error.status,
                               "code": error.code, "message": error.message,
                               "device_id": device_id, "retry": retry}))
    who = f" (device {device_id})" if device_id else ""
    click.echo(f"error: {error}{who}", err=True)
    sys.exit(EXIT_TEMPFAIL if retry else EXIT_REFUSED)


def _enroll(server: str, server_ca: Path, tcti: str, state_dir: Path, label: str | None,
            timeout: float, force: bool, attempts: int, max_backoff: float, as_json: bool,
            remember: Callable[[AttestedEnrollment], None]) -> None:
    state = DeviceState(state_dir)
    with TpmDevice(tcti) as tpm:
        _, device_key_public = tpm.device_key()
        public_area = TPM2B_PUBLIC.unmarshal(device_key_public)[0].publicArea
        device_key = serialization.load_der_public_key(public_area.to_der())
        status = None if force else state.status()
        if status is not None and state.current_certificate(device_key) is not None:
            _report("already-enrolled", status, state, as_json)
            return
        with AttestedEnrollment(server, server_ca, tpm, label, timeout, attempts=attempts,
                                max_backoff=max_backoff) as client:
            remember(client)
            certificate = client.enroll()
            chain = client.cacerts()
        status = state.save(certificate, chain, tpm.tss2_private_key_pem(), group=label)
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


AGENT_EPILOG = """\b
Examples:
  # on a device, as a service (kernel resource manager, broker on port 8883):
  enroll-device agent --state-dir /var/lib/enroll-device --tcti device:/dev/tpmrm0 \\
      --server https://est.example.net:8443 --server-ca ca-chain.pem \\
      --broker mqtt.example.net:8883
  # from a timer instead: handle what is waiting, renew if due, exit
  enroll-device agent --state-dir ./state --tcti device:/dev/tpmrm0 --server URL \\
      --server-ca ca.pem --broker mqtt.example.net:8883 --once --json
  # tests: swtpm behind tpm2-abrmd on a private D-Bus (simulators.abrmd)
  DBUS_SESSION_BUS_ADDRESS=unix:path=/tmp/x/bus enroll-device agent --state-dir ./state \\
      --tcti tabrmd:bus_type=session --server https://localhost:8443 --server-ca ca.pem \\
      --broker localhost:8883 --renew-jitter 1 --max-backoff 2 --json

\b
Listens on fleet/<group>/devices/<device id>/notices with the TPM-held key (mTLS, TLS
1.3, tpm2-openssl provider), verifies every notice (signed under the CA in chain.pem,
for this device, unexpired, newer than the last one) and ignores the others with a log
line naming the reason. renewal_due and ca_rotation renew the certificate (same TPM key,
EST simplereenroll over mTLS; a fresh attested enrollment when it has expired) after a
random jitter; so does reaching --renew-fraction of the lifetime. A revocation of the
current certificate moves it aside, writes state "revoked" to status.json, publishes a
status message and exits 10.

\b
Exit status:
   0  stopped by SIGTERM/SIGINT, or --once finished
   3  the server refused renewal and a fresh attested enrollment
   4  TPM error (or the tpm2 OpenSSL provider could not use the key)
   5  not enrolled: no certificate, chain or key in --state-dir
   6  --once only: the broker could not be reached
  10  REVOKED: this device's certificate was revoked (status.json has reason and time);
      do not restart the agent, re-provisioning needs an operator
"""


def _broker_address(_ctx: click.Context, _param: click.Parameter,
                    value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter("expected HOST:PORT, e.g. mqtt.example.net:8883")
    return host.strip("[]"), int(port)


@main.command(epilog=AGENT_EPILOG)
@click.option("--state-dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The enrollment state dir (from `enroll-device enroll`).")
@click.option("--tcti", required=True,
              help='TPM resource manager: "device:/dev/tpmrm0", "tabrmd:bus_type=session".')
@click.option("--server", required=True, help="Server base URL, e.g. https://host:8443.")
@click.option("--server-ca", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The server's trust anchor (RFC 7030 3.6.1 explicit TA).")
@click.option("--broker", required=True, callback=_broker_address,
              help="MQTT broker HOST:PORT (TLS).")
@click.option("--broker-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Trust anchor for the broker [default: chain.pem in the state dir].")
@click.option("--group", help="Enrollment group in the topic [default: the one enrolled "
                              "under, else \"default\"].")
@click.option("--topic-prefix", default="fleet", show_default=True)
@click.option("--once", is_flag=True,
              help="Handle waiting notices (and a due renewal), then exit.")
@click.option("--renew-jitter", default=300.0, show_default=True,
              type=click.FloatRange(min=0), help="Renew after a random 0..N s delay.")
@click.option("--renew-fraction", default=2 / 3, show_default=True,
              type=click.FloatRange(0.1, 0.95), help="Renew unprompted past this share of "
                                                     "the certificate lifetime.")
@click.option("--max-backoff", default=60.0, show_default=True,
              type=click.FloatRange(min=0.1), help="Longest wait between broker reconnects.")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds per network exchange (real TPMs are slow; keep it generous).")
@click.option("--json", "as_json", is_flag=True, help="Log events as JSON lines on stdout.")
def agent(state_dir: Path, tcti: str, server: str, server_ca: Path,
          broker: tuple[str, int], broker_ca: Path | None, group: str | None,
          topic_prefix: str, once: bool, renew_jitter: float, renew_fraction: float,
          max_backoff: float, timeout: float, as_json: bool) -> None:
    """Keep this device's certificate alive: signed notices over MQTT, renewal, revocation."""
    from .agent import AgentConfig, run_agent

    config = AgentConfig(state_dir=state_dir, tcti=tcti, server=server, server_ca=server_ca,
                         broker_host=broker[0], broker_port=broker[1], group=group,
                         broker_ca=broker_ca, topic_prefix=topic_prefix, once=once,
                         renew_jitter=renew_jitter, renew_fraction=renew_fraction,
                         max_backoff=max_backoff, timeout=timeout)
    sys.exit(run_agent(config, as_json))


def run() -> None:
    try:
        main(standalone_mode=True)
    except EstError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(3)
    except TpmError as error:
        click.echo(f"error: TPM: {error}", err=True)
        sys.exit(4)
