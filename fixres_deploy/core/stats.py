"""Statistics for the figures that decide: Wilson intervals, paired accuracy tests, paired latency ratios (no scipy)."""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default 95%).

    Better than the normal approximation near 0 and 1 and for small n; for n = 0 it is the
    uninformative [0, 1].
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n trials under p = 0.5."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    # log-space sum for large n
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(0, k + 1)
    ]
    m = max(log_terms)
    tail = math.exp(m) * sum(math.exp(t - m) for t in log_terms)
    return min(1.0, 2.0 * tail)


def mcnemar_test(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Paired test of two classifiers on the same images (exact McNemar).

    Only the discordant pairs carry information: b = A right & B wrong, c = A wrong & B right.
    Under "same accuracy", b ~ Binomial(b + c, 1/2).

    Returns:
        dict with ``b``, ``c``, ``n``, ``p_value`` and ``diff`` (accuracy of A minus B).
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired test needs equal lengths, got {len(correct_a)} and {len(correct_b)}")
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    n = len(correct_a)
    return {
        "b": b,
        "c": c,
        "n": n,
        "p_value": _binom_two_sided(b, b + c),
        "diff": (b - c) / n if n else 0.0,
    }


def paired_diff_interval(
    correct_a: Sequence[bool], correct_b: Sequence[bool], z: float = Z95
) -> tuple[float, float, float]:
    """Difference of paired accuracies A - B with a normal-approximation interval.

    Returns:
        (diff, lo, hi) as fractions.
    """
    n = len(correct_a)
    if n == 0 or n != len(correct_b):
        raise ValueError("paired interval needs two equal, non-empty sequences")
    d = [float(x) - float(y) for x, y in zip(correct_a, correct_b)]
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / max(1, n - 1)
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half


def paired_ratio_interval(
    num_ms: Sequence[float], den_ms: Sequence[float], *, n_boot: int = 4000, seed: int = 0, level: float = 0.95
) -> dict:
    """Ratio of two engines' times measured in the same rounds, with a bootstrap interval.

    Each round gives one ratio ``num / den`` of two values measured seconds apart under the
    same machine state, so drift between rounds cancels in it. The estimate is the geometric
    mean of the per-round ratios (ratios multiply: a geometric mean treats 2x and 0.5x
    symmetrically). The interval is the studentized bootstrap (bootstrap-t) over rounds: rounds
    resampled with replacement ``n_boot`` times (seeded, so a report is reproducible), each
    resample's mean log ratio standardized by its own standard error. With the few rounds a
    timing run affords (8-20), the plain percentile bootstrap is too narrow: for two equal
    engines its nominal 95% interval held 1 in 89% of simulated 8-round measurements, the
    bootstrap-t one in 95% (``tools/ratio_interval_coverage.py``), so "the interval excludes 1"
    can decide a choice.

    Args:
        num_ms, den_ms: per-round values of the two engines (same length, positive).

    Returns:
        dict with ``ratio``, ``ci`` ([lo, hi]), ``rounds``, ``contains_1`` (the two are tied at
        this level), ``level`` and ``method``.

    Raises:
        ValueError: different lengths, fewer than 2 rounds, or a non-positive time.
    """
    import numpy as np

    a, b = np.asarray(num_ms, dtype=float), np.asarray(den_ms, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"a paired ratio needs two equal series of >= 2 rounds, got {a.shape} and {b.shape}")
    if (a <= 0).any() or (b <= 0).any():
        raise ValueError("a paired ratio needs positive times")
    logs = np.log(a / b)
    n = len(logs)
    mean = float(logs.mean())
    se = float(logs.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:  # every round gave the same ratio (e.g. one shared measurement): no spread
        lo = hi = math.exp(mean)
    else:
        rng = np.random.default_rng(seed)
        boot = logs[rng.integers(0, n, size=(n_boot, n))]
        b_se = boot.std(axis=1, ddof=1) / math.sqrt(n)
        # a resample of one repeated round has no spread to standardize by (its float-rounding
        # "spread" would make t astronomically large): left out
        keep = b_se > 1e-9 * se
        t = (boot.mean(axis=1)[keep] - mean) / b_se[keep]
        tail = (1.0 - level) / 2.0
        t_lo, t_hi = np.quantile(t, [tail, 1.0 - tail])
        # with very few rounds t is heavy-tailed: the interval may reach 0 or infinity (a tie)
        lo, hi = (float(np.exp(np.clip(v, -700.0, 700.0))) for v in (mean - t_hi * se, mean - t_lo * se))
    return {
        "ratio": math.exp(mean),
        "ci": [float(lo), float(hi)],
        "rounds": n,
        "contains_1": bool(lo <= 1.0 <= hi),
        "level": level,
        "method": "geometric mean of per-round ratios, studentized bootstrap (bootstrap-t) over rounds",
    }
