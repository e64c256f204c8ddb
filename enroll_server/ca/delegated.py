"""Delegated signing keys: the OCSP responder (RFC 6960 4.2.2.2) and the notice signer.

Both are P-256 keys with short-lived certificates issued by the issuing CA
(``ca/<name>.pem``). Every CA generation has its own OCSP responder (the first CA's is
``ocsp-responder``, generation ``issuing-ca-2``'s is ``ocsp-responder-issuing-ca-2`` ...):
RFC 6960 4.2.2.2 wants the responder certified by the CA whose certificates it answers
for. There is one notice signer, certified by the active CA (devices verify it up to the
root). The notice signer can forge revocations and renewals to every device, so neither
key is ever a plain file:

- When the CA key is in a PKCS#11 token, they are generated in the same token (label =
  the name, sensitive and not extractable) and sign through ``Pkcs11PrivateKey``, the
  abstraction the CA uses: OCSP through cryptography's builder, notices by hand
  (notify/notices.py signs with ``key.sign``, which joserfc cannot do for a key it
  cannot export). They share the token's one logged-in session of the process.
- Otherwise they are PKCS#8 files encrypted with the passphrase in
  ``secrets/delegated-keys.pass`` beside the CA directory (created on first use, 0600).

Upgrade path: an instance made before this keeps plain ``ca/<name>.key`` files. They still
load, with a warning, until ``enroll-server delegated-keys migrate`` moves them (a new key
in the token and a new certificate, or the same key encrypted in place).

``ensure_delegate`` is idempotent: it loads or creates the key and (re)issues the
certificate when it is missing, not for this key or this CA, or within a quarter of its
lifetime of its end. Creation is serialised across processes with flock(2).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import SignerUnavailable
from .keys import Pkcs11PrivateKey, load_file_private_key, write_file_private_key
from .ocsp import issue_ocsp_responder_certificate
from .signer import Signer

log = logging.getLogger(__name__)
Issue = Callable[[object, x509.Certificate, ec.EllipticCurvePublicKey, dt.timedelta,
                  dt.datetime], x509.Certificate]
NOTICE_SIGNER = "notice-signer"


@dataclass(frozen=True)
class Delegate:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # certificate, issuing CA (, root)


def passphrase_path(directory: Path) -> Path:
    """The passphrase of file-backed delegated keys: ``secrets/`` beside the CA dir."""
    return directory.parent / "secrets" / "delegated-keys.pass"


def key_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.key"


def is_plain_key_file(path: Path) -> bool:
    """A PEM private key stored without encryption (the pre-upgrade layout)."""
    return path.exists() and b"ENCRYPTED" not in path.read_bytes()[:64]


def file_passphrase(directory: Path) -> bytes:
    """The file keys' passphrase, created (0600, never replaced) on first use."""
    path = passphrase_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip().encode()
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip().encode()


@contextmanager
def creation_lock(directory: Path) -> Iterator[None]:
    """One process at a time creates keys (PKCS#11 labels are not unique)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(directory / ".delegated-keys.lock",
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def delegate_key(directory: Path, name: str, ca_key: object) -> ec.EllipticCurvePrivateKey:
    """``name``'s key: in the CA's token if the CA key is, else an encrypted file."""
    path = key_path(directory, name)
    if is_plain_key_file(path):
        log.warning("%s is an unencrypted delegated signing key; run `enroll-server "
                    "delegated-keys migrate` to move it into the HSM (or encrypt it)", path)
        return load_ec_key(path, None)
    if isinstance(ca_key, Pkcs11PrivateKey):
        with creation_lock(directory):
            return ca_key.sibling(name, create=True)
    passphrase = file_passphrase(directory)
    if not path.exists():
        try:
            write_file_private_key(path, ec.generate_private_key(ec.SECP256R1()), passphrase)
        except FileExistsError:
            pass  # another process created it meanwhile: use theirs
    return load_ec_key(path, passphrase)


def load_ec_key(path: Path, passphrase: bytes | None) -> ec.EllipticCurvePrivateKey:
    key = load_file_private_key(path, passphrase)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: must be an EC key")
    return key


def _needs_new_certificate(certificate: x509.Certificate | None,
                           public_key: ec.EllipticCurvePublicKey, ca: x509.Certificate,
                           lifetime: dt.timedelta, now: dt.datetime) -> bool:
    if certificate is None or certificate.issuer != ca.subject:
        return True
    if certificate.public_key() != public_key:
        return True
    try:
        certificate.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):  # e.g. the CA was re-keyed
        return True
    return certificate.not_valid_after_utc - now < lifetime / 4


def ensure_delegate(directory: Path, name: str, signer: Signer, issue: Issue,
                    lifetime: dt.timedelta, now: dt.datetime | None = None) -> Delegate:
    """Load or create ``name``'s key and a current certificate for it. With the token
    unreachable, a process still starts on the certificate it has (signing then answers
    503 until the token is back, like the CA key)."""
    now = now or dt.datetime.now(dt.UTC)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path = directory / f"{name}.pem"
    certificate = (x509.load_pem_x509_certificate(cert_path.read_bytes())
                   if cert_path.exists() else None)
    try:
        key = delegate_key(directory, name, signer.private_key)
        public_key = key.public_key()
    except SignerUnavailable:
        if certificate is None:
            raise
        log.warning("delegated key %s: token unavailable; keeping its certificate", name)
        key = signer.private_key.sibling(name, public_key=certificate.public_key())
        return Delegate(key, certificate,
                        (certificate, *signer.ca_certificates()))
    if _needs_new_certificate(certificate, public_key, signer.ca_certificate, lifetime, now):
        certificate = issue(signer.private_key, signer.ca_certificate, public_key,
                            lifetime, now)
        temporary = cert_path.with_name(f".{cert_path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        temporary.replace(cert_path)
    return Delegate(key, certificate, (certificate, *signer.ca_certificates()))


def responder_name(ca_name: str) -> str:
    """The name (file stem, token label) of CA ca_name's OCSP responder key."""
    return "ocsp-responder" if ca_name == "issuing-ca" else f"ocsp-responder-{ca_name}"


def ocsp_responder(directory: Path, signer: Signer, lifetime_days: int,
                   now: dt.datetime | None = None) -> Delegate:
    """The delegated OCSP responder of the CA generation ``signer`` (retired ones too)."""
    return ensure_delegate(directory, responder_name(signer.name), signer,
                           issue_ocsp_responder_certificate,
                           dt.timedelta(days=lifetime_days), now)


def notice_signer(directory: Path, signer: Signer, now: dt.datetime | None = None,
                  lifetime: dt.timedelta = dt.timedelta(days=90)) -> Delegate:
    """The notice signer, certified by ``signer``: pass the active CA (a certificate from
    a retired one is replaced on the next call with the active one)."""
    from ..notify.notices import issue_notice_signing_certificate

    return ensure_delegate(directory, NOTICE_SIGNER, signer,
                           issue_notice_signing_certificate, lifetime, now)
