"""Database connection (SQLite by default, PostgreSQL by URL) and forward migrations."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import peewee as pw
from playhouse.db_url import connect as connect_url
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as migrate_columns

from .models import (
    ALL_MODELS,
    AttestationChallenge,
    AttestationEvidence,
    Certificate,
    Device,
    EkAllowlistEntry,
    EnrollmentGroup,
    IssuingCa,
    OutboxMessage,
    PublishedCrl,
    SchemaVersion,
    database_proxy,
)

# The group every instance starts with; its name is also the EST path without a label.
DEFAULT_GROUP = {"name": "default", "auth_methods": "token,bootstrap", "lifetime_days": 365,
                 "key_types": "ec-p256,ec-p384,rsa", "min_rsa_bits": 2048}

# SQLite: WAL so readers never block the writer; FULL so a committed revocation survives
# power loss (FIELD-NOTES: ~9.6k commits/s); a busy timeout so concurrent workers wait
# for the write lock instead of failing (SECURITY-CHECKLIST item 20).
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "busy_timeout": 5000,
    "foreign_keys": 1,
}


def open_database(url: str, instance_dir: Path | None = None) -> pw.Database:
    """Connect and bind the models' proxy. Relative SQLite paths are instance-relative."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        relative = url[len("sqlite:///"):]
        if relative not in ("", ":memory:") and instance_dir is not None:
            url = "sqlite:///" + str(instance_dir / relative)
    if url.startswith("sqlite"):
        database = connect_url(url, pragmas=SQLITE_PRAGMAS)
    else:
        database = connect_url(url.replace("postgres://", "postgresql://", 1))
    database_proxy.initialize(database)
    return database


# Columns and tables added after schema 1, by the version that added them. Each step
# creates only what existed at its version, so an old database and a new one end up
# identical after migrating.
_ADDED_COLUMNS: dict[int, dict[type[pw.Model], tuple[str, ...]]] = {
    2: {EnrollmentGroup: ("ek_roots_pem", "ek_policy", "pcr_policy"),
        Device: ("ak_name", "last_reset_count")},
    3: {EnrollmentGroup: ("ek_crls_pem",),
        Device: ("revoked_at", "revocation_reason", "notice_sequence"),
        Certificate: ("renew_at", "renewal_noticed_at", "issuer")},
    4: {EnrollmentGroup: ("supersede_grace_seconds",), Certificate: ("revoke_after",)},
    5: {EnrollmentGroup: ("ek_vendors",)},
}
_ADDED_TABLES: dict[int, list[type[pw.Model]]] = {
    2: [EkAllowlistEntry, AttestationChallenge, AttestationEvidence],
    3: [OutboxMessage, PublishedCrl, IssuingCa],
    4: [],
    5: [],
}


@contextmanager
def _schema_view(version: int) -> Iterator[None]:
    """Models as they were at ``version``: later columns hidden from peewee meanwhile."""
    hidden: dict[type[pw.Model], dict[str, pw.Field]] = {}
    for added_in, columns in _ADDED_COLUMNS.items():
        if added_in > version:
            for model, names in columns.items():
                hidden.setdefault(model, {}).update(
                    {n: model._meta.fields[n] for n in names})
    for model, fields in hidden.items():
        for name in fields:
            model._meta.remove_field(name)
    try:
        yield
    finally:
        for model, fields in hidden.items():
            for name, field in fields.items():
                model._meta.add_field(name, field)


def _create_initial_schema(database: pw.Database) -> None:
    later = {m for tables in _ADDED_TABLES.values() for m in tables}
    with _schema_view(1):
        database.create_tables([m for m in ALL_MODELS if m not in later])
        EnrollmentGroup.create(**DEFAULT_GROUP)


def _add_schema(version: int) -> Callable[[pw.Database], None]:
    def step(database: pw.Database) -> None:
        with _schema_view(version):
            migrator = SchemaMigrator.from_database(database)
            operations = [migrator.add_column(model._meta.table_name, name,
                                              model._meta.fields[name])
                          for model, names in _ADDED_COLUMNS[version].items()
                          for name in names]
            migrate_columns(*operations)
            database.create_tables(_ADDED_TABLES[version])
    step.__doc__ = f"Schema {version}: the columns and tables _ADDED_* list for it."
    return step


# Forward migrations, in order. Each runs in one transaction and bumps the version.
# Append new steps; never edit a released one.
MIGRATIONS: list[tuple[int, Callable[[pw.Database], None]]] = [
    (1, _create_initial_schema),
    (2, _add_schema(2)),  # TPM attestation: EK roots, allowlists, PCR policy, evidence
    (3, _add_schema(3)),  # revocation, notices (outbox), CRLs, renewals, CA generations
    (4, _add_schema(4)),  # superseded certificates: the group's grace, revoke_after
    (5, _add_schema(5)),  # TPM vendors of the built-in trust store a group trusts
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def current_version(database: pw.Database) -> int:
    if not database.table_exists(SchemaVersion._meta.table_name):
        return 0
    latest = SchemaVersion.select(pw.fn.MAX(SchemaVersion.version)).scalar()
    return int(latest or 0)


def _migration_transaction(database: pw.Database):
    """One transaction that no other migrating process can enter: replicas and gunicorn
    workers may start together (SQLite: BEGIN IMMEDIATE; PostgreSQL: advisory lock)."""
    if isinstance(database, pw.SqliteDatabase):
        return database.atomic("IMMEDIATE")
    return _PostgresMigrationLock(database)


class _PostgresMigrationLock:
    LOCK_ID = 70307030  # any constant; RFC 7030 for luck

    def __init__(self, database: pw.Database) -> None:
        self.database = database
        self.transaction = database.atomic()

    def __enter__(self) -> None:
        self.transaction.__enter__()
        self.database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (self.LOCK_ID,))

    def __exit__(self, *exc: object) -> None:
        self.transaction.__exit__(*exc)


def migrate(database: pw.Database) -> int:
    """Apply pending migrations in one locked transaction; returns the schema version."""
    sqlite = isinstance(database, pw.SqliteDatabase)
    if sqlite and not database.in_transaction():
        # Adding a NOT NULL column rebuilds the table on SQLite (create, copy, drop,
        # rename) while other tables' rows reference it: foreign keys are switched off for
        # the migration (only possible outside a transaction) and checked before commit.
        database.execute_sql("PRAGMA foreign_keys = OFF")
    try:
        return _migrate_locked(database, sqlite)
    finally:
        if sqlite and not database.in_transaction():
            database.execute_sql("PRAGMA foreign_keys = ON")


def _migrate_locked(database: pw.Database, sqlite: bool) -> int:
    with _migration_transaction(database):
        version = current_version(database)
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"database schema version {version} is newer than this "
                               f"software ({SCHEMA_VERSION}); upgrade the software")
        for target, step in MIGRATIONS:
            if target > version:
                step(database)
                SchemaVersion.create(version=target)
                version = target
        if sqlite:
            broken = database.execute_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration left broken references: {broken[:5]}")
    return version
