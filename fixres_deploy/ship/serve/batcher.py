"""Dynamic batching with a resolution per batch and admission control.

Requests wait in one queue; a worker thread takes up to ``max_batch`` of them as soon as the
batch is full or its oldest request has waited ``max_delay_ms``, asks the :class:`Policy` for
the resolution and runs the batch. A request that could not be answered within the objective
even if everything queued before it ran at the fastest resolution is refused at once
(:class:`Overloaded`, HTTP 503 with Retry-After) instead of growing the queue without bound.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fixres_deploy.core.errors import FixResError, UserInputError
from fixres_deploy.ship.serve.metrics import Metrics
from fixres_deploy.ship.serve.policy import Policy

log = logging.getLogger(__name__)


class Overloaded(FixResError):
    """The server cannot answer this request within the objective; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Answer:
    """One request's result: what ``run_batch`` returned for it and the batch's facts."""

    result: Any
    resolution: int
    batch_size: int
    queue_ms: float
    service_ms: float


@dataclass
class _Item:
    payload: Any
    arrival: float
    future: Future = field(default_factory=Future)


class Batcher:
    """Forms batches and runs them on one worker thread.

    Args:
        run_batch: ``run_batch(payloads, resolution) -> list of results`` (one per payload).
        policy: chooses each batch's resolution; its clock times the queue.
        metrics: counters to update.
        max_batch: most requests per batch (the engine's profile max at most).
        max_delay_ms: longest a request waits for the batch to fill.
        max_queue: hard bound of waiting requests.
        admission_factor: refuse a request predicted to answer later than this × the objective.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Any], int], Sequence[Any]],
        policy: Policy,
        metrics: Metrics,
        *,
        max_batch: int = 8,
        max_delay_ms: float = 5.0,
        max_queue: int = 512,
        admission_factor: float = 1.0,
    ):
        if int(max_batch) < 1:
            raise UserInputError(f"--max-batch must be >= 1, got {max_batch}")
        if max_delay_ms < 0:
            raise UserInputError(f"--max-delay-ms must be >= 0, got {max_delay_ms}")
        if int(max_queue) < 1:
            raise UserInputError(f"max_queue must be >= 1, got {max_queue}")
        self.run_batch = run_batch
        self.policy = policy
        self.metrics = metrics
        self.max_batch = int(max_batch)
        self.max_delay_s = float(max_delay_ms) / 1e3
        self.max_queue = int(max_queue)
        self.admission_factor = float(admission_factor)
        self.clock = policy.clock
        self._queue: list[_Item] = []
        self._cond = threading.Condition()
        self._busy_until = 0.0
        self._stopped = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Batcher:
        if self._thread is None:
            self._stopped = False
            self._thread = threading.Thread(target=self._loop, name="fixres-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            pending, self._queue = self._queue, []
            self._cond.notify_all()
        for item in pending:
            item.future.set_exception(Overloaded("the server is shutting down", 1))
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- requests -------------------------------------------------------------------------
    def admit(self, arrival: float | None = None) -> None:
        """Refuse now (before any work is spent on it) a request that cannot be answered in time.

        A request is refused when its age plus the predicted wait — the batch in flight and
        every queued request served at the fastest (or the fixed) resolution, then itself —
        exceeds ``admission_factor`` × the objective, or when the queue is full. Its age counts:
        a request that already waited (a busy event loop, a proxy) has less time left.

        Raises:
            Overloaded: with the predicted backlog as ``retry_after_s``.
        """
        with self._cond:
            self._admit_locked(self.clock(), arrival)

    def _admit_locked(self, now: float, arrival: float | None) -> None:
        queued = len(self._queue)
        wait_ms = self.policy.admission_wait_ms(queued, (self._busy_until - now) * 1e3)
        age_ms = max(0.0, (now - arrival) * 1e3) if arrival is not None else 0.0
        if self._stopped or queued >= self.max_queue or age_ms + wait_ms > self.policy.slo_ms * self.admission_factor:
            self.metrics.reject("overload")
            raise Overloaded(
                f"overloaded: {queued} requests queued, predicted answer {age_ms + wait_ms:.0f} ms after arrival even "
                f"at the fastest resolution (objective {self.policy.slo_ms:.0f} ms)",
                self.policy.retry_after_s(wait_ms),
            )

    def submit(self, payload: Any, arrival: float | None = None) -> Future:
        """Queue one request; its Future resolves to an :class:`Answer`.

        Args:
            payload: what ``run_batch`` gets for this request.
            arrival: when the request arrived (``clock`` seconds; default now): time spent
                before queueing (reading, decoding) counts against the objective.

        Raises:
            Overloaded: the request cannot be answered in time (or the queue is full): see :meth:`admit`.
        """
        with self._cond:
            now = self.clock()
            self._admit_locked(now, arrival)
            item = _Item(payload, now if arrival is None else min(float(arrival), now))
            self._queue.append(item)
            self.metrics.queue_length = len(self._queue)
            self._cond.notify()
        return item.future

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopped

    @property
    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue)

    # -- the worker -----------------------------------------------------------------------
    def _take_batch(self) -> tuple[list[_Item], list[float]] | None:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            while not self._stopped and len(self._queue) < self.max_batch:
                remaining = self._queue[0].arrival + self.max_delay_s - self.clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopped:
                return None
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            self.metrics.queue_length = len(self._queue)
            return batch, [i.arrival for i in self._queue]

    def _loop(self) -> None:
        while True:
            taken = self._take_batch()
            if taken is None:
                return
            batch, behind = taken
            decision = self.policy.choose([i.arrival for i in batch], behind)
            start = self.clock()
            with self._cond:
                self._busy_until = start + decision.predicted_ms / 1e3
            try:
                results = list(self.run_batch([i.payload for i in batch], decision.resolution))
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
            except Exception as exc:  # an engine failure fails this batch's requests, not the server
                log.exception("batch of %d at %d px failed", len(batch), decision.resolution)
                for item in batch:
                    item.future.set_exception(exc)
                continue
            done = self.clock()
            self.policy.observe(decision.resolution, len(batch), (done - start) * 1e3)
            self.metrics.slowdown = self.policy.slowdown
            with self._cond:
                self._busy_until = done
            self.metrics.observe_batch(decision.resolution, [done - i.arrival for i in batch])
            for item, res in zip(batch, results):
                item.future.set_result(
                    Answer(res, decision.resolution, len(batch), (start - item.arrival) * 1e3, (done - start) * 1e3)
                )
