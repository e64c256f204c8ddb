"""The thread side of the event-loop worker (worker.py): one complete request's bytes in,
the response's bytes out. No socket is touched here: gunicorn's parser reads the bytes,
its Response writes into memory, and the loop sends the result.

This is gunicorn's own request handling (gunicorn 27, workers/gthread.py handle_request)
with the socket replaced by a buffer; the application sees the same WSGI environ, and
``gunicorn.socket`` is the real TLS socket (http/tls.py reads the client certificate from
it; its handshake is complete before the request reaches a thread).
"""

from __future__ import annotations

import socket
from datetime import datetime
from typing import Any

from gunicorn import http
from gunicorn.http import wsgi
from gunicorn.http.errors import NoMoreData


class ResponseBuffer:
    """What gunicorn's Response and error writer write to instead of the socket."""

    def __init__(self) -> None:
        self.data = bytearray()

    def sendall(self, data: bytes) -> None:
        self.data += data

    def send(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag: bool) -> None:
        pass


def respond(worker: Any, request: bytes, client: Any, server: Any, sock: socket.socket,
            close_after: bool) -> tuple[bytes, bool]:
    """(response bytes, keep the connection alive) for one complete request."""
    output = ResponseBuffer()
    req = None
    try:
        req = next(http.RequestParser(worker.cfg, [request], client))
        keepalive = _run_application(worker, req, client, server, sock, close_after, output)
    except (NoMoreData, StopIteration):
        keepalive = False
    except Exception as exc:  # noqa: BLE001 - gunicorn answers 400/431/500 itself
        worker.handle_error(req, output, client, exc)
        keepalive = False
    return bytes(output.data), keepalive


def _run_application(worker: Any, req: Any, client: Any, server: Any, sock: socket.socket,
                     close_after: bool, output: ResponseBuffer) -> bool:
    environ: dict = {}
    resp = None
    try:
        worker.cfg.pre_request(worker, req)
        started = datetime.now()
        resp, environ = wsgi.create(req, output, client, server, worker.cfg)
        environ["gunicorn.socket"] = sock  # http/tls.py: the client certificate
        environ["wsgi.multithread"] = True
        worker.nr += 1
        if worker.nr >= worker.max_requests and worker.alive:
            worker.log.info("Autorestarting worker after current request.")
            worker.alive = False
        if close_after or not worker.alive or not worker.cfg.keepalive:
            resp.force_close()
        body = worker.wsgi(environ, resp.start_response)
        try:
            for item in body:
                resp.write(item)
            resp.close()
        finally:
            worker.log.access(resp, req, environ, datetime.now() - started)
            if hasattr(body, "close"):
                body.close()
        return not resp.should_close()
    except Exception:
        if resp is not None and resp.headers_sent:
            worker.log.exception("Error handling request")  # too late for a 500
            raise StopIteration() from None
        raise
    finally:
        try:
            worker.cfg.post_request(worker, req, environ, resp)
        except Exception:  # noqa: BLE001
            worker.log.exception("Exception in post_request hook")


def plain_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A refusal the loop writes itself, in the form of app.error_response for EST."""
    body = f"error: {code}\n{message}\n".encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"X-Error-Code: {code}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body
