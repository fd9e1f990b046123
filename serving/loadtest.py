"""Load test a model server: concurrent gRPC clients, QPS and latency percentiles, and an
optional version swap in the middle of the run that must not fail a single request.

The clients are coroutines on one grpc.aio channel rather than threads: a Python thread per client
spends more CPU in the client than the server spends answering, and on a small machine the load
generator would end up measuring itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import time

import numpy as np

from serving.client import predict_request


@dataclasses.dataclass
class LoadTestReport:
    """What a load test measured."""

    requests: int
    errors: list[str]
    seconds: float
    latencies_ms: list[float]
    swapped_to: int | None = None

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
            f"p99 {self.percentile(99):.1f} ms, {len(self.errors)} errors"
        )
        if self.swapped_to is not None:
            line += f"; swapped to version {self.swapped_to}"
        return line


def next_version(base_path: str) -> int:
    """One more than the highest integer version dir under base_path (1 when there is none)."""
    names = os.listdir(base_path) if os.path.isdir(base_path) else []
    return max([int(n) for n in names if n.isdigit()], default=0) + 1


def push_version(source_dir: str, base_path: str) -> int:
    """Copy a SavedModel dir in as the next version, made visible atomically (rename)."""
    if not os.path.isfile(os.path.join(source_dir, "saved_model.pb")):
        raise FileNotFoundError(f"{source_dir} has no saved_model.pb")
    version = next_version(base_path)
    staging = os.path.join(base_path, f".staging-{version}")  # not an integer: ignored by servers
    shutil.copytree(source_dir, staging)
    os.rename(staging, os.path.join(base_path, str(version)))
    return version


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
) -> LoadTestReport:
    """Hammer `target` with `concurrency` clients for `duration` seconds."""
    requests = [predict_request([image], model_name, signature) for image in images]
    return asyncio.run(_load(target, requests, duration, concurrency, swap_to, base_path, progress))


async def _load(target, requests, duration, concurrency, swap_to, base_path, progress):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    from tqdm import tqdm

    latencies, errors = [], []
    stopping = asyncio.Event()

    async def client(stub, request) -> None:
        while not stopping.is_set():
            start = time.perf_counter()
            try:
                await stub.Predict(request, timeout=30)
                latencies.append((time.perf_counter() - start) * 1000)
            except Exception as exc:  # every failure is counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")

    async with grpc.aio.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        swapped = None
        start = time.monotonic()
        clients = [
            asyncio.create_task(client(stub, requests[i % len(requests)]))
            for i in range(concurrency)
        ]
        with tqdm(total=round(duration), unit="s", disable=not progress, desc="loadtest") as bar:
            while (elapsed := time.monotonic() - start) < duration:
                if swap_to and swapped is None and elapsed >= duration / 2:
                    swapped = await asyncio.to_thread(push_version, swap_to, base_path)
                await asyncio.sleep(min(1.0, duration - elapsed))
                bar.n = min(round(time.monotonic() - start), round(duration))
                bar.set_postfix(
                    qps=f"{len(latencies) / max(time.monotonic() - start, 1e-9):.0f}",
                    errors=len(errors),
                )
        stopping.set()
        await asyncio.gather(*clients)
    seconds = time.monotonic() - start
    return LoadTestReport(len(latencies) + len(errors), errors, seconds, latencies, swapped)
