"""RFC 7030 EST endpoints (with RFC 8951): parse the request, call a service, render.

Routes, each with the credential it needs:
    GET  /.well-known/est[/<label>]/cacerts          none (RFC 7030 4.1.1)
    GET  /.well-known/est[/<label>]/csrattrs         none (RFC 7030 4.5.1)
    POST /.well-known/est[/<label>]/simpleenroll     token or bootstrap cert (4.2.1)
    POST /.well-known/est[/<label>]/simplereenroll   current device cert (4.2.2)
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from .. import est_wire
from ..enrollment import RequestContext, key_policy
from ..errors import (
    BadRequest,
    EnrollError,
    RateLimited,
    UnsupportedMediaType,
)
from ..identity import group_for_label
from .body import read_body
from .tls import client_certificate

blueprint = Blueprint("est", __name__, url_prefix="/.well-known/est")


def services():
    return current_app.extensions["enroll"]


def checked_label(label: str | None) -> str | None:
    if label is not None and (len(label) > 64  # it is stored as an audit group_name
                              or not label.replace("-", "").replace("_", "").isalnum()):
        raise BadRequest("Invalid EST label.", code="est.bad_label")
    return label


@blueprint.get("/cacerts")
@blueprint.get("/<label>/cacerts")
def cacerts(label: str | None = None) -> Response:
    checked_label(label)
    body = est_wire.certs_only(services().signer.ca_certificates())
    return Response(body, content_type=est_wire.PKCS7_CERTS_ONLY)


@blueprint.get("/csrattrs")
@blueprint.get("/<label>/csrattrs")
def csrattrs(label: str | None = None) -> Response:
    group = services().repository.run(lambda: group_for_label(services().repository,
                                                                checked_label(label)))
    body = est_wire.csr_attributes(key_policy(group).allowed_key_types)
    return Response(body, content_type=est_wire.CSRATTRS)


@blueprint.post("/simpleenroll")
@blueprint.post("/<label>/simpleenroll")
def simpleenroll(label: str | None = None) -> Response:
    context, body = _enroll_request(label, "est.simpleenroll")
    certificate = services().enrollment.simpleenroll(context, body)
    return Response(est_wire.certs_only([certificate]),
                    content_type=est_wire.PKCS7_CERTS_ONLY)


@blueprint.post("/simplereenroll")
@blueprint.post("/<label>/simplereenroll")
def simplereenroll(label: str | None = None) -> Response:
    context, body = _enroll_request(label, "est.simplereenroll")
    certificate = services().enrollment.simplereenroll(context, body)
    return Response(est_wire.certs_only([certificate]),
                    content_type=est_wire.PKCS7_CERTS_ONLY)


def _enroll_request(label: str | None, action: str) -> tuple[RequestContext, bytes]:
    """The request's context and body; refusals here are audited like any other."""
    try:
        return _parse_enroll_request(label, action.removeprefix("est."))
    except EnrollError as error:
        services().repository.audit(
            actor="anonymous", action=action, outcome="refused", code=error.code,
            group=label if label and len(label) <= 64 else None,
            remote_addr=request.remote_addr, detail=error.detail)
        raise


def check_rate() -> None:
    limiter = services().rate_limiter
    wait = limiter.acquire(request.remote_addr or "-")
    if wait:
        raise RateLimited(limiter.retry_after(wait))


def _parse_enroll_request(label: str | None, operation: str) -> tuple[RequestContext, bytes]:
    """Everything checked before any cryptographic work: rate, type, size, label."""
    svc = services()
    check_rate()
    content_type = (request.mimetype or "").lower()
    if content_type != est_wire.PKCS10:
        raise UnsupportedMediaType(f"{operation} expects Content-Type application/pkcs10 "
                                   "(RFC 7030 4.2.1).", code="request.content_type")
    body = read_body(svc.settings.server.max_body_bytes)
    bearer = None
    authorization = request.headers.get("Authorization", "")
    if authorization[:7].lower() == "bearer ":
        bearer = authorization[7:].strip() or None
    context = RequestContext(
        remote_addr=request.remote_addr, group_label=checked_label(label), bearer_token=bearer,
        client_certificate=client_certificate(request.environ, svc.settings.server))
    return context, body
