"""`van-tfx predict` and `loadtest` over gRPC against servers that answer badly or not at all:
which failures are "no answer" (exit status 2) and which the server's own answer (status 1),
against real loopback sockets, real grpc servers and real server processes. The CLI runs
in-process (a subprocess each would re-import TensorFlow for seconds)."""

import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from van_tfx.cli import main

TIMEOUT = 1.0  # --timeout: every case that waits for an answer waits this long


def van_tfx(capsys, *args):
    """Run `van-tfx *args` in-process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
        print(exit_.code, file=sys.stderr)
    return code, capsys.readouterr().err


@pytest.fixture
def image(tmp_path):
    """An image file to send (these servers never decode it)."""
    path = tmp_path / "cat.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 a cat")
    return str(path)


@pytest.fixture
def closing():
    """Closes what a test started (listeners, servers, processes) once it ends."""
    stack = []
    yield stack.append
    for close in reversed(stack):
        close()


def closed_port() -> str:
    """host:port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def listener(closing, serve=None) -> str:
    """A loopback listener running `serve(connection)` on each connection; its host:port."""
    # serve None: never accept. The kernel completes the TCP handshake; nothing is ever said.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    closing(sock.close)
    if serve is not None:

        def accept() -> None:
            while True:
                try:
                    connection, _ = sock.accept()
                except OSError:  # closed at the end of the test
                    return
                threading.Thread(target=serve, args=(connection,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
    return f"127.0.0.1:{sock.getsockname()[1]}"


def frame(kind: int, stream: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    """One HTTP/2 frame (RFC 9113 section 4.1)."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


SETTINGS, RST_STREAM, DATA, END_STREAM = 4, 3, 0, 1
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def read_request(connection) -> int:
    """Read a gRPC client's frames until its first request is complete; its stream id."""
    buffer = b""

    def take(count: int) -> bytes:
        nonlocal buffer
        while len(buffer) < count:
            chunk = connection.recv(65536)
            if not chunk:
                raise ConnectionError("the client left")
            buffer += chunk
        data, buffer = buffer[:count], buffer[count:]
        return data

    assert take(len(PREFACE)) == PREFACE
    while True:
        header = take(9)
        length = int.from_bytes(header[:3], "big")
        take(length)
        stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
        if header[3] == DATA and header[4] & END_STREAM:
            return stream


def http2_server(closing, then) -> str:
    """An HTTP/2 listener: SETTINGS, reads the request, then `then(connection, stream)`."""

    def serve(connection) -> None:
        with connection:
            connection.sendall(frame(SETTINGS))
            then(connection, read_request(connection))

    return listener(closing, serve)


def hang_up(connection, stream=None) -> None:
    """Send FIN (and keep the socket a while: closing on unread bytes would send RST instead)."""
    connection.shutdown(socket.SHUT_WR)
    time.sleep(2 * TIMEOUT)


def reset_connection(connection, stream) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed host or a middlebox does."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reset_stream(connection, stream) -> None:
    """RST_STREAM CANCEL on the request's stream: the stream ends without a status."""
    connection.sendall(frame(RST_STREAM, stream, struct.pack(">I", 8)))
    time.sleep(2 * TIMEOUT)


class Predictor(prediction_service_pb2_grpc.PredictionServiceServicer):
    """A PredictionService whose Predict is `handler(request, context)`."""

    def __init__(self, handler):
        self.handler = handler

    def Predict(self, request, context):  # noqa: N802 (the gRPC method's name)
        return self.handler(request, context)


def grpc_server(closing, handler) -> str:
    """A real grpc server on 127.0.0.1 (port 0) serving `handler` as Predict; its host:port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Predictor(handler), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    closing(lambda: server.stop(0))
    return f"127.0.0.1:{port}"


def block(request, context):
    """A handler that never returns an answer (until the client leaves)."""
    while context.is_active():
        time.sleep(0.05)
    return predict_pb2.PredictResponse()


def abort_with(code, message):
    """A handler answering every request with the status `code`."""

    def handler(request, context):
        context.abort(code, message)

    return handler


# A grpc server process (no TensorFlow: raw bytes) that says "called" once Predict runs, then
# never answers: the test kills it there, mid-call.
DYING_SERVER = """
import sys, threading, grpc
from concurrent import futures
def predict(request, context):
    print("called", flush=True)
    threading.Event().wait()
methods = {"Predict": grpc.unary_unary_rpc_method_handler(predict)}
handler = grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", methods)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""


def dying_server(closing) -> str:
    """A real grpc server process that is killed (SIGKILL) while it handles the request."""
    process = subprocess.Popen(
        [sys.executable, "-c", DYING_SERVER], stdout=subprocess.PIPE, text=True
    )
    closing(lambda: (process.kill(), process.wait()))
    port = process.stdout.readline().strip()
    assert port.isdigit(), port

    def kill_when_called() -> None:
        if process.stdout.readline().strip() == "called":
            process.kill()

    threading.Thread(target=kill_when_called, daemon=True).start()
    return f"127.0.0.1:{port}"


def http1_server(closing) -> str:
    """A plain HTTP/1.1 server (what a REST port is)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    closing(lambda: (server.shutdown(), server.server_close()))
    return f"127.0.0.1:{server.server_address[1]}"


UNANSWERED = {
    # Before: each of these was rc 1 "the server ... rejected the request: DEADLINE_EXCEEDED
    # / UNAVAILABLE / CANCELLED ...", or rc 2 with gRPC's raw text.
    "closed port": (lambda c: closed_port(), "(could not connect: Connection refused)"),
    "listener that never speaks": (
        lambda c: listener(c),
        f"(no gRPC connection within {TIMEOUT:g} s: the TCP connection or the HTTP/2 handshake "
        "never completed)",
    ),
    "listener that hangs up": (
        lambda c: listener(c, hang_up),
        "(could not connect: Socket closed)",
    ),
    "HTTP/1.1 server": (http1_server, "(not a gRPC server: Failed parsing HTTP/2"),
    "grpc server whose handler blocks": (
        lambda c: grpc_server(c, block),
        f"(no answer within {TIMEOUT:g} s)",
    ),
    "server killed mid-call": (  # FIN or RST: whether the kernel held bytes it had not read
        dying_server,
        "(the connection was lost before an answer: ",
    ),
    "connection reset mid-call": (
        lambda c: http2_server(c, reset_connection),
        "(the connection was lost before an answer: recvmsg:Connection reset by peer",
    ),
    "connection closed mid-call": (
        lambda c: http2_server(c, hang_up),
        "(the connection was lost before an answer: Socket closed)",
    ),
    "stream reset mid-call": (
        lambda c: http2_server(c, reset_stream),
        "(the stream was reset before an answer: Received RST_STREAM with error code 8)",
    ),
}


@pytest.mark.parametrize("case", list(UNANSWERED))
def test_predict_says_no_server_answered_and_exits_2(capsys, closing, image, case):
    start, says = UNANSWERED[case]
    server = start(closing)
    started = time.monotonic()
    code, err = van_tfx(capsys, "predict", image, "--server", server, f"--timeout={TIMEOUT}")
    assert code == 2, err
    assert f"error: no model server at {server} {says}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - started < TIMEOUT + 5  # the timeout holds, connecting included


def test_predict_to_no_such_host_says_it_cannot_resolve_it(capsys, image):
    # Before: "no model server at ... (errors resolving no-such-host.invalid:8500: [field:...])".
    server = "no-such-host.invalid:8500"
    code, err = van_tfx(capsys, "predict", image, "--server", server, f"--timeout={TIMEOUT}")
    assert code == 2, err
    assert f"error: no model server at {server} (cannot resolve the host: " in err, err


def test_deadline_exceeded_is_no_answer_only_once_our_timeout_passed(capsys, closing, image):
    # TF Serving answers DEADLINE_EXCEEDED for its own timeouts: that is its answer (rc 1), as a
    # 504 is over REST. Before: a handler that never returned was rc 1 the same way.
    hung = grpc_server(closing, block)
    code, err = van_tfx(capsys, "predict", image, "--server", hung, f"--timeout={TIMEOUT}")
    assert code == 2 and f"no model server at {hung} (no answer within 1 s)" in err, err
    timed_out = grpc_server(
        closing, abort_with(grpc.StatusCode.DEADLINE_EXCEEDED, "Timed out waiting for the batch")
    )
    code, err = van_tfx(capsys, "predict", image, "--server", timed_out, f"--timeout={TIMEOUT}")
    assert code == 1, err
    assert (
        f"error: the server at {timed_out} rejected the request: DEADLINE_EXCEEDED: Timed out "
        "waiting for the batch" in err
    ), err


def test_unavailable_is_the_servers_answer_only_when_it_sent_it(capsys, closing, image):
    # A full batching queue answers UNAVAILABLE (a 503 over REST): rc 1. A server that went
    # away mid-call is UNAVAILABLE too, made up by gRPC: rc 2. Before: both rc 1.
    full = grpc_server(closing, abort_with(grpc.StatusCode.UNAVAILABLE, "the queue is full"))
    code, err = van_tfx(capsys, "predict", image, "--server", full, f"--timeout={TIMEOUT}")
    assert code == 1, err
    assert f"the server at {full} rejected the request: UNAVAILABLE: the queue is full" in err
    gone = dying_server(closing)
    code, err = van_tfx(capsys, "predict", image, "--server", gone, f"--timeout={TIMEOUT}")
    assert code == 2 and f"no model server at {gone} (the connection was lost" in err, err


def answer_once_then(then):
    """A handler giving the first request a real top-k answer and the rest to `then`."""
    import tensorflow as tf

    calls = []

    def handler(request, context):
        calls.append(1)
        if len(calls) > 1:
            return then(request, context)
        response = predict_pb2.PredictResponse()
        response.outputs["top_k_indices"].CopyFrom(tf.make_tensor_proto([[0]], dtype=tf.int32))
        response.outputs["top_k_synsets"].CopyFrom(tf.make_tensor_proto([[b"n01440764"]]))
        response.outputs["top_k_scores"].CopyFrom(tf.make_tensor_proto([[0.9]], dtype=tf.float32))
        return response

    return handler


def loadtest(capsys, server, image):
    """`van-tfx loadtest` for a second on two clients, each request given TIMEOUT seconds."""
    return van_tfx(
        capsys, "loadtest", "--server", server, "--image", image, "--duration=1",
        "--concurrency=2", f"--timeout={TIMEOUT}", "--no-progress",
    )  # fmt: skip


def test_loadtest_exits_as_predict_does(capsys, closing, image):
    # Before: its first request waited 10 s whatever the flags (no --timeout), and requests
    # left unanswered mid-run (a server that hung) were rc 1 like the server's refusals.
    silent = listener(closing)
    code, err = loadtest(capsys, silent, image)
    assert code == 2, err
    assert f"error: no model server at {silent} (no gRPC connection within 1 s" in err, err
    hung = grpc_server(closing, answer_once_then(block))
    code, err = loadtest(capsys, hung, image)
    assert code == 2, err
    assert "  error: no answer: no answer within 1 s" in err, err
    assert f"requests got no answer from the model server at {hung}" in err, err
    refusing = grpc_server(
        closing, answer_once_then(abort_with(grpc.StatusCode.NOT_FOUND, "Servable not found"))
    )
    code, err = loadtest(capsys, refusing, image)
    assert code == 1, err
    assert "  error: PredictionError: NOT_FOUND: Servable not found" in err, err
    assert f"requests failed at {refusing}" in err and "no answer" not in err, err


def response_of(**outputs):
    """A PredictResponse with these outputs (name -> TensorProto)."""
    response = predict_pb2.PredictResponse()
    for name, proto in outputs.items():
        response.outputs[name].CopyFrom(proto)
    return response


def answering(**outputs):
    """A handler answering every request with these outputs (name -> TensorProto)."""
    return lambda request, context: response_of(**outputs)


def top_k_answer(synset: bytes = b"n01440764"):
    """Outputs of a one-image, top-1 answer naming `synset`."""
    import tensorflow as tf

    return {
        "top_k_indices": tf.make_tensor_proto([[0]], dtype=tf.int32),
        "top_k_synsets": tf.make_tensor_proto([[synset]]),
        "top_k_scores": tf.make_tensor_proto([[0.9]], dtype=tf.float32),
    }


def filling():
    """A 30-byte float TensorProto declaring [100000, 100000]: one value TF fills it with."""
    from tensorflow.core.framework import tensor_pb2, types_pb2

    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[0.5])
    proto.tensor_shape.dim.add(size=100_000)
    proto.tensor_shape.dim.add(size=100_000)
    return proto


def test_an_answer_over_grpcs_4_mib_default_is_taken_up_to_the_flag(capsys, closing, image):
    # Before: gRPC's default receive limit (4 MiB) refused it, reported as "no model server at
    # ... (the connection was lost before an answer: CLIENT: Received message larger than max".
    # A top-k answer grows with the images sent, and a request may be --max-message-bytes.
    outputs = top_k_answer(b"n" * (5 << 20))
    big = grpc_server(closing, answering(**outputs))
    code, err = van_tfx(capsys, "predict", image, "--server", big, f"--timeout={10 * TIMEOUT}")
    assert code == 0, err
    code, err = van_tfx(
        capsys, "predict", image, "--server", big, f"--timeout={10 * TIMEOUT}",
        f"--max-message-bytes={4 << 20}",
    )  # fmt: skip
    assert code == 1, err
    assert (
        f"error: the server at {big} answered, but the answer is "
        f"{response_of(**outputs).ByteSize()} bytes, over "
        f"the client's limit of {4 << 20} bytes; raise --max-message-bytes to take it" in err
    ), err
    assert "no model server" not in err and "Traceback" not in err, err


def test_an_answer_declaring_more_than_the_limit_is_refused_before_decoding(capsys, closing, image):
    # TF's rule that one value fills any shape: 30 bytes on the wire declaring 40 GB of floats.
    # Before: tf.make_ndarray filled it (and .tolist() made a Python float of each).
    server = grpc_server(closing, answering(**{**top_k_answer(), "top_k_scores": filling()}))
    code, err = van_tfx(capsys, "predict", image, "--server", server, f"--timeout={TIMEOUT}")
    assert code == 1, err
    assert (
        f"the server at {server} answered, but the answer's tensors decode to more than "
        f"{64 << 20} bytes (at output 'top_k_scores')" in err
    ), err


def test_an_answer_that_is_not_top_k_tensors_is_not_a_model_server(capsys, closing, image):
    # As over REST (exit status 2). Before, over gRPC: a traceback from int(b"x") (status 1).
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    strings = grpc_server(
        closing,
        answering(**{**top_k_answer(), "top_k_indices": tf.make_tensor_proto([[b"x"]])}),
    )
    code, err = van_tfx(capsys, "predict", image, "--server", strings, f"--timeout={TIMEOUT}")
    assert code == 2, err
    assert f"no model server at {strings} (not a model server: unexpected outputs (" in err, err
    assert "Traceback" not in err, err
    no_type = grpc_server(
        closing, answering(**{**top_k_answer(), "top_k_scores": tensor_pb2.TensorProto()})
    )
    code, err = van_tfx(capsys, "predict", image, "--server", no_type, f"--timeout={TIMEOUT}")
    assert code == 2, err
    assert (
        f"no model server at {no_type} (not a model server: an output is not a tensor "
        "(tensor parsing error: top_k_scores))" in err
    ), err


def rest_server(closing, body: bytes, status: int = 200) -> str:
    """An HTTP server answering every POST with `status` and `body`; its URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answering(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    closing(lambda: (server.shutdown(), server.server_close()))
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"outputs": {"top_k_indices": ' + b"[" * 100_000 + b"]}}"],
    ids=["nested", "nested outputs"],
)
def test_a_rest_answer_nested_too_deep_is_not_a_model_servers(capsys, closing, image, body):
    # Before: a RecursionError traceback from json.loads (status 1).
    url = rest_server(closing, body)
    code, err = van_tfx(capsys, "predict", image, "--rest", "--server", url, f"--timeout={TIMEOUT}")
    assert code == 2, err
    assert f"error: no model server at {url} (not a model server: " in err, err
    assert "Traceback" not in err, err


def test_a_rest_answer_over_the_flag_is_not_read_past_it(capsys, closing, image):
    url = rest_server(closing, b'{"outputs": {"pad": "' + b"x" * 100_000 + b'"}}')
    code, err = van_tfx(
        capsys, "predict", image, "--rest", "--server", url, "--max-message-bytes=10000",
        f"--timeout={TIMEOUT}",
    )  # fmt: skip
    assert code == 1, err
    assert (
        f"the server at {url} answered, but the answer is more than 10000 bytes, over the "
        "client's limit of 10000 bytes" in err
    ), err


@pytest.mark.parametrize(
    "body, says",
    [
        (b'{"error": "' + b"x" * 100_000 + b'"}', '400: Bad Request: \'{"error": "xxxxx'),
        (b"[" * 100_000, "400: Bad Request: '[[[[["),
        (b'{"error": "Servable not found"}', "400: Servable not found"),
    ],
    ids=["over the flag", "nested too deep", "TF Serving's"],
)
def test_a_rest_error_answer_is_read_within_the_flag(capsys, closing, image, body, says):
    # Before: an error body was read whole, whatever its size, and one nested too deep was a
    # RecursionError traceback.
    url = rest_server(closing, body, status=400)
    code, err = van_tfx(
        capsys, "predict", image, "--rest", "--server", url, "--max-message-bytes=10000",
        f"--timeout={TIMEOUT}",
    )  # fmt: skip
    assert code == 1, err
    assert f"error: the server at {url} rejected the request: {says}" in err, err
    assert "Traceback" not in err, err


def test_loadtest_names_an_answer_over_the_limit(capsys, closing, image):
    # Its first request is predict's check: an answer over the limit is named there, as by predict.
    server = grpc_server(closing, answering(**{**top_k_answer(), "top_k_scores": filling()}))
    code, err = loadtest(capsys, server, image)
    assert code == 1, err
    assert f"error: the server at {server} answered, but the answer's tensors decode to" in err
    assert "Traceback" not in err, err
