"""The audit log, and the numbers /metrics reports (read from the shared database)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import peewee as pw

from .models import AuditEvent, Certificate, Device, IssuingCa, OutboxMessage, PublishedCrl
from .transactions import Transactions

REFUSAL_WINDOW = dt.timedelta(minutes=5)


def _clip(value: str | None, size: int) -> str | None:  # PostgreSQL refuses overflow
    return value if value is None else value[:size]


class Audit(Transactions):
    def audit(self, *, actor: str, action: str, outcome: str, code: str = "",
              device_id: str | None = None, group: str | None = None,
              remote_addr: str | None = None, detail: dict[str, Any] | str = "") -> None:
        """Append an audit event in its own transaction (it must survive a rollback of
        the work it describes)."""
        with self.transaction():
            self._append_audit(actor=actor, action=action, outcome=outcome, code=code,
                               device_id=device_id, group=group, remote_addr=remote_addr,
                               detail=detail)

    def _append_audit(self, *, actor: str, action: str, outcome: str, code: str = "",
                      device_id: str | None = None, group: str | None = None,
                      remote_addr: str | None = None,
                      detail: dict[str, Any] | str = "") -> None:
        """The same, in the caller's transaction (it commits with the work)."""
        text = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True,
                                                                 default=str)
        AuditEvent.create(actor=_clip(actor, 128), action=_clip(action, 64),
                          outcome=_clip(outcome, 16), code=_clip(code, 64),
                          device_id=_clip(device_id, 64), group_name=_clip(group, 64),
                          remote_addr=_clip(remote_addr, 64), detail=text[:16384])

    def audit_events(self, device_id: str | None = None, limit: int = 100
                     ) -> list[AuditEvent]:
        with self.transaction(readonly=True):
            query = AuditEvent.select()
            if device_id:
                query = query.where(AuditEvent.device_id == device_id)
            return list(query.order_by(AuditEvent.id.desc()).limit(limit))

    def metrics_snapshot(self, now: dt.datetime) -> dict[str, Any]:
        """Everything /metrics reports, in one read-only snapshot (``now`` naive UTC)."""
        with self.transaction(readonly=True):
            return self._metrics(now)

    def _metrics(self, now: dt.datetime) -> dict[str, Any]:
        by = lambda model, column: {status: count for status, count in model.select(  # noqa: E731
            column, pw.fn.COUNT(model.id)).group_by(column).tuples()}
        oldest = OutboxMessage.select(pw.fn.MIN(OutboxMessage.created_at)).where(
            OutboxMessage.sent_at.is_null()).scalar()
        newest = {}  # the newest CRL of each live CA generation
        for ca in IssuingCa.select().where((IssuingCa.status == "active")
                                           | (IssuingCa.not_after > now)):
            crl = (PublishedCrl.select().where(PublishedCrl.issuer == ca.name)
                   .order_by(PublishedCrl.crl_number.desc()).first())
            if crl is not None:
                newest[ca.name] = (ca.status, crl)
        left = {name: (crl.next_update - now).total_seconds()
                for name, (_, crl) in newest.items()}
        active = next((crl for status, crl in newest.values() if status == "active"), None)
        refusals = {(action, code): count for action, code, count in AuditEvent.select(
            AuditEvent.action, AuditEvent.code, pw.fn.COUNT(AuditEvent.id)).where(
            (AuditEvent.outcome == "refused") & (AuditEvent.at >= now - REFUSAL_WINDOW))
            .group_by(AuditEvent.action, AuditEvent.code).tuples()}
        return {
            "certificates": by(Certificate, Certificate.status),
            "devices": by(Device, Device.status),
            "pending": OutboxMessage.select().where(OutboxMessage.sent_at.is_null()).count(),
            "oldest": (now - oldest).total_seconds() if oldest else 0.0,
            "crl_number": active.crl_number if active else 0,
            "crl_left": min(left.values()) if left else -1.0,
            "crl_left_by_ca": left,
            "refusals": refusals,
        }
