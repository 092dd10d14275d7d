"""Calibration sets: a versioned, hashed list of images, and their preprocessed batches.

int8 ranges are only as good as the images they were computed on, so a calibration set is
an artifact in its own right: a JSON manifest naming each image by relative path and
sha256, class-balanced, with a ``set_hash`` over its content. The hash is part of the key of
the calibration-range cache (see :mod:`fixres_deploy.precision.variants`), so ranges are reused only
for the same images, and an image that changed on disk is caught (named, with the fix)
instead of silently shifting the ranges.

Batches are preprocessed with the EVAL transform at the TARGET resolution: int8 ranges
computed at another resolution, or on augmented (RandomResizedCrop) images, describe
activations the deployed engine never sees (TensorRT/retinanet-examples #255).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fixres_deploy.core.errors import DataError, UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig
from fixres_deploy.core.schema import check_schema, stamp
from fixres_deploy.core.utils import progress, read_json, sha256_file, stable_hash, write_json

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "fixres-deploy/calibration-set"
MANIFEST_VERSION = 2  # 2: "schema_version" header (core/schema.py); 1 had "version"
DEFAULT_SIZE = 512


def set_hash_of(images: list[dict]) -> str:
    """Content address of a set: sha256 of the sorted (relative path, sha256) pairs."""
    return stable_hash(sorted([str(i["path"]), str(i["sha256"])] for i in images))


@dataclass
class CalibrationManifest:
    """A calibration set (see module docstring).

    Attributes:
        root: the folder the images were sampled from (informative; ``resolve(root=...)``
            can point elsewhere, e.g. on another machine).
        images: [{"path": posix path relative to root, "sha256", "label", "class"}].
        classes: class names in label order.
        seed, size: the sampling parameters (``size`` = requested number of images).
        set_hash: :func:`set_hash_of` the images.
        manifest_path: where it was read from / written to (not serialised).
    """

    root: str
    images: list[dict]
    classes: list[str]
    seed: int
    size: int
    set_hash: str
    manifest_path: str | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.images)

    def to_dict(self) -> dict[str, Any]:
        body = {
            "root": self.root,
            "seed": self.seed,
            "size": self.size,
            "classes": list(self.classes),
            "set_hash": self.set_hash,
            "n_images": len(self.images),
            "images": [dict(i) for i in self.images],
        }
        return stamp(body, MANIFEST_FORMAT, MANIFEST_VERSION)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "calibration manifest") -> CalibrationManifest:
        check_schema(
            d,
            MANIFEST_FORMAT,
            MANIFEST_VERSION,
            source,
            "make a new one with `fixres-deploy calibration --data DIR --out FILE.json`",
        )
        missing = [k for k in ("root", "images", "classes", "seed", "size", "set_hash") if k not in d]
        if missing:
            raise UserInputError(f"{source} lacks keys {missing}")
        images = d["images"]
        for i, item in enumerate(images):
            if not isinstance(item, dict) or not {"path", "sha256", "label"} <= set(item):
                raise UserInputError(f"{source}: image entry {i} needs path, sha256 and label, got {item!r}")
        recomputed = set_hash_of(images)
        if recomputed != d["set_hash"]:
            raise UserInputError(
                f"{source}: set_hash {d['set_hash'][:12]}... does not match its image list ({recomputed[:12]}...); "
                "the manifest was edited by hand; regenerate it with `fixres-deploy calibration`"
            )
        return cls(
            root=d["root"],
            images=list(images),
            classes=list(d["classes"]),
            seed=int(d["seed"]),
            size=int(d["size"]),
            set_hash=d["set_hash"],
        )

    def resolve(self, root: str | os.PathLike | None = None, *, verify: bool = True) -> list[tuple[str, int]]:
        """Absolute paths and labels of the images, checking each file's sha256.

        Args:
            root: where the images live now (default: the manifest's root, else the folder
                holding the manifest).
            verify: check sha256 (a few ms per image); every missing or changed file is named.

        Raises:
            DataError: files missing or changed, all named, with the fix.
        """
        base = self._root(root)
        out, missing, changed = [], [], []
        for item in self.images:
            p = os.path.join(base, *Path(item["path"]).parts)
            if not os.path.isfile(p):
                missing.append(item["path"])
                continue
            if verify and sha256_file(p) != item["sha256"]:
                changed.append(item["path"])
                continue
            out.append((p, int(item["label"])))
        if missing or changed:
            parts = []
            if changed:
                parts.append(
                    f"{len(changed)} changed since the manifest was made: {', '.join(changed[:10])}"
                    + (" ..." if len(changed) > 10 else "")
                )
            if missing:
                parts.append(
                    f"{len(missing)} missing: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")
                )
            where = f" '{self.manifest_path}'" if self.manifest_path else ""
            raise DataError(
                f"calibration set{where} (root '{base}'): "
                + "; ".join(parts)
                + ". Restore the files, or regenerate the manifest with "
                f"`fixres-deploy calibration --data {base} --out {self.manifest_path or 'calibration/NAME.json'}` "
                "(cached int8 ranges of the old set will not be reused)."
            )
        return out

    def _root(self, root) -> str:
        if root is not None:
            return os.fspath(root)
        if os.path.isdir(self.root):
            return self.root
        if self.manifest_path and not os.path.isabs(self.root):
            candidate = os.path.join(os.path.dirname(self.manifest_path), self.root)
            if os.path.isdir(candidate):
                return candidate
        raise DataError(
            f"calibration set root '{self.root}' does not exist here; pass the folder that holds the images "
            "(root=... / --calibration-root)"
        )


def _balanced_take(samples: list, size: int, seed: int) -> list:
    """Round-robin over classes (each class shuffled by ``seed``) until ``size`` samples."""
    import random

    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    queues = []
    for label in sorted(by_class):
        items = list(by_class[label])
        rng.shuffle(items)
        queues.append(items)
    chosen = []
    depth = 0
    while len(chosen) < size and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(chosen) < size:
                chosen.append(q[depth])
        depth += 1
    return sorted(chosen, key=lambda s: (s.label, s.path))


def make_calibration_manifest(
    image_folder: str | os.PathLike,
    out_json: str | os.PathLike | None,
    *,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    classes: list[str] | None = None,
) -> CalibrationManifest:
    """Sample a class-balanced calibration set from an ImageFolder and write its manifest.

    Use images like the deployment ones (a training split is fine); 256-1024 images is the
    usual range. Class counts differ by at most one when every class has enough images.

    Args:
        image_folder: ImageFolder root (ROOT/<class>/<image>).
        out_json: manifest path (written atomically); None to only return it.
        size: number of images.
        seed: sampling seed.
        classes: class names in label order (e.g. the model's); default sorted folders.
    """
    from fixres_deploy.data.folders import class_balanced_subset, index_image_folder

    if int(size) < 1:
        raise UserInputError(f"--size must be >= 1, got {size}")
    index = index_image_folder(image_folder, classes=classes)
    per_class = math.ceil(size / max(1, len(index.classes)))
    pool = class_balanced_subset(index, per_class, seed=seed).samples
    chosen = _balanced_take(pool, int(size), seed)
    if len(chosen) < size:
        log.warning("calibration set: only %d images available in '%s' (asked for %d)", len(chosen), index.root, size)
    root = os.path.abspath(index.root)
    images = []
    for s in progress(chosen, desc="hash calibration images"):
        images.append(
            {
                "path": Path(os.path.relpath(os.path.abspath(s.path), root)).as_posix(),
                "sha256": sha256_file(s.path),
                "label": int(s.label),
                "class": index.classes[s.label],
            }
        )
    manifest = CalibrationManifest(
        root=root,
        images=images,
        classes=list(index.classes),
        seed=int(seed),
        size=int(size),
        set_hash=set_hash_of(images),
    )
    if out_json is not None:
        write_json(out_json, manifest.to_dict())
        manifest.manifest_path = os.fspath(out_json)
    return manifest


def load_calibration_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> CalibrationManifest:
    """Read and validate a manifest (format, keys, set_hash); ``root`` overrides its root.

    Files are checked against their sha256 when the images are resolved
    (:meth:`CalibrationManifest.resolve`, :func:`calibration_batches`).
    """
    path = os.fspath(path)
    manifest = CalibrationManifest.from_dict(read_json(path), source=f"'{path}'")
    manifest.manifest_path = path
    if root is not None:
        manifest.root = os.fspath(root)
    return manifest


def _is_manifest_path(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and os.path.isfile(source) and os.fspath(source).endswith(".json")


def calibration_batches(
    source,
    cfg: PreprocessConfig,
    *,
    limit: int | None = None,
    root: str | os.PathLike | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Preprocessed calibration images, float32 (N, 3, K, K), K = ``cfg.test_input_size``.

    Preprocessing is the eval transform at the target resolution (see module docstring).

    Args:
        source: a manifest path (.json), a :class:`CalibrationManifest`, an ImageFolder root
            (then a class-balanced sample of ``limit`` or 512 images with ``seed``), or an
            ``ImageFolderIndex`` (all its images, or a class-balanced ``limit``).
        cfg: the deployment preprocessing at the deployment resolution.
        limit: at most this many images (class-balanced when taken from a manifest).
        root: where a manifest's images live now (default its root).

    Raises:
        DataError: a manifest image is missing or changed (named), or nothing readable.
    """
    from fixres_deploy.core.preprocess import eval_transform
    from fixres_deploy.data.folders import ImageFolderIndex, Sample, index_image_folder, load_rgb

    if limit is not None and int(limit) < 1:
        raise UserInputError(f"limit must be >= 1, got {limit}")
    if isinstance(source, CalibrationManifest) or _is_manifest_path(source):
        manifest = source if isinstance(source, CalibrationManifest) else load_calibration_manifest(source)
        items = manifest.resolve(root)
        if limit is not None and limit < len(items):
            items = [(s.path, s.label) for s in _balanced_take([Sample(p, lab) for p, lab in items], int(limit), seed)]
        strict = True
    elif isinstance(source, ImageFolderIndex) or (isinstance(source, (str, os.PathLike)) and os.path.isdir(source)):
        index = source if isinstance(source, ImageFolderIndex) else index_image_folder(source)
        n = int(limit) if limit is not None else (len(index) if isinstance(source, ImageFolderIndex) else DEFAULT_SIZE)
        items = [(s.path, s.label) for s in _balanced_take(index.samples, n, seed)]
        strict = False
    else:
        raise UserInputError(
            f"calibration data '{source}' is neither a calibration manifest (.json) nor an image folder; "
            "make a manifest with `fixres-deploy calibration --data DIR --out calibration/NAME.json`"
        )
    tf = eval_transform(cfg)
    arrays = []
    for path, _label in progress(items, desc=f"calibration images @{cfg.test_input_size}"):
        try:
            img = load_rgb(path)
        except Exception as exc:  # PIL raises many types
            if strict:
                raise DataError(
                    f"calibration image '{path}' cannot be decoded ({exc}); regenerate the manifest"
                ) from exc
            log.warning("calibration: skipping unreadable image %s (%s)", path, exc)
            continue
        arrays.append(tf(img).numpy())
    if not arrays:
        raise DataError(f"no readable calibration images in '{source}'")
    return np.ascontiguousarray(np.stack(arrays).astype(np.float32))
