"""Outbox claims on both real backends: several relays never take the same row, a topic's
notices go out in order, failed rows come back after their backoff, leases expire."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from enroll_server.notify import outbox
from enroll_server.store import db as store_db
from enroll_server.store.models import OutboxMessage
from enroll_server.store.repository import Repository

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/enroll.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def repository(url, tmp_path):
    database = store_db.open_database(url, tmp_path)
    database.connect()
    store_db.migrate(database)
    yield Repository(database)
    database.close()


def queue(count: int, topics: int) -> None:
    naive = NOW.replace(tzinfo=None) - dt.timedelta(seconds=1)
    OutboxMessage.insert_many([
        {"topic": f"fleet/g/devices/d{i % topics}/notices", "payload": f"n{i}",
         "kind": "revocation", "created_at": naive, "available_at": naive}
        for i in range(count)]).execute()


def test_concurrent_relays_claim_every_row_exactly_once_in_topic_order(repository):
    queue(600, topics=40)
    claimed: list[list[int]] = []
    errors: list[BaseException] = []

    def relay(name: str) -> None:
        mine: list[int] = []
        try:
            while True:
                rows = outbox.claim(repository, name, NOW, 7)
                if not rows:
                    if not OutboxMessage.select().where(
                            OutboxMessage.sent_at.is_null()).exists():
                        break
                    continue
                mine += [row.id for row in rows]
                outbox.mark_sent(repository, name, [row.id for row in rows], NOW)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            repository.database.close()
            claimed.append(mine)

    threads = [threading.Thread(target=relay, args=(f"relay-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    every = [row_id for mine in claimed for row_id in mine]
    assert sorted(every) == list(range(1, 601))  # all of them, none twice
    assert sum(1 for mine in claimed if mine) >= 2  # the work was really shared
    sent = {row.id: row.sent_at for row in OutboxMessage.select()}
    assert all(sent.values())


def test_a_topic_waits_for_its_older_unsent_notice(repository):
    queue(3, topics=1)  # three notices for one device
    first = outbox.claim(repository, "a", NOW, 10)
    assert [row.id for row in first] == [1]  # the others wait behind it
    assert outbox.claim(repository, "b", NOW, 10) == []  # leased to a, nothing else due
    outbox.mark_sent(repository, "a", [1], NOW)
    assert [row.id for row in outbox.claim(repository, "b", NOW, 10)] == [2]


def test_a_failed_publish_backs_off_and_a_dead_relays_lease_expires(repository):
    queue(2, topics=2)
    rows = outbox.claim(repository, "a", NOW, 10)
    outbox.release(repository, "a", rows[:1], "broker down", NOW)
    assert outbox.claim(repository, "b", NOW, 10) == []  # 1 backing off, 2 leased to a
    later = NOW + outbox.LEASE + dt.timedelta(seconds=1)
    again = outbox.claim(repository, "b", later, 10)  # a died: its lease ran out
    assert sorted(row.id for row in again) == [1, 2]
    row = OutboxMessage.get_by_id(1)
    assert (row.attempts, row.last_error) == (1, "broker down")
    outbox.mark_sent(repository, "a", [2], later)  # a's late PUBACK no longer counts
    assert OutboxMessage.get_by_id(2).sent_at is None
