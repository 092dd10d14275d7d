import numpy as np
import pytest

from fixres_deploy.choose.select import (
    NoFeasiblePointError,
    SelectionConfig,
    headline_figures,
    naive_point,
    pareto_front,
    select_point,
)
from fixres_deploy.fixres.evaluate import pack_bits
from fixres_deploy.sweep.points import SweepPoint

N = 1000


def hits(acc, seed, base=None, flip=0):
    """Per-image hits with accuracy ``acc``; ``base`` + ``flip`` makes paired variants."""
    rng = np.random.default_rng(seed)
    if base is not None:
        out = base.copy()
        idx = rng.choice(N, size=flip, replace=False)
        out[idx] = ~out[idx]
        return out
    out = np.zeros(N, dtype=bool)
    out[rng.choice(N, size=int(round(acc * N)), replace=False)] = True
    return out


def point(res, prec, lat, correct, *, ft=True, batch=1, backend="onnxruntime", mode="fixed", reps=None):
    acc = float(correct.mean())
    return SweepPoint(
        resolution=res,
        precision=prec,
        backend=backend,
        batch_size=batch,
        shape_mode=mode,
        finetuned=ft,
        top1=acc,
        top1_ci=[acc - 0.02, acc + 0.02],
        top5=1.0,
        n=N,
        correct1_bits=pack_bits(correct),
        latency_p50_ms=lat,
        latency_p90_ms=lat * 1.1,
        latency_p99_ms=lat * 1.3,
        throughput_ips=batch * 1000 / lat,
        latency_meta={"repeat_p50_ms": reps or [lat * 0.99, lat, lat * 1.01]},
    )


@pytest.fixture
def grid():
    base = hits(0.80, 0)
    pts = [
        point(64, "fp32", 10.0, base, ft=False),  # 0 naive
        point(96, "fp32", 20.0, hits(0, 1, base=base, flip=0) | hits(0.9, 2)),  # 1 very accurate, slow
        point(96, "int8", 9.0, hits(0, 3, base=base, flip=0) | hits(0.85, 4)),  # 2 accurate, fast
        point(64, "int8", 5.0, hits(0, 5, base=base, flip=40)),  # 3 fastest, noisier
        point(128, "fp32", 35.0, hits(0, 6, base=base, flip=0) | hits(0.85, 7)),  # 4 dominated-ish
    ]
    return pts


def test_pareto_front_excludes_dominated(grid):
    cfg = SelectionConfig()
    front = pareto_front(grid, cfg)
    for i in front:
        for j in range(len(grid)):
            assert not (
                grid[j].latency_p50_ms <= grid[i].latency_p50_ms
                and grid[j].top1 >= grid[i].top1
                and (grid[j].latency_p50_ms < grid[i].latency_p50_ms or grid[j].top1 > grid[i].top1)
            )
    assert 0 not in front  # naive: slower and less accurate than 96 int8
    assert front == sorted(front, key=lambda i: grid[i].latency_p50_ms)


def test_ties_go_to_the_faster_point():
    base = hits(0.90, 11)
    a = point(128, "fp32", 30.0, base)  # best point estimate
    b = point(96, "fp32", 12.0, hits(0, 12, base=base, flip=6))  # within noise of a
    pts = [a, b]
    sel = select_point(pts, SelectionConfig())
    assert abs(a.top1 - b.top1) < 0.01
    assert sel.selected == 1, sel.reason
    assert "not significantly below" in sel.reason and "McNemar" in sel.reason


def test_significant_difference_is_not_a_tie():
    base = hits(0.70, 21)
    better = base | hits(0.3, 22)  # strictly more hits on the same images
    pts = [point(128, "fp32", 30.0, better), point(96, "fp32", 12.0, base)]
    sel = select_point(pts, SelectionConfig())
    assert pts[0].top1 - pts[1].top1 > 0.05
    assert sel.selected == 0


def test_latency_budget_and_infeasible_message(grid):
    sel = select_point(grid, SelectionConfig(latency_budget_ms=9.5))
    assert grid[sel.selected].latency_p50_ms <= 9.5
    with pytest.raises(NoFeasiblePointError, match="fastest is .* at 5.00 ms"):
        select_point(grid, SelectionConfig(latency_budget_ms=1.0))
    with pytest.raises(NoFeasiblePointError, match="most accurate"):
        select_point(grid, SelectionConfig(objective="min_latency", min_top1=0.999))


def test_min_latency_with_drop(grid):
    best = max(p.top1 for p in grid)
    sel = select_point(grid, SelectionConfig(objective="min_latency", max_drop=0.05))
    chosen = grid[sel.selected]
    assert chosen.top1 >= best - 0.05
    assert all(p.latency_p50_ms >= chosen.latency_p50_ms for p in grid if p.top1 >= best - 0.05)


def test_latency_tie_prefers_accuracy():
    base = hits(0.8, 31)
    pts = [point(96, "fp32", 10.0, base | hits(0.2, 32)), point(64, "fp32", 9.9, base)]
    sel = select_point(pts, SelectionConfig(objective="min_latency"))
    assert sel.selected == 0  # 1% faster is inside the measured spread: take the accurate one


def test_throughput_metric_and_batch_filter(grid):
    extra = point(96, "int8", 40.0, hits(0.85, 41), batch=8)  # 200 img/s
    pts = grid + [extra]
    sel = select_point(pts, SelectionConfig(metric="throughput", batch_size=8))
    assert sel.selected == len(grid)
    with pytest.raises(Exception, match="batch size 4"):
        select_point(pts, SelectionConfig(batch_size=4))


def test_headline_figures(grid):
    cfg = SelectionConfig()
    naive = naive_point(grid, 64, backend="onnxruntime", batch_size=1)
    assert naive == 0
    h = headline_figures(grid, naive, cfg)
    gain = h["iso_latency_gain"]
    # best point no slower than naive (10 ms): 96 int8 (9 ms), 64 int8 (5 ms)
    assert gain["point"] == 2 and gain["value"] == pytest.approx(grid[2].top1 - grid[0].top1)
    assert gain["ci"][0] < gain["value"] < gain["ci"][1] and gain["p_value"] < 0.05
    sp = h["iso_accuracy_speedup"]
    assert grid[sp["point"]].top1 >= grid[0].top1 - 0.05
    assert sp["value"] == pytest.approx(10.0 / grid[sp["point"]].latency_p50_ms)
    assert sp["ci"][0] <= sp["value"] <= sp["ci"][1]


def _timed(p: SweepPoint, index: int, rounds_ms, group: str = "g1") -> SweepPoint:
    """Give a point per-round values of an interleaved latency group."""
    rounds_ms = [float(v) for v in rounds_ms]
    p.latency_p50_ms = float(np.median(rounds_ms))
    p.latency_rounds = {"group": group, "index": index, "p50": rounds_ms, "p90": rounds_ms, "p99": rounds_ms}
    p.latency_rounds["mean"] = rounds_ms
    return p


def test_paired_rounds_decide_latency_ties():
    rng = np.random.default_rng(0)
    drift = np.linspace(1.0, 2.0, 10)  # the machine slows down during the measurement
    base = hits(0.8, 51)
    accurate = base | hits(0.2, 52)
    cfg = SelectionConfig(objective="min_latency")
    # 2% faster in every round: the per-round interval excludes 1, so the faster point wins
    # (the relative-tolerance rule alone would have called 2% a tie and taken the accurate one)
    pts = [
        _timed(point(96, "fp32", 10.0, accurate), 0, 10.0 * drift),
        _timed(point(64, "fp32", 9.8, base), 1, 9.8 * drift * rng.uniform(0.998, 1.002, 10)),
    ]
    assert select_point(pts, cfg).selected == 1
    # 10% faster on average but noisy round to round: the interval contains 1, a tie, the accurate one wins
    noisy = 9.0 * drift * rng.choice([0.7, 1.3], size=10)
    pts = [_timed(point(96, "fp32", 10.0, accurate), 0, 10.0 * drift), _timed(point(64, "fp32", 9.0, base), 1, noisy)]
    assert select_point(pts, cfg).selected == 0
    # the same two points timed in different groups are not paired: the spread rule decides
    pts = [
        _timed(point(96, "fp32", 10.0, accurate), 0, 10.0 * drift),
        _timed(point(64, "fp32", 9.8, base), 0, 9.8 * drift, group="g2"),
    ]
    assert select_point(pts, cfg).selected == 0


def test_headline_speedup_interval_from_paired_rounds(grid):
    drift = np.linspace(1.0, 1.5, 8)
    for i, p in enumerate(grid):
        _timed(p, i, p.latency_p50_ms * drift * (1 + 0.01 * np.sin(np.arange(8) + i)))
    h = headline_figures(grid, 0, SelectionConfig())
    sp = h["iso_accuracy_speedup"]
    assert sp["paired"] and sp["ci"][0] < sp["value"] < sp["ci"][1]
    assert sp["value"] == pytest.approx(grid[0].latency_p50_ms / grid[sp["point"]].latency_p50_ms, rel=0.03)
    assert sp["ci"][0] > 1.0  # resolved: faster than naive beyond the noise
