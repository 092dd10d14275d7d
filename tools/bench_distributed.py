#!/usr/bin/env python
"""Images/s per process of the FixRes fine-tune with 1 and 2 processes (torch.distributed, gloo on CPU).

Each configuration launches N processes as torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT)
and every rank runs the same ``fixres_finetune`` (activation cache built over its share of
the images, then ``--epochs`` epochs on the global batch with DDP, then the exact BN pass).
Reported per configuration, as the median of ``--repeats`` runs:

* images/s per process — the images a rank read (its share) over its fine-tune time;
* aggregate images/s — all images over the slowest rank's time;
* the time split between building the cache (trunk forward) and training the tail.

On one machine the cores are shared: with 2 cores, 2 processes of 1 thread each do not beat
1 process of 2 threads; the figure then shows the per-process overhead of distribution
(gradient all-reduce every step, the BN-statistics and gather collectives).

    python -m fixres_deploy demo-data --out runs/demo
    python tools/bench_distributed.py --data runs/demo/train --procs 1,2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def worker(args) -> int:
    import torch

    from fixres_deploy.core import distributed
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.core.utils import write_json
    from fixres_deploy.data.folders import index_image_folder
    from fixres_deploy.fixres.finetune import FinetuneOptions, fixres_finetune
    from fixres_deploy.models.registry import build_model

    torch.set_num_threads(args.threads)
    with distributed.session():
        torch.manual_seed(0)
        index = index_image_folder(args.data)
        model = build_model(args.model, len(index.classes))[0].eval()
        opts = FinetuneOptions(epochs=args.epochs, batch_size=args.batch_size, lr=0.05, workers=0)
        stats = fixres_finetune(model, index, PreprocessConfig(test_input_size=args.res), opts)
        rank, world = distributed.shard()
        local = len(range(rank, len(index), world))
        rows = distributed.all_gather_object(
            {"rank": rank, "images": local, "cache_build_s": stats.cache_build_s, "train_s": stats.train_s}
        )
        distributed.main_only(lambda: write_json(args.worker, {"world": world, "n": len(index), "ranks": rows}))
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads(world: int, args) -> int:
    return args.threads_per_process or max(1, (os.cpu_count() or 1) // world)


def launch(world: int, args, out: str) -> dict:
    port = _free_port()
    threads = _threads(world, args)
    procs = []
    for r in range(world):
        env = dict(os.environ, FIXRES_NO_PROGRESS="1", OMP_NUM_THREADS=str(threads))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        if world > 1:
            env.update(
                RANK=str(r),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(r),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        cmd = [sys.executable, __file__, "--worker", out, "--data", args.data, "--model", args.model]
        cmd += ["--res", str(args.res), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
        cmd += ["--threads", str(threads)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{world} process run failed: exit codes {codes}")
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root (e.g. the demo data's train/)")
    p.add_argument("--model", default="fixres:tiny_resnet")
    p.add_argument("--procs", default="1,2", help="process counts to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--res", type=int, default=96)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads-per-process", type=int, help="torch threads of each process (default: cores / processes)")
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()
    if args.worker:
        return worker(args)

    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in [int(v) for v in args.procs.split(",")]:
            runs = [launch(world, args, os.path.join(tmp, f"w{world}_{i}.json")) for i in range(args.repeats)]
            per_proc, agg, build, train = [], [], [], []
            for run in runs:
                ranks = run["ranks"]
                per_proc.append(statistics.mean(r["images"] / (r["cache_build_s"] + r["train_s"]) for r in ranks))
                agg.append(run["n"] / max(r["cache_build_s"] + r["train_s"] for r in ranks))
                build.append(max(r["cache_build_s"] for r in ranks))
                train.append(max(r["train_s"] for r in ranks))
            table.append(
                {
                    "processes": world,
                    "threads_per_process": _threads(world, args),
                    "images": runs[0]["n"],
                    "images_per_s_per_process": statistics.median(per_proc),
                    "images_per_s_aggregate": statistics.median(agg),
                    "cache_build_s": statistics.median(build),
                    "train_s": statistics.median(train),
                    "repeats": args.repeats,
                }
            )
    print(
        f"FixRes fine-tune of {args.model} at {args.res} px, {args.epochs} epochs, batch {args.batch_size}, "
        f"{os.cpu_count()} cores; medians of {args.repeats} runs\n"
    )
    print("| processes | threads/process | images/s per process | aggregate images/s | cache build s | train s |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['processes']} | {r['threads_per_process']} | {r['images_per_s_per_process']:.1f} | "
            f"{r['images_per_s_aggregate']:.1f} | {r['cache_build_s']:.2f} | {r['train_s']:.2f} |"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
