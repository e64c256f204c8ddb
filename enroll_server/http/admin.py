"""The operator API: what `enroll-server revoke / readmit / devices show` do, over HTTPS.

    POST /api/v1/revocations            {"device_id" | "serial" | "group", "reason"}
    POST /api/v1/devices/<id>/readmit
    GET  /api/v1/devices/<id>

Authentication: ``Authorization: Bearer <operator credential>`` (shown once by
`enroll-server init`, replaced by `enroll-server operator rotate`); the server keeps only
its SHA-256 and compares in constant time. Every call is audited with the operator as actor.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from flask import Response, g, request
from marshmallow import RAISE, Schema, fields, validate

from ..errors import ErrorFormat, NotFound, Unauthorized
from ..revocation import REASONS
from . import schemas
from .common import audited, check_rate, make_blueprint, read_json, services

blueprint = make_blueprint("admin", ErrorFormat.PROBLEM_JSON, url_prefix="/api/v1")


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
        raise Unauthorized("Present the operator credential as a Bearer token.",
                           code="operator.unauthorized",
                           detail="no or wrong operator credential")
    g.actor = "operator:api:" + expected[:8]
    return g.actor


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body, default=str), status=status,
                    content_type="application/json")


@blueprint.post("/revocations")
@audited("api.admin.revoke")
def revoke() -> Response:
    actor = _operator()
    fields_ = schemas.load(_REVOCATION, read_json())
    result = services().revocation.revoke(
        actor=actor, reason=fields_["reason"], device_id=fields_.get("device_id"),
        serial=fields_.get("serial"), group=fields_.get("group"))
    return _json({"devices": result.devices,
                  "serials": [format(int(s), "x") for s in result.serials],
                  "already_revoked": result.already_revoked, "crl_number": result.crl_number})


@blueprint.post("/devices/<device_id>/readmit")
@audited("api.admin.readmit")
def readmit(device_id: str) -> Response:
    services().revocation.readmit(device_id[:64], _operator())
    return _json({"device_id": device_id, "status": "active"})


@blueprint.get("/devices/<device_id>")
@audited("api.admin.device")
def device(device_id: str) -> Response:
    _operator()
    report = services().repository.device_report(device_id[:64])
    if report is None:
        raise NotFound("No such device.", code="device.not_found")
    return _json({key: report[key] for key in (
        "device_id", "group", "status", "enrolled_by", "revoked_at", "revocation_reason")}
        | {"certificates": [
            {"serial": format(int(c["serial"]), "x"), "status": c["status"],
             "not_after": c["not_after"], "revoked_at": c["revoked_at"],
             "reason": c["reason"]} for c in report["certificates"]]})
