"""CLI: `sweep`, `select`, `report`, `run` (and the options they share). Nothing heavy at import."""

from __future__ import annotations

import argparse

from fixres_deploy.cli.app import _emit, command


def _csv(text: str) -> list[str]:
    return [t for t in text.replace(" ", "").split(",") if t]


def _ints(text: str) -> list[int]:
    from fixres_deploy.core.utils import parse_int_list

    return parse_int_list(text)


def _add_select_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("operating point")
    g.add_argument(
        "--objective",
        choices=["max_accuracy", "min_latency"],
        default="max_accuracy",
        help="max top-1 subject to a latency budget, or min latency subject to an accuracy floor",
    )
    g.add_argument("--metric", choices=["latency", "throughput"], default="latency")
    g.add_argument("--target-batch", type=int, help="batch size the choice is made at (default: the smallest)")
    g.add_argument("--percentile", choices=["p50", "p90", "p99"], default="p50")
    g.add_argument("--latency-budget-ms", type=float)
    g.add_argument("--min-throughput", type=float, help="images/s (with --metric throughput)")
    g.add_argument("--min-top1", type=float, help="accuracy floor as a fraction, e.g. 0.9")
    g.add_argument("--max-drop", type=float, help="max top-1 drop from the best point, as a fraction")
    g.add_argument("--alpha", type=float, default=0.05, help="significance of the paired accuracy test")
    g.add_argument("--only-backend")
    g.add_argument("--only-shape-mode", choices=["fixed", "dynamic"])
    g.add_argument("--only-precision", choices=["fp32", "fp16", "int8"])


def _selection_config(args):
    from fixres_deploy.choose.select import SelectionConfig

    return SelectionConfig(
        objective=args.objective,
        metric=args.metric,
        batch_size=args.target_batch,
        percentile=args.percentile,
        latency_budget_ms=args.latency_budget_ms,
        min_throughput_ips=args.min_throughput,
        min_top1=args.min_top1,
        max_drop=args.max_drop,
        alpha=args.alpha,
        backend=args.only_backend,
        shape_mode=args.only_shape_mode,
        precision=args.only_precision,
    )


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grid")
    g.add_argument("--resolutions", type=_ints, help="candidate test resolutions (default: the prior's)")
    g.add_argument("--prior-stride", type=int, default=32, help="network stride for the prior's candidates")
    g.add_argument("--precisions", type=_csv, default=["fp32", "fp16", "int8"])
    g.add_argument("--backends", type=_csv, help="default: the available ones (onnxruntime; tensorrt on a GPU)")
    g.add_argument("--shape-modes", type=_csv, default=["fixed", "dynamic"])
    g.add_argument("--batch-sizes", type=_ints, default=[1, 8])
    g.add_argument("--no-finetune", action="store_true", help="measure the base model only")
    g.add_argument("--finetuned-only", action="store_true", help="measure FixRes fine-tuned models only")
    g.add_argument("--finetune-epochs", type=int, default=8)
    g.add_argument("--finetune-lr", type=float)
    g.add_argument("--calibration-size", type=int, default=256)
    g.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy"], default="minmax")
    g.add_argument("--int8-float-layers", choices=["default", "none"], default="default")
    g.add_argument("--exporter", choices=["dynamo", "torchscript", "auto"], default="dynamo")
    g.add_argument("--eval-limit", type=int, help="evaluate on at most N images (class-balanced)")
    g.add_argument("--latency", default="standard", help="latency preset: quick, standard, thorough")
    g.add_argument("--threads", type=int, help="ONNX Runtime / torch threads")
    g.add_argument("--store", help="result store folder (default OUT/store)")
    g.add_argument("--retry-failed", action="store_true", help="re-run stages recorded as failed")


def _sweep_config(args):
    from fixres_deploy.sweep.sweep import SweepConfig, available_backends

    ft = [False, True]
    if args.no_finetune:
        ft = [False]
    if args.finetuned_only:
        ft = [True]
    return SweepConfig(
        checkpoint=args.checkpoint,
        model=args.model,
        num_classes=args.num_classes,
        train_data=args.data,
        eval_data=args.eval_data,
        val_fraction=args.val_fraction,
        train_res=args.train_res,
        resolutions=args.resolutions,
        prior_stride=args.prior_stride,
        precisions=args.precisions,
        backends=args.backends or available_backends(),
        shape_modes=args.shape_modes,
        batch_sizes=args.batch_sizes,
        finetune=ft,
        finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr,
        calibration_size=args.calibration_size,
        calibration_method=args.calibration_method,
        int8_float_layers=args.int8_float_layers,
        exporter=args.exporter,
        eval_limit=args.eval_limit,
        latency=args.latency,
        threads=args.threads,
        store=args.store,
        retry_failed=args.retry_failed,
    )


def _add_model_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--checkpoint", required=True, help="base model checkpoint (trained at --train-res)")
    g.add_argument("--model", help="model spec (optional for fixres-deploy checkpoints)")
    g.add_argument("--num-classes", type=int)
    g.add_argument("--train-res", type=int, help="K_train (default: what the checkpoint records)")
    g.add_argument("--data", required=True, help="fine-tune/calibration images (ImageFolder, a training split)")
    g.add_argument(
        "--eval-data",
        help="held-out evaluation images (ImageFolder); default: a file-name hash split of --data (see --val-fraction)",
    )
    g.add_argument("--val-fraction", type=float, default=0.3, help="held-out share when --eval-data is omitted")


def _human_selection(rep: dict) -> str:
    lines = [f"selected point {rep['selected']}: {rep['reason']}"]
    g, s = rep.get("iso_latency_gain"), rep.get("iso_accuracy_speedup")
    if g:
        lines.append(f"iso-latency accuracy gain: {g['value'] * 100:+.1f} pts ({g['label']})")
    if s:
        lines.append(f"iso-accuracy speedup: {s['value']:.2f}x ({s['label']})")
    return "\n".join(lines)


@command("sweep")
def cmd_sweep(args) -> int:
    from fixres_deploy.sweep.sweep import run_sweep

    res = run_sweep(_sweep_config(args), args.out)
    ok = sum(1 for p in res.points if p.ok)
    _emit(
        args,
        {
            "out": args.out,
            "points": len(res.points),
            "ok": ok,
            "failures": res.failures,
            "seconds": res.seconds,
            "store_hits": res.store_hits,
            "store_misses": res.store_misses,
        },
        lambda d: (
            f"{d['ok']}/{d['points']} points measured in {d['seconds']:.0f} s "
            f"({d['store_hits']} stage results reused, {d['store_misses']} computed) -> {args.out}/sweep.json"
            + (
                f"\n{len(d['failures'])} failures: "
                + "; ".join(f"{f['stage']} {f['what']}: {f['error']}" for f in d["failures"][:5])
                if d["failures"]
                else ""
            )
        ),
    )
    return 0 if ok else 1


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="accuracy and latency of every engine: resolutions x precisions x batches x shapes"
    )
    _add_model_data(p)
    _add_sweep_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")


@command("select")
def cmd_select(args) -> int:
    from fixres_deploy.choose.report import build_report
    from fixres_deploy.sweep.sweep import SweepResult

    rep = build_report(SweepResult.load(args.sweep), _selection_config(args))
    keep = ("selected", "reason", "pareto", "alternatives", "iso_latency_gain", "iso_accuracy_speedup")
    d = {k: rep[k] for k in keep}
    d["point"] = rep["points"][rep["selected"]]
    _emit(args, d, _human_selection)
    return 0


def _select_parser(sub) -> None:
    p = sub.add_parser("select", help="choose the operating point of a sweep and explain it")
    p.add_argument("--sweep", required=True, help="OUT/sweep.json of a sweep")
    _add_select_args(p)
    p.add_argument("--json", action="store_true")


@command("report")
def cmd_report(args) -> int:
    from fixres_deploy.choose.report import report_from_sweep

    rep = report_from_sweep(args.sweep, args.out, _selection_config(args))
    _emit(
        args,
        {
            "report": f"{args.out}/report.json",
            "markdown": f"{args.out}/report.md",
            "plots": rep.get("plots"),
            "selected": rep["selected"],
            "reason": rep["reason"],
        },
        lambda d: f"wrote {d['markdown']} and {d['report']}\n" + _human_selection(rep),
    )
    return 0


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="regenerate report.json / report.md / plots from a sweep (no measuring)")
    p.add_argument("--sweep", required=True, help="OUT/sweep.json")
    p.add_argument("--out", required=True)
    _add_select_args(p)
    p.add_argument("--json", action="store_true")


@command("run")
def cmd_run(args) -> int:
    from fixres_deploy.sweep.pipeline import PipelineConfig, run_pipeline

    if args.config:
        pc = PipelineConfig.from_toml(args.config)
        if args.out:
            pc.out = args.out
    else:
        if not (args.checkpoint and args.data and args.out):
            from fixres_deploy.core.errors import UserInputError

            raise UserInputError("give --config FILE, or --checkpoint, --data and --out (and --eval-data)")
        from fixres_deploy.sweep.pipeline import PipelineConfig as PC

        pc = PC(
            sweep=_sweep_config(args),
            select=_selection_config(args),
            out=args.out,
            bundle=not args.no_bundle,
            tar=args.tar,
            triton=not args.no_triton,
        )
    summary = run_pipeline(pc)
    _emit(args, summary, lambda s: f"done in {s['seconds']:.0f} s -> {s['out']}\n{s['reason']}")
    return 0


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline from a TOML config (or the same as flags), resumably")
    p.add_argument("--config", help="TOML file with [model] [data] [sweep] [select] [output] sections")
    p.add_argument("--checkpoint")
    p.add_argument("--model")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--train-res", type=int)
    p.add_argument("--data")
    p.add_argument("--eval-data")
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--out")
    p.add_argument("--no-bundle", action="store_true")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--tar", action="store_true")
    _add_sweep_args(p)
    _add_select_args(p)
    p.add_argument("--json", action="store_true")


PARSERS = [_sweep_parser, _select_parser, _report_parser, _run_parser]
