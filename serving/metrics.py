"""Request counters and latency histograms, exposed through prometheus_client with TF Serving's
metric names (model_servers/http_server.cc, util/prometheus_exporter.cc).

`:tensorflow:serving:request_count{model_name, status}` counts every request;
`:tensorflow:serving:request_latency{model_name, API, entrypoint}` (microseconds) times the
successful ones, as RecordRequestLatency does. The counter keeps TF Serving's name, without the
`_total` suffix prometheus_client gives counters: both families come from a collector over our
own counts, prometheus_client writes the exposition text (label escaping included), and only the
counter's HELP/TYPE lines get TF Serving's family name back.
"""

from __future__ import annotations

import bisect
import collections
import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric

REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"
# servables/tensorflow/util.cc: Buckets::Exponential(10, 1.8, 33), 10 us to ~20 minutes.
LATENCY_BUCKETS_US = tuple(10 * 1.8**i for i in range(33))


class Metrics:
    """Thread-safe request_count and request_latency per model, API and status."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()
        self._latency: dict[tuple, list] = {}
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    def record(self, model: str, api: str, entrypoint: str, status: str, seconds: float) -> None:
        """Count one request, and its latency if it succeeded."""
        with self._lock:
            self._counts[(model, status)] += 1
            if status != "OK":
                return
            micros = seconds * 1e6
            key = (model, api, entrypoint)
            buckets = self._latency.setdefault(key, [[0] * (len(LATENCY_BUCKETS_US) + 1), 0.0])
            buckets[0][bisect.bisect_left(LATENCY_BUCKETS_US, micros)] += 1
            buckets[1] += micros

    def render(self) -> str:
        """The Prometheus exposition text."""
        text = generate_latest(self._registry).decode("utf-8")
        for kind in ("HELP", "TYPE"):
            text = text.replace(f"# {kind} {REQUEST_COUNT}_total ", f"# {kind} {REQUEST_COUNT} ")
        return text

    def collect(self):
        """prometheus_client's Collector protocol: the two metric families, from our counts."""
        with self._lock:
            counts = dict(self._counts)
            latency = {k: (list(v[0]), v[1]) for k, v in self._latency.items()}
        requests = Metric(REQUEST_COUNT, "The total number of requests.", "counter")
        for (model, status), n in sorted(counts.items()):
            requests.add_sample(REQUEST_COUNT, {"model_name": model, "status": status}, n)
        yield requests
        histogram = HistogramMetricFamily(
            REQUEST_LATENCY,
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            labels=["model_name", "API", "entrypoint"],
        )
        for labels, (counts_per_bucket, total) in sorted(latency.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(
                (*LATENCY_BUCKETS_US, float("inf")), counts_per_bucket, strict=True
            ):
                cumulative += n
                buckets.append((_bound_text(bound), cumulative))
            histogram.add_metric(list(labels), buckets, total)
        yield histogram


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"
