"""Preprocessing as data: one description, resolved in one place, used everywhere.

The FixRes argument is about preprocessing: the apparent object size at test time depends on
the test resolution *and* on how the image is resized and cropped. So the description below
is carried from evaluation to fine-tuning, calibration, the ONNX metadata, the bundle manifest
and the production runtime, and every consumer builds its transform from it.

This module imports only numpy and PIL (the production runtime must not import torch);
the torchvision transforms are built lazily in :func:`eval_transform` and friends.

Resize semantics:
    ``"shorter"`` (default, the torchvision convention): the shorter image side is resized to
    ``resize_size`` and the other side keeps the aspect ratio.
    ``"height"`` (the FixRes repository's ``Resize``): the image *height* is resized to
    ``resize_size`` whatever the orientation. On portrait images the two differ; a FixRes user
    measured about 0.35% lower top-1 with the shorter-side resize when the model was fine-tuned
    with the height resize (FixRes issue #4): fine-tune with the resize you will deploy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fixres_deploy.core.errors import UserInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # 224 / 256, the ImageNet convention
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
RESIZE_MODES = ("shorter", "height")
AUGMENTATIONS = ("test", "test2", "train")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that turns an image file into the network input.

    Attributes:
        test_input_size: K_test, the side of the square network input in pixels.
        train_input_size: K_train, the resolution the model was trained at (kept for the
            record and the prior; it does not change the transform).
        crop_pct: K_test / K_image: the image is resized to ``floor(K_test / crop_pct)`` and
            center-cropped to ``K_test``.
        interpolation: resize filter, one of ``INTERPOLATIONS``.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after the mean.
        resize_mode: ``"shorter"`` or ``"height"`` (see module docstring).
    """

    test_input_size: int
    train_input_size: int | None = None
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_mode: str = "shorter"
    # Fixed facts of the layout, recorded so that a consumer never has to guess them.
    channel_order: str = field(default="RGB")
    layout: str = field(default="NCHW")

    def __post_init__(self) -> None:
        if int(self.test_input_size) != self.test_input_size or self.test_input_size < 8:
            raise UserInputError(f"test_input_size must be an integer >= 8, got {self.test_input_size!r}")
        if not 0.05 < float(self.crop_pct) <= 1.0:
            raise UserInputError(f"crop_pct must be in (0.05, 1], got {self.crop_pct!r} (crop_pct = K_test / K_image)")
        if self.interpolation not in INTERPOLATIONS:
            raise UserInputError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise UserInputError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserInputError(f"mean/std must be 3 values with std > 0, got {self.mean}, {self.std}")
        object.__setattr__(self, "test_input_size", int(self.test_input_size))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def resize_size(self) -> int:
        """K_image: the size the image is resized to before the center crop."""
        return resize_size_for(self.test_input_size, self.crop_pct)

    def at_resolution(self, test_input_size: int) -> PreprocessConfig:
        """The same preprocessing at another test resolution (crop_pct kept, as FixRes does)."""
        return dataclasses.replace(self, test_input_size=int(test_input_size))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the derived ``resize_size`` for readers in other languages."""
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["resize_size"] = self.resize_size
        d["pixel_scale"] = 1.0 / 255.0
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they mean another version)."""
        if not isinstance(d, dict):
            raise UserInputError(f"a preprocessing description must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        resize = d.pop("resize_size", None)
        d.pop("pixel_scale", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserInputError(f"unknown preprocessing keys {unknown}; known: {sorted(names)}")
        if "test_input_size" not in d:
            raise UserInputError("a preprocessing description needs 'test_input_size'")
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        cfg = cls(**d)
        if resize is not None and int(resize) != cfg.resize_size:
            raise UserInputError(
                f"inconsistent preprocessing: resize_size {resize} but test_input_size "
                f"{cfg.test_input_size} / crop_pct {cfg.crop_pct} gives {cfg.resize_size}"
            )
        return cfg


def resize_size_for(test_input_size: int, crop_pct: float) -> int:
    """K_image = floor(K_test / crop_pct), the timm convention (224 / 0.875 = 256)."""
    return int(math.floor(test_input_size / crop_pct + 1e-6))


def resized_dims(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """Output (width, height) of the resize step, matching torchvision's integer rounding.

    torchvision's ``Resize(int)`` keeps the aspect ratio and computes the long side as
    ``int(size * long / short)`` (truncation); the FixRes height mode does the same with the
    height as the reference side.
    """
    if mode == "shorter":
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size
    if mode == "height":
        return int(size * width / height), size
    raise UserInputError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")


def _pil_filter(name: str):
    from PIL import Image

    return {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
    }[name]


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's CenterCrop: offsets ``int(round(d / 2))``."""
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return left, top, left + crop, top + crop


ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white (as a browser or viewer shows them)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image, background: tuple[int, int, int] = ALPHA_BACKGROUND):
    """Any PIL image as 8-bit RGB, scaled by its real range: the one conversion everywhere.

    ``Image.convert("RGB")`` clips 16-bit and float pixels at 255 (a dark 16-bit scan
    becomes all white), drops alpha (showing whatever colour hides under transparent pixels)
    and ignores a palette's transparency. Here:

    * ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, ``I``: 16-bit data (what PIL makes of 16-bit
      PNG and TIFF), scaled by 255/65535; ``I`` values outside 0..65535 are clipped.
    * ``F`` (float): [0, 1] data when its maximum is at most 1, else [0, 255]; clipped.
    * ``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La`` and ``P`` with a transparent colour: alpha-composited
      on ``background`` (white).
    * ``P``, ``L``, ``1``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's own conversion.

    Raises:
        UserInputError: a mode PIL cannot convert to RGB.
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("PA", "LA", "La", "RGBa"):
        image, mode = image.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise UserInputError(f"images of PIL mode {mode!r} cannot be converted to RGB: {exc}") from exc


def preprocess_pil(image, cfg: PreprocessConfig) -> np.ndarray:
    """Eval transform of one PIL image with PIL + numpy only (the production runtime's path).

    Gives the same pixels as torchvision's Resize → CenterCrop → ToTensor → Normalize on PIL
    images (torchvision resizes PIL images with PIL itself). Images smaller than the crop are
    zero-padded like torchvision's CenterCrop.

    Returns:
        float32 array of shape (3, K, K).
    """
    from PIL import Image

    image = to_rgb(image)
    w, h = image.size
    new_w, new_h = resized_dims(w, h, cfg.resize_size, cfg.resize_mode)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), _pil_filter(cfg.interpolation))
    k = cfg.test_input_size
    if new_w < k or new_h < k:
        canvas = Image.new("RGB", (max(k, new_w), max(k, new_h)))
        canvas.paste(image, ((max(k, new_w) - new_w) // 2, (max(k, new_h) - new_h) // 2))
        image = canvas
        new_w, new_h = image.size
    image = image.crop(center_crop_box(new_w, new_h, k))
    return normalize_hwc_uint8(np.asarray(image, dtype=np.uint8), cfg)


def normalize_hwc_uint8(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 H×W×3 → float32 3×H×W scaled to [0, 1] and normalized with the config's mean/std."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _tv_interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return {
        "nearest": InterpolationMode.NEAREST,
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
        "lanczos": InterpolationMode.LANCZOS,
    }[name]


class _ResizeHeight:
    """FixRes-repository resize: the height goes to ``size``, the width keeps the aspect."""

    def __init__(self, size: int, interpolation: str):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, image):
        w, h = image.size
        return image.resize(resized_dims(w, h, self.size, "height"), _pil_filter(self.interpolation))

    def __repr__(self) -> str:
        return f"ResizeHeight(size={self.size}, interpolation={self.interpolation})"


def _resize(cfg: PreprocessConfig):
    from torchvision import transforms as T

    if cfg.resize_mode == "height":
        return _ResizeHeight(cfg.resize_size, cfg.interpolation)
    return T.Resize(cfg.resize_size, interpolation=_tv_interpolation(cfg.interpolation))


def eval_transform(cfg: PreprocessConfig):
    """The test transform ("test DA"): resize, center crop, to tensor, normalize (torchvision)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Lambda(to_rgb),
            _resize(cfg),
            T.CenterCrop(cfg.test_input_size),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


class _RandomShiftCenterCrop:
    """Center crop shifted horizontally by up to ``max_shift`` of the free margin (test DA2)."""

    def __init__(self, size: int, max_shift: float = 0.5):
        self.size = size
        self.max_shift = max_shift

    def __call__(self, image):
        import random

        w, h = image.size
        k = self.size
        if w < k or h < k:
            from torchvision.transforms import functional as F

            return F.center_crop(image, [k, k])
        left, top, _, _ = center_crop_box(w, h, k)
        margin = min(left, w - k - left)
        dx = int(round(random.uniform(-1.0, 1.0) * self.max_shift * margin))
        left = left + dx
        return image.crop((left, top, left + k, top + k))


def finetune_transform(cfg: PreprocessConfig, augmentation: str = "test"):
    """Data augmentation for the FixRes fine-tune at ``cfg.test_input_size``.

    Args:
        cfg: the preprocessing at the target test resolution.
        augmentation: ``"test"`` — the test transform itself (deterministic, so activations
            below the trainable layers can be cached); ``"test2"`` — test transform with
            horizontal flip, light color jitter and a random horizontal shift of the center
            crop; ``"train"`` — RandomResizedCrop + flip at the test resolution.
    """
    from torchvision import transforms as T

    k = cfg.test_input_size
    tail = [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    if augmentation == "test":
        return eval_transform(cfg)
    if augmentation == "test2":
        return T.Compose(
            [
                T.Lambda(to_rgb),
                _resize(cfg),
                _RandomShiftCenterCrop(k),
                T.RandomHorizontalFlip(),
                T.ColorJitter(0.1, 0.1, 0.1),
                *tail,
            ]
        )
    if augmentation == "train":
        return train_transform(cfg.at_resolution(k))
    raise UserInputError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")


def train_transform(
    cfg: PreprocessConfig,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
):
    """The usual training transform: RandomResizedCrop at ``cfg.test_input_size`` + flip."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.RandomResizedCrop(
                cfg.test_input_size,
                scale=scale,
                ratio=ratio,
                interpolation=_tv_interpolation(cfg.interpolation),
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


def resolve_preprocess(
    base: dict | None = None,
    *,
    test_input_size: int | None = None,
    train_input_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    resize_mode: str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    default_mean: tuple[float, float, float] | None = None,
    default_std: tuple[float, float, float] | None = None,
) -> PreprocessConfig:
    """The one place where a preprocessing description is resolved.

    Precedence: explicit arguments (the user's flags) > ``base`` (what a checkpoint or a
    manifest recorded) > the model's defaults (``default_mean``/``default_std``, e.g.
    EfficientNet-Lite's (x - 127) / 128) > ImageNet conventions.
    """
    d: dict[str, Any] = {}
    if default_mean is not None:
        d["mean"] = tuple(default_mean)
    if default_std is not None:
        d["std"] = tuple(default_std)
    if base:
        b = dict(base)
        b.pop("resize_size", None)
        b.pop("pixel_scale", None)
        d.update(b)
    explicit = {
        "test_input_size": test_input_size,
        "train_input_size": train_input_size,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "resize_mode": resize_mode,
        "mean": tuple(mean) if mean is not None else None,
        "std": tuple(std) if std is not None else None,
    }
    d.update({k: v for k, v in explicit.items() if v is not None})
    if d.get("train_input_size") is None and base and base.get("test_input_size") and not base.get("train_input_size"):
        d["train_input_size"] = base["test_input_size"]
    if "test_input_size" not in d:
        raise UserInputError("no test resolution given: pass --resolution")
    return PreprocessConfig.from_dict(d)
