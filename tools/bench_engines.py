#!/usr/bin/env python
"""Torch eager vs ONNX Runtime fp32 / fp16 / int8 on this machine: latency and top-1, one run.

For each resolution and batch size it measures, INTERLEAVED (round robin over the engines
within every repeat, so the machine's drift hits all of them alike):

    torch eager | ORT fp32 | ORT fp16 | ORT int8 s8 (symmetric, TensorRT flavor) | ORT int8 u8

latency p50/p90 and the ratios ORT fp32 / torch, fp16 / fp32 and the int8 speedups over
fp32, plus each variant's top-1 on held-out real photos and its drop vs ORT fp32 (paired
McNemar test on the same images). The held-out images are a split of ``--data`` by
file-name hash; int8 calibration uses training-split images at the target resolution.

    python tools/bench_engines.py --data ../shared/data/imagenette-224/train \\
        --checkpoint runs/resnet18_r64.pt --model torchvision:resnet18 --out runs/bench_engines.json
    python tools/bench_engines.py --quick     # tiny end-to-end check (< 2 min), generated data

It is a benchmark, not a test: run it on a quiet machine (the load of other processes is
recorded per measurement and flagged in the table). Prints Markdown; writes JSON.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ENGINES = ("torch", "ort_fp32", "ort_fp16", "ort_int8_s8", "ort_int8_u8")
INT8_FLAVORS = {"ort_int8_s8": "tensorrt", "ort_int8_u8": "ort_cpu"}  # precision.py's flavor names


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", help="ImageFolder root (held-out split by file-name hash); default with --quick: generated demo data"
    )
    p.add_argument("--checkpoint", help="trained weights (a fixres-deploy checkpoint or state dict)")
    p.add_argument("--model", help="model spec, e.g. torchvision:resnet18 (optional with a fixres-deploy checkpoint)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--resolutions", default="64,96,128")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of --data")
    p.add_argument("--eval-limit", type=int, help="evaluate on at most this many held-out images")
    p.add_argument("--calib-images", type=int, default=256, help="int8 calibration images (training split)")
    p.add_argument("--calib-method", default="minmax", choices=["minmax", "percentile", "entropy"])
    p.add_argument(
        "--float-layers",
        default="default",
        choices=["default", "none"],
        help="int8: keep first conv + classifier in float (default) or quantize everything",
    )
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript", "auto"])
    p.add_argument("--threads", type=int, help="torch threads and ORT intra-op threads (default: libraries' own)")
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--budget-s", type=float, default=3.0, help="timed seconds per engine and shape")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", help="ONNX variants and engines go here (default: a temporary folder)")
    p.add_argument("--out", help="JSON results (default WORK_DIR/bench_engines.json, else ./bench_engines.json)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes: fixres:tiny_resnet, generated data, 32/48 px, batch 1,4, short timings",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.model = args.model or "fixres:tiny_resnet"
        if args.resolutions == "64,96,128":
            args.resolutions = "32,48"
        if args.batch_sizes == "1,8":
            args.batch_sizes = "1,4"
        args.eval_limit = args.eval_limit or 40
        args.calib_images = min(args.calib_images, 16)
        args.exporter = "torchscript" if args.exporter == "dynamo" else args.exporter
    elif not args.data:
        p.error("--data is required (or --quick for a generated-data smoke run)")
    if not (args.checkpoint or args.model):
        p.error("--model or --checkpoint is required")
    return args


def _held_out_cache(reference_predict, held, cfg, batch_size):
    """Evaluate the reference with evaluate_predict_fn while keeping its preprocessed batches.

    The other engines are then scored on exactly the same tensors (same images, same order)
    without decoding every JPEG again per engine.
    """
    from fixres_deploy.fixres.evaluate import evaluate_predict_fn

    batches = []

    def recording(x):
        batches.append(x.copy())
        return reference_predict(x)

    result = evaluate_predict_fn(
        recording, held, cfg, batch_size=batch_size, workers=0, desc=f"torch @{cfg.test_input_size}"
    )
    # shuffle=False: the loader's order is index order, so result.indices line up with the batches
    labels = [held.samples[i].label for i in result.indices]
    return result, batches, labels


def _score(predict, batches, indices, labels, resolution):
    import numpy as np

    from fixres_deploy.fixres.evaluate import AccuracyMeter

    meter = AccuracyMeter()
    pos = 0
    for x in batches:
        n = x.shape[0]
        meter.update(predict(x), np.asarray(labels[pos : pos + n]), np.asarray(indices[pos : pos + n]))
        pos += n
    return meter.result(resolution)


def main(argv=None) -> int:
    args = _args(argv)
    t_start = time.perf_counter()

    import numpy as np
    import torch

    from fixres_deploy.backends.base import BuildOptions, ShapeProfile, ShapeSpec, build_engine, load_runner
    from fixres_deploy.backends.torch_backend import TorchRunner
    from fixres_deploy.core.preprocess import eval_transform, resolve_preprocess
    from fixres_deploy.core.stats import mcnemar_test
    from fixres_deploy.core.utils import parse_int_list, write_json
    from fixres_deploy.data.folders import class_balanced_subset, index_image_folder, load_rgb, split_by_hash
    from fixres_deploy.export.onnx_export import export_onnx
    from fixres_deploy.fixres.evaluate import index_for_model
    from fixres_deploy.measure.bench import LatencyConfig, machine_info, measure_interleaved, measure_peak_gflops
    from fixres_deploy.models.flops import count_flops
    from fixres_deploy.models.registry import load_model
    from fixres_deploy.precision.variants import make_precision_variant

    resolutions = parse_int_list(args.resolutions, "--resolutions")
    batch_sizes = parse_int_list(args.batch_sizes, "--batch-sizes")
    if args.threads:
        torch.set_num_threads(args.threads)
    work_ctx = tempfile.TemporaryDirectory(prefix="bench_engines_") if not args.work_dir else None
    work = args.work_dir or work_ctx.name
    os.makedirs(work, exist_ok=True)
    out_json = args.out or (os.path.join(work, "bench_engines.json") if args.work_dir else "bench_engines.json")
    notes = []

    # ---------------------------------------------------------------- data and model
    data = args.data
    if data is None:  # --quick without data
        from fixres_deploy.data.demo import write_demo_data

        write_demo_data(os.path.join(work, "demo"), train_per_class=12, val_per_class=1)
        data = os.path.join(work, "demo", "train")
        notes.append("generated demo data")
    torch.manual_seed(0)  # reproducible random init when no checkpoint is given
    loaded = load_model(args.model, args.num_classes, args.checkpoint, image_size=max(resolutions))
    if not args.checkpoint:
        notes.append("NO CHECKPOINT: random-init weights, accuracy figures are meaningless")
    index = index_for_model(index_image_folder(data, classes=loaded.class_names), loaded)
    train_idx, held = split_by_hash(index, args.val_fraction)
    if args.eval_limit and len(held) > args.eval_limit:
        per_class = max(1, math.ceil(args.eval_limit / len(index.classes)))
        held = class_balanced_subset(held, per_class)
        held = held.subset(held.samples[: args.eval_limit])
    calib_idx = class_balanced_subset(train_idx, max(1, math.ceil(args.calib_images / len(index.classes))))
    calib_idx = calib_idx.subset(calib_idx.samples[: args.calib_images])
    cfgs = {
        r: resolve_preprocess(
            loaded.preprocess, test_input_size=r, default_mean=loaded.default_mean, default_std=loaded.default_std
        )
        for r in resolutions
    }
    print(
        f"model {loaded.spec}, {len(index.classes)} classes; held-out {len(held)} images, "
        f"calibration {len(calib_idx)} training-split images; work dir {work}",
        file=sys.stderr,
    )

    # ---------------------------------------------------------------- variants
    fp32 = os.path.join(work, "model_fp32.onnx")
    export = export_onnx(
        loaded.model,
        fp32,
        cfgs[resolutions[0]],
        dynamic=True,
        exporter=args.exporter,
        validation_images=held,
        validate_resolutions=resolutions,
        model_spec=loaded.spec,
        class_names=index.classes,
    )
    fp16 = make_precision_variant(fp32, "fp16", os.path.join(work, "model_fp16.onnx"))
    variants = {r: {"ort_fp32": fp32, "ort_fp16": fp16.path} for r in resolutions}
    variant_meta = {"export": export.to_dict(), "fp16": fp16.to_dict(), "int8": {}}
    float_layers = "default" if args.float_layers == "default" else None
    for r in resolutions:
        tf = eval_transform(cfgs[r])
        calib = np.stack([tf(load_rgb(s.path)).numpy() for s in calib_idx.samples]).astype(np.float32)
        for engine, flavor in INT8_FLAVORS.items():
            v = make_precision_variant(
                fp32,
                "int8",
                os.path.join(work, f"model_int8_{flavor}_r{r}.onnx"),
                calibration_batches=calib,
                flavor=flavor,
                method=args.calib_method,
                float_layers=float_layers,
                cache=os.path.join(work, "calib_cache"),
            )
            variants[r][engine] = v.path
            variant_meta["int8"][f"{engine}@{r}"] = v.to_dict()

    # ---------------------------------------------------------------- engines
    max_b = max(batch_sizes + [8])
    opts = BuildOptions(threads=args.threads, save_optimized=False)
    runners = {}
    for r in resolutions:
        spec = ShapeSpec.dynamic([ShapeProfile((1, 3, r, r), (1, 3, r, r), (max_b, 3, r, r))])
        runners[(r, "torch")] = TorchRunner(loaded.model, shapes=spec)
        for engine, path in variants[r].items():
            art = build_engine(
                "onnxruntime",
                path,
                spec,
                opts,
                out_dir=os.path.join(work, "engines"),
                precision=engine.split("_")[1],
                name=f"{engine}_r{r}",
            )
            if art.error:
                raise SystemExit(f"building {engine} at {r} failed: {art.error}")
            runners[(r, engine)] = load_runner(art)

    # ---------------------------------------------------------------- accuracy
    acc = {}
    inputs = {}
    for r in resolutions:
        ref = runners[(r, "torch")]
        with ref:
            res_t, batches, labels = _held_out_cache(ref.predict, held, cfgs[r], max_b)
        inputs[r] = batches
        acc[(r, "torch")] = res_t
        for engine in ENGINES[1:]:
            with runners[(r, engine)] as run:
                acc[(r, engine)] = _score(run.predict, batches, res_t.indices, labels, r)

    # ---------------------------------------------------------------- latency (interleaved)
    latency_cfg = LatencyConfig(warmup_s=args.warmup_s, budget_s=args.budget_s, repeats=args.repeats)
    if args.quick:
        latency_cfg = LatencyConfig.quick()
    peak = measure_peak_gflops(threads=args.threads)
    lat = {}
    for r in resolutions:
        pool = np.concatenate(inputs[r])
        for b in batch_sizes:
            reps = int(math.ceil(b / len(pool)))
            x = np.ascontiguousarray(np.concatenate([pool] * reps)[:b])  # real images, not noise
            print(f"latency @{r} batch {b} ...", file=sys.stderr)
            results = measure_interleaved(
                [(runners[(r, e)], x) for e in ENGINES], latency_cfg, names=[f"{e}@{r}/b{b}" for e in ENGINES]
            )
            for e, res in zip(ENGINES, results):
                lat[(r, b, e)] = res

    # ---------------------------------------------------------------- report
    gflops = {r: count_flops(fp32, r).total_gflops for r in resolutions}
    ref_fp32 = {r: acc[(r, "ort_fp32")] for r in resolutions}
    rows_acc = []
    for r in resolutions:
        for e in ENGINES:
            a = acc[(r, e)]
            test = mcnemar_test(list(ref_fp32[r].correct1), list(a.correct1))
            rows_acc.append(
                {
                    "resolution": r,
                    "engine": e,
                    "top1": a.top1,
                    "top1_ci": list(a.top1_ci),
                    "n": a.n,
                    "drop_vs_fp32_pts": 100 * (ref_fp32[r].top1 - a.top1),
                    "mcnemar_p": test["p_value"],
                }
            )
    rows_lat = []
    for r in resolutions:
        for b in batch_sizes:
            d = {"resolution": r, "batch_size": b, "gflops_per_image": gflops[r]}
            for e in ENGINES:
                d[e] = lat[(r, b, e)].to_dict()
            p50 = {e: lat[(r, b, e)].latency_p50_ms for e in ENGINES}
            d["ratio_ort_fp32_over_torch"] = p50["ort_fp32"] / p50["torch"]
            d["ratio_fp16_over_fp32"] = p50["ort_fp16"] / p50["ort_fp32"]
            d["speedup_int8_s8_vs_fp32"] = p50["ort_fp32"] / p50["ort_int8_s8"]
            d["speedup_int8_u8_vs_fp32"] = p50["ort_fp32"] / p50["ort_int8_u8"]
            d["max_other_load_cores"] = max((lat[(r, b, e)].load or {}).get("other_cores_busy", 0.0) for e in ENGINES)
            d["contended"] = any(lat[(r, b, e)].contended for e in ENGINES)
            rows_lat.append(d)

    lines = [
        f"# Engines on {machine_info().get('cpu_model', 'this CPU')} "
        f"(peak {peak['peak_gflops']:.0f} GFLOP/s fp32 matmul)",
        "",
    ]
    if notes:
        lines += [f"> {n}" for n in notes] + [""]
    lines += [
        "## Latency (ms, p50 / p90; interleaved)",
        "",
        "| res | batch | GFLOP/img | torch | ORT fp32 | ORT fp16 | int8 s8 | int8 u8 | fp32/torch | fp16/fp32 "
        "| s8 speedup | u8 speedup | other load | contended |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in rows_lat:
        cells = [f"{d[e]['latency_p50_ms']:.2f} / {d[e]['latency_p90_ms']:.2f}" for e in ENGINES]
        lines.append(
            f"| {d['resolution']} | {d['batch_size']} | {d['gflops_per_image']:.3f} | "
            + " | ".join(cells)
            + f" | {d['ratio_ort_fp32_over_torch']:.2f} | {d['ratio_fp16_over_fp32']:.2f} "
            f"| {d['speedup_int8_s8_vs_fp32']:.2f}x | {d['speedup_int8_u8_vs_fp32']:.2f}x "
            f"| {d['max_other_load_cores']:.2f} | {'YES' if d['contended'] else 'no'} |"
        )
    lines += [
        "",
        f"## Top-1 on {len(held)} held-out images (drop vs ORT fp32 in points; McNemar p)",
        "",
        "| res | " + " | ".join(ENGINES) + " |",
        "|---|" + "---|" * len(ENGINES),
    ]
    for r in resolutions:
        cells = []
        for e in ENGINES:
            a = next(x for x in rows_acc if x["resolution"] == r and x["engine"] == e)
            cells.append(
                f"{100 * a['top1']:.2f}"
                + ("" if e == "ort_fp32" else f" ({0.0 - a['drop_vs_fp32_pts']:+.2f}, p={a['mcnemar_p']:.2g})")
            )
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)

    write_json(
        out_json,
        {
            "args": vars(args),
            "notes": notes,
            "machine": machine_info(),
            "peak": peak,
            "latency_config": latency_cfg.to_dict(),
            "latency": rows_lat,
            "accuracy": rows_acc,
            "variants": variant_meta,
            "held_out_images": len(held),
            "calibration_images": len(calib_idx),
            "seconds": time.perf_counter() - t_start,
        },
    )
    print(f"\nwrote {out_json} in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    if work_ctx is not None:
        print("(the ONNX variants were in a temporary folder: pass --work-dir to keep them)", file=sys.stderr)
    if work_ctx is not None:
        work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
