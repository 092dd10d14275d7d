"""CLI: `sweep`, `select`, `report`, `run` (and the options they share). Nothing heavy at import."""

from __future__ import annotations

from fixres_deploy.cli.app import _emit, command
from fixres_deploy.sweep import config  # the one schema of sweep/select/report/run flags (light)


def _selection_config(args):
    return config.build(config.SelectionConfig, config.values_from_args(args, config.SelectionConfig))


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

    cfg = config.build(config.SweepConfig, config.values_from_args(args, config.SweepConfig))
    cfg.validate()  # before anything is written
    config.write_effective_config(cfg, args.out)
    res = run_sweep(cfg, args.out)
    if cfg.shard:
        from fixres_deploy.sweep.shard import shard_summary

        _emit(args, shard_summary(cfg, args.out, res.store_misses, res.store_hits, res.seconds), lambda d: d["reason"])
        return 0
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
    config.add_options(p, config.SweepConfig, require=True)
    p.add_argument("--out", required=True, help="output folder (sweep.json, config.effective.toml, store/)")
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
    config.add_options(p, config.SelectionConfig)
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
    config.add_options(p, config.SelectionConfig)
    p.add_argument("--json", action="store_true")


def pipeline_config(args) -> config.PipelineConfig:
    """`run`'s config: field defaults, then ``--config FILE``, then the flags given explicitly."""
    flags = config.values_from_args(args, config.PipelineConfig)
    if args.config:
        return config.read_config(args.config, config.PipelineConfig, overrides=flags)
    return config.build(config.PipelineConfig, flags, missing_hint=" (or give --config FILE)")


@command("run")
def cmd_run(args) -> int:
    from fixres_deploy.sweep.pipeline import run_pipeline

    summary = run_pipeline(pipeline_config(args))
    _emit(args, summary, lambda s: f"done in {s['seconds']:.0f} s -> {s['out']}\n{s['reason']}")
    return 0


def _run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="the whole pipeline from a TOML config (or the same as flags), resumably",
        description="Settings come from the field defaults, then --config FILE, then the flags given "
        "explicitly (they override the file). The effective config is written to OUT/config.effective.toml.",
    )
    p.add_argument("--config", help="TOML file with [model] [data] [sweep] [select] [output] sections")
    config.add_options(p, config.PipelineConfig)
    p.add_argument("--json", action="store_true")


PARSERS = [_sweep_parser, _select_parser, _report_parser, _run_parser]
