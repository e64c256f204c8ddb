"""The broker identities of our own relays: one self-signed certificate per relay,
pinned by the broker's service listener.

Each relay (`enroll-server relay --identity NAME`) has its own key and certificate,
``<instance>/mqtt/relays/NAME.pem|.key``, CN ``svc.relay.NAME``. Mosquitto's service
listener trusts exactly the certificates listed in its cafile (``relays.pem``, written by
`enroll-server broker-config`), so:

- no device can reach that listener: its certificate chains to the fleet CA, which the
  service listener does not trust (devices use the fleet listener, where the client id is
  forced to the certificate CN, see notify/broker.py);
- a relay identity is not issued by the fleet CA: rotating or compromising an issuing CA
  neither breaks nor mints relay identities;
- removing a relay is removing its pin (re-run broker-config without it, restart
  Mosquitto: Mosquitto 2.0.11 re-reads a listener's cafile on SIGHUP only when the
  listener has a crlfile, which the service listener has not).

The certificate is its own trust anchor (OpenSSL accepts a self-signed end-entity
certificate in the cafile): basicConstraints CA:FALSE, keyUsage digitalSignature,
extendedKeyUsage clientAuth (RFC 5280 4.2.1.3, 4.2.1.12).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..ca.keys import write_file_private_key
from ..ca.profiles import DIGITAL_SIGNATURE_ONLY, SERVICE_IDENTITY_PREFIX

RELAY_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
DEFAULT_RELAY = "main"
LIFETIME = dt.timedelta(days=730)
RENEW_BEFORE = dt.timedelta(days=60)  # broker-config re-makes a certificate this close to its end


class IdentityError(ValueError):
    """A relay name or identity file that cannot be used (the message says what to do)."""


def relay_cn(name: str) -> str:
    """The certificate CN, hence the MQTT username and client id, of relay ``name``."""
    if RELAY_NAME_PATTERN.fullmatch(name) is None:
        raise IdentityError(f"bad relay name {name!r}: use 1-32 of a-z, 0-9 and '-', "
                            "starting with a letter or digit")
    return f"{SERVICE_IDENTITY_PREFIX}relay.{name}"


@dataclass(frozen=True)
class RelayIdentity:
    name: str
    certificate_path: Path
    key_path: Path

    @property
    def cn(self) -> str:
        return relay_cn(self.name)

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_path.read_bytes())


def identity_at(directory: Path, name: str) -> RelayIdentity:
    relay_cn(name)  # validates the name before it becomes a path
    return RelayIdentity(name, directory / f"{name}.pem", directory / f"{name}.key")


def existing_relays(directory: Path) -> list[str]:
    """Names of the relay identities under ``directory``, sorted."""
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.pem")
                  if RELAY_NAME_PATTERN.fullmatch(p.stem) and p.with_suffix(".key").exists())


def ensure_relay_identity(directory: Path, name: str,
                          now: dt.datetime | None = None) -> RelayIdentity:
    """The identity of relay ``name``: its key is created once and kept; its certificate
    is (re)made when missing, not matching the key, or within RENEW_BEFORE of its end."""
    now = now or dt.datetime.now(dt.UTC)
    identity = identity_at(directory, name)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not identity.key_path.exists():
        write_file_private_key(identity.key_path, ec.generate_private_key(ec.SECP256R1()),
                               None)
    key = serialization.load_pem_private_key(identity.key_path.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{identity.key_path} is not an EC private key")
    if identity.certificate_path.exists():
        current = identity.certificate()
        if (current.public_key() == key.public_key()
                and current.not_valid_after_utc - RENEW_BEFORE > now):
            return identity
    certificate = self_signed_client_certificate(key, identity.cn, now)
    temporary = identity.certificate_path.with_name(f".{name}.pem.tmp")
    temporary.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    temporary.replace(identity.certificate_path)
    return identity


def self_signed_client_certificate(key: ec.EllipticCurvePrivateKey, cn: str,
                                   now: dt.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    public = key.public_key()
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(DIGITAL_SIGNATURE_ONLY, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))


def pins(identities: Sequence[RelayIdentity]) -> bytes:
    """The service listener's cafile: exactly these relays' certificates."""
    return b"".join(i.certificate_path.read_bytes() for i in identities)


def certificate_cn(path: Path) -> str:
    """The CN of the (first) certificate in a PEM file: a relay's MQTT client id."""
    certificate = x509.load_pem_x509_certificates(Path(path).read_bytes())[0]
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise IdentityError(f"{path}: the certificate has no CN")
    return str(names[0].value)
