"""EK identities (device ids) read from the files operators have: EK certificates (DER
as read from NV, or PEM), `tpm2_createek` public keys (TPM2B_PUBLIC or PEM/DER SPKI),
hex SHA-256 values, and whole CSVs or directories of them (`group allow-ek --from`)."""

from __future__ import annotations

import base64
import binascii
import csv
import re
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .. import attestation as att
from ..errors import EnrollError

_HEX64 = re.compile(r"[0-9a-f]{64}")


def ek_identity(ek_cert: Path | None, ek_public: Path | None, ek_sha256: str | None) -> str:
    given = [v for v in (ek_cert, ek_public, ek_sha256) if v is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --ek-cert, --ek-public, --ek-sha256")
    try:
        if ek_cert is not None:
            return _certificate_identity(ek_cert.read_bytes())
        if ek_public is not None:
            return att.ek_identity(ek_public.read_bytes())
    except (ValueError, EnrollError) as error:
        raise click.BadParameter(f"not an EK certificate / TPM2B_PUBLIC: {error}") from None
    identity = (ek_sha256 or "").strip().lower()
    if not _HEX64.fullmatch(identity):
        raise click.BadParameter("64 hex digits (SHA-256 of the EK SubjectPublicKeyInfo)",
                                 param_hint="--ek-sha256")
    return identity


def _certificate_identity(data: bytes) -> str:
    certificate = (att.load_pem_certificates(data)[0] if data.lstrip().startswith(b"-----")
                   else att.load_ek_certificate(data))
    return att.key_identity(certificate.public_key())


def _public_key_identity(data: bytes) -> str:
    """A PEM/DER SubjectPublicKeyInfo (`tpm2_createek -f pem`) or a TPM2B_PUBLIC (`-u`)."""
    if b"-----BEGIN PUBLIC KEY-----" in data:
        key = serialization.load_pem_public_key(data)
    elif data[:1] == b"\x30":
        key = serialization.load_der_public_key(data)
    else:
        return att.ek_identity(data)
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError(f"{type(key).__name__} is not a TPM EK type")
    return att.key_identity(key)


def _file_identity(path: Path) -> str:
    """One file of a directory of `tpm2_createek` / `tpm2_getekcertificate` outputs."""
    data = path.read_bytes()
    if b"CERTIFICATE-----" in data or path.suffix.lower() in (".crt", ".cer", ".der"):
        return _certificate_identity(data)
    return _public_key_identity(data)


_CSV_COLUMNS = ("ek_sha256", "ek_public", "ek_certificate")


def _csv_identity(row: dict[str, str]) -> str:
    given = {name: (row.get(name) or "").strip() for name in _CSV_COLUMNS}
    given = {name: value for name, value in given.items() if value}
    if len(given) != 1:
        raise ValueError(f"exactly one of {', '.join(_CSV_COLUMNS)} per row")
    (name, value), = given.items()
    if name == "ek_sha256":
        if not _HEX64.fullmatch(value.lower()):
            raise ValueError("ek_sha256 must be 64 hex digits")
        return value.lower()
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError(f"{name} is not base64") from None
    return _certificate_identity(data) if name == "ek_certificate" else _public_key_identity(data)


def read_allowlist(source: Path) -> list[tuple[str, str]]:
    """(EK identity, note) for every entry of a CSV or a directory; all or nothing.

    CSV: a header row with one of ek_sha256 / ek_public (base64 TPM2B_PUBLIC or DER SPKI)
    / ek_certificate (base64 DER) per row, and optionally note. Directory: every regular
    file is a `tpm2_createek -u` TPM2B_PUBLIC, a `-f pem` public key or an EK certificate;
    its name becomes the note.
    """
    entries, problems = [], []
    if source.is_dir():
        for path in sorted(p for p in source.iterdir() if p.is_file()):
            try:
                entries.append((_file_identity(path), path.name))
            except (ValueError, EnrollError) as error:
                problems.append(f"{path.name}: {error}")
    else:
        with source.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not set(reader.fieldnames) & set(_CSV_COLUMNS):
                raise click.BadParameter(f"a CSV header naming one of {', '.join(_CSV_COLUMNS)}"
                                         " (and optionally note)", param_hint="--from")
            for number, row in enumerate(reader, start=2):
                try:
                    entries.append((_csv_identity(row), (row.get("note") or "").strip()))
                except (ValueError, EnrollError) as error:
                    problems.append(f"line {number}: {error}")
    if problems:
        raise click.BadParameter("nothing imported; fix these entries first:\n  "
                                 + "\n  ".join(problems[:20]), param_hint="--from")
    if not entries:
        raise click.BadParameter("no EK in it", param_hint="--from")
    return entries
