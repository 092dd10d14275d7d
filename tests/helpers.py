"""Plain helper functions shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np


def spread_model(images: np.ndarray, num_classes: int = 10, seed: int = 0):
    """tiny_resnet with BN statistics from real images and a wide classifier.

    Random-init models give near-constant logits (no evidence for value checks); these give
    input-dependent predictions in a fraction of a second, without training.
    """
    import torch

    from fixres_deploy.models.registry import build_model

    torch.manual_seed(seed)
    model = build_model("fixres:tiny_resnet", num_classes)[0]
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the one pass
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images))
    model.eval()
    torch.nn.init.normal_(model.fc.weight, std=0.5)
    return model


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def fixres_checkpoints(demo: dict, out_dir, resolutions, *, epochs: int = 1) -> list[str]:
    """FixRes checkpoints of the demo base model at ``resolutions`` (fine-tuned on its train split)."""
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.data.folders import class_balanced_subset, index_image_folder
    from fixres_deploy.fixres.finetune import FinetuneOptions, finetune_resolutions
    from fixres_deploy.models.registry import load_model

    loaded = load_model(None, None, demo["checkpoint"])
    train = class_balanced_subset(index_image_folder(demo["train"]), 24)
    val = class_balanced_subset(index_image_folder(demo["val"]), 8)
    cfg = PreprocessConfig.from_dict(loaded.preprocess) if loaded.preprocess else PreprocessConfig(64, 64)
    results = finetune_resolutions(
        loaded,
        train,
        val,
        cfg,
        list(resolutions),
        out_dir=out_dir,
        opts=FinetuneOptions(epochs=epochs, batch_size=32, lr=0.02, workers=0),
    )
    return [r.checkpoint for r in results]
