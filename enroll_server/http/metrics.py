"""GET /metrics: Prometheus text format, computed from the database at each scrape.

Every replica and worker reports the same numbers (they come from the shared database,
not from per-process counters), so any instance can be scraped. What to alert on
(docs/operations.md): CRL close to nextUpdate, outbox backlog or an old pending notice
(broker or relay down), refusal rates by code, HSM availability (/readyz).
"""

from __future__ import annotations

import datetime as dt

import peewee as pw
from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..store.models import (
    AuditEvent,
    Certificate,
    Device,
    IssuingCa,
    OutboxMessage,
    PublishedCrl,
)
from .est import services

blueprint = Blueprint("metrics", __name__)
REFUSAL_WINDOW = dt.timedelta(minutes=5)


class _DatabaseCollector:
    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        values = services().repository.read(lambda: _snapshot(now))
        certificates = GaugeMetricFamily("enroll_certificates", "Issued certificates by "
                                         "status", labels=["status"])
        for status, count in values["certificates"].items():
            certificates.add_metric([status], count)
        yield certificates
        devices = GaugeMetricFamily("enroll_devices", "Devices by status", labels=["status"])
        for status, count in values["devices"].items():
            devices.add_metric([status], count)
        yield devices
        yield GaugeMetricFamily("enroll_outbox_pending", "Notices not yet acknowledged by "
                                "the broker", value=values["pending"])
        yield GaugeMetricFamily("enroll_outbox_oldest_pending_seconds", "Age of the oldest "
                                "unsent notice (0 if none)", value=values["oldest"])
        yield GaugeMetricFamily("enroll_crl_number", "Newest published CRL number of the "
                                "active issuing CA", value=values["crl_number"])
        yield GaugeMetricFamily("enroll_crl_next_update_seconds", "Seconds until the "
                                "soonest nextUpdate of the live CAs' newest CRLs (negative: "
                                "expired)", value=values["crl_left"])
        by_ca = GaugeMetricFamily("enroll_ca_crl_next_update_seconds", "Seconds until the "
                                  "newest CRL's nextUpdate, per issuing CA", labels=["ca"])
        for name, left in values["crl_left_by_ca"].items():
            by_ca.add_metric([name], left)
        yield by_ca
        refusals = GaugeMetricFamily("enroll_refusals_5m", "Refused requests in the last 5 "
                                     "minutes, by action and code", labels=["action", "code"])
        for (action, code), count in values["refusals"].items():
            refusals.add_metric([action, code], count)
        yield refusals


def _snapshot(now: dt.datetime) -> dict:
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
    left = {name: (crl.next_update - now).total_seconds() for name, (_, crl) in newest.items()}
    active = next((crl for status, crl in newest.values() if status == "active"), None)
    refusals = {(action, code): count for action, code, count in AuditEvent.select(
        AuditEvent.action, AuditEvent.code, pw.fn.COUNT(AuditEvent.id)).where(
        (AuditEvent.outcome == "refused") & (AuditEvent.at >= now - REFUSAL_WINDOW)).group_by(
        AuditEvent.action, AuditEvent.code).tuples()}
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


@blueprint.get("/metrics")
def metrics() -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DatabaseCollector())
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
