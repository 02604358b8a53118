"""A TCP proxy on 127.0.0.1 for fault injection: pass, slow, hold or refuse connections.

with TcpProxy(target_port) as proxy:   # proxy.port forwards to 127.0.0.1:target_port
    proxy.mode = "slow"                 # every chunk, both ways, waits proxy.delay seconds
    proxy.mode = "hold"                 # new connections are accepted and never answered
    proxy.mode = "refuse"               # new connections are closed at once
    proxy.cut()                         # and the connections already open are cut
    proxy.reject = lambda line: b"state.pt" in line   # such HTTP requests get 503 SlowDown
    proxy.respond = lambda line: http_response(200, b"<html/>") if b"state.pt" in line else None
                                        # a request it answers gets that answer (a lying gateway)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

_SLOW_DOWN = (
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)
SLOW_DOWN_RESPONSE = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_SLOW_DOWN), _SLOW_DOWN)
)


def http_response(status: int, body: bytes, content_type: str = "text/html") -> bytes:
    """A whole HTTP/1.1 response, for TcpProxy.respond to answer a request with."""
    reason = {200: "OK", 403: "Forbidden", 404: "Not Found", 503: "Service Unavailable"}
    head = f"HTTP/1.1 {status} {reason.get(status, 'Status')}\r\nContent-Type: {content_type}\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


class TcpProxy:
    def __init__(self, target_port: int, mode: str = "pass", delay: float = 0.5):
        self.target = ("127.0.0.1", target_port)
        self.mode, self.delay = mode, delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.accepted = 0  # connections accepted so far
        # HTTP requests whose first line this matches are answered 503 SlowDown, not forwarded
        self.reject: Callable[[bytes], bool] | None = None
        self.rejected = 0
        # HTTP requests whose first line this answers (a whole response, http_response()) get
        # that answer instead of being forwarded: a gateway that lies; None forwards the request
        self.respond: Callable[[bytes], bytes | None] | None = None
        self.responded = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> TcpProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def cut(self) -> None:
        """Close every connection open now (an upstream that died mid-transfer)."""
        with self._lock:
            conns, self._open = self._open, set()
        for conn in conns:
            _close(conn)

    def stop(self) -> None:
        self._closed = True
        _close(self._listener)
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "refuse":
                _close(client)
                continue
            self._track(client)
            if self.mode == "hold":
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            self._track(upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self._open.add(conn)

    def _swallow(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool = False) -> None:
        """src to dst; on the client's side (requests), a request self.reject picks, or one
        self.respond answers, is answered here. boto3 sends one request at a time per
        connection, and a GET's head fits a chunk."""
        try:
            while data := src.recv(65536):
                if self.mode == "slow":
                    time.sleep(self.delay)
                line = data.split(b"\r\n")[0]
                if requests and self.reject is not None and self.reject(line):
                    self.rejected += 1
                    src.sendall(SLOW_DOWN_RESPONSE)
                    continue
                if requests and self.respond is not None and (answer := self.respond(line)):
                    self.responded += 1
                    src.sendall(answer)
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
