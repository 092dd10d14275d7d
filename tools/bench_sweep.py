#!/usr/bin/env python
"""The full sweep on real photos, the choice for two latency budgets, and the re-run time.

    python tools/bench_sweep.py --data ../shared/data/imagenette-224/train \
        --checkpoint runs/imagenette/base_r64.pt --out runs/imagenette_sweep

Runs the pipeline (FixRes fine-tune at each resolution, export, ORT fp32/fp16/int8 engines,
fixed and dynamic shapes, accuracy on a held-out hash split, latency) once, then again from
the result store (target: the second run under 10% of the first), then selects the operating
point for each latency budget. Prints Markdown; writes OUT/bench_sweep.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    from fixres_deploy.data.folders import DEFAULT_VAL_FRACTION

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root; a hash split is held out for evaluation")
    p.add_argument("--checkpoint", required=True, help="base model trained at --train-res")
    p.add_argument("--out", required=True)
    p.add_argument("--train-res", type=int, default=64)
    p.add_argument("--resolutions", default="64,96,128,160,192")
    p.add_argument("--precisions", default="fp32,fp16,int8")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--shape-modes", default="fixed,dynamic")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--latency", default="standard")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budgets-ms", default=None, help="two latency budgets (default: chosen from the measurements)")
    p.add_argument("--target-batch", type=int, default=1)
    p.add_argument(
        "--int8-float-layers",
        default="default",
        choices=("default", "none", "sensitivity"),
        help="'none': every layer int8; 'sensitivity': per graph, the fewest float layers within the budget",
    )
    p.add_argument("--int8-sensitivity-budget-pts", type=float, default=1.0)
    p.add_argument("--model", default=None, help="model spec when the checkpoint does not record one")
    args = p.parse_args()

    from fixres_deploy.choose.report import build_report
    from fixres_deploy.core.utils import parse_int_list, write_json
    from fixres_deploy.sweep.config import PipelineConfig, SelectionConfig, SweepConfig
    from fixres_deploy.sweep.pipeline import run_pipeline
    from fixres_deploy.sweep.sweep import SweepResult

    sweep_cfg = SweepConfig(
        checkpoint=args.checkpoint,
        train_data=args.data,
        eval_data=None,
        val_fraction=args.val_fraction,
        train_res=args.train_res,
        resolutions=parse_int_list(args.resolutions),
        precisions=args.precisions.split(","),
        batch_sizes=parse_int_list(args.batch_sizes),
        shape_modes=args.shape_modes.split(","),
        finetune_epochs=args.finetune_epochs,
        eval_limit=args.eval_limit,
        latency=args.latency,
        threads=args.threads,
        exporter="dynamo",
        int8_float_layers=args.int8_float_layers,
        int8_sensitivity_budget_pts=args.int8_sensitivity_budget_pts,
        model=args.model,
    )
    select = SelectionConfig(batch_size=args.target_batch)
    pc = PipelineConfig(sweep=sweep_cfg, select=select, out=args.out, bundle=True, triton=True)
    runs = []
    for attempt in ("first", "again"):
        t0 = time.perf_counter()
        summary = run_pipeline(pc)
        runs.append({"run": attempt, "seconds": time.perf_counter() - t0, "store": summary["store"]})
        print(
            f"{attempt} run: {runs[-1]['seconds']:.1f} s (store: {summary['store']['hits']} reused, "
            f"{summary['store']['misses']} computed)",
            flush=True,
        )
    ratio = runs[1]["seconds"] / runs[0]["seconds"]
    sweep = SweepResult.load(os.path.join(args.out, "sweep.json"))
    ok = [pt for pt in sweep.points if pt.ok and pt.batch_size == args.target_batch]
    if args.budgets_ms:
        budgets = [float(b) for b in args.budgets_ms.split(",")]
    else:  # one tight budget (a third of the way up the latency range) and one loose one
        lats = sorted(pt.latency_p50_ms for pt in ok)
        budgets = [round(lats[len(lats) // 4], 2), round(lats[(3 * len(lats)) // 4], 2)]
    choices = []
    for b in budgets:
        rep = build_report(sweep, SelectionConfig(batch_size=args.target_batch, latency_budget_ms=b))
        pt = sweep.points[rep["selected"]]
        choices.append(
            {
                "budget_ms": b,
                "selected": rep["selected"],
                "label": pt.label,
                "top1": pt.top1,
                "top1_ci": pt.top1_ci,
                "latency_p50_ms": pt.latency_p50_ms,
                "reason": rep["reason"],
            }
        )
    rep = build_report(sweep, select)
    print(
        f"\n## Sweep on {args.data}: {len(sweep.points)} points, {sum(1 for q in sweep.points if q.ok)} measured, "
        f"{len(sweep.failures)} failures\n"
    )
    print(
        f"first run {runs[0]['seconds'] / 60:.1f} min; re-run from the store {runs[1]['seconds']:.1f} s "
        f"= {ratio * 100:.1f}% of the first\n"
    )
    g, s = rep["iso_latency_gain"], rep["iso_accuracy_speedup"]
    if g:
        print(
            f"iso-latency accuracy gain (batch {args.target_batch}): {g['value'] * 100:+.1f} pts "
            f"(95% CI {g['ci'][0] * 100:+.1f} to {g['ci'][1] * 100:+.1f}) via {g['label']}"
        )
    if s:
        kind = "paired bootstrap 95% CI over interleaved rounds" if s.get("paired") else "approx. 95% range"
        print(
            f"iso-accuracy speedup (batch {args.target_batch}): {s['value']:.2f}x "
            f"({kind} {s['ci'][0]:.2f}-{s['ci'][1]:.2f}) via {s['label']}; "
            f"rounds re-run for contention: {rep.get('rerun_rounds', 0)}\n"
        )
    print(f"| latency budget (p50, batch {args.target_batch}) | selected | top-1 % [95% CI] | p50 ms |")
    print("|---:|---|---|---:|")
    for c in choices:
        print(
            f"| {c['budget_ms']:.2f} ms | {c['label']} | {c['top1'] * 100:.1f} [{c['top1_ci'][0] * 100:.1f}, "
            f"{c['top1_ci'][1] * 100:.1f}] | {c['latency_p50_ms']:.2f} |"
        )
    for c in choices:
        print(f"\n- budget {c['budget_ms']:.2f} ms: {c['reason']}")
    write_json(
        os.path.join(args.out, "bench_sweep.json"),
        {
            "runs": runs,
            "rerun_ratio": ratio,
            "choices": choices,
            "iso_latency_gain": g,
            "iso_accuracy_speedup": s,
            "latency_ratios": rep.get("latency_ratios"),
            "rerun_rounds": rep.get("rerun_rounds"),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
