"""Revocation artefacts over plain HTTP (they are signed; RFC 5280 and RFC 6960 expect HTTP).

    GET  /crl/issuing-ca.crl        the newest CRL (DER, application/pkix-crl, RFC 5280 4.2.1.13)
    GET  /ca/issuing-ca.der         the issuing CA certificate (AIA caIssuers, RFC 5280 4.2.2.1)
    POST /ocsp                      application/ocsp-request (RFC 6960 A.1)
    GET  /ocsp/<base64 request>     the same, URL-encoded base64 in the path (A.1.1)

The CRL is read from the database (at most one second old per process), so every replica
serves the CRL built after the latest revocation. OCSP looks each serial up in the
database on every request; only the signature is cached (ca/ocsp.py).
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
import urllib.parse

from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Response, request

from ..ca.ocsp import malformed_request_response
from ..errors import ServiceUnavailable
from .est import services

blueprint = Blueprint("revocation", __name__)
OCSP_RESPONSE = "application/ocsp-response"
_MAX_OCSP_REQUEST = 4096


class _CrlCache:
    """The newest published CRL, re-read from the database at most once a second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checked = 0.0
        self._value: tuple[int, bytes, str] | None = None

    def get(self) -> tuple[int, bytes, str] | None:
        with self._lock:
            if time.monotonic() - self._checked < 1.0 and self._value is not None:
                return self._value
        svc = services()
        latest = svc.repository.read(svc.crl.latest)
        with self._lock:
            self._checked = time.monotonic()
            if latest is not None:
                expires = latest.next_update.strftime("%a, %d %b %Y %H:%M:%S GMT")
                self._value = (latest.crl_number, bytes(latest.der), expires)
            return self._value


_crl = _CrlCache()


@blueprint.get("/crl/issuing-ca.crl")
def crl() -> Response:
    current = _crl.get()
    if current is None:
        raise ServiceUnavailable("No CRL has been published yet; retry shortly.",
                                 code="crl.unavailable", retry_after=5)
    number, der, expires = current
    return Response(der, content_type="application/pkix-crl",
                    headers={"Expires": expires, "Cache-Control": "max-age=60",
                             "ETag": f'"crl-{number}"'})


@blueprint.get("/ca/issuing-ca.der")
def issuing_ca() -> Response:
    der = services().signer.ca_certificate.public_bytes(serialization.Encoding.DER)
    return Response(der, content_type="application/pkix-cert")


@blueprint.post("/ocsp")
def ocsp_post() -> Response:
    if (request.mimetype or "").lower() != "application/ocsp-request" or (
            request.content_length or 0) > _MAX_OCSP_REQUEST:
        return Response(malformed_request_response(), content_type=OCSP_RESPONSE)
    return _answer(request.get_data(cache=False)[:_MAX_OCSP_REQUEST + 1])


@blueprint.get("/ocsp/<path:encoded>")
def ocsp_get(encoded: str) -> Response:
    try:
        der = base64.b64decode(urllib.parse.unquote(encoded), validate=True)
    except (binascii.Error, ValueError):
        der = b""
    response = _answer(der)
    response.headers["Cache-Control"] = "max-age=60"  # RFC 5019 6.2: GET is cacheable
    return response


def _answer(der: bytes) -> Response:
    if not der or len(der) > _MAX_OCSP_REQUEST:
        return Response(malformed_request_response(), content_type=OCSP_RESPONSE)
    return Response(services().ocsp.respond(der), content_type=OCSP_RESPONSE)
