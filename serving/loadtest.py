"""Load test a model server: concurrent gRPC clients, QPS and latency percentiles, and an
optional version swap in the middle of the run that must not fail a single request.

The clients are coroutines on one grpc.aio channel rather than threads: a Python thread per client
spends more CPU in the client than the server spends answering, and on a small machine the load
generator would end up measuring itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from serving.client import ServerUnavailable, grpc_failure, predict_request
from serving.manager import numbered_children

ERROR_EXAMPLES = 5  # distinct error messages a report keeps; the rest are only counted


@dataclasses.dataclass
class LoadTestReport:
    """What a load test measured."""

    requests: int
    errors: int  # failed requests, unanswered ones included
    seconds: float
    latencies_ms: list[float]
    swapped_to: int | None = None
    versions_seen: dict[int, int] = dataclasses.field(default_factory=dict)  # version -> answers
    live_after_seconds: float | None = None  # saved_model.pb written -> first answer from it
    # The first ERROR_EXAMPLES distinct failures: a server that went away fails every request
    # at once, and keeping each message grew this list to 17 GB.
    error_examples: list[str] = dataclasses.field(default_factory=list)
    # Failed requests no server answered (serving.client.grpc_failure: no connection, our
    # timeout, the connection lost mid-call); the other errors are the server's answers.
    unanswered: int = 0

    @property
    def qps(self) -> float:
        """Successful requests per second."""
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Latency percentile in milliseconds."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> str:
        """One line for humans."""
        line = (
            f"{self.requests} requests in {self.seconds:.1f}s: {self.qps:.1f} QPS, "
            f"p50 {self.percentile(50):.1f} ms, p95 {self.percentile(95):.1f} ms, "
            f"p99 {self.percentile(99):.1f} ms, {self.errors} errors"
        )
        if self.unanswered:
            line += f" ({self.unanswered} without an answer)"
        if self.swapped_to is not None:
            line += f"; swapped to version {self.swapped_to}"
            if self.live_after_seconds is not None:
                line += f", live {self.live_after_seconds:.1f} s after its saved_model.pb"
            else:
                line += ", which never answered"
        return line


def next_version(base_path: str) -> int:
    """One more than the highest integer version dir under base_path (1 when there is none)."""
    # The server's own reading of version names: "²" passes str.isdigit, not int().
    return max((version for version, _ in numbered_children(base_path) or []), default=0) + 1


def push_version(source_dir: str, base_path: str) -> tuple[int, float]:
    """Copy a SavedModel dir in as the next version the way TFX's Pusher does."""
    # Everything goes into `<base>/<version>/`, saved_model.pb last. Returns the version and when
    # saved_model.pb landed (time.monotonic()).
    if not os.path.isfile(os.path.join(source_dir, "saved_model.pb")):
        raise FileNotFoundError(f"{source_dir} has no saved_model.pb")
    version = next_version(base_path)
    target = os.path.join(base_path, str(version))
    shutil.copytree(source_dir, target, ignore=shutil.ignore_patterns("saved_model.pb"))
    shutil.copy(os.path.join(source_dir, "saved_model.pb"), target)
    return version, time.monotonic()


def run_loadtest(
    target: str,
    images: list[bytes],
    duration: float,
    concurrency: int,
    model_name: str = "van",
    signature: str = "predict_images",
    swap_to: str | None = None,
    base_path: str | None = None,
    progress: bool = True,
    swap_after: float | None = None,
    settle: float | None = None,
    timeout: float = 30.0,
) -> LoadTestReport:
    """Hammer `target` with `concurrency` clients for `duration` s, optionally swapping versions."""
    # Each request is given `timeout` seconds; with `swap_to`, push that SavedModel as the next
    # version after `swap_after` seconds (default: half-way), and with `settle`, stop that long
    # after the new version first answered.
    requests = [predict_request([image], model_name, signature) for image in images]
    swap_after = duration / 2 if swap_after is None else swap_after
    return asyncio.run(
        _load(target, requests, duration, concurrency, swap_to, base_path, progress, swap_after,
              settle, timeout)
    )  # fmt: skip


async def _load(
    target, requests, duration, concurrency, swap_to, base_path, progress, swap_after, settle,
    timeout,
):  # fmt: skip
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    from tqdm import tqdm

    latencies: list[float] = []
    errors = {"count": 0, "unanswered": 0, "examples": []}
    versions: dict[int, int] = {}
    first_answer: dict[int, float] = {}  # version -> time.monotonic() of its first answer
    stopping = asyncio.Event()

    async def client(stub, request) -> None:
        while not stopping.is_set():
            start = time.perf_counter()
            try:
                response = await stub.Predict(request, timeout=timeout)
                latencies.append((time.perf_counter() - start) * 1000)
                version = response.model_spec.version.value
                versions[version] = versions.get(version, 0) + 1
                first_answer.setdefault(version, time.monotonic())
            except Exception as exc:  # every failure is counted, a few distinct ones kept
                errors["count"] += 1
                if isinstance(exc, grpc.aio.AioRpcError):
                    # The same rule as `van-tfx predict`: did a server answer, or not?
                    elapsed = time.perf_counter() - start
                    exc = grpc_failure(exc.code(), exc.details(), elapsed, timeout)
                if isinstance(exc, ServerUnavailable):
                    errors["unanswered"] += 1
                    message = f"no answer: {exc}"
                else:
                    message = f"{type(exc).__name__}: {exc}"
                examples = errors["examples"]
                if len(examples) < ERROR_EXAMPLES and message not in examples:
                    examples.append(message)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        swapped = pushed_at = None
        start = time.monotonic()
        clients = [
            asyncio.create_task(client(stub, requests[i % len(requests)]))
            for i in range(concurrency)
        ]
        try:  # whatever ends this loop (an error, Ctrl-C) also stops the clients
            with tqdm(
                total=round(duration), unit="s", disable=not progress, desc="loadtest"
            ) as bar:
                while (elapsed := time.monotonic() - start) < duration:
                    if swap_to and swapped is None and elapsed >= swap_after:
                        swapped, pushed_at = await asyncio.to_thread(
                            push_version, swap_to, base_path
                        )
                    live = first_answer.get(swapped) if swapped is not None else None
                    if settle is not None and live is not None and time.monotonic() > live + settle:
                        break
                    await asyncio.sleep(min(0.2, duration - elapsed))
                    bar.n = min(round(time.monotonic() - start), round(duration))
                    bar.set_postfix(
                        qps=f"{len(latencies) / max(time.monotonic() - start, 1e-9):.0f}",
                        errors=errors["count"],
                    )
        finally:
            stopping.set()
            await asyncio.gather(*clients, return_exceptions=True)
    seconds = time.monotonic() - start
    live = first_answer[swapped] - pushed_at if swapped in first_answer else None
    return LoadTestReport(
        len(latencies) + errors["count"], errors["count"], seconds, latencies, swapped, versions,
        live, errors["examples"], errors["unanswered"],
    )  # fmt: skip


@contextlib.contextmanager
def busy_neighbours(count: int):
    """`count` processes spinning on the CPU: the other tenants of a shared machine."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def measure_swap(
    model_dir: str,
    image: bytes,
    neighbours: int = 1,
    clients: int = 4,
    signature: str = "predict_images",
    server_command: list[str] | None = None,
    server_cwd: str | None = None,
    max_seconds: float = 120.0,
) -> LoadTestReport:
    """Measure when a pushed version 2 of `model_dir` goes live under load; returns the report."""
    # Serve `model_dir` as version 1 of a fresh base path (`van-tfx serve`, or `server_command`),
    # load it with `clients` callers and `neighbours` busy processes, push it again as version 2
    # after 3 s, and stop 3 s after version 2 first answered (or at `max_seconds`); the report says
    # when version 2 went live.
    from serving.process import running_model_server

    with tempfile.TemporaryDirectory(prefix="swap-") as base:
        shutil.copytree(model_dir, os.path.join(base, "1"))
        flags = ["--file_system_poll_wait_seconds=1"]
        server = running_model_server(base, "van", 300, flags, server_command, server_cwd)
        with server as (_channel, port):
            with busy_neighbours(neighbours):
                return run_loadtest(
                    f"127.0.0.1:{port}", [image], max_seconds, clients, "van", signature,
                    swap_to=model_dir, base_path=base, progress=False, swap_after=3.0,
                    settle=3.0,
                )  # fmt: skip
