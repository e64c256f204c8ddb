"""Mosquitto integration: the broker configuration, its ACL, and keeping its CRL current.

``write_broker_config`` produces a directory Mosquitto runs from as is (`mosquitto -c
DIR/mosquitto.conf`), also when started as root (it then drops to ``user``):

    mosquitto.conf   two TLS listeners, both require_certificate + use_identity_as_username
                     (the certificate CN is the MQTT username):
                     - the fleet listener (devices, gateways): use_username_as_clientid,
                       so the client id IS the CN and no device can take over another's
                       session (MQTT 3.1.1 3.1.4: a second connection with a client id
                       ends the first); crlfile; cafile ca-chain.pem;
                     - the service listener (relays): cafile relays.pem, the pinned relay
                       identities (notify/identities.py) and nothing else, so no device
                       certificate is accepted there; client ids are kept, which lets the
                       relay end a revoked device's session (notify/kicker.py);
                     persistence (QoS 1 sessions of offline devices survive a restart),
                     pid file (the relay SIGHUPs the broker after a new CRL)
    acl              each device reads only its own notice topic, writes only its status;
                     each relay (svc.relay.NAME) reads and writes the fleet's topics
    broker.pem/.key  the listeners' certificate, issued by the issuing CA, with its chain
    ca-chain.pem     every live issuing CA generation and the root: the fleet's trust store
    crl.pem          the CRLs of every live issuing CA, concatenated PEM; Mosquitto refuses
                     revoked client certificates (it checks the leaf's issuer's CRL, so a
                     CA without a CRL here would lock its devices out)
    relays.pem       the service listener's cafile (read at start only: restart Mosquitto
                     after adding or removing a relay)
    data/, run/      persistence and pid file, owned by the broker's account

Started as root, Mosquitto 2.0.11 switches to ``user`` (default "mosquitto") before it
writes its pid file and before it reads its keys and, on SIGHUP, its config, ACL, cafile
and crlfile. So when broker-config runs as root it hands data/ and run/ to that account,
makes broker.key readable by its group only (0640, root-owned) and every public file
0644, and refuses a directory the account cannot reach. Run as another user, it writes
everything as that user, who then runs Mosquitto (``user`` has no effect then).

``BrokerCrlSync`` (run by the relay) rewrites crl.pem whenever a newer CRL of any CA is
published, and ca-chain.pem when the set of live CAs changes (``enroll-server ca
rotate``), then sends SIGHUP, on which Mosquitto 2.0 re-reads its cafile and crlfile
(checked with 2.0.11: several PEM CRLs in one crlfile are all used) and its certfile.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..ca import hierarchy
from ..ca.keys import write_file_private_key
from ..ca.signer import Signer
from .identities import RelayIdentity, ensure_relay_identity, pins, relay_cn

DEFAULT_BROKER_USER = "mosquitto"
PUBLIC = 0o644


class BrokerConfigError(ValueError):
    """The broker configuration cannot be written as asked (the message says why)."""


def acl_text(topic_prefix: str = "fleet", relays: Sequence[str] = (),
             gateways: Sequence[str] = ()) -> str:
    """Mosquitto ACL (mosquitto.conf(5) acl_file): %u is the certificate CN; relays are
    the relays' CNs (svc.relay.NAME), gateways the gateways' CNs."""
    lines = ["# Written by enroll-server broker-config. %u = the client certificate's CN.",
             "# Relays (service listener only: their certificates are pinned there)"]
    for relay in relays:
        lines += [f"user {relay}", f"topic readwrite {topic_prefix}/#", ""]
    for gateway in gateways:
        lines += [f"user {gateway}", f"topic read {topic_prefix}/+/revocations", ""]
    lines += [
        "# every device: its own notices (read) and its own status (write), nothing else",
        f"pattern read {topic_prefix}/+/devices/%u/notices",
        f"pattern write {topic_prefix}/+/devices/%u/status",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Listener:
    bind: str
    port: int


def mosquitto_conf(directory: Path, fleet: Listener, service: Listener,
                   user: str = DEFAULT_BROKER_USER) -> str:
    if fleet.port == service.port:
        raise BrokerConfigError(f"the fleet and service listeners need different ports "
                                f"(both {fleet.port})")
    tls = [f"certfile {directory}/broker.pem", f"keyfile {directory}/broker.key",
           "require_certificate true", "use_identity_as_username true",
           "tls_version tlsv1.2"]
    return "\n".join([
        "# Written by enroll-server broker-config (Mosquitto 2.x).",
        "per_listener_settings false",
        "allow_anonymous false",
        f"user {user}",
        "persistence true",
        f"persistence_location {directory}/data/",
        "autosave_interval 1",
        f"pid_file {directory}/run/mosquitto.pid",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "max_queued_messages 1000",
        f"acl_file {directory}/acl",
        "",
        "# Fleet listener: devices and gateways. The client id is the certificate CN.",
        f"listener {fleet.port} {fleet.bind}",
        f"cafile {directory}/ca-chain.pem",
        f"crlfile {directory}/crl.pem",
        *tls,
        "use_username_as_clientid true",
        "",
        "# Service listener: only the pinned relay identities (relays.pem).",
        f"listener {service.port} {service.bind}",
        f"cafile {directory}/relays.pem",
        *tls,
        "",
    ])


@dataclass(frozen=True)
class BrokerAccount:
    """The account Mosquitto runs as once started (mosquitto.conf ``user``), and whether
    files must be handed to it (only when we are root and it is not)."""

    name: str
    uid: int | None = None
    gid: int | None = None

    @property
    def hands_over(self) -> bool:
        return self.uid is not None


def broker_account(name: str = DEFAULT_BROKER_USER) -> BrokerAccount:
    if os.geteuid() != 0 or name == "root":
        return BrokerAccount(name)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise BrokerConfigError(
            f"there is no user {name!r} for Mosquitto to run as: install Mosquitto (its "
            "package creates the user) or pass --user with an existing account") from None
    return BrokerAccount(name, entry.pw_uid, entry.pw_gid)


def _can_enter(path: Path, account: BrokerAccount) -> bool:
    info = path.stat()
    if info.st_uid == account.uid:
        return bool(info.st_mode & stat.S_IXUSR)
    groups = os.getgrouplist(account.name, account.gid)  # type: ignore[arg-type]
    if info.st_gid in groups:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def check_reachable(directory: Path, account: BrokerAccount) -> None:
    """Refuse a directory whose parents the broker's account cannot traverse (it could
    not read its config on SIGHUP, nor write its pid file)."""
    if not account.hands_over:
        return
    for parent in (*reversed(directory.parents), directory):
        if parent.exists() and not _can_enter(parent, account):
            mode = stat.filemode(parent.stat().st_mode)
            raise BrokerConfigError(
                f"Mosquitto runs as {account.name!r} once started, and that account cannot "
                f"reach {parent} ({mode}): choose a directory it can reach, e.g. "
                "/etc/mosquitto/enroll, or pass --user")


@dataclass(frozen=True)
class BrokerFiles:
    directory: Path
    config: Path
    crl: Path
    pid_file: Path
    relays: tuple[RelayIdentity, ...]
    account: BrokerAccount


def write_broker_config(directory: Path, signer: Signer, crl_der: bytes | Sequence[bytes], *,
                        fleet: Listener, service: Listener, hostnames: list[str],
                        relays_dir: Path, relay_names: Sequence[str],
                        topic_prefix: str = "fleet",
                        gateways: Sequence[str] = (),
                        trusted: Sequence[x509.Certificate] | None = None,
                        account: BrokerAccount | None = None) -> BrokerFiles:
    """Everything Mosquitto needs; the broker key is created once and kept.

    signer is the active issuing CA (it certifies the broker); trusted the CA
    certificates devices may chain to (default: signer's CA and root); crl_der the CRL of
    each of them (one DER, or several); relay_names the relays the service listener pins
    (their identities under relays_dir are created if missing)."""
    if not relay_names:
        raise BrokerConfigError("at least one relay identity is needed")
    for name in relay_names:
        relay_cn(name)  # IdentityError names the rule
    account = account or broker_account()
    directory = directory.resolve()
    conf = mosquitto_conf(directory, fleet, service, account.name)  # checks the ports
    check_reachable(directory, account)  # before anything is written
    relays = [ensure_relay_identity(relays_dir, name) for name in dict.fromkeys(relay_names)]
    make_directories(directory)
    for sub, mode in (("data", 0o700), ("run", 0o755)):
        (directory / sub).mkdir(exist_ok=True, mode=mode)
        _own(directory / sub, account, mode, owner=True)
    write_public(directory / "ca-chain.pem", pem_bundle(trusted or signer.ca_certificates()))
    broker_key = _key(directory / "broker.key")
    _own(directory / "broker.key", account, 0o640 if account.hands_over else 0o600)
    write_public(directory / "broker.pem",
                 tls_server_chain(broker_key.public_key(), signer, hostnames))
    write_public(directory / "relays.pem", pins(relays))
    write_crl_pem(directory / "crl.pem", crl_der)
    write_public(directory / "acl", acl_text(topic_prefix, [r.cn for r in relays],
                                             gateways).encode())
    write_public(directory / "mosquitto.conf", conf.encode())
    return BrokerFiles(directory, directory / "mosquitto.conf", directory / "crl.pem",
                       directory / "run" / "mosquitto.pid", tuple(relays), account)


def tls_server_chain(public_key: ec.EllipticCurvePublicKey, signer: Signer,
                     hostnames: list[str]) -> bytes:
    """A TLS server certificate from signer's CA, followed by that CA (clients that trust
    only the root need the intermediate; the service listener cannot build it)."""
    certificate = hierarchy.make_tls_server_certificate(
        public_key, signer.ca_certificate, signer.private_key, hostnames)
    return pem_bundle([certificate, signer.ca_certificate])


def make_directories(directory: Path) -> None:
    """Create directory and missing parents 0755 whatever the umask (the broker's account
    must traverse them; nothing in them but the key is secret, and it is 0640)."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir()
        os.chmod(path, 0o755)  # noqa: S103 - public material only, see above


def _own(path: Path, account: BrokerAccount, mode: int, owner: bool = False) -> None:
    """owner: the account owns path; otherwise root keeps it and the account's group may
    read it (the key: Mosquitto must not be able to change it)."""
    if account.hands_over:
        os.chown(path, account.uid if owner else 0, account.gid)  # type: ignore[arg-type]
    os.chmod(path, mode)


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    if not path.exists():
        write_file_private_key(path, ec.generate_private_key(ec.SECP256R1()), None)
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def write_public(path: Path, data: bytes, mode: int = PUBLIC) -> None:
    """Atomically, and readable by the broker's account whatever our umask is."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def pem_bundle(certificates: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def write_crl_pem(path: Path, crl_der: bytes | Sequence[bytes]) -> None:
    """One CRL, or several concatenated (a crlfile for several CAs), as PEM."""
    ders = [crl_der] if isinstance(crl_der, bytes | bytearray | memoryview) else crl_der
    write_public(path, b"".join(x509.load_der_x509_crl(bytes(der)).public_bytes(
        serialization.Encoding.PEM) for der in ders))


def signal_broker(pid_file: Path | None) -> bool:
    """SIGHUP the broker so it re-reads its CRL; False if it is not running here."""
    if pid_file is None:
        return False
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return False
    return True


class BrokerCrlSync:
    """Keeps the broker's crlfile at the newest CRL of every live CA, and its cafile
    (``ca-chain.pem`` beside the crlfile, as write_broker_config lays it out) at the live
    CAs and the root (run by the relay)."""

    def __init__(self, crl_file: Path, pid_file: Path | None,
                 ca_file: Path | None = None) -> None:
        self.crl_file = crl_file
        self.pid_file = pid_file
        self.ca_file = ca_file or crl_file.with_name("ca-chain.pem")
        self.written: tuple[tuple[str, int], ...] | None = None

    def sync(self, crls: Sequence[tuple[str, int, bytes]],
             trusted: Sequence[x509.Certificate] | None = None) -> bool:
        """Write the CRLs (issuer name, number, DER) if any is newer than what the broker
        has, the cafile if trusted differs from it, and signal the broker. True if
        anything was written."""
        if not self.crl_file.parent.exists():
            return False
        changed = False
        numbers = tuple((issuer, number) for issuer, number, _ in crls)
        if crls and numbers != self.written:
            write_crl_pem(self.crl_file, [der for _, _, der in crls])
            self.written = numbers
            changed = True
        if trusted and self.ca_file.exists():
            bundle = pem_bundle(trusted)
            if self.ca_file.read_bytes() != bundle:
                write_public(self.ca_file, bundle)
                changed = True
        if changed:
            signal_broker(self.pid_file)
        return changed
