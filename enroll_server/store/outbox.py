"""The transactional outbox: notices written with the decision, claimed by relays.

Claiming (several relays may run against one database):
- a row is claimable when unsent, due (``available_at``), not leased by a live relay, and
  no older unsent row has the same topic (per-topic order: the retained notice a device
  finds later is always the newest);
- PostgreSQL claims with ``FOR UPDATE SKIP LOCKED`` then writes a lease, so two relays
  never take the same row and no lock is held while publishing;
- SQLite serialises writers, so the same UPDATE without SKIP LOCKED is enough.

``enqueue_notice`` runs in the caller's transaction (the one that made the decision), so
it is a function of this module, used by the repository and by notify/issuer.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peewee as pw

from .models import Device, OutboxMessage, naive_utc
from .transactions import Transactions

LEASE = dt.timedelta(seconds=30)
MAX_BACKOFF = dt.timedelta(seconds=60)


@dataclass(frozen=True)
class Claimed:
    id: int
    topic: str
    payload: str
    retain: bool
    attempts: int
    kind: str = ""
    device_id: str | None = None


HELD_BACK = dt.datetime(9999, 1, 1)  # available_at of a held-back row: never due


def enqueue_notice(device_pk: int, sign: Callable[[int], list[dict[str, Any]]],
                   now: dt.datetime) -> None:
    """In the caller's transaction: take the device's next notice sequence number
    (strictly increasing per device across replicas), let ``sign(sequence)`` make the
    outbox rows, and insert them. A row may set its own ``available_at`` (HELD_BACK: a
    notice waiting for its signature, which blocks its topic until released)."""
    Device.update(notice_sequence=Device.notice_sequence + 1).where(
        Device.id == device_pk).execute()
    sequence = Device.select(Device.notice_sequence).where(Device.id == device_pk).scalar()
    naive_now = naive_utc(now)
    rows = [{"created_at": naive_now, "available_at": naive_now} | row
            for row in sign(int(sequence))]
    OutboxMessage.insert_many(rows).execute()


def _claimable(now: dt.datetime) -> pw.Expression:
    older = OutboxMessage.alias("older")
    blocked = older.select(older.id).where(
        (older.topic == OutboxMessage.topic) & older.sent_at.is_null()
        & (older.id < OutboxMessage.id))
    return (OutboxMessage.sent_at.is_null() & (OutboxMessage.available_at <= now)
            & (OutboxMessage.lease_until.is_null() | (OutboxMessage.lease_until < now))
            & ~pw.fn.EXISTS(blocked))


class Outbox(Transactions):
    def release_held_back(self, prefix: str, sign: Callable[[str], str], now: dt.datetime,
                          limit: int = 500) -> int:
        """Replace the payload of held-back rows (those starting with ``prefix``) by
        ``sign(payload)`` and make them due; returns how many distinct payloads were
        signed. One transaction: if ``sign`` raises, nothing changes."""
        signed: dict[str, str] = {}
        with self.transaction():
            rows = list(OutboxMessage.select(OutboxMessage.id, OutboxMessage.payload).where(
                (OutboxMessage.available_at == HELD_BACK)  # indexed: cheap every second
                & OutboxMessage.sent_at.is_null()
                & OutboxMessage.payload.startswith(prefix))
                .order_by(OutboxMessage.id).limit(limit))
            for row in rows:
                if row.payload not in signed:
                    signed[row.payload] = sign(row.payload)
                OutboxMessage.update(payload=signed[row.payload],
                                     available_at=naive_utc(now)).where(
                    OutboxMessage.id == row.id).execute()
        return len(signed)

    def claim_outbox(self, owner: str, now: dt.datetime, limit: int) -> list[Claimed]:
        """Lease up to ``limit`` due rows to ``owner`` and return them (oldest first)."""
        naive = naive_utc(now)
        with self.transaction():
            query = (OutboxMessage.select(OutboxMessage.id).where(_claimable(naive))
                     .order_by(OutboxMessage.id).limit(limit))
            if self.postgres:
                query = query.for_update("FOR UPDATE SKIP LOCKED")
            ids = [row.id for row in query]
            if not ids:
                return []
            OutboxMessage.update(lease_owner=owner, lease_until=naive + LEASE).where(
                OutboxMessage.id.in_(ids)).execute()
            rows = (OutboxMessage.select().where(OutboxMessage.id.in_(ids))
                    .order_by(OutboxMessage.id))
            return [Claimed(r.id, r.topic, r.payload, r.retain, r.attempts, r.kind,
                            r.device_id) for r in rows]

    def mark_sent(self, owner: str, ids: list[int], now: dt.datetime) -> None:
        if ids:
            with self.transaction():
                OutboxMessage.update(sent_at=naive_utc(now), lease_owner=None,
                                     lease_until=None,
                                     attempts=OutboxMessage.attempts + 1).where(
                    OutboxMessage.id.in_(ids) & (OutboxMessage.lease_owner == owner)
                ).execute()

    def release(self, owner: str, failed: list[Claimed], error: str,
                now: dt.datetime) -> None:
        """Back off: the rows become due again after 1, 2, 4 ... 60 s."""
        with self.transaction():
            for row in failed:
                delay = min(MAX_BACKOFF, dt.timedelta(seconds=2 ** min(row.attempts, 6)))
                OutboxMessage.update(lease_owner=None, lease_until=None,
                                     attempts=OutboxMessage.attempts + 1,
                                     available_at=naive_utc(now + delay),
                                     last_error=error[:256]).where(
                    (OutboxMessage.id == row.id) & (OutboxMessage.lease_owner == owner)
                ).execute()
