"""A small EST client (RFC 7030 with RFC 8951) over httpx, for devices and tools.

The server's trust anchor is explicit (RFC 7030 3.6.1): the client verifies the server
against the CA file it is given, never against the system store.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

PKCS10 = "application/pkcs10"


@dataclass
class EstError(Exception):
    """A refusal from the server, with its stable error code (e.g. "csr.bad_signature")."""

    status: int
    code: str
    message: str
    retry_after: int | None = None

    def __str__(self) -> str:
        return f"EST {self.status} {self.code}: {self.message}"


class PendingApproval(EstError):
    """202: the group holds enrollments for an operator; retry after retry_after."""


def parse_error(response: httpx.Response) -> EstError:
    code = response.headers.get("X-Error-Code", f"http.{response.status_code}")
    lines = response.text.splitlines()
    message = lines[1] if len(lines) > 1 and lines[0].startswith("error:") else response.text
    retry_after = response.headers.get("Retry-After")
    cls = PendingApproval if response.status_code == 202 else EstError
    return cls(response.status_code, code, message.strip()[:500],
               int(retry_after) if retry_after and retry_after.isdigit() else None)


def decode_certs_only(body: bytes) -> list[x509.Certificate]:
    """RFC 8951 3: base64 (line breaks allowed) of a certs-only CMS SignedData."""
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(body.split())))


def tls_context(trust_anchor: Path, client_cert: Path | None = None,
                client_key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(trust_anchor))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        context.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
    return context


class EstClient:
    def __init__(self, base_url: str, trust_anchor: Path, label: str | None = None,
                 client_cert: Path | None = None, client_key: Path | None = None,
                 timeout: float = 30.0, context: ssl.SSLContext | None = None) -> None:
        prefix = "/.well-known/est/" + (f"{label}/" if label else "")
        self.base = base_url.rstrip("/") + prefix
        context = context or tls_context(trust_anchor, client_cert, client_key)
        self.http = httpx.Client(verify=context, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> EstClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cacerts(self) -> list[x509.Certificate]:
        """RFC 7030 4.1."""
        response = self.http.get(self.base + "cacerts")
        if response.status_code != 200:
            raise parse_error(response)
        return decode_certs_only(response.content)

    def csrattrs(self) -> bytes:
        """RFC 7030 4.5: the DER CsrAttrs."""
        response = self.http.get(self.base + "csrattrs")
        if response.status_code != 200:
            raise parse_error(response)
        return base64.b64decode(b"".join(response.content.split()))

    def simpleenroll(self, csr: x509.CertificateSigningRequest,
                     token: str | None = None) -> x509.Certificate:
        """RFC 7030 4.2.1, authorised by a token (Bearer) or the TLS client cert."""
        return self._enroll("simpleenroll", csr, token)

    def simplereenroll(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        """RFC 7030 4.2.2, authorised by the current certificate over mTLS."""
        return self._enroll("simplereenroll", csr, None)

    def _enroll(self, operation: str, csr: x509.CertificateSigningRequest,
                token: str | None) -> x509.Certificate:
        body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))
        headers = {"Content-Type": PKCS10}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response = self.http.post(self.base + operation, content=body, headers=headers)
        if response.status_code != 200:
            raise parse_error(response)
        certificates = decode_certs_only(response.content)
        if len(certificates) != 1:
            raise EstError(response.status_code, "client.bad_response",
                           f"expected one certificate, got {len(certificates)}")
        return certificates[0]
