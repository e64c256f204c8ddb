"""TPM-attested enrollment endpoints (docs/protocol.md, "TPM-attested enrollment").

    POST /.well-known/est[/<label>]/attest/challenge   application/json -> application/json
    POST /.well-known/est[/<label>]/attest/enroll      application/json -> certs-only PKCS#7

Thin: rate limit, content type, size, JSON schema; then TpmEnrollment. Errors are
application/problem+json with the stable code.
"""

from __future__ import annotations

import base64
import json

from flask import Response, g, request

from ..attestation import to_tools_credential
from ..credentials import RequestContext
from ..errors import ErrorFormat
from ..tpm_enrollment import AttestedRequest, ChallengeRequest
from . import est_wire, schemas
from .common import (
    audited,
    check_rate,
    checked_label,
    make_blueprint,
    read_json,
    require_content_type,
    services,
)

blueprint = make_blueprint("est_attest", ErrorFormat.PROBLEM_JSON,
                           url_prefix="/.well-known/est")
_CHALLENGE = schemas.ChallengeRequestSchema()
_ENROLL = schemas.AttestedEnrollSchema()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@blueprint.post("/attest/challenge")
@blueprint.post("/<label>/attest/challenge")
@audited("attest.challenge")
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
@audited("attest.enroll")
def enroll(label: str | None = None) -> Response:
    context, fields = _json_request(label, _ENROLL, "attest.enroll")
    certificate = services().attestation.enroll(context, AttestedRequest(**fields))
    return Response(est_wire.certs_only([certificate]), content_type=est_wire.PKCS7_CERTS_ONLY)


def _json_request(label: str | None, schema: schemas.Schema,
                  action: str) -> tuple[RequestContext, dict]:
    """Rate, type, size, JSON shape."""
    check_rate()
    require_content_type("application/json", f"{action} expects Content-Type "
                         "application/json.")
    fields = schemas.load(schema, read_json())
    g.context = RequestContext(remote_addr=request.remote_addr,
                               group_label=checked_label(label))
    return g.context, fields
