"""Hostile clients that connect and stall, or hang up mid-request (SECURITY-CHECKLIST 31-32).

Each kind stops at a different place of an HTTPS exchange and then waits:

    half_handshake     a TLS record header announcing a ClientHello, and 10 of its bytes
    idle_after_tls     a complete TLS handshake, then nothing
    half_request_line  "POST /.well-known/est/simpleen"
    half_headers       the request line and one header, no empty line
    half_body          a simpleenroll with Content-Length 2000 and 100 bytes of body
"""

from __future__ import annotations

import errno
import resource
import select
import socket
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("half_handshake", "idle_after_tls", "half_request_line", "half_headers",
         "half_body")
_PARTIAL = {
    "idle_after_tls": b"",
    "half_request_line": b"POST /.well-known/est/simpleen",
    "half_headers": b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n",
    "half_body": (b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
                  b"Content-Type: application/pkcs10\r\nContent-Length: 2000\r\n\r\n"
                  + b"M" * 100),
}


def raise_file_limit(wanted: int) -> None:
    """This test process holds a socket per stalled client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        assert hard == resource.RLIM_INFINITY or hard >= wanted, \
            f"the hard open-files limit ({hard}) is below {wanted}: raise it (ulimit -Hn)"
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def tls_context(trust_anchor: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(trust_anchor))


def open_stalled(kind: str, port: int, context: ssl.SSLContext) -> socket.socket:
    """A connection of ``kind``, stalled where its kind says."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    if kind == "half_handshake":
        # TLS record (RFC 8446 5.1): handshake(22), legacy version, length 512; then the
        # start of a ClientHello (type 1, length) and nothing more.
        raw.sendall(struct.pack("!BHH", 22, 0x0301, 512) + b"\x01\x00\x01\xfc\x03\x03"
                    + b"\x00" * 4)
        return raw
    tls = context.wrap_socket(raw, server_hostname="localhost")
    if _PARTIAL[kind]:
        tls.sendall(_PARTIAL[kind])
    return tls


def closed_by_server(connection: socket.socket) -> bool:
    """True once the server closed (FIN or RST); never blocks."""
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN)
    if not poller.poll(0):
        return False
    try:  # readable: returns at once (raw bytes, TLS is not decrypted here)
        data = socket.socket.recv(connection, 65536, socket.MSG_PEEK)
    except OSError as exc:
        return exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)
    if data:  # a response (e.g. 408) waiting to be read: consume it and look again
        socket.socket.recv(connection, len(data))
        return closed_by_server(connection)
    return True


def read_until_closed(connection: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (TLS decrypted), at most limit bytes."""
    received = bytearray()
    try:
        while len(received) < limit:
            data = connection.recv(65536)
            if not data:
                break
            received += data
    except (ConnectionResetError, ssl.SSLError, TimeoutError):
        pass
    return bytes(received)


@dataclass
class StalledClients:
    """Stalled connections of every kind, all closed (by us) at the end."""

    port: int
    context: ssl.SSLContext
    held: dict[str, list[socket.socket]] = field(default_factory=dict)

    def open(self, kind: str, count: int) -> None:
        self.held.setdefault(kind, []).extend(
            open_stalled(kind, self.port, self.context) for _ in range(count))

    def still_open(self) -> dict[str, int]:
        return {kind: sum(not closed_by_server(c) for c in connections)
                for kind, connections in self.held.items()}

    def close(self) -> None:
        for connections in self.held.values():
            for connection in connections:
                connection.close()
        self.held.clear()

    def __enter__(self) -> StalledClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
