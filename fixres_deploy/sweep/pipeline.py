"""End-to-end jobs: ``fixres-deploy run`` (a TOML config) and ``fixres-deploy demo``.

Data flows one way: config → prior → fine-tune → export → build → sweep → select → report →
bundle. ``demo --out DIR`` does it on the built-in data: it writes the procedurally generated
data set, trains a small base model at 64 px with RandomResizedCrop, and runs the pipeline.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.schema import stamp
from fixres_deploy.core.utils import read_json, stable_hash, write_json
from fixres_deploy.sweep.config import PipelineConfig, SelectionConfig, SweepConfig, write_effective_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes of the demo; ``full`` is the README's command, ``test`` the CI-sized version."""

    train_per_class: int
    val_per_class: int
    epochs: int
    train_res: int = 64
    model: str = "fixres:tiny_resnet"
    stride: int = 16  # total stride of fixres:tiny_resnet
    scale: tuple[float, float] = (0.08, 1.0)
    finetune_epochs: int = 8


DEMO_RECIPES = {
    "full": DemoRecipe(train_per_class=120, val_per_class=60, epochs=30),
    # Same base model as "full" (fewer steps stall in a loss plateau: 800 images x 20 epochs
    # gave 28-56% top-1 against 92% here), fewer held-out images and a smaller sweep.
    "test": DemoRecipe(train_per_class=120, val_per_class=40, epochs=30),
}


def prepare_demo_model(out: str | os.PathLike, *, size: str = "full") -> dict:
    """Write the demo data and train the base model (both reused when already there).

    Returns:
        dict with ``data``, ``train``, ``val`` (folders), ``checkpoint``, ``recipe`` and
        ``train_seconds`` (0 when reused).
    """
    from fixres_deploy.data.demo import write_demo_data
    from fixres_deploy.data.folders import index_image_folder
    from fixres_deploy.models.train import TrainOptions, train_and_save

    if size not in DEMO_RECIPES:
        raise UserInputError(f"demo size must be one of {sorted(DEMO_RECIPES)}, got {size!r}")
    recipe = DEMO_RECIPES[size]
    out = os.fspath(out)
    data = os.path.join(out, "data")
    write_demo_data(data, train_per_class=recipe.train_per_class, val_per_class=recipe.val_per_class)
    ckpt = os.path.join(out, "base", "base_model.pt")
    marker = os.path.join(out, "base", "recipe.json")
    key = stable_hash(recipe.__dict__)
    seconds = 0.0
    if not (os.path.exists(ckpt) and os.path.exists(marker) and read_json(marker).get("key") == key):
        opts = TrainOptions(
            train_res=recipe.train_res, epochs=recipe.epochs, scale=recipe.scale, lr=0.2, channels_last=False
        )
        t0 = time.perf_counter()
        train_and_save(recipe.model, index_image_folder(os.path.join(data, "train")), ckpt, opts)
        seconds = time.perf_counter() - t0
        write_json(marker, {"key": key, "recipe": recipe.__dict__, "train_seconds": seconds})
    return {
        "data": data,
        "train": os.path.join(data, "train"),
        "val": os.path.join(data, "val"),
        "checkpoint": ckpt,
        "recipe": recipe,
        "train_seconds": seconds,
    }


def run_pipeline(pc: PipelineConfig) -> dict:
    """`fixres-deploy run`: prior → fine-tune → export → build → sweep → select → report → bundle.

    Resumable: every measured stage is in the result store, so a second run (or a run after
    an interruption) only computes what is missing. The inputs are checked before anything
    is written; then ``OUT/config.effective.toml`` records the config this run used.
    """
    from fixres_deploy.choose.report import write_report
    from fixres_deploy.core.paths import check_out
    from fixres_deploy.sweep.shard import shard_summary
    from fixres_deploy.sweep.sweep import run_sweep

    t0 = time.perf_counter()
    pc.validate()
    check_out(pc.out, "dir", flag="--out ([output] dir)")
    summary_config = write_effective_config(pc, pc.out)
    sweep = run_sweep(pc.sweep, pc.out)
    if pc.sweep.shard:  # a shard computes its stages only; an unsharded run assembles (sweep/shard.py)
        return shard_summary(pc.sweep, pc.out, sweep.store_misses, sweep.store_hits, time.perf_counter() - t0)
    rep = write_report(sweep, pc.out, pc.select)
    summary = {
        "out": pc.out,
        "report": os.path.join(pc.out, "report.json"),
        "report_md": os.path.join(pc.out, "report.md"),
        "selected": rep["selected"],
        "reason": rep["reason"],
        "iso_latency_gain": rep["iso_latency_gain"],
        "iso_accuracy_speedup": rep["iso_accuracy_speedup"],
        "sweep_seconds": sweep.seconds,
        "store": {"hits": sweep.store_hits, "misses": sweep.store_misses},
        "config": summary_config,
    }
    if pc.bundle:
        from fixres_deploy.ship.bundle_select import bundle_selected

        summary["bundle"] = bundle_selected(
            sweep,
            rep,
            os.path.join(pc.out, "bundle"),
            tar=pc.tar,
            triton_dir=os.path.join(pc.out, "triton") if pc.triton else None,
            overwrite=True,
        )  # the pipeline's own output: replaced on re-runs
    summary["seconds"] = time.perf_counter() - t0
    write_run_summary(pc.out, summary)
    return summary


RUN_FORMAT = "fixres-deploy/run"
RUN_SCHEMA_VERSION = 1


def write_run_summary(out: str, summary: dict) -> str:
    """OUT/run.json: what one `run`/`demo` did, for people and scripts (nothing in the package reads it back)."""
    path = os.path.join(out, "run.json")
    write_json(path, stamp(summary, RUN_FORMAT, RUN_SCHEMA_VERSION))
    return path


def demo_pipeline_config(out: str, prep: dict, *, size: str = "full") -> PipelineConfig:
    """The demo's pipeline: prior candidates, ORT fp32/fp16/int8, batch 1 and 8, both shape modes."""
    recipe: DemoRecipe = prep["recipe"]
    quick = size == "test"
    sweep = SweepConfig(
        checkpoint=prep["checkpoint"],
        train_data=prep["train"],
        eval_data=prep["val"],
        train_res=recipe.train_res,
        prior_stride=recipe.stride,
        resolutions=[64, 96] if quick else None,
        backends=["onnxruntime"],
        precisions=["fp32", "int8"] if quick else ["fp32", "fp16", "int8"],
        batch_sizes=[1, 8] if not quick else [4],
        shape_modes=["fixed", "dynamic"] if not quick else ["fixed"],
        finetune_epochs=recipe.finetune_epochs,
        calibration_size=100 if quick else 200,
        exporter="torchscript" if quick else "dynamo",
        latency="quick",
        # one ONNX Runtime thread: the demo's 0.1-0.2 ms engines jitter by 20-40% per round on
        # a 2-thread pool (the selected-vs-naive ratio then stayed tied at 14 rounds); on one
        # thread their paired ratios resolve (docs/measurement.md §7)
        threads=1,
        store=os.path.join(out, "store"),
    )
    return PipelineConfig(
        sweep=sweep, select=SelectionConfig(batch_size=None), out=out, bundle=True, tar=False, triton=True
    )


def run_demo(out: str | os.PathLike, *, size: str = "full") -> dict:
    """`fixres-deploy demo`: the whole job on the built-in data.

    Leaves OUT/report.json, OUT/report.md with PNG plots, OUT/bundle/ (engine, manifest,
    labels) and OUT/triton/ (a Triton model repository).
    """
    t0 = time.perf_counter()
    out = os.fspath(out)
    prep = prepare_demo_model(out, size=size)
    summary = run_pipeline(demo_pipeline_config(out, prep, size=size))
    summary["train_seconds"] = prep["train_seconds"]
    summary["seconds"] = time.perf_counter() - t0
    write_run_summary(out, summary)
    return summary
