"""Revocation artefacts over plain HTTP (they are signed; RFC 5280 and RFC 6960 expect HTTP).

    GET  /crl/<ca>.crl              the newest CRL of issuing CA <ca> (DER,
                                    application/pkix-crl, RFC 5280 4.2.1.13)
    GET  /ca/<ca>.der               issuing CA <ca>'s certificate (AIA caIssuers, 4.2.2.1)
    POST /ocsp                      application/ocsp-request (RFC 6960 A.1)
    GET  /ocsp/<base64 request>     the same, URL-encoded base64 in the path (A.1.1)

<ca> is a CA generation's name: issuing-ca (the first, forever), issuing-ca-2 ... (see
authorities.py). Certificates carry the URLs of the CA that issued them, so a retired
CA's CRL stays where its certificates point. OCSP answers for every live CA.

CRLs and CA certificates are read from the database (at most one second old per
process), so every replica serves the CRL built after the latest revocation, and a CA
created by a rotation is served before the server reloads. OCSP looks each serial up in
the database on every request; only the signature is cached (ca/ocsp.py).
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Response, request

from ..ca.ocsp import malformed_request_response
from ..ca.profiles import CA_NAME_PATTERN
from ..errors import ErrorFormat, NotFound, ServiceUnavailable
from ..store.repository import Repository
from .common import make_blueprint, services

blueprint = make_blueprint("revocation", ErrorFormat.PROBLEM_JSON)
OCSP_RESPONSE = "application/ocsp-response"
_MAX_OCSP_REQUEST = 4096


class _PerCaCache:
    """A value per CA name, re-read from the database at most once a second."""

    def __init__(self, read) -> None:  # noqa: ANN001 - (repository, name) -> value or None
        self._read = read
        self._lock = threading.Lock()
        self._values: dict[str, tuple[float, object]] = {}

    def get(self, name: str):  # noqa: ANN201
        with self._lock:
            cached = self._values.get(name)
            if cached is not None and time.monotonic() - cached[0] < 1.0:
                return cached[1]
        value = self._read(services().repository, name)
        with self._lock:
            if value is not None or name in self._values:
                self._values[name] = (time.monotonic(), value)
            if value is None and cached is not None:
                return cached[1]  # keep serving the last good value
            return value


def _read_crl(repository: Repository, name: str) -> tuple[int, bytes, str] | None:
    latest = repository.latest_crl(name)
    if latest is None:
        return None
    expires = latest.next_update.strftime("%a, %d %b %Y %H:%M:%S GMT")
    return latest.crl_number, bytes(latest.der), expires


def _read_ca(repository: Repository, name: str) -> bytes | None:
    pem = repository.read(lambda: repository.ca_certificate_pem(name))
    if pem is None:
        return None
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(
        serialization.Encoding.DER)


_crls = _PerCaCache(_read_crl)
_cas = _PerCaCache(_read_ca)


def _known_name(name: str) -> str:
    if CA_NAME_PATTERN.fullmatch(name) is None:
        raise NotFound("No such CA.", code="ca.unknown")
    return name


@blueprint.get("/crl/<name>.crl")
def crl(name: str) -> Response:
    current = _crls.get(_known_name(name))
    if current is None:
        if _cas.get(name) is None:
            raise NotFound("No such CA.", code="ca.unknown")
        raise ServiceUnavailable("No CRL has been published yet; retry shortly.",
                                 code="crl.unavailable", retry_after=5)
    number, der, expires = current
    return Response(der, content_type="application/pkix-crl",
                    headers={"Expires": expires, "Cache-Control": "max-age=60",
                             "ETag": f'"crl-{name}-{number}"'})


@blueprint.get("/ca/<name>.der")
def issuing_ca(name: str) -> Response:
    der = _cas.get(_known_name(name))
    if der is None:
        raise NotFound("No such CA.", code="ca.unknown")
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
