"""Latency you can trust: warm-up, repeats, percentiles, the load it ran under, and the work done.

Every latency here is a per-call wall time (``time.perf_counter_ns`` around one ``infer``)
measured after a warm-up that is satisfied by count *and* by time (first calls allocate, JIT,
tune; the CPU clock ramps), in ``repeats`` separate runs: the reported percentiles are the
medians of the per-repeat percentiles, and their spread says how stable the number is.

Why so careful: on a shared 2-core machine OpenMP / ONNX Runtime threads spin, and another
process's load slows torch eager ~10x and ONNX Runtime ~3x (measured on a 2-core box). So each repeat also
records the CPU use of *other* processes (:mod:`fixres_deploy.measure.sysload`); a repeat that ran
under more than ``contention_threshold`` cores of foreign load is measured again (up to
``remeasure_if_contended`` times) and the result carries a ``contended`` flag when the noise
could not be escaped. Several engines compared in one run are measured *interleaved* in
rounds (:func:`measure_rounds`): every engine once per round, in an order shuffled per round,
so that drift in the machine's state hits all of them alike; a round during which other
processes used the cores is run again as a whole (bounded), and every round's values are kept
(:class:`RoundsResult`) so that ratios between engines can be computed per round, paired, with
a bootstrap interval (docs/measurement.md).

A latency becomes comparable across models with the work behind it: GFLOPs per image from the
ONNX graph (:mod:`fixres_deploy.models.flops`), achieved GFLOP/s, and the percentage of the machine's
measured matrix-product peak (:func:`measure_peak_gflops`).

GPU runners (the TensorRT runner) can report where the time went; see :func:`measure_latency`
for the hook protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fixres_deploy.core import env
from fixres_deploy.core.errors import FixResError, UserInputError
from fixres_deploy.core.schema import check_schema, stamp
from fixres_deploy.measure import sysload

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, kw_only=True)
class LatencyConfig:
    """How to measure one latency (presets: :meth:`quick`, :meth:`standard`, :meth:`thorough`).

    Attributes:
        warmup_iters: untimed calls before timing ...
        warmup_s: ... and untimed seconds: the warm-up lasts until *both* are reached.
        min_iters: timed calls per repeat at least (wins over ``budget_s`` for slow engines).
        max_iters: timed calls per repeat at most (wins over ``budget_s`` for fast engines).
        budget_s: timed seconds of the whole measurement, split evenly over the repeats.
        repeats: independent timed runs (rounds, when several engines are interleaved);
            percentiles are medians of the per-repeat ones.
        percentiles: percentiles to report (50, 90 and 99 are always computed).
        check_load: record other processes' CPU use (Linux /proc) and flag contention.
        contention_threshold: cores of foreign load (incl. hypervisor steal) above which a
            repeat counts as contended.
        remeasure_if_contended: how many contended repeats (rounds) may be measured again (in
            total per measurement); the least-contended attempt of each round is kept.
        remeasure_wait_s: pause before measuring a contended repeat again.
        rewarm_iters: untimed calls before each interleaved chunk (after switching engines the
            caches hold another engine's weights) ...
        rewarm_s: ... and untimed seconds: the re-warm-up lasts until both are reached (a
            0.2 ms engine needs more than 3 calls to refill its caches and wake its threads).
        load_sample_interval_s: period of the background load sampler (0: start/end only).
        seed: seed of the per-round engine order (a measurement is reproducible in its plan).
        max_repeats: rounds at most, when engines are interleaved (0: exactly ``repeats``).
            Above ``repeats``, rounds are added one at a time until every pair of engines that
            matters (by default: neighbours in latency; the sweep passes the pairs its choice
            depends on) is resolved, or this many rounds ran. Each added round costs
            ``budget_s / repeats`` per engine.
        resolve_rel: a pair is resolved when the 95% interval of its paired latency ratio
            excludes 1 (one is faster), or lies within ``1 ± resolve_rel`` (their difference is
            too small to matter).
    """

    warmup_iters: int = 10
    warmup_s: float = 1.0
    min_iters: int = 10
    max_iters: int = 100_000
    budget_s: float = 3.0
    repeats: int = 3
    percentiles: tuple[float, ...] = (50, 90, 99)
    check_load: bool = True
    contention_threshold: float = 0.3
    remeasure_if_contended: int = 2
    remeasure_wait_s: float = 0.5
    rewarm_iters: int = 3
    rewarm_s: float = 0.0
    load_sample_interval_s: float = 0.1
    seed: int = 0
    max_repeats: int = 0
    resolve_rel: float = 0.03

    def __post_init__(self) -> None:
        for name in (
            "warmup_iters",
            "min_iters",
            "max_iters",
            "repeats",
            "remeasure_if_contended",
            "rewarm_iters",
            "seed",
            "max_repeats",
        ):
            v = getattr(self, name)
            if int(v) != v or v < 0:
                raise UserInputError(f"LatencyConfig.{name} must be a non-negative integer, got {v!r}")
        if self.repeats < 1 or self.min_iters < 1 or self.max_iters < self.min_iters:
            raise UserInputError(
                f"LatencyConfig needs repeats >= 1 and 1 <= min_iters <= max_iters, got repeats={self.repeats}, "
                f"min_iters={self.min_iters}, max_iters={self.max_iters}"
            )
        if self.max_repeats and self.max_repeats < self.repeats:
            raise UserInputError(
                f"LatencyConfig.max_repeats must be 0 (off) or >= repeats ({self.repeats}), got {self.max_repeats}"
            )
        for name in (
            "warmup_s",
            "budget_s",
            "remeasure_wait_s",
            "load_sample_interval_s",
            "contention_threshold",
            "resolve_rel",
            "rewarm_s",
        ):
            if getattr(self, name) < 0:
                raise UserInputError(f"LatencyConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        pcts = tuple(sorted({float(p) for p in self.percentiles} | {50.0, 90.0, 99.0}))
        if pcts[0] < 0 or pcts[-1] > 100:
            raise UserInputError(f"percentiles must lie in [0, 100], got {self.percentiles}")
        object.__setattr__(self, "percentiles", pcts)

    @classmethod
    def quick(cls, **kw) -> LatencyConfig:
        """A short measurement (~0.8 s per engine in 8 rounds, up to 14 while pairs are unresolved)."""
        return cls(
            **_with_max_repeats(
                {
                    "warmup_iters": 3,
                    "warmup_s": 0.1,
                    "min_iters": 5,
                    "budget_s": 0.8,
                    "repeats": 8,
                    "rewarm_s": 0.02,
                    "remeasure_if_contended": 3,
                    "remeasure_wait_s": 0.2,
                },
                14,
                kw,
            )
        )

    @classmethod
    def standard(cls, **kw) -> LatencyConfig:
        """The default: 1 s warm-up, 3 s timed in 3 repeats (up to 9 rounds while pairs are unresolved)."""
        return cls(**_with_max_repeats({"rewarm_s": 0.05}, 9, kw))

    @classmethod
    def thorough(cls, **kw) -> LatencyConfig:
        """For numbers you will publish: 2 s warm-up, 10 s timed in 8 rounds (up to 20 while pairs are unresolved)."""
        return cls(
            **_with_max_repeats(
                {
                    "warmup_iters": 20,
                    "warmup_s": 2.0,
                    "min_iters": 20,
                    "budget_s": 10.0,
                    "repeats": 8,
                    "rewarm_s": 0.1,
                    "remeasure_if_contended": 5,
                    "remeasure_wait_s": 2.0,
                },
                20,
                kw,
            )
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LatencyConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "percentiles" in d:
            d["percentiles"] = tuple(d["percentiles"])
        return cls(**d)


def _with_max_repeats(preset: dict, max_repeats: int, kw: dict) -> dict:
    """A preset's settings overridden by ``kw``; its round cap never below the rounds asked for."""
    d = preset | kw
    d.setdefault("max_repeats", max(max_repeats, int(d.get("repeats", LatencyConfig.repeats))))
    return d


# --------------------------------------------------------------------------- result


@dataclass
class LatencyResult:
    """One latency measurement of one runner at one input shape.

    Attributes:
        name: the runner's name.
        batch_size, resolution: the input (resolution: H when H == W, else [H, W]).
        latency_p50_ms, latency_p90_ms, latency_p99_ms: medians over the repeats of the
            per-repeat percentiles of per-call wall time.
        latency_mean_ms, latency_std_ms, latency_min_ms, latency_max_ms: over all kept calls.
        percentiles_ms: every configured percentile, "p50" -> ms.
        throughput_ips: batch_size / mean latency (images per second).
        throughput_wall_ips: batch_size x calls / timed wall time (includes the loop's gaps).
        iters: timed calls kept; repeats: repeats kept.
        latency_p50_repeats_ms: each repeat's p50; p50_spread_pct: (max - min) / median of them.
        warmup_iters, warmup_s: what the warm-up actually did.
        threads: thread settings in force (torch, ONNX Runtime session, OMP_NUM_THREADS, ...).
        load: other processes' CPU use during the kept repeats (sysload keys), None off Linux.
        load_per_repeat: other_cores_busy + steal of each kept repeat.
        contended: some kept repeat ran above ``contention_threshold`` cores of foreign load.
        remeasured: how many repeats were measured again because of contention.
        gpu_timing: p50 of the runner's CUDA-event times (h2d_ms, compute_ms, d2h_ms) and
            ``cuda_graph`` when the runner implements the hook protocol, else None.
        latency_device_p50_ms: p50 of the per-call device time (h2d + compute + d2h from CUDA
            events: what the GPU spent, without Python/host overhead); None without the hook.
            The host ``latency_p50_ms`` stays beside it (it is what a caller waits for).
        config: the LatencyConfig used.
    """

    name: str
    batch_size: int
    resolution: Any
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    latency_std_ms: float
    latency_min_ms: float
    latency_max_ms: float
    percentiles_ms: dict
    throughput_ips: float
    throughput_wall_ips: float
    iters: int
    repeats: int
    latency_p50_repeats_ms: list
    p50_spread_pct: float
    warmup_iters: int
    warmup_s: float
    threads: dict = field(default_factory=dict)
    load: dict | None = None
    load_per_repeat: list = field(default_factory=list)
    contended: bool = False
    remeasured: int = 0
    gpu_timing: dict | None = None
    latency_device_p50_ms: float | None = None
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LatencyResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------- harness


def _call_fn(runner: Any, batch: np.ndarray) -> Callable[[], Any]:
    """The call to time: ``infer({input_name: x})``, else ``predict(x)``, else ``runner(x)``."""
    if callable(getattr(runner, "infer", None)) and getattr(runner, "input_name", None):
        infer, feed = runner.infer, {runner.input_name: batch}
        return lambda: infer(feed)
    if callable(getattr(runner, "predict", None)):
        predict = runner.predict
        return lambda: predict(batch)
    if callable(runner):
        return lambda: runner(batch)
    raise UserInputError(f"cannot time {type(runner).__name__}: it has no infer(feed), predict(x) or __call__")


@contextlib.contextmanager
def _activated(runners: Sequence[Any]) -> Iterator[None]:
    """Activate runners that are not active yet (and only those are deactivated after)."""
    started = []
    try:
        for r in runners:
            if getattr(r, "is_active", True) is False and callable(getattr(r, "activate", None)):
                r.activate()
                started.append(r)
        yield
    finally:
        for r in reversed(started):
            r.deactivate()


def thread_settings(runner: Any = None) -> dict:
    """The thread configuration a latency was measured under (for the record)."""
    d: dict[str, Any] = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "sched_getaffinity"):
        d["affinity_cpus"] = len(os.sched_getaffinity(0))
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        d["torch_num_threads"] = torch.get_num_threads()
        d["torch_interop_threads"] = torch.get_num_interop_threads()
    if runner is not None:
        for attr in ("threads", "intra_op_threads", "num_threads"):
            v = getattr(runner, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                d["runner_threads"] = v
                break
        for attr in ("session", "sess", "_session"):
            sess = getattr(runner, attr, None)
            if sess is not None and callable(getattr(sess, "get_session_options", None)):
                so = sess.get_session_options()
                # 0 means ONNX Runtime's default: one thread per physical core.
                d["ort_intra_op_num_threads"] = so.intra_op_num_threads
                d["ort_inter_op_num_threads"] = so.inter_op_num_threads
                if callable(getattr(sess, "get_providers", None)):
                    d["ort_providers"] = list(sess.get_providers())
                break
    return d


def _resolution_of(batch: np.ndarray) -> Any:
    if batch.ndim == 4:
        h, w = int(batch.shape[2]), int(batch.shape[3])
        return h if h == w else [h, w]
    return None


@dataclass
class _Repeat:
    samples_ns: np.ndarray
    wall_ns: int
    load: dict | None
    gpu: list = field(default_factory=list)

    def other(self) -> float:
        if not self.load:
            return 0.0
        return self.load["other_cores_busy"] + self.load.get("steal_cores", 0.0)

    @functools.cached_property
    def stats_ms(self) -> dict[str, float]:
        """p50, p90, p99 and mean of this repeat's calls (ms), computed once: the adaptive round
        count reads every kept round's p50 after each added round."""
        ms = self.samples_ns / 1e6
        out = {f"p{p}": float(np.percentile(ms, p)) for p in (50, 90, 99)}
        out["mean"] = float(ms.mean())
        return out


class _Case:
    """One (runner, batch) being measured; keeps its warm-up and repeats."""

    def __init__(self, runner: Any, batch: np.ndarray, cfg: LatencyConfig, name: str | None):
        if not isinstance(batch, np.ndarray):
            raise UserInputError(f"the benchmark batch must be a numpy array, got {type(batch).__name__}")
        self.runner, self.batch, self.cfg = runner, batch, cfg
        self.name = name or getattr(runner, "name", None) or type(runner).__name__
        self.call: Callable[[], Any] = lambda: None  # set by prepare(), once the runner is active
        self.gpu = bool(getattr(runner, "cuda_timing", False)) and callable(
            getattr(runner, "last_cuda_timing_ms", None)
        )
        self.kept: list[_Repeat] = []
        self.remeasured = 0
        self.warmup_iters = 0
        self.warmup_s = 0.0
        self.threads: dict = {}

    def prepare(self) -> None:
        # After activation: a runner may learn its input name from the session it opens.
        self.call = _call_fn(self.runner, self.batch)

    def warmup(self) -> None:
        cfg, call = self.cfg, self.call
        pc = time.perf_counter
        t0 = pc()
        n = 0
        while n < cfg.warmup_iters or pc() - t0 < cfg.warmup_s:
            call()
            n += 1
        self.warmup_iters += n
        self.warmup_s += pc() - t0
        self.threads = thread_settings(self.runner)  # while active: a session exists only now

    def rewarm(self) -> None:
        cfg, n = self.cfg, 0
        deadline = time.perf_counter() + cfg.rewarm_s
        while n < cfg.rewarm_iters or time.perf_counter() < deadline:
            self.call()
            n += 1
        self.warmup_iters += n

    def one_repeat(self, budget_s: float) -> _Repeat:
        cfg, call = self.cfg, self.call
        runner = self.runner
        gpu_hook = runner.last_cuda_timing_ms if self.gpu else None
        samples: list[int] = []
        gpu: list = []
        append = samples.append
        pc = time.perf_counter_ns
        mon = sysload.LoadMonitor(cfg.load_sample_interval_s) if cfg.check_load else None
        if mon is not None:
            mon.start()
        start = pc()
        deadline = start + int(budget_s * 1e9)
        n = 0
        try:
            while True:
                t0 = pc()
                call()
                t1 = pc()
                append(t1 - t0)
                n += 1
                if gpu_hook is not None:
                    gpu.append(gpu_hook())
                if n >= cfg.max_iters or (n >= cfg.min_iters and t1 >= deadline):
                    break
            wall = pc() - start
        finally:
            if mon is not None:
                mon.stop()
        return _Repeat(np.asarray(samples, dtype=np.int64), wall, mon.result() if mon else None, gpu)

    def result(self) -> LatencyResult:
        cfg = self.cfg
        per_rep = [r.samples_ns / 1e6 for r in self.kept]
        pooled = np.concatenate(per_rep)
        pct = {f"p{p:g}": float(np.median([np.percentile(x, p) for x in per_rep])) for p in cfg.percentiles}
        p50s = [r.stats_ms["p50"] for r in self.kept]
        med = float(np.median(p50s))
        mean = float(pooled.mean())
        batch_size = int(self.batch.shape[0]) if self.batch.ndim else 1
        wall_s = sum(r.wall_ns for r in self.kept) / 1e9
        load = sysload.merge([r.load for r in self.kept]) if cfg.check_load else None
        contended = cfg.check_load and any(sysload.contention(r.load, cfg.contention_threshold) for r in self.kept)
        return LatencyResult(
            name=str(self.name),
            batch_size=batch_size,
            resolution=_resolution_of(self.batch),
            latency_p50_ms=pct["p50"],
            latency_p90_ms=pct["p90"],
            latency_p99_ms=pct["p99"],
            latency_mean_ms=mean,
            latency_std_ms=float(pooled.std(ddof=1)) if len(pooled) > 1 else 0.0,
            latency_min_ms=float(pooled.min()),
            latency_max_ms=float(pooled.max()),
            percentiles_ms=pct,
            throughput_ips=batch_size / (mean / 1e3) if mean > 0 else 0.0,
            throughput_wall_ips=batch_size * len(pooled) / wall_s if wall_s > 0 else 0.0,
            iters=len(pooled),
            repeats=len(self.kept),
            latency_p50_repeats_ms=p50s,
            p50_spread_pct=100.0 * (max(p50s) - min(p50s)) / med if med > 0 else 0.0,
            warmup_iters=self.warmup_iters,
            warmup_s=self.warmup_s,
            threads=self.threads,
            load=load,
            load_per_repeat=[r.other() for r in self.kept] if cfg.check_load else [],
            contended=bool(contended),
            remeasured=self.remeasured,
            gpu_timing=self._gpu_summary(),
            latency_device_p50_ms=self._device_p50(),
            config=cfg.to_dict(),
        )

    def _device_p50(self) -> float | None:
        """p50 over calls of h2d + compute + d2h (calls whose hook returned None are skipped)."""
        totals = [
            sum(float(g.get(k) or 0.0) for k in ("h2d_ms", "compute_ms", "d2h_ms"))
            for r in self.kept
            for g in r.gpu
            if g
        ]
        return float(np.median(totals)) if totals else None

    def _gpu_summary(self) -> dict | None:
        rows = [g for r in self.kept for g in r.gpu if g]
        if not rows:
            return None
        out: dict[str, Any] = {}
        for key in ("h2d_ms", "compute_ms", "d2h_ms"):
            vals = [float(g[key]) for g in rows if g.get(key) is not None]
            if vals:
                out[key] = float(np.median(vals))
        out["cuda_graph"] = bool(getattr(self.runner, "cuda_graph", False))
        out["calls"] = len(rows)
        return out


def measure_latency(
    runner: Any, batch: np.ndarray, cfg: LatencyConfig | None = None, *, name: str | None = None
) -> LatencyResult:
    """Latency of one runner on one batch: warm-up, ``repeats`` timed runs, load check.

    Works with any runner: a :class:`fixres_deploy.backends.base.Runner` (timed call:
    ``infer({input_name: batch})``; activated here if it is not active yet and deactivated
    after), any object with ``predict(x)``, or a plain callable.

    GPU hook protocol (for the TensorRT runner; not exercised on this CPU-only machine):
    a runner that sets ``cuda_timing = True`` and defines ``last_cuda_timing_ms() -> dict``
    gets its device-side times recorded. The runner records four CUDA events on its stream
    during each ``infer``: E0 before the host-to-device copy, E1 after it (before the enqueue
    or CUDA-graph launch), E2 after the compute, E3 after the device-to-host copy; it
    synchronizes the stream before returning, so ``last_cuda_timing_ms()`` (called by the
    harness after each timed call, outside the timed interval) can return
    ``{"h2d_ms": E0→E1, "compute_ms": E1→E2, "d2h_ms": E2→E3}`` from
    ``cudaEventElapsedTime``. An optional ``cuda_graph`` attribute says whether the compute
    was a captured CUDA graph. The result's ``gpu_timing`` holds the medians; the host wall
    time stays the headline latency (it is what a caller waits for).

    Args:
        runner: what to time.
        batch: the input, e.g. float32 (N, 3, K, K).
        cfg: how to measure (default :class:`LatencyConfig`).
        name: label for the result (default: the runner's ``name``).
    """
    return measure_interleaved([(runner, batch)], cfg, names=[name] if name else None)[0]


def measure_interleaved(
    cases: Sequence[tuple[Any, np.ndarray]],
    cfg: LatencyConfig | None = None,
    *,
    names: Sequence[str | None] | None = None,
) -> list[LatencyResult]:
    """Latencies of several (runner, batch) cases timed interleaved: :func:`measure_rounds`'s per-engine results."""
    if not cases:
        return []
    return measure_rounds(cases, cfg, names=names).results


ROUNDS_FORMAT = "fixres-deploy/latency-rounds"
ROUNDS_SCHEMA_VERSION = 2  # 2: adaptive round count (``stop``)
ROUND_STATS = ("p50", "p90", "p99", "mean")


@dataclass
class RoundsResult:
    """Engines timed interleaved in rounds: every round's values, for paired ratios.

    Attributes:
        names: the engines, in the order they were given.
        order: the order the engines ran in, per kept round (indices into ``names``).
        round_ms: per statistic (p50, p90, p99, mean of the round's calls) a list of rounds,
            each a list of one value per engine in ms: ``round_ms["p50"][r][i]``.
        round_load: other processes' cores (incl. steal) of each kept round, the most
            contended engine's chunk (empty without load checks).
        rerun_rounds: rounds run again because other processes used the cores during them.
        contended_rounds: kept rounds still above the threshold (the re-run budget ran out).
        results: one :class:`LatencyResult` per engine (percentiles are medians over rounds).
        stop: why the rounds ended: ``{"reason": "fixed" | "resolved" | "max_repeats",
            "unresolved": [[name, name], ...], "rounds_added": n}`` (pairs still undecided at
            the end; rounds run beyond ``repeats``).
        config: the LatencyConfig used (its ``seed`` fixed the orders).
    """

    names: list[str]
    order: list[list[int]]
    round_ms: dict[str, list[list[float]]]
    round_load: list[float]
    rerun_rounds: int
    contended_rounds: int
    results: list[LatencyResult]
    stop: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return len(self.order)

    def per_round(self, i: int, stat: str = "p50") -> list[float]:
        """Engine ``i``'s value of ``stat`` in every kept round (ms)."""
        return [row[i] for row in self.round_ms[stat]]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["results"] = [r.to_dict() for r in self.results]
        return stamp(d, ROUNDS_FORMAT, ROUNDS_SCHEMA_VERSION)

    @classmethod
    def from_dict(cls, d: dict, source: str = "latency rounds") -> RoundsResult:
        check_schema(d, ROUNDS_FORMAT, ROUNDS_SCHEMA_VERSION, source, "Measure again (the sweep does so by itself).")
        d = {k: v for k, v in d.items() if k not in ("format", "schema_version")}
        d["results"] = [LatencyResult.from_dict(r) for r in d["results"]]
        return cls(**d)

    def save(self, path: str | os.PathLike) -> str:
        """The one writer of a rounds file (JSON, atomic)."""
        from fixres_deploy.core.utils import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoundsResult:
        """The one reader of a rounds file."""
        from fixres_deploy.core.utils import read_json

        return cls.from_dict(read_json(path), os.fspath(path))


PairsFn = Callable[[list[float]], Iterable[tuple[int, int]]]


def latency_neighbours(p50_ms: list[float]) -> list[tuple[int, int]]:
    """The default pairs that matter: engines adjacent when sorted by their median p50."""
    order = sorted(range(len(p50_ms)), key=lambda i: p50_ms[i])
    return list(itertools.pairwise(order))


def unresolved_pairs(
    round_p50_ms: Sequence[Sequence[float]], pairs: Iterable[tuple[int, int]], resolve_rel: float, *, seed: int = 0
) -> list[tuple[int, int]]:
    """The pairs whose paired latency ratio is not yet decided.

    A pair is decided when the bootstrap 95% interval of its per-round ratio excludes 1 (one
    engine is faster) or lies inside ``[1 / (1 + resolve_rel), 1 + resolve_rel]`` (the two are
    equal for every purpose that matters).

    Args:
        round_p50_ms: per round, one p50 per engine (``round_ms["p50"]``).
        pairs: engine index pairs to check.
    """
    from fixres_deploy.core.stats import paired_ratio_interval

    if len(round_p50_ms) < 2:
        return [tuple(p) for p in pairs]
    cols = np.asarray(round_p50_ms, dtype=float)
    lo_ok, hi_ok = 1.0 / (1.0 + resolve_rel), 1.0 + resolve_rel
    out = []
    for i, j in pairs:
        if i == j:
            continue
        r = paired_ratio_interval(cols[:, i], cols[:, j], n_boot=1000, seed=seed)
        lo, hi = r["ci"]
        if r["contains_1"] and not (lo >= lo_ok and hi <= hi_ok):
            out.append((int(i), int(j)))
    return out


def measure_rounds(
    cases: Sequence[tuple[Any, np.ndarray]],
    cfg: LatencyConfig | None = None,
    *,
    names: Sequence[str | None] | None = None,
    pairs: PairsFn | None = None,
) -> RoundsResult:
    """Time several (runner, batch) cases in rounds: each once per round, order shuffled per round.

    Comparing engines measured one after the other confounds them with the machine's drift
    (other users, thermal state, page cache); interleaving spreads it over all of them, and
    keeping each round's values lets a ratio between two engines be computed *within* rounds
    (paired), which cancels the drift that a ratio of overall medians still carries. Each case
    gets the full warm-up first; in each of the ``cfg.repeats`` rounds every case runs ``budget_s
    / repeats`` seconds after ``rewarm_iters`` untimed calls (its caches hold another engine's
    weights), in an order drawn from ``cfg.seed``. A round during which other processes used
    more than ``contention_threshold`` cores is run again as a whole (all engines: a paired ratio
    needs both values from the same conditions), at most ``remeasure_if_contended`` times per
    measurement; the least contended attempt is kept and the count is reported.

    With ``cfg.max_repeats`` above ``cfg.repeats``, rounds are added one at a time after the
    first ``repeats`` until every pair that matters is decided (:func:`unresolved_pairs`) or
    ``max_repeats`` rounds ran: as many rounds as the differences need, no more. ``pairs``
    maps the engines' current median p50s to the index pairs that matter (default
    :func:`latency_neighbours`; the sweep passes the Pareto front's neighbours and the naive
    point against the front).
    """
    cfg = cfg or LatencyConfig()
    if not cases:
        raise UserInputError("measure_rounds needs at least one (runner, batch) case")
    names = list(names) if names is not None else [None] * len(cases)
    if len(names) != len(cases):
        raise UserInputError(f"{len(names)} names for {len(cases)} benchmark cases")
    items = [_Case(r, b, cfg, n) for (r, b), n in zip(cases, names)]
    budget = cfg.budget_s / cfg.repeats
    rng = np.random.default_rng(cfg.seed)
    retries = cfg.remeasure_if_contended
    rerun = contended = 0
    orders: list[list[int]] = []
    loads: list[float] = []
    unique = list({id(c.runner): c.runner for c in items}.values())

    def one_round(order: list[int], first: bool) -> list[_Repeat]:
        reps: dict[int, _Repeat] = {}
        for pos, i in enumerate(order):
            if len(items) > 1 and not (first and pos == 0):
                items[i].rewarm()
            reps[i] = items[i].one_repeat(budget)
        return [reps[i] for i in range(len(items))]

    def other(reps: list[_Repeat]) -> float:
        return max(r.other() for r in reps)

    def busy(reps: list[_Repeat]) -> bool:
        return cfg.check_load and other(reps) > cfg.contention_threshold

    with _activated(unique):
        for c in items:
            c.prepare()
        for c in items:
            c.warmup()
        rnd = 0
        while True:
            if rnd >= cfg.repeats:
                if cfg.max_repeats <= cfg.repeats or len(items) < 2:
                    stop = {"reason": "fixed", "unresolved": [], "rounds_added": 0}
                    break
                todo = _open_pairs(items, pairs, cfg)
                if not todo or rnd >= cfg.max_repeats:
                    named = [[str(items[i].name), str(items[j].name)] for i, j in todo]
                    stop = {
                        "reason": "max_repeats" if todo else "resolved",
                        "unresolved": named,
                        "rounds_added": rnd - cfg.repeats,
                    }
                    break
            order = [int(i) for i in rng.permutation(len(items))] if len(items) > 1 else [0]
            reps = one_round(order, rnd == 0)
            while busy(reps) and retries > 0:
                retries -= 1
                rerun += 1
                log.info("round %d: %.2f cores of other load; running it again", rnd, other(reps))
                time.sleep(cfg.remeasure_wait_s)
                again = one_round(order, False)
                reps = again if other(again) < other(reps) else reps
            contended += bool(busy(reps))
            for c, r in zip(items, reps):
                c.kept.append(r)
            orders.append(order)
            loads.append(other(reps))
            rnd += 1
    if stop["reason"] != "fixed":
        log.info("latency rounds: %d (%s)", rnd, stop["reason"])
    for c in items:
        c.remeasured = rerun
    per_engine = [[r.stats_ms for r in c.kept] for c in items]
    round_ms = {s: [[per_engine[i][k][s] for i in range(len(items))] for k in range(len(orders))] for s in ROUND_STATS}
    return RoundsResult(
        names=[str(c.name) for c in items],
        order=orders,
        round_ms=round_ms,
        round_load=loads if cfg.check_load else [],
        rerun_rounds=rerun,
        contended_rounds=contended,
        results=[c.result() for c in items],
        stop=stop,
        config=cfg.to_dict(),
    )


def _open_pairs(items: list[_Case], pairs: PairsFn | None, cfg: LatencyConfig) -> list[tuple[int, int]]:
    rows = [[r.stats_ms["p50"] for r in c.kept] for c in items]
    medians = [float(np.median(r)) for r in rows]
    wanted = (pairs or latency_neighbours)(medians)
    per_round = [list(col) for col in zip(*rows)]
    return unresolved_pairs(per_round, wanted, cfg.resolve_rel, seed=cfg.seed)


# --------------------------------------------------------------------------- machine peak

_PEAK_CACHE: dict[tuple, dict] = {}


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first call allocates and spins up the thread pool
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peak_gflops(*, n: int = 1024, dtype: str = "float32", threads: int | None = None, repeats: int = 5) -> dict:
    """The machine's practical peak: the best GFLOP/s of an n x n matrix product.

    Measured with numpy's BLAS and with ``torch.matmul`` (at ``threads`` torch threads when
    given, restored after); the best of ``repeats`` timed products of each, the higher of the
    two is ``peak_gflops``. It is the yardstick for "% of peak" in benchmark tables: a CNN
    reaching 30-60% of it is doing well on a CPU. Cached per process (per arguments). The
    load during the measurement is recorded: a contended peak is too low.

    Returns:
        dict with peak_gflops, numpy_gflops, torch_gflops (None if unavailable), n, dtype,
        threads, repeats, load.
    """
    key = (int(n), str(dtype), threads, int(repeats))
    if key in _PEAK_CACHE:
        return dict(_PEAK_CACHE[key])
    if n < 16 or repeats < 1:
        raise UserInputError(f"peak measurement needs n >= 16 and repeats >= 1, got n={n}, repeats={repeats}")
    flop = 2.0 * n**3
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {
        "n": int(n),
        "dtype": dtype,
        "threads": threads,
        "repeats": int(repeats),
        "numpy_gflops": None,
        "torch_gflops": None,
    }
    with sysload.LoadMonitor(None) as mon:
        if dtype in ("float32", "float64"):
            a = rng.standard_normal((n, n)).astype(dtype)
            b = rng.standard_normal((n, n)).astype(dtype)
            out["numpy_gflops"] = flop / _best_time(lambda: a @ b, repeats) / 1e9
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None and hasattr(torch, dtype):
            old = torch.get_num_threads()
            if threads:
                torch.set_num_threads(int(threads))
            try:
                ta = torch.from_numpy(rng.standard_normal((n, n)).astype(np.float32)).to(getattr(torch, dtype))
                tb = torch.from_numpy(rng.standard_normal((n, n)).astype(np.float32)).to(getattr(torch, dtype))
                with torch.inference_mode():
                    out["torch_gflops"] = flop / _best_time(lambda: torch.matmul(ta, tb), repeats) / 1e9
                out["torch_num_threads"] = torch.get_num_threads()
            except (RuntimeError, TypeError) as exc:  # e.g. a dtype without a CPU matmul kernel
                log.info("torch peak for %s unavailable: %s", dtype, exc)
            finally:
                torch.set_num_threads(old)
    found = [v for v in (out["numpy_gflops"], out["torch_gflops"]) if v]
    if not found:
        raise UserInputError(f"cannot measure a matrix-product peak for dtype {dtype!r} (use float32)")
    out["peak_gflops"] = max(found)
    out["load"] = mon.result()
    _PEAK_CACHE[key] = out
    return dict(out)


# --------------------------------------------------------------------------- engine benchmarks


@dataclass
class BenchRow:
    """One engine at one (resolution, batch): latency and the work behind it.

    Attributes:
        engine: label (backend/precision or the artifact's name).
        backend, precision, path: what was measured.
        resolution, batch_size: the input shape (batch_size x 3 x resolution x resolution).
        latency: the measurement (None when it failed: see ``error``).
        gflops_per_image: from the ONNX graph at ``resolution`` (None if it could not be counted).
        achieved_gflops: gflops_per_image x throughput_ips.
        pct_peak: achieved_gflops as a percentage of the machine's fp32 matmul peak (an int8
            engine can exceed 100%: the peak is a float32 one).
        error: why this row has no measurement.
    """

    engine: str
    backend: str
    precision: str
    path: str | None
    resolution: int
    batch_size: int
    latency: LatencyResult | None = None
    gflops_per_image: float | None = None
    achieved_gflops: float | None = None
    pct_peak: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency"] = self.latency.to_dict() if self.latency else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BenchRow:
        d = dict(d)
        d["latency"] = LatencyResult.from_dict(d["latency"]) if d.get("latency") else None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class BenchReport:
    """Latency per engine x resolution x batch, with the machine it ran on and its peak."""

    rows: list[BenchRow]
    source: str | None = None
    peak: dict | None = None
    machine: dict = field(default_factory=dict)
    latency_config: dict = field(default_factory=dict)
    created: str = ""

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "created": self.created,
            "machine": self.machine,
            "peak": self.peak,
            "latency_config": self.latency_config,
            "rows": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, d: dict) -> BenchReport:
        return cls(
            rows=[BenchRow.from_dict(r) for r in d.get("rows", [])],
            source=d.get("source"),
            peak=d.get("peak"),
            machine=d.get("machine", {}),
            latency_config=d.get("latency_config", {}),
            created=d.get("created", ""),
        )

    def table(self) -> str:
        """A fixed-width text table, one line per row (and a footer on peak and contention)."""
        head = (
            f"{'engine':<30} {'res':>4} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
            f"{'mean ms':>9} {'img/s':>9} {'GFLOP/img':>9} {'GFLOP/s':>8} {'%peak':>6} {'load':>5} {'cont':>4}"
        )
        lines = [head, "-" * len(head)]

        def num(v, fmt):
            return format(v, fmt) if v is not None else "-"

        for r in self.rows:
            lat = r.latency
            if lat is None:
                err = (r.error or "").splitlines()[0] if r.error else ""
                lines.append(
                    f"{r.engine[:30]:<30} {r.resolution:>4} {r.batch_size:>5}  error: "
                    f"{err[:100]}{'...' if len(err) > 100 else ''}"
                )
                continue
            other = (lat.load or {}).get("other_cores_busy")
            lines.append(
                f"{r.engine[:30]:<30} {r.resolution:>4} {r.batch_size:>5} {lat.latency_p50_ms:>9.3f} "
                f"{lat.latency_p90_ms:>9.3f} {lat.latency_p99_ms:>9.3f} {lat.latency_mean_ms:>9.3f} "
                f"{lat.throughput_ips:>9.1f} {num(r.gflops_per_image, '>9.4g'):>9} {num(r.achieved_gflops, '>8.1f'):>8} "
                f"{num(r.pct_peak, '>6.1f'):>6} {num(other, '>5.2f'):>5} {'YES' if lat.contended else 'no':>4}"
            )
        if self.peak:
            lines.append(
                f"machine peak (fp32 matmul n={self.peak.get('n')}): {self.peak['peak_gflops']:.1f} GFLOP/s; "
                "load = other processes' CPU use in cores; cont = contended (numbers unreliable)"
            )
        return "\n".join(lines)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _random_batch(batch: int, resolution: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, channels, resolution, resolution)).astype(np.float32)


def _onnx_shape_spec(onnx_path: str, resolutions: Sequence[int], batch_sizes: Sequence[int]):
    """The ShapeSpec an ONNX file's input dims allow (dynamic axes cover the requested shapes)."""
    import onnx

    from fixres_deploy.backends.base import ShapeProfile, ShapeSpec
    from fixres_deploy.models.flops import input_dims

    try:
        model = onnx.load(onnx_path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise UserInputError(f"'{onnx_path}' is not a readable ONNX model: {exc}") from exc
    dims = input_dims(model)
    if len(dims) != 4:
        raise UserInputError(f"'{onnx_path}': expected a 4-D image input (N,C,H,W), got dims {dims}")
    lo = [d if isinstance(d, int) else None for d in dims]
    c = lo[1] or 3
    nb = (lo[0], lo[0]) if lo[0] else (1, max(batch_sizes or [8]))
    hs = (lo[2], lo[2]) if lo[2] else (min(resolutions or [lo[3] or 224]), max(resolutions or [lo[3] or 224]))
    ws = (lo[3], lo[3]) if lo[3] else (min(resolutions or [lo[2] or 224]), max(resolutions or [lo[2] or 224]))
    if all(isinstance(d, int) for d in lo):
        return ShapeSpec("fixed", (ShapeProfile(tuple(lo), tuple(lo), tuple(lo)),)), dims, model
    prof = ShapeProfile((nb[0], c, hs[0], ws[0]), (nb[0], c, hs[1], ws[1]), (nb[1], c, hs[1], ws[1]))
    return ShapeSpec("dynamic", (prof,)), dims, model


def _default_resolution(model, dims, onnx_path: str) -> list[int]:
    if isinstance(dims[2], int) and dims[2] == dims[3]:
        return [dims[2]]
    import json

    for prop in model.metadata_props:
        if prop.key in ("preprocess", "fixres_deploy.core.preprocess", "fixres.preprocess"):
            try:
                return [int(json.loads(prop.value)["test_input_size"])]
            except (ValueError, KeyError, TypeError):
                break
    raise UserInputError(f"'{onnx_path}' has dynamic spatial dims and records no preprocessing: pass --resolutions")


def _pick_batches(shapes, resolution: int, requested: Sequence[int] | None) -> list[int]:
    if requested:
        return list(requested)
    ok = []
    for b in (1, 8):
        try:
            shapes.check((b, 3, resolution, resolution))
            ok.append(b)
        except FixResError:
            continue
    return ok or [shapes.profiles[0].opt[0]]


def _check_all(shapes, cases: list[tuple[int, int]], what: str) -> None:
    from fixres_deploy.backends.base import ShapeError

    for res, b in cases:
        try:
            shapes.check((b, 3, res, res))
        except ShapeError as exc:
            raise ShapeError(
                f"{what}: {exc} For an ONNX file the fix is a dynamic export "
                "(fixres-deploy export --dynamic) or its own shape."
            ) from None


def _flops(onnx_path: str | None, resolution: int) -> float | None:
    if not onnx_path or not str(onnx_path).endswith(".onnx") or not os.path.isfile(onnx_path):
        return None
    from fixres_deploy.models.flops import flops_per_image

    try:
        return flops_per_image(onnx_path, resolution).total_gflops
    except (UserInputError, ImportError) as exc:
        log.warning("cannot count FLOPs of %s at %d: %s", onnx_path, resolution, exc)
        return None


def _row(engine, backend, precision, path, res, batch, lat, gflops, peak) -> BenchRow:
    achieved = gflops * lat.throughput_ips if (gflops is not None and lat is not None) else None
    pct = 100.0 * achieved / peak["peak_gflops"] if (achieved is not None and peak) else None
    return BenchRow(
        engine=engine,
        backend=backend,
        precision=precision,
        path=path,
        resolution=res,
        batch_size=batch,
        latency=lat,
        gflops_per_image=gflops,
        achieved_gflops=achieved,
        pct_peak=pct,
    )


@dataclass
class _Plan:
    label: str
    artifact: Any
    flops_onnx: str | None
    cases: list[tuple[int, int]]  # (resolution, batch)
    runner: Any = None
    error: str | None = None


def _run_plans(
    plans: list[_Plan], latency: LatencyConfig, peak: dict | None, interleave: bool, threads: int | None
) -> list[BenchRow]:
    from fixres_deploy.backends.base import load_runner

    rows: list[BenchRow] = []
    measurable: list[tuple[_Plan, int, int]] = []
    if threads and any(p.artifact.backend == "torch" for p in plans):
        import torch

        torch.set_num_threads(int(threads))
    for p in plans:
        if p.error is None:
            # ONNX Runtime sessions take their thread count per session; torch's is global (above).
            opts = {"threads": int(threads)} if threads and p.artifact.backend == "onnxruntime" else {}
            try:
                p.runner = load_runner(p.artifact, **opts)
            except Exception as exc:  # backends raise their own types (ORT Fail, TensorRT, CUDA): one row each
                if len(plans) == 1:
                    raise
                p.error = f"{type(exc).__name__}: {exc}"
        for res, b in p.cases:
            if p.error is None:
                measurable.append((p, res, b))
    art = {id(p): p.artifact for p in plans}
    results: dict[tuple[int, int, int], LatencyResult | str] = {}
    batches = {(res, b): _random_batch(b, res) for _, res, b in measurable}
    if interleave:
        try:
            lats = measure_interleaved(
                [(p.runner, batches[(res, b)]) for p, res, b in measurable],
                latency,
                names=[p.label for p, _, _ in measurable],
            )
            for (p, res, b), lat in zip(measurable, lats):
                results[(id(p), res, b)] = lat
        except Exception as exc:  # one engine failing at run time must not cost the others their rows
            if len(plans) == 1:
                raise
            log.warning("interleaved run failed (%s: %s); measuring engines one by one", type(exc).__name__, exc)
            interleave = False
    if not interleave:
        for p, res, b in measurable:
            try:
                results[(id(p), res, b)] = measure_latency(p.runner, batches[(res, b)], latency, name=p.label)
            except Exception as exc:  # as above: recorded in this engine's row
                if len(plans) == 1:
                    raise
                results[(id(p), res, b)] = f"{type(exc).__name__}: {exc}"
    for p in plans:
        a = art[id(p)]
        for res, b in p.cases:
            r = results.get((id(p), res, b))
            if isinstance(r, LatencyResult):
                rows.append(_row(p.label, a.backend, a.precision, a.path, res, b, r, _flops(p.flops_onnx, res), peak))
            else:
                rows.append(
                    BenchRow(
                        engine=p.label,
                        backend=a.backend,
                        precision=a.precision,
                        path=a.path,
                        resolution=res,
                        batch_size=b,
                        error=r if isinstance(r, str) else p.error,
                    )
                )
    return rows


def _peak_for(peak: bool | dict, threads: int | None) -> dict | None:
    if isinstance(peak, dict):
        return peak
    return measure_peak_gflops(threads=threads) if peak else None


def bench_onnx(
    onnx_path: str,
    *,
    resolutions: Sequence[int] | None = None,
    batch_sizes: Sequence[int] | None = None,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    threads: int | None = None,
    latency: LatencyConfig | None = None,
    peak: bool | dict = True,
    interleave: bool = True,
    work_dir: str | None = None,
) -> BenchReport:
    """Latency of any ONNX file per resolution x batch size, with FLOPs and % of peak.

    A dynamic graph is measured at every requested resolution; a fixed one only at its own
    (asking for another raises ShapeError naming what it accepts). The file is built into an
    engine of ``backend`` by the shared engine routine
    (:func:`fixres_deploy.engines.engine.build_verified_engine`, the checks of ``build``) in
    ``work_dir`` (a temporary folder by default); all shapes are measured interleaved.

    Args:
        onnx_path: the model.
        resolutions: square input sides (default: a fixed graph's own; a dynamic graph's
            recorded preprocessing resolution).
        batch_sizes: default 1 and 8 where the graph allows them.
        backend, precision: the engine to build (``precision`` labels the ONNX variant).
        threads: intra-op threads (ONNX Runtime session, torch).
        latency: measurement settings.
        peak: measure the machine's peak for "% of peak" (or pass a measured dict; False: skip).
        interleave: measure all shapes round-robin (False: one after the other).
        work_dir: where the engine is built.
    """
    from fixres_deploy.backends.base import BuildOptions
    from fixres_deploy.engines.engine import build_verified_engine

    if not os.path.isfile(onnx_path):
        raise UserInputError(f"ONNX file '{onnx_path}' does not exist")
    latency = latency or LatencyConfig()
    spec, dims, model = _onnx_shape_spec(onnx_path, list(resolutions or []), list(batch_sizes or []))
    res_list = list(resolutions) if resolutions else _default_resolution(model, dims, onnx_path)
    cases = [(r, b) for r in res_list for b in _pick_batches(spec, r, batch_sizes)]
    _check_all(spec, cases, f"'{onnx_path}'")
    pk = _peak_for(peak, threads)
    with contextlib.ExitStack() as stack:
        out_dir = work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="fixres-bench-"))
        artifact = build_verified_engine(
            backend,
            onnx_path,
            precision,
            spec,
            BuildOptions(threads=threads, save_optimized=False),
            out_dir=out_dir,
            name=f"bench_{backend}_{precision}",
        )
        plan = _Plan(
            label=f"{backend}/{precision}", artifact=artifact, flops_onnx=onnx_path, cases=cases, error=artifact.error
        )
        if artifact.error:
            raise FixResError(f"building a {backend} engine from '{onnx_path}' failed: {artifact.error}")
        rows = _run_plans([plan], latency, pk, interleave, threads)
        if plan.runner is not None and getattr(plan.runner, "is_active", False):
            plan.runner.deactivate()
    return BenchReport(
        rows=rows,
        source=os.fspath(onnx_path),
        peak=pk,
        machine=env.machine_info(),
        latency_config=latency.to_dict(),
        created=_now(),
    )


def _artifact_label(a) -> str:
    mode = a.shapes.mode if a.shapes is not None else "?"
    res = a.resolutions
    tag = f"@{res[0]}" if mode == "fixed" and res else mode
    return f"{a.backend}/{a.precision}/{tag}"


def bench_artifacts(
    artifacts: Sequence[Any],
    *,
    resolutions: Sequence[int] | None = None,
    batch_sizes: Sequence[int] | None = None,
    threads: int | None = None,
    latency: LatencyConfig | None = None,
    peak: bool | dict = True,
    interleave: bool = True,
    strict_shapes: bool = True,
    source: str | None = None,
    labels: Sequence[str | None] | None = None,
) -> BenchReport:
    """Latency of several built engines, interleaved (see :func:`measure_interleaved`).

    Args:
        artifacts: EngineArtifact objects or their dicts; failed builds become error rows.
        resolutions, batch_sizes: shapes to measure (default: each engine's own shapes; for a
            dynamic engine its profiles' opt resolutions and batch 1 and 8 where accepted).
        strict_shapes: a requested shape an engine cannot take raises ShapeError (True) or is
            skipped for that engine (False, for a mixed set of fixed engines).
        labels: table labels per artifact (default backend/precision/shape).
    """
    from fixres_deploy.backends.base import EngineArtifact, ShapeError

    latency = latency or LatencyConfig()
    plans: list[_Plan] = []
    taken: set[tuple[int, int]] = set()
    refused: dict[tuple[int, int], str] = {}
    labels = list(labels) if labels is not None else [None] * len(artifacts)
    for a, given in zip(artifacts, labels):
        if isinstance(a, dict):
            a = EngineArtifact.from_dict(a)
        label = given or _artifact_label(a)
        if a.error or a.shapes is None:
            opt = a.shapes.profiles[0].opt if a.shapes is not None else (0, 0, 0, 0)
            if not resolutions or opt[2] in resolutions:  # a failed build: one row that says why
                plans.append(
                    _Plan(
                        label,
                        a,
                        None,
                        [(int(opt[2]), int(opt[0]))],
                        error=a.error or "artifact records no input shapes",
                    )
                )
            continue
        res_list = list(resolutions) if resolutions else a.resolutions
        cases = []
        for r in res_list:
            for b in _pick_batches(a.shapes, r, batch_sizes):
                try:
                    a.shapes.check((b, 3, r, r))
                    cases.append((r, b))
                    taken.add((r, b))
                except ShapeError as exc:
                    refused.setdefault((r, b), f"engine {a.path or label}: {exc}")
                    if strict_shapes:
                        raise ShapeError(refused[(r, b)]) from None
        src = a.source_onnx if a.source_onnx and os.path.isfile(a.source_onnx) else a.path
        plans.append(_Plan(label, a, src, cases))
    nowhere = [k for k in refused if k not in taken]
    if nowhere:
        # A shape no engine of the set can take is a user error, not a silent omission.
        raise ShapeError(
            f"no engine accepts batch {nowhere[0][1]} at resolution {nowhere[0][0]}; for example {refused[nowhere[0]]}"
        )
    pk = _peak_for(peak, threads)
    rows = _run_plans(plans, latency, pk, interleave, threads)
    for p in plans:
        if p.runner is not None and getattr(p.runner, "is_active", False):
            p.runner.deactivate()
    return BenchReport(
        rows=rows, source=source, peak=pk, machine=env.machine_info(), latency_config=latency.to_dict(), created=_now()
    )


def bench_index(index_path: str, **kwargs: Any) -> BenchReport:
    """:func:`bench_artifacts` over every engine of a build's index.json.

    Engines that cannot take a requested resolution are skipped (a build usually holds one
    fixed engine per resolution), unless none can.
    """
    from fixres_deploy.engines.build import BuildIndex

    kwargs.setdefault("strict_shapes", False)
    index = BuildIndex.load(index_path)
    artifacts = index.engine_artifacts(include_failed=True)
    labels = [e.get("name") for e in index.artifacts]
    return bench_artifacts(artifacts, source=os.fspath(index_path), labels=labels, **kwargs)
