"""Delegated signing keys: the OCSP responder (RFC 6960 4.2.2.2) and the notice signer.

Both are P-256 file keys beside the instance (``ca/ocsp-responder.*``,
``ca/notice-signer.*``, mode 0600) with short-lived certificates issued by the issuing CA.
Every CA generation has its own OCSP responder (the first CA's is ``ocsp-responder``,
generation ``issuing-ca-2``'s is ``ocsp-responder-issuing-ca-2`` ...): RFC 6960 4.2.2.2
wants the responder certified by the CA whose certificates it answers for. There is one
notice signer, certified by the active CA (devices verify it up to the root).
They are not in the PKCS#11 token on purpose: a token allows one login per process
(ca/keys.py), they sign thousands of times per second (OCSP), and their compromise is
bounded by their short lifetime, their single purpose (an EKU each) and rotation. The
issuing CA key itself never leaves the token.

``ensure_delegate`` is idempotent: it loads the pair, and (re)issues the certificate when
it is missing, not for this key or this CA, or within a quarter of its lifetime of its
end. The server master process calls it before forking workers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .keys import load_file_private_key, write_file_private_key
from .ocsp import issue_ocsp_responder_certificate
from .signer import Signer

Issue = Callable[[object, x509.Certificate, ec.EllipticCurvePublicKey, dt.timedelta,
                  dt.datetime], x509.Certificate]


@dataclass(frozen=True)
class Delegate:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # certificate, issuing CA (, root)


def _paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.key", directory / f"{name}.pem"


def _needs_new_certificate(certificate: x509.Certificate | None, key: ec.EllipticCurvePrivateKey,
                           ca: x509.Certificate, lifetime: dt.timedelta,
                           now: dt.datetime) -> bool:  # fmt: skip
    if certificate is None or certificate.issuer != ca.subject:
        return True
    if certificate.public_key() != key.public_key():
        return True
    try:
        certificate.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):  # e.g. the CA was re-keyed
        return True
    return certificate.not_valid_after_utc - now < lifetime / 4


def ensure_delegate(directory: Path, name: str, signer: Signer, issue: Issue,
                    lifetime: dt.timedelta, now: dt.datetime | None = None) -> Delegate:
    """Load or create ``name``'s key and a current certificate for it."""
    now = now or dt.datetime.now(dt.UTC)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, cert_path = _paths(directory, name)
    if not key_path.exists():
        try:
            write_file_private_key(key_path, ec.generate_private_key(ec.SECP256R1()), None)
        except FileExistsError:
            pass  # another process created it meanwhile: use theirs
    key = load_file_private_key(key_path, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: must be an EC key")
    certificate = (x509.load_pem_x509_certificate(cert_path.read_bytes())
                   if cert_path.exists() else None)
    if _needs_new_certificate(certificate, key, signer.ca_certificate, lifetime, now):
        certificate = issue(signer.private_key, signer.ca_certificate, key.public_key(),
                            lifetime, now)
        temporary = cert_path.with_name(f".{cert_path.name}.tmp")
        temporary.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        temporary.replace(cert_path)
    return Delegate(key, certificate, (certificate, *signer.ca_certificates()))


def responder_name(ca_name: str) -> str:
    """The file stem of CA ca_name's OCSP responder key and certificate."""
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

    return ensure_delegate(directory, "notice-signer", signer,
                           issue_notice_signing_certificate, lifetime, now)
