"""Mosquitto integration: the broker configuration, its ACL, and keeping its CRL current.

``write_broker_config`` produces a directory Mosquitto runs from as is:

    mosquitto.conf   TLS listener, require_certificate + use_identity_as_username (the
                     certificate CN is the username: device id, or the relay's svc. name),
                     crlfile, ACL, persistence (QoS 1 sessions of offline devices survive
                     a broker restart), pid file (the relay SIGHUPs it after a new CRL)
    acl              each device reads only its own notice topic, writes only its status
    broker.pem/.key  the listener's certificate, issued by the issuing CA
    ca-chain.pem     every live issuing CA generation and the root: the client trust store
    crl.pem          the CRLs of every live issuing CA, concatenated PEM; Mosquitto refuses
                     revoked client certificates (it checks the leaf's issuer's CRL, so a
                     CA without a CRL here would lock its devices out)

``BrokerCrlSync`` (run by the relay) rewrites crl.pem whenever a newer CRL of any CA is
published, and ca-chain.pem when the set of live CAs changes (``enroll-server ca
rotate``), then sends SIGHUP, on which Mosquitto 2.0 re-reads its cafile and crlfile
(checked with 2.0.11: several PEM CRLs in one crlfile are all used).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..ca import hierarchy
from ..ca.keys import write_file_private_key
from ..ca.signer import Signer

PUBLISHER_IDENTITY = "svc.enroll-relay"


def acl_text(topic_prefix: str = "fleet", gateways: tuple[str, ...] = ()) -> str:
    """Mosquitto ACL (mosquitto.conf(5) acl_file): %u is the certificate CN."""
    lines = [
        "# Written by enroll-server broker-config. %u = the client certificate's CN.",
        f"user {PUBLISHER_IDENTITY}",
        f"topic readwrite {topic_prefix}/#",
        "",
    ]
    for gateway in gateways:
        lines += [f"user {gateway}", f"topic read {topic_prefix}/+/revocations", ""]
    lines += [
        "# every device: its own notices (read) and its own status (write), nothing else",
        f"pattern read {topic_prefix}/+/devices/%u/notices",
        f"pattern write {topic_prefix}/+/devices/%u/status",
        "",
    ]
    return "\n".join(lines)


def mosquitto_conf(directory: Path, bind: str, port: int) -> str:
    return "\n".join([
        "# Written by enroll-server broker-config (Mosquitto 2.x).",
        "per_listener_settings false",
        "allow_anonymous false",
        "persistence true",
        f"persistence_location {directory}/data/",
        "autosave_interval 1",
        f"pid_file {directory}/mosquitto.pid",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "max_queued_messages 1000",
        f"acl_file {directory}/acl",
        "",
        f"listener {port} {bind}",
        f"cafile {directory}/ca-chain.pem",
        f"certfile {directory}/broker.pem",
        f"keyfile {directory}/broker.key",
        "require_certificate true",
        "use_identity_as_username true",
        f"crlfile {directory}/crl.pem",
        "tls_version tlsv1.2",
        "",
    ])


@dataclass(frozen=True)
class BrokerFiles:
    directory: Path
    config: Path
    publisher_cert: Path
    publisher_key: Path
    crl: Path
    pid_file: Path


def write_broker_config(directory: Path, signer: Signer, crl_der: bytes | Sequence[bytes], *,
                        bind: str, port: int, hostnames: list[str], publisher_dir: Path,
                        topic_prefix: str = "fleet", gateways: tuple[str, ...] = (),
                        trusted: Sequence[x509.Certificate] | None = None
                        ) -> BrokerFiles:  # fmt: skip
    """Everything Mosquitto and the relay need; keys are created once and kept.

    signer is the active issuing CA (it certifies the broker and the relay); trusted the
    CA certificates clients may chain to (default: signer's CA and root); crl_der the
    CRL of each of them (one DER, or several)."""
    directory = directory.resolve()
    (directory / "data").mkdir(parents=True, exist_ok=True, mode=0o700)
    publisher_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM)
                     for c in signer.ca_certificates())
    _write(directory / "ca-chain.pem", pem_bundle(trusted or signer.ca_certificates()))
    broker_key = _key(directory / "broker.key")
    broker_cert = hierarchy.make_tls_server_certificate(
        broker_key.public_key(), signer.ca_certificate, signer.private_key, hostnames)
    _write(directory / "broker.pem", broker_cert.public_bytes(serialization.Encoding.PEM))
    publisher_key = _key(publisher_dir / "publisher.key")
    publisher_cert = hierarchy.make_service_client_certificate(
        publisher_key.public_key(), signer.ca_certificate, signer.private_key,
        PUBLISHER_IDENTITY)
    _write(publisher_dir / "publisher.pem",
           publisher_cert.public_bytes(serialization.Encoding.PEM) + chain)
    write_crl_pem(directory / "crl.pem", crl_der)
    _write(directory / "acl", acl_text(topic_prefix, gateways).encode())
    _write(directory / "mosquitto.conf", mosquitto_conf(directory, bind, port).encode())
    return BrokerFiles(directory, directory / "mosquitto.conf", publisher_dir / "publisher.pem",
                       publisher_dir / "publisher.key", directory / "crl.pem",
                       directory / "mosquitto.pid")


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    if not path.exists():
        write_file_private_key(path, ec.generate_private_key(ec.SECP256R1()), None)
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def pem_bundle(certificates: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def write_crl_pem(path: Path, crl_der: bytes | Sequence[bytes]) -> None:
    """One CRL, or several concatenated (a crlfile for several CAs), as PEM."""
    ders = [crl_der] if isinstance(crl_der, bytes | bytearray | memoryview) else crl_der
    _write(path, b"".join(x509.load_der_x509_crl(bytes(der)).public_bytes(
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
                _write(self.ca_file, bundle)
                changed = True
        if changed:
            signal_broker(self.pid_file)
        return changed
