"""REST connections without a thread each, and a bounded number of threads for all of them.

TF Serving's libevent loop holds an idle keep-alive connection as a socket and a few structs, and
reads requests without a thread; `--rest_api_num_threads` threads run the handlers.
ThreadingHTTPServer held a thread blocked in readline() per connection, so 10,000 idle pooled
connections (or an attacker's) were 10,000 threads. Here a connection waits for its next request
in one selector thread; when bytes arrive, one of at most `max_threads` workers reads and answers
that request (and any pipelined behind it), then hands the connection back. A request's line and
headers must arrive within the stall time in all; its body and answer may pause no longer than
that between bytes, and must move at least MIN_BYTES_PER_SECOND on average after the first stall
time; idle connections past half the process's file limit close, oldest first.
"""

from __future__ import annotations

import collections
import io
import logging
import resource
import select
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

from serving.limits import DEFAULT_REST_THREADS, DEFAULT_STALL_SECONDS, MIN_BYTES_PER_SECOND

log = logging.getLogger(__name__)

# A keep-alive client's next request usually follows its answer within a round trip: waiting
# this long for it keeps the connection on its thread instead of two epoll calls and a hand-off.
NEXT_REQUEST_WAIT_MS = 2


class TransferPace:
    """A transfer's deadline: the stall time, plus a second per `min_rate` bytes moved so far."""

    def __init__(self, stall: float, min_rate: float):
        if not min_rate > 0:
            raise ValueError(f"a transfer's minimum pace must be > 0 bytes/s, got {min_rate}")
        self._stall = stall
        self._min_rate = min_rate
        self._deadline = time.monotonic() + stall

    def moved(self, count: int) -> None:
        """Count `count` more bytes moved, which extends the deadline."""
        self._deadline += count / self._min_rate

    def wait(self) -> float:
        """Seconds the next read or write may wait: the stall time, or less near the deadline."""
        # TimeoutError once the transfer has fallen behind its pace.
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the transfer fell behind its minimum pace")
        return min(self._stall, left)


class _DeadlineReader(io.RawIOBase):
    """The socket as a raw stream whose reads end at `deadline` (if set) or fall behind `pace`
    (if set), else after a pause of `stall` seconds; a non-blocking socket (the pipelining
    peek) reads without waiting."""

    def __init__(self, sock: socket.socket, stall: float):
        self._sock = sock
        self._stall = stall
        self.deadline: float | None = None
        self.pace: TransferPace | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        if self._sock.gettimeout() != 0.0:
            wait = self._stall if self.pace is None else self.pace.wait()
            if self.deadline is not None:
                wait = min(wait, self.deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError("the request line and headers took too long")
            self._sock.settimeout(wait)
        try:
            count = self._sock.recv_into(buffer)
        except BlockingIOError:
            return None
        if self.pace is not None:
            self.pace.moved(count)
        return count


class KeepAliveHandler(BaseHTTPRequestHandler):
    """A request handler that returns its connection to the server between requests."""

    timeout = DEFAULT_STALL_SECONDS  # StreamRequestHandler sets it on each connection's socket
    min_bytes_per_second = MIN_BYTES_PER_SECOND  # a body's and an answer's pace, past the stall

    def setup(self):
        """StreamRequestHandler's files, reading through a _DeadlineReader."""
        super().setup()
        self.rfile.close()  # the makefile() reader, replaced
        self._reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle(self):
        """Answer one request, and more while the next one is already here or follows at once."""
        self.close_connection = True
        self._handle_within_deadline()
        while not self.close_connection and self._next_request_is_here():
            self._handle_within_deadline()
        self._forget_request()

    def parse_request(self):
        """BaseHTTPRequestHandler's, then the body gets the stall time per pause and its pace."""
        try:
            return super().parse_request()
        finally:
            self._reader.deadline = None
            self._reader.pace = self.transfer_pace()
            self.connection.settimeout(self.timeout)

    def transfer_pace(self) -> TransferPace:
        """A new pace for a body or an answer, starting now."""
        return TransferPace(self.timeout, self.min_bytes_per_second)

    def finish(self):
        """Close the files only when the connection closes: an idle one is kept for reuse."""
        if self.close_connection:
            super().finish()

    def _handle_within_deadline(self):
        self._reader.deadline = time.monotonic() + self.timeout
        self._reader.pace = None
        self.handle_one_request()

    def _next_request_is_here(self) -> bool:
        # Bytes sent after the last request may already sit in rfile's buffer, where the
        # selector can't see them: a non-blocking peek returns them, or b"" without waiting.
        self.connection.setblocking(False)
        try:
            if self.rfile.peek(1):
                return True
        except OSError:  # reset: the selector reports it, and the next read closes
            return False
        finally:
            self.connection.settimeout(self.timeout)
        poller = select.poll()  # not select(): descriptors above 1023 are common here
        poller.register(self.connection, select.POLLIN)
        return bool(poller.poll(NEXT_REQUEST_WAIT_MS))

    def _forget_request(self):
        # An idle connection keeps only its socket and buffer, not the last request's headers
        # (up to 100 lines of 64 KiB).
        self.headers = None
        self.raw_requestline, self.requestline = b"", ""


class _Waiting(NamedTuple):
    """A connection waiting for bytes: what to run when they come, and how to close it."""

    serve: Callable[[], None]
    close: Callable[[], None]


def default_max_idle() -> int:
    """Idle connections kept: half the process's file descriptor limit (the rest for work)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft // 2) if soft != resource.RLIM_INFINITY else 1 << 16


class KeepAliveHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose idle connections wait in one selector thread, served by a pool."""

    # Connections wait for their next request in one selector thread and are served by at most
    # `max_threads` threads.

    daemon_threads = True

    def __init__(
        self,
        address,
        handler_class: type[KeepAliveHandler],
        max_threads: int = DEFAULT_REST_THREADS,
        max_idle: int | None = None,
    ):
        # Bound before any state exists: socketserver calls server_close() when binding fails,
        # which would find none of it (an AttributeError hid the bind error).
        super().__init__(address, handler_class, bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.socket.close()
            raise
        self._max_threads = max_threads
        self._max_idle = max_idle or default_max_idle()
        self._lock = threading.Lock()
        self._closed = False
        self._workers = 0
        self._ready: collections.deque[_Waiting] = collections.deque()  # waiting for a worker
        self._idle: dict[socket.socket, _Waiting] = {}  # in the selector, oldest first
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._watcher = threading.Thread(target=self._watch_idle, name="rest-idle", daemon=True)
        self._watcher.start()

    def handle_error(self, request, client_address):
        """Log a failed connection (socketserver prints a traceback to stderr)."""
        # A client that reset or went quiet is routine.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("REST connection from %s ended: %r", client_address, error)
        else:
            log.exception("REST connection from %s", client_address)

    def idle_connections(self) -> int:
        """How many connections wait for their next (or first) request."""
        with self._lock:
            return len(self._idle)

    def busy_workers(self) -> int:
        """How many threads are reading or answering a request now."""
        with self._lock:
            return self._workers

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
        """Serve a connection until it is idle or closed."""
        try:
            handler = self.RequestHandlerClass(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        else:
            self._keep_or_close(handler)

    def server_close(self):
        """Stop listening and close every connection that waits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = [*self._idle.values(), *self._ready]
            self._idle.clear()
            self._ready.clear()
        super().server_close()
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
        evicted = None
        with self._lock:
            if not self._closed:
                if len(self._idle) >= self._max_idle:  # dicts keep insertion order
                    oldest = next(iter(self._idle))
                    evicted = self._idle.pop(oldest)
                    self._selector.unregister(oldest)
                self._selector.register(sock, selectors.EVENT_READ, waiting)
                self._idle[sock] = waiting
                waiting = None
        for connection in (evicted, waiting):
            if connection is not None:
                connection.close()

    def _watch_idle(self) -> None:
        while True:
            for key, _ in self._selector.select():
                with self._lock:
                    if self._closed:  # server_close() closes what still waits
                        return
                    self._selector.unregister(key.fileobj)
                    self._idle.pop(key.fileobj, None)
                self._dispatch(key.data)

    def _dispatch(self, waiting: _Waiting) -> None:
        with self._lock:
            if self._workers >= self._max_threads:
                self._ready.append(waiting)  # the next worker to finish takes it
                return
            self._workers += 1
        try:
            threading.Thread(
                target=self._work, args=(waiting,), name="rest-connection", daemon=True
            ).start()
        except Exception:  # "can't start new thread": drop this connection, keep serving
            log.exception("no thread for a REST connection; closing it")
            with self._lock:
                self._workers -= 1
            waiting.close()

    def _work(self, waiting: _Waiting | None) -> None:
        while waiting is not None:
            try:
                waiting.serve()
            except Exception:  # serve() handles its own errors; this one only logs
                log.exception("REST connection")
            with self._lock:
                waiting = self._ready.popleft() if self._ready and not self._closed else None
                if waiting is None:
                    self._workers -= 1

    def _resume(self, handler: KeepAliveHandler) -> None:
        try:
            handler.handle()
        except Exception:
            self.handle_error(handler.request, handler.client_address)
            handler.close_connection = True
        try:
            handler.finish()
        finally:
            self._keep_or_close(handler)

    def _close(self, handler: KeepAliveHandler) -> None:
        handler.close_connection = True
        try:
            handler.finish()
        finally:
            self.shutdown_request(handler.request)
