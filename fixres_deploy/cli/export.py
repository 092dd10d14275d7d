"""`fixres-deploy export` and `fixres-deploy calibration`.

Imports nothing heavy at module level; each handler calls one library function.
"""

from __future__ import annotations

import argparse

from fixres_deploy.cli.app import (
    _add_limit_arg,
    _add_model_args,
    _add_preprocess_args,
    _check_pixels,
    _common,
    _emit,
    _set_threads,
    command,
    load_from_args,
    preprocess_from_args,
)

# --------------------------------------------------------------------------- export


def _export_human(r: dict) -> str:
    v = r.get("validation") or {}
    shape = "x".join(str(d) for d in r["input_shape"])
    lines = [
        f"wrote {r['path']} ({r['size_bytes'] / 1e6:.2f} MB, sha256 {r['sha256'][:12]}) with {r['exporter']}"
        f" in {r['export_s']:.1f} s, opset {r['opset']}",
        f"input '{r['input_name']}' {shape} -> output '{r['output_name']}'"
        f"{' (dynamic batch/height/width)' if r['dynamic'] else ''}",
    ]
    if r.get("fallback_reason"):
        lines.append(f"note: dynamo exporter failed ({r['fallback_reason']}); used torchscript")
    if v:
        lines.append(
            f"validated vs torch at {r['validate_resolutions']} px: max abs diff {v['max_abs_diff']:.3g}, "
            f"max rel err {v['max_rel_err']:.3g}, {len(v['runs'])} runs passed"
        )
    lines.append(f"record: {r['path']}.json")
    return "\n".join(lines)


@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    from fixres_deploy.core.errors import UserInputError
    from fixres_deploy.core.utils import parse_int_list
    from fixres_deploy.export.onnx_export import export_checkpoint

    _set_threads(args)
    if not args.checkpoint and not args.weights:
        raise UserInputError("export needs --checkpoint (or --weights): a random-init model is not worth shipping")
    resolutions = (
        parse_int_list(args.validate_resolutions, "--validate-resolutions") if args.validate_resolutions else None
    )
    _check_pixels(
        args, [args.resolution, *(resolutions or [])], [args.batch_size], "--resolution/--validate-resolutions"
    )
    loaded = load_from_args(args, image_size=args.resolution)
    cfg = preprocess_from_args(args, loaded, args.resolution)
    result = export_checkpoint(
        loaded,
        args.out,
        cfg,
        dynamic=args.dynamic,
        resolutions=resolutions,
        exporter=args.exporter,
        input_name=args.input_name,
        output_name=args.output_name,
        validation_data=args.validation_data,
        batch_size=args.batch_size,
        opset=args.opset,
    )
    _emit(args, result.to_dict(), _export_human)
    return 0


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (preprocessing in the metadata), validated against torch",
        description="Export to ONNX, fixed N x 3 x K x K or with dynamic batch/height/width axes, and check "
        "ONNX Runtime against torch on real images at every resolution it will serve.",
    )
    _add_model_args(p)
    _add_preprocess_args(p)
    p.add_argument(
        "--resolution",
        type=int,
        required=True,
        help="K: the input size of a fixed export, the reference size of a dynamic one",
    )
    p.add_argument("--out", required=True, help="output .onnx (a <out>.json record is written beside it)")
    p.add_argument("--dynamic", action="store_true", help="symbolic batch, height and width axes")
    p.add_argument("--batch-size", type=int, default=1, help="N of a fixed export")
    p.add_argument(
        "--exporter",
        choices=["dynamo", "torchscript", "auto"],
        default="dynamo",
        help="torch.export-based (default), legacy TorchScript, or dynamo then torchscript",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--input-name", default="input")
    p.add_argument("--output-name", default="logits")
    p.add_argument(
        "--validate-resolutions", help="comma-separated K values to validate at (default: K; dynamic: K-32,K,K+32)"
    )
    p.add_argument(
        "--validation-data",
        help="ImageFolder of images like your deployment data (default: a few rendered demo images)",
    )
    _add_limit_arg(p)
    _common(p)


# --------------------------------------------------------------------------- calibration


@command("calibration")
def cmd_calibration(args: argparse.Namespace) -> int:
    from fixres_deploy.precision.calibration import make_calibration_manifest

    manifest = make_calibration_manifest(args.data, args.out, size=args.size, seed=args.seed)
    d = manifest.to_dict()
    summary = {k: v for k, v in d.items() if k != "images"} | {"manifest": args.out}
    counts: dict[str, int] = {}
    for item in d["images"]:
        counts[item.get("class", str(item["label"]))] = counts.get(item.get("class", str(item["label"])), 0) + 1
    summary["per_class"] = counts
    _emit(
        args,
        summary,
        lambda s: (
            f"wrote {s['manifest']}: {s['n_images']} images from {s['root']} "
            f"({len(s['classes'])} classes, {min(counts.values())}-{max(counts.values())} per class), "
            f"set hash {s['set_hash'][:12]}"
        ),
    )
    return 0


def _calibration_parser(sub) -> None:
    p = sub.add_parser(
        "calibration",
        help="sample a class-balanced int8 calibration set (a hashed JSON manifest)",
        description="Write a calibration manifest: image paths relative to --data with sha256, "
        "class-balanced, reproducible with --seed. See calibration/README.md.",
    )
    p.add_argument("--data", required=True, help="ImageFolder root to sample from (images like deployment ones)")
    p.add_argument("--out", required=True, help="manifest path, e.g. calibration/NAME.json")
    p.add_argument("--size", type=int, default=512, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


PARSERS = [_export_parser, _calibration_parser]
