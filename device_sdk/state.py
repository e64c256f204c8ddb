"""The device's enrollment state directory, written atomically.

    device.crt.pem      the device certificate
    chain.pem           issuing CA then root (EST /cacerts)
    device.key.tss.pem  the device key as a TSS2 PRIVATE KEY (a TPM-wrapped blob, useless
                        without this TPM; for TLS through the tpm2-openssl provider)
    status.json         {"device_id", "serial", "not_after", "enrolled_at"}

Each file is written to a temporary name, fsynced and renamed (POSIX rename is atomic),
then the directory is fsynced. status.json goes last: it marks a complete enrollment, and
readers still check that the certificate matches the TPM's current device key.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from dataclasses import asdict, dataclass
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
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclass(frozen=True)
class EnrollmentStatus:
    device_id: str
    serial: str  # hex, as openssl x509 -serial prints it
    not_after: str  # RFC 3339, UTC
    enrolled_at: str  # RFC 3339, UTC

    @classmethod
    def of(cls, certificate: x509.Certificate, enrolled_at: dt.datetime) -> EnrollmentStatus:
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return cls(
            device_id=str(names[0].value) if names else "",
            serial=f"{certificate.serial_number:X}",
            not_after=certificate.not_valid_after_utc.isoformat(),
            enrolled_at=enrolled_at.astimezone(dt.UTC).replace(microsecond=0).isoformat(),
        )


class DeviceState:
    """The files of one device's enrollment under ``directory`` (created 0700)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.certificate_path = self.directory / "device.crt.pem"
        self.chain_path = self.directory / "chain.pem"
        self.key_path = self.directory / "device.key.tss.pem"
        self.status_path = self.directory / "status.json"

    def save(self, certificate: x509.Certificate, chain: list[x509.Certificate],
             tss2_key_pem: bytes, enrolled_at: dt.datetime | None = None) -> EnrollmentStatus:
        """Write the key, chain, certificate, then status.json; return the status."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = EnrollmentStatus.of(certificate, enrolled_at or dt.datetime.now(dt.UTC))
        chain = issuer_first(certificate, chain)
        atomic_write(self.key_path, tss2_key_pem, 0o600)
        atomic_write(self.chain_path, b"".join(c.public_bytes(PEM) for c in chain))
        atomic_write(self.certificate_path, certificate.public_bytes(PEM))
        atomic_write(self.status_path, json.dumps(asdict(status), indent=2).encode() + b"\n")
        return status

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
        try:
            return EnrollmentStatus(**json.loads(self.status_path.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def current_certificate(self, device_key: PublicKeyTypes,
                            now: dt.datetime | None = None) -> x509.Certificate | None:
        """The stored certificate if it is complete, in its validity period, issued by the
        stored chain's first certificate, and for ``device_key``; else None."""
        certificate, chain, status = self.certificate(), self.chain(), self.status()
        if certificate is None or not chain or status is None or not self.key_path.exists():
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
