"""Serving benchmark: gRPC overhead vs in-process calls, and batching's throughput gain.

Two models from serving.testing.build_conv_model (decode JPEG + resize + 4 3x3 convs + softmax):
- "latency" (160x160 input, width 32, a few ms per image like a small real classifier): the
  server's own overhead is judged against a realistic per-request cost;
- "batching" (32x32 input, width 16, ~0.5 ms per call): per-call cost is dominated by fixed
  overhead (function dispatch, the decode loop), which is what merging requests amortises.
Every figure is a ratio of two measurements taken in the same run on the same machine:

  1. single-image latency: p50 of gRPC Predict on `van-tfx serve` (a subprocess) vs p50 of calling
     the same signature in-process (target <= 1.2x);
  2. throughput at 16 concurrent gRPC clients, --enable_batching on vs off (target >= 2x).

Run: TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_serving.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import van_tfx  # noqa: F401  (Keras 2 before TensorFlow)

ENV = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: str, batching_file: str | None) -> tuple[subprocess.Popen, str]:
    """`van-tfx serve` in a subprocess; returns it and its gRPC target once it listens."""
    port = free_port()
    args = [sys.executable, "-m", "van_tfx.cli", "serve", f"--port={port}", "--rest_api_port=0",
            "--model_name=bench", f"--model_base_path={base}"]  # fmt: skip
    if batching_file:
        args += ["--enable_batching", f"--batching_parameters_file={batching_file}"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=ENV)  # fmt: skip
    for line in process.stdout:
        if "Running gRPC ModelServer" in line:
            # Keep draining its log so a full pipe can never block the server mid-benchmark.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, f"127.0.0.1:{port}"
    raise RuntimeError(f"server exited with {process.wait()}")


def predict_request(image: bytes):
    """A single-image predict_images PredictRequest for model "bench"."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "bench"
    request.model_spec.signature_name = "predict_images"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
    return request


def interleaved_p50s(base: str, target: str, image: bytes, calls: int) -> tuple[float, float]:
    """p50 ms of in-process calls and of gRPC calls, alternated so both see the same load."""
    import tensorflow as tf

    from serving.client import prediction_stub

    fn = tf.saved_model.load(os.path.join(base, "1")).signatures["predict_images"]
    batch = tf.constant([image])
    stub, request = prediction_stub(target), predict_request(image)

    def local() -> None:
        {k: v.numpy() for k, v in fn(images=batch).items()}

    def remote() -> None:
        stub.Predict(request, timeout=60)

    local_ms, remote_ms = [], []
    for i in range(calls + 20):
        for call, times in ((local, local_ms), (remote, remote_ms)):
            start = time.perf_counter()
            call()
            if i >= 20:  # warm-up
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(local_ms), statistics.median(remote_ms)


def throughput(target: str, image: bytes, clients: int, seconds: float) -> float:
    """Requests per second with `clients` concurrent single-image callers."""
    from serving.client import prediction_stub

    # A prebuilt request and an undecoded response keep the Python client (one GIL for all 16
    # client threads) from becoming the bottleneck being measured.
    stub, request = prediction_stub(target), predict_request(image)
    for _ in range(10):
        stub.Predict(request, timeout=60)
    stop = threading.Event()
    counts = [0] * clients

    def client(i: int) -> None:
        while not stop.is_set():
            stub.Predict(request, timeout=60)
            counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # ramp-up
    before, start = sum(counts), time.perf_counter()
    time.sleep(seconds)
    done, elapsed = sum(counts) - before, time.perf_counter() - start
    stop.set()
    for thread in threads:
        thread.join()
    return done / elapsed


def main() -> int:
    """Run both comparisons and print the ratios against their targets."""
    from serving import testing
    from serving.protos import BatchingSettings, render_batching

    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="alternating off/on windows")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-serving-")
    base = os.path.join(work, "bench")
    testing.export(testing.build_conv_model(), base, 1)
    latency_base = os.path.join(work, "latency", "bench")
    testing.export(testing.build_conv_model(image_size=160, width=32), latency_base, 1)
    batching = os.path.join(work, "batching.config")
    with open(batching, "w") as f:
        f.write(
            render_batching(
                BatchingSettings(
                    max_batch_size=16,
                    batch_timeout_micros=2000,
                    max_enqueued_batches=100,
                    num_batch_threads=1,
                )
            )
        )
    image = testing.encode_image((180, 120, 60), size=64, fmt="JPEG")

    servers = []
    try:
        servers.append(start_server(latency_base, None))
        local, remote = interleaved_p50s(latency_base, servers[-1][1], image, args.calls)
        servers.append(start_server(base, None))
        servers.append(start_server(base, batching))
        # Alternate short windows so drifting load from other processes hits both modes alike.
        qps = {"off": [], "on": []}
        for _ in range(args.rounds):
            for mode, (_, target) in (("off", servers[1]), ("on", servers[2])):
                qps[mode].append(
                    throughput(target, image, args.clients, args.seconds / args.rounds)
                )
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=60)
    results = {
        "grpc_p50": remote,
        "qps_off": statistics.mean(qps["off"]),
        "qps_on": statistics.mean(qps["on"]),
    }
    latency_ratio = results["grpc_p50"] / local
    batching_ratio = results["qps_on"] / results["qps_off"]
    print(f"in-process p50          {local:8.2f} ms")
    print(f"gRPC single-image p50   {results['grpc_p50']:8.2f} ms  ratio {latency_ratio:.2f}x "
          f"(target <= 1.2x) {'PASS' if latency_ratio <= 1.2 else 'FAIL'}")  # fmt: skip
    print(f"{args.clients} clients, batching off {results['qps_off']:8.1f} QPS")
    print(f"{args.clients} clients, batching on  {results['qps_on']:8.1f} QPS  ratio "
          f"{batching_ratio:.2f}x (target >= 2x) {'PASS' if batching_ratio >= 2 else 'FAIL'}")  # fmt: skip
    return 0 if latency_ratio <= 1.2 and batching_ratio >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
