"""A TCP relay that drops its first connection mid-upload: "the network dropped during
enrollment", for the fleet simulator. Later connections pass untouched."""

from __future__ import annotations

import contextlib
import socket
import threading


class DroppingProxy:
    """127.0.0.1:<port> -> target; connection number 1 is cut after ``cut_after`` bytes
    from the client (mid-request: the server never sees it whole)."""

    def __init__(self, target_host: str, target_port: int, cut_after: int = 3000) -> None:
        self.target = (target_host, target_port)
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.dropped = 0
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            cut = self.cut_after if self.connections == 1 else None
            threading.Thread(target=self._serve, args=(client, cut), daemon=True).start()

    def _serve(self, client: socket.socket, cut: int | None) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=30)
        except OSError:
            client.close()
            return
        done = threading.Event()

        def pump(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
            sent = 0
            with contextlib.suppress(OSError):
                while not done.is_set():
                    data = source.recv(65536)
                    if not data:
                        break
                    if limit is not None and sent + len(data) > limit:
                        sink.sendall(data[:max(0, limit - sent)])
                        self.dropped += 1
                        break
                    sink.sendall(data)
                    sent += len(data)
            done.set()
            for end in (client, upstream):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, client, None), daemon=True).start()
        pump(client, upstream, cut)
        client.close()
        upstream.close()

    def close(self) -> None:
        self._closing = True
        self.listener.close()
