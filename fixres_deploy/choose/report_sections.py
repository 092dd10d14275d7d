"""Report sections on how far the measurements can be trusted and why FixRes works.

* latency ratios with intervals: the selected point against the naive one and between
  neighbours on the Pareto front, each computed per round of the interleaved timing
  (:mod:`fixres_deploy.choose.ratios`), and how many rounds were run again because of contention;
* the FixRes diagnostic (:mod:`fixres_deploy.fixres.diagnostics`): the pooled features'
  fraction of exact zeros and their distribution per test resolution, before and after the
  fine-tune, and how far the adapted BatchNorm's statistics moved.

Kept apart from :mod:`fixres_deploy.choose.report` so that file stays the report's skeleton.
"""

from __future__ import annotations

from collections.abc import Sequence

from fixres_deploy.choose.ratios import front_neighbour_ratios, paired_ratio, ratio_stat


def latency_ratio_section(points, sel, naive: int | None, cfg, groups: Sequence[dict]) -> dict:
    """report.json keys ``latency_ratios``, ``latency_groups`` and ``rerun_rounds``."""
    stat = ratio_stat(cfg.metric, cfg.percentile)
    vs_naive = None
    if naive is not None:
        r = paired_ratio(points[naive], points[sel.selected], stat)
        vs_naive = {
            "naive": naive,
            "selected": sel.selected,
            "speedup": r,  # naive time / selected time, per round
            "resolved": None if r is None else not r["contains_1"],
        }
    return {
        "latency_ratios": {
            "stat": stat,
            "selected_vs_naive": vs_naive,
            "front_neighbours": front_neighbour_ratios(points, sel.pareto, stat),
        },
        "latency_groups": list(groups),
        "rerun_rounds": sum(int(g.get("rerun_rounds") or 0) for g in groups),
    }


def _ratio_text(r: dict | None) -> str:
    if r is None:
        return "not timed in the same rounds"
    tie = " (tied: the interval contains 1)" if r["contains_1"] else ""
    return f"{r['ratio']:.2f}x [95% CI {r['ci'][0]:.2f}–{r['ci'][1]:.2f}, {r['rounds']} rounds]{tie}"


def ratios_markdown(points, rep: dict) -> list[str]:
    """The ratio section of report.md."""
    lr = rep.get("latency_ratios") or {}
    lines = ["## Latency ratios (interleaved rounds, paired per round)", ""]
    vs = lr.get("selected_vs_naive")
    if vs:
        lines.append(f"- Selected vs naive ({points[vs['naive']].label}): speedup {_ratio_text(vs['speedup'])}.")
    for n in lr.get("front_neighbours") or []:
        lines.append(
            f"- {n['label_slower']} vs {n['label_faster']}: {n['top1_gain'] * 100:+.1f} pts top-1 for "
            f"{_ratio_text(n['latency_ratio'])} the latency."
        )
    groups = rep.get("latency_groups") or []
    if groups:
        rounds = sorted({g.get("rounds") for g in groups if g.get("rounds")})
        sizes = ", ".join(f"batch {g['batch']}: {g['members']} engines for {g['points']} points" for g in groups)
        stuck = sum(int(g.get("contended_rounds") or 0) for g in groups)
        lines.append(
            f"- {len(groups)} latency group(s) ({sizes}); rounds per group: {rounds}; rounds run again "
            f"because other processes used the cores: {rep.get('rerun_rounds', 0)}; still contended: {stuck}."
        )
        for g in groups:
            stop = g.get("stop") or {}
            if stop.get("reason") == "resolved":
                lines.append(
                    f"- batch {g['batch']}: every pair the choice depends on was decided after {g.get('rounds')} "
                    f"rounds ({stop.get('rounds_added', 0)} added for it)."
                )
            elif stop.get("reason") == "max_repeats":
                open_pairs = "; ".join(" vs ".join(p) for p in stop.get("unresolved", [])[:5])
                lines.append(
                    f"- batch {g['batch']}: stopped at the round cap with {len(stop.get('unresolved', []))} "
                    f"pair(s) still undecided ({open_pairs}): treat those as tied."
                )
    lines.append(
        "Two points are tied in latency when the interval of their ratio contains 1; FixRes and base "
        "weights of one graph share one measurement (ratio exactly 1)."
    )
    return lines + [""]


def diagnostics_markdown(rep: dict) -> list[str]:
    """The FixRes diagnostic table of report.md (and the PNG, when written)."""
    diag = rep.get("diagnostics")
    if not diag or not diag.get("resolutions"):
        return []
    lines = [
        "## Why FixRes works: pooled features per test resolution",
        "",
        f"Features after the final activation and global pooling ({diag['images']} held-out images). "
        "Far from the train resolution the pooled statistics drift (the paper: ResNet-50 at 64 px "
        "had 29.8% exact zeros vs 0.5% at 448); the fine-tune re-estimates the BatchNorm before the "
        "pool and adapts the classifier to them.",
        "",
        "| test res | zeros % base | zeros % FixRes | mean base | mean FixRes | BN mean shift (σ) | BN var ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(d, key, fmt):
        return "—" if not d or d.get(key) is None else format(d[key], fmt)

    for row in diag["resolutions"]:
        base, ft, bn = row.get("base"), row.get("finetuned"), row.get("bn_shift")
        zb = "—" if not base else f"{base['zero_fraction'] * 100:.1f}"
        zf = "—" if not ft else f"{ft['zero_fraction'] * 100:.1f}"
        mark = " (train)" if row.get("is_train_res") else ""
        lines.append(
            f"| {row['resolution']}{mark} | {zb} | {zf} | {cell(base, 'mean', '.3f')} | {cell(ft, 'mean', '.3f')} | "
            f"{cell(bn, 'mean_shift_sigma', '.3f')} | {cell(bn, 'var_ratio', '.3f')} |"
        )
    lines.append("")
    if rep.get("plots", {}).get("pooled_features"):
        lines += ["![Pooled features per test resolution](pooled_features.png)", ""]
    return lines


def write_diagnostic_plot(plt, diag: dict):
    """CDF of the pooled features per test resolution, base (left) and fine-tuned (right)."""
    rows = diag.get("resolutions") or []
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, sharex=True)
    cmap = plt.get_cmap("viridis")
    for ax, key, title in ((axes[0], "base", "base model"), (axes[1], "finetuned", "FixRes fine-tuned")):
        for k, row in enumerate(rows):
            d = row.get(key)
            if not d:
                continue
            q = d["quantiles"]
            probs = [i / (len(q) - 1) for i in range(len(q))]
            color = cmap(k / max(1, len(rows) - 1))
            label = f"{row['resolution']} px ({d['zero_fraction'] * 100:.1f}% zeros)"
            ax.plot(q, probs, color=color, lw=2 if row.get("is_train_res") else 1.2, label=label)
        ax.set_title(title)
        ax.set_xlabel("pooled feature value")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    # the top 1% is a long tail: show up to the largest 99th percentile
    q99 = [row[k]["quantiles"][-2] for row in rows for k in ("base", "finetuned") if row.get(k)]
    q0 = [row[k]["quantiles"][0] for row in rows for k in ("base", "finetuned") if row.get(k)]
    if q99:
        axes[0].set_xlim(min(0.0, min(q0)), max(q99))
    axes[0].set_ylabel("cumulative fraction")
    fig.suptitle("Pooled features per test resolution (CDF)")
    return fig
