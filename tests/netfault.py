"""A TCP proxy on loopback that can cut a connection midway: the S3 server "going away" during
an upload, for real (the client sees its socket closed), while the server behind it keeps the
state a real outage would leave (an unfinished multipart upload)."""

from __future__ import annotations

import socket
import threading


class CutProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``. After `cut_after(n)`, once ``n`` more bytes
    went from client to server, every open connection is closed and new ones are accepted and
    closed at once, until `restore()`."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.budget: int | None = None
        self.down = False
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, n_bytes: int) -> None:
        """Let ``n_bytes`` more bytes through towards the server, then go down."""
        with self.lock:
            self.budget = n_bytes

    def restore(self) -> None:
        """Forward again."""
        with self.lock:
            self.budget, self.down = None, False

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._drop()
        self.listener.close()

    def _drop(self) -> None:
        with self.lock:
            sockets, self.open = self.open, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            cut = False
            with self.lock:
                if counted and self.budget is not None:
                    self.budget -= len(data)
                    if self.budget < 0:
                        self.down = True
                cut = self.down
            if cut:
                self._drop()
                return
            try:
                dst.sendall(data)
            except OSError:
                return
