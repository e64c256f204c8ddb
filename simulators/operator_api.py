"""A deployment seen from outside: the operator API (Bearer operator credential) and the
public OCSP responder, over HTTPS with the server's trust anchor. Nothing here reads the
server's files or database.

    POST /api/v1/revocations   {"device_id", "reason"}      (docs/protocol.md)
    GET  /api/v1/devices/<id>  status and certificates
    POST /ocsp                 RFC 6960, the certificate's status
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from device_sdk.est import tls_context

RETRY_STATUSES = frozenset({429, 502, 503, 504})


class OperatorApiError(RuntimeError):
    """The operator API refused or could not be reached; ``status`` 0 = unreachable."""

    def __init__(self, message: str, status: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class OperatorApi:
    """The operator API of one deployment. ``patience`` seconds: how long a call retries
    connection errors and 429/5xx (a restarting server) before it gives up."""

    def __init__(self, url: str, trust_anchor: Path, credential: str | None,
                 timeout: float = 60.0, patience: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.credential, self.patience = credential, patience
        self.http = httpx.Client(verify=tls_context(trust_anchor), timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> OperatorApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if not self.credential:
            raise OperatorApiError("no operator credential (--operator-token-file)")
        headers = {"Authorization": f"Bearer {self.credential}"}
        deadline = time.monotonic() + self.patience
        while True:
            try:
                response = self.http.request(method, self.url + path, headers=headers,
                                             **kwargs)
            except httpx.TransportError as error:
                if time.monotonic() > deadline:
                    raise OperatorApiError(f"{self.url} unreachable: {error}") from error
            else:
                if response.status_code not in RETRY_STATUSES or time.monotonic() > deadline:
                    return response
            time.sleep(0.5)

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            code = response.headers.get("X-Error-Code")
            raise OperatorApiError(f"operator API answered {response.status_code} {code or ''}"
                                   .strip(), response.status_code, code)
        return response.json()

    def revoke(self, device_id: str, reason: str = "keyCompromise") -> dict[str, Any]:
        """POST /api/v1/revocations for one device."""
        return self._json(self._call("POST", "/api/v1/revocations",
                                     json={"device_id": device_id, "reason": reason}))

    def device(self, device_id: str) -> dict[str, Any]:
        """GET /api/v1/devices/<id>: status, certificates (newest first)."""
        return self._json(self._call("GET", f"/api/v1/devices/{device_id}"))


def issuer_of(certificate: x509.Certificate,
              chain: list[x509.Certificate]) -> x509.Certificate | None:
    return next((ca for ca in chain if ca.subject == certificate.issuer), None)


def ocsp_status(url: str, trust_anchor: Path, certificate: x509.Certificate,
                chain: list[x509.Certificate], timeout: float = 30.0) -> str:
    """"good", "revoked" or "unknown" from the server's OCSP responder (RFC 6960, POST);
    "error: ..." when there is no usable answer. The response's signature is the
    responder's business here: this is a status probe, not a relying party."""
    issuer = issuer_of(certificate, chain)
    if issuer is None:
        return "error: issuer not in the chain"
    request = ocsp.OCSPRequestBuilder().add_certificate(
        certificate, issuer, hashes.SHA1()).build()  # noqa: S303 - RFC 6960 CertID default
    try:
        response = httpx.post(url.rstrip("/") + "/ocsp", verify=tls_context(trust_anchor),
                              timeout=timeout, headers={
                                  "Content-Type": "application/ocsp-request"},
                              content=request.public_bytes(serialization.Encoding.DER))
        answer = ocsp.load_der_ocsp_response(response.content)
    except (httpx.HTTPError, ValueError) as error:
        return f"error: {type(error).__name__}"
    if answer.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return f"error: {answer.response_status.name}"
    return answer.certificate_status.name.lower()
