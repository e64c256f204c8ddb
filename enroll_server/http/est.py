"""RFC 7030 EST endpoints (with RFC 8951): parse the request, call a service, render.

Routes, each with the credential it needs:
    GET  /.well-known/est[/<label>]/cacerts          none (RFC 7030 4.1.1)
    GET  /.well-known/est[/<label>]/csrattrs         none (RFC 7030 4.5.1)
    POST /.well-known/est[/<label>]/simpleenroll     token or bootstrap cert (4.2.1)
    POST /.well-known/est[/<label>]/simplereenroll   current device cert (4.2.2)

Errors are text/plain with the code on the first line (RFC 7030 4.2.3).
"""

from __future__ import annotations

from flask import Response, g, request

from ..credentials import RequestContext, group_for_label
from ..errors import ErrorFormat
from . import est_wire
from .common import (
    audited,
    check_rate,
    checked_label,
    make_blueprint,
    read_body,
    require_content_type,
    services,
)
from .tls import client_certificate

blueprint = make_blueprint("est", ErrorFormat.EST_TEXT, url_prefix="/.well-known/est")


@blueprint.get("/cacerts")
@blueprint.get("/<label>/cacerts")
def cacerts(label: str | None = None) -> Response:
    checked_label(label)
    body = est_wire.certs_only(services().signer.ca_certificates())
    return Response(body, content_type=est_wire.PKCS7_CERTS_ONLY)


@blueprint.get("/csrattrs")
@blueprint.get("/<label>/csrattrs")
def csrattrs(label: str | None = None) -> Response:
    repository = services().repository
    group = repository.read(lambda: group_for_label(repository, checked_label(label)))
    body = est_wire.csr_attributes(group.key_policy.allowed_key_types)
    return Response(body, content_type=est_wire.CSRATTRS)


@blueprint.post("/simpleenroll")
@blueprint.post("/<label>/simpleenroll")
@audited("est.simpleenroll")
def simpleenroll(label: str | None = None) -> Response:
    context, body = _enroll_request(label, "simpleenroll")
    certificate = services().enrollment.simpleenroll(context, body)
    return Response(est_wire.certs_only([certificate]),
                    content_type=est_wire.PKCS7_CERTS_ONLY)


@blueprint.post("/simplereenroll")
@blueprint.post("/<label>/simplereenroll")
@audited("est.simplereenroll")
def simplereenroll(label: str | None = None) -> Response:
    context, body = _enroll_request(label, "simplereenroll")
    certificate = services().enrollment.simplereenroll(context, body)
    return Response(est_wire.certs_only([certificate]),
                    content_type=est_wire.PKCS7_CERTS_ONLY)


def _enroll_request(label: str | None, operation: str) -> tuple[RequestContext, bytes]:
    """Everything checked before any cryptographic work: rate, type, size, label."""
    check_rate()
    require_content_type(est_wire.PKCS10, f"{operation} expects Content-Type "
                         "application/pkcs10 (RFC 7030 4.2.1).")
    body = read_body()
    bearer = None
    authorization = request.headers.get("Authorization", "")
    if authorization[:7].lower() == "bearer ":
        bearer = authorization[7:].strip() or None
    g.context = RequestContext(
        remote_addr=request.remote_addr, group_label=checked_label(label), bearer_token=bearer,
        client_certificate=client_certificate(request.environ, services().settings.server))
    return g.context, body
