"""Work a request can force on `van-tfx serve` is bounded: declared shapes, decoded pixels, time
after the deadline, and shutdown. Against a real server subprocess, whose memory and CPU time are
read from /proc; the figures are printed (run with -s), the bounds asserted are loose on purpose.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving import testing
from serving.process import free_port, wait_until_available

MiB = 1 << 20
# Growth a refused request may cause at most; decoding any of the requests below would take
# gigabytes (a 16000 x 16000 image is 768 MiB as uint8 RGB before any float32 copy).
RSS_GROWTH_LIMIT = 150 * MiB


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`van-tfx serve` (subprocess) with the tiny image model and the numbers model."""
    root = tmp_path_factory.mktemp("limits")
    config = testing.export_test_models(str(root))
    port = free_port()
    command = [sys.executable, "-m", "van_tfx.cli", "serve", f"--port={port}",
               "--rest_api_port=0", f"--model_config_file={config}"]  # fmt: skip
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    log = open(root / "server.log", "w+b")  # noqa: SIM115 (kept open for the module)
    _SERVER_LOGS.append(root / "server.log")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    wait_until_available(channel, "numbers", process, log, 180)
    yield process, prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()
    if process.poll() is None:
        process.kill()
        process.wait()
    log.close()


_SERVER_LOGS: list = []


def server_log_tail(size: int = 8000) -> str:
    """The end of the module's server log (what it printed, stacks dumped on SIGUSR1)."""
    return _SERVER_LOGS[-1].read_bytes()[-size:].decode(errors="replace") if _SERVER_LOGS else ""


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakRss:
    """Sample a process's RSS every 10 ms while the block runs; `.growth` is peak - start."""

    def __init__(self, pid: int):
        self.pid, self.start, self.peak, self._stop = pid, rss(pid), 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.start


def numbers_request(x_proto, k_proto=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "numbers"
    request.inputs["x"].CopyFrom(x_proto)
    request.inputs["k"].CopyFrom(k_proto or tf.make_tensor_proto(np.zeros(1, np.int64)))
    return request


def declared(dtype: int, dims: list[int], **values) -> tensor_pb2.TensorProto:
    """A TensorProto of a few bytes declaring `dims` (TF repeats the last value, or zeros)."""
    proto = tensor_pb2.TensorProto(dtype=dtype, **values)
    for size in dims:
        proto.tensor_shape.dim.add(size=size)
    return proto


def images_request(images: list[bytes]):
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "van", "predict_images"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return request


def keep_calling(stub, stop: threading.Event, outcomes: list):
    """A well-behaved client calling throughout: its outcomes must all be OK."""
    request = images_request([testing.encode_image((10, 200, 30))])
    while not stop.is_set():
        try:
            stub.Predict(request, timeout=10)
            outcomes.append("OK")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)


@pytest.fixture()
def bystander(served):
    _, stub = served
    stop, outcomes = threading.Event(), []
    thread = threading.Thread(target=keep_calling, args=(stub, stop, outcomes), daemon=True)
    thread.start()
    wait_for_calls(outcomes, 1)
    during = len(outcomes)
    yield outcomes
    wait_for_calls(outcomes, during + 1)  # at least one call answered while the test ran
    stop.set()
    thread.join()
    assert set(outcomes) == {"OK"}, outcomes


def wait_for_calls(outcomes: list, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(outcomes) < count and time.monotonic() < deadline:
        time.sleep(0.01)


AMPLIFIED = {
    # 4 GiB of float32 zeros from a 12-byte tensor (no values: Tensor::FromProto fills zeros).
    "float zeros": declared(types_pb2.DT_FLOAT, [2**29, 2]),
    # 8 GiB: the last value repeated.
    "float repeat": declared(types_pb2.DT_FLOAT, [2**30, 2], float_val=[1.0]),
    # 10^9 strings of 1 KiB from one value (the `images` input of the image model).
    "string repeat": declared(types_pb2.DT_STRING, [10**9], string_val=[b"x" * 1024]),
}


@pytest.mark.parametrize("case", AMPLIFIED)
def test_amplified_shapes_are_refused_before_the_deadline_without_memory(served, bystander, case):
    # Before: the server expanded the tensor (gigabytes, minutes), other clients timed out and
    # the caller got DEADLINE_EXCEEDED while the work went on.
    process, stub = served
    proto = AMPLIFIED[case]
    request = images_request([]) if proto.dtype == types_pb2.DT_STRING else numbers_request(proto)
    if proto.dtype == types_pb2.DT_STRING:
        request.inputs["images"].CopyFrom(proto)
    with PeakRss(process.pid) as memory:
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as error:
                stub.Predict(request, timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "more than the 67108864 bytes this server decodes" in error.value.details()
            assert "--max_message_bytes" in error.value.details()
    print(f"\n{case}: {request.ByteSize()} byte request, server RSS growth "
          f"{memory.growth / MiB:.1f} MiB")  # fmt: skip
    assert memory.growth < RSS_GROWTH_LIMIT


PIXEL_BOMBS = {
    "png 16000x16000": (lambda: testing.png_bomb(16000), "16000x16000 = 256000000 pixels"),
    "jpeg 60000x60000": (lambda: testing.jpeg_declaring(60000, 60000), "60000x60000 = 3600000000"),
    "gif 4000x4000 x 40 frames": (lambda: testing.gif_of_frames(4000, 4000, 40), "x 40 frames"),
}


@pytest.mark.parametrize("case", PIXEL_BOMBS)
def test_pixel_bombs_are_refused_before_decoding(served, bystander, case):
    # Before (png): the image decoded in full, ~12 s of CPU and ~1.2 GB per request.
    process, stub = served
    make, message = PIXEL_BOMBS[case]
    bomb = make()
    cpu = cpu_seconds(process.pid)
    with PeakRss(process.pid) as memory:
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(images_request([testing.encode_image((1, 2, 3)), bomb]), timeout=10)
    cpu = cpu_seconds(process.pid) - cpu
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details()
    assert details.startswith("Input images[1] is an image of ") and message in details, details
    assert "budget of 25000000 pixels per image (--max_image_pixels)" in details
    print(f"\n{case}: {len(bomb) / 1e6:.2f} MB, server RSS growth {memory.growth / MiB:.1f} MiB, "
          f"server CPU {cpu:.2f} s (bystander included)")  # fmt: skip
    assert memory.growth < RSS_GROWTH_LIMIT


def spin_request(steps: int):
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "numbers", "spin"
    request.inputs["n"].CopyFrom(tf.make_tensor_proto(steps, dtype=tf.int64))
    return request


def test_model_work_stops_when_the_caller_deadline_passes(served):
    # Before: the graph kept a core busy after DEADLINE_EXCEEDED until it finished on its own.
    process, stub = served
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(spin_request(10**12), timeout=1.0)  # hours of loop steps
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.5)  # the cancellation reaches the running loop
    start = cpu_seconds(process.pid)
    time.sleep(2.0)
    used = cpu_seconds(process.pid) - start
    print(f"\nserver CPU in the 2 s after the deadline: {used:.2f} s")
    assert used < 1.0  # a loop still running would use ~2 s of CPU here


def test_sigusr1_dumps_every_threads_stack_into_the_log(served):
    process, _ = served
    before = len(server_log_tail(10**9))
    process.send_signal(signal.SIGUSR1)
    for _ in range(50):
        dumped = server_log_tail(10**9)[before:]
        if "Current thread" in dumped or "Thread 0x" in dumped:
            break
        time.sleep(0.1)
    assert "Thread 0x" in dumped and 'File "' in dumped
    assert process.poll() is None  # and it keeps serving


def test_sigterm_ends_a_server_busy_with_a_long_call(served):
    # Before: SIGTERM left the process running as long as the model call did.
    process, stub = served
    outcome = []

    def long_call():
        try:
            stub.Predict(spin_request(10**12), timeout=600)
        except grpc.RpcError as exc:
            outcome.append(exc.code())

    caller = threading.Thread(target=long_call, daemon=True)
    caller.start()
    time.sleep(1.0)
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)  # every thread's stack into the server's log
        time.sleep(2)
        process.kill()
        pytest.fail(f"still running 60 s after SIGTERM; server log:\n{server_log_tail()}")
    print(f"\nexited with {code} {time.monotonic() - start:.1f} s after SIGTERM")
    caller.join(30)
    if code == 1 and "Timeout (" in server_log_tail():
        # The shutdown watchdog ended it (a C call held the GIL past 15 s): a forced exit, and
        # the stacks to find that call.
        warnings.warn(
            f"SIGTERM: the watchdog ended the server; its log:\n{server_log_tail()}", stacklevel=1
        )
    else:
        assert code == 0
    assert outcome and outcome[0] != grpc.StatusCode.OK


def test_image_headers_are_read_and_text_is_not_mistaken_for_an_image():
    from serving.images import image_size

    for fmt in ("PNG", "JPEG", "GIF", "BMP"):
        assert image_size(testing.encode_image((1, 2, 3), size=37, fmt=fmt))[:2] == (37, 37), fmt
    assert image_size(testing.gif_of_frames(4000, 4000, 40)) == (4000, 4000, 40)
    assert image_size(b"BMW and GIF89a are names, not images; this text is long enough") is None
    assert image_size(b"\x89PNG\r\n\x1a\n") is None  # truncated: the decoder will refuse it
