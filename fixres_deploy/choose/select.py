"""Choosing the operating point: Pareto front, constraints, statistical ties, an explanation.

Accuracy differences smaller than the evaluation can resolve are ties: two points evaluated
on the same images are compared with an exact McNemar test on their per-image hits, and a
point whose top-1 is not significantly below the best counts as equally accurate — then the
faster one wins. Latency differences smaller than the measured spread are ties too; then the
more accurate one wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from fixres_deploy.choose.ratios import paired_ratio, ratio_stat
from fixres_deploy.core.errors import FixResError, UserInputError
from fixres_deploy.core.stats import mcnemar_test, paired_diff_interval
from fixres_deploy.sweep.config import SelectionConfig
from fixres_deploy.sweep.points import SweepPoint
from fixres_deploy.sweep.shard import check_one_machine


class NoFeasiblePointError(FixResError):
    """No measured point meets the constraints; the message says what the closest one gives."""


@dataclass
class Selection:
    """The outcome: the chosen point (an index into the input list), the front, the reason."""

    selected: int
    pareto: list[int]
    candidates: list[int]
    reason: str
    alternatives: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- speed helpers


def cost(p: SweepPoint, cfg: SelectionConfig) -> float:
    """Lower is better: latency in ms, or negative throughput."""
    if cfg.metric == "throughput":
        return -float(p.throughput_ips)
    return float(p.latency(cfg.percentile))


def speed_text(p: SweepPoint, cfg: SelectionConfig) -> str:
    if cfg.metric == "throughput":
        return f"{p.throughput_ips:.0f} img/s"
    return f"{p.latency(cfg.percentile):.2f} ms {cfg.percentile}"


def latency_spread_ms(p: SweepPoint, percentile: str = "p50") -> float:
    """The measured uncertainty of a latency figure (ms).

    Uses the spread of per-repeat medians when the harness recorded them, else the
    difference between the requested percentile and the median as a loose proxy.
    """
    meta = p.latency_meta or {}
    reps = meta.get("repeat_p50_ms") or meta.get("per_repeat_p50_ms")
    if reps and len(reps) >= 2:
        return float(max(reps) - min(reps)) / 2
    if p.latency_std_ms is not None and meta.get("iters"):
        return float(p.latency_std_ms) / math.sqrt(max(1, meta["iters"]))
    return 0.0


def latency_tied(a: SweepPoint, b: SweepPoint, cfg: SelectionConfig) -> bool:
    """Whether two points are equally fast as far as the measurement can tell.

    Timed in the same interleaved rounds: tied exactly when the 95% interval of their per-round
    ratio contains 1 (:mod:`fixres_deploy.choose.ratios`). Otherwise (different groups, old
    sweeps): the difference is within ``latency_rel_tie`` or the measured spreads.
    """
    paired = paired_ratio(a, b, ratio_stat(cfg.metric, cfg.percentile))
    if paired is not None:
        return paired["contains_1"]
    ca, cb = abs(cost(a, cfg)), abs(cost(b, cfg))
    tol = max(
        cfg.latency_rel_tie * max(ca, cb),
        latency_spread_ms(a, cfg.percentile) + latency_spread_ms(b, cfg.percentile) if cfg.metric == "latency" else 0.0,
    )
    return abs(ca - cb) <= tol


def accuracy_not_below(a: SweepPoint, ref: SweepPoint, alpha: float) -> tuple[bool, dict]:
    """Is ``a``'s top-1 not significantly below ``ref``'s? (paired McNemar when possible).

    Returns (verdict, test details). Without per-image results (different image sets), it
    falls back to comparing Wilson intervals: not below unless a's upper bound is under
    ref's point estimate.
    """
    ca, cr = a.correct1(), ref.correct1()
    if ca is not None and cr is not None and len(ca) == len(cr):
        t = mcnemar_test(list(ca), list(cr))
        below = t["diff"] < 0 and t["p_value"] < alpha
        return (not below), {"test": "mcnemar", **t}
    upper = (a.top1_ci or [a.top1, a.top1])[1]
    return upper >= ref.top1, {"test": "wilson", "diff": a.top1 - ref.top1}


# --------------------------------------------------------------------------- front


def pareto_front(points: Sequence[SweepPoint], cfg: SelectionConfig, indices: Sequence[int] | None = None) -> list[int]:
    """Indices of the non-dominated points over (speed cost, top-1), sorted by cost.

    A point is dominated when another is at least as fast and at least as accurate, and
    strictly better in one of the two.
    """
    idx = list(indices) if indices is not None else [i for i, p in enumerate(points) if p.ok]
    front = []
    for i in idx:
        pi = points[i]
        dominated = False
        for j in idx:
            if j == i:
                continue
            pj = points[j]
            if (
                cost(pj, cfg) <= cost(pi, cfg)
                and pj.top1 >= pi.top1
                and (cost(pj, cfg) < cost(pi, cfg) or pj.top1 > pi.top1)
            ):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (cost(points[i], cfg), -points[i].top1))


def _target_batch(points: Sequence[SweepPoint], cfg: SelectionConfig) -> int:
    sizes = sorted({p.batch_size for p in points if p.ok})
    if not sizes:
        raise NoFeasiblePointError("no successfully measured point to choose from")
    if cfg.batch_size is None:
        return sizes[0]
    if cfg.batch_size not in sizes:
        raise UserInputError(f"no point was measured at batch size {cfg.batch_size}; measured: {sizes}")
    return cfg.batch_size


def eligible(points: Sequence[SweepPoint], cfg: SelectionConfig) -> list[int]:
    """Indices of measured points at the target batch that pass the filters."""
    batch = _target_batch(points, cfg)
    out = []
    for i, p in enumerate(points):
        if not p.ok or p.batch_size != batch:
            continue
        if cfg.backend and p.backend != cfg.backend:
            continue
        if cfg.shape_mode and p.shape_mode != cfg.shape_mode:
            continue
        if cfg.precision and p.precision != cfg.precision:
            continue
        out.append(i)
    if not out:
        raise NoFeasiblePointError(
            f"no measured point matches batch {batch}, backend {cfg.backend or 'any'}, "
            f"shape mode {cfg.shape_mode or 'any'}, precision {cfg.precision or 'any'}"
        )
    return out


# --------------------------------------------------------------------------- selection


def select_point(points: Sequence[SweepPoint], cfg: SelectionConfig | None = None) -> Selection:
    """Pick the operating point and explain it.

    Raises:
        NoFeasiblePointError: nothing meets the constraints (the message names the closest).
    """
    cfg = cfg or SelectionConfig()
    cand = eligible(points, cfg)
    check_one_machine([points[i] for i in cand], cfg.allow_mixed_machines)  # sharded sweeps: one kind of machine
    front = pareto_front(points, cfg, cand)
    best_acc = max(cand, key=lambda i: (points[i].top1, -cost(points[i], cfg)))

    if cfg.objective == "max_accuracy":
        feasible = cand
        if cfg.metric == "latency" and cfg.latency_budget_ms is not None:
            feasible = [i for i in cand if points[i].latency(cfg.percentile) <= cfg.latency_budget_ms]
            if not feasible:
                fastest = min(cand, key=lambda i: cost(points[i], cfg))
                raise NoFeasiblePointError(
                    f"no point meets the latency budget {cfg.latency_budget_ms:g} ms ({cfg.percentile}, "
                    f"batch {points[cand[0]].batch_size}); the fastest is {points[fastest].label} at "
                    f"{speed_text(points[fastest], cfg)}. Raise the budget or add lower resolutions / int8."
                )
        if cfg.metric == "throughput" and cfg.min_throughput_ips is not None:
            feasible = [i for i in cand if points[i].throughput_ips >= cfg.min_throughput_ips]
            if not feasible:
                fastest = min(cand, key=lambda i: cost(points[i], cfg))
                raise NoFeasiblePointError(
                    f"no point reaches {cfg.min_throughput_ips:g} img/s; the fastest is "
                    f"{points[fastest].label} at {speed_text(points[fastest], cfg)}"
                )
        top = max(feasible, key=lambda i: (points[i].top1, -cost(points[i], cfg)))
        tied, tests = [], {}
        for i in feasible:
            ok, t = accuracy_not_below(points[i], points[top], cfg.alpha)
            if ok:
                tied.append(i)
                tests[i] = t
        chosen = min(tied, key=lambda i: (cost(points[i], cfg), -points[i].top1))
        # within a latency tie, prefer the more accurate
        lat_ties = [i for i in tied if latency_tied(points[i], points[chosen], cfg)]
        chosen = max(lat_ties, key=lambda i: (points[i].top1, -cost(points[i], cfg)))
        constraint = ""
        if cfg.latency_budget_ms is not None and cfg.metric == "latency":
            constraint = f" within the {cfg.latency_budget_ms:g} ms {cfg.percentile} budget"
        elif cfg.min_throughput_ips is not None and cfg.metric == "throughput":
            constraint = f" at >= {cfg.min_throughput_ips:g} img/s"
        p, b = points[chosen], points[top]
        if chosen == top:
            why = f"{p.label} is the most accurate point{constraint} (top-1 {p.top1:.3f}, {speed_text(p, cfg)})."
        else:
            t = tests[chosen]
            why = (
                f"{p.label} is the fastest point{constraint} whose top-1 is not significantly below the "
                f"most accurate one ({b.label}: {b.top1:.3f} vs {p.top1:.3f}, "
                f"{_test_text(t)}); it {'runs at' if cfg.metric == 'throughput' else 'takes'} "
                f"{speed_text(p, cfg)} instead of {speed_text(b, cfg)}."
            )
    else:  # min_latency
        floor = cfg.min_top1
        if cfg.max_drop is not None:
            f2 = points[best_acc].top1 - cfg.max_drop
            floor = f2 if floor is None else max(floor, f2)
        feasible = [i for i in cand if floor is None or points[i].top1 >= floor]
        if not feasible:
            raise NoFeasiblePointError(
                f"no point reaches top-1 {floor:.4f}; the most accurate is {points[best_acc].label} "
                f"at {points[best_acc].top1:.4f}. Lower the floor / allow a larger drop."
            )
        chosen = min(feasible, key=lambda i: (cost(points[i], cfg), -points[i].top1))
        lat_ties = [i for i in feasible if latency_tied(points[i], points[chosen], cfg)]
        chosen = max(lat_ties, key=lambda i: (points[i].top1, -cost(points[i], cfg)))
        p = points[chosen]
        why = (
            f"{p.label} is the fastest point ({speed_text(p, cfg)}) with top-1 >= {floor:.3f} (it has {p.top1:.3f})."
            if floor is not None
            else f"{p.label} is the fastest point ({speed_text(p, cfg)})."
        )
    alternatives = describe_alternatives(points, chosen, front, cfg)
    if alternatives:
        why += " Alternatives on the front: " + "; ".join(a["text"] for a in alternatives) + "."
    return Selection(
        selected=chosen, pareto=front, candidates=cand, reason=why, alternatives=alternatives, config=cfg.to_dict()
    )


def _test_text(t: dict) -> str:
    if t.get("test") == "mcnemar":
        return f"McNemar p = {t['p_value']:.2g} on {t['n']} paired images"
    return "overlapping 95% intervals"


def describe_alternatives(
    points: Sequence[SweepPoint], chosen: int, front: Sequence[int], cfg: SelectionConfig, k: int = 3
) -> list[dict]:
    """The nearest front points on either side of the choice: what they cost and gain."""
    p = points[chosen]
    others = [i for i in front if i != chosen]
    faster = sorted([i for i in others if cost(points[i], cfg) < cost(p, cfg)], key=lambda i: -cost(points[i], cfg))
    slower = sorted([i for i in others if cost(points[i], cfg) >= cost(p, cfg)], key=lambda i: cost(points[i], cfg))
    out = []
    for i in (faster[:1] + slower[:1] + faster[1:2] + slower[1:2])[:k]:
        q = points[i]
        d_pts = (q.top1 - p.top1) * 100
        ratio = abs(cost(q, cfg)) / abs(cost(p, cfg)) if cost(p, cfg) else float("nan")
        if cfg.metric == "throughput":
            speed = f"{ratio:.2f}x the throughput"
        else:
            speed = f"{ratio:.2f}x the latency"
        out.append(
            {
                "index": i,
                "label": q.label,
                "top1_diff_pts": d_pts,
                "speed_ratio": ratio,
                "text": f"{q.label}: {d_pts:+.1f} pts top-1 at {speed}",
            }
        )
    return out


# --------------------------------------------------------------------------- headline figures


def naive_point(
    points: Sequence[SweepPoint], train_res: int, *, backend: str, batch_size: int, shape_mode: str | None = None
) -> int | None:
    """The naive deployment: train resolution, fp32, no fine-tune, same backend and batch."""
    best = None
    for i, p in enumerate(points):
        if (
            p.ok
            and p.resolution == train_res
            and p.precision == "fp32"
            and not p.finetuned
            and p.backend == backend
            and p.batch_size == batch_size
        ):
            if shape_mode is None or p.shape_mode == shape_mode:
                return i
            best = i if best is None else best
    return best


def headline_figures(points: Sequence[SweepPoint], naive: int, cfg: SelectionConfig) -> dict:
    """The iso-latency accuracy gain and the iso-accuracy speedup over the naive point.

    iso_latency_gain: top-1 of the most accurate point no slower than naive (same backend
    and batch; latency ties count as no slower) minus naive top-1, with a paired 95% interval
    and McNemar p. iso_accuracy_speedup: naive latency over the latency of the fastest point
    whose top-1 is not significantly below naive, with the bootstrap interval of the per-round
    ratio when both were timed in the same rounds (``paired``), else one from the measured spreads.
    """
    n = points[naive]
    same = [i for i, p in enumerate(points) if p.ok and p.backend == n.backend and p.batch_size == n.batch_size]
    no_slower = [i for i in same if cost(points[i], cfg) <= cost(n, cfg) or latency_tied(points[i], n, cfg)]
    g = max(no_slower, key=lambda i: (points[i].top1, -cost(points[i], cfg)))
    gp = points[g]
    gain = {"value": gp.top1 - n.top1, "point": g, "label": gp.label, "naive": naive}
    ca, cn = gp.correct1(), n.correct1()
    if ca is not None and cn is not None and len(ca) == len(cn) and g != naive:
        _d, lo, hi = paired_diff_interval(list(ca), list(cn))
        gain.update({"ci": [lo, hi], "p_value": mcnemar_test(list(ca), list(cn))["p_value"]})
    else:
        gain.update({"ci": [0.0, 0.0] if g == naive else None, "p_value": None})

    ok_acc = [i for i in same if accuracy_not_below(points[i], n, cfg.alpha)[0]]
    f = min(ok_acc, key=lambda i: (cost(points[i], cfg), -points[i].top1))
    fp = points[f]
    paired = paired_ratio(n, fp, ratio_stat(cfg.metric, cfg.percentile))
    if paired is not None:  # naive time over point time, per round
        ratio, ci = paired["ratio"], paired["ci"]
    else:
        if cfg.metric == "throughput":
            ratio = fp.throughput_ips / n.throughput_ips
            rel = 0.0
        else:
            la, lb = n.latency(cfg.percentile), fp.latency(cfg.percentile)
            ratio = la / lb
            rel = math.hypot(latency_spread_ms(n, cfg.percentile) / la, latency_spread_ms(fp, cfg.percentile) / lb)
        ci = [ratio * (1 - 1.96 * rel), ratio * (1 + 1.96 * rel)]
    speedup = {
        "value": ratio,
        "ci": ci,
        "paired": paired is not None,
        "point": f,
        "label": fp.label,
        "naive": naive,
        "top1_diff": fp.top1 - n.top1,
    }
    return {"iso_latency_gain": gain, "iso_accuracy_speedup": speedup}
