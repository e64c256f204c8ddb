"""Operator commands for MQTT: the broker's configuration and the outbox relay.

    enroll-server broker-config --dir DIR [--port 8883] [--service-port 8884]
                                [--relay NAME ...] [--hostname H ...] [--user mosquitto]
    enroll-server relay [--identity NAME]
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import pwd
import signal
import threading
import tomllib
from pathlib import Path

import click
import tomli_w

from ..notify.broker import DEFAULT_BROKER_USER
from .common import Context, json_option, pass_context

LOOPBACK_OR_ANY = ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::")  # noqa: S104


@click.command("broker-config", epilog="""\b
Examples:
  enroll-server broker-config --dir /etc/mosquitto/enroll
  mosquitto -c /etc/mosquitto/enroll/mosquitto.conf
  enroll-server relay
  enroll-server broker-config --dir /etc/mosquitto/enroll --relay a --relay b \\
      --service-bind 0.0.0.0 --hostname mqtt.example.net
  enroll-server relay --identity b      # on the second relay host
\b
Writes mosquitto.conf with two TLS listeners: the fleet listener (--port; devices and
gateways; the client id is forced to the certificate CN, so no device can take over
another's session; CRL checked) and the service listener (--service-port; only the
pinned relay identities). Also the ACL, the broker certificate, the CRLs, one identity
per relay under <instance>/mqtt/relays/, and points this instance's [mqtt] settings at
them. Run as root, it hands data/ and run/ to --user (Mosquitto switches to it) and makes
broker.key readable by that user's group only. Restart Mosquitto after changing --relay.""")
@click.option("--dir", "directory", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory Mosquitto runs from (created).")
@click.option("--port", default=8883, show_default=True, type=click.IntRange(1, 65535),
              help="Fleet listener (devices, gateways).")
@click.option("--bind", default="127.0.0.1", show_default=True)
@click.option("--service-port", default=8884, show_default=True,
              type=click.IntRange(1, 65535), help="Service listener (relays).")
@click.option("--service-bind", help="Address of the service listener (default: --bind).")
@click.option("--hostname", "hostnames", multiple=True,
              help="Names in the broker certificate (default: localhost, 127.0.0.1).")
@click.option("--gateway", "gateways", multiple=True,
              help="Certificate CN of a gateway allowed to read fleet revocations.")
@click.option("--relay", "relays", multiple=True,
              help="A relay identity to create and pin (repeat; default: the existing "
                   "ones, or 'main'). Relays not named lose access.")
@click.option("--user", "user", default=DEFAULT_BROKER_USER, show_default=True,
              help="Account Mosquitto switches to when started as root.")
@json_option
@pass_context
def broker_config(ctx: Context, directory: Path, port: int, bind: str, service_port: int,
                  service_bind: str | None, hostnames: tuple[str, ...],
                  gateways: tuple[str, ...], relays: tuple[str, ...], user: str,
                  as_json: bool) -> None:
    """Write a Mosquitto configuration that enforces device identities and revocation."""
    from ..notify.broker import Listener, broker_account, write_broker_config
    from ..notify.identities import DEFAULT_RELAY, existing_relays
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
    service_bind = service_bind or bind
    relay_host = "localhost" if service_bind in LOOPBACK_OR_ANY else service_bind
    names = list(hostnames or ("localhost", "127.0.0.1"))
    if relay_host not in names:
        names.append(relay_host)
    relays_dir = settings.instance_dir / "mqtt" / "relays"
    relay_names = list(relays) or existing_relays(relays_dir) or [DEFAULT_RELAY]
    try:
        files = write_broker_config(
            directory, authorities.active, crls, fleet=Listener(bind, port),
            service=Listener(service_bind, service_port), hostnames=names,
            relays_dir=relays_dir, relay_names=relay_names,
            topic_prefix=settings.mqtt.topic_prefix, gateways=gateways,
            trusted=[s.ca_certificate for s in authorities.live()] + list(authorities.chain),
            account=broker_account(user))
    except ValueError as error:  # BrokerConfigError, IdentityError: say what to do
        raise click.ClickException(str(error)) from None
    current = [r for r in files.relays if r.certificate_path == settings.mqtt.client_cert]
    default = (current or list(files.relays))[0]
    config_path = Path(ctx.config)
    document = tomllib.loads(config_path.read_text())
    document["mqtt"] = {**document.get("mqtt", {}), "host": relay_host, "port": service_port,
                        "ca_file": "ca/ca-chain.pem",
                        "client_cert": str(default.certificate_path),
                        "client_key": str(default.key_path),
                        "broker_crl_file": str(files.crl), "broker_pid_file": str(files.pid_file)}
    config_path.write_text(tomli_w.dumps(document))
    repository.audit(actor="operator", action="broker.config", outcome="success",
                     detail={"dir": str(files.directory), "port": port,
                             "service_port": service_port,
                             "relays": [r.cn for r in files.relays], "user": user})
    if as_json:
        click.echo(json.dumps({
            "directory": str(files.directory), "config": str(files.config),
            "pid_file": str(files.pid_file), "fleet_port": port,
            "service_port": service_port, "user": user,
            "relays": [{"name": r.name, "cn": r.cn, "certificate": str(r.certificate_path),
                        "key": str(r.key_path)} for r in files.relays],
            "default_relay": default.name}))
        return
    click.echo(f"Broker configuration written to {files.directory}")
    click.echo(f"  fleet listener:    {bind}:{port} (devices; client id = certificate CN)")
    click.echo(f"  service listener:  {service_bind}:{service_port} (relays: "
               f"{', '.join(r.cn for r in files.relays)})")
    if files.account.hands_over:
        click.echo(f"  Mosquitto switches to user {user!r}: it owns data/ and run/, and "
                   f"reads broker.key through its group (0640)")
    elif user != "root" and os.geteuid() != 0:
        click.echo(f"  run Mosquitto as {pwd.getpwuid(os.geteuid()).pw_name} (these files "
                   "are that account's; as root it would switch to "
                   f"{user!r}, which cannot read them: run broker-config as root for that)")
    click.echo(f"  start it:   mosquitto -c {files.config}   (restart it if it runs: the "
               "relay pins are read at start)")
    others = [r.name for r in files.relays if r != default]
    click.echo(f"  then:       enroll-server relay   (identity {default.name}; publishes "
               "notices, keeps the CRL current)")
    for name in others:
        click.echo(f"              enroll-server relay --identity {name}")
    unused = set(existing_relays(relays_dir)) - {r.name for r in files.relays}
    if unused:
        click.echo(f"  no longer trusted: {', '.join(sorted(unused))} "
                   f"(identities kept under {relays_dir})")


@click.command(epilog="""\b
Examples:
  enroll-server --config ./instance/config.toml relay
  enroll-server relay --identity b
\b
Runs until SIGINT/SIGTERM. Several relays may run against one PostgreSQL database, each
with its own identity (`broker-config --relay NAME`): the broker refuses unknown ones, and
two relays sharing one identity would end each other's sessions.""")
@click.option("--batch", default=200, show_default=True, type=click.IntRange(1, 10000))
@click.option("--identity", help="Relay identity (default: the one in [mqtt] of the config).")
@pass_context
def relay(ctx: Context, batch: int, identity: str | None) -> None:
    """Publish queued notices to the broker; renewals, CRLs of every CA, broker CRL."""
    from ..notify.broker import BrokerCrlSync
    from ..notify.duties import Duties
    from ..notify.identities import IdentityError, certificate_cn, identity_at
    from ..notify.kicker import Kicker
    from ..notify.outbox import MqttPublisher, OutboxRelay
    from ..services import load_authorities, notice_issuer

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s relay %(levelname)s %(message)s")
    settings = ctx.settings()
    mqtt = settings.mqtt
    if identity is not None:
        try:
            chosen = identity_at(settings.instance_dir / "mqtt" / "relays", identity)
        except IdentityError as error:
            raise click.ClickException(str(error)) from None
        mqtt = dataclasses.replace(mqtt, client_cert=chosen.certificate_path,
                                   client_key=chosen.key_path)
    if not (mqtt.client_cert.exists() and mqtt.client_key.exists()):
        raise click.ClickException(
            f"no relay identity at {mqtt.client_cert}: run `enroll-server broker-config "
            f"--dir DIR{' --relay ' + identity if identity else ''}` (it keeps the "
            "existing relays), then restart Mosquitto")
    client_id = certificate_cn(mqtt.client_cert)  # the broker knows the relay by its CN
    settings = dataclasses.replace(settings, mqtt=mqtt)
    repository = ctx.repository()
    clock = lambda: dt.datetime.now(dt.UTC)  # noqa: E731
    broker = BrokerCrlSync(mqtt.broker_crl_file, mqtt.broker_pid_file)
    duties = Duties(repository, load_authorities(settings, repository),
                    lambda signer: notice_issuer(settings, signer), settings.revocation,
                    broker, clock)
    publisher = MqttPublisher(mqtt, client_id=client_id)
    publisher.start()  # connected before the first notice; a refusal shows in the log now
    kicker = Kicker(mqtt, mqtt.kick_revoked_after_seconds)
    worker = OutboxRelay(repository, publisher, clock, batch=batch,
                         on_revocation_sent=kicker.schedule
                         if mqtt.kick_revoked_after_seconds >= 0 else None)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    click.echo(f"relay {worker.owner} ({client_id}): publishing to {mqtt.host}:{mqtt.port}",
               err=True)
    worker.run(stop, lambda: (duties(), kicker.run_due()))
    click.echo(f"relay stopped after {worker.published} notice(s)", err=True)
