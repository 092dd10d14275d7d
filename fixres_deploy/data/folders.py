"""Image folders: listing, held-out splits by file-name hash, robust loading.

A corrupt or unreadable image never crashes a run: it is skipped, counted and named in the
result (see :class:`SkipLog`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fixres_deploy.core.errors import DataError
from fixres_deploy.core.utils import progress

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass
class ImageFolderIndex:
    """The files of an ImageFolder root (``root/<class>/<image>``), sorted like torchvision."""

    root: str
    classes: list[str]
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, samples: Sequence[Sample]) -> ImageFolderIndex:
        return ImageFolderIndex(self.root, self.classes, list(samples))

    def content_hash(self) -> str:
        """Hash of (relative path, label, size, mtime) of every sample: cheap data identity."""
        h = hashlib.sha256()
        for s in self.samples:
            st = os.stat(s.path)
            rel = os.path.relpath(s.path, self.root)
            h.update(f"{rel}\0{s.label}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
        return h.hexdigest()


def index_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageFolderIndex:
    """List an ImageFolder root.

    Args:
        root: folder with one sub-folder per class.
        classes: class names to use, in label order (e.g. from a checkpoint); by default the
            sorted sub-folder names, as torchvision does.

    Raises:
        DataError: the folder is missing, has no class folders, or no images.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"image folder '{root}' does not exist (expected ROOT/<class>/<image>)")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataError(f"image folder '{root}' has no class sub-folders; lay it out as ROOT/<class>/<image>.jpg")
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        missing = [c for c in found if c not in classes]
        if missing:
            raise DataError(
                f"image folder '{root}' has class folders {missing[:10]} that the model does not know; "
                f"folder classes: {found[:20]}{'...' if len(found) > 20 else ''}, model classes: "
                f"{classes[:20]}{'...' if len(classes) > 20 else ''}. Rename the folders to the model's class "
                "names or use the checkpoint trained on these classes"
            )
    samples: list[Sample] = []
    # every folder is listed once: the root and the class folders are taken before the walk,
    # so a link back to them (circle/loop -> ..) is a loop, not more images
    seen = {os.path.realpath(root)} | {os.path.realpath(os.path.join(root, c)) for c in classes}
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        samples += [Sample(p, label) for p in walk_images(folder, seen=seen, top_seen=True)]
    if not samples:
        raise DataError(f"image folder '{root}' contains no images with extensions {IMAGE_EXTENSIONS}")
    return ImageFolderIndex(root, list(classes), samples)


def walk_images(folder: str | os.PathLike, *, seen: set[str] | None = None, top_seen: bool = False) -> list[str]:
    """Image files under ``folder``, recursively, following folder links without ever looping.

    Order: by folder path, then file name (what ``sorted(os.walk(...))`` gives). A folder
    reached a second time — a symlink loop (``a/loop -> ..``) or a second link to a folder
    already listed — is skipped with a WARNING naming it, so no image is counted twice.

    Args:
        seen: real paths of folders already listed (shared across calls); updated.
        top_seen: ``folder`` itself is in ``seen`` already (listed by the caller's choice).
    """
    seen = set() if seen is None else seen
    listing: list[tuple[str, list[str]]] = []

    def visit(path: str, is_top: bool) -> None:
        real = os.path.realpath(path)
        if real in seen and not (is_top and top_seen):
            log.warning("skipping '%s': it leads to '%s', which is already listed (a symlink loop?)", path, real)
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list '%s': %s", path, exc)
            return
        files = []
        for e in entries:
            try:
                if e.is_dir():
                    visit(e.path, False)
                elif e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                    files.append(e.path)
            except OSError as exc:  # a dangling or looping link (ELOOP)
                log.warning("skipping '%s': %s", e.path, exc)
        listing.append((path, files))

    visit(os.fspath(folder), True)
    return [f for _, files in sorted(listing) for f in files]


def hash_fraction(name: str, salt: str = "") -> float:
    """A stable pseudo-random number in [0, 1) from a file name (independent of the folder)."""
    digest = hashlib.sha1(f"{salt}{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


DEFAULT_VAL_FRACTION = 0.3  # held-out share of a hash split: the one default of sweep, run and finetune


def split_by_hash(
    index: ImageFolderIndex, val_fraction: float, salt: str = "fixres"
) -> tuple[ImageFolderIndex, ImageFolderIndex]:
    """Split into (train, held-out) by a hash of each file's name: stable across machines."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = [], []
    for s in index.samples:
        (val if hash_fraction(os.path.basename(s.path), salt) < val_fraction else train).append(s)
    return index.subset(train), index.subset(val)


def class_balanced_subset(index: ImageFolderIndex, per_class: int, seed: int = 0) -> ImageFolderIndex:
    """At most ``per_class`` samples of every class, chosen reproducibly."""
    import random

    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in index.samples:
        by_class.setdefault(s.label, []).append(s)
    chosen: list[Sample] = []
    for label in sorted(by_class):
        items = by_class[label]
        chosen.extend(rng.sample(items, min(per_class, len(items))))
    return index.subset(sorted(chosen, key=lambda s: (s.label, s.path)))


def link_index(index: ImageFolderIndex, out_dir: str | os.PathLike) -> str:
    """A folder ``out_dir/<class>/<file>`` of symbolic links to ``index``'s images (existing links kept).

    Lets commands that take a labelled folder see exactly a split or subset (e.g. the held-out
    hash split) without copying the images.
    """
    for s in index.samples:
        d = os.path.join(out_dir, index.classes[s.label])
        os.makedirs(d, exist_ok=True)
        dst = os.path.join(d, os.path.basename(s.path))
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(s.path), dst)
    return os.fspath(out_dir)


def load_rgb(path: str):
    """Open an image fully (decode now, so corruption shows here) as 8-bit RGB (:func:`to_rgb`)."""
    from PIL import Image

    from fixres_deploy.core.preprocess import to_rgb

    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(img)
        return rgb.copy() if rgb is img else rgb  # the file's image is closed on leaving the block


@dataclass
class SkipLog:
    """Images that could not be read: counted and named, never fatal."""

    skipped: list[dict] = field(default_factory=list)

    def add(self, path: str, error: str) -> None:
        self.skipped.append({"path": path, "error": error})

    def extend(self, items: list[dict]) -> None:
        self.skipped.extend(items)

    def __len__(self) -> int:
        return len(self.skipped)


class ImageDataset:
    """A torch-style dataset over an index; unreadable images yield ``None`` (filtered later)."""

    def __init__(self, index: ImageFolderIndex, transform: Callable, *, preload: bool = False):
        self.index = index
        self.transform = transform
        self._decoded: list | None = None
        if preload:
            self.preload()

    def preload(self) -> None:
        """Decode every image once into memory (worker processes share it on fork).

        For multi-epoch training on small data sets, where JPEG decoding would otherwise cost
        more than the model.
        """
        decoded = []
        for s in progress(self.index.samples, desc="decode images"):
            try:
                decoded.append(load_rgb(s.path))
            except Exception as exc:  # PIL raises many types
                decoded.append(("skip", s.path, f"{type(exc).__name__}: {exc}"))
        self._decoded = decoded

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, i: int):
        s = self.index.samples[i]
        if self._decoded is not None:
            img = self._decoded[i]
            if isinstance(img, tuple):
                return img
            return self.transform(img), s.label, i
        try:
            img = load_rgb(s.path)
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            return ("skip", s.path, f"{type(exc).__name__}: {exc}")
        return self.transform(img), s.label, i


def collate_skipping(batch):
    """Collate, moving unreadable samples aside: returns (images, labels, indices, skipped)."""
    import torch

    good = [b for b in batch if b[0] != "skip"]
    skipped = [{"path": b[1], "error": b[2]} for b in batch if b[0] == "skip"]
    if not good:
        return None, None, None, skipped
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    indices = torch.tensor([b[2] for b in good], dtype=torch.long)
    return images, labels, indices, skipped


def default_workers() -> int:
    """Data-loading worker processes: one less than the cores, at most 4 (0 on one core)."""
    n = os.cpu_count() or 1
    return max(0, min(4, n - 1))


class ShardSampler:
    """Indices ``rank, rank + world, ...`` of a data set: every image on exactly one rank.

    torch's DistributedSampler pads the last shard with repeated images (or drops some with
    ``drop_last``) so that every rank has the same count; an evaluation or a BN-statistics
    pass must see each image once, so this sampler shards without padding (counts differ
    by at most one) and the callers all-reduce counts and gather per-image results by index.
    """

    def __init__(self, n: int, rank: int, world: int):
        if world < 1 or not 0 <= rank < world:
            raise DataError(f"shard {rank}/{world}: need 0 <= rank < world")
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    index: ImageFolderIndex,
    transform: Callable,
    *,
    batch_size: int,
    shuffle: bool = False,
    workers: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
    dataset: ImageDataset | None = None,
    shard: tuple[int, int] | None = None,
):
    """A DataLoader over ``index`` that yields ``(images, labels, indices, skipped)``.

    Args:
        shard: ``(rank, world)``: this process reads only its :class:`ShardSampler` share
            (in order, no padding); ``indices`` stay indices into the whole ``index``.
    """
    import torch
    from torch.utils.data import DataLoader

    workers = default_workers() if workers is None else workers
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = None
    if shard is not None and shard[1] > 1:
        if shuffle:
            raise DataError("make_loader: shard and shuffle together are not supported (shard a fixed order)")
        sampler = ShardSampler(len(index), *shard)
    return DataLoader(
        dataset if dataset is not None else ImageDataset(index, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skipping,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=False,
    )
