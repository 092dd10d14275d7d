#!/usr/bin/env python
"""Coverage of the paired latency-ratio interval with few rounds: bootstrap-t vs percentile bootstrap.

Two equal engines (log ratio per round ~ N(0, 0.05)): how often does the nominal 95% interval
contain 1? Simulated, no timing involved; docs/measurement.md quotes the output.

    python tools/ratio_interval_coverage.py [--trials 1000]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--rounds", default="4,8,14")
    args = p.parse_args()

    from fixres_deploy.core.stats import paired_ratio_interval

    rng = np.random.default_rng(0)
    print("| rounds | percentile bootstrap | bootstrap-t |\n|---:|---:|---:|")
    for n in (int(v) for v in args.rounds.split(",")):
        hit_t = hit_p = 0
        for k in range(args.trials):
            logs = rng.standard_normal(n) * 0.05
            r = paired_ratio_interval(np.exp(logs), np.ones(n), n_boot=1000, seed=k)
            hit_t += r["ci"][0] <= 1.0 <= r["ci"][1]
            boot = logs[rng.integers(0, n, size=(1000, n))].mean(axis=1)
            lo, hi = np.quantile(boot, [0.025, 0.975])
            hit_p += lo <= 0.0 <= hi
        print(f"| {n} | {100 * hit_p / args.trials:.1f}% | {100 * hit_t / args.trials:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
