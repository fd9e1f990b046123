"""`van-tfx serve` as a real subprocess; `predict` and `loadtest` through the CLI entry point
in-process (a subprocess each would re-import TensorFlow for seconds) against it."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving import cli, client, testing
from serving.manifests import PRODUCTION_BATCHING
from serving.protos import render_batching, render_monitoring
from van_tfx.cli import main

VAN_TFX = [sys.executable, "-m", "van_tfx.cli"]
ENV = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def van_tfx(capsys, *args):
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse and unreadable files exit with a message
        code = exit_.code if isinstance(exit_.code, int) else 1
        print(exit_.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def van_tfx_process(*args, timeout=60):
    """`van-tfx *args` as a subprocess; TimeoutExpired (the process killed) if it never ends."""
    return subprocess.run(
        [*VAN_TFX, *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`van-tfx serve` in a subprocess with batching and Prometheus from the production files."""
    root = tmp_path_factory.mktemp("cli")
    version = testing.export(testing.build_tiny_model(), str(root / "export"), 1)
    shutil.copytree(version, root / "van" / "1")
    (root / "batching.config").write_text(render_batching(PRODUCTION_BATCHING))
    (root / "monitoring.config").write_text(render_monitoring())
    grpc_port, rest_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            *VAN_TFX,
            "serve",
            f"--port={grpc_port}",
            f"--rest_api_port={rest_port}",
            "--model_name=van",
            f"--model_base_path={root / 'van'}",
            "--enable_batching",
            f"--batching_parameters_file={root / 'batching.config'}",
            f"--monitoring_config_file={root / 'monitoring.config'}",
            "--file_system_poll_wait_seconds=0.2",
            "--rest_api_stall_seconds=2",
            "--rest_api_timeout_in_ms=0",  # no timeout, as in TF Serving (was: every call 504)
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "Exporting HTTP/REST API" in line or process.poll() is not None:
            break
    assert process.poll() is None, "".join(lines)
    # Keep reading its log so a full pipe can never block the server.
    threading.Thread(target=lambda: [lines.append(x) for x in process.stdout], daemon=True).start()
    images = {}
    for name, colour in (("red.png", (255, 0, 0)), ("blue.jpg", (0, 0, 255))):
        images[name] = root / name
        images[name].write_bytes(
            testing.encode_image(colour, fmt="PNG" if "png" in name else "JPEG")
        )
    yield {
        "root": root,
        "grpc": f"127.0.0.1:{grpc_port}",
        "rest": f"127.0.0.1:{rest_port}",
        "images": images,
        "export": version,
        "pid": process.pid,
    }
    process.terminate()
    process.wait(timeout=30)


def test_predict_prints_top_k_over_grpc_and_rest(capsys, served):
    images = [str(p) for p in served["images"].values()]
    for extra in ([], ["--rest"]):
        server = served["rest"] if extra else served["grpc"]
        result = van_tfx(capsys, "predict", *images, "--server", server, *extra)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("1. n0") == 2
        red_block = result.stdout.split(images[1])[0]
        assert testing.SYNSETS[0] in red_block.splitlines()[1]  # red is class 0 (tench)


def test_prometheus_metrics_on_the_rest_port(capsys, served):
    url = f"http://{served['rest']}/monitoring/prometheus/metrics"
    van_tfx(capsys, "predict", str(served["images"]["red.png"]), "--server", served["grpc"])
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    assert ':tensorflow:serving:request_count{model_name="van",status="OK"}' in text


def test_predict_errors_are_clear(capsys, served, tmp_path):
    missing = van_tfx(capsys, "predict", str(tmp_path / "nope.jpg"), "--server", served["grpc"])
    assert missing.returncode != 0 and "cannot read image" in missing.stderr
    down = van_tfx(
        capsys, "predict", str(served["images"]["red.png"]), "--server", f"127.0.0.1:{free_port()}"
    )
    assert down.returncode == 2 and "no model server" in down.stderr
    assert "Traceback" not in down.stderr
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    bad = van_tfx(capsys, "predict", str(garbage), "--server", served["grpc"])
    assert (
        bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "Traceback" not in bad.stderr
    )


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("Threads:")).split()[1])


def test_idle_rest_connections_cost_no_thread_and_stalled_ones_are_dropped(served):
    host, port = served["rest"].split(":")
    request = b"GET /v1/models/van HTTP/1.1\r\nHost: t\r\n\r\n"
    threads_before = threads_of(served["pid"])
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(50)]
    for sock in idle:
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    time.sleep(0.5)
    assert threads_of(served["pid"]) < threads_before + 10  # not one per connection
    with socket.create_connection((host, int(port)), timeout=30) as stalled:
        stalled.sendall(request[:20])
        started = time.monotonic()
        assert stalled.recv(1024) == b""  # --rest_api_stall_seconds=2
        assert 1.5 < time.monotonic() - started < 20
    for sock in idle:
        sock.close()


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf", "soon"])
def test_serve_refuses_a_stall_time_that_is_not_positive(capsys, seconds):
    result = van_tfx(capsys, "serve", f"--rest_api_stall_seconds={seconds}")
    assert result.returncode == 2 and "--rest_api_stall_seconds" in result.stderr


STOP_HOLDING_THE_GIL = """
import re
import serving.cli as cli
cli.SHUTDOWN_SECONDS, cli.WATCHDOG_SECONDS = 0.5, 1.0

class StopHoldingTheGil:
    def stop(self):
        re.match(r"(a+)+$", "a" * 64 + "b")  # backtracking in C, which never releases the GIL

cli._exit_after_stop(StopHoldingTheGil())
"""


def test_a_shutdown_stuck_in_c_holding_the_gil_still_ends_the_process():
    # Before: os._exit needs the GIL, so this process ran for as long as the C call (years).
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", STOP_HOLDING_THE_GIL], capture_output=True,
                            text=True, env=ENV, timeout=60)  # fmt: skip
    assert result.returncode == 1 and time.monotonic() - started < 30
    assert "Timeout (0:00:01.500000)!" in result.stderr  # faulthandler's watchdog
    assert "line 8 in stop" in result.stderr  # with the stack that held the GIL


@pytest.mark.parametrize(
    "flag, value",
    [("--port", "-1"), ("--port", "70000"), ("--rest_api_port", "-1"),
     ("--rest_api_port", "65536"), ("--grpc_max_threads", "0"), ("--max_message_bytes", "0"),
     ("--max_message_bytes", str(2**31)), ("--max_image_pixels", "-1"),
     ("--file_system_poll_wait_seconds", "nan"), ("--file_system_poll_wait_seconds", "inf"),
     ("--model_config_file_poll_wait_seconds", "nan"), ("--rest_api_timeout_in_ms", str(2**31)),
     ("--max_num_load_retries", "-1"), ("--load_retry_interval_micros", str(2**63)),
     ("--port", "eighty")],
)  # fmt: skip
def test_serve_refuses_numeric_flags_out_of_range(flag, value):
    # Before: ports wrapped modulo 65536, 0 threads was a ValueError traceback, the rest started
    # (here: waited for the missing model until the timeout killed them).
    result = van_tfx_process("serve", "--model_base_path=/nonexistent", f"{flag}={value}",
                             timeout=30)  # fmt: skip
    assert result.returncode == 2 and f"argument {flag}: " in result.stderr, result.stderr


@pytest.mark.parametrize("base", ["missing", "a_file"])
def test_sigterm_ends_a_server_waiting_for_its_model(tmp_path, base):
    # Before: the handler set a flag nothing checked until a model loaded; only SIGKILL helped.
    (tmp_path / "a_file").write_text("not a base path")
    process = subprocess.Popen(
        [*VAN_TFX, "serve", f"--port={free_port()}", "--rest_api_port=0", "--model_name=van",
         f"--model_base_path={tmp_path / base}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        for line in process.stderr:  # it waits, as TF Serving does, saying what for
            if "waiting for a servable version of van" in line:
                break
        started = time.monotonic()
        process.terminate()
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - started < 5
        rest = process.stderr.read()
        assert "stopped before every model was available" in rest and "Traceback" not in rest
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("taken_by", ["another_socket", "its_grpc_port"])
def test_serve_says_which_rest_address_it_cannot_bind(served, taken_by):
    # Before: "AttributeError: 'KeepAliveHTTPServer' object has no attribute '_lock'" after the
    # OSError (socketserver's server_close() on the failed bind, before __init__ set _lock).
    grpc_port = free_port()
    with socket.socket() as taken:
        if taken_by == "another_socket":
            taken.bind(("127.0.0.1", 0))
            taken.listen()
        rest_port = taken.getsockname()[1] if taken_by == "another_socket" else grpc_port
        result = van_tfx_process(
            "serve", f"--port={grpc_port}", f"--rest_api_port={rest_port}", "--model_name=van",
            f"--model_base_path={served['root'] / 'van'}", timeout=120,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: cannot bind REST to 127.0.0.1:{rest_port}: Address already in use"
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_rest_thread_limit_below_one(capsys):
    result = van_tfx(capsys, "serve", "--rest_api_num_threads=0")
    assert result.returncode == 2 and "--rest_api_num_threads" in result.stderr


def test_loadtest_swaps_versions_without_errors(capsys, served):
    result = van_tfx(
        capsys,
        "loadtest",
        "--server",
        served["grpc"],
        "--duration",
        "4",
        "--concurrency",
        "3",
        "--swap-to",
        served["export"],
        "--base-path",
        str(served["root"] / "van"),
        "--no-progress",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 errors" in result.stdout and "swapped to version 2" in result.stdout
    assert "QPS" in result.stdout and "p99" in result.stdout


@pytest.mark.parametrize(
    "flag, value",
    [("--duration", "nan"), ("--duration", "inf"), ("--duration", "-5"), ("--duration", "0"),
     ("--concurrency", "0"), ("--concurrency", "-4"), ("--swap-to", "/nonexistent"),
     ("--timeout", "nan"), ("--timeout", "0")],
)  # fmt: skip
def test_loadtest_refuses_flags_that_never_end_or_send_nothing(served, flag, value):
    # Before: nan, inf and /nonexistent ran forever at full CPU; the others "passed" (rc 0)
    # after sending no request.
    result = van_tfx_process(
        "loadtest", "--server", served["grpc"], "--no-progress", "--duration=1", flag, value
    )
    assert result.returncode == 2 and f"argument {flag}: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["predict", "loadtest"])
def test_grpc_commands_refuse_a_url_naming_it(served, command):
    # Before: "no model server at http://H:P (cannot resolve the host: Misformatted domain name)".
    url = f"http://{served['grpc']}"
    image = str(served["images"]["red.png"])
    args = [image] if command == "predict" else ["--image", image, "--duration=1", "--no-progress"]
    result = van_tfx_process(command, *args, "--server", url)
    assert result.returncode == 2, result.stderr
    assert f"error: --server {url} is a URL; gRPC takes host:port" in result.stderr, result.stderr


def test_loadtest_names_the_image_the_server_refused(served, tmp_path):
    # Before: the server's message alone; `predict` named the file, loadtest did not, and an
    # image after the first was only counted among the run's errors.
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    result = van_tfx_process(
        "loadtest", "--server", served["grpc"], "--no-progress", "--duration=1",
        "--image", str(served["images"]["red.png"]), "--image", str(garbage),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "rejected the request: INVALID_ARGUMENT: " in result.stderr, result.stderr
    assert f"(image {garbage})" in result.stderr and "Traceback" not in result.stderr


def test_loadtest_stops_its_clients_when_the_swap_fails(served, tmp_path):
    # Before: a NotADirectoryError traceback (with --swap-to /nonexistent: no exit at all).
    not_a_dir = tmp_path / "base"
    not_a_dir.write_text("a file")
    result = van_tfx_process(
        "loadtest", "--server", served["grpc"], "--no-progress", "--duration=2",
        "--concurrency=2", "--swap-to", served["export"], "--base-path", str(not_a_dir),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"cannot push --swap-to {served['export']} into --base-path {not_a_dir}" in result.stderr
    assert "Traceback" not in result.stderr


def test_loadtest_counts_errors_and_keeps_a_few(served):
    # Before: every failure's message was kept (17 GB once a server went away).
    from serving.loadtest import ERROR_EXAMPLES, run_loadtest

    image = testing.encode_image((1, 2, 3), fmt="PNG")
    report = run_loadtest(served["grpc"], [image], 1.0, 2, model_name="nope", progress=False)
    assert report.errors == report.requests > 20
    assert 1 <= len(report.error_examples) <= ERROR_EXAMPLES
    assert "NOT_FOUND" in report.error_examples[0]


class NotAModelServer(BaseHTTPRequestHandler):
    """Answers every POST with the status and body its server was made with."""

    def do_POST(self):  # noqa: N802 (http.server naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_answering():
    """Start a loopback HTTP server giving `answer` = (status, body); returns host:port."""
    servers = []

    def start(status: int, body: bytes) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), NotAModelServer)
        server.answer = (status, body)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "answer, code, says",
    [((200, b"<html>proxy login</html>"), 2, "not a model server: its answer is not JSON"),
     ((200, b'{"predictions": []}'), 2, 'not JSON with "outputs"'),
     ((200, b'{"outputs": {"top_k_indices": 5, "top_k_synsets": 1, "top_k_scores": 2}}'), 2,
      "not a model server: unexpected outputs"),
     ((500, b'"oops"'), 1, "rejected the request: 500: Internal Server Error: "
      "'\"oops\"'")],
)  # fmt: skip
def test_predict_rest_says_when_what_answers_is_not_a_model_server(
    served, http_answering, answer, code, says
):
    # Before: JSONDecodeError, KeyError and TypeError tracebacks.
    server = http_answering(*answer)
    image = str(served["images"]["red.png"])
    result = van_tfx_process("predict", image, "--rest", "--server", server)
    assert result.returncode == code and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and server in result.stderr


def test_predict_rest_failures_name_the_server(served):
    image = str(served["images"]["red.png"])
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        hang = f"127.0.0.1:{silent.getsockname()[1]}"
        for server, says in (
            # Before: BadStatusLine; then its raw line, NULs and escapes, reached the terminal;
            # then that line escaped ('\x00\x00\x18\x04...'), which did not say it was gRPC.
            (served["grpc"], "not an HTTP answer: it speaks HTTP/2, as a gRPC port does); drop"),
            (hang, "no answer"),  # Before: TimeoutError
        ):
            result = van_tfx_process("predict", image, "--rest", "--server", server, "--timeout=2")
            assert result.returncode == 2, result.stderr
            assert f"no model server at {server} ({says}" in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
            error = next(line for line in result.stderr.splitlines() if "no model server" in line)
            assert error.isprintable(), repr(error)
    bad_url = van_tfx_process("predict", image, "--rest", "--server", "http://[::1")
    assert bad_url.returncode == 2 and "error: --server http://[::1 is not a URL" in bad_url.stderr
    assert "Traceback" not in bad_url.stderr


@pytest.mark.parametrize(
    "command, shows",
    [("serve", ["--port PORT gRPC port (default: 8500)",
                "0 disables REST (TF Serving's default is 0) (default: 8501)",
                "TF Serving's default is 'default' (default: van)",
                "--enable_model_warmup [ENABLE_MODEL_WARMUP] default: True",
                "--grpc_max_threads GRPC_MAX_THREADS default: 64"]),
     ("predict", ["--timeout TIMEOUT seconds (default: 30.0)"]),
     ("loadtest", ["--concurrency CONCURRENCY default: 8"])],
)  # fmt: skip
def test_help_shows_each_flags_default_as_tensorflow_model_server_does(capsys, command, shows):
    # Before: most flags showed none, and --rest_api_port's 8501 (0 in TF Serving) was unsaid.
    result = van_tfx(capsys, command, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for phrase in shows:
        assert phrase in text, text
    assert "(default: [])" not in text and "--no-progress default" not in text


def test_a_model_assertion_is_shown_without_tensorflows_graph_details():
    # What `van-tfx predict notes.txt` printed against a pushed VAN model (both APIs): the
    # exported signature's message buried in TF's Assert internals, its quotes escaped.
    sent = (
        "assertion failed: [\\'images\\' holds bytes that are not a complete JPEG or PNG image] "
        "[Condition x == y did not hold element-wise:] [x (All_1:0) = ] [0] "
        "[y (assert_equal_1/y:0) = ] [1] [[{{node assert_equal_1/Assert/AssertGuard/Assert}}]]"
    )
    assert cli.model_assertion(sent) == (
        "'images' holds bytes that are not a complete JPEG or PNG image"
    )
    error = client.PredictionError("INVALID_ARGUMENT", sent)
    assert cli._naming_images(error, ["notes.txt"]) == (
        "'images' holds bytes that are not a complete JPEG or PNG image (image notes.txt)"
    )
    assert cli.model_assertion("Servable not found for request: Latest(x)") == (
        "Servable not found for request: Latest(x)"
    )


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf"])
@pytest.mark.parametrize("rest", [[], ["--rest"]])
def test_predict_refuses_a_timeout_that_is_not_positive(capsys, rest, timeout):
    # Before: REST raised ValueError tracebacks, gRPC failed every call as DEADLINE_EXCEEDED.
    result = van_tfx(capsys, "predict", "x.jpg", *rest, f"--timeout={timeout}")
    assert result.returncode == 2 and "argument --timeout: " in result.stderr


@pytest.mark.parametrize("rest", [[], ["--rest"]])
def test_predict_errors_name_the_image(served, tmp_path, rest):
    # Before: "Unknown image file format" and "Input images[1] is an image of ..." named no file.
    server = served["rest"] if rest else served["grpc"]
    red = str(served["images"]["red.png"])
    garbage, bomb = tmp_path / "garbage.jpg", tmp_path / "bomb.png"
    garbage.write_bytes(b"not an image")
    bomb.write_bytes(testing.png_bomb(16000))
    result = van_tfx_process("predict", str(garbage), "--server", server, *rest)
    assert result.returncode == 1 and f"(image {garbage})" in result.stderr, result.stderr
    result = van_tfx_process("predict", red, str(bomb), "--server", server, *rest)
    assert result.returncode == 1, result.stderr
    assert f"Input {bomb} is an image of 16000x16000" in result.stderr, result.stderr
    assert "images[1]" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("rest", [[], ["--rest"]])
def test_predict_at_the_other_apis_port_says_so_instead_of_start_a_server(served, rest):
    # Before: "no model server at ...; start one with `van-tfx serve`", with one running there.
    image = str(served["images"]["red.png"])
    server = served["grpc"] if rest else served["rest"]
    result = van_tfx_process("predict", image, "--server", server, *rest)
    assert result.returncode == 2, result.stderr
    error = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    if rest:
        assert "it speaks HTTP/2, as a gRPC port does); drop --rest, or give the REST port" in error
    else:
        assert "not a gRPC server" in error and "); pass --rest for a REST port, or" in error
    assert "start one" not in error and "Traceback" not in result.stderr


@pytest.mark.parametrize("rest", [[], ["--rest"]])
def test_predict_to_no_such_host_is_unreachable(served, rest):
    # Before: gRPC's DNS failure was rc 1 "the server rejected the request: UNAVAILABLE".
    image = str(served["images"]["red.png"])
    result = van_tfx_process("predict", image, "--server", "no-such-host.invalid:8500", *rest)
    assert result.returncode == 2, result.stderr
    assert "no model server at no-such-host.invalid:8500" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_refuses_images_it_cannot_send_without_reading_them(served, tmp_path):
    # Before: /dev/zero was read until memory ran out (1.5 GB in 5 s); an 80 MB image over REST
    # was "no model server ... (Broken pipe)" while the server was up.
    huge, big = tmp_path / "huge.jpg", tmp_path / "big.jpg"
    with open(huge, "wb") as f:
        f.truncate(80 << 20)  # sparse: costs no disk
    with open(big, "wb") as f:
        f.truncate(50 << 20)  # fits as bytes (gRPC), not as base64 (REST)
    cases = [
        (["/dev/zero"], "error: image /dev/zero is not a regular file"),
        ([str(huge)], f"error: image {huge} is 83886080 bytes, more than the 67108864 bytes"),
        ([str(big), "--rest"], f"error: a request with the images {big} (base64 in JSON) is"),
        ([str(big), "--max-message-bytes=1000"], f"error: image {big} is 52428800 bytes"),
    ]
    for args, says in cases:
        result = van_tfx_process("predict", *args, "--server", served["rest"], timeout=30)
        assert result.returncode == 1 and says in result.stderr, result.stderr
        assert "(--max-message-bytes)" in result.stderr or "regular" in result.stderr
