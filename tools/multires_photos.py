"""FixRes checkpoints of EfficientNet-Lite0 on real photos, for the adaptive-serving load test.

The demo's tiny_resnet is too small for the input resolution to matter against per-request
HTTP and decoding costs (docs/serving.md). This makes checkpoints of a model whose inference
dominates: EfficientNet-Lite0 with its ImageNet weights (the ``efficientnet`` extra, no
download), a linear probe trained at ``--train-res`` on a class-balanced subset of an image
folder (e.g. Imagenette), then per lower resolution a FixRes adaptation of the pre-pool
BatchNorm statistics (``bn_stats_only``: one pass, no gradients; the cached fine-tune path
does not handle this model). At ``--train-res`` the base model is the checkpoint.

    python tools/multires_photos.py --data /path/to/imagenette-224/train --out runs/photos \\
        --resolutions 128,160 --train-res 224
    fixres-deploy export-multires --checkpoints runs/photos/ck/model_r*.pt --bundle runs/photos/bundle \\
        --val-data runs/photos/val --validation-data runs/photos/val --latency-images runs/photos/val \\
        --threads 1 --workers 1

Writes OUT/base.pt, OUT/ck/model_r{R}.pt and OUT/val (links to the held-out images: a hash split
of --data, never trained on).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder of photos (a training split)")
    p.add_argument("--out", required=True)
    p.add_argument("--resolutions", default="128,160", help="resolutions to adapt to (besides --train-res)")
    p.add_argument("--train-res", type=int, default=224, help="the linear probe's resolution (multiple of 32)")
    p.add_argument("--train-per-class", type=int, default=30)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    sys.path.insert(0, REPO)
    import torch

    from fixres_deploy.core.preprocess import PreprocessConfig, eval_transform
    from fixres_deploy.data.folders import (
        class_balanced_subset,
        index_image_folder,
        link_index,
        load_rgb,
        split_by_hash,
    )
    from fixres_deploy.fixres.finetune import FinetuneOptions, finetune_resolutions
    from fixres_deploy.models.registry import LoadedModel, build_model, fixres_record, save_checkpoint

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    res = [int(r) for r in args.resolutions.split(",") if r]
    index = index_image_folder(args.data)
    train, val = split_by_hash(index, 0.1)
    train = class_balanced_subset(train, args.train_per_class, seed=0)
    val = class_balanced_subset(val, args.val_per_class, seed=0)
    link_index(val, os.path.join(args.out, "val"))
    model, mean, std = build_model("fixres:efficientnet_lite0", len(index.classes))
    model.eval()
    cfg = PreprocessConfig(
        test_input_size=args.train_res,
        train_input_size=args.train_res,
        mean=mean or (0.485, 0.456, 0.406),
        std=std or (0.229, 0.224, 0.225),
    )
    t0 = time.time()
    tf = eval_transform(cfg)
    x = torch.stack([tf(load_rgb(s.path)) for s in train.samples])
    y = torch.tensor([s.label for s in train.samples])
    fc, model._fc = model._fc, torch.nn.Identity()
    with torch.inference_mode():
        feats = torch.cat([model(x[i : i + 32]) for i in range(0, len(x), 32)]).clone()
    model._fc = fc
    opt = torch.optim.Adam(fc.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(fc(feats), y)
        loss.backward()
        opt.step()
    print(f"linear probe at {args.train_res} px: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    kw = {"spec": "fixres:efficientnet_lite0", "num_classes": len(index.classes), "class_names": index.classes}
    save_checkpoint(os.path.join(args.out, "base.pt"), model, preprocess=cfg.to_dict(), **kw)
    save_checkpoint(
        os.path.join(args.out, "ck", f"model_r{args.train_res}.pt"),
        model,
        preprocess=cfg.to_dict(),
        fixres=fixres_record(
            args.train_res, {"note": f"the base model: its linear probe was trained at {args.train_res} px"}
        ),
        **kw,
    )
    loaded = LoadedModel(
        model=model, spec=kw["spec"], num_classes=kw["num_classes"], class_names=index.classes, preprocess=cfg.to_dict()
    )
    results = finetune_resolutions(
        loaded,
        train,
        val,
        cfg,
        [r for r in res if r != args.train_res],
        out_dir=os.path.join(args.out, "ck"),
        opts=FinetuneOptions(bn_stats_only=True, cache=False, batch_size=32, workers=0),
    )
    for r in results:
        print(f"{r.resolution} px: top-1 {r.top1_before:.4f} -> {r.top1_after:.4f} ({r.checkpoint})", flush=True)
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
