"""Load test a model server: concurrent gRPC clients, QPS and latency percentiles, and an
optional version swap in the middle of the run that must not fail a single request."""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time

import numpy as np

from serving.client import predict_images, prediction_stub


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
    from tqdm import tqdm

    stub = prediction_stub(target)
    stop = threading.Event()
    lock = threading.Lock()
    latencies, errors = [], []

    def client(i: int) -> None:
        batch = [images[i % len(images)]]
        while not stop.is_set():
            start = time.perf_counter()
            try:
                predict_images(stub, batch, model_name, signature)
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    latencies.append(elapsed)
            except Exception as exc:  # every failure is counted and reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    swapped = None
    start = time.monotonic()
    for thread in threads:
        thread.start()
    with tqdm(total=round(duration), unit="s", disable=not progress, desc="loadtest") as bar:
        while (elapsed := time.monotonic() - start) < duration:
            if swap_to and swapped is None and elapsed >= duration / 2:
                swapped = push_version(swap_to, base_path)
            time.sleep(min(1.0, duration - elapsed))
            bar.n = min(round(time.monotonic() - start), round(duration))
            bar.set_postfix(
                qps=f"{len(latencies) / max(time.monotonic() - start, 1e-9):.0f}",
                errors=len(errors),
            )
    stop.set()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - start
    return LoadTestReport(len(latencies) + len(errors), errors, seconds, latencies, swapped)
