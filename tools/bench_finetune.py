#!/usr/bin/env python
"""FixRes on real photos: the paper-style table and the activation-cache speedup.

Trains a base model at a low resolution on an ImageFolder (e.g. Imagenette's 224 px copy),
holds out a split by file-name hash, then for each test resolution reports top-1 (95% CI)
without fine-tuning and after the FixRes fine-tune, and measures the fine-tune cost with and
without the activation cache side by side (same options, same batches, one run).

    python tools/bench_finetune.py --data ../shared/data/imagenette-224/train --out runs/imagenette

The base checkpoint is reused when it exists (``--out``/base_r{K}.pt), so the table can be
re-run without re-training. Prints Markdown; writes ``results.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="torchvision:resnet18")
    p.add_argument("--train-res", type=int, default=64)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--scale", default="0.25,1.0", help="RandomResizedCrop area range (torchvision's default: 0.08,1.0)")
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--resolutions", default="64,80,96,112,128,160")
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--augmentation", default="test", choices=["test", "test2"])
    p.add_argument("--speed-res", type=int, default=128, help="resolution of the cached-vs-naive timing")
    p.add_argument("--speed-repeats", type=int, default=2)
    p.add_argument("--speed-limit", type=int, default=2000, help="images used in the timing runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-table", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args()

    import torch

    from fixres_deploy.core.preprocess import resolve_preprocess
    from fixres_deploy.core.utils import parse_int_list, write_json
    from fixres_deploy.data.folders import index_image_folder, split_by_hash
    from fixres_deploy.fixres.finetune import FinetuneOptions, finetune_resolutions, fixres_finetune
    from fixres_deploy.measure.sysload import LoadMonitor
    from fixres_deploy.models.registry import load_model
    from fixres_deploy.models.train import TrainOptions, train_and_save

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    index = index_image_folder(args.data)
    train_index, val_index = split_by_hash(index, args.val_fraction)
    print(
        f"# FixRes on {args.data}\n\n{len(train_index)} train / {len(val_index)} held-out images "
        f"(file-name hash split, fraction {args.val_fraction}), {len(index.classes)} classes\n"
    )
    ckpt = os.path.join(args.out, f"base_r{args.train_res}.pt")
    results: dict = {"args": vars(args), "n_train": len(train_index), "n_val": len(val_index)}
    if not os.path.exists(ckpt):
        t0 = time.perf_counter()
        summary = train_and_save(
            args.model,
            train_index,
            ckpt,
            TrainOptions(
                train_res=args.train_res,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.batch_size,
                channels_last=True,
                scale=tuple(float(v) for v in args.scale.split(",")),
            ),
        )
        results["train"] = {
            "seconds": time.perf_counter() - t0,
            "images_per_s": summary["images_per_s"],
            "last_epoch": summary["history"][-1],
        }
        print(
            f"trained {args.model} at {args.train_res} px for {args.epochs} epochs in "
            f"{results['train']['seconds'] / 60:.1f} min ({summary['images_per_s']:.0f} img/s)\n"
        )
    loaded = load_model(None, checkpoint=ckpt)
    cfg = resolve_preprocess(loaded.preprocess, test_input_size=args.train_res)
    opts = FinetuneOptions(epochs=args.ft_epochs, augmentation=args.augmentation)

    if not args.skip_table:
        rows = finetune_resolutions(
            loaded,
            train_index,
            val_index,
            cfg,
            parse_int_list(args.resolutions),
            out_dir=os.path.join(args.out, "finetuned"),
            opts=opts,
        )
        results["table"] = [r.to_dict() for r in rows]
        base = next((r.top1_before for r in rows if r.resolution == args.train_res), None)
        print("| test res | top-1 no fine-tune [95% CI] | top-1 FixRes [95% CI] | Δ vs train res |")
        print("|---:|---|---|---:|")
        for r in rows:
            delta = f"{(r.top1_after - base) * 100:+.1f} pts" if base is not None else ""
            print(
                f"| {r.resolution} | {r.top1_before * 100:.1f} [{r.top1_before_ci[0] * 100:.1f}, "
                f"{r.top1_before_ci[1] * 100:.1f}] | {r.top1_after * 100:.1f} [{r.top1_after_ci[0] * 100:.1f}, "
                f"{r.top1_after_ci[1] * 100:.1f}] | {delta} |"
            )
        print(
            f"\nfine-tune: {args.ft_epochs} epochs, {args.augmentation} DA, classifier + "
            f"{rows[0].finetune['fixres_modules']['bn_names']} (n = {rows[0].n} held-out images)\n"
        )

    if not args.skip_speed:
        import copy

        from fixres_deploy.data.folders import class_balanced_subset

        sub = class_balanced_subset(train_index, max(1, args.speed_limit // len(index.classes)))
        speed_cfg = cfg.at_resolution(args.speed_res)
        timings: dict[str, list[float]] = {"cached": [], "naive": []}
        loads = []
        for rep in range(args.speed_repeats):
            for mode in ("naive", "cached"):  # interleaved, so drift hits both
                model = copy.deepcopy(loaded.model)
                with LoadMonitor() as mon:
                    stats = fixres_finetune(
                        model,
                        sub,
                        speed_cfg,
                        FinetuneOptions(epochs=args.ft_epochs, cache=(mode == "cached"), final_bn_pass=True),
                    )
                loads.append(mon.result().get("other_cores_busy"))
                assert stats.mode == mode, stats.mode
                timings[mode].append(stats.total_s)
                print(
                    f"  repeat {rep + 1} {mode}: {stats.total_s:.1f} s "
                    f"(cache build {stats.cache_build_s:.1f} s, train {stats.train_s:.1f} s)",
                    flush=True,
                )
        med = {k: statistics.median(v) for k, v in timings.items()}
        results["speed"] = {
            "resolution": args.speed_res,
            "images": len(sub),
            "epochs": args.ft_epochs,
            "seconds": timings,
            "median_s": med,
            "speedup": med["naive"] / med["cached"],
            "other_load_cores": loads,
        }
        print(f"\n| fine-tune @{args.speed_res}, {len(sub)} images, {args.ft_epochs} epochs | median s |")
        print("|---|---:|")
        print(f"| naive loop | {med['naive']:.1f} |\n| activation cache | {med['cached']:.1f} |")
        print(f"| **speedup** | **{med['naive'] / med['cached']:.2f}x** |")
        print(f"\nother processes' CPU load during the runs (cores): {loads}")
    write_json(os.path.join(args.out, "results.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
