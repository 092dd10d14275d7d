"""Train a base classifier at a (low) resolution with RandomResizedCrop.

This is how the demo gets a model that shows the train-test resolution discrepancy; it is a
small torchvision-reference-style loop (``train_one_epoch`` / ``train_base_model``), not a
general training framework.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig, train_transform
from fixres_deploy.core.utils import progress
from fixres_deploy.data.folders import ImageDataset, ImageFolderIndex, make_loader

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """Base-model training recipe (keyword-only preset, torchvision-reference style).

    Attributes:
        train_res: K_train, the RandomResizedCrop output size.
        epochs, batch_size, lr, momentum, weight_decay: SGD (or AdamW) with a linear warm-up
            then cosine decay.
        optimizer: "sgd" (Nesterov momentum) or "adamw".
        label_smoothing: cross-entropy label smoothing.
        scale, ratio: RandomResizedCrop ranges (record them: the resolution prior needs them).
        warmup_epochs: linear warm-up length.
        workers: data-loading processes.
        preload: decode all images once into memory (small data sets; saves decoding per epoch).
        seed: initialisation and data order.
    """

    train_res: int = 64
    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    warmup_epochs: float = 1.0
    workers: int | None = None
    seed: int = 0
    channels_last: bool = True
    preload: bool = True
    optimizer: str = "sgd"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"] = list(self.scale)
        d["ratio"] = list(self.ratio)
        return d


def train_one_epoch(
    model,
    loader,
    optimizer,
    scheduler,
    *,
    label_smoothing: float = 0.0,
    channels_last: bool = False,
    desc: str = "train",
) -> dict:
    """One pass over ``loader``; returns mean loss and training accuracy."""
    import torch
    import torch.nn.functional as F

    model.train()
    total, correct, loss_sum = 0, 0, 0.0
    for images, labels, _, _ in progress(loader, desc=desc, total=len(loader)):
        if images is None:
            continue
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += labels.shape[0]
        correct += int((logits.argmax(1) == labels).sum())
        loss_sum += float(loss.detach()) * labels.shape[0]
    return {"loss": loss_sum / max(1, total), "train_top1": correct / max(1, total), "images": total}


def train_base_model(model, train_index: ImageFolderIndex, opts: TrainOptions, *, mean=None, std=None) -> dict:
    """Train ``model`` in place; returns a history dict (per-epoch loss/accuracy, seconds)."""
    import torch

    if opts.epochs < 1:
        raise UserInputError(f"epochs must be >= 1, got {opts.epochs}")
    torch.manual_seed(opts.seed)
    cfg_kwargs = {}
    if mean is not None:
        cfg_kwargs = {"mean": mean, "std": std}
    cfg = PreprocessConfig(test_input_size=opts.train_res, train_input_size=opts.train_res, **cfg_kwargs)
    transform = train_transform(cfg, scale=tuple(opts.scale), ratio=tuple(opts.ratio))
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if opts.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, nesterov=True)
    elif opts.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=opts.lr)
    else:
        raise UserInputError(f"optimizer must be 'sgd' or 'adamw', got {opts.optimizer!r}")
    steps_per_epoch = math.ceil(len(train_index) / opts.batch_size)
    total = opts.epochs * steps_per_epoch
    warm = max(1, int(opts.warmup_epochs * steps_per_epoch))

    def lr_lambda(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    history = []
    t0 = time.perf_counter()
    dataset = ImageDataset(train_index, transform, preload=opts.preload)
    for epoch in range(opts.epochs):
        loader = make_loader(
            train_index,
            transform,
            batch_size=opts.batch_size,
            shuffle=True,
            workers=opts.workers,
            seed=opts.seed + epoch,
            drop_last=False,
            dataset=dataset,
        )
        stats = train_one_epoch(
            model,
            loader,
            optimizer,
            scheduler,
            label_smoothing=opts.label_smoothing,
            channels_last=opts.channels_last,
            desc=f"train {epoch + 1}/{opts.epochs}",
        )
        stats["epoch"] = epoch + 1
        history.append(stats)
        log.info("epoch %d/%d loss %.3f train top-1 %.3f", epoch + 1, opts.epochs, stats["loss"], stats["train_top1"])
    model.eval()
    if opts.channels_last:
        model.to(memory_format=torch.contiguous_format)
    seconds = time.perf_counter() - t0
    return {
        "history": history,
        "seconds": seconds,
        "images_per_s": sum(h["images"] for h in history) / max(seconds, 1e-9),
        "options": opts.to_dict(),
    }


def train_and_save(
    spec: str,
    train_index: ImageFolderIndex,
    out_path: str | os.PathLike,
    opts: TrainOptions,
    *,
    num_classes: int | None = None,
) -> dict:
    """Build ``spec``, train it and save a fixres-deploy checkpoint; returns the summary."""
    from fixres_deploy.models.registry import build_model, save_checkpoint

    num_classes = num_classes or len(train_index.classes)
    model, mean, std = build_model(spec, num_classes)
    summary = train_base_model(model, train_index, opts, mean=mean, std=std)
    cfg = PreprocessConfig(
        test_input_size=opts.train_res,
        train_input_size=opts.train_res,
        **({"mean": mean, "std": std} if mean is not None else {}),
    )
    save_checkpoint(
        out_path,
        model,
        spec=spec,
        num_classes=num_classes,
        class_names=train_index.classes,
        preprocess=cfg.to_dict(),
        train=summary,
    )
    summary["checkpoint"] = os.fspath(out_path)
    return summary
