"""The built-in demo data set: procedurally generated shapes on textured backgrounds.

Deterministic (every image is a function of its class, split and number), shipped as code,
nothing downloaded. Ten classes of objects whose identity lives partly in fine detail (a ring
vs a disc, a 5- vs a 6-pointed star, a plus vs an x), at varied scale and position, on
textured backgrounds, in source images of 256–352 px with varied aspect ratios, so that
several test resolutions are meaningful and the apparent object size matters — the two
ingredients of the FixRes effect.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.utils import progress

log = logging.getLogger(__name__)

CLASSES = (
    "circle",
    "ring",
    "square",
    "diamond",
    "triangle",
    "star5",
    "star6",
    "plus",
    "cross",
    "crescent",
)
SIDES = (256, 288, 320, 352)
RADIUS_RANGE = (0.10, 0.26)  # object radius as a fraction of the shorter side
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


def _star(cx, cy, r_out, r_in, points, rot):
    pts = []
    for i in range(points * 2):
        r = r_out if i % 2 == 0 else r_in
        a = rot + math.pi * i / points - math.pi / 2
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _polygon(cx, cy, r, sides, rot):
    return [
        (
            cx + r * math.cos(rot + 2 * math.pi * i / sides - math.pi / 2),
            cy + r * math.sin(rot + 2 * math.pi * i / sides - math.pi / 2),
        )
        for i in range(sides)
    ]


def _bar_cross(cx, cy, r, rot, width_frac=0.32):
    """A plus sign of two bars as one 12-point polygon, rotated by ``rot``."""
    w = r * width_frac
    base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A textured background: smooth colour noise + stripes or checks + grain (uint8 H×W×3)."""
    from PIL import Image

    low = rng.uniform(70, 185, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(0, 3)
    period = rng.uniform(10, 40)
    angle = rng.uniform(0, math.pi)
    amp = rng.uniform(6, 18)
    if kind == 0:  # stripes
        pattern = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    elif kind == 1:  # checks
        pattern = np.sign(np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period))
    else:  # blobs
        pattern = np.sin(xx / period * 2.1 + rng.uniform(0, 6)) * np.cos(yy / period * 1.7 + rng.uniform(0, 6))
    base += amp * pattern[..., None] * rng.uniform(0.5, 1.0, size=3)
    base += rng.normal(0, rng.uniform(2, 6), size=base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def render_image(label: int, seed: int):
    """Render one image of class ``label``; a pure function of (label, seed)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([label, seed])
    w, h = int(rng.choice(SIDES)), int(rng.choice(SIDES))
    img = Image.fromarray(_texture(rng, w, h))
    draw = ImageDraw.Draw(img)
    short = min(w, h)
    r = rng.uniform(*RADIUS_RANGE) * short
    cx = rng.uniform(r + 4, w - r - 4)
    cy = rng.uniform(r + 4, h - r - 4)
    rot = math.radians(rng.uniform(-12, 12))
    bg_mean = np.asarray(img, dtype=np.float32).mean(axis=(0, 1))
    color = tuple(int(v) for v in np.where(bg_mean > 128, rng.uniform(0, 60, 3), rng.uniform(195, 255, 3)))
    name = CLASSES[label]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(r * 0.28)))
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, rot + math.pi / 4), fill=color)
    elif name == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, rot), fill=color)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.2, r * 1.2, 3, rot), fill=color)
    elif name == "star5":
        draw.polygon(_star(cx, cy, r * 1.15, r * 0.5, 5, rot), fill=color)
    elif name == "star6":
        draw.polygon(_star(cx, cy, r * 1.15, r * 0.6, 6, rot), fill=color)
    elif name == "plus":
        draw.polygon(_bar_cross(cx, cy, r, rot), fill=color)
    elif name == "cross":
        draw.polygon(_bar_cross(cx, cy, r, rot + math.pi / 4), fill=color)
    elif name == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        off = r * 0.45
        a = rng.uniform(0, 2 * math.pi)
        ox, oy = cx + off * math.cos(a), cy + off * math.sin(a)
        hole = Image.fromarray(_texture(rng, w, h))
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).ellipse([ox - r * 0.85, oy - r * 0.85, ox + r * 0.85, oy + r * 0.85], fill=255)
        img.paste(hole, (0, 0), mask)
    return img


def write_demo_data(
    out: str | os.PathLike,
    *,
    train_per_class: int = 120,
    val_per_class: int = 60,
    quality: int = 92,
) -> dict:
    """Write ``out/train/<class>/*.jpg`` and ``out/val/<class>/*.jpg``.

    Existing identical files are kept, so a second call is cheap. Returns a summary dict.
    """
    if train_per_class < 1 or val_per_class < 1:
        raise UserInputError("per-class counts must be >= 1")
    out = Path(out)
    counts = {}
    jobs = []
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                jobs.append((folder / f"{name}_{split}_{i:05d}.jpg", label, SPLIT_SEEDS[split] * 1_000_003 + i))
        counts[split] = per_class * len(CLASSES)
    marker = out / ".fixres-demo.json"
    import json

    spec = {"train_per_class": train_per_class, "val_per_class": val_per_class, "quality": quality, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == spec and all(p.exists() for p, _, _ in jobs):
        return {"root": str(out), "classes": list(CLASSES), **counts, "reused": True}
    for path, label, seed in progress(jobs, desc="demo data"):
        img = render_image(label, seed)
        tmp = path.with_name(f".{path.name}.tmp")
        img.save(tmp, format="JPEG", quality=quality)
        os.replace(tmp, path)
    marker.write_text(json.dumps(spec))
    return {"root": str(out), "classes": list(CLASSES), **counts, "reused": False}
