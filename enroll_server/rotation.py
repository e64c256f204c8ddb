"""`enroll-server ca rotate`: a new issuing CA generation, and the fleet moved to it.

    1. a new key: in the same PKCS#11 token, label issuing-ca-<n> (or, for a file-backed
       instance, ca/issuing-ca-<n>.key encrypted with secrets/issuing-ca-<n>.pass);
    2. its certificate from the root (ca/root-ca.key, encrypted with secrets/root-ca.pass:
       bring both back online for the rotation), subject "<O> Issuing CA <n>", written
       to ca/issuing-ca-<n>.pem;
    3. its delegated certificates: its own OCSP responder, and the notice signer (now
       certified by the new CA);
    4. one transaction: the new CA recorded active and the old one retired (it keeps
       signing its CRL and its OCSP responder, never a device certificate), the new CA's
       first CRL, a signed "ca_rotation" notice for every active device with a
       ``renew_after`` time spread over the window (SECURITY-CHECKLIST 27: the fleet must
       not come back at once), and the audit record;
    5. ca/ca-chain.pem rewritten: new issuing CA + root (what clients are given; a client
       that trusts only the root keeps working, servers send their chain);
    6. the TLS server certificates of the EST server and of the broker re-issued from the
       new CA, same keys and names (tls_certificates.py); the broker is sent SIGHUP.

Crash safety: nothing is visible to any other process before the commit of step 4. A
crash before it leaves at most an unused key (token label or file) and certificate file;
running the command again takes the next free name (issuing-ca-<n+1>). A crash after it
leaves the TLS certificates on the old CA: `enroll-server ca reissue-tls` does step 6.

Servers pick the new CA and their new TLS certificate up when they reload (SIGHUP) or
restart; until then they refuse to issue (503 ca.rotated, store/devices.py
_require_active_ca). The relay picks it up by
itself (notify/duties.py).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .authorities import (
    Authorities,
    export_softhsm_conf,
    instance_relative,
    load_key_at,
    pem,
    read_secret,
    records,
)
from .ca import delegated, hierarchy
from .ca.keys import generate_pkcs11_ec_key, load_file_private_key, write_file_private_key
from .ca.profiles import CA_NAME_PATTERN, FIRST_CA_NAME
from .ca.signer import Signer
from .config import Settings
from .errors import EnrollError
from .notify.issuer import NoticeIssuer
from .revocation import CrlPublisher
from .store.records import CrlRecord
from .store.repository import Repository, naive_utc
from .tls_certificates import Reissued, reissue_tls_certificates

MAX_SPREAD = dt.timedelta(days=30)


class RotationError(EnrollError):
    code = "ca.rotation_failed"
    public = "The CA rotation could not be done."


@dataclass(frozen=True)
class RotationResult:
    name: str
    retired: list[str]
    certificate: x509.Certificate
    certificate_path: Path
    trust_anchor: Path
    crl_number: int
    notices: int
    renew_after: list[dt.datetime]  # as queued, in device order
    tls: list[Reissued]

    def to_json(self) -> dict[str, object]:
        times = sorted(self.renew_after)
        return {"active": self.name, "retired": self.retired,
                "tls": [r.to_json() for r in self.tls],
                "subject": self.certificate.subject.rfc4514_string(),
                "not_after": self.certificate.not_valid_after_utc.isoformat(),
                "certificate": str(self.certificate_path),
                "trust_anchor": str(self.trust_anchor), "crl_number": self.crl_number,
                "notices": self.notices,
                "renew_after_first": iso(times[0]) if times else None,
                "renew_after_last": iso(times[-1]) if times else None}


def iso(moment: dt.datetime) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-01-02T03:04:05.678Z."""
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def spread_times(count: int, start: dt.datetime, spread: dt.timedelta,
                 rng: secrets.SystemRandom | None = None) -> list[dt.datetime]:
    """count times in [start, start + spread): one uniformly random time in each of count
    equal slots, the slots dealt out in random order. Evenly spread (no clumps, unlike
    independent draws) yet unpredictable per device, and distinct."""
    rng = rng or secrets.SystemRandom()
    slots = list(range(count))
    rng.shuffle(slots)
    width = spread / max(count, 1)
    return [start + width * (slot + rng.random()) for slot in slots]


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")


def _organization(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(names[0].value) if names else "Enroll Fleet"


def load_root(settings: Settings, key_file: Path | None, passphrase_file: Path | None
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:  # fmt: skip
    """The root certificate and its key (offline between rotations: bring both back)."""
    root_path = settings.ca.root_certificate
    key_file = key_file or settings.instance_dir / "ca/root-ca.key"
    passphrase_file = passphrase_file or settings.instance_dir / "secrets/root-ca.pass"
    for path, what in ((root_path, "root CA certificate"), (key_file, "root CA key"),
                       (passphrase_file, "root CA key passphrase")):
        if not Path(path).exists():
            raise RotationError(f"The {what} is needed to certify the new CA: {path} is "
                                "missing (restore it from offline storage, or pass "
                                "--root-key / --root-passphrase-file).",
                                code="ca.root_key_missing")
    root = x509.load_pem_x509_certificate(root_path.read_bytes())
    try:
        key = load_file_private_key(key_file, read_secret(passphrase_file).encode())
    except ValueError as exc:
        raise RotationError("The root CA key cannot be decrypted with that passphrase.",
                            code="ca.root_key_unusable", detail=str(exc)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != root.public_key():
        raise RotationError("The root CA key does not belong to the root certificate "
                            f"{root_path}.", code="ca.root_key_mismatch")
    return root, key


def _new_key(settings: Settings, taken: set[str], start: int
             ) -> tuple[str, int, object, ec.EllipticCurvePublicKey, str, str | None]:  # fmt: skip
    """A fresh CA key under the first free name issuing-ca-<n>, n >= start: (name, n,
    private key, public key, key label or file, passphrase file)."""
    for generation in range(start, start + 100):
        name = f"{FIRST_CA_NAME}-{generation}"
        if name in taken:
            continue
        if settings.ca.backend == "pkcs11":
            pkcs11 = settings.ca.pkcs11
            export_softhsm_conf(settings)
            try:
                public = generate_pkcs11_ec_key(pkcs11.module, pkcs11.token_label, name,
                                                read_secret(pkcs11.pin_file))
            except ValueError:
                continue  # the label is left from an interrupted rotation: skip it
            key = load_key_at(settings, "pkcs11", name, None)
            return name, generation, key, public, name, None
        key_path = settings.instance_dir / "ca" / f"{name}.key"
        pass_path = settings.instance_dir / "secrets" / f"{name}.pass"
        if key_path.exists() or pass_path.exists():
            continue
        passphrase = secrets.token_urlsafe(24)
        _write_secret(pass_path, passphrase)
        private = ec.generate_private_key(ec.SECP256R1())
        write_file_private_key(key_path, private, passphrase.encode())
        return (name, generation, private, private.public_key(),
                instance_relative(settings, key_path), instance_relative(settings, pass_path))
    raise RotationError("No free CA name found.", code="ca.no_free_name")


def rotate(settings: Settings, repository: Repository, spread: dt.timedelta, *, actor: str,
           root_key: Path | None = None, root_passphrase_file: Path | None = None,
           clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
           rng: secrets.SystemRandom | None = None) -> RotationResult:
    """Create the next CA generation and move the fleet to it (see the module doc)."""
    if not dt.timedelta(0) < spread <= MAX_SPREAD:
        raise RotationError("The spread must be longer than 0 and at most 30 days.",
                            code="ca.bad_spread")
    if spread > dt.timedelta(days=settings.notices.ttl_days):
        raise RotationError(f"The spread must end before the notices expire "
                            f"(notices.ttl_days = {settings.notices.ttl_days}).",
                            code="ca.bad_spread")
    authorities = Authorities(settings, repository, clock)
    previous = authorities.active
    root, root_private = load_root(settings, root_key, root_passphrase_file)
    if previous.ca_certificate.issuer != root.subject:
        raise RotationError("The active issuing CA was not issued by this root.",
                            code="ca.root_key_mismatch")
    existing = {record.name for record in records(repository)}
    name, generation, key, public, key_label, passphrase_file = _new_key(
        settings, existing, len(existing) + 1)
    if CA_NAME_PATTERN.fullmatch(name) is None:  # pragma: no cover - names are ours
        raise RotationError("Bad CA name.", code="ca.bad_name")
    certificate = hierarchy.make_issuing_ca(public, root, root_private,
                                            _organization(root), generation=generation)
    certificate_path = settings.instance_dir / "ca" / f"{name}.pem"
    _write_atomic(certificate_path, pem(certificate).encode())
    signer = Signer(certificate, key, authorities.chain, name=name)  # type: ignore[arg-type]
    if key.public_key() != certificate.public_key():  # type: ignore[attr-defined]
        raise RotationError("The new key does not match its certificate.",
                            code="ca.key_mismatch")

    from .services import delegates_dir

    directory = delegates_dir(settings)
    delegated.ocsp_responder(directory, signer, settings.revocation.responder_lifetime_days)
    notices = NoticeIssuer(settings.notices, delegated.notice_signer(directory, signer),
                           settings.mqtt.topic_prefix)

    now = clock()

    def commit(retired: list[str], current: list
               ) -> tuple[list[str], CrlRecord, list[dt.datetime]]:  # fmt: skip
        """In the rotation's transaction: the new CA's first CRL, a ca_rotation notice
        per current certificate (renew_after spread over the window), the audit."""
        crl = CrlPublisher(settings.revocation, signer, clock).publish()
        times = spread_times(len(current), now, spread, rng)
        for certificate_row, renew_after in zip(current, times, strict=True):
            notices.enqueue(certificate_row.device, "ca_rotation", certificate_row.serial,
                            now, extra={"renew_after": iso(renew_after), "ca": name})
        repository.audit(actor=actor, action="ca.rotate", outcome="success", detail={
            "active": name, "retired": retired, "notices": len(current),
            "spread_seconds": spread.total_seconds(),
            "subject": certificate.subject.rfc4514_string()})
        return retired, crl, times

    retired, crl, times = repository.rotate_ca(
        {"name": name, "certificate_pem": pem(certificate),
         "key_backend": settings.ca.backend, "key_label": key_label,
         "key_passphrase_file": passphrase_file,
         "not_after": naive_utc(certificate.not_valid_after_utc)},
        previous.name, now, commit)
    trust_anchor = settings.instance_dir / "ca" / "ca-chain.pem"
    _write_atomic(trust_anchor, (pem(certificate) + "".join(
        pem(c) for c in authorities.chain)).encode())
    ours = {record.certificate.subject for record in records(repository)}
    try:
        tls = reissue_tls_certificates(settings, signer, ours)
    except (OSError, ValueError) as error:  # the rotation itself is done: say what is left
        tls = [Reissued("server", settings.tls.cert, None,
                        f"could not re-issue the TLS certificates ({error}): fix it, then run "
                        "`enroll-server ca reissue-tls`")]
    return RotationResult(name, retired, certificate, certificate_path, trust_anchor,
                          crl.crl_number, len(times), times, tls)


def describe(settings: Settings, repository: Repository,
             now: dt.datetime | None = None) -> list[dict[str, object]]:
    """`ca list`: every CA generation with what it is still used for."""
    now = now or dt.datetime.now(dt.UTC)
    rows = []
    for record in records(repository):
        unexpired = repository.unexpired_certificates(record.name, now)
        rows.append({"name": record.name, "status": record.status,
                     "live": record.live(now),
                     "subject": record.certificate.subject.rfc4514_string(),
                     "not_after": record.certificate.not_valid_after_utc,
                     "key": (f"pkcs11:{settings.ca.pkcs11.token_label}/{record.key_label}"
                             if record.key_backend == "pkcs11" else record.key_label),
                     "certificates": unexpired, "created_at": record.created_at,
                     "retired_at": record.retired_at})
    return rows
