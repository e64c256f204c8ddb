"""GET /metrics: Prometheus text format, computed from the database at each scrape.

Every replica and worker reports the same numbers (they come from the shared database,
not from per-process counters), so any instance can be scraped. What to alert on
(docs/operations.md): CRL close to nextUpdate, outbox backlog or an old pending notice
(broker or relay down), refusal rates by code, HSM availability (/readyz).
"""

from __future__ import annotations

import datetime as dt

from flask import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..errors import ErrorFormat
from .common import make_blueprint, services

blueprint = make_blueprint("metrics", ErrorFormat.PROBLEM_JSON)


class _DatabaseCollector:
    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        values = services().repository.metrics_snapshot(now)
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


@blueprint.get("/metrics")
def metrics() -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DatabaseCollector())
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
