"""The server's gunicorn worker: an event loop owns every client socket, threads only run
the application (docs/design.md, "Serving").

    accept -> TLS handshake -> read until the request is complete (http/framing.py)
        -> thread: parse, run the Flask application, render the response into memory
        -> write -> keep-alive (read the next request) or close

Every read and write is non-blocking in the loop thread, with a deadline: a client has
``read_timeout`` seconds from connecting (or from the first byte of a later request on a
kept-alive connection) to finish its TLS handshake and its whole request, an idle
kept-alive connection ``keepalive`` seconds, and a response must make progress every
``write_timeout`` seconds. A stalled or vanished client therefore costs a file descriptor
and a few KiB until its deadline, never a thread: /healthz, cacerts and enrollments keep
answering with hundreds of them held open. A client that hangs up before its request is
complete is simply closed; the application never sees half a request.

gunicorn's stock gthread worker gives each new connection a thread that blocks in the
TLS handshake and in reading the request without a timeout (gunicorn 27,
workers/gthread.py: ThreadWorker.handle -> TConn.init -> do_handshake, next(parser)).
"""

from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Empty, SimpleQueue

from gunicorn import sock as gunicorn_sock
from gunicorn.workers import base

from .http.framing import Framing, RequestScan, oversized_request
from .worker_requests import plain_response, respond


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits of one worker (server.* settings)."""

    read_timeout: float = 15.0
    write_timeout: float = 30.0
    keepalive: float = 30.0
    max_connections: int = 4096  # per worker process; accepting pauses above it
    max_head: int = 65536
    max_body: int = 16384  # equals the application's MAX_CONTENT_LENGTH


_HANDSHAKE, _READING, _BUSY, _WRITING, _CLOSING, _CLOSED = range(6)
_READ_SIZE = 65536
_READS_PER_WAKEUP = 16
_DRAIN_SECONDS, _DRAIN_BYTES = 2.0, 262144  # lingering close (RFC 9112 9.6)
_TEMPORARY_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Connection:
    __slots__ = ("sock", "client", "server", "state", "buffer", "scan", "deadline",
                 "started", "output", "sent", "keepalive", "events", "continue_sent")

    def __init__(self, sock: socket.socket, client: object, server: object) -> None:
        self.sock, self.client, self.server = sock, client, server
        self.state = _HANDSHAKE
        self.buffer = bytearray()
        self.scan: RequestScan | None = None
        self.deadline = 0.0
        self.started = True  # bytes of the current request have arrived (or it is new)
        self.output = memoryview(b"")
        self.sent = 0
        self.keepalive = False
        self.events = 0  # selector events registered (0: not registered)
        self.continue_sent = False


class EventLoopWorker(base.Worker):
    """A gunicorn worker class (``worker_class``); see the module docstring."""

    def init_process(self) -> None:
        self.limits: ConnectionLimits = getattr(self.app, "connection_limits",
                                                ConnectionLimits())
        self.selector = selectors.DefaultSelector()
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.threads,
                                       thread_name_prefix="request")
        self.done: SimpleQueue = SimpleQueue()  # (connection, response bytes, keep-alive)
        self.connections: set[_Connection] = set()
        self.accepting = False
        self.accept_paused_until = 0.0
        self.next_sweep = 0.0
        self.ready: list[_Connection] = []  # to read again without waiting for the poll
        self.ssl_context = gunicorn_sock.ssl_context(self.cfg) if self.cfg.is_ssl else None
        self.max_buffer = self.limits.max_head + self.limits.max_body + _READ_SIZE
        _raise_file_limit(self.limits.max_connections + 256)
        super().init_process()

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        self.selector.register(self.PIPE[0], selectors.EVENT_READ, "wake")
        for listener in self.sockets:
            listener.setblocking(False)
        self._set_accepting(True)
        while self.alive:
            self.notify()
            self._poll(0.0 if self.ready else 1.0)
            self._sweep()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                break
        self._stop()

    def _poll(self, timeout: float) -> None:
        ready, self.ready = self.ready, []
        for connection in ready:
            if connection.state == _READING:
                self._guarded(connection, self._read)
        try:
            events = self.selector.select(timeout)
        except InterruptedError:
            return
        for key, _mask in events:
            if key.data == "wake":
                self._drain_wake_pipe()
            elif key.data == "listener":
                self._accept(key.fileobj)
            else:
                self._guarded(key.data, self._on_event)
        self._finish_responses()

    def _guarded(self, connection: _Connection, step) -> None:  # noqa: ANN001
        """One connection's misfortune never stops the loop."""
        if connection.state == _CLOSED:
            return
        try:
            step(connection)
        except Exception:  # noqa: BLE001 - log and drop this connection only
            self.log.exception("connection %s: unexpected error", connection.client)
            self._close(connection)

    def _on_event(self, connection: _Connection) -> None:
        {_HANDSHAKE: self._handshake, _READING: self._read, _WRITING: self._write,
         _CLOSING: self._drain}.get(connection.state, lambda c: None)(connection)

    def _sweep(self) -> None:
        """Close connections past their deadline; resume accepting after a pause."""
        now = time.monotonic()
        if not self.accepting and now >= self.accept_paused_until \
                and len(self.connections) < self.limits.max_connections:
            self._set_accepting(True)
        if now < self.next_sweep:
            return
        self.next_sweep = now + 0.25
        for connection in [c for c in self.connections
                           if c.state != _BUSY and c.deadline <= now]:
            if connection.state == _READING and connection.started and connection.buffer:
                self._send_best_effort(connection, plain_response(
                    408, "Request Timeout", "request.timeout",
                    "The request did not arrive in time."))
            self._close(connection)

    # -- accept and TLS handshake -------------------------------------------------------

    def _set_accepting(self, enabled: bool) -> None:
        if enabled == self.accepting:
            return
        for listener in self.sockets:
            if enabled:
                self.selector.register(listener, selectors.EVENT_READ, "listener")
            else:
                self.selector.unregister(listener)
        self.accepting = enabled

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            if len(self.connections) >= self.limits.max_connections:
                self._set_accepting(False)
                return
            try:
                client_sock, client = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                if exc.errno in _TEMPORARY_ACCEPT_ERRORS:
                    self.log.warning("accept: %s; pausing for a second", exc)
                    self._set_accepting(False)
                    self.accept_paused_until = time.monotonic() + 1.0
                    return
                raise
            client_sock.setblocking(False)
            connection = _Connection(client_sock, client, listener.getsockname())
            connection.deadline = time.monotonic() + self.limits.read_timeout
            self.connections.add(connection)
            if self.ssl_context is None:
                self._start_reading(connection)
                continue
            try:
                connection.sock = self.ssl_context.wrap_socket(
                    client_sock, server_side=True, do_handshake_on_connect=False)
            except OSError:  # e.g. the peer already reset the connection
                self._close(connection)
                continue
            self._handshake(connection)

    def _handshake(self, connection: _Connection) -> None:
        try:
            connection.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(connection, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(connection, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            self.log.debug("TLS handshake with %s failed: %s", connection.client, exc)
            self._close(connection)
            return
        self._start_reading(connection)

    # -- reading a request --------------------------------------------------------------

    def _start_reading(self, connection: _Connection) -> None:
        connection.state = _READING
        connection.scan = RequestScan(self.limits.max_head, self.limits.max_body)
        connection.continue_sent = False
        self._watch(connection, selectors.EVENT_READ)
        if not (connection.buffer and self._examine(connection)):
            self._read(connection)  # TLS may hold decrypted bytes the poll cannot see

    def _read(self, connection: _Connection) -> None:
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = connection.sock.recv(_READ_SIZE)
            except (ssl.SSLWantReadError, BlockingIOError):
                self._watch(connection, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._watch(connection, selectors.EVENT_WRITE)
                return
            except OSError:  # includes ssl.SSLError: reset, or TLS alert
                self._close(connection)
                return
            if not data:  # the client hung up (or shut down its side) mid-request
                self._close(connection)
                return
            if not connection.started:  # the next request on a kept-alive connection
                connection.started = True
                connection.deadline = time.monotonic() + self.limits.read_timeout
            connection.buffer += data
            if self._examine(connection):
                return
        self.ready.append(connection)  # more may be waiting: after the other clients

    def _examine(self, connection: _Connection) -> bool:
        """Hand over a complete request; True when the connection left the read state."""
        buffer, scan = connection.buffer, connection.scan
        framing, end = scan.extent(buffer)
        if framing is Framing.INCOMPLETE and len(buffer) > self.max_buffer:
            # Only chunk framing can get here (a thousand chunks with long extensions):
            # a request's bytes in memory stay bounded, whatever the client sends.
            self._respond_directly(connection, plain_response(
                413, "Payload Too Large", "request.too_large",
                "The request is larger than the server accepts."))
            return True
        if framing is Framing.INCOMPLETE:
            if scan.expects_continue and scan.head_end and not connection.continue_sent:
                connection.continue_sent = True  # RFC 9110 10.1.1
                if not self._send_best_effort(connection, b"HTTP/1.1 100 Continue\r\n\r\n"):
                    self._close(connection)
                    return True
            return False
        if framing is Framing.COMPLETE:
            request = bytes(buffer[:end])
            del buffer[:end]
            self._dispatch(connection, request, close_after=False)
        elif framing is Framing.HEAD_ONLY:
            request = bytes(buffer[:end])
            buffer.clear()
            self._dispatch(connection, request, close_after=True)
        elif framing is Framing.BODY_TOO_LARGE:
            request = oversized_request(buffer, scan.head_end, self.limits.max_body)
            buffer.clear()
            self._dispatch(connection, request, close_after=True)
        elif framing is Framing.HEAD_TOO_LARGE:
            self._respond_directly(connection, plain_response(
                431, "Request Header Fields Too Large", "request.header_too_large",
                "The request head is larger than the server accepts."))
        else:
            self._respond_directly(connection, plain_response(
                400, "Bad Request", "request.bad_chunked_body",
                "The chunked request body is malformed (RFC 9112 7.1)."))
        return True

    # -- the application, in a thread ---------------------------------------------------

    def _dispatch(self, connection: _Connection, request: bytes, close_after: bool) -> None:
        connection.state = _BUSY
        self._unwatch(connection)
        self.pool.submit(self._serve, connection, request, close_after)

    def _serve(self, connection: _Connection, request: bytes, close_after: bool) -> None:
        """In a pool thread: never touches the socket, only the request's bytes."""
        output, keepalive = b"", False
        try:
            output, keepalive = respond(self, request, connection.client, connection.server,
                                        connection.sock, close_after)
        except BaseException:  # noqa: BLE001 - the loop must hear back in any case
            self.log.exception("request from %s: unexpected error", connection.client)
        self.done.put((connection, output, keepalive))
        try:
            os.write(self.PIPE[1], b".")
        except OSError:  # the pipe is full: the loop is awake anyway
            pass

    def _finish_responses(self) -> None:
        while True:
            try:
                connection, output, keepalive = self.done.get_nowait()
            except Empty:
                return
            if connection.state != _BUSY:
                continue
            if not output:
                self._close(connection)
                continue
            connection.keepalive = keepalive and self.alive
            self._respond_directly(connection, output, connection.keepalive)

    # -- writing, keep-alive and closing ------------------------------------------------

    def _respond_directly(self, connection: _Connection, output: bytes,
                          keepalive: bool = False) -> None:
        connection.state, connection.keepalive = _WRITING, keepalive
        connection.output, connection.sent = memoryview(output), 0
        connection.deadline = time.monotonic() + self.limits.write_timeout
        self._write(connection)

    def _write(self, connection: _Connection) -> None:
        while connection.sent < len(connection.output):
            # After a WANT_WRITE, OpenSSL needs the same bytes again: same slice.
            piece = connection.output[connection.sent:connection.sent + _READ_SIZE]
            try:
                connection.sent += connection.sock.send(piece)
            except (ssl.SSLWantWriteError, BlockingIOError):
                self._watch(connection, selectors.EVENT_WRITE)
                return
            except ssl.SSLWantReadError:
                self._watch(connection, selectors.EVENT_READ)
                return
            except OSError:
                self._close(connection)
                return
            connection.deadline = time.monotonic() + self.limits.write_timeout
        connection.output = memoryview(b"")
        if not connection.keepalive:
            self._close_gracefully(connection)
            return
        connection.started = bool(connection.buffer)
        connection.deadline = time.monotonic() + (
            self.limits.read_timeout if connection.started else self.limits.keepalive)
        self._start_reading(connection)

    def _send_best_effort(self, connection: _Connection, data: bytes) -> bool:
        try:
            return connection.sock.send(data) == len(data)
        except OSError:  # includes SSLWantWriteError: give up on this small write
            return False

    def _close_gracefully(self, connection: _Connection) -> None:
        """FIN, then read and discard until the client closes: closing with unread bytes
        would send a RST that can destroy the response in flight (RFC 9112 9.6)."""
        try:
            socket.socket.shutdown(connection.sock, socket.SHUT_WR)
        except OSError:
            self._close(connection)
            return
        connection.state, connection.sent = _CLOSING, 0
        connection.deadline = time.monotonic() + _DRAIN_SECONDS
        self._watch(connection, selectors.EVENT_READ)
        self._drain(connection)

    def _drain(self, connection: _Connection) -> None:
        while connection.sent < _DRAIN_BYTES:
            try:
                data = socket.socket.recv(connection.sock, _READ_SIZE)  # raw: TLS is over
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                break
            if not data:
                break
            connection.sent += len(data)
        self._close(connection)

    def _close(self, connection: _Connection) -> None:
        if connection.state == _CLOSED:
            return
        self._unwatch(connection)
        connection.state = _CLOSED
        self.connections.discard(connection)
        try:
            connection.sock.close()
        except OSError:
            pass

    def _watch(self, connection: _Connection, events: int) -> None:
        if connection.events == events:
            return
        if connection.events:
            self.selector.modify(connection.sock, events, connection)
        else:
            self.selector.register(connection.sock, events, connection)
        connection.events = events

    def _unwatch(self, connection: _Connection) -> None:
        if connection.events:
            try:
                self.selector.unregister(connection.sock)
            except (KeyError, ValueError, OSError):
                pass
            connection.events = 0

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self.PIPE[0], 4096):
                pass
        except OSError:  # BlockingIOError: empty
            pass

    def _stop(self) -> None:
        """Graceful stop: no new connections, no new requests; answer the ones in the
        application and send what is being sent, for at most graceful_timeout."""
        self._set_accepting(False)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        for connection in list(self.connections):
            if connection.state in (_HANDSHAKE, _READING, _CLOSING):
                self._close(connection)
        while any(c.state in (_BUSY, _WRITING) for c in self.connections) \
                and time.monotonic() < deadline:
            self.notify()
            self._poll(0.2)
            for connection in list(self.connections):
                if connection.state in (_READING, _CLOSING):
                    self._close(connection)
        for connection in list(self.connections):
            self._close(connection)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.selector.close()


def _raise_file_limit(wanted: int) -> None:
    """Each connection is a file descriptor: lift the soft limit toward the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
