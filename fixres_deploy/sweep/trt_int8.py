"""TensorRT int8 accuracy, predicted on ONNX Runtime CPU before any GPU build.

The graph TensorRT builds for int8 is the TensorRT-flavored Q/DQ variant (symmetric s8, zero
point 0, float parts fp16; precision/variants.py). TensorRT executes exactly those Q/DQ
scales, so running that graph on ONNX Runtime's CPU predicts TensorRT's int8 top-1 up to
kernel rounding (fp16 accumulation order, TensorRT's Q/DQ fusions). Latency is not predicted:
it needs TensorRT on the GPU. The sweep runs this per resolution when it builds int8
(``tensorrt_int8_prediction``), and the report shows the table
"TensorRT int8 accuracy (predicted on CPU; latency needs TensorRT)".
"""

from __future__ import annotations

from pathlib import Path

TITLE = "TensorRT int8 accuracy (predicted on CPU; latency needs TensorRT)"


def enabled(cfg) -> bool:
    """The sweep option, on only when the sweep builds int8 at all."""
    return bool(getattr(cfg, "tensorrt_int8_prediction", True)) and "int8" in cfg.precisions


def predict(sweep, res: int, ft: bool, onnx_path: str, onnx_sha: str) -> dict:
    """Make (or reuse) the TensorRT-flavored int8 variant and measure its top-1 on ORT CPU.

    Args:
        sweep: the running ``_Sweep`` (its variant stage, evaluation images and store are reused).
        res, ft: resolution and fine-tuned flag of the model.
        onnx_path, onnx_sha: its fp32 ONNX.
    Returns:
        One row: resolution, finetuned, top1 (+ 95% CI), n, flavor, float_parts, variant sha256.
    """
    from fixres_deploy.backends.onnxruntime_backend import OnnxRuntimeRunner
    from fixres_deploy.fixres.evaluate import evaluate_runner_on_arrays, pack_bits
    from fixres_deploy.precision.qdq_fp16 import ort_graph_optimization_for

    var_path, var_sha, quant = sweep.variant(res, onnx_path, onnx_sha, "int8", "tensorrt", ft)

    def do_predict(d: Path) -> dict:
        x, y, idx, skipped = sweep.eval_cache.get(res)
        runner = OnnxRuntimeRunner(
            var_path,
            threads=sweep.cfg.threads,
            graph_optimization=ort_graph_optimization_for(var_path, "all"),
        )
        r = evaluate_runner_on_arrays(runner, x, y, idx, skipped, sweep.max_batch, fixed_batch=False)
        return {
            "top1": r.top1,
            "top1_ci": list(r.top1_ci),
            "n": r.n,
            "correct1_bits": pack_bits(r.correct1),
            "graph_optimization": runner.graph_optimization,
        }

    inputs = {
        "variant": var_sha,
        "eval": sweep.eval_hash,
        "preprocess": sweep.base_cfg.at_resolution(res).to_dict(),
        "versions": sweep.versions,
    }
    rec = sweep._run("trt_int8_prediction", inputs, do_predict, f"TensorRT int8 (predicted) @{res}")
    return {
        "resolution": res,
        "finetuned": ft,
        **{k: rec["result"][k] for k in ("top1", "top1_ci", "n", "graph_optimization")},
        "flavor": quant.get("flavor"),
        "float_layers": quant.get("float_layers"),
        "variant_sha256": var_sha,
    }


def with_fp32_reference(rows: list[dict], points) -> list[dict]:
    """Each row plus the fp32 top-1 of the same model on ONNX Runtime (when measured) and the drop."""
    out = []
    for row in rows:
        ref = next(
            (
                p
                for p in points
                if p.ok
                and p.precision == "fp32"
                and p.resolution == row["resolution"]
                and p.finetuned == row["finetuned"]
                and p.backend == "onnxruntime"
            ),
            None,
        )
        fp32 = ref.top1 if ref is not None else None
        drop = None if fp32 is None or row.get("top1") is None else round(100 * (fp32 - row["top1"]), 2)
        out.append({**row, "fp32_top1": fp32, "drop_pts": drop})
    return out


def markdown(rows: list[dict]) -> list[str]:
    """The report section (no lines when the sweep made no prediction)."""
    if not rows:
        return []
    lines = [
        f"## {TITLE}",
        "",
        "The TensorRT-flavored int8 graph (symmetric s8 Q/DQ, zero point 0, float parts fp16) run on "
        "ONNX Runtime CPU: the top-1 TensorRT int8 engines should reach, up to kernel rounding.",
        "",
        "| resolution | FixRes | TensorRT int8 top-1 (95% CI) | fp32 top-1 (ORT) | drop (pts) | n |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["resolution"], r["finetuned"])):
        ci = r.get("top1_ci") or [None, None]
        ci_s = f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci[0] is not None else ""
        fp32 = f"{100 * r['fp32_top1']:.2f}%" if r.get("fp32_top1") is not None else "-"
        drop = f"{r['drop_pts']:+.2f}" if r.get("drop_pts") is not None else "-"
        lines.append(
            f"| {r['resolution']} | {'yes' if r['finetuned'] else 'no'} | {100 * r['top1']:.2f}%{ci_s} | "
            f"{fp32} | {drop} | {r['n']} |"
        )
    return lines + [""]
