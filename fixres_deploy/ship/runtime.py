"""The production runtime: classify images with a bundle, without torch.

Everything here runs on numpy + PIL + the engine's runtime (ONNX Runtime or TensorRT):
the preprocessing is :func:`fixres_deploy.core.preprocess.preprocess_pil` built from the bundle
manifest's exact description (the same pixels as the torchvision transform the accuracy
was measured with), and the engine is driven through the backend Runner interface.

    with Classifier("bundle/") as clf:
        for p in clf.classify_paths(["cat.jpg", "dog.png"], top_k=3):
            print(p.path, p.label, p.score)

Engine shapes are respected: a fixed-batch engine always gets exactly its batch (the last
batch is padded and the padded outputs dropped); a dynamic engine gets batches up to its
profile's max. An unreadable image never fails the batch: its Prediction carries ``error``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fixres_deploy.core.errors import FixResError, UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig, preprocess_pil
from fixres_deploy.data.folders import IMAGE_EXTENSIONS, load_rgb, walk_images
from fixres_deploy.ship.archive import extract_bundle
from fixres_deploy.ship.manifest import TAR_SUFFIX, BundleError, batch_range, load_manifest
from fixres_deploy.ship.verify import verify_bundle

log = logging.getLogger(__name__)

DEFAULT_BATCH_CAP = 32  # a dynamic engine's default batch: its profile max, at most this


@dataclass
class Prediction:
    """One image's result.

    Attributes:
        path: the file (or ``"<image i>"`` for in-memory images).
        label, index: the top-1 class name and output index.
        score: its softmax probability.
        top_k: ``[{"label", "index", "score"}, ...]`` best first (``top_k`` entries).
        error: why the image could not be classified (then label/index/score are None).
    """

    path: str | None
    label: str | None = None
    index: int | None = None
    score: float | None = None
    top_k: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: max subtracted)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expand_image_paths(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Files as given; folders expanded to the image files inside them (sorted, recursive).

    Paths that do not exist are kept, so they come back as Predictions with an error.
    """
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = walk_images(p)
            if not found:
                raise UserInputError(
                    f"folder '{p}' holds no image files (extensions {', '.join(IMAGE_EXTENSIONS)}): nothing to predict"
                )
            out += found
        else:
            out.append(p)
    return out


class Classifier:
    """Classify images with a bundle (folder or ``.tar.gz``); no torch involved.

    Args:
        bundle_dir: the bundle folder (a ``.tar.gz`` is extracted safely to a temp folder
            that lives as long as the Classifier).
        backend: run another engine of the bundle (``"onnxruntime"`` also runs a TensorRT
            bundle's ONNX source on a machine without the GPU it was built for).
        verify: refuse a bundle that fails :func:`fixres_deploy.ship.bundle.verify_bundle`
            (hashes, manifest digest, library and GPU compatibility).
        threads: ONNX Runtime intra-op threads (None: library default).
        workers: threads decoding and resizing images (PIL releases the GIL there).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        *,
        backend: str | None = None,
        verify: bool = True,
        threads: int | None = None,
        workers: int | None = None,
    ):
        path = os.fspath(bundle_dir)
        self._tmp: tempfile.TemporaryDirectory | None = None
        if os.path.isfile(path) and path.endswith((TAR_SUFFIX, ".tgz", ".tar")):
            self._tmp = tempfile.TemporaryDirectory(prefix="fixres-bundle-")
        try:
            self._load(extract_bundle(path, self._tmp.name) if self._tmp else path, backend, verify, threads)
        except BaseException:
            if self._tmp is not None:
                self._tmp.cleanup()
            raise
        self.workers = max(1, workers if workers is not None else min(4, os.cpu_count() or 1))

    def _load(self, path: str, backend: str | None, verify: bool, threads: int | None) -> None:
        self.bundle_dir = path
        self.manifest = load_manifest(path)
        if verify:
            # The runner's own session creation below is the load check; do not load twice.
            verify_bundle(path, backend=backend, check_load=False).raise_if_failed()
        self.engine = self.manifest.engine_for(backend)
        self.preprocess = PreprocessConfig.from_dict(self.manifest.preprocess)
        self.class_names = list(self.manifest.class_names)
        self.artifact = self.engine.to_artifact(path)
        k = self.preprocess.test_input_size
        rng = batch_range(self.artifact.shapes, k)
        if rng is None:
            raise BundleError(f"engine {self.engine.file} of '{path}' does not accept {k}x{k} inputs")
        self.min_batch, self.max_batch = rng
        self.fixed_batch = self.min_batch == self.max_batch
        from fixres_deploy.backends import load_runner

        options = {"threads": threads} if threads and self.engine.backend == "onnxruntime" else {}
        self.runner = load_runner(self.artifact, **options)

    # -- lifecycle ------------------------------------------------------------------------
    def activate(self) -> Classifier:
        if not self.runner.is_active:
            try:
                self.runner.activate()
            except FixResError:  # ours already name the file and the fix (MissingDependencyError: the extra)
                raise
            except Exception as exc:  # the engine library's own errors: say which bundle file failed
                raise BundleError(
                    f"cannot load engine {self.engine.file} of '{self.bundle_dir}' with {self.engine.backend}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                ) from exc
        return self

    def close(self) -> None:
        self.runner.deactivate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Classifier:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- preprocessing --------------------------------------------------------------------
    def prepare(self, image, resolution: int | None = None) -> np.ndarray:
        """The network input of one image (path, PIL image or uint8 H×W×3 / H×W array): float32 3×K×K.

        ``resolution`` replaces K (a multi-resolution bundle's engine serves several).
        """
        cfg = self.preprocess if resolution is None else self.preprocess.at_resolution(resolution)
        return preprocess_pil(self._as_pil(image), cfg)

    def _as_pil(self, image):
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            return load_rgb(os.fspath(image))  # decoded now: a truncated file fails here, not later
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, np.ndarray):
            if (
                image.dtype != np.uint8
                or image.ndim not in (2, 3)
                or (image.ndim == 3 and image.shape[2] not in (1, 3, 4))
            ):
                raise UserInputError(f"image arrays must be uint8 H×W, H×W×3 or H×W×4, got {image.dtype} {image.shape}")
            return Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        raise UserInputError(f"cannot classify a {type(image).__name__}: give a path, a PIL image or a uint8 array")

    def _prepare_one(self, item) -> tuple[np.ndarray | None, str | None]:
        from PIL import Image

        try:
            return self.prepare(item), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            if isinstance(exc, UserInputError):
                raise
            where = os.fspath(item) if isinstance(item, (str, os.PathLike)) else "image"
            return None, f"cannot read image '{where}': {type(exc).__name__}: {exc}"

    # -- inference ------------------------------------------------------------------------
    def _chunk(self, batch_size: int | None) -> int:
        if self.fixed_batch:
            if batch_size not in (None, self.max_batch):
                log.info("engine takes exactly %d images per call; batch_size %s ignored", self.max_batch, batch_size)
            return self.max_batch
        if batch_size is None:
            return min(self.max_batch, DEFAULT_BATCH_CAP)
        if int(batch_size) < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > self.max_batch:
            log.info("batch_size %d above the engine's max %d: using %d", batch_size, self.max_batch, self.max_batch)
        return min(int(batch_size), self.max_batch)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Logits of one batch of at most ``max_batch`` images, padded up to the engine's minimum."""
        m = x.shape[0]
        if m < self.min_batch:  # pad with zeros (the mean image after normalization); outputs dropped
            x = np.concatenate([x, np.zeros((self.min_batch - m, *x.shape[1:]), dtype=np.float32)])
        y = np.asarray(self.runner.predict(np.ascontiguousarray(x, dtype=np.float32)))[:m]
        if y.ndim != 2 or y.shape[1] != len(self.class_names):
            raise BundleError(
                f"engine {self.engine.file} returned shape {list(y.shape)} but the bundle has "
                f"{len(self.class_names)} labels"
            )
        return y

    def logits(self, x: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
        """Logits of a float32 N×3×K×K array of any N: split and padded to the engine's shapes."""
        self.activate()
        chunk = self._chunk(batch_size)
        outs = [self._run(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.class_names)), np.float32)

    def _classify(self, items: Sequence, names: Sequence[str], batch_size: int | None, top_k: int) -> list[Prediction]:
        if int(top_k) < 1:
            raise UserInputError(f"top_k must be >= 1, got {top_k}")
        k = min(int(top_k), len(self.class_names))
        chunk = self._chunk(batch_size)
        self.activate()
        results: list[Prediction] = []
        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 and len(items) > 1 else None
        try:
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                prepared = list(pool.map(self._prepare_one, part)) if pool else [self._prepare_one(it) for it in part]
                good = [i for i, (arr, _) in enumerate(prepared) if arr is not None]
                probs = None
                if good:
                    probs = softmax(self._run(np.stack([prepared[i][0] for i in good])))
                row = {i: r for r, i in enumerate(good)}
                for i, (_, err) in enumerate(prepared):
                    name = names[start + i]
                    if err is not None:
                        results.append(Prediction(path=name, error=err))
                        continue
                    p = probs[row[i]]
                    order = np.argsort(-p, kind="stable")[:k]
                    top = [{"label": self.class_names[j], "index": int(j), "score": float(p[j])} for j in order]
                    results.append(
                        Prediction(
                            path=name, label=top[0]["label"], index=top[0]["index"], score=top[0]["score"], top_k=top
                        )
                    )
        finally:
            if pool is not None:
                pool.shutdown()
        return results

    def classify_paths(
        self, paths: Iterable[str | os.PathLike], *, batch_size: int | None = None, top_k: int = 1
    ) -> list[Prediction]:
        """Classify image files (folders are expanded); one Prediction per file, in order."""
        files = expand_image_paths(paths)
        return self._classify(files, files, batch_size, top_k)

    def classify_images(
        self, images: Sequence, *, batch_size: int | None = None, top_k: int = 1, names: Sequence[str] | None = None
    ) -> list[Prediction]:
        """Classify PIL images or uint8 H×W×3 arrays; ``names`` label the Predictions' ``path``."""
        images = list(images)
        for i, im in enumerate(images):
            if isinstance(im, (str, os.PathLike)):
                raise UserInputError(f"classify_images got a path at position {i}: use classify_paths")
            if isinstance(im, np.ndarray):
                self._as_pil(im)  # a wrong array is the caller's bug: fail loudly, up front
        if names is not None and len(names) != len(images):
            raise UserInputError(f"{len(names)} names for {len(images)} images")
        names = list(names) if names is not None else [f"<image {i}>" for i in range(len(images))]
        return self._classify(images, names, batch_size, top_k)


def predict_bundle(
    bundle_dir: str | os.PathLike,
    paths: Iterable[str | os.PathLike],
    *,
    batch_size: int | None = None,
    top_k: int = 1,
    backend: str | None = None,
    verify: bool = True,
    threads: int | None = None,
) -> list[Prediction]:
    """`fixres-deploy predict`: classify image files (or folders of them) with a bundle.

    Raises:
        UserInputError: a folder holds no images (checked before the bundle is loaded).
    """
    paths = expand_image_paths(paths)
    with Classifier(bundle_dir, backend=backend, verify=verify, threads=threads) as clf:
        return clf.classify_paths(paths, batch_size=batch_size, top_k=top_k)
