"""The operator API: what `enroll-server revoke / readmit / devices show` do, over HTTPS.

    POST /api/v1/revocations            {"device_id" | "serial" | "group", "reason"}
    POST /api/v1/devices/<id>/readmit
    GET  /api/v1/devices/<id>

Authentication: ``Authorization: Bearer <operator credential>`` (created by `enroll-server
init` in secrets/operator.token); the server keeps only its SHA-256 and compares in
constant time. Every call is audited with the operator as actor.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from flask import Blueprint, Response, request
from marshmallow import RAISE, Schema, fields, validate

from ..errors import NotFound, Unauthorized
from ..revocation import REASONS
from ..store.models import Certificate
from .body import read_json
from .est import check_rate, services

blueprint = Blueprint("admin", __name__, url_prefix="/api/v1")


class RevocationSchema(Schema):
    class Meta:
        unknown = RAISE

    device_id = fields.String(validate=validate.Length(1, 64))
    serial = fields.String(validate=validate.Regexp(r"^[0-9A-Fa-f]{1,40}$"))
    group = fields.String(validate=validate.Length(1, 64))
    reason = fields.String(load_default="unspecified", validate=validate.OneOf(list(REASONS)))


_REVOCATION = RevocationSchema()


def _operator() -> str:
    """The authenticated operator, or 401. Rate-limited like every other caller."""
    check_rate()
    expected = services().settings.operator.credential_sha256
    authorization = request.headers.get("Authorization", "")
    presented = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    digest = hashlib.sha256(presented.encode()).hexdigest()
    if not expected or not presented or not hmac.compare_digest(digest, expected):
        error = Unauthorized("Present the operator credential as a Bearer token.",
                             code="operator.unauthorized")
        services().repository.audit(actor="anonymous", action=f"api.{request.endpoint}",
                                    outcome="refused", code=error.code,
                                    remote_addr=request.remote_addr,
                                    detail="no or wrong operator credential")
        raise error
    return "operator:api:" + expected[:8]


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body, default=str), status=status,
                    content_type="application/json")


@blueprint.post("/revocations")
def revoke() -> Response:
    actor = _operator()
    fields_ = read_json(_REVOCATION, services().settings.server.max_body_bytes)
    result = services().revocation.revoke(
        actor=actor, reason=fields_["reason"], device_id=fields_.get("device_id"),
        serial=fields_.get("serial"), group=fields_.get("group"))
    return _json({"devices": result.devices,
                  "serials": [format(int(s), "x") for s in result.serials],
                  "already_revoked": result.already_revoked, "crl_number": result.crl_number})


@blueprint.post("/devices/<device_id>/readmit")
def readmit(device_id: str) -> Response:
    services().revocation.readmit(device_id[:64], _operator())
    return _json({"device_id": device_id, "status": "active"})


@blueprint.get("/devices/<device_id>")
def device(device_id: str) -> Response:
    _operator()
    repository = services().repository

    def load() -> dict:
        row = repository.device(device_id[:64])
        if row is None:
            raise NotFound("No such device.", code="device.not_found")
        certificates = Certificate.select().where(Certificate.device == row).order_by(
            Certificate.id.desc())
        return {"device_id": row.device_id, "group": row.group.name, "status": row.status,
                "enrolled_by": row.enrolled_by, "revoked_at": row.revoked_at,
                "revocation_reason": row.revocation_reason,
                "certificates": [{"serial": format(int(c.serial), "x"), "status": c.status,
                                  "not_after": c.not_after, "revoked_at": c.revoked_at,
                                  "reason": c.revocation_reason} for c in certificates]}

    return _json(repository.run(load))
