"""Storage on both real backends: SQLite (WAL) and a private PostgreSQL cluster."""

import datetime as dt

import peewee as pw
import pytest

from enroll_server.store import db as store_db
from enroll_server.store.models import (
    Certificate,
    Device,
    EnrollmentGroup,
    EnrollmentToken,
    SchemaVersion,
)
from enroll_server.store.repository import Repository


@pytest.fixture(params=["sqlite", "postgres"])
def repository(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/enroll.db"
    else:
        url = request.getfixturevalue("pg_url")
    database = store_db.open_database(url, tmp_path)
    database.connect()
    store_db.migrate(database)
    yield Repository(database)
    database.close()


def test_migration_creates_the_schema_and_the_default_group(repository):
    assert store_db.current_version(repository.database) == store_db.SCHEMA_VERSION
    default = repository.group("default")
    assert "token" in default.auth_methods.split(",")
    # Re-running is a no-op: no duplicate version rows, no second default group.
    assert store_db.migrate(repository.database) == store_db.SCHEMA_VERSION
    assert SchemaVersion.select().count() == store_db.SCHEMA_VERSION
    assert EnrollmentGroup.select().count() == 1


def test_a_newer_schema_than_the_software_is_refused(repository):
    SchemaVersion.create(version=store_db.SCHEMA_VERSION + 1)
    with pytest.raises(RuntimeError, match="newer than this software"):
        store_db.migrate(repository.database)


def _device(repository, device_id="dev-1"):
    with repository.transaction():
        return Device.create(device_id=device_id, group=repository.group("default"),
                             enrolled_by="token")


def _certificate(device, serial, fingerprint):
    now = dt.datetime(2026, 1, 1)
    return Certificate.create(serial=serial, device=device, fingerprint_sha256=fingerprint,
                              public_key_sha256="k" * 64, subject="CN=x", not_before=now,
                              not_after=now, der=b"\x30\x00", issued_via="token")


def test_certificate_serials_are_unique_in_the_database(repository):
    device = _device(repository)
    with repository.transaction():
        _certificate(device, "12345", "a" * 64)
    with pytest.raises(pw.IntegrityError), repository.transaction():
        _certificate(device, "12345", "b" * 64)
    assert Certificate.select().count() == 1


def test_a_failed_transaction_leaves_no_rows(repository):
    with pytest.raises(RuntimeError), repository.transaction():
        _device(repository, "dev-rollback")
        raise RuntimeError("crash between signing and commit")
    assert repository.device("dev-rollback") is None


def test_a_token_is_consumed_exactly_once_and_stored_only_as_a_hash(repository):
    secret, row = repository.create_token(repository.group("default"),
                                          dt.timedelta(hours=1), "operator:test")
    assert secret not in {t.token_sha256 for t in EnrollmentToken.select()}
    found = repository.find_token(secret)
    assert found is not None and found.id == row.id
    assert repository.find_token(secret + "x") is None
    with repository.transaction():
        assert repository.consume_token(found.id, "dev-1") is True
    with repository.transaction():
        assert repository.consume_token(found.id, "dev-2") is False
    assert EnrollmentToken.get_by_id(row.id).used_by_device == "dev-1"


def test_audit_events_survive_and_read_back_newest_first(repository):
    repository.audit(actor="anonymous", action="est.simpleenroll", outcome="refused",
                     code="csr.malformed", detail={"why": "x"})
    repository.audit(actor="operator:a", action="group.create", outcome="success")
    events = repository.audit_events()
    assert [e.action for e in events] == ["group.create", "est.simpleenroll"]
    assert events[1].code == "csr.malformed"


def test_a_schema_1_database_migrates_forward_keeping_its_rows(tmp_path):
    database = store_db.open_database(f"sqlite:///{tmp_path}/old.db")
    database.connect()
    first, _ = store_db.MIGRATIONS[0]
    assert first == 1
    with database.atomic():
        store_db.MIGRATIONS[0][1](database)
        SchemaVersion.create(version=1)
    columns = {c.name for c in database.get_columns("enrollment_group")}
    assert "ek_roots_pem" not in columns
    assert store_db.migrate(database) == store_db.SCHEMA_VERSION
    group = EnrollmentGroup.get(EnrollmentGroup.name == "default")
    assert group.ek_policy == "manufacturer" and group.pcr_policy == ""
    assert "ek_roots_pem" in {c.name for c in database.get_columns("enrollment_group")}
    assert database.table_exists("attestation_challenge")
    database.close()


def _columns(database) -> dict[str, set[str]]:
    return {table: {c.name for c in database.get_columns(table)}
            for table in database.get_tables()}


@pytest.mark.parametrize("start", range(1, store_db.SCHEMA_VERSION))  # every older schema
def test_an_old_database_migrates_to_exactly_the_fresh_schema(tmp_path, start):
    fresh = store_db.open_database(f"sqlite:///{tmp_path}/fresh.db")
    fresh.connect()
    store_db.migrate(fresh)
    expected = _columns(fresh)
    fresh.close()
    old = store_db.open_database(f"sqlite:///{tmp_path}/old.db")
    old.connect()
    with old.atomic():
        for version, step in store_db.MIGRATIONS[:start]:
            step(old)
            SchemaVersion.create(version=version)
        group = EnrollmentGroup.select(EnrollmentGroup.id, EnrollmentGroup.name).first()
        added = {2: {"ak_name": "''"}, 3: {"notice_sequence": "0"}}  # NOT NULL ones
        extra = {k: v for version, columns in added.items() if start >= version
                 for k, v in columns.items()}
        old.execute_sql("INSERT INTO device (device_id, group_id, status, enrolled_by, "
                        "identity_pin, created_at, updated_at"
                        + "".join(f", {k}" for k in extra) + ") VALUES ('d1', ?, 'active', "
                        "'token', '', '2026-01-01', '2026-01-01'"
                        + "".join(f", {v}" for v in extra.values()) + ")", (group.id,))
        issuer = ("", "") if start < 3 else (", issuer", ", 'issuing-ca'")
        old.execute_sql("INSERT INTO certificate (serial, device_id, fingerprint_sha256, "
                        "public_key_sha256, subject, not_before, not_after, der, status, "
                        f"issued_via, created_at{issuer[0]}) VALUES ('7', 1, 'f', 'k', "
                        "'CN=d1', '2026-01-01', '2027-01-01', x'00', 'active', 'token', "
                        f"'2026-01-01'{issuer[1]})")
    assert ("outbox_message" in old.get_tables()) == (start >= 3)
    assert store_db.migrate(old) == store_db.SCHEMA_VERSION  # rows referencing rebuilt tables
    assert _columns(old) == expected
    device = Device.get(Device.device_id == "d1")
    assert (device.notice_sequence, device.status) == (0, "active")
    assert Certificate.get(Certificate.serial == "7").device_id == device.id
    old.close()


def _ca(name: str) -> dict:
    return {"name": name, "certificate_pem": f"PEM of {name}", "key_backend": "file",
            "key_label": f"ca/{name}.key", "key_passphrase_file": None,
            "not_after": dt.datetime(2030, 1, 1)}


def test_a_ca_rotation_commits_in_one_transaction_and_refuses_a_lost_race(repository):
    from enroll_server.errors import Conflict

    assert repository.record_first_ca(_ca("issuing-ca"))
    now = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    calls = []
    # Another rotation made issuing-ca-2 active meanwhile: nothing written, no callback.
    with pytest.raises(Conflict) as refused:
        repository.rotate_ca(_ca("issuing-ca-3"), "issuing-ca-2", now,
                             lambda *args: calls.append(args))
    assert refused.value.code == "ca.rotation_conflict" and calls == []
    assert [(r.name, r.status) for r in repository.ca_rows()] == [("issuing-ca", "active")]
    # The callback fails: the whole rotation is rolled back.
    with pytest.raises(RuntimeError):
        repository.rotate_ca(_ca("issuing-ca-2"), "issuing-ca", now,
                             lambda *args: (_ for _ in ()).throw(RuntimeError("crl")))
    assert [(r.name, r.status) for r in repository.ca_rows()] == [("issuing-ca", "active")]
    assert repository.rotate_ca(_ca("issuing-ca-2"), "issuing-ca", now,
                                lambda retired, current: (retired, current)) == (
        ["issuing-ca"], [])
    assert [(r.name, r.status) for r in repository.ca_rows()] == [
        ("issuing-ca", "retired"), ("issuing-ca-2", "active")]
