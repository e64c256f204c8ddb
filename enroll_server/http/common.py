"""What every blueprint shares: the services, the cheap request checks, and the one
audited-refusal path.

A route declares its audit action with ``@audited("est.simpleenroll")``: any EnrollError
it raises (while parsing, or from the service) is written to the audit log once, here,
with the refusal's code and detail, whom it concerns (``error.device_id``, ``error.actor``
or the caller as the request shows it) and the caller's address. The error then goes to
the renderer (errors.render) in the format the blueprint declared.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import (
    BadRequest,
    EnrollError,
    ErrorFormat,
    PayloadTooLarge,
    RateLimited,
    UnsupportedMediaType,
    audit_outcome,
)
from ..services import Services
from .body import parse_json

F = TypeVar("F", bound=Callable[..., Any])


def make_blueprint(name: str, error_format: ErrorFormat,
                   url_prefix: str | None = None) -> Blueprint:
    """A blueprint that says how its routes answer errors (app.py reads it)."""
    created = Blueprint(name, f"enroll_server.http.{name}", url_prefix=url_prefix)
    created.error_format = error_format  # type: ignore[attr-defined]
    return created


def services() -> Services:
    return current_app.extensions["enroll"]


def audited(action: str) -> Callable[[F], F]:
    """Refusals of the decorated route are audited (see the module doc)."""
    def decorate(view: F) -> F:
        @functools.wraps(view)
        def route(*args: Any, **kwargs: Any) -> Any:
            try:
                return view(*args, **kwargs)
            except EnrollError as error:
                audit_refusal(action, error)
                raise
        return route  # type: ignore[return-value]
    return decorate


def audit_refusal(action: str, error: EnrollError) -> None:
    label = (request.view_args or {}).get("label")
    services().repository.audit(
        actor=error.actor or g.get("actor") or request_actor(), action=action,
        outcome=audit_outcome(error), code=error.code, device_id=error.device_id,
        group=label if isinstance(label, str) and len(label) <= 64 else None,
        remote_addr=request.remote_addr, detail=error.detail)


def request_actor() -> str:
    """Who asked, as far as the request shows before any credential is checked."""
    context = g.get("context")
    return context.actor if context is not None else "anonymous"


def checked_label(label: str | None) -> str | None:
    if label is not None and (len(label) > 64  # it is stored as an audit group_name
                              or not label.replace("-", "").replace("_", "").isalnum()):
        raise BadRequest("Invalid EST label.", code="est.bad_label")
    return label


def check_rate() -> None:
    limiter = services().rate_limiter
    wait = limiter.acquire(request.remote_addr or "-")
    if wait:
        raise RateLimited(limiter.retry_after(wait))


def require_content_type(expected: str, message: str) -> None:
    if (request.mimetype or "").lower() != expected:
        raise UnsupportedMediaType(message)


def read_body(limit: int | None = None) -> bytes:
    """At most limit bytes (default server.max_body_bytes), else PayloadTooLarge. A
    chunked body has no Content-Length and werkzeug silently cuts its stream at
    MAX_CONTENT_LENGTH, so probe past it."""
    limit = limit or services().settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body may be at most {limit} bytes.")
    try:
        body = request.stream.read(limit)
        if len(body) == limit and request.stream.read(1):
            raise RequestEntityTooLarge()
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"The request body may be at most {limit} bytes.") from None
    return body


def read_json() -> Any:
    """The body as JSON (application/json), or 415 / 413 / 400 with a stable code
    (request.invalid_json, request.json_too_deep): http.body.parse_json."""
    require_content_type("application/json", "This endpoint expects Content-Type "
                         "application/json.")
    return parse_json(read_body())
