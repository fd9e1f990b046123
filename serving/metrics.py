"""Request counters and latency histograms in Prometheus text format (TF Serving's names)."""

from __future__ import annotations

import bisect
import collections
import threading

LATENCY_BUCKETS_US = (1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 1e7)


class Metrics:
    """Thread-safe request_count and request_latency per model, API and status."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()
        self._latency: dict[tuple, list] = {}

    def record(self, model: str, api: str, entrypoint: str, status: str, seconds: float) -> None:
        """Count one request and its latency."""
        micros = seconds * 1e6
        with self._lock:
            self._counts[(model, status)] += 1
            key = (model, api, entrypoint)
            buckets = self._latency.setdefault(key, [[0] * (len(LATENCY_BUCKETS_US) + 1), 0.0])
            buckets[0][bisect.bisect_left(LATENCY_BUCKETS_US, micros)] += 1
            buckets[1] += micros

    def render(self) -> str:
        """The Prometheus exposition text."""
        lines = ["# TYPE :tensorflow:serving:request_count counter"]
        with self._lock:
            for (model, status), n in sorted(self._counts.items()):
                lines.append(
                    f':tensorflow:serving:request_count{{model_name="{model}",status="{status}"}} {n}'
                )
            lines.append("# TYPE :tensorflow:serving:request_latency histogram")
            for (model, api, entry), (counts, total) in sorted(self._latency.items()):
                labels = f'model_name="{model}",API="{api}",entrypoint="{entry}"'
                cumulative = 0
                for bound, n in zip((*LATENCY_BUCKETS_US, "+Inf"), counts, strict=True):
                    cumulative += n
                    lines.append(
                        f':tensorflow:serving:request_latency_bucket{{{labels},le="{bound}"}} '
                        f"{cumulative}"
                    )
                lines.append(f":tensorflow:serving:request_latency_sum{{{labels}}} {total}")
                lines.append(f":tensorflow:serving:request_latency_count{{{labels}}} {cumulative}")
        return "\n".join(lines) + "\n"
