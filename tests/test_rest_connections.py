"""REST connections on loopback: idle keep-alive connections wait without a thread, pipelined
requests are all answered in order however their bytes arrive, and a request that stops
arriving drops its connection after the stall time."""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_dirs import wait_for

from serving import http_connections, testing
from serving.http_connections import KeepAliveHandler
from serving.rest_api import make_http_server
from serving.server import ANY_PORT, ModelServer, ServerOptions

STALL_SECONDS = 1.0
STATUS = b"GET /v1/models/numbers HTTP/1.1\r\nHost: t\r\n\r\n"
PREDICT_BODY = b'{"instances": [{"x": [1, 2], "k": 3}]}'
PREDICT = b"POST /v1/models/numbers:predict HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (
    len(PREDICT_BODY),
    PREDICT_BODY,
)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return testing.export_test_models(str(tmp_path_factory.mktemp("connections")))


def start_server(config) -> ModelServer:
    options = ServerOptions(model_config_file=config, port=0, rest_api_port=ANY_PORT,
                            rest_api_stall_seconds=STALL_SECONDS)  # fmt: skip
    return ModelServer(options).start()


@pytest.fixture(scope="module")
def server(config):
    running = start_server(config)
    yield running
    running.stop()


def connect(server) -> socket.socket:
    """A raw socket to the server's REST port."""
    return socket.create_connection(("127.0.0.1", server.rest_port), timeout=10)


def read_answers(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """`count` HTTP answers (status, body) read off `sock`, framed by Content-Length."""
    data, answers = b"", []
    while len(answers) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].decode("latin-1")
            length = int(head.lower().split("content-length:")[1].split("\r\n")[0])
            if len(data) >= head_end + 4 + length:
                answers.append((int(head.split()[1]), data[head_end + 4 : head_end + 4 + length]))
                data = data[head_end + 4 + length :]
                continue
        chunk = sock.recv(1 << 16)
        assert chunk, f"closed after {len(answers)} of {count} answers"
        data += chunk
    assert data == b"", "more bytes than the answers asked for"
    return answers


def connection_threads() -> int:
    """Threads serving a REST connection now (socketserver's, and those resuming idle ones)."""
    return sum(
        "process_request_thread" in thread.name or thread.name == "rest-connection"
        for thread in threading.enumerate()
    )


def test_idle_keep_alive_connections_wait_without_a_thread_and_are_served_again(server):
    connections = [http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
                   for _ in range(100)]  # fmt: skip
    for _ in range(2):
        for connection in connections:
            connection.request("GET", "/v1/models/numbers")
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["model_version_status"]
        wait_for(lambda: server._http_server.idle_connections() == 100, 10)
        # ThreadingHTTPServer kept a thread in readline() per idle connection: 100 here.
        wait_for(lambda: connection_threads() == 0, 10)
    for connection in connections:
        connection.close()
    wait_for(lambda: server._http_server.idle_connections() == 0, 10)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kinds=st.lists(st.sampled_from(["status", "predict"]), min_size=1, max_size=4),
    cuts=st.lists(st.floats(0, 1), max_size=6),
)
def test_pipelined_requests_are_answered_in_order_however_their_bytes_arrive(server, kinds, cuts):
    stream = b"".join(STATUS if kind == "status" else PREDICT for kind in kinds)
    points = sorted({int(cut * len(stream)) for cut in cuts} | {0, len(stream)})
    with connect(server) as sock:
        for start, end in zip(points, points[1:], strict=False):
            sock.sendall(stream[start:end])
            time.sleep(0.005)  # the server may see each piece alone
        answers = read_answers(sock, len(kinds))
    for kind, (status, body) in zip(kinds, answers, strict=True):
        key = "model_version_status" if kind == "status" else "predictions"
        assert status == 200 and key in json.loads(body), (kind, body)


@pytest.mark.parametrize(
    "partial",
    [b"GET /v1/models/numbers HTTP/1.1\r\nHo", PREDICT[: PREDICT.index(b"\r\n\r\n") + 10]],
    ids=["head", "body"],
)
def test_a_request_that_stops_arriving_drops_its_connection_after_the_stall_time(server, partial):
    wait_for(lambda: connection_threads() == 0, 10)
    with connect(server) as sock:
        sock.sendall(partial)
        wait_for(lambda: connection_threads() == 1, 10)
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed, without an answer to half a request
        assert STALL_SECONDS * 0.8 <= time.monotonic() - started <= STALL_SECONDS + 10
    wait_for(lambda: connection_threads() == 0, 10)
    with connect(server) as sock:  # the server still answers
        sock.sendall(STATUS)
        assert read_answers(sock, 1)[0][0] == 200


def test_a_slow_request_that_keeps_moving_is_answered(server):
    with connect(server) as sock:
        for start in range(0, len(PREDICT), 40):
            sock.sendall(PREDICT[start : start + 40])
            time.sleep(STALL_SECONDS / 4)  # each pause shorter than the stall time
        assert read_answers(sock, 1)[0][0] == 200


class LargeAnswers:
    """A REST app that answers every request with `size` bytes of JSON text."""

    def __init__(self, size: int):
        self.size = size

    def handle(self, method, path, body, headers=None):
        return 200, "application/json", '"' + "x" * (self.size - 2) + '"'


@contextlib.contextmanager
def serving(app, stall: float = STALL_SECONDS, **options):
    """make_http_server(app, ...) serving on a free loopback port until the block ends."""
    http_server = make_http_server(app, "127.0.0.1", 0, 1 << 20, stall, **options)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    try:
        yield http_server
    finally:
        http_server.shutdown()
        http_server.server_close()


def test_a_large_answer_read_slowly_but_steadily_arrives_whole():
    # 16 MB is more than the kernel buffers on both ends hold, so the answer takes several stall
    # times to read: written in one sendall(), it was cut off after the first stall time.
    size, stall = 16 << 20, 0.5
    with serving(LargeAnswers(size), stall) as http_server, socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.settimeout(30)
        sock.connect(http_server.server_address)
        sock.sendall(STATUS)
        started, received = time.monotonic(), b""
        while not received.endswith(b'x"'):
            chunk = sock.recv(1 << 16)
            assert chunk, f"cut off after {len(received)} bytes"
            received += chunk
            time.sleep(0.005)
    assert time.monotonic() - started > 3 * stall  # slow enough to have mattered
    assert len(received.split(b"\r\n\r\n", 1)[1]) == size


def test_headers_trickled_in_get_the_stall_time_in_all_not_per_pause():
    # One byte every 0.3 s never pauses for the 1 s stall time; the head must still be complete
    # within it, or every such client would hold a thread for as long as it likes.
    with serving(LargeAnswers(16)) as http_server:
        with socket.create_connection(http_server.server_address, timeout=10) as sock:
            started = time.monotonic()
            for byte in STATUS[:-2]:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:  # the server closed it
                    break
                time.sleep(0.3)
                if time.monotonic() - started > 6:
                    break
            assert sock.recv(1024) == b""
            assert time.monotonic() - started < 4


def post_head(length: int) -> bytes:
    """A POST request's line and headers for a body of `length` bytes."""
    return b"POST /v1/models/m:predict HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % length


def send_paced(sock: socket.socket, data: bytes, piece: int, pause: float, limit: float) -> int:
    """Send `data` `piece` bytes per `pause` seconds for `limit` seconds at most; bytes sent
    before the server closed the connection or the time ran out."""
    started, sent = time.monotonic(), 0
    while sent < len(data) and time.monotonic() - started < limit:
        try:
            sock.sendall(data[sent : sent + piece])
        except OSError:  # the server closed it
            break
        sent += piece
        time.sleep(pause)
    return min(sent, len(data))


def test_a_body_trickled_below_the_minimum_pace_drops_its_connection():
    # 10 bytes every 0.3 s never pauses for the 1 s stall time, but at 33 bytes/s it falls
    # behind 100 bytes/s after ~1.5 s; it would otherwise hold a thread for 5 minutes.
    with serving(LargeAnswers(16), min_bytes_per_second=100) as http_server:
        with socket.create_connection(http_server.server_address, timeout=10) as sock:
            sock.sendall(post_head(10_000))
            started = time.monotonic()
            sent = send_paced(sock, b"x" * 10_000, 10, 0.3, limit=8)
            assert sent < 10_000
            assert sock.recv(1024) == b""  # closed, without an answer
            assert time.monotonic() - started < 6


def test_a_body_that_keeps_its_pace_is_read_however_long_it_takes():
    # 160 bytes/s for 3 s: three stall times, so the pace, not a total deadline, is what bounds it.
    with serving(LargeAnswers(16), min_bytes_per_second=100) as http_server:
        with socket.create_connection(http_server.server_address, timeout=10) as sock:
            sock.sendall(post_head(480))
            assert send_paced(sock, b"x" * 480, 40, 0.25, limit=30) == 480
            assert read_answers(sock, 1)[0][0] == 200


def test_an_answer_read_below_the_minimum_pace_is_cut_off():
    size = 16 << 20
    with serving(LargeAnswers(size), min_bytes_per_second=4 << 20) as http_server:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            sock.settimeout(30)
            sock.connect(http_server.server_address)
            sock.sendall(STATUS)
            started, received = time.monotonic(), 0
            while chunk := sock.recv(1 << 16):  # ~640 KiB/s: 25 s for the whole answer
                received += len(chunk)
                time.sleep(0.1)
            assert received < size
            assert time.monotonic() - started < 15


def test_connections_beyond_the_thread_limit_wait_their_turn_and_are_answered():
    with serving(LargeAnswers(16), num_threads=2) as http_server:
        stalled = [socket.create_connection(http_server.server_address, timeout=10)
                   for _ in range(4)]  # fmt: skip
        for sock in stalled:
            sock.sendall(STATUS[:10])  # half a request line: a worker waits for the rest
        wait_for(lambda: http_server.busy_workers() == 2, 10)
        with socket.create_connection(http_server.server_address, timeout=30) as sock:
            sock.sendall(STATUS)
            time.sleep(0.3)
            assert connection_threads() == 2 and http_server.busy_workers() == 2
            started = time.monotonic()
            assert read_answers(sock, 1)[0][0] == 200  # once stalled ones time out
            assert time.monotonic() - started < 10
        for sock in stalled:
            assert sock.recv(1024) == b""
            sock.close()
        wait_for(lambda: http_server.busy_workers() == 0, 10)


def test_idle_connections_past_the_limit_close_oldest_first():
    with serving(LargeAnswers(16), max_idle=3) as http_server:
        clients = []
        for _ in range(5):
            sock = socket.create_connection(http_server.server_address, timeout=10)
            sock.sendall(STATUS)
            assert read_answers(sock, 1)[0][0] == 200
            clients.append(sock)
            wait_for(lambda n=len(clients): http_server.idle_connections() == min(n, 3), 10)
        assert [sock.recv(1024) for sock in clients[:2]] == [b"", b""]  # the two oldest
        for sock in clients[2:]:
            sock.sendall(STATUS)
            assert read_answers(sock, 1)[0][0] == 200
            sock.close()


def test_an_idle_connection_keeps_no_headers_of_its_last_request():
    with serving(LargeAnswers(16)) as http_server:
        big = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"x" * 60_000 + b"\r\n\r\n"
        with socket.create_connection(http_server.server_address, timeout=10) as sock:
            sock.sendall(big)
            assert read_answers(sock, 1)[0][0] == 200
            wait_for(lambda: http_server.idle_connections() == 1, 10)
            parked = [o for o in gc.get_objects() if isinstance(o, KeepAliveHandler)
                      and o.server is http_server]  # fmt: skip
            assert len(parked) == 1 and parked[0].headers is None


def test_a_thread_that_cannot_start_costs_one_connection_not_the_server(monkeypatch):
    starts = []

    class FailingOnce(threading.Thread):
        def start(self):
            starts.append(self.name)
            if len(starts) == 1:
                raise RuntimeError("can't start new thread")
            super().start()

    with serving(LargeAnswers(16)) as http_server:
        monkeypatch.setattr(http_connections.threading, "Thread", FailingOnce)
        with socket.create_connection(http_server.server_address, timeout=10) as first:
            first.sendall(STATUS)
            assert first.recv(1024) == b""  # dropped, not left hanging
        with socket.create_connection(http_server.server_address, timeout=10) as second:
            second.sendall(STATUS)
            assert read_answers(second, 1)[0][0] == 200
    assert starts[0] == "rest-connection"


def test_stopping_the_server_closes_its_idle_connections(config):
    running = start_server(config)
    try:
        sock = connect(running)
        sock.sendall(STATUS)
        assert read_answers(sock, 1)[0][0] == 200
        wait_for(lambda: running._http_server.idle_connections() == 1, 10)
    finally:
        running.stop()
    with sock:
        assert sock.recv(1024) == b""


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), 1e300])
def test_the_stall_time_must_be_positive_and_finite(seconds):
    with pytest.raises(ValueError, match="rest_api_stall_seconds must be > 0 and <= 86400"):
        ServerOptions(rest_api_stall_seconds=seconds)


def test_the_thread_limit_must_be_positive():
    with pytest.raises(
        ValueError, match="rest_api_num_threads must be >= 1 and <= 2147483647, got 0"
    ):
        ServerOptions(rest_api_num_threads=0)
