"""Which resolution serves the next batch: the most accurate one that still meets the SLO.

A multires bundle records, per (resolution, batch size), the service time measured on the
machine that built it (preprocessing of the decoded images at that resolution + inference).
For a batch of ``n`` requests whose oldest has waited ``age`` ms, with ``q`` more requests
queued behind it, resolution R is feasible when

* ``age + S(R, n) <= slo`` — every request of the batch completes within the objective, and
* ``age_q + S(R, n) + drain(q) <= slo`` — the oldest queued request can still be served in
  time afterwards, even if the following batches fall back to the fastest resolution
  (``drain(q)``: ``q`` requests in full batches at the fastest resolution).

The policy serves the most accurate feasible resolution, and the fastest one when none is
feasible (the batch is late anyway: finish it as soon as possible). The clock is injectable,
so the choice is a pure function of the table, the queue and the time (tests use a fake clock).

The table was measured when the bundle was built; the machine the server runs on may be busier
(other processes, the HTTP work of the server itself). :meth:`Policy.observe` keeps an
exponentially weighted ratio of measured to predicted batch times and scales every prediction
by it, so the policy and the admission control plan with the machine as it is now.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fixres_deploy.core.errors import UserInputError


@dataclass(frozen=True)
class LatencyTable:
    """Service time in ms per (resolution, batch size), interpolated between measured batches.

    Attributes:
        resolutions: ascending.
        batch_sizes: ascending measured batch sizes.
        service_ms: ``service_ms[i][j]`` for ``resolutions[i]`` and ``batch_sizes[j]``.
    """

    resolutions: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    service_ms: tuple[tuple[float, ...], ...]

    @classmethod
    def from_dict(cls, resolutions: Sequence[int], latency: dict) -> LatencyTable:
        """From a manifest's ``multires`` resolutions and ``latency`` section."""
        table = cls(
            tuple(int(r) for r in resolutions),
            tuple(int(b) for b in latency["batch_sizes"]),
            tuple(tuple(float(v) for v in row) for row in latency["service_ms"]),
        )
        if list(table.resolutions) != sorted(set(table.resolutions)) or not table.resolutions:
            raise UserInputError(f"latency table resolutions must be ascending and distinct, got {table.resolutions}")
        if list(table.batch_sizes) != sorted(set(table.batch_sizes)) or min(table.batch_sizes, default=0) < 1:
            raise UserInputError(f"latency table batch sizes must be ascending and >= 1, got {table.batch_sizes}")
        if len(table.service_ms) != len(table.resolutions) or any(
            len(r) != len(table.batch_sizes) or min(r) <= 0 for r in table.service_ms
        ):
            raise UserInputError("latency table needs one positive time per resolution and batch size")
        return table

    def predict_ms(self, resolution: int, n: int) -> float:
        """Service time of ``n`` requests at ``resolution``: linear between measured batch sizes,
        linear extrapolation above the largest (per-image cost of the last segment)."""
        row = self.service_ms[self.resolutions.index(int(resolution))]
        bs = self.batch_sizes
        n = max(1, int(n))
        if n <= bs[0]:
            return row[0] * n / bs[0] if n < bs[0] else row[0]
        for j in range(1, len(bs)):
            if n <= bs[j]:
                f = (n - bs[j - 1]) / (bs[j] - bs[j - 1])
                return row[j - 1] + f * (row[j] - row[j - 1])
        per = (row[-1] - row[-2]) / (bs[-1] - bs[-2]) if len(bs) > 1 else row[-1] / bs[-1]
        return row[-1] + max(per, 0.0) * (n - bs[-1])

    def drain_ms(self, n: int, resolution: int, max_batch: int) -> float:
        """Time to serve ``n`` queued requests in batches of ``max_batch`` at ``resolution``."""
        if n <= 0:
            return 0.0
        full, rest = divmod(int(n), int(max_batch))
        return full * self.predict_ms(resolution, max_batch) + (self.predict_ms(resolution, rest) if rest else 0.0)


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one batch.

    Attributes:
        resolution: where to run it.
        predicted_ms: predicted service time of the batch at that resolution.
        feasible: whether it is predicted to meet the SLO (False: the fastest, best effort).
    """

    resolution: int
    predicted_ms: float
    feasible: bool


class Policy:
    """Chooses the resolution of each batch (see the module docstring).

    Args:
        table: the bundle's :class:`LatencyTable`.
        slo_ms: the p99 latency objective, ms from arrival to answer.
        accuracy: top-1 per resolution (most accurate first when choosing); default: a
            higher resolution is more accurate.
        fixed_resolution: always serve this resolution (the policy only predicts).
        max_batch: the batcher's max batch (for the queue-drain estimate).
        margin: the SLO fraction the prediction may use (headroom for jitter and HTTP).
        clock: seconds, monotonic (injectable for tests).
        adapt: weight of each new measured/predicted ratio in the slowdown estimate (0: trust
            the table as measured at build time).
    """

    def __init__(
        self,
        table: LatencyTable,
        slo_ms: float,
        *,
        accuracy: dict[int, float | None] | None = None,
        fixed_resolution: int | None = None,
        max_batch: int = 8,
        margin: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
        adapt: float = 0.2,
    ):
        if slo_ms <= 0:
            raise UserInputError(f"--slo-p99-ms must be > 0, got {slo_ms}")
        if fixed_resolution is not None and int(fixed_resolution) not in table.resolutions:
            raise UserInputError(
                f"--fixed-resolution {fixed_resolution} is not a resolution of the bundle {list(table.resolutions)}"
            )
        if not 0 < margin <= 1:
            raise UserInputError(f"margin must be in (0, 1], got {margin}")
        self.table = table
        self.slo_ms = float(slo_ms)
        self.fixed_resolution = int(fixed_resolution) if fixed_resolution is not None else None
        self.max_batch = int(max_batch)
        self.margin = float(margin)
        self.clock = clock
        if not 0 <= adapt <= 1:
            raise UserInputError(f"adapt must be in [0, 1], got {adapt}")
        self.adapt = float(adapt)
        self.slowdown = 1.0
        acc = dict(accuracy or {})
        # most accurate first; unknown accuracy ranks by resolution
        self.order = sorted(
            table.resolutions,
            key=lambda r: (acc.get(r) if acc.get(r) is not None else -1.0, r),
            reverse=True,
        )
        self.fastest = min(table.resolutions, key=lambda r: table.predict_ms(r, self.max_batch))

    MIN_SLOWDOWN, MAX_SLOWDOWN = 0.5, 20.0

    def predict_ms(self, resolution: int, n: int) -> float:
        """The table's time for ``n`` requests at ``resolution``, scaled by the observed slowdown."""
        return self.table.predict_ms(resolution, n) * self.slowdown

    def drain_ms(self, n: int, resolution: int) -> float:
        return self.table.drain_ms(n, resolution, self.max_batch) * self.slowdown

    def observe(self, resolution: int, n: int, measured_ms: float) -> None:
        """Fold one batch's measured service time into the slowdown estimate."""
        if self.adapt <= 0 or measured_ms <= 0:
            return
        ratio = measured_ms / self.table.predict_ms(resolution, n)
        s = (1 - self.adapt) * self.slowdown + self.adapt * ratio
        self.slowdown = min(self.MAX_SLOWDOWN, max(self.MIN_SLOWDOWN, s))

    def choose(self, batch_arrivals: Sequence[float], queued_arrivals: Sequence[float] = ()) -> Decision:
        """The resolution for a batch, given arrival times (``clock`` seconds) of its requests
        and of the requests still queued behind it."""
        now = self.clock()
        n = max(1, len(batch_arrivals))
        if self.fixed_resolution is not None:
            r = self.fixed_resolution
            pred = self.predict_ms(r, n)
            age = (now - min(batch_arrivals)) * 1e3 if batch_arrivals else 0.0
            return Decision(r, pred, age + pred <= self.slo_ms * self.margin)
        budget = self.slo_ms * self.margin
        age = (now - min(batch_arrivals)) * 1e3 if batch_arrivals else 0.0
        q = len(queued_arrivals)
        age_q = (now - min(queued_arrivals)) * 1e3 if q else 0.0
        drain = self.drain_ms(q, self.fastest)
        for r in self.order:
            pred = self.predict_ms(r, n)
            if age + pred <= budget and (q == 0 or age_q + pred + drain <= budget):
                return Decision(r, pred, True)
        r = self.fastest
        return Decision(r, self.predict_ms(r, n), False)

    def admission_wait_ms(self, queued: int, busy_left_ms: float) -> float:
        """Predicted time until a new request would be answered: the batch in flight, the queue
        and the request itself, all at the serving resolution (fixed) or the fastest one."""
        r = self.fixed_resolution if self.fixed_resolution is not None else self.fastest
        return max(0.0, busy_left_ms) + self.drain_ms(queued + 1, r)

    def retry_after_s(self, wait_ms: float) -> int:
        """Seconds a refused client should wait (Retry-After): the predicted backlog, >= 1."""
        return max(1, math.ceil(wait_ms / 1e3))
