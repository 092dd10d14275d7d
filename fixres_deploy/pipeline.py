"""End-to-end jobs: the demo on built-in data (and, as capabilities land, the full pipeline).

``fixres-deploy demo --out DIR`` writes the procedurally generated data set, trains a small
base model at 64 px with RandomResizedCrop, computes the resolution prior, and measures the
paper's curve: top-1 per test resolution without and with FixRes fine-tuning.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from fixres_deploy.errors import UserInputError
from fixres_deploy.utils import read_json, stable_hash, write_json

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
    "test": DemoRecipe(train_per_class=80, val_per_class=40, epochs=20),
}


def prepare_demo_model(out: str | os.PathLike, *, size: str = "full") -> dict:
    """Write the demo data and train the base model (both reused when already there).

    Returns:
        dict with ``data``, ``train``, ``val`` (folders), ``checkpoint``, ``recipe`` and
        ``train_seconds`` (0 when reused).
    """
    from fixres_deploy.data import index_image_folder
    from fixres_deploy.demo_data import write_demo_data
    from fixres_deploy.train import TrainOptions, train_and_save

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
        opts = TrainOptions(train_res=recipe.train_res, epochs=recipe.epochs, scale=recipe.scale,
                            lr=0.2, channels_last=False)
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


def run_demo(out: str | os.PathLike, *, size: str = "full", resolutions: list[int] | None = None) -> dict:
    """`fixres-deploy demo`: the whole job on the built-in data; writes DIR/fixres_curve.json/.md."""
    from fixres_deploy.finetune import FinetuneOptions, finetune_resolutions
    from fixres_deploy.data import index_image_folder
    from fixres_deploy.models import load_model
    from fixres_deploy.preprocess import resolve_preprocess
    from fixres_deploy.prior import image_sizes_from_folder, resolution_prior

    t0 = time.perf_counter()
    prep = prepare_demo_model(out, size=size)
    recipe: DemoRecipe = prep["recipe"]
    prior = resolution_prior(
        recipe.train_res, scale=recipe.scale, stride=recipe.stride,
        image_sizes=image_sizes_from_folder(prep["train"], limit=500), samples=50_000,
    )
    cands = resolutions or sorted(set(prior.candidates) | {recipe.train_res})
    loaded = load_model(None, checkpoint=prep["checkpoint"])
    cfg = resolve_preprocess(loaded.preprocess, test_input_size=recipe.train_res)
    train_index = index_image_folder(prep["train"], classes=loaded.class_names)
    val_index = index_image_folder(prep["val"], classes=loaded.class_names)
    results = finetune_resolutions(
        loaded, train_index, val_index, cfg, cands, out_dir=os.path.join(os.fspath(out), "finetuned"),
        opts=FinetuneOptions(epochs=recipe.finetune_epochs),
    )
    summary = {
        "recipe": recipe.__dict__,
        "prior": prior.to_dict(),
        "train_res": recipe.train_res,
        "curve": [r.to_dict() for r in results],
        "base_checkpoint": prep["checkpoint"],
        "train_seconds": prep["train_seconds"],
        "seconds": time.perf_counter() - t0,
    }
    write_json(os.path.join(os.fspath(out), "fixres_curve.json"), summary)
    _write_curve_markdown(os.path.join(os.fspath(out), "fixres_curve.md"), summary)
    return summary


def _write_curve_markdown(path: str, summary: dict) -> None:
    from fixres_deploy.utils import atomic_path

    lines = [
        "# FixRes on the built-in demo data",
        "",
        f"Base model `{summary['recipe']['model']}` trained at {summary['train_res']} px "
        f"(RandomResizedCrop scale {tuple(summary['recipe']['scale'])}).",
        "",
        summary["prior"]["explanation"],
        "",
        "| test res | top-1 no fine-tune [95% CI] | top-1 FixRes fine-tuned [95% CI] |",
        "|---:|---|---|",
    ]
    for r in summary["curve"]:
        lines.append(
            f"| {r['resolution']} | {r['top1_before']:.3f} [{r['top1_before_ci'][0]:.3f}, {r['top1_before_ci'][1]:.3f}]"
            f" | {r['top1_after']:.3f} [{r['top1_after_ci'][0]:.3f}, {r['top1_after_ci'][1]:.3f}] |"
        )
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
