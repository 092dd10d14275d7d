"""`fixres-deploy bench`: latency per resolution x batch of an ONNX file or of a build's engines.

Imports nothing heavy at module level (the library is imported inside the handler).
"""

from __future__ import annotations

import argparse

from fixres_deploy.cli.app import _add_limit_arg, _check_pixels, _emit, command


@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    from fixres_deploy.core.utils import parse_int_list, write_json
    from fixres_deploy.measure.bench import LatencyConfig, bench_index, bench_onnx

    preset = {"quick": LatencyConfig.quick, "standard": LatencyConfig.standard, "thorough": LatencyConfig.thorough}[
        args.preset
    ]
    overrides = {
        k: v
        for k, v in {
            "warmup_s": args.warmup_s,
            "warmup_iters": args.warmup_iters,
            "budget_s": args.budget_s,
            "repeats": args.repeats,
            "min_iters": args.min_iters,
            "contention_threshold": args.contention_threshold,
            "remeasure_if_contended": args.remeasure,
        }.items()
        if v is not None
    }
    if args.no_load_check:
        overrides["check_load"] = False
    latency = preset(**overrides)
    # an empty value ('') is an error, not "the defaults"
    res = parse_int_list(args.resolutions, "--resolutions") if args.resolutions is not None else None
    batches = parse_int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes is not None else None
    _check_pixels(args, res or [], batches or [1, 8], "--resolutions/--batch-sizes")
    common = dict(
        resolutions=res,
        batch_sizes=batches,
        threads=args.threads,
        latency=latency,
        peak=not args.no_peak,
        interleave=not args.no_interleave,
    )
    if args.onnx:
        report = bench_onnx(args.onnx, backend=args.backend, precision=args.precision, **common)
    else:
        report = bench_index(args.engine_index, **common)
    d = report.to_dict()
    if args.out:
        write_json(args.out, d)
    _emit(args, d, lambda _: report.table() + (f"\nreport written to {args.out}" if args.out else ""))
    return 0


def _bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="latency (p50/p90/p99), throughput, GFLOP/s and %% of peak of an ONNX file or built engines",
        description="Measure per-call latency with warm-up, repeats and a check of other processes' "
        "CPU load (contended measurements are repeated and flagged). Shapes are measured interleaved.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", help="an ONNX model (dynamic: any --resolutions; fixed: its own)")
    src.add_argument("--engine-index", help="index.json of 'fixres-deploy build': benchmark all its engines")
    p.add_argument(
        "--backend",
        default="onnxruntime",
        choices=["onnxruntime", "tensorrt"],
        help="engine to build from --onnx (the torch reference runs checkpoints: see --engine-index)",
    )
    p.add_argument(
        "--precision", default="fp32", choices=["fp32", "fp16", "int8"], help="precision label of the --onnx variant"
    )
    p.add_argument("--resolutions", help="comma-separated input sides, e.g. 160,224")
    p.add_argument("--batch-sizes", help="comma-separated batch sizes (default 1,8 where accepted)")
    p.add_argument("--threads", type=int, help="intra-op threads (ONNX Runtime session / torch)")
    p.add_argument(
        "--preset",
        choices=["quick", "standard", "thorough"],
        default="standard",
        help="measurement preset; the options below override it",
    )
    p.add_argument("--warmup-s", type=float, help="warm-up seconds (and --warmup-iters calls, both)")
    p.add_argument("--warmup-iters", type=int)
    p.add_argument("--budget-s", type=float, help="timed seconds per measurement (split over repeats)")
    p.add_argument("--repeats", type=int, help="timed repeats; percentiles are their medians")
    p.add_argument("--min-iters", type=int, help="timed calls per repeat at least")
    p.add_argument("--contention-threshold", type=float, help="cores of other processes' load that flag a repeat")
    p.add_argument("--remeasure", type=int, help="how many contended repeats to measure again")
    p.add_argument("--no-load-check", action="store_true", help="do not read /proc for other processes' load")
    p.add_argument("--no-peak", action="store_true", help="skip the machine-peak measurement (no %% of peak)")
    p.add_argument("--no-interleave", action="store_true", help="measure shapes/engines one after the other")
    p.add_argument("--out", help="write the JSON report here")
    _add_limit_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


PARSERS = [_bench_parser]
