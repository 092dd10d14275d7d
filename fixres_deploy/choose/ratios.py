"""Latency ratios between sweep points, computed per round of the interleaved timing.

Two points timed in the same latency group (:mod:`fixres_deploy.sweep.latency_groups`) have one
value per round each, measured under the same machine state; the ratio of their times is
computed within each round and summarised with a bootstrap interval
(:func:`fixres_deploy.core.stats.paired_ratio_interval`). Points sharing one measurement (the
same graph structure: e.g. FixRes and base weights at one resolution) have ratio exactly 1.

Selection uses it to call two points tied in latency when the interval contains 1; the report
uses it for the speedup over the naive point and between neighbours on the front.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from fixres_deploy.core.stats import paired_ratio_interval
from fixres_deploy.sweep.points import SweepPoint

#: fewer rounds than this give no interval (selection then falls back to the spread rule)
MIN_ROUNDS = 3


def ratio_stat(metric: str, percentile: str) -> str:
    """The per-round statistic a selection compares: the latency percentile, or the mean for throughput."""
    return "mean" if metric == "throughput" else percentile


def paired_ratio(a: SweepPoint, b: SweepPoint, stat: str = "p50", *, seed: int = 0) -> dict | None:
    """Time of ``a`` over time of ``b`` per round, with a 95% interval; None when not paired.

    Not paired: either point has no rounds, they were timed in different groups (other batch
    sizes, other sweeps), or there are fewer than :data:`MIN_ROUNDS` rounds.
    """
    ra, rb = a.latency_rounds, b.latency_rounds
    if not ra or not rb or ra.get("group") != rb.get("group") or stat not in ra or stat not in rb:
        return None
    n = len(ra[stat])
    if n < MIN_ROUNDS or len(rb[stat]) != n:
        return None
    if ra.get("index") == rb.get("index"):
        return {
            "ratio": 1.0,
            "ci": [1.0, 1.0],
            "rounds": n,
            "contains_1": True,
            "level": 0.95,
            "method": "one measurement (same graph structure)",
        }
    return paired_ratio_interval(ra[stat], rb[stat], seed=seed)


def front_neighbour_ratios(points: Sequence[SweepPoint], front: Sequence[int], stat: str) -> list[dict]:
    """For consecutive front points (faster first): how much slower the next one is, with its interval."""
    out = []
    for i, j in itertools.pairwise(front):
        r = paired_ratio(points[j], points[i], stat)
        out.append(
            {
                "faster": i,
                "slower": j,
                "label_faster": points[i].label,
                "label_slower": points[j].label,
                "top1_gain": (points[j].top1 or 0.0) - (points[i].top1 or 0.0),
                "latency_ratio": r,
            }
        )
    return out
