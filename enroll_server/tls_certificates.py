"""The service's own TLS server certificates, re-issued from the active issuing CA.

Two listeners carry a certificate from the issuing CA: the EST server (``tls.cert``,
written by `enroll-server init`) and the broker (``broker.pem`` in the broker directory,
written by `enroll-server broker-config`). After `enroll-server ca rotate` they must move
to the new CA too: a client that trusts only the new issuing CA, or a broker cafile from
which the retired CA has gone, would refuse them. (The relays' broker identities are
pinned self-signed certificates, not issued by the CA: notify/identities.py.)

Re-issuing keeps the key and the names (SAN, CN): the server and Mosquitto already hold
the key, so the new certificate is the only file that changes (atomically, keeping its
mode and owner) and no process ever sees a certificate that does not match its key. A
certificate this instance did not issue (e.g. a public one the operator installed) is
left alone.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from .ca import hierarchy
from .ca.signer import Signer
from .config import Settings
from .notify.broker import pem_bundle, signal_broker

SERVER_RELOAD = ("reload every server: SIGHUP to each `enroll-server serve` (e.g. "
                 "`systemctl reload enroll-server`)")


@dataclass(frozen=True)
class Reissued:
    listener: str  # "server" or "broker"
    path: Path
    certificate: x509.Certificate | None  # None: left as it was
    next_step: str

    def to_json(self) -> dict[str, object]:
        return {"listener": self.listener, "path": str(self.path),
                "reissued": self.certificate is not None,
                "issuer": (self.certificate.issuer.rfc4514_string()
                           if self.certificate is not None else None),
                "not_after": (self.certificate.not_valid_after_utc.isoformat()
                              if self.certificate is not None else None),
                "next_step": self.next_step}


def names_of(certificate: x509.Certificate) -> list[str]:
    """The host names and addresses a TLS server certificate is for (SAN order; the CN
    when there is no SAN)."""
    try:
        san = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in
                certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    return names + [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def _ordered(names: list[str], cn: str | None) -> list[str]:
    """The CN first (make_tls_server_certificate takes its CN from the first name)."""
    if cn is None or cn not in names:
        return names
    return [cn, *[n for n in names if n != cn]]


def recertify(path: Path, signer: Signer, ours: Collection[x509.Name]) -> x509.Certificate | None:
    """Replace the TLS server certificate at path (leaf first) by one from signer for the
    same key and names, followed by signer's CA; None (nothing written) if the current
    one was not issued by one of ``ours``."""
    current = x509.load_pem_x509_certificates(path.read_bytes())[0]
    if current.issuer not in ours:
        return None
    cns = current.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    names = _ordered(names_of(current), str(cns[0].value) if cns else None)
    certificate = hierarchy.make_tls_server_certificate(
        current.public_key(), signer.ca_certificate, signer.private_key, names)  # type: ignore[arg-type]
    replace_keeping_mode(path, pem_bundle([certificate, signer.ca_certificate]))
    return certificate


def replace_keeping_mode(path: Path, data: bytes) -> None:
    """Atomic replace; the new file gets the old one's mode (and owner, when we may)."""
    info = path.stat()
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.chmod(temporary, info.st_mode & 0o777)
    if os.geteuid() == 0:
        os.chown(temporary, info.st_uid, info.st_gid)
    os.replace(temporary, path)


def reissue_tls_certificates(settings: Settings, signer: Signer,
                             ours: Collection[x509.Name],
                             broker_dir: Path | None = None) -> list[Reissued]:
    """Re-issue the EST server's and the broker's certificates from signer (the active
    CA). ours: the subjects of this instance's CA generations. The broker's is looked for
    in broker_dir, or where `broker-config` put it for this instance (if it ran)."""
    results = []
    server = recertify(settings.tls.cert, signer, ours)
    results.append(Reissued("server", settings.tls.cert, server, SERVER_RELOAD if server
                            else "not issued by this instance's CA: left as it is"))
    pid_file = settings.mqtt.broker_pid_file
    if broker_dir is not None:
        pid_file = broker_dir / "run" / "mosquitto.pid"
    elif pid_file is not None:  # broker-config ran for this instance
        broker_dir = settings.mqtt.broker_crl_file.parent
    if broker_dir is None:
        return results
    broker_pem = broker_dir / "broker.pem"
    if not broker_pem.exists():
        results.append(Reissued(
            "broker", broker_pem, None, "not found here: where Mosquitto runs, run "
            "`enroll-server ca reissue-tls --broker-dir DIR`"))
        return results
    broker = recertify(broker_pem, signer, ours)
    if broker is None:
        step = "not issued by this instance's CA: left as it is"
    elif signal_broker(pid_file):
        step = "Mosquitto re-read it (SIGHUP)"
    else:
        step = f"Mosquitto is not running here (no process in {pid_file}): it reads it at start"
    results.append(Reissued("broker", broker_pem, broker, step))
    return results
