"""A bad link between two real peers: a TCP proxy that cuts each connection
after a number of bytes in one direction (a satellite link that drops).

Runs in the test process on its own threads; the peers on both sides are
real (``pacs serve``, DCMTK) and see a real connection reset."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LinkProxy:
    """127.0.0.1:*port* -> 127.0.0.1:*target*. Each new connection is cut
    (RST both ways) once more than *cut_up* bytes went client -> server or
    *cut_down* bytes server -> client (-1: never). *rate_up*: bytes per
    second client -> server (0: as fast as it goes), a slow satellite link."""

    port: int
    target: int
    cut_up: int = -1
    cut_down: int = -1
    rate_up: int = 0
    connections: int = 0
    cuts: int = 0
    _listener: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> LinkProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def _serve(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
            pair = _Pair(client, server, self)
            threading.Thread(target=pair.pump, args=(client, server, self.cut_up, self.rate_up),
                             daemon=True).start()
            threading.Thread(target=pair.pump, args=(server, client, self.cut_down), daemon=True).start()


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket, proxy: LinkProxy) -> None:
        self.sockets = (client, server)
        self.proxy = proxy
        self.dead = False

    def pump(self, src: socket.socket, dst: socket.socket, limit: int, rate: int = 0) -> None:
        sent = 0
        try:
            while data := src.recv(4096):
                if limit >= 0 and sent + len(data) > limit:
                    self.cut()
                    return
                dst.sendall(data)
                sent += len(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        if not self.dead:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def cut(self) -> None:
        """A reset both ways, as a link that drops (not a polite close)."""
        with self.proxy._lock:
            if self.dead:
                return
            self.dead = True
            self.proxy.cuts += 1
        for s in self.sockets:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
