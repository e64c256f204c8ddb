"""The issuing CA generations of an instance: which exist, which one is active, their keys.

    issuing-ca      the instance's first issuing CA (`enroll-server init`)
    issuing-ca-2    the next one (`enroll-server ca rotate`), and so on

The list lives in the database (table issuing_ca, store.models.IssuingCa), not in the
configuration: every process (gunicorn workers, the relay, the CLI, replicas on other
hosts sharing PostgreSQL) must agree on which CA is active, and a rotation switches it
in the same transaction that queues the devices' notices. What is per host stays in the
configuration: the PKCS#11 module, token and PIN (shared by all generations: one token,
one key label per generation) and the root certificate.

One CA is "active": it signs device certificates. "Retired" ones sign only their CRLs
and their OCSP responders' certificates, until their own certificate expires; while that
is so they are "live" (CRL, OCSP, broker CRL file). The first CA is recorded from the
configuration (ca.certificate, ca.pkcs11.key_label or ca.key_file) the first time any
process opens the database, so instances created before CA generations existed keep
working unchanged.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .ca.profiles import FIRST_CA_NAME
from .ca.signer import Signer
from .config import ConfigError, Settings
from .store.repository import Repository, naive_utc


@dataclass(frozen=True)
class CaRecord:
    """One row of issuing_ca, detached from the database."""

    id: int
    name: str
    certificate: x509.Certificate
    key_backend: str
    key_label: str
    key_passphrase_file: str | None
    status: str
    created_at: dt.datetime
    retired_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.status == "active"

    def live(self, now: dt.datetime) -> bool:
        """Active, or retired with a certificate that has not expired yet."""
        return self.active or self.certificate.not_valid_after_utc > now

    @classmethod
    def of(cls, row) -> CaRecord:  # noqa: ANN001 - an issuing_ca row
        return cls(row.id, row.name, x509.load_pem_x509_certificate(
            row.certificate_pem.encode()), row.key_backend, row.key_label,
            row.key_passphrase_file, row.status, row.created_at, row.retired_at)


def instance_relative(settings: Settings, path: Path) -> str:
    """A path as stored in the database: relative to the instance directory if inside."""
    try:
        return str(Path(path).relative_to(settings.instance_dir))
    except ValueError:
        return str(path)


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def seed_first_ca(settings: Settings, repository: Repository) -> bool:
    """Record the configured issuing CA as "issuing-ca" if no CA is recorded yet; True
    if it did. Idempotent and safe when several processes start at once."""
    certificate_path = settings.ca.certificate
    if not certificate_path.exists():
        return False  # nothing to record (yet): loading a signer says so
    certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    if settings.ca.backend == "pkcs11":
        label, passphrase_file = settings.ca.pkcs11.key_label, None
    else:
        label = instance_relative(settings, settings.ca.key_file)
        passphrase_file = (instance_relative(settings, settings.ca.key_passphrase_file)
                           if settings.ca.key_passphrase_file else None)
    return repository.record_first_ca({
        "name": FIRST_CA_NAME, "certificate_pem": pem(certificate),
        "key_backend": settings.ca.backend, "key_label": label,
        "key_passphrase_file": passphrase_file,
        "not_after": naive_utc(certificate.not_valid_after_utc)})


def records(repository: Repository) -> list[CaRecord]:
    """Every recorded CA generation, oldest first."""
    return [CaRecord.of(row) for row in repository.ca_rows()]


def read_secret(path: os.PathLike[str]) -> str:
    with open(path) as handle:
        return handle.read().strip()


def load_key(settings: Settings, record: CaRecord):  # -> cryptography private key
    """The private key of one CA generation."""
    return load_key_at(settings, record.key_backend, record.key_label,
                       record.key_passphrase_file)


def load_key_at(settings: Settings, backend: str, label: str,
                passphrase_file: str | None):  # -> cryptography private key
    """A CA key: a PKCS#11 key lives in the configured token under ``label`` (module,
    token and PIN from the configuration) and never falls back to a file key, whatever
    happens; a file key is the (instance-relative) file ``label``."""
    if backend == "file":
        from .ca.keys import load_file_private_key

        passphrase = (read_secret(settings.resolve(Path(passphrase_file))).encode()
                      if passphrase_file else None)
        return load_file_private_key(settings.resolve(Path(label)), passphrase)
    from .ca.keys import Pkcs11PrivateKey

    pkcs11 = settings.ca.pkcs11
    export_softhsm_conf(settings)
    return Pkcs11PrivateKey(pkcs11.module, pkcs11.token_label, label,
                            read_secret(pkcs11.pin_file),
                            reconnect_backoff=pkcs11.reconnect_backoff_seconds)


def export_softhsm_conf(settings: Settings) -> None:
    """SoftHSM reads SOFTHSM2_CONF once, when the module is initialised: set it first."""
    if settings.ca.pkcs11.softhsm_conf is not None:
        os.environ["SOFTHSM2_CONF"] = str(settings.ca.pkcs11.softhsm_conf)


def root_chain(settings: Settings) -> tuple[x509.Certificate, ...]:
    """The certificates above every issuing CA, up to the root (ca.root_certificate)."""
    if not settings.ca.root_certificate.exists():
        return ()
    return tuple(x509.load_pem_x509_certificates(settings.ca.root_certificate.read_bytes()))


class Authorities:
    """The CA generations one process works with: a Signer for the active CA and for
    every live retired one (whose Signer refuses to issue: Signer.retired).

    Built from the database at start; refresh() re-reads it (the relay does, so a
    rotation reaches it without a restart; servers reload on SIGHUP instead). Keys are
    loaded once per generation and kept: PKCS#11 keys of one token share its login.
    """

    def __init__(self, settings: Settings, repository: Repository,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 key_loader: Callable[[Settings, CaRecord], object] = load_key) -> None:
        self.settings = settings
        self.repository = repository
        self.clock = clock
        self._load_key = key_loader
        self._keys: dict[str, object] = {}
        self._signers: dict[str, Signer] = {}
        self._active = ""
        self.chain = root_chain(settings)
        seed_first_ca(settings, repository)
        self.refresh()

    def refresh(self) -> bool:
        """Re-read the generations; True if the active CA or the live set changed."""
        found = records(self.repository)
        if not found:
            raise ConfigError(f"ca.certificate: {self.settings.ca.certificate} not found "
                              "and no issuing CA recorded in the database")
        actives = [r for r in found if r.active]
        if len(actives) != 1:
            raise ConfigError(f"the database records {len(actives)} active issuing CAs "
                              "(exactly one expected): see `enroll-server ca list`")
        now = self.clock()
        live = [r for r in found if r.live(now)]
        before = (self._active, tuple(self._signers), tuple(
            s.retired for s in self._signers.values()))
        signers: dict[str, Signer] = {}
        for record in live:
            key = self._keys.get(record.name)
            if key is None:
                key = self._keys[record.name] = self._load_key(self.settings, record)
            signers[record.name] = Signer(record.certificate, key, self.chain,  # type: ignore[arg-type]
                                          name=record.name, retired=not record.active)
        self._signers, self._active = signers, actives[0].name
        return before != (self._active, tuple(self._signers), tuple(
            s.retired for s in self._signers.values()))

    @property
    def active(self) -> Signer:
        """The CA that signs device certificates."""
        return self._signers[self._active]

    def live(self) -> list[Signer]:
        """Every live CA, oldest first (the active one is the newest)."""
        return list(self._signers.values())

    def get(self, name: str) -> Signer | None:
        return self._signers.get(name)


def client_trust_certificates(settings: Settings, repository: Repository,
                              now: dt.datetime) -> list[x509.Certificate]:
    """Issuing CAs whose device certificates may authenticate over TLS (re-enrollment):
    the active one, and each retired one while a certificate it issued is unexpired and
    not revoked, so a device can still `simplereenroll` with an old-CA certificate."""
    seed_first_ca(settings, repository)
    return [x509.load_pem_x509_certificate(text.encode())
            for text in repository.client_trusted_cas(now)]
