"""Top-1 / top-5 accuracy with 95% Wilson intervals, for a torch model or any predict function.

Per-image correctness is kept (as a compact bit string in JSON) so that two evaluations on the
same images can be compared with a paired test (McNemar) instead of two overlapping intervals.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fixres_deploy.core.preprocess import PreprocessConfig, eval_transform
from fixres_deploy.core.stats import wilson_interval
from fixres_deploy.core.utils import progress
from fixres_deploy.data.folders import ImageFolderIndex, SkipLog, index_image_folder, make_loader

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Accuracy of one model at one preprocessing on one image set.

    Attributes:
        top1, top5: fractions in [0, 1].
        top1_ci, top5_ci: 95% Wilson intervals.
        n: images evaluated (skipped ones excluded).
        skipped: number of unreadable images; ``skipped_files`` names them with the error.
        resolution: K_test used.
        correct1: per-image top-1 correctness in index order of the evaluated images.
        indices: index (into the image list) of each evaluated image, same order.
    """

    top1: float
    top1_ci: tuple[float, float]
    top5: float
    top5_ci: tuple[float, float]
    n: int
    skipped: int
    skipped_files: list[dict] = field(default_factory=list)
    resolution: int | None = None
    correct1: np.ndarray | None = None
    indices: np.ndarray | None = None

    def to_dict(self, *, with_per_image: bool = False) -> dict:
        d = {
            "top1": self.top1,
            "top1_ci": list(self.top1_ci),
            "top5": self.top5,
            "top5_ci": list(self.top5_ci),
            "n": self.n,
            "skipped": self.skipped,
            "skipped_files": self.skipped_files,
            "resolution": self.resolution,
        }
        if with_per_image and self.correct1 is not None:
            d["correct1_bits"] = pack_bits(self.correct1)
            d["indices_bits_len"] = len(self.correct1)
            d["indices"] = self.indices.tolist() if self.indices is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        correct = None
        if d.get("correct1_bits") is not None:
            correct = unpack_bits(d["correct1_bits"], d["indices_bits_len"])
        idx = np.asarray(d["indices"], dtype=np.int64) if d.get("indices") is not None else None
        return cls(
            top1=d["top1"],
            top1_ci=tuple(d["top1_ci"]),
            top5=d["top5"],
            top5_ci=tuple(d["top5_ci"]),
            n=d["n"],
            skipped=d["skipped"],
            skipped_files=d.get("skipped_files", []),
            resolution=d.get("resolution"),
            correct1=correct,
            indices=idx,
        )


def pack_bits(mask: np.ndarray) -> str:
    return base64.b64encode(np.packbits(np.asarray(mask, dtype=bool)).tobytes()).decode()


def unpack_bits(text: str, n: int) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    return np.unpackbits(raw)[:n].astype(bool)


class AccuracyMeter:
    """Accumulates top-1/top-5 hits batch by batch."""

    def __init__(self) -> None:
        self.correct1: list[np.ndarray] = []
        self.correct5: list[np.ndarray] = []
        self.indices: list[np.ndarray] = []
        self.skips = SkipLog()

    def update(self, logits: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        logits = np.asarray(logits)
        labels = np.asarray(labels)
        k = min(5, logits.shape[1])
        top = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
        pred1 = logits.argmax(axis=1)
        self.correct1.append(pred1 == labels)
        self.correct5.append((top == labels[:, None]).any(axis=1))
        self.indices.append(np.asarray(indices))

    def gathered(self) -> AccuracyMeter:
        """The hits of every rank (torchrun) in one meter; :meth:`result` orders them by image index."""
        from fixres_deploy.core.distributed import all_gather_object

        parts = all_gather_object((self.correct1, self.correct5, self.indices, self.skips.skipped), "gather accuracy")
        out = AccuracyMeter()
        for c1, c5, idx, skipped in parts:
            out.correct1 += c1
            out.correct5 += c5
            out.indices += idx
            out.skips.extend(skipped)
        return out

    def result(self, resolution: int | None = None) -> EvalResult:
        c1 = np.concatenate(self.correct1) if self.correct1 else np.zeros(0, dtype=bool)
        c5 = np.concatenate(self.correct5) if self.correct5 else np.zeros(0, dtype=bool)
        idx = np.concatenate(self.indices) if self.indices else np.zeros(0, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        c1, c5, idx = c1[order], c5[order], idx[order]
        n = len(c1)
        h1, h5 = int(c1.sum()), int(c5.sum())
        return EvalResult(
            top1=h1 / n if n else 0.0,
            top1_ci=wilson_interval(h1, n),
            top5=h5 / n if n else 0.0,
            top5_ci=wilson_interval(h5, n),
            n=n,
            skipped=len(self.skips),
            skipped_files=list(self.skips.skipped),
            resolution=resolution,
            correct1=c1,
            indices=idx,
        )


def evaluate_predict_fn(
    predict: Callable[[np.ndarray], np.ndarray],
    index: ImageFolderIndex,
    cfg: PreprocessConfig,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    desc: str | None = None,
    shard: tuple[int, int] | None = None,
) -> EvalResult:
    """Accuracy of any ``predict(float32 NCHW) -> logits`` (an engine runner, a torch model).

    Images are preprocessed with the torchvision eval transform built from ``cfg``. With
    ``shard=(rank, world)`` (torchrun) each rank evaluates its share and the per-image
    results of all ranks are gathered, so every rank returns the whole set's result.
    """
    loader = make_loader(index, eval_transform(cfg), batch_size=batch_size, workers=workers, shard=shard)
    meter = AccuracyMeter()
    for images, labels, indices, skipped in progress(
        loader, desc=desc or f"eval @{cfg.test_input_size}", total=len(loader)
    ):
        meter.skips.extend(skipped)
        if images is None:
            continue
        logits = predict(images.numpy())
        meter.update(logits, labels.numpy(), indices.numpy())
    if shard is not None and shard[1] > 1:
        meter = meter.gathered()
    result = meter.result(cfg.test_input_size)
    if result.skipped:
        log.warning("skipped %d unreadable images (first: %s)", result.skipped, result.skipped_files[0]["path"])
    return result


def evaluate_runner_on_arrays(
    runner, x: np.ndarray, y: np.ndarray, idx: np.ndarray, skipped: list, batch: int, fixed_batch: bool
):
    """Top-1 of a backend runner on preprocessed arrays (pads the last batch for fixed-batch engines)."""
    meter = AccuracyMeter()
    meter.skips.extend(skipped)
    with runner:
        for s in range(0, len(x), batch):
            xb = x[s : s + batch]
            n = len(xb)
            if fixed_batch and n < batch:
                xb = np.concatenate([xb, np.zeros((batch - n,) + xb.shape[1:], dtype=xb.dtype)])
            logits = runner.predict(np.ascontiguousarray(xb))[:n]
            meter.update(logits, y[s : s + n], idx[s : s + n])
    return meter.result()


def torch_predict_fn(model, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a torch model as a numpy predict function (eval mode, no grad)."""
    import torch

    model.eval().to(device)

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return predict


def evaluate_model(
    model,
    data: str | ImageFolderIndex,
    cfg: PreprocessConfig,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
) -> EvalResult:
    """Top-1/top-5 with 95% CIs of a torch model on an ImageFolder at ``cfg``'s resolution."""
    index = data if isinstance(data, ImageFolderIndex) else index_image_folder(data)
    return evaluate_predict_fn(
        torch_predict_fn(model, device), index, cfg, batch_size=batch_size, workers=workers, shard=shard
    )


def index_for_model(data: str | ImageFolderIndex, loaded) -> ImageFolderIndex:
    """Index an image folder with the model's class order, checking the class count.

    A fixres-deploy checkpoint records its class names: the folder's sub-folders are mapped
    to those labels by name (a folder with a subset of them is fine; a name the model does not
    know is refused). A plain state dict does not: the sorted folder names become labels
    0..N-1 (the torchvision convention), which is right only when the folder has exactly one
    sub-folder per classifier output — one folder fewer shifts every label after it, so any
    other count is refused before work starts.
    """
    from fixres_deploy.core.errors import DataError

    if isinstance(data, ImageFolderIndex):
        index = data
    else:
        index = index_image_folder(data, classes=loaded.class_names)
    if loaded.class_names is None and len(index.classes) != loaded.num_classes:
        raise DataError(
            f"image folder '{index.root}' has {len(index.classes)} class folders {_names(index.classes)} but the "
            f"model has {loaded.num_classes} outputs and records no class names, so folder i would be read as "
            f"output i and every label after a missing folder would be shifted. Give the folder one sub-folder "
            f"per output (all {loaded.num_classes}, sorted names = output order), or use a checkpoint that "
            "records its class names (fixres-deploy train / finetune write them)"
        )
    if loaded.class_names is not None and len(loaded.class_names) != loaded.num_classes:
        raise DataError(
            f"the checkpoint records {len(loaded.class_names)} class names {_names(loaded.class_names)} for "
            f"{loaded.num_classes} outputs: it is inconsistent; re-save it with the right class names"
        )
    return index


def _names(names) -> str:
    names = list(names)
    return str(names) if len(names) <= 12 else f"{names[:12]}... ({len(names)} in all)"


def evaluate_checkpoint(
    loaded,
    data: str | ImageFolderIndex,
    cfg: PreprocessConfig,
    *,
    batch_size: int = 64,
    workers: int | None = None,
) -> EvalResult:
    """`fixres-deploy evaluate`: accuracy of a loaded model on an ImageFolder at ``cfg``."""
    return evaluate_model(loaded.model, index_for_model(data, loaded), cfg, batch_size=batch_size, workers=workers)
