"""A TCP relay that cuts one connection mid-upload: "the network dropped during
enrollment", for the fleet simulator.

The cut does not depend on timing: the relay counts the bytes it forwarded from the
client over all connections, and the connection on which that count would pass
``cut_after`` is cut at exactly that byte (the server never sees that request whole).
Connections before it (for instance one that found the server down and forwarded
nothing) and after it pass untouched. A device whose enrollment needs more than
``cut_after`` bytes therefore always loses exactly one connection before it succeeds.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class DroppingProxy:
    """127.0.0.1:<port> -> target, cutting the connection that carries client byte
    number ``cut_after`` (counted over all connections)."""

    def __init__(self, target_host: str, target_port: int, cut_after: int = 3000) -> None:
        self.target = (target_host, target_port)
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.dropped = 0
        self.forwarded = 0  # client bytes sent upstream, all connections
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _allowance(self, size: int) -> int | None:
        """How many of ``size`` client bytes may pass; None = all of them. Reserves them."""
        with self._lock:
            if self.dropped or self.forwarded + size <= self.cut_after:
                self.forwarded += size
                return None
            allowed = max(0, self.cut_after - self.forwarded)
            self.forwarded += allowed
            self.dropped += 1
            return allowed

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=30)
        except OSError:
            client.close()
            return
        done = threading.Event()

        def pump(source: socket.socket, sink: socket.socket, upload: bool) -> None:
            with contextlib.suppress(OSError):
                while not done.is_set():
                    data = source.recv(65536)
                    if not data:
                        break
                    allowed = self._allowance(len(data)) if upload else None
                    if allowed is not None:
                        sink.sendall(data[:allowed])
                        break
                    sink.sendall(data)
            done.set()
            for end in (client, upstream):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()
        pump(client, upstream, True)
        client.close()
        upstream.close()

    def close(self) -> None:
        self._closing = True
        self.listener.close()
