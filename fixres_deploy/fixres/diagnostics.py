"""The FixRes paper's diagnostic: what a change of test resolution does to the pooled features.

A CNN trained at K_train and tested at another resolution sees objects at another apparent
size; the activations before the global pool change their statistics, so the pooled features
the classifier reads move away from what it was trained on. The paper (Touvron et al. 2019,
Fig. 3) shows it with the distribution of the pooled ResNet-50 features after the final ReLU:
at test 64 px 29.8% of them are exact zeros, at 448 px 0.5%. FixRes re-estimates the
BatchNorm before the pool at the test resolution and fine-tunes the classifier, which brings
the distribution back.

This module measures, per test resolution, on held-out images:

* the pooled features (the classifier's input, after the final activation and the pool):
  their fraction of exact zeros, mean and quantiles (a CDF), for the base model and for the
  model fine-tuned at that resolution;
* how far the fine-tune moved the adapted BatchNorm's running statistics: the mean shift in
  units of the base standard deviation and the ratio of variances (averaged over channels).

Models whose final activation is not a ReLU (EfficientNet's SiLU) have almost no exact zeros;
the quantiles still show the shift.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fixres_deploy.core.errors import UserInputError

N_QUANTILES = 101


def pooled_features(model, images: np.ndarray, classifier: str, *, batch_size: int = 64) -> np.ndarray:
    """The input of module ``classifier`` (the pooled features) for each image, as (N, D) float32.

    Args:
        model: a torch classifier (evaluated in eval mode, no gradients).
        images: preprocessed float32 (N, 3, H, W).
        classifier: name of the first module after the global pool (``FixResModules.head_names[0]``).
    """
    import torch

    try:
        head = model.get_submodule(classifier)
    except AttributeError as exc:
        raise UserInputError(f"module '{classifier}' is not in the model: {exc}") from None
    got: list[np.ndarray] = []

    def grab(_module, args):
        got.append(torch.flatten(args[0], 1).detach().float().cpu().numpy())

    handle = head.register_forward_pre_hook(grab)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(images), batch_size):
                model(torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size])))
    finally:
        handle.remove()
        model.train(was_training)
    return np.concatenate(got) if got else np.zeros((0, 0), dtype=np.float32)


def feature_summary(features: np.ndarray) -> dict:
    """Fraction of exact zeros, mean and :data:`N_QUANTILES` quantiles (0..1) of all pooled values."""
    flat = np.asarray(features, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        raise UserInputError("no pooled features to summarise (no images?)")
    return {
        "zero_fraction": float(np.mean(flat == 0.0)),
        "mean": float(flat.mean()),
        "quantiles": [float(v) for v in np.quantile(flat, np.linspace(0.0, 1.0, N_QUANTILES))],
        "values": int(flat.size),
    }


def bn_shift(base_model, tuned_model, bn_names: Sequence[str]) -> dict | None:
    """How far the fine-tune moved the running statistics of the adapted BatchNorm(s).

    Returns:
        ``mean_shift_sigma``: mean over channels of |mu_ft - mu_base| / sqrt(var_base + eps);
        ``var_ratio``: mean over channels of var_ft / var_base; ``modules``: the BN names.
        None when there is no adapted BatchNorm.
    """
    shifts, ratios = [], []
    for name in bn_names:
        a, b = base_model.get_submodule(name), tuned_model.get_submodule(name)
        mu_a, var_a = a.running_mean.detach().double().cpu().numpy(), a.running_var.detach().double().cpu().numpy()
        mu_b, var_b = b.running_mean.detach().double().cpu().numpy(), b.running_var.detach().double().cpu().numpy()
        shifts.append(np.abs(mu_b - mu_a) / np.sqrt(var_a + a.eps))
        ratios.append(var_b / np.maximum(var_a, 1e-12))
    if not shifts:
        return None
    return {
        "mean_shift_sigma": float(np.concatenate(shifts).mean()),
        "var_ratio": float(np.concatenate(ratios).mean()),
        "modules": list(bn_names),
    }


def resolution_diagnostic(
    base_model,
    tuned_model,
    images: np.ndarray,
    resolution: int,
    *,
    classifier: str,
    bn_names: Sequence[str],
    train_res: int,
) -> dict:
    """One row of the diagnostic: base and fine-tuned pooled features at ``resolution``."""
    base = feature_summary(pooled_features(base_model, images, classifier))
    tuned = feature_summary(pooled_features(tuned_model, images, classifier)) if tuned_model is not None else None
    return {
        "resolution": int(resolution),
        "is_train_res": int(resolution) == int(train_res),
        "base": base,
        "finetuned": tuned,
        "bn_shift": bn_shift(base_model, tuned_model, bn_names) if tuned_model is not None else None,
    }


def spread_indices(n_total: int, n: int) -> np.ndarray:
    """``n`` indices spread evenly over ``n_total`` (evaluation images are stored class by class)."""
    if n_total <= 0:
        return np.zeros(0, dtype=int)
    n = min(n, n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int))
