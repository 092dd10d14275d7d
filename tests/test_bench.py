"""The latency harness, the load monitor, the machine peak and `fixres-deploy bench`.

No assertion depends on how fast or how quiet the (shared) machine is: the harness's
arithmetic — warm-up by count and time, budgets, percentiles, ratios — runs on a virtual clock
that a runner's "sleep" advances exactly (:class:`VirtualClock`); contention handling runs on
scripted loads; the /proc accounting is checked in CPU seconds of processes that burn a fixed
amount of CPU, which no scheduling delay changes. How the harness behaves on a real busy
machine is a benchmark: tools/bench_engines.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import ClassVar

import numpy as np
import pytest

from fixres_deploy.backends.base import Runner, ShapeError, ShapeSpec
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.measure import bench as bench_mod
from fixres_deploy.measure import sysload
from fixres_deploy.measure.bench import (
    BenchReport,
    LatencyConfig,
    LatencyResult,
    RoundsResult,
    measure_interleaved,
    measure_latency,
    measure_peak_gflops,
    measure_rounds,
    unresolved_pairs,
)

BATCH = np.zeros((2, 3, 8, 8), dtype=np.float32)


class VirtualClock:
    """Stands in for the ``time`` module inside the harness: only runners' sleeps advance it."""

    def __init__(self):
        self.ns = 0

    def perf_counter_ns(self) -> int:
        return self.ns

    def perf_counter(self) -> float:
        return self.ns / 1e9

    def monotonic(self) -> float:
        return self.ns / 1e9

    def sleep(self, seconds: float) -> None:
        self.ns += round(seconds * 1e9)

    def __getattr__(self, name):  # strftime etc.: the real module
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch) -> VirtualClock:
    c = VirtualClock()
    monkeypatch.setattr(bench_mod, "time", c)
    return c


class SleepRunner(Runner):
    """A Runner whose inference takes a known time (sleeps), counting its calls."""

    def __init__(self, sleep_s: float, name: str = "sleep", log: list | None = None, **kw):
        super().__init__(**kw)
        self.sleep_s = sleep_s
        self.name = name
        self.calls = 0
        self.log = log
        self.activations = 0

    def activate_impl(self):
        self.activations += 1

    def deactivate_impl(self):
        pass

    def infer_impl(self, x):
        self.calls += 1
        if self.log is not None:
            self.log.append(self.name)
        if self.sleep_s:
            bench_mod.time.sleep(self.sleep_s)  # the virtual clock when the test uses `clock`
        return x.reshape(x.shape[0], -1)[:, :4].copy()


def _cfg(**kw) -> LatencyConfig:
    base = dict(
        warmup_iters=2, warmup_s=0.0, min_iters=3, budget_s=0.2, repeats=2, check_load=False, remeasure_if_contended=0
    )
    return LatencyConfig(**(base | kw))


# --------------------------------------------------------------------------- harness statistics


def test_known_sleep_gives_its_latency_and_ordered_percentiles(clock):
    r = SleepRunner(0.002)
    res = measure_latency(
        r, BATCH, LatencyConfig(warmup_iters=5, warmup_s=0.2, min_iters=5, budget_s=0.6, repeats=3, check_load=False)
    )
    # every call took exactly 2 ms of the clock
    assert res.latency_min_ms == res.latency_p50_ms == res.latency_p99_ms == res.latency_max_ms == pytest.approx(2.0)
    assert res.latency_min_ms <= res.latency_p50_ms <= res.latency_p90_ms <= res.latency_p99_ms <= res.latency_max_ms
    assert res.latency_std_ms == pytest.approx(0.0, abs=1e-9)
    assert res.repeats == 3 and len(res.latency_p50_repeats_ms) == 3
    assert res.latency_p50_ms == pytest.approx(float(np.median(res.latency_p50_repeats_ms)))
    assert res.batch_size == 2 and res.resolution == 8
    assert res.throughput_ips == pytest.approx(1000.0) and res.throughput_wall_ips == pytest.approx(1000.0)
    # warm-up until both 5 calls and 0.2 s: 0.2 s / 2 ms = 100 calls
    assert res.warmup_iters in (100, 101) and res.warmup_s == pytest.approx(res.warmup_iters * 0.002)
    # the 0.6 s budget split over 3 repeats: 100 calls of 2 ms each
    assert res.iters == 300 and res.latency_p50_repeats_ms == pytest.approx([2.0, 2.0, 2.0])
    assert clock.perf_counter() == pytest.approx(res.warmup_s + 0.6)  # nothing but warm-up and timed calls
    # every call was either warm-up or timed
    assert r.calls == res.warmup_iters + res.iters
    assert not r.is_active and r.activations == 1  # activated for the measurement, then released


def test_warmup_count_and_time_both_required(clock):
    by_count = measure_latency(SleepRunner(0.002), BATCH, _cfg(warmup_iters=40, warmup_s=0.001))
    assert by_count.warmup_iters == 40 and by_count.warmup_s == pytest.approx(40 * 0.002)
    by_time = measure_latency(SleepRunner(0.002), BATCH, _cfg(warmup_iters=1, warmup_s=0.15))
    # 0.15 s of 2 ms calls: 75, or 76 where the float difference of two clock readings rounds below 0.15
    assert by_time.warmup_iters in (75, 76) and by_time.warmup_s == pytest.approx(by_time.warmup_iters * 0.002)


def test_min_and_max_iters_override_the_budget(clock):
    slow = measure_latency(SleepRunner(0.02), BATCH, _cfg(min_iters=4, budget_s=0.01, repeats=2))
    assert slow.iters == 8  # min_iters per repeat wins over a too-small budget
    fast = measure_latency(SleepRunner(0.0), BATCH, _cfg(min_iters=3, max_iters=50, budget_s=30.0, repeats=2))
    assert fast.iters == 100  # max_iters per repeat stops a 30 s budget ...
    assert clock.perf_counter() == pytest.approx(slow.latency_mean_ms * (slow.iters + slow.warmup_iters) / 1e3)
    # ... of which no time passed at all: the count alone ended each repeat


def test_any_runner_shape_predict_callable_and_errors():
    seen = []

    class PredictOnly:
        def predict(self, x):
            seen.append(x.shape)
            return x

    assert measure_latency(PredictOnly(), BATCH, _cfg()).iters >= 6 and seen[0] == BATCH.shape
    assert measure_latency(lambda x: x.sum(), BATCH, _cfg(), name="fn").name == "fn"
    with pytest.raises(UserInputError, match="no infer"):
        measure_latency(object(), BATCH, _cfg())
    fixed = SleepRunner(0.0, shapes=ShapeSpec.fixed(1, 8))
    with pytest.raises(ShapeError, match="outside"):
        measure_latency(fixed, BATCH, _cfg())  # batch 2 on a batch-1 engine
    active = SleepRunner(0.0).activate()
    measure_latency(active, BATCH, _cfg())
    assert active.is_active  # the caller's activation is left alone


def test_result_round_trips_through_json():
    res = measure_latency(SleepRunner(0.001), BATCH, _cfg(percentiles=(50, 75, 99)))
    assert set(res.percentiles_ms) == {"p50", "p75", "p90", "p99"}
    back = LatencyResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back == res
    assert LatencyConfig.from_dict(res.config) == LatencyConfig.from_dict(_cfg(percentiles=(50, 75, 99)).to_dict())


def test_config_validation_and_presets():
    with pytest.raises(UserInputError):
        LatencyConfig(repeats=0)
    with pytest.raises(UserInputError):
        LatencyConfig(min_iters=10, max_iters=5)
    with pytest.raises(UserInputError):
        LatencyConfig(percentiles=(50, 101))
    with pytest.raises(TypeError):
        LatencyConfig(10)  # keyword-only
    q, t = LatencyConfig.quick(), LatencyConfig.thorough(repeats=7)
    assert q.budget_s < LatencyConfig().budget_s < t.budget_s and t.repeats == 7


def _chunks(log: list[str]) -> list[list]:
    runs: list[list] = []
    for name in log:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return runs


def test_interleaved_rounds_every_engine_once_per_round_in_shuffled_order(clock):
    log: list[str] = []
    runners = [SleepRunner(0.001 * (k + 1), name, log) for k, name in enumerate("ABC")]
    cfg = _cfg(warmup_iters=3, min_iters=3, max_iters=3, repeats=6, rewarm_iters=2, seed=3)
    rr = measure_rounds([(r, BATCH) for r in runners], cfg)
    # warm-up A, B, C; then per round each engine once, in that round's order: one chunk of 3
    # timed calls after a re-warm-up of 2 (except the very first chunk, which follows the warm-ups)
    assert len(rr.order) == 6 and all(sorted(o) == [0, 1, 2] for o in rr.order)
    expected = ["A"] * 3 + ["B"] * 3 + ["C"] * 3
    for k, order in enumerate(rr.order):
        for pos, i in enumerate(order):
            expected += ["ABC"[i]] * (3 if k == pos == 0 else 5)
    assert log == expected
    assert len({tuple(o) for o in rr.order}) > 1  # shuffled, not round robin
    # the same seed gives the same plan; the values are the runners' sleeps, per round
    again = measure_rounds([(r, BATCH) for r in runners], cfg)
    assert again.order == rr.order
    assert rr.per_round(2, "p50") == pytest.approx([3.0] * 6) and rr.per_round(0, "mean") == pytest.approx([1.0] * 6)
    ra, _rb, rc = rr.results
    assert rc.latency_p50_ms / ra.latency_p50_ms == pytest.approx(3.0) and ra.iters == 18 and ra.repeats == 6
    assert measure_interleaved([(r, BATCH) for r in runners], cfg)[1].latency_p50_ms == pytest.approx(2.0)


def test_rounds_result_saves_and_refuses_another_version(clock, tmp_path):
    rr = measure_rounds([(SleepRunner(0.001, "A"), BATCH), (SleepRunner(0.002, "B"), BATCH)], _cfg(repeats=3))
    path = rr.save(tmp_path / "rounds.json")
    back = RoundsResult.load(path)
    assert back.order == rr.order and back.round_ms == rr.round_ms and back.results[1].name == "B"
    doc = json.loads(open(path).read())
    doc["schema_version"] = 99
    (tmp_path / "old.json").write_text(json.dumps(doc))
    with pytest.raises(UserInputError, match="schema_version 99"):
        RoundsResult.load(tmp_path / "old.json")


def test_a_contended_round_is_run_again_as_a_whole(clock, monkeypatch):
    """Contention in one engine's chunk re-runs the whole round: both values of a pair share conditions."""
    monkeypatch.setattr(sysload, "LoadMonitor", ScriptedLoad)
    # round 1: A quiet, B contended -> re-run (A, B quiet); round 2 quiet; round 3: contended, budget used up
    monkeypatch.setattr(ScriptedLoad, "loads", [0.1, 1.5, 0.1, 0.2, 0.1, 0.1, 0.9, 0.1])
    log: list[str] = []
    cfg = _cfg(
        check_load=True, repeats=3, contention_threshold=0.5, remeasure_if_contended=1, remeasure_wait_s=0.1, seed=0
    )
    rr = measure_rounds([(SleepRunner(0.001, "A", log), BATCH), (SleepRunner(0.002, "B", log), BATCH)], cfg)
    assert ScriptedLoad.loads == []  # 4 rounds of 2 monitored chunks
    assert rr.rerun_rounds == 1 and rr.contended_rounds == 1 and rr.rounds == 3
    assert rr.round_load == pytest.approx([0.2, 0.1, 0.9])
    assert all(r.remeasured == 1 for r in rr.results) and sum(r.contended for r in rr.results) == 1


class NoisyRunner(SleepRunner):
    """Sleeps ``sleep_s`` times a seeded random factor per call (sd ``noise``): a jittery engine."""

    def __init__(self, sleep_s: float, name: str, noise: float, seed: int):
        super().__init__(sleep_s, name)
        self.base, self.noise, self.rng = sleep_s, noise, np.random.default_rng(seed)

    def infer_impl(self, x):
        self.sleep_s = self.base * max(0.2, 1.0 + self.noise * self.rng.standard_normal())
        return super().infer_impl(x)


def _noisy_rounds(specs, *, pairs=None, **kw):
    runners = [NoisyRunner(ms / 1e3, name, noise, seed) for seed, (name, ms, noise) in enumerate(specs)]
    cfg = _cfg(min_iters=3, max_iters=3, repeats=4, rewarm_iters=0, seed=1, **kw)
    return measure_rounds([(r, BATCH) for r in runners], cfg, pairs=pairs)


def test_rounds_are_added_until_the_pairs_that_matter_are_decided(clock):
    # a 2x difference is decided by the first rounds: no extra round
    clear = _noisy_rounds([("A", 1.0, 0.05), ("B", 2.0, 0.05)], max_repeats=40)
    assert clear.rounds == 4 and clear.stop == {"reason": "resolved", "unresolved": [], "rounds_added": 0}
    # 4% apart under 10% per-call jitter: more rounds, until the interval excludes 1
    close = _noisy_rounds([("A", 1.0, 0.1), ("B", 1.04, 0.1)], max_repeats=80)
    assert 10 < close.rounds < 80 and close.stop["reason"] == "resolved"
    assert close.stop["rounds_added"] == close.rounds - 4
    assert unresolved_pairs(close.round_ms["p50"], [(0, 1)], 0.03, seed=1) == []  # as the harness decided
    # the same pair with the cap at 5 rounds: stops there and says which pair is undecided
    capped = _noisy_rounds([("A", 1.0, 0.1), ("B", 1.04, 0.1)], max_repeats=5)
    assert capped.rounds == 5
    assert capped.stop == {"reason": "max_repeats", "unresolved": [["A", "B"]], "rounds_added": 1}
    # identical engines without jitter: equal within resolve_rel, decided at once
    same = _noisy_rounds([("A", 1.0, 0.0), ("B", 1.0, 0.0)], max_repeats=40)
    assert same.rounds == 4 and same.stop["reason"] == "resolved"
    # off (max_repeats 0): exactly `repeats` rounds whatever the pairs
    fixed = _noisy_rounds([("A", 1.0, 0.1), ("B", 1.04, 0.1)])
    assert fixed.rounds == 4 and fixed.stop["reason"] == "fixed"


def test_only_the_pairs_given_decide_the_round_count(clock):
    specs = [("A", 1.0, 0.1), ("B", 1.03, 0.1), ("C", 3.0, 0.1)]
    # A vs B is undecided after 4 rounds; when only A vs C matters, no round is added
    just_ac = _noisy_rounds(specs, max_repeats=6, pairs=lambda med: [(0, 2)])
    assert just_ac.rounds == 4 and just_ac.stop["reason"] == "resolved"
    neighbours = _noisy_rounds(specs, max_repeats=6)  # default: neighbours in latency, A-B among them
    assert neighbours.rounds == 6 and ["A", "B"] in neighbours.stop["unresolved"]


def test_rewarm_lasts_its_time_as_well_as_its_calls(clock):
    """A fast engine is re-warmed for rewarm_s after another engine ran, not just rewarm_iters calls."""
    log: list[str] = []
    runners = [SleepRunner(0.001, "A", log), SleepRunner(0.001, "B", log)]
    cfg = _cfg(warmup_iters=1, min_iters=2, max_iters=2, repeats=2, rewarm_iters=2, rewarm_s=0.0095, seed=0)
    measure_rounds([(r, BATCH) for r in runners], cfg)
    chunks = [n for _, n in _chunks(log)]
    # warm-ups (1 call each), then 4 chunks: the very first has no re-warm (2 calls), the others
    # 10 re-warm calls (9.5 ms in 1 ms calls, more than rewarm_iters) + 2 timed
    assert chunks == [1, 1, 2, 12, 12, 12]


def test_adaptive_round_settings_are_checked():
    with pytest.raises(UserInputError, match="max_repeats"):
        LatencyConfig(repeats=5, max_repeats=3)
    with pytest.raises(UserInputError, match="resolve_rel"):
        LatencyConfig(resolve_rel=-0.1)
    assert LatencyConfig.quick(repeats=20).max_repeats == 20  # the cap follows the rounds asked for
    assert LatencyConfig.thorough().max_repeats > LatencyConfig.thorough().repeats


def test_gpu_timing_hook_protocol():
    """The harness side of the CUDA-event hook (the TensorRT runner implements the GPU side)."""

    class HookRunner(SleepRunner):
        cuda_timing = True
        cuda_graph = True

        def last_cuda_timing_ms(self):
            return {"h2d_ms": 0.1, "compute_ms": 1.0 + (self.calls % 2), "d2h_ms": 0.05}

    res = measure_latency(HookRunner(0.0), BATCH, _cfg(min_iters=5, max_iters=5, repeats=2))
    g = res.gpu_timing
    assert g["calls"] == 10 and g["cuda_graph"] is True
    assert g["h2d_ms"] == pytest.approx(0.1) and g["d2h_ms"] == pytest.approx(0.05)
    assert g["compute_ms"] in (1.0, 1.5, 2.0)
    # device latency: p50 of h2d + compute + d2h per call, beside the host p50
    assert min(abs(res.latency_device_p50_ms - v) for v in (1.15, 1.65, 2.15)) < 1e-9
    plain = measure_latency(SleepRunner(0.0), BATCH, _cfg())
    assert plain.gpu_timing is None and plain.latency_device_p50_ms is None


@pytest.mark.gpu
def test_cuda_event_hook_with_a_torch_cuda_runner():
    """The hook protocol on a real GPU: CUDA events around H2D, compute and D2H."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    class CudaRunner(Runner):
        name = "torch-cuda-events"
        cuda_timing = True
        cuda_graph = False

        def activate_impl(self):
            self.model = torch.nn.Conv2d(3, 64, 3, padding=1).cuda().eval()
            self.stream = torch.cuda.Stream()
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]

        def infer_impl(self, x):
            e = self.events
            host = torch.from_numpy(x).pin_memory()
            with torch.cuda.stream(self.stream), torch.inference_mode():
                e[0].record(self.stream)
                dev = host.to("cuda", non_blocking=True)
                e[1].record(self.stream)
                y = self.model(dev)
                e[2].record(self.stream)
                out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
                out.copy_(y, non_blocking=True)
                e[3].record(self.stream)
            self.stream.synchronize()
            return out.numpy()

        def last_cuda_timing_ms(self):
            e = self.events
            return {
                "h2d_ms": e[0].elapsed_time(e[1]),
                "compute_ms": e[1].elapsed_time(e[2]),
                "d2h_ms": e[2].elapsed_time(e[3]),
            }

        def deactivate_impl(self):
            self.model = None

    res = measure_latency(
        CudaRunner(), np.ones((8, 3, 224, 224), np.float32), _cfg(min_iters=10, budget_s=0.5, warmup_iters=5)
    )
    g = res.gpu_timing
    assert g["calls"] == res.iters
    assert g["h2d_ms"] > 0 and g["compute_ms"] > 0 and g["d2h_ms"] > 0
    # device time is part of what the caller waited for
    assert g["h2d_ms"] + g["compute_ms"] + g["d2h_ms"] <= res.latency_p50_ms * 1.2


def test_threads_recorded_from_an_onnxruntime_session(tmp_path):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(
        torch.nn.Conv2d(3, 4, 3).eval(),
        torch.randn(1, 3, 8, 8),
        path,
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
    )

    class OrtRunner(Runner):
        name = "ort-test"

        def activate_impl(self):
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

        def infer_impl(self, x):
            return self.session.run(None, {"input": x})[0]

        def deactivate_impl(self):
            self.session = None

    res = measure_latency(OrtRunner(), np.ones((1, 3, 8, 8), np.float32), _cfg())
    assert res.threads["ort_intra_op_num_threads"] == 1
    assert res.threads["ort_providers"] == ["CPUExecutionProvider"]
    assert res.threads["torch_num_threads"] == torch.get_num_threads()
    assert res.latency_p50_ms > 0


# --------------------------------------------------------------------------- load monitor

BURN = "import time\nwhile time.process_time() < {cpu_s}:\n    pass\n"


def _cpu_seconds(load: dict, key: str) -> float:
    return load[key] * load["elapsed_s"]


def _start_detached_burner(cpu_s: float) -> int:
    """A process that burns ``cpu_s`` of CPU and is not our descendant (its parent exits)."""
    code = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {BURN.format(cpu_s=cpu_s)!r}], stdin=subprocess.DEVNULL, "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def _wait_gone(pid: int, timeout_s: float = 120.0) -> None:
    """Until ``pid`` has exited (gone, or a zombie nobody reaps)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return
        if stat[stat.rindex(b")") + 2 :].startswith(b"Z"):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"the burner {pid} did not finish within {timeout_s} s")


linux_only = pytest.mark.skipif(not sysload.supported(), reason="needs Linux /proc")


@linux_only
def test_our_children_count_as_ours_not_as_other():
    # CPU seconds, not rates: the child burns 0.5 s of CPU however long the machine makes it wait
    burn = [sys.executable, "-c", BURN.format(cpu_s=0.5)]
    with sysload.LoadMonitor(0.05) as inc:
        subprocess.run(burn, check=True)  # reaped inside the block: counted through cutime
    child = subprocess.Popen([sys.executable, "-c", BURN.format(cpu_s=30)])
    try:
        c0 = sysload._proc_times(str(child.pid))[0]
        with sysload.LoadMonitor(0.05) as live:  # ended while the child still runs
            while sysload._proc_times(str(child.pid))[0] - c0 < 0.3:
                time.sleep(0.05)
        c1 = sysload._proc_times(str(child.pid))[0]
    finally:
        child.kill()
        child.wait()
    with sysload.LoadMonitor(None, include_children=False) as exc:
        subprocess.run(burn, check=True)
    r_inc, r_live, r_exc = inc.result(), live.result(), exc.result()
    assert _cpu_seconds(r_inc, "our_cores_busy") >= 0.45
    assert c1 - c0 >= 0.3 and _cpu_seconds(r_live, "our_cores_busy") >= 0.3 - 0.05  # a live descendant
    assert _cpu_seconds(r_exc, "our_cores_busy") < 0.3  # we only waited
    assert _cpu_seconds(r_exc, "other_cores_busy") >= 0.4  # not counted as ours: someone else's load
    assert r_inc["total_cores"] == sysload.total_cores() and sysload.snapshot() is not None


@linux_only
def test_other_processes_cpu_counts_as_other_load():
    with sysload.LoadMonitor(0.05) as mon:
        _wait_gone(_start_detached_burner(0.5))
    r = mon.result()
    assert _cpu_seconds(r, "other_cores_busy") >= 0.4  # the whole machine's busy time includes it
    assert _cpu_seconds(r, "our_cores_busy") < 0.3
    assert r["max_other_cores"] >= r["other_cores_busy"] - 1e-9 and r["samples"] >= 1


class ScriptedLoad:
    """Stands in for sysload.LoadMonitor: each timed repeat sees the next scripted foreign load."""

    loads: ClassVar[list[float]] = []

    def __init__(self, interval_s=None, **kw):
        self.other = None

    def start(self):
        self.other = ScriptedLoad.loads.pop(0)

    def stop(self):
        pass

    def result(self):
        o = self.other
        return {
            "elapsed_s": 1.0,
            "machine_cores_busy": o + 1.0,
            "our_cores_busy": 1.0,
            "other_cores_busy": o,
            "steal_cores": 0.0,
            "total_cores": 2,
            "samples": 1,
            "max_other_cores": o,
        }


@pytest.mark.parametrize(
    "loads,contended,remeasured,kept",
    [
        ([0.1, 0.05], False, 0, [0.1, 0.05]),  # quiet: measured once each
        ([1.5, 0.1, 0.2], False, 1, [0.1, 0.2]),  # a contended repeat measured again, the quieter kept
        ([1.5, 1.2, 1.4], True, 1, [1.2, 1.4]),  # retries used up: the least contended kept, flagged
    ],
)
def test_contended_repeats_are_measured_again_then_flagged(clock, monkeypatch, loads, contended, remeasured, kept):
    monkeypatch.setattr(sysload, "LoadMonitor", ScriptedLoad)
    monkeypatch.setattr(ScriptedLoad, "loads", list(loads))
    res = measure_latency(
        SleepRunner(0.002),
        BATCH,
        _cfg(check_load=True, repeats=2, contention_threshold=0.5, remeasure_if_contended=1, remeasure_wait_s=0.5),
    )
    assert res.contended is contended and res.remeasured == remeasured
    assert res.load_per_repeat == pytest.approx(kept)
    assert res.load["other_cores_busy"] == pytest.approx(sum(kept) / len(kept))
    assert res.load["max_other_cores"] == pytest.approx(max(kept))
    assert ScriptedLoad.loads == []  # exactly one monitored run per repeat and retry


def test_load_monitor_off_linux_returns_none(monkeypatch):
    monkeypatch.setattr(sysload, "supported", lambda: False)
    with sysload.LoadMonitor() as mon:
        pass
    assert mon.result() is None and sysload.snapshot() is None
    assert not sysload.contention(None, 0.3)
    res = measure_latency(SleepRunner(0.0), BATCH, _cfg(check_load=True))
    assert res.load is None and not res.contended


# --------------------------------------------------------------------------- peak


def test_peak_gflops_positive_and_cached(monkeypatch):
    p = measure_peak_gflops(n=384, repeats=2)
    assert p["peak_gflops"] > 0 and p["n"] == 384 and p["repeats"] == 2
    assert p["peak_gflops"] == max(v for v in (p["numpy_gflops"], p["torch_gflops"]) if v)
    # a second call is served from the cache: nothing is timed again
    monkeypatch.setattr(bench_mod, "_best_time", lambda *a: pytest.fail("measured again"))
    assert measure_peak_gflops(n=384, repeats=2) == p
    with pytest.raises(UserInputError):
        measure_peak_gflops(n=8)


# --------------------------------------------------------------------------- CLI


class _Tiny:
    @staticmethod
    def export(path, *, dynamic: bool, res: int = 16):
        import torch

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
                self.fc = torch.nn.Linear(8, 5)

            def forward(self, x):
                return self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))

        torch.manual_seed(0)
        torch.onnx.export(
            M().eval(),
            torch.randn(1, 3, res, res),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N"}} if dynamic else None,
        )
        return str(path)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    d = tmp_path_factory.mktemp("bench_cli")
    return {
        "dynamic": _Tiny.export(d / "dyn.onnx", dynamic=True),
        "fixed": _Tiny.export(d / "fixed.onnx", dynamic=False),
        "dir": d,
    }


def _cli(argv, capsys):
    from fixres_deploy.cli.app import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_bench_json_on_a_dynamic_onnx(onnx_files, capsys, tmp_path):
    from fixres_deploy.models.flops import count_flops

    out = tmp_path / "report.json"
    rc, stdout, _ = _cli(
        [
            "bench",
            "--onnx",
            onnx_files["dynamic"],
            "--resolutions",
            "16,24",
            "--batch-sizes",
            "1,2",
            "--preset",
            "quick",
            "--repeats",
            "2",
            "--json",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert rc == 0
    d = json.loads(stdout)
    assert json.loads(out.read_text()) == d
    rows = d["rows"]
    assert [(r["resolution"], r["batch_size"]) for r in rows] == [(16, 1), (16, 2), (24, 1), (24, 2)]
    assert d["peak"]["peak_gflops"] > 0
    for r in rows:
        lat = r["latency"]
        assert r["error"] is None and lat["repeats"] == 2 and lat["batch_size"] == r["batch_size"]
        assert 0 < lat["latency_p50_ms"] <= lat["latency_p99_ms"]
        assert r["gflops_per_image"] == pytest.approx(count_flops(onnx_files["dynamic"], r["resolution"]).total_gflops)
        assert r["achieved_gflops"] == pytest.approx(r["gflops_per_image"] * lat["throughput_ips"])
        assert r["pct_peak"] == pytest.approx(100 * r["achieved_gflops"] / d["peak"]["peak_gflops"])
        assert "other_cores_busy" in lat["load"] and "ort_intra_op_num_threads" in lat["threads"]
    table = BenchReport.from_dict(d).table()
    assert "GFLOP/s" in table and len(table.splitlines()) == 2 + 4 + 1


def test_cli_bench_fixed_onnx_own_shape_and_refusal(onnx_files, capsys):
    rc, stdout, _ = _cli(
        ["bench", "--onnx", onnx_files["fixed"], "--preset", "quick", "--no-peak", "--threads", "1"], capsys
    )
    assert rc == 0
    lines = [ln for ln in stdout.splitlines() if ln.startswith("onnxruntime/fp32")]
    assert len(lines) == 1 and lines[0].split()[1:3] == ["16", "1"]  # its own resolution and batch
    rc, _, err = _cli(
        ["bench", "--onnx", onnx_files["fixed"], "--resolutions", "24", "--preset", "quick", "--no-peak"], capsys
    )
    assert rc == 2
    assert "fixed-shape" in err and "[1, 3, 24, 24]" in err and "[1, 3, 16, 16]" in err
    rc, _, err = _cli(["bench", "--onnx", str(onnx_files["dir"] / "missing.onnx"), "--no-peak"], capsys)
    assert rc == 2 and "does not exist" in err


def test_cli_bench_engine_index(onnx_files, capsys, tmp_path):
    from fixres_deploy.backends.base import BuildOptions, build_engine

    arts = [
        build_engine(
            "onnxruntime",
            onnx_files["dynamic"],
            ShapeSpec.fixed(1, r),
            BuildOptions(save_optimized=False),
            out_dir=str(tmp_path / "engines"),
            precision="fp32",
            name=f"e{r}",
        )
        for r in (16, 24)
    ]
    from fixres_deploy.engines.build import BuildIndex

    failed = dict(arts[0].to_dict(), error="simulated failed build", path=None, name="failed")
    entries = [a.to_dict() | {"name": f"e{i}"} for i, a in enumerate(arts)] + [failed]
    index = tmp_path / "index.json"
    BuildIndex(source_onnx=onnx_files["dynamic"], source_sha256="", out_dir=str(tmp_path), artifacts=entries).save(
        index
    )
    rc, stdout, _ = _cli(["bench", "--engine-index", str(index), "--preset", "quick", "--no-peak", "--json"], capsys)
    assert rc == 0
    rows = json.loads(stdout)["rows"]
    ok = [(r["resolution"], r["batch_size"]) for r in rows if r["error"] is None]
    assert ok == [(16, 1), (24, 1)]
    assert any(r["error"] == "simulated failed build" for r in rows)
    rc, stdout, _ = _cli(
        ["bench", "--engine-index", str(index), "--resolutions", "24", "--preset", "quick", "--no-peak", "--json"],
        capsys,
    )
    assert rc == 0
    assert [r["resolution"] for r in json.loads(stdout)["rows"] if r["error"] is None] == [24]
    rc, _, err = _cli(["bench", "--engine-index", str(index), "--resolutions", "40", "--no-peak"], capsys)
    assert rc == 2 and "no engine accepts" in err
