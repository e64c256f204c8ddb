"""One exception tree for the service, and the one place that maps it to HTTP.

Every error carries a stable ``code`` (``csr.bad_signature``) used in the response body
and in the audit log, a ``public`` message that is safe to show any client, and an
optional ``detail`` that only goes to the audit log (it may name expected values). The
public text never contains secrets or the expected side of a failed comparison.
"""

from __future__ import annotations


class EnrollError(Exception):
    """Base of every refusal the service makes on purpose."""

    status = 400
    code = "request.invalid"
    public = "The request is invalid."

    def __init__(self, public: str | None = None, *, code: str | None = None,
                 detail: str | None = None) -> None:
        if public is not None:
            self.public = public
        if code is not None:
            self.code = code
        self.detail = detail or self.public
        super().__init__(f"{self.code}: {self.detail}")


class BadRequest(EnrollError):
    """The request is malformed: refused before any cryptographic work (400)."""


class UnsupportedMediaType(EnrollError):
    status = 415
    code = "request.content_type"
    public = "Unsupported content type."


class PayloadTooLarge(EnrollError):
    status = 413
    code = "request.too_large"
    public = "The request body is larger than the server accepts."


class Unauthorized(EnrollError):
    """No or unusable credentials; RFC 7030 3.2.3 asks for 401 + WWW-Authenticate."""

    status = 401
    code = "auth.required"
    public = "Authentication is required."


class Forbidden(EnrollError):
    """Authenticated, but not allowed to do this."""

    status = 403
    code = "auth.forbidden"
    public = "Not allowed."


class NotFound(EnrollError):
    status = 404
    code = "not_found"
    public = "Not found."


class Conflict(EnrollError):
    status = 409
    code = "conflict"
    public = "The request conflicts with the current state."


class PolicyRefused(EnrollError):
    """The request is well formed but the enrollment group's policy refuses it."""

    status = 403
    code = "policy.refused"
    public = "Refused by enrollment policy."


class PendingApproval(EnrollError):
    """RFC 7030 4.2.3: manual approval pending; answer 202 with Retry-After."""

    status = 202
    code = "enroll.pending_approval"
    public = "The request awaits operator approval; retry later."

    def __init__(self, retry_after: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class RateLimited(EnrollError):
    status = 429
    code = "rate_limited"
    public = "Too many requests; retry later."

    def __init__(self, retry_after: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServiceUnavailable(EnrollError):
    """A dependency (HSM, database) is unavailable: 503 + Retry-After, never a 500."""

    status = 503
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


def http_headers(error: EnrollError) -> dict[str, str]:
    """Headers an error response must carry (RFC 7030 3.2.3 and 4.2.3, RFC 9110 10.2.3)."""
    headers: dict[str, str] = {}
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="est"'
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    return headers
