"""Liveness/readiness for load balancers: /healthz (process up), /readyz (DB + signer)."""

from __future__ import annotations

from flask import current_app, jsonify

from ..errors import ErrorFormat
from .common import make_blueprint

blueprint = make_blueprint("health", ErrorFormat.PROBLEM_JSON)


@blueprint.get("/healthz")
def healthz():
    return jsonify(status="ok")


@blueprint.get("/readyz")
def readyz():
    services = current_app.extensions["enroll"]
    checks = {"database": True, "signer": True}
    try:
        services.repository.ping()
    except Exception:  # noqa: BLE001 - readiness reports, it does not raise
        checks["database"] = False
    health = getattr(services.signer.private_key, "health", None)
    if health is not None:
        checks["signer"] = bool(health())
    ready = all(checks.values())
    return jsonify(status="ready" if ready else "unavailable", checks=checks), (
        200 if ready else 503)
