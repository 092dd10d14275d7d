"""The report: what the user gains over the naive deployment, the front, the choice, the plots.

Regenerable from a sweep's ``sweep.json`` (which the result store backs) without measuring
anything again: ``fixres-deploy report --sweep OUT/sweep.json --out OUT``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from fixres_deploy.choose.report_sections import (
    diagnostics_markdown,
    latency_ratio_section,
    ratios_markdown,
    write_diagnostic_plot,
)
from fixres_deploy.choose.select import (
    NoFeasiblePointError,
    SelectionConfig,
    headline_figures,
    naive_point,
    select_point,
    speed_text,
)
from fixres_deploy.core.errors import FixResError
from fixres_deploy.core.schema import check_schema, stamp
from fixres_deploy.core.utils import atomic_path, read_json, write_json
from fixres_deploy.sweep.points import SweepPoint

log = logging.getLogger(__name__)

REPORT_FORMAT = "fixres-deploy/report"
#: 2: ``schema_version`` (was ``version``)
#: 3: ``latency_ratios`` (per-round ratios with intervals), ``latency_groups``, ``rerun_rounds``,
#:    ``diagnostics``
REPORT_SCHEMA_VERSION = 3

REPORT_POINT_FIELDS = (
    "resolution",
    "precision",
    "backend",
    "batch_size",
    "shape_mode",
    "finetuned",
    "top1",
    "top1_ci",
    "top5",
    "top5_ci",
    "n",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "latency_mean_ms",
    "throughput_ips",
    "gflops_per_image",
    "achieved_gflops",
    "peak_gflops",
    "contended",
    "engine_path",
    "onnx_path",
    "checkpoint",
    "quant",
    "error",
)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.1f}"


def build_report(sweep, cfg: SelectionConfig | None = None) -> dict:
    """The report.json content for a :class:`fixres_deploy.sweep.sweep.SweepResult`."""
    cfg = cfg or SelectionConfig()
    points: list[SweepPoint] = sweep.points
    sel = select_point(points, cfg)
    chosen = points[sel.selected]
    naive = naive_point(
        points, sweep.train_res, backend=chosen.backend, batch_size=chosen.batch_size, shape_mode=chosen.shape_mode
    )
    heads = {"iso_latency_gain": None, "iso_accuracy_speedup": None}
    if naive is not None:
        heads = headline_figures(points, naive, cfg)
    else:
        log.warning(
            "no naive point (fp32, no fine-tune, %d px) on %s batch %d: no headline figures",
            sweep.train_res,
            chosen.backend,
            chosen.batch_size,
        )
    body = {
        "train_res": sweep.train_res,
        "resolutions": sweep.resolutions,
        "selection_config": cfg.to_dict(),
        "points": [{k: getattr(p, k) for k in REPORT_POINT_FIELDS} for p in points],
        "pareto": sel.pareto,
        "selected": sel.selected,
        "reason": sel.reason,
        "alternatives": sel.alternatives,
        "naive": naive,
        "iso_latency_gain": heads["iso_latency_gain"],
        "iso_accuracy_speedup": heads["iso_accuracy_speedup"],
        "finetune_curve": sweep.finetune_curve,
        "prior": sweep.prior,
        "peak_gflops": sweep.peak_gflops,
        "failures": sweep.failures,
        "contended_points": sum(1 for p in points if p.contended),
        **latency_ratio_section(points, sel, naive, cfg, sweep.latency_groups),
        "diagnostics": sweep.diagnostics,
        "sweep_seconds": sweep.seconds,
        "store": {"hits": sweep.store_hits, "misses": sweep.store_misses},
        "preprocess": sweep.preprocess,
        "class_names": sweep.class_names,
        "tensorrt_int8_prediction": sweep.tensorrt_int8_prediction,  # sweep/trt_int8.py
    }
    return stamp(body, REPORT_FORMAT, REPORT_SCHEMA_VERSION)


def read_report(path: str | os.PathLike) -> dict:
    """The one reader of ``report.json`` (written by :func:`write_report`)."""
    return check_schema(
        read_json(path),
        REPORT_FORMAT,
        REPORT_SCHEMA_VERSION,
        path,
        "Regenerate it from the sweep: fixres-deploy report --sweep OUT/sweep.json --out OUT.",
    )


def write_report(sweep, out_dir: str | os.PathLike, cfg: SelectionConfig | None = None) -> dict:
    """Write OUT/report.json, OUT/report.md and the PNG plots; return the report dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = build_report(sweep, cfg)
    plots = write_plots(sweep.points, rep, out_dir)
    rep["plots"] = plots
    write_json(out_dir / "report.json", rep)
    with atomic_path(out_dir / "report.md") as tmp:
        Path(tmp).write_text(render_markdown(sweep.points, rep), encoding="utf-8")
    return rep


def render_markdown(points: Sequence[SweepPoint], rep: dict) -> str:
    from fixres_deploy.sweep import trt_int8

    cfg = SelectionConfig(**rep["selection_config"])
    chosen = points[rep["selected"]]
    lines = ["# fixres-deploy report", ""]
    gain, speed = rep.get("iso_latency_gain"), rep.get("iso_accuracy_speedup")
    if rep.get("naive") is not None:
        naive = points[rep["naive"]]
        lines += [f"**Naive deployment**: {naive.label}: top-1 {_pct(naive.top1)}%, {speed_text(naive, cfg)}.", ""]
        if gain:
            ci = gain.get("ci")
            ci_txt = f" (95% CI {ci[0] * 100:+.1f} to {ci[1] * 100:+.1f})" if ci else ""
            p_txt = f", McNemar p = {gain['p_value']:.2g}" if gain.get("p_value") is not None else ""
            lines.append(
                f"- **Iso-latency accuracy gain: {gain['value'] * 100:+.1f} pts top-1**{ci_txt}{p_txt} — "
                f"{gain['label']}, no slower than naive."
            )
        if speed:
            kind = "95% bootstrap CI over paired rounds" if speed.get("paired") else "≈95% range"
            lines.append(
                f"- **Iso-accuracy speedup: {speed['value']:.2f}x** ({kind} {speed['ci'][0]:.2f}–"
                f"{speed['ci'][1]:.2f}) — {speed['label']}, top-1 not significantly below naive "
                f"({speed['top1_diff'] * 100:+.1f} pts)."
            )
        lines.append("")
    lines += [
        "## Selected operating point",
        "",
        f"**{chosen.label}** — top-1 {_pct(chosen.top1)}% "
        f"[{_pct(chosen.top1_ci[0])}, {_pct(chosen.top1_ci[1])}], {speed_text(chosen, cfg)}, "
        f"{chosen.throughput_ips:.0f} img/s.",
        "",
        rep["reason"],
        "",
    ]
    lines += ["## Pareto front", "", _table(points, rep["pareto"]), ""]
    lines += ratios_markdown(points, rep)
    lines += diagnostics_markdown(rep)
    if rep.get("finetune_curve"):
        lines += [
            "## Top-1 vs test resolution (fp32)",
            "",
            "| test res | no fine-tune | FixRes fine-tuned |",
            "|---:|---|---|",
        ]
        for row in rep["finetune_curve"]:
            cells = []
            for key in ("no_finetune", "finetuned"):
                v = row.get(key)
                cells.append("—" if not v else f"{_pct(v['top1'])} [{_pct(v['top1_ci'][0])}, {_pct(v['top1_ci'][1])}]")
            mark = " (train)" if row.get("is_train_res") else ""
            lines.append(f"| {row['resolution']}{mark} | {cells[0]} | {cells[1]} |")
        lines.append("")
    for name, title in (
        ("accuracy_vs_resolution", "Top-1 vs resolution"),
        ("latency_vs_resolution", "Latency vs resolution"),
        ("accuracy_latency", "Accuracy–latency trade-off"),
    ):
        if rep.get("plots", {}).get(name):
            lines += [f"![{title}]({os.path.basename(rep['plots'][name])})", ""]
    ok = [i for i, p in enumerate(points) if p.ok]
    lines += ["## All points", "", _table(points, ok), ""]
    lines += trt_int8.markdown(rep.get("tensorrt_int8_prediction") or [])
    if rep.get("peak_gflops"):
        lines.append(
            f"Machine peak (large fp32 matrix product): {rep['peak_gflops']:.1f} GFLOP/s. "
            f"Points measured under CPU contention: {rep['contended_points']}."
        )
        lines.append("")
    if rep.get("failures"):
        lines += ["## Failures", ""] + [f"- {f['stage']} {f['what']}: {f['error']}" for f in rep["failures"]] + [""]
    store = rep.get("store", {})
    lines.append(
        f"Sweep time {rep.get('sweep_seconds', 0):.0f} s; result store: {store.get('hits', 0)} reused, "
        f"{store.get('misses', 0)} computed."
    )
    return "\n".join(lines) + "\n"


def _table(points: Sequence[SweepPoint], idx: Sequence[int]) -> str:
    rows = [
        "| # | backend | precision | res | FixRes | batch | mode | top-1 % [95% CI] | p50 ms | p99 ms | img/s | GFLOPs/img | GFLOP/s |",
        "|---:|---|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for i in idx:
        p = points[i]
        ci = f"{_pct(p.top1)} [{_pct(p.top1_ci[0])}, {_pct(p.top1_ci[1])}]" if p.top1_ci else _pct(p.top1)
        gf = f"{p.gflops_per_image:.3f}" if p.gflops_per_image else "—"
        ach = f"{p.achieved_gflops:.1f}" if p.achieved_gflops else "—"
        flag = " ⚠" if p.contended else ""
        rows.append(
            f"| {i} | {p.backend} | {p.precision} | {p.resolution} | {'yes' if p.finetuned else 'no'} | "
            f"{p.batch_size} | {p.shape_mode} | {ci} | {p.latency_p50_ms:.2f}{flag} | {p.latency_p99_ms:.2f} | "
            f"{p.throughput_ips:.0f} | {gf} | {ach} |"
        )
    return "\n".join(rows)


def write_plots(points: Sequence[SweepPoint], rep: dict, out_dir: Path) -> dict:
    """The three PNG plots; returns {name: path}. Needs matplotlib (extra `report`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return {}
    cfg = SelectionConfig(**rep["selection_config"])
    chosen = points[rep["selected"]]
    out = {}

    # 1. the paper's figure: top-1 vs test resolution, with and without fine-tuning
    curve = rep.get("finetune_curve") or []
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label, style in (("no_finetune", "no fine-tune", "o--"), ("finetuned", "FixRes fine-tuned", "s-")):
            xs = [r["resolution"] for r in curve if r.get(key)]
            ys = [r[key]["top1"] * 100 for r in curve if r.get(key)]
            lo = [(r[key]["top1"] - r[key]["top1_ci"][0]) * 100 for r in curve if r.get(key)]
            hi = [(r[key]["top1_ci"][1] - r[key]["top1"]) * 100 for r in curve if r.get(key)]
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=label)
        ax.axvline(rep["train_res"], color="grey", lw=0.8, ls=":")
        ax.text(rep["train_res"], ax.get_ylim()[0], " train res", color="grey", va="bottom", fontsize=8)
        ax.set_xlabel("test resolution (px)")
        ax.set_ylabel("top-1 (%) , 95% CI")
        ax.set_title("Top-1 vs test resolution (fp32)")
        ax.grid(alpha=0.3)
        ax.legend()
        out["accuracy_vs_resolution"] = _save(fig, out_dir / "accuracy_vs_resolution.png")

    # 2. latency vs resolution per precision (selected backend, batch and shape mode)
    sel_pts = [
        p
        for p in points
        if p.ok
        and p.backend == chosen.backend
        and p.batch_size == chosen.batch_size
        and p.shape_mode == chosen.shape_mode
        and p.finetuned
    ]
    if sel_pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for prec in ("fp32", "fp16", "int8"):
            pts = sorted((p for p in sel_pts if p.precision == prec), key=lambda p: p.resolution)
            if pts:
                ax.plot([p.resolution for p in pts], [p.latency(cfg.percentile) for p in pts], "o-", label=prec)
        ax.set_xlabel("test resolution (px)")
        ax.set_ylabel(f"latency {cfg.percentile} (ms)")
        ax.set_title(f"FixRes fine-tuned, {chosen.backend}, batch {chosen.batch_size}, {chosen.shape_mode} shapes")
        ax.grid(alpha=0.3)
        ax.legend()
        out["latency_vs_resolution"] = _save(fig, out_dir / "latency_vs_resolution.png")

    # 3. accuracy-latency scatter with the front and the choice
    cand = [i for i, p in enumerate(points) if p.ok and p.batch_size == chosen.batch_size]
    if cand:
        fig, ax = plt.subplots(figsize=(7, 5))
        markers = {"fp32": "o", "fp16": "^", "int8": "s"}
        for ft, color in ((False, "tab:grey"), (True, "tab:blue")):
            for prec, m in markers.items():
                idx = [i for i in cand if points[i].finetuned == ft and points[i].precision == prec]
                if idx:
                    ax.scatter(
                        [points[i].latency(cfg.percentile) for i in idx],
                        [points[i].top1 * 100 for i in idx],
                        marker=m,
                        color=color,
                        alpha=0.7,
                        label=f"{prec} {'FixRes' if ft else 'no-FT'}",
                    )
        front = [i for i in rep["pareto"]]
        ax.plot(
            [points[i].latency(cfg.percentile) for i in front],
            [points[i].top1 * 100 for i in front],
            "k-",
            lw=1,
            label="Pareto front",
        )
        ax.scatter(
            [chosen.latency(cfg.percentile)],
            [chosen.top1 * 100],
            s=250,
            facecolors="none",
            edgecolors="red",
            linewidths=2,
            label="selected",
        )
        if rep.get("naive") is not None:
            nv = points[rep["naive"]]
            ax.scatter([nv.latency(cfg.percentile)], [nv.top1 * 100], marker="x", s=120, color="black", label="naive")
        for i in front:
            ax.annotate(
                str(points[i].resolution),
                (points[i].latency(cfg.percentile), points[i].top1 * 100),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        ax.set_xlabel(f"latency {cfg.percentile} (ms), batch {chosen.batch_size}")
        ax.set_ylabel("top-1 (%)")
        ax.set_title("Accuracy vs latency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        out["accuracy_latency"] = _save(fig, out_dir / "accuracy_latency.png")

    # 4. the FixRes diagnostic: pooled-feature distributions per test resolution
    if rep.get("diagnostics"):
        fig = write_diagnostic_plot(plt, rep["diagnostics"])
        if fig is not None:
            out["pooled_features"] = _save(fig, out_dir / "pooled_features.png")
    return out


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return str(path)


def report_from_sweep(
    sweep_json: str | os.PathLike, out_dir: str | os.PathLike, cfg: SelectionConfig | None = None
) -> dict:
    """`fixres-deploy report`: regenerate the report from sweep.json (no measurement)."""
    from fixres_deploy.sweep.sweep import SweepResult

    sweep = SweepResult.load(sweep_json)
    if not any(p.ok for p in sweep.points):
        raise FixResError(f"'{sweep_json}' has no successfully measured point; see its failures")
    return write_report(sweep, out_dir, cfg)


__all__ = ["NoFeasiblePointError", "build_report", "report_from_sweep", "write_report"]
