"""`fixres-deploy build`: ONNX → engines (ONNX Runtime, TensorRT) × precisions × shapes.

Imports nothing heavy at module level (the library is imported inside the handler).
Exit code 0 when at least one engine was built, 1 when every build failed (errors printed).
"""

from __future__ import annotations

import argparse
import sys

from fixres_deploy.cli.app import _add_limit_arg, _check_pixels, _emit, command


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _human(d: dict) -> str:
    lines = [f"{'name':<34} {'status':<7} {'build_s':>8} {'size_MB':>8}  path / error"]
    for a in d["artifacts"]:
        if a.get("error"):
            lines.append(f"{a['name']:<34} {'FAILED':<7} {'':>8} {'':>8}  {a['error']}")
        else:
            lines.append(f"{a['name']:<34} {'ok':<7} {a['build_s']:>8.2f} {a['size_bytes'] / 1e6:>8.2f}  {a['path']}")
    for v in d.get("variants", []):
        if v.get("error"):
            lines.append(f"variant {v['precision']} {v.get('flavor') or ''}: FAILED {v['error']}")
        else:
            lines.append(
                f"variant {v['precision']} {v.get('flavor') or ''} -> {v['variant_path']} "
                f"(sha256 {v['variant_sha256'][:12]})"
            )
    ok = sum(1 for a in d["artifacts"] if not a.get("error"))
    lines.append(f"{ok}/{len(d['artifacts'])} engines built in {d['build_s']:.1f} s; index: {d['out_dir']}/index.json")
    return "\n".join(lines)


@command("build")
def cmd_build(args: argparse.Namespace) -> int:
    from fixres_deploy.backends.base import BuildOptions
    from fixres_deploy.core.utils import parse_int_list
    from fixres_deploy.engines.build import build_engines

    extra = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    options = BuildOptions(
        threads=args.threads,
        workspace_mb=args.workspace_mb,
        optimization_level=args.opt_level,
        timing_cache=args.timing_cache,
        hardware_compatibility=args.hardware_compat,
        legacy_fp16_flag=args.legacy_fp16,
        tf32=args.tf32,
        extra=extra,
    )
    resolutions = parse_int_list(args.resolutions, "--resolutions")
    batch_sizes = parse_int_list(args.batch_sizes, "--batch-sizes")
    _check_pixels(
        args,
        resolutions,
        batch_sizes + ([args.max_batch] if args.dynamic else []),
        "--resolutions/--batch-sizes/--max-batch",
    )
    float_layers = args.float_layers
    if float_layers not in ("default", "none") and float_layers is not None:
        float_layers = _csv(float_layers)
    elif float_layers == "none":
        float_layers = None
    index = build_engines(
        args.onnx,
        backends=_csv(args.backend),
        precisions=_csv(args.precision),
        resolutions=resolutions,
        dynamic=args.dynamic,
        bands=args.bands,
        batch_sizes=batch_sizes,
        max_batch=args.max_batch,
        calibration_data=args.calibration_data,
        calibration_method=args.calibration_method,
        calibration_limit=args.calibration_limit,
        int8_flavor=args.int8_flavor,
        float_layers=float_layers,
        options=options,
        out_dir=args.out,
    )
    d = index.to_dict()
    _emit(args, d, _human)
    if not index.ok:
        for a in index.failed:
            print(f"fixres-deploy build: {a['name']}: {a['error']}", file=sys.stderr)
        return 1
    return 0


def _build_parser(sub) -> None:
    p = sub.add_parser(
        "build",
        help="build engines (ONNX Runtime, TensorRT) in fp32/fp16/int8 from an exported ONNX",
        description="Make each precision variant once (fp16 graph; int8 Q/DQ calibrated on your images at "
        "the engine's resolution), build one engine per backend x precision x resolution x batch (or one "
        "dynamic engine with profiles), and record everything, failures included, in OUT/index.json.",
    )
    p.add_argument("--onnx", required=True, help="the exported fp32 ONNX (fixres-deploy export)")
    p.add_argument(
        "--backend", default="onnxruntime", help="onnxruntime, tensorrt or torch (comma list); torch needs --checkpoint"
    )
    p.add_argument("--precision", default="fp32", help="fp32, fp16, int8 (comma list)")
    p.add_argument("--resolutions", required=True, help="comma-separated test resolutions, e.g. 160,224")
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="one engine per backend x precision with dynamic profiles over --resolutions",
    )
    p.add_argument("--bands", type=int, default=1, help="dynamic: number of profiles (resolution bands)")
    p.add_argument("--batch-sizes", default="1", help="fixed: one engine per batch size; dynamic: first = opt batch")
    p.add_argument("--max-batch", type=int, default=8, help="dynamic: the profiles' max batch")
    p.add_argument("--calibration-data", help="int8: calibration image folder or manifest (like deployment images)")
    p.add_argument("--calibration-method", default="minmax", choices=["minmax", "percentile", "entropy"])
    p.add_argument("--calibration-limit", type=int, help="int8: at most this many calibration images")
    p.add_argument(
        "--int8-flavor",
        choices=["tensorrt", "ort_cpu"],
        help="Q/DQ flavor for every backend (default: TensorRT symmetric s8, ONNX Runtime its CPU's best)",
    )
    p.add_argument(
        "--float-layers",
        default="default",
        help="int8: 'default' (first conv + classifier stay float), 'none', or comma-separated node names",
    )
    p.add_argument("--checkpoint", help="torch backend: the checkpoint it runs")
    g = p.add_argument_group("engine options")
    g.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    g.add_argument("--workspace-mb", type=int, help="TensorRT workspace memory pool limit")
    g.add_argument("--opt-level", type=int, help="TensorRT builder optimization level 0-5")
    g.add_argument("--timing-cache", help="TensorRT timing cache file (default OUT/tensorrt.timing.cache)")
    g.add_argument(
        "--hardware-compat",
        default="none",
        choices=["none", "ampere_plus", "same_compute_capability"],
        help="TensorRT hardware compatibility level ('same_compute_capability' needs TensorRT >= 10.9)",
    )
    g.add_argument(
        "--tf32",
        action="store_true",
        help="TensorRT fp32 engines may use TF32 tensor cores (default: cleared, fp32 is fp32; recorded in the index)",
    )
    g.add_argument(
        "--legacy-fp16",
        action="store_true",
        help="TensorRT 10 only: BuilderFlag.FP16 on the fp32 graph (refused on TensorRT 11)",
    )
    p.add_argument("--out", required=True, help="build folder (index.json, engines, variants/)")
    _add_limit_arg(p)
    p.add_argument("--json", action="store_true", help="print the index as one JSON document")


PARSERS = [_build_parser]
