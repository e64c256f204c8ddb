"""The device's enrollment state directory, written atomically.

    device.crt.pem      the device certificate
    chain.pem           issuing CA then root (EST /cacerts)
    device.key.tss.pem  the device key as a TSS2 PRIVATE KEY (a TPM-wrapped blob, useless
                        without this TPM; for TLS through the tpm2-openssl provider)
    status.json         {"device_id", "serial", "not_after", "enrolled_at", "group",
                        "state"}; state "revoked" adds "reason", "revoked_at" (serial is
                        then the revoked certificate's, moved aside to
                        device.crt.pem.revoked-<serial>)
    notices.json        {"last_sequence", "pending"}: the agent's notice bookkeeping

Each file is written to a temporary name, fsynced and renamed (POSIX rename is atomic),
then the directory is fsynced. status.json goes last: it marks a complete enrollment, and
readers still check that the certificate matches the TPM's current device key.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

PEM = serialization.Encoding.PEM


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: temp file in the same dir, fsync, rename, fsync dir."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class EnrollmentStatus:
    device_id: str
    serial: str  # hex, as openssl x509 -serial prints it
    not_after: str  # RFC 3339, UTC
    enrolled_at: str  # RFC 3339, UTC
    group: str | None = None  # the EST label enrolled under (the MQTT topic's group)
    state: str = "enrolled"  # or "revoked"
    reason: str | None = None  # revoked: RFC 5280 CRLReason name, as the notice said
    revoked_at: str | None = None  # revoked: when the device learnt it, RFC 3339 UTC
    revoked_by: str | None = None  # revoked: "notice", "crl" or "est"

    @classmethod
    def of(cls, certificate: x509.Certificate, enrolled_at: dt.datetime,
           group: str | None = None) -> EnrollmentStatus:
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return cls(
            device_id=str(names[0].value) if names else "",
            serial=f"{certificate.serial_number:X}",
            not_after=certificate.not_valid_after_utc.isoformat(),
            enrolled_at=_rfc3339(enrolled_at),
            group=group,
        )

    @property
    def revoked(self) -> bool:
        return self.state == "revoked"


@dataclass(frozen=True)
class NoticeBook:
    """The agent's notice bookkeeping: the highest sequence accepted, and an accepted
    notice whose action (a renewal) is not done yet, so a crash does not lose it."""

    last_sequence: int | None = None
    pending: dict | None = None  # {"type", "serial", "sequence"}


class DeviceState:
    """The files of one device's enrollment under ``directory`` (created 0700)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.certificate_path = self.directory / "device.crt.pem"
        self.chain_path = self.directory / "chain.pem"
        self.key_path = self.directory / "device.key.tss.pem"
        self.status_path = self.directory / "status.json"
        self.notices_path = self.directory / "notices.json"

    def save(self, certificate: x509.Certificate, chain: list[x509.Certificate],
             tss2_key_pem: bytes, enrolled_at: dt.datetime | None = None,
             group: str | None = None) -> EnrollmentStatus:
        """Write the key, chain, certificate, then status.json; return the status."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = EnrollmentStatus.of(certificate, enrolled_at or dt.datetime.now(dt.UTC),
                                     group)
        chain = issuer_first(certificate, chain)
        atomic_write(self.key_path, tss2_key_pem, 0o600)
        atomic_write(self.chain_path, b"".join(c.public_bytes(PEM) for c in chain))
        atomic_write(self.certificate_path, certificate.public_bytes(PEM))
        self._write_status(status)
        return status

    def _write_status(self, status: EnrollmentStatus) -> None:
        document = {k: v for k, v in asdict(status).items() if v is not None}
        atomic_write(self.status_path, json.dumps(document, indent=2).encode() + b"\n")

    def mark_revoked(self, serial: int, reason: str | None, revoked_by: str,
                     now: dt.datetime | None = None) -> EnrollmentStatus:
        """Stop using the certificate: move it aside (device.crt.pem.revoked-<serial>),
        then record state "revoked" in status.json. Idempotent."""
        hex_serial = f"{serial:X}"
        certificate = self.certificate()
        if certificate is not None and certificate.serial_number == serial:
            os.replace(self.certificate_path,
                       self.certificate_path.with_name(f"{self.certificate_path.name}"
                                                       f".revoked-{hex_serial}"))
            _fsync_directory(self.directory)
        previous = self.status()
        status = EnrollmentStatus(
            device_id=previous.device_id if previous else "", serial=hex_serial,
            not_after=previous.not_after if previous and previous.serial == hex_serial
            else "", enrolled_at=previous.enrolled_at if previous else "",
            group=previous.group if previous else None, state="revoked", reason=reason,
            revoked_at=_rfc3339(now or dt.datetime.now(dt.UTC)), revoked_by=revoked_by)
        self._write_status(status)
        return status

    def notice_book(self) -> NoticeBook:
        try:
            document = json.loads(self.notices_path.read_text())
            sequence = document.get("last_sequence")
            pending = document.get("pending")
            return NoticeBook(sequence if isinstance(sequence, int) else None,
                              pending if isinstance(pending, dict) else None)
        except (FileNotFoundError, ValueError, AttributeError):
            return NoticeBook()

    def save_notice_book(self, book: NoticeBook) -> None:
        """Atomically: a crash leaves the old or the new bookkeeping, never a mix."""
        atomic_write(self.notices_path, json.dumps(asdict(book)).encode() + b"\n", 0o600)

    def certificate(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self.certificate_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def chain(self) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates(self.chain_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return []

    def status(self) -> EnrollmentStatus | None:
        """status.json; keys this version does not know are ignored (newer SDKs)."""
        try:
            document = json.loads(self.status_path.read_text())
            known = {f.name for f in fields(EnrollmentStatus)}
            return EnrollmentStatus(**{k: v for k, v in document.items() if k in known})
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            return None

    def current_certificate(self, device_key: PublicKeyTypes,
                            now: dt.datetime | None = None) -> x509.Certificate | None:
        """The stored certificate if it is complete, in its validity period, issued by the
        stored chain's first certificate, and for ``device_key``; else None."""
        certificate, chain, status = self.certificate(), self.chain(), self.status()
        if certificate is None or not chain or status is None or not self.key_path.exists():
            return None
        if status.revoked:
            return None
        now = now or dt.datetime.now(dt.UTC)
        if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
            return None
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if (certificate.public_key().public_bytes(serialization.Encoding.DER, spki)
                != device_key.public_bytes(serialization.Encoding.DER, spki)):
            return None
        try:
            certificate.verify_directly_issued_by(issuer_first(certificate, chain)[0])
        except (InvalidSignature, ValueError, TypeError):
            return None
        return certificate


def issuer_first(certificate: x509.Certificate,
                 chain: list[x509.Certificate]) -> list[x509.Certificate]:
    """The chain ordered from the certificate's issuer up to the root.

    EST /cacerts is a CMS SET OF certificates (RFC 5652 10.2.3, DER sorts its members), so
    its order says nothing; TLS and verifiers want issuer first (RFC 8446 4.4.2).
    """
    remaining, ordered, name = list(chain), [], certificate.issuer
    while remaining:
        issuer = next((c for c in remaining if c.subject == name), None)
        if issuer is None:
            break
        ordered.append(issuer)
        remaining.remove(issuer)
        if issuer.subject == issuer.issuer:
            break
        name = issuer.issuer
    return ordered + remaining
