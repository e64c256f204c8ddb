"""Transaction boundaries: the base every aggregate of the repository builds on.

SQLite "database is locked" after the busy timeout, and lost PostgreSQL connections, are
turned into StoreUnavailable (503 + Retry-After), never a 500 (SECURITY-CHECKLIST 20).

SQLite write transactions begin IMMEDIATE behind a writer queue (_SqliteWriterLock);
read-only ones are deferred WAL snapshots that never wait for writers. Measurements
behind both, and behind the compiled lookups, are in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import peewee as pw

from ..errors import StoreUnavailable

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


class Transactions:
    """The transaction boundary and the compiled lookups every aggregate uses."""

    def __init__(self, database: pw.Database) -> None:
        self.database = database
        self._writer = _writer_lock(database)
        self.postgres = isinstance(database, pw.PostgresqlDatabase)
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

    def snapshot(self) -> contextlib.AbstractContextManager[None]:
        """One read-only snapshot for several reads (credential checks): consistent, and
        on SQLite beside the writers. Nothing inside it may write."""
        return self.transaction(readonly=True)

    def read(self, work: Callable[[], T]) -> T:
        """``work`` in a read-only transaction: on SQLite beside the writers, not queued."""
        with self.transaction(readonly=True):
            return work()

    def ping(self) -> None:
        """One round trip to the database (readiness)."""
        with self.transaction(readonly=True):
            self.database.execute_sql("SELECT 1")

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

    def _locked(self, query: pw.ModelSelect) -> pw.ModelSelect:
        """``query`` taking row locks on PostgreSQL (SELECT ... FOR UPDATE), for the rows
        that serialise issuance and revocation (docs/design.md). SQLite needs none: every
        write transaction holds the database's one write lock from its start."""
        return query.for_update() if self.postgres else query
