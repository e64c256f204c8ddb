"""The Flask application factory.

Each blueprint declares how its routes answer errors (http/common.make_blueprint): EST
routes a text body (RFC 7030 4.2.3), every other route application/problem+json
(RFC 9457). errors.render maps the error to status, headers and body; this module only
wraps that in a response. A request that matches no route answers problem+json. No
traceback ever reaches a client: unexpected exceptions are logged and answered with a
generic 500.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from .config import Settings
from .errors import (
    EnrollError,
    ErrorFormat,
    Rendered,
    render,
    render_http,
    render_unexpected,
)
from .services import Services, build_services

log = logging.getLogger("enroll_server")


def create_app(settings: Settings, services: Services | None = None) -> Flask:
    app = Flask("enroll_server")
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_bytes
    app.extensions["enroll"] = services or build_services(settings)
    # Never a redirect: werkzeug builds it from the request's Host header (a client could
    # point it anywhere). "//" is not merged and a trailing "/" is not added: 404 instead.
    app.url_map.merge_slashes = app.url_map.strict_slashes = False

    from .http import admin, est, est_attest, health, metrics, revocation

    for module in (est, est_attest, revocation, admin, metrics, health):
        app.register_blueprint(module.blueprint)

    app.register_error_handler(EnrollError, _enroll_error)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(Exception, _unexpected)
    return app


def _error_format() -> ErrorFormat:
    """The format the matched route's blueprint declared (problem+json without one)."""
    from flask import current_app

    blueprint = current_app.blueprints.get(request.blueprint or "")
    return getattr(blueprint, "error_format", ErrorFormat.PROBLEM_JSON)


def _response(rendered: Rendered) -> Response:
    response = Response(rendered.body, status=rendered.status,
                        content_type=rendered.content_type)
    for name, value in rendered.headers.items():
        response.headers[name] = value
    return response


def _enroll_error(error: EnrollError) -> Response:
    return _response(render(error, _error_format()))


def _http_exception(error: HTTPException) -> Response:
    return _response(render_http(error.code or 500, error.name, _error_format()))


def _unexpected(error: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.path)
    return _response(render_unexpected(_error_format()))
