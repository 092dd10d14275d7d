"""Serving metrics in the Prometheus text exposition format (no client library needed).

Exposed at ``GET /metrics``:

* ``fixres_request_latency_seconds`` histogram: arrival to answer of every served request;
* ``fixres_requests_total{resolution="R"}``: requests served at each resolution;
* ``fixres_batches_total{resolution="R"}``: batches run at each resolution;
* ``fixres_queue_length``: requests waiting now;
* ``fixres_slo_misses_total``: served requests slower than the objective;
* ``fixres_rejected_total{reason}``: 503 (overload) and 4xx (bad request) answers;
* ``fixres_latency_table_slowdown``: measured / predicted batch time the policy now plans with.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class Metrics:
    """Thread-safe counters of one server (the batcher thread and the HTTP handlers write them)."""

    def __init__(self, slo_ms: float, resolutions):
        self.slo_ms = float(slo_ms)
        self._lock = threading.Lock()
        self._buckets = [0] * len(LATENCY_BUCKETS_S)
        self._count = 0
        self._sum_s = 0.0
        self._requests: dict[int, int] = dict.fromkeys((int(r) for r in resolutions), 0)
        self._batches: dict[int, int] = dict.fromkeys((int(r) for r in resolutions), 0)
        self._slo_misses = 0
        self._rejected: dict[str, int] = defaultdict(int)
        self.queue_length = 0
        self.slowdown = 1.0

    def observe_batch(self, resolution: int, latencies_s) -> None:
        with self._lock:
            self._batches[int(resolution)] = self._batches.get(int(resolution), 0) + 1
            for lat in latencies_s:
                self._requests[int(resolution)] = self._requests.get(int(resolution), 0) + 1
                self._count += 1
                self._sum_s += lat
                for i, edge in enumerate(LATENCY_BUCKETS_S):
                    if lat <= edge:
                        self._buckets[i] += 1
                if lat * 1e3 > self.slo_ms:
                    self._slo_misses += 1

    def reject(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] += 1

    def snapshot(self) -> dict:
        """The counters as a dict (for tests and the bench tool)."""
        with self._lock:
            return {
                "count": self._count,
                "sum_s": self._sum_s,
                "requests": dict(self._requests),
                "batches": dict(self._batches),
                "slo_misses": self._slo_misses,
                "rejected": dict(self._rejected),
                "queue_length": self.queue_length,
                "slowdown": self.slowdown,
            }

    def render(self) -> str:
        """Prometheus text format 0.0.4."""
        s = self.snapshot()
        lines = [
            "# HELP fixres_request_latency_seconds Arrival-to-answer latency of served requests.",
            "# TYPE fixres_request_latency_seconds histogram",
        ]
        with self._lock:
            buckets = list(self._buckets)
        for edge, c in zip(LATENCY_BUCKETS_S, buckets):
            lines.append(f'fixres_request_latency_seconds_bucket{{le="{edge}"}} {c}')
        lines += [
            f'fixres_request_latency_seconds_bucket{{le="+Inf"}} {s["count"]}',
            f"fixres_request_latency_seconds_sum {s['sum_s']:.6f}",
            f"fixres_request_latency_seconds_count {s['count']}",
            "# HELP fixres_requests_total Requests served, by resolution.",
            "# TYPE fixres_requests_total counter",
        ]
        lines += [f'fixres_requests_total{{resolution="{r}"}} {c}' for r, c in sorted(s["requests"].items())]
        lines += ["# HELP fixres_batches_total Batches run, by resolution.", "# TYPE fixres_batches_total counter"]
        lines += [f'fixres_batches_total{{resolution="{r}"}} {c}' for r, c in sorted(s["batches"].items())]
        lines += [
            "# HELP fixres_queue_length Requests waiting for a batch.",
            "# TYPE fixres_queue_length gauge",
            f"fixres_queue_length {s['queue_length']}",
            "# HELP fixres_latency_table_slowdown Measured / predicted batch time (the policy scales the table by it).",
            "# TYPE fixres_latency_table_slowdown gauge",
            f"fixres_latency_table_slowdown {s['slowdown']:.4f}",
            "# HELP fixres_slo_misses_total Served requests slower than the latency objective.",
            "# TYPE fixres_slo_misses_total counter",
            f"fixres_slo_misses_total {s['slo_misses']}",
            "# HELP fixres_rejected_total Requests answered with an error, by reason.",
            "# TYPE fixres_rejected_total counter",
        ]
        for reason in sorted(set(s["rejected"]) | {"overload", "bad_request"}):
            lines.append(f'fixres_rejected_total{{reason="{reason}"}} {s["rejected"].get(reason, 0)}')
        return "\n".join(lines) + "\n"
