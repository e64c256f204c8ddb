"""TPM-attested enrollment endpoints (docs/protocol.md, "TPM-attested enrollment").

    POST /.well-known/est[/<label>]/attest/challenge   application/json -> application/json
    POST /.well-known/est[/<label>]/attest/enroll      application/json -> certs-only PKCS#7

Thin: rate limit, content type, size, JSON schema; then AttestationService. Errors are
application/problem+json with the stable code (app.error_response).
"""

from __future__ import annotations

import base64
import json

from flask import Blueprint, Response, request

from .. import est_wire
from ..attestation import to_tools_credential
from ..attested import AttestedRequest, ChallengeRequest
from ..enrollment import RequestContext
from ..errors import EnrollError
from . import schemas
from .body import read_json
from .est import check_rate, checked_label, services

blueprint = Blueprint("attest", __name__, url_prefix="/.well-known/est")
_CHALLENGE = schemas.ChallengeRequestSchema()
_ENROLL = schemas.AttestedEnrollSchema()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@blueprint.post("/attest/challenge")
@blueprint.post("/<label>/attest/challenge")
def challenge(label: str | None = None) -> Response:
    context, fields = _json_request(label, _CHALLENGE, "attest.challenge")
    answer = services().attestation.challenge(context, ChallengeRequest(**fields))
    body = {
        "challenge_id": answer.challenge_id,
        "device_id": answer.device_id,
        "credential_blob": _b64(answer.id_object),
        "encrypted_secret": _b64(answer.encrypted_secret),
        "credential_tools": _b64(to_tools_credential(answer.id_object,
                                                     answer.encrypted_secret)),
        "nonce": _b64(answer.nonce),
        "expires_at": answer.expires_at.isoformat().replace("+00:00", "Z"),
        "quote": {"pcrs": answer.pcr_selection} if answer.pcr_selection else None,
    }
    return Response(json.dumps(body), content_type="application/json",
                    headers={"Cache-Control": "no-store"})


@blueprint.post("/attest/enroll")
@blueprint.post("/<label>/attest/enroll")
def enroll(label: str | None = None) -> Response:
    context, fields = _json_request(label, _ENROLL, "attest.enroll")
    certificate = services().attestation.enroll(context, AttestedRequest(**fields))
    return Response(est_wire.certs_only([certificate]), content_type=est_wire.PKCS7_CERTS_ONLY)


def _json_request(label: str | None, schema: schemas.Schema,
                  action: str) -> tuple[RequestContext, dict]:
    """Rate, type, size, JSON shape; refusals here are audited like any other."""
    try:
        check_rate()
        fields = read_json(schema, services().settings.server.max_body_bytes)
        return RequestContext(remote_addr=request.remote_addr,
                              group_label=checked_label(label)), fields
    except EnrollError as error:
        services().repository.audit(
            actor="anonymous", action=action, outcome="refused", code=error.code,
            group=label, remote_addr=request.remote_addr, detail=error.detail)
        raise
