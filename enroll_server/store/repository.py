"""Transactions over the models. The only module that writes enrollment state.

SQLite "database is locked" after the busy timeout, and lost PostgreSQL connections, are
turned into StoreUnavailable (503 + Retry-After), never a 500 (SECURITY-CHECKLIST 20).

SQLite write transactions begin IMMEDIATE behind a writer queue (_SqliteWriterLock);
read-only ones are deferred WAL snapshots that never wait for writers. Measurements
behind both, and behind the compiled lookups, are in docs/performance.md.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import peewee as pw
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ..errors import Conflict, NotFound, StoreUnavailable
from ..policy.csr import public_key_sha256
from .models import (
    AttestationChallenge,
    AuditEvent,
    Certificate,
    Device,
    EnrollmentGroup,
    EnrollmentToken,
    IssuingCa,
    PendingRequest,
    utcnow,
)

T = TypeVar("T")


class _SqliteWriterLock:
    """Queues the write transactions on one SQLite file: threads on a lock, processes
    (gunicorn workers, CLI) on flock(2) of "<database>-writer.lock".

    Without it concurrent writers meet in SQLite's busy handler, which retries after
    sleeps of 1, 2, 5 ... 100 ms: under load a writer can lose every race for seconds,
    up to the busy timeout (a 503), while others commit. A queued writer starts as soon
    as the lock is free. The wait for the thread lock is bounded by the busy timeout.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._thread_lock = threading.Lock()
        self._fd = -1
        self._pid = 0

    def __enter__(self) -> None:
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise pw.OperationalError("database is locked (writer queue)")
        try:
            if self._pid != os.getpid():
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def _after_fork_in_child(self) -> None:
        """A fresh lock (another thread may have held it at fork) and its own open file
        (flock belongs to the open file, which the parent shares)."""
        self._thread_lock = threading.Lock()
        if self._pid and self._fd >= 0:
            os.close(self._fd)
        self._fd, self._pid = -1, 0


_writer_locks: dict[str, _SqliteWriterLock] = {}
_writer_locks_guard = threading.Lock()


def _writer_lock(database: pw.Database) -> _SqliteWriterLock | None:
    """One writer lock per SQLite file and process; None for other databases."""
    if not isinstance(database, pw.SqliteDatabase) or database.database in ("", ":memory:"):
        return None
    path = os.path.realpath(database.database) + "-writer.lock"
    with _writer_locks_guard:
        lock = _writer_locks.get(path)
        if lock is None:
            lock = _writer_locks[path] = _SqliteWriterLock(path, float(database.timeout))
        return lock


def _reset_writer_locks() -> None:
    for lock in _writer_locks.values():
        lock._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_writer_locks)


def token_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def naive_utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


class Repository:
    def __init__(self, database: pw.Database) -> None:
        self.database = database
        self._writer = _writer_lock(database)
        # Keyed by names: a peewee Field's == builds an expression, never False.
        self._compiled: dict[tuple[str, str], tuple[str, list[Any]]] = {}

    @contextmanager
    def transaction(self, readonly: bool = False) -> Iterator[None]:
        """One atomic unit; storage faults become StoreUnavailable.

        readonly: the work only reads. On SQLite it then runs as a deferred snapshot
        (WAL) beside the writers; a write inside it could fail with "database is locked"
        at once (a snapshot cannot be upgraded after another commit). Nested calls join
        the outer transaction (a savepoint)."""
        try:
            self.database.connect(reuse_if_open=True)
            if self._writer is None or self.database.in_transaction():
                with self.database.atomic():
                    yield
            elif readonly:
                with self.database.atomic(lock_type="DEFERRED"):
                    yield
            else:
                with self._writer, self.database.atomic(lock_type="IMMEDIATE"):
                    yield
        except (pw.OperationalError, pw.InterfaceError) as exc:
            if not self.database.in_transaction():
                self.database.close()  # a dropped connection is reopened next time
            raise StoreUnavailable(detail=f"database error: {exc}") from None

    def run(self, work: Callable[[], T]) -> T:
        with self.transaction():
            return work()

    def read(self, work: Callable[[], T]) -> T:
        """``work`` in a read-only transaction: on SQLite beside the writers, not queued."""
        with self.transaction(readonly=True):
            return work()

    def _first(self, field: pw.Field, value: Any) -> Any:
        """``field.model.get_or_none(field == value)`` with its SQL built once.

        peewee builds a query's SQL at every execution, and once more for the message of
        a miss: ~0.35-0.8 ms of CPU per lookup here, more than SQLite's own work, on a
        path that runs these lookups several times per enrollment."""
        model = field.model
        key = (model._meta.table_name, field.name)
        compiled = self._compiled.get(key)
        if compiled is None:
            sql, params = model.select().where(field == value).limit(1).sql()
            if params[:1] != [field.db_value(value)]:  # pragma: no cover - peewee changed
                return model.get_or_none(field == value)
            compiled = self._compiled[key] = (sql, params[1:])
        sql, rest = compiled
        for row in model.raw(sql, field.db_value(value), *rest):
            return row
        return None

    # -- enrollment groups -------------------------------------------------------------
    def create_group(self, name: str, **fields: Any) -> EnrollmentGroup:
        with self.transaction():
            if EnrollmentGroup.get_or_none(EnrollmentGroup.name == name):
                raise Conflict(f"Enrollment group {name!r} already exists.",
                               code="group.exists")
            return EnrollmentGroup.create(name=name, **fields)

    def group(self, name: str) -> EnrollmentGroup:
        with self.transaction():
            group = EnrollmentGroup.get_or_none(EnrollmentGroup.name == name)
        if group is None:
            raise NotFound(f"No enrollment group named {name!r}.", code="group.not_found")
        return group

    def groups(self) -> list[EnrollmentGroup]:
        with self.transaction():
            return list(EnrollmentGroup.select().order_by(EnrollmentGroup.name))

    # -- enrollment tokens ------------------------------------------------------------
    def create_token(self, group: EnrollmentGroup, ttl: dt.timedelta, created_by: str,
                     device_id: str | None = None) -> tuple[str, EnrollmentToken]:
        """A one-time bearer secret (256 bits); only its SHA-256 is stored."""
        secret = "et_" + secrets.token_urlsafe(32)
        with self.transaction():
            row = EnrollmentToken.create(
                token_sha256=token_sha256(secret), group=group, device_id=device_id,
                created_by=created_by, expires_at=utcnow() + ttl)
        return secret, row

    def find_token(self, secret: str) -> EnrollmentToken | None:
        """Look up by hash. The index lookup is on a hash of a 256-bit secret, so its
        timing reveals nothing useful; the final comparison is constant time anyway."""
        digest = token_sha256(secret)
        row = self._first(EnrollmentToken.token_sha256, digest)
        if row is None or not hmac.compare_digest(row.token_sha256, digest):
            return None
        return row

    def consume_token(self, token: EnrollmentToken, device_id: str) -> bool:
        """Mark used exactly once; False when another request won the race."""
        updated = (EnrollmentToken.update(used_at=utcnow(), used_by_device=device_id)
                   .where((EnrollmentToken.id == token.id)
                          & (EnrollmentToken.used_at.is_null()))
                   .execute())
        return updated == 1

    # -- devices and certificates -----------------------------------------------------
    def device(self, device_id: str) -> Device | None:
        return self._first(Device.device_id, device_id)

    def certificate_by_fingerprint(self, fingerprint: str) -> Certificate | None:
        return Certificate.get_or_none(Certificate.fingerprint_sha256 == fingerprint)

    def active_certificate_for_key(self, device: Device, key_sha256: str) -> Certificate | None:
        return (Certificate.select()
                .where((Certificate.device == device)
                       & (Certificate.public_key_sha256 == key_sha256)
                       & (Certificate.status == "active"))
                .order_by(Certificate.id.desc()).first())

    def supersede_active_certificates(self, device: Device) -> int:
        """A device holds one active certificate: older ones become superseded."""
        return (Certificate.update(status="superseded")
                .where((Certificate.device == device) & (Certificate.status == "active"))
                .execute())

    def record_certificate(self, device: Device, certificate: x509.Certificate,
                           issued_via: str, renew_at: dt.datetime | None = None,
                           issuer: str = "issuing-ca") -> Certificate:
        """Store an issued certificate; call inside the enrollment transaction. issuer
        names the CA generation that signed it (IssuingCa.name)."""
        der = certificate.public_bytes(serialization.Encoding.DER)
        return Certificate.create(
            serial=str(certificate.serial_number), device=device,
            fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
            public_key_sha256=public_key_sha256(certificate.public_key()),
            subject=certificate.subject.rfc4514_string(),
            not_before=naive_utc(certificate.not_valid_before_utc),
            not_after=naive_utc(certificate.not_valid_after_utc),
            der=der, issued_via=issued_via, issuer=issuer,
            renew_at=naive_utc(renew_at) if renew_at is not None else None)

    # -- TPM attestation challenges ------------------------------------------------------
    def challenge(self, challenge_id: str) -> AttestationChallenge | None:
        """The challenge with its group (joined: no second query for ``.group``)."""
        return (AttestationChallenge.select(AttestationChallenge, EnrollmentGroup)
                .join(EnrollmentGroup)
                .where(AttestationChallenge.challenge_id == challenge_id[:64]).first())

    def consume_challenge(self, challenge: AttestationChallenge, now: dt.datetime) -> bool:
        """Mark a challenge used; False if a concurrent request used it first."""
        return bool(AttestationChallenge.update(used_at=now)
                    .where((AttestationChallenge.id == challenge.id)
                           & AttestationChallenge.used_at.is_null()).execute())

    def active_ca_name(self) -> str | None:
        """The name of the issuing CA generation that signs device certificates now (the
        issuing path checks it in its transaction: one compiled, indexed read)."""
        row = self._first(IssuingCa.status, "active")
        return row.name if row is not None else None

    def serial_exists(self, serial: int) -> bool:
        return Certificate.select().where(Certificate.serial == str(serial)).exists()

    def devices(self, group: str | None = None) -> list[Device]:
        with self.transaction():
            query = Device.select(Device, EnrollmentGroup).join(EnrollmentGroup)
            if group:
                query = query.where(EnrollmentGroup.name == group)
            return list(query.order_by(Device.device_id))

    def certificates(self, device_id: str | None = None, status: str | None = None,
                     limit: int = 1000) -> list[Certificate]:
        with self.transaction():
            query = Certificate.select(Certificate, Device).join(Device)
            if device_id:
                query = query.where(Device.device_id == device_id)
            if status:
                query = query.where(Certificate.status == status)
            return list(query.order_by(Certificate.id.desc()).limit(limit))

    # -- manual approval (RFC 7030 4.2.3) ---------------------------------------------
    def pending_request(self, key_sha256: str) -> PendingRequest | None:
        return PendingRequest.get_or_none(PendingRequest.public_key_sha256 == key_sha256)

    def decide_pending(self, device_id: str, approve: bool, operator: str) -> int:
        with self.transaction():
            return (PendingRequest.update(status="approved" if approve else "rejected",
                                          decided_by=operator)
                    .where((PendingRequest.device_id == device_id)
                           & (PendingRequest.status == "pending"))
                    .execute())

    def pending_requests(self) -> list[PendingRequest]:
        with self.transaction():
            return list(PendingRequest.select(PendingRequest, EnrollmentGroup)
                        .join(EnrollmentGroup)
                        .where(PendingRequest.status == "pending"))

    # -- audit ------------------------------------------------------------------------
    def audit(self, *, actor: str, action: str, outcome: str, code: str = "",
              device_id: str | None = None, group: str | None = None,
              remote_addr: str | None = None, detail: dict[str, Any] | str = "") -> None:
        """Append an audit event in its own transaction (it must survive a rollback of
        the work it describes)."""
        text = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True,
                                                                 default=str)
        def clip(value: str | None, size: int) -> str | None:  # PostgreSQL refuses overflow
            return value if value is None else value[:size]

        with self.transaction():
            AuditEvent.create(actor=clip(actor, 128), action=clip(action, 64),
                              outcome=clip(outcome, 16), code=clip(code, 64),
                              device_id=clip(device_id, 64), group_name=clip(group, 64),
                              remote_addr=clip(remote_addr, 64), detail=text[:16384])

    def audit_events(self, device_id: str | None = None, limit: int = 100
                     ) -> list[AuditEvent]:
        with self.transaction():
            query = AuditEvent.select()
            if device_id:
                query = query.where(AuditEvent.device_id == device_id)
            return list(query.order_by(AuditEvent.id.desc()).limit(limit))
