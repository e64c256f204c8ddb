"""One exception tree for the service, and the one place that maps it to HTTP.

Every error carries a stable ``code`` (``csr.bad_signature``) used in the response body
and in the audit log, a ``public`` message that is safe to show any client, and an
optional ``detail`` that only goes to the audit log (it may name expected values). The
public text never contains secrets or the expected side of a failed comparison.

``device_id`` and ``actor`` say whom a refusal concerns, for the audit row the edge writes
(http/edge.py); a service that learns them while working fills them in with ``about``.

HTTP lives here and only here: ``STATUS`` maps the classes of the tree to status codes
(a subclass anywhere, e.g. attestation/verdict.py, inherits its ancestor's), and
``render`` turns an error into status, headers and body in the format the route's
blueprint declares (EST text or problem+json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Self


class _HttpStatus:
    """``error.status`` and ``ErrorClass.status``: looked up in ``STATUS`` below."""

    def __get__(self, error: object, cls: type[EnrollError]) -> int:
        return status_for(cls)


class EnrollError(Exception):
    """Base of every refusal the service makes on purpose."""

    status = _HttpStatus()

    code = "request.invalid"
    public = "The request is invalid."

    def __init__(self, public: str | None = None, *, code: str | None = None,
                 detail: str | None = None, device_id: str | None = None,
                 actor: str | None = None) -> None:
        if public is not None:
            self.public = public
        if code is not None:
            self.code = code
        self.detail = detail or self.public
        self.device_id = device_id
        self.actor = actor
        super().__init__(f"{self.code}: {self.detail}")

    def about(self, *, device_id: str | None = None, actor: str | None = None) -> Self:
        """Fill in whom the refusal concerns where the raiser could not know it."""
        self.device_id = self.device_id or device_id
        self.actor = self.actor or actor
        return self


class BadRequest(EnrollError):
    """The request is malformed: refused before any cryptographic work (400)."""


class UnsupportedMediaType(EnrollError):
    code = "request.content_type"
    public = "Unsupported content type."


class PayloadTooLarge(EnrollError):
    code = "request.too_large"
    public = "The request body is larger than the server accepts."


class Unauthorized(EnrollError):
    """No or unusable credentials; RFC 7030 3.2.3 asks for 401 + WWW-Authenticate."""

    code = "auth.required"
    public = "Authentication is required."


class Forbidden(EnrollError):
    """Authenticated, but not allowed to do this."""

    code = "auth.forbidden"
    public = "Not allowed."


class NotFound(EnrollError):
    code = "not_found"
    public = "Not found."


class Conflict(EnrollError):
    code = "conflict"
    public = "The request conflicts with the current state."


class PolicyRefused(EnrollError):
    """The request is well formed but the enrollment group's policy refuses it."""

    code = "policy.refused"
    public = "Refused by enrollment policy."


class PendingApproval(EnrollError):
    """RFC 7030 4.2.3: manual approval pending; answer 202 with Retry-After."""

    code = "enroll.pending_approval"
    public = "The request awaits operator approval; retry later."

    def __init__(self, retry_after: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class RateLimited(EnrollError):
    code = "rate_limited"
    public = "Too many requests; retry later."

    def __init__(self, retry_after: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServiceUnavailable(EnrollError):
    """A dependency (HSM, database) is unavailable: 503 + Retry-After, never a 500."""

    code = "service.unavailable"
    public = "The service is temporarily unavailable; retry later."

    def __init__(self, public: str | None = None, *, retry_after: int = 30,
                 code: str | None = None, detail: str | None = None) -> None:
        super().__init__(public, code=code, detail=detail)
        self.retry_after = retry_after


class SignerUnavailable(ServiceUnavailable):
    code = "ca.signer_unavailable"
    public = "The CA signing key is temporarily unavailable; retry later."


class StoreUnavailable(ServiceUnavailable):
    code = "store.unavailable"
    public = "The database is temporarily unavailable; retry later."


# -- HTTP ------------------------------------------------------------------------------

STATUS: dict[type[EnrollError], int] = {
    EnrollError: 400, BadRequest: 400, UnsupportedMediaType: 415, PayloadTooLarge: 413,
    Unauthorized: 401, Forbidden: 403, PolicyRefused: 403, NotFound: 404, Conflict: 409,
    PendingApproval: 202, RateLimited: 429, ServiceUnavailable: 503,
}


def status_for(error_class: type[EnrollError]) -> int:
    """The HTTP status of an error class: its nearest class in ``STATUS`` (MRO order)."""
    for cls in error_class.__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400  # pragma: no cover - every EnrollError has EnrollError in its MRO


def status_of(error: EnrollError) -> int:
    return status_for(type(error))


def audit_outcome(error: EnrollError) -> str:
    """How a refusal is recorded: "pending", "error" (ours: 5xx) or "refused" (theirs)."""
    if isinstance(error, PendingApproval):
        return "pending"
    return "error" if status_of(error) >= 500 else "refused"


class ErrorFormat(Enum):
    """How a blueprint answers errors: RFC 7030 4.2.3 says EST answers a human-readable
    text; every other route answers application/problem+json (RFC 9457)."""

    EST_TEXT = "est-text"
    PROBLEM_JSON = "problem+json"


@dataclass(frozen=True)
class Rendered:
    status: int
    headers: dict[str, str]
    body: bytes
    content_type: str


def render(error: EnrollError, error_format: ErrorFormat) -> Rendered:
    """Status, headers and body of an error. Both formats carry the stable code in
    X-Error-Code; the EST text has it on its first line."""
    return render_code(status_of(error), error.code, error.public, error_format,
                       _headers(error))


def render_code(status: int, code: str, message: str, error_format: ErrorFormat,
                headers: dict[str, str] | None = None) -> Rendered:
    """The same for a refusal that is not an EnrollError (routing, framework limits)."""
    if error_format is ErrorFormat.EST_TEXT:
        body = f"error: {code}\n{message}\n".encode()
        content_type = "text/plain; charset=utf-8"
    else:
        body = json.dumps({"type": "about:blank", "title": message, "status": status,
                           "code": code}).encode()
        content_type = "application/problem+json"
    return Rendered(status, {"X-Error-Code": code, **(headers or {})}, body, content_type)


def render_http(status: int, name: str, error_format: ErrorFormat) -> Rendered:
    """A framework-level refusal (no route, wrong method, body over the limit)."""
    if status == 413:
        return render(PayloadTooLarge(), error_format)
    code = {404: "http.not_found", 405: "http.method_not_allowed"}.get(status, f"http.{status}")
    return render_code(status, code, name, error_format)


def render_unexpected(error_format: ErrorFormat) -> Rendered:
    """An exception nobody meant: a generic 500, never a traceback."""
    return render_code(500, "internal_error", "Internal error; the operator can find "
                       "details in the server log.", error_format)


def _headers(error: EnrollError) -> dict[str, str]:
    """Headers an error response must carry (RFC 7030 3.2.3 and 4.2.3, RFC 9110 10.2.3)."""
    headers: dict[str, str] = {}
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="est"'
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    return headers
