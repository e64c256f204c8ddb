"""The client certificate of a request, from the real TLS session or a trusted proxy.

Direct mode: gunicorn puts the TLS socket in the WSGI environ ("gunicorn.socket"); the
peer certificate is read from it, so it is exactly what the handshake proved.
Reverse-proxy mode: a forwarded header (nginx $ssl_client_escaped_cert, i.e. URL-encoded
PEM) is believed only when the TCP peer is one of server.trusted_proxies; from anyone
else the header is ignored.
"""

from __future__ import annotations

import ipaddress
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import Any

from cryptography import x509

from ..config import ServerSettings
from ..errors import BadRequest


def _is_trusted_proxy(remote_addr: str | None, proxies: tuple[str, ...]) -> bool:
    if not remote_addr or not proxies:
        return False
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(p, strict=False) for p in proxies)


def header_environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


def client_certificate(environ: Mapping[str, Any],
                       server: ServerSettings) -> x509.Certificate | None:
    if _is_trusted_proxy(environ.get("REMOTE_ADDR"), server.trusted_proxies):
        forwarded = environ.get(header_environ_key(server.client_cert_header))
        if not forwarded:
            return None  # the TLS peer is the proxy, never the device
        try:
            return x509.load_pem_x509_certificate(urllib.parse.unquote(forwarded).encode())
        except ValueError:
            raise BadRequest("The forwarded client certificate is not valid PEM.",
                             code="tls.forwarded_cert_invalid") from None
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None
