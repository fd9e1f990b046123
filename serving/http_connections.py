"""Keep-alive connections without a thread each, for the REST server.

TF Serving's libevent loop holds an idle keep-alive connection as a socket and a few structs.
ThreadingHTTPServer holds a thread blocked in readline() for it, so a client (or a connection
pool, or an attacker) with 10,000 idle connections costs 10,000 threads. Here a connection has a
thread only while a request arrives or is answered; between requests it waits in one selector.
A request or answer that stops moving for `stall_seconds` drops its connection.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

from serving.limits import DEFAULT_STALL_SECONDS


class KeepAliveHandler(BaseHTTPRequestHandler):
    """A request handler that returns its connection to the server between requests."""

    timeout = DEFAULT_STALL_SECONDS  # StreamRequestHandler sets it on each connection's socket

    def handle(self):
        """Answer one request, and more only if the client already sent them (pipelining)."""
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection and self._next_request_is_buffered():
            self.handle_one_request()

    def finish(self):
        """Close the files only when the connection closes: an idle one is kept for reuse."""
        if self.close_connection:
            super().finish()

    def _next_request_is_buffered(self) -> bool:
        # Bytes sent after the last request may already sit in rfile's buffer, where the
        # selector can't see them. A non-blocking peek returns them, or b"" without waiting.
        self.connection.setblocking(False)
        try:
            return bool(self.rfile.peek(1))
        except OSError:  # reset: the selector reports it and the next read closes
            return False
        finally:
            self.connection.settimeout(self.timeout)


class _Waiting(NamedTuple):
    """A connection in the selector: what to run when bytes arrive, and how to close it."""

    serve: Callable[[], None]
    close: Callable[[], None]


class KeepAliveHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose connections wait for their next request in one selector thread."""

    daemon_threads = True

    def __init__(self, address, handler_class: type[KeepAliveHandler]):
        super().__init__(address, handler_class)
        self._lock = threading.Lock()
        self._closed = False
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._watcher = threading.Thread(target=self._watch_idle, name="rest-idle", daemon=True)
        self._watcher.start()

    def idle_connections(self) -> int:
        """How many connections wait for their next (or first) request."""
        with self._lock:
            return len(self._selector.get_map()) - 1

    def process_request(self, request, client_address):
        """Wait for a new connection's first bytes in the selector, not in a thread."""
        self._wait_for_bytes(
            request,
            _Waiting(
                serve=lambda: self.process_request_thread(request, client_address),
                close=lambda: self.shutdown_request(request),
            ),
        )

    def process_request_thread(self, request, client_address):
        """Serve a connection until it is idle or closed (socketserver's thread target)."""
        try:
            handler = self.RequestHandlerClass(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        else:
            self._keep_or_close(handler)

    def server_close(self):
        """Stop listening and close every idle connection."""
        super().server_close()
        with self._lock:
            self._closed = True
            waiting = [key.data for key in self._selector.get_map().values() if key.data]
        self._wake_writer.send(b"!")
        self._watcher.join(timeout=5)
        for connection in waiting:
            connection.close()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _keep_or_close(self, handler: KeepAliveHandler) -> None:
        # The handler's finish() has run: it closed the files if the connection is to close.
        if handler.close_connection:
            self.shutdown_request(handler.request)
        else:
            self._wait_for_bytes(
                handler.connection,
                _Waiting(serve=lambda: self._resume(handler), close=lambda: self._close(handler)),
            )

    def _wait_for_bytes(self, sock: socket.socket, waiting: _Waiting) -> None:
        with self._lock:
            if not self._closed:
                self._selector.register(sock, selectors.EVENT_READ, waiting)
                return
        waiting.close()

    def _watch_idle(self) -> None:
        while True:
            for key, _ in self._selector.select():
                with self._lock:
                    if self._closed:  # server_close() closes what still waits
                        return
                    self._selector.unregister(key.fileobj)
                threading.Thread(target=key.data.serve, name="rest-connection", daemon=True).start()

    def _resume(self, handler: KeepAliveHandler) -> None:
        try:
            handler.handle()
            handler.finish()
        except Exception:
            self.handle_error(handler.request, handler.client_address)
            self.shutdown_request(handler.request)
        else:
            self._keep_or_close(handler)

    def _close(self, handler: KeepAliveHandler) -> None:
        handler.close_connection = True
        handler.finish()
        self.shutdown_request(handler.request)
