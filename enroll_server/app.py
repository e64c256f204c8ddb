"""The Flask application factory, and the one place that maps errors to HTTP responses.

EST routes answer errors as text/plain (RFC 7030 4.2.3: a human-readable message), with
the stable error code on the first line; every other route answers
application/problem+json (RFC 9457) carrying the same code. No traceback ever reaches a
client: unexpected exceptions are logged and answered with a generic 500.
"""

from __future__ import annotations

import json
import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from .config import Settings
from .errors import EnrollError, http_headers
from .services import Services, build_services

log = logging.getLogger("enroll_server")


def create_app(settings: Settings, services: Services | None = None) -> Flask:
    app = Flask("enroll_server")
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_bytes
    app.extensions["enroll"] = services or build_services(settings)
    # Never a redirect: werkzeug builds it from the request's Host header (a client could
    # point it anywhere). "//" is not merged and a trailing "/" is not added: 404 instead.
    app.url_map.merge_slashes = app.url_map.strict_slashes = False

    from .http import admin, attest, est, health, metrics, revocation

    app.register_blueprint(est.blueprint)
    app.register_blueprint(attest.blueprint)
    app.register_blueprint(revocation.blueprint)
    app.register_blueprint(admin.blueprint)
    app.register_blueprint(metrics.blueprint)
    app.register_blueprint(health.blueprint)

    app.register_error_handler(EnrollError, _enroll_error)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(Exception, _unexpected)
    return app


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    if request.path.startswith("/.well-known/est/") and "/attest/" not in request.path:
        body = f"error: {code}\n{message}\n"
        response = Response(body, status=status, content_type="text/plain; charset=utf-8")
    else:
        problem = {"type": "about:blank", "title": message, "status": status, "code": code}
        response = Response(json.dumps(problem), status=status,
                            content_type="application/problem+json")
    response.headers["X-Error-Code"] = code
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _enroll_error(error: EnrollError) -> Response:
    return error_response(error.status, error.code, error.public, http_headers(error))


def _http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    if status == 413:
        return error_response(413, "request.too_large",
                              "The request body is larger than the server accepts.")
    code = {404: "http.not_found", 405: "http.method_not_allowed"}.get(
        status, f"http.{status}")
    return error_response(status, code, error.name)


def _unexpected(error: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(500, "internal_error",
                          "Internal error; the operator can find details in the server log.")
