"""Prometheus text exposition of request counts, latencies, batch sizes and model loads.

Names follow TF Serving's exported metrics where one exists (``:tensorflow:serving:
request_count``, ``:tensorflow:serving:request_latency``); served at the path from
``--monitoring_config_file`` (default ``/monitoring/prometheus/metrics``) on the REST port.
"""

from __future__ import annotations

import bisect
import threading

# microseconds, like TF Serving's request_latency histogram
LATENCY_BUCKETS_US = (100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
                      250_000, 500_000, 1_000_000, 5_000_000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self, buckets):
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0


class Metrics:
    """Thread-safe counters and histograms, rendered in Prometheus text format 0.0.4."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[tuple, float] = {}
        self._histograms: dict[tuple, _Histogram] = {}
        self._buckets: dict[str, tuple] = {}

    def inc(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + value

    def observe(self, name: str, labels: dict[str, str], value: float, buckets) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._buckets[name] = buckets
            hist = self._histograms.get(key)
            if hist is None:
                hist = self._histograms[key] = _Histogram(buckets)
            hist.counts[bisect.bisect_left(buckets, value)] += 1
            hist.total += value
            hist.count += 1

    def record_request(self, model: str, api: str, entrypoint: str, status: str,
                       latency_us: float) -> None:
        """Counts a request by model and status; its latency only when it succeeded, as TF
        Serving records ``request_latency`` (a fast NOT_FOUND is not a served request)."""
        self.inc(":tensorflow:serving:request_count", {"model_name": model, "status": status})
        if status != "OK":
            return
        self.observe(":tensorflow:serving:request_latency",
                     {"model_name": model, "API": api, "entrypoint": entrypoint},
                     latency_us, LATENCY_BUCKETS_US)

    def record_batch(self, model: str, rows: int) -> None:
        self.observe(":tensorflow:serving:batching_session:processed_batch_size",
                     {"model_name": model}, rows, BATCH_BUCKETS)

    def render(self) -> str:
        lines = []
        with self._lock:
            counters = sorted(self._counters.items())
            histograms = sorted(self._histograms.items(), key=lambda kv: kv[0])
            buckets = dict(self._buckets)
        seen = set()
        for (name, labels), value in counters:
            if name not in seen:
                seen.add(name)
                lines.append(f"# TYPE {name} counter")
            lines.append(f"{name}{_labels(labels)} {value:g}")
        for (name, labels), hist in histograms:
            if name not in seen:
                seen.add(name)
                lines.append(f"# TYPE {name} histogram")
            running = 0
            for bound, count in zip(list(buckets[name]) + ["+Inf"], hist.counts):
                running += count
                lines.append(f"{name}_bucket{_labels(labels + (('le', str(bound)),))} {running}")
            lines.append(f"{name}_sum{_labels(labels)} {hist.total:g}")
            lines.append(f"{name}_count{_labels(labels)} {hist.count}")
        return "\n".join(lines) + "\n"


def _labels(items) -> str:
    if not items:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in items)
    return "{" + ",".join(escaped) + "}"
