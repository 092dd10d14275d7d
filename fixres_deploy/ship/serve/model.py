"""A multires bundle as the server runs it: decoded images in, probabilities at a resolution out.

The preprocessing is the runtime's (:func:`fixres_deploy.core.preprocess.preprocess_pil` at the
chosen resolution, the bundle's exact description otherwise), the engine is the bundle's,
loaded and verified by :class:`fixres_deploy.ship.runtime.Classifier`. :class:`BatchRunner`
is also what :func:`fixres_deploy.export.multires.measure_latency_table` times, so the latency
table the policy trusts measures the same work the server does per batch.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig, preprocess_pil
from fixres_deploy.ship.manifest import BundleError, batch_range
from fixres_deploy.ship.runtime import softmax

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000


class BadImageError(UserInputError):
    """The request body is not an image this server can decode (HTTP 400)."""


class ImageTooLargeError(BadImageError):
    """The image is over the server's size limit (HTTP 413)."""


def decode_image(data: bytes, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode image bytes to an RGB PIL image, refusing empty, oversized and undecodable input.

    Raises:
        BadImageError: empty or undecodable. ImageTooLargeError: over ``max_bytes`` or ``max_pixels``.
    """
    from PIL import Image

    if not data:
        raise BadImageError("empty body: send the image file's bytes")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"image of {len(data)} bytes is over the limit of {max_bytes} bytes")
    from fixres_deploy.data.folders import load_rgb

    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only: check the size before decoding
            w, h = img.size
        if w * h > max_pixels:
            raise ImageTooLargeError(f"image of {w}x{h} px is over the limit of {max_pixels} pixels")
        return load_rgb(io.BytesIO(data))  # the project's decoding (mode conversions, decoded now)
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"not a readable image: {type(exc).__name__}: {exc}") from exc


class BatchRunner:
    """Preprocess decoded images at one resolution and run them through an engine runner.

    Args:
        runner: an active :class:`fixres_deploy.backends.base.Runner` of a head-bank engine.
        preprocess: the bundle's preprocessing (its resolution is replaced per batch).
        max_batch: the engine's largest batch (larger batches are split).
        workers: threads resizing images (PIL releases the GIL).
    """

    def __init__(self, runner, preprocess: PreprocessConfig, *, max_batch: int, workers: int = 2):
        self.runner = runner
        self.preprocess = preprocess
        self.max_batch = int(max_batch)
        self._pool = ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix="fixres-preprocess")
        self._cfgs: dict[int, PreprocessConfig] = {}

    def prepare(self, images, resolution: int) -> np.ndarray:
        """float32 (N, 3, R, R) of decoded PIL images."""
        cfg = self._cfgs.get(resolution)
        if cfg is None:
            cfg = self._cfgs[resolution] = self.preprocess.at_resolution(resolution)
        if len(images) == 1:
            return preprocess_pil(images[0], cfg)[None]
        return np.stack(list(self._pool.map(lambda im: preprocess_pil(im, cfg), images)))

    def probabilities(self, images, resolution: int) -> np.ndarray:
        """Softmax probabilities (N, K) of decoded images at ``resolution``."""
        x = self.prepare(images, resolution)
        outs = [
            np.asarray(self.runner.predict(np.ascontiguousarray(x[i : i + self.max_batch])))
            for i in range(0, len(x), self.max_batch)
        ]
        return softmax(np.concatenate(outs))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class MultiresModel:
    """A loaded multires bundle (``fixres-deploy export-multires --bundle``).

    Attributes:
        name: the model name of the v2 protocol (the bundle folder's name).
        resolutions, accuracy (``{R: top1}``), latency (the manifest's table), class_names.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        *,
        backend: str | None = None,
        threads: int | None = None,
        workers: int = 2,
        verify: bool = True,
        name: str | None = None,
    ):
        from fixres_deploy.ship.runtime import Classifier

        self.classifier = Classifier(bundle_dir, backend=backend, verify=verify, threads=threads)
        manifest = self.classifier.manifest
        if manifest.multires is None:
            self.classifier.close()
            raise BundleError(
                f"'{bundle_dir}' is not a multires bundle (its manifest has no multires section): make one with "
                "fixres-deploy export-multires --checkpoints ... --bundle DIR"
            )
        info = manifest.multires
        self.info = info
        self.resolutions = sorted(int(r) for r in info.resolutions)
        for r in self.resolutions:
            if batch_range(self.classifier.artifact.shapes, r) is None:
                raise BundleError(f"the engine of '{bundle_dir}' does not accept {r}x{r} inputs")
        self.accuracy = {int(a["resolution"]): a.get("top1") for a in info.accuracy}
        self.latency = dict(info.latency)
        self.class_names = list(self.classifier.class_names)
        base = os.path.basename(os.path.abspath(os.fspath(bundle_dir)))  # a .tar.gz is extracted to a temp folder
        for suffix in (".tar.gz", ".tgz", ".tar"):
            base = base.removesuffix(suffix)
        self.name = name or base
        self.max_batch = self.classifier.max_batch
        self.classifier.activate()
        self.runner = BatchRunner(
            self.classifier.runner, self.classifier.preprocess, max_batch=self.max_batch, workers=workers
        )

    def run_batch(self, images, resolution: int) -> list[np.ndarray]:
        """One probability vector per decoded image (the batcher's ``run_batch``)."""
        return list(self.runner.probabilities(images, resolution))

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of a client-preprocessed float32 (N, 3, R, R) batch (the head follows R)."""
        return self.classifier.logits(x)

    def close(self) -> None:
        self.runner.close()
        self.classifier.close()
