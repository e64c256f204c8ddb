"""Operator commands for MQTT: the broker's configuration and the outbox relay.

    enroll-server broker-config --dir DIR [--port 8883] [--hostname H ...]
    enroll-server relay
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import tomllib
from pathlib import Path

import click
import tomli_w

from .common import Context, pass_context


@click.command("broker-config", epilog="""\b
Examples:
  enroll-server broker-config --dir ./broker
  mosquitto -c ./broker/mosquitto.conf
  enroll-server relay
\b
Writes mosquitto.conf (TLS listener with require_certificate and use_identity_as_username,
crlfile, per-device ACL, persistence), the broker certificate, the CRL, and the relay's
publisher certificate, and points this instance's [mqtt] settings at them.""")
@click.option("--dir", "directory", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory Mosquitto runs from (created).")
@click.option("--port", default=8883, show_default=True, type=click.IntRange(1, 65535))
@click.option("--bind", default="127.0.0.1", show_default=True)
@click.option("--hostname", "hostnames", multiple=True,
              help="Names in the broker certificate (default: localhost, 127.0.0.1).")
@click.option("--gateway", "gateways", multiple=True,
              help="Certificate CN of a gateway allowed to read fleet revocations.")
@pass_context
def broker_config(ctx: Context, directory: Path, port: int, bind: str,
                  hostnames: tuple[str, ...], gateways: tuple[str, ...]) -> None:
    """Write a Mosquitto configuration that enforces device identities and revocation."""
    from ..notify.broker import write_broker_config
    from ..services import load_authorities

    settings = ctx.settings()
    repository = ctx.repository()
    authorities = load_authorities(settings, repository)
    crls = []
    for signer in authorities.live():  # Mosquitto needs the CRL of every CA it trusts
        latest = repository.latest_crl(signer.name)
        if latest is None:
            raise click.ClickException(f"no CRL of {signer.name} published yet: run "
                                       "`enroll-server crl publish`")
        crls.append(bytes(latest.der))
    files = write_broker_config(
        directory, authorities.active, crls, bind=bind, port=port,
        hostnames=list(hostnames or ("localhost", "127.0.0.1")),
        publisher_dir=settings.instance_dir / "mqtt", topic_prefix=settings.mqtt.topic_prefix,
        gateways=gateways, trusted=[s.ca_certificate for s in authorities.live()]
        + list(authorities.chain))
    config_path = Path(ctx.config)
    document = tomllib.loads(config_path.read_text())
    document["mqtt"] = {**document.get("mqtt", {}), "host": "localhost", "port": port,
                        "ca_file": "ca/ca-chain.pem", "client_cert": str(files.publisher_cert),
                        "client_key": str(files.publisher_key),
                        "broker_crl_file": str(files.crl), "broker_pid_file": str(files.pid_file)}
    config_path.write_text(tomli_w.dumps(document))
    repository.audit(actor="operator", action="broker.config", outcome="success",
                     detail={"dir": str(files.directory), "port": port})
    click.echo(f"Broker configuration written to {files.directory}")
    click.echo(f"  start it:   mosquitto -c {files.config}")
    click.echo("  then:       enroll-server relay   (publishes notices, keeps the CRL current)")


@click.command(epilog="""\b
Examples:
  enroll-server --config ./instance/config.toml relay
\b
Runs until SIGINT/SIGTERM. Several relays may run against one PostgreSQL database.""")
@click.option("--batch", default=200, show_default=True, type=click.IntRange(1, 10000))
@pass_context
def relay(ctx: Context, batch: int) -> None:
    """Publish queued notices to the broker; renewals, CRLs of every CA, broker CRL."""
    from ..notify.broker import BrokerCrlSync
    from ..notify.duties import Duties
    from ..notify.kicker import Kicker
    from ..notify.outbox import MqttPublisher, OutboxRelay
    from ..services import load_authorities, notice_issuer

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s relay %(levelname)s %(message)s")
    settings = ctx.settings()
    repository = ctx.repository()
    clock = lambda: dt.datetime.now(dt.UTC)  # noqa: E731
    broker = BrokerCrlSync(settings.mqtt.broker_crl_file, settings.mqtt.broker_pid_file)
    duties = Duties(repository, load_authorities(settings, repository),
                    lambda signer: notice_issuer(settings, signer), settings.revocation,
                    broker, clock)
    publisher = MqttPublisher(settings.mqtt, client_id=f"enroll-relay-{id(settings):x}")
    kicker = Kicker(settings.mqtt, settings.mqtt.kick_revoked_after_seconds)
    worker = OutboxRelay(repository, publisher, clock, batch=batch,
                         on_revocation_sent=kicker.schedule
                         if settings.mqtt.kick_revoked_after_seconds >= 0 else None)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    click.echo(f"relay {worker.owner}: publishing to {settings.mqtt.host}:{settings.mqtt.port}",
               err=True)
    worker.run(stop, lambda: (duties(), kicker.run_due()))
    click.echo(f"relay stopped after {worker.published} notice(s)", err=True)
