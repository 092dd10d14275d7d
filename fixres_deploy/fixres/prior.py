"""The resolution prior: which test resolutions to consider, from the apparent object size.

FixRes (Touvron et al., 2019, Sec. 3): RandomResizedCrop takes a crop of area fraction σ and
resizes it to K_train, so an object appears magnified by 1/√σ relative to the whole image. The
test transform resizes the image to K_image and center-crops K_test. The ratio of apparent
object sizes, test over train, is

    r = √σ · K_image / K_train,   so   E[r] = E[√σ] · K_image / K_train,

with σ ~ U(s_min, s_max) giving E[√σ] = (2/3)(s_max^1.5 − s_min^1.5) / (s_max − s_min)
(0.708 for torchvision's (0.08, 1)). With K_image = K_test / crop_pct, objects look the same
size at train and test time when K_test = K_train · crop_pct / E[√σ]: about 1.24 × K_train for
the defaults (224 → 277).

torchvision's RandomResizedCrop also jitters the aspect ratio and rejects crops that do not
fit the image, which biases σ toward small values on square images (≈0.76 instead of 0.81)
and, through the shorter-side resize at test time, raises the ratio on 4:3 images (≈0.84).
:func:`monte_carlo_ratio` simulates the real sampler on a given image size distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.preprocess import DEFAULT_CROP_PCT

# ImageNet's most common photo size (landscape 4:3): the default source distribution.
DEFAULT_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((500, 375),)


def expected_sqrt_area(scale: tuple[float, float]) -> float:
    """E[√σ] for σ ~ U(s_min, s_max); √s when the range is a single point."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise UserInputError(f"scale range must satisfy 0 < min <= max <= 1, got {scale}")
    if hi - lo < 1e-12:
        return math.sqrt(lo)
    return (2.0 / 3.0) * (hi**1.5 - lo**1.5) / (hi - lo)


def analytic_ratio(train_res: int, test_res: int, crop_pct: float, scale: tuple[float, float]) -> float:
    """E[apparent object size at test / at train] = E[√σ] · (K_test / crop_pct) / K_train."""
    return expected_sqrt_area(scale) * (test_res / crop_pct) / train_res


def sample_random_resized_crops(
    width: np.ndarray,
    height: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop (w, h) drawn exactly like ``torchvision.transforms.RandomResizedCrop.get_params``.

    Ten attempts: area = A·U(scale), log aspect ~ U(log ratio); w = round(√(area·aspect)),
    h = round(√(area/aspect)); the first attempt with 0 < w <= W and 0 < h <= H wins; else the
    fallback center crop of the whole image with the aspect clamped to ``ratio``.
    """
    n = width.shape[0]
    area = (width * height).astype(np.float64)
    out_w = np.zeros(n, dtype=np.int64)
    out_h = np.zeros(n, dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1], size=n)
        aspect = np.exp(rng.uniform(log_lo, log_hi, size=n))
        w = np.round(np.sqrt(target * aspect)).astype(np.int64)
        h = np.round(np.sqrt(target / aspect)).astype(np.int64)
        ok = (~done) & (w > 0) & (h > 0) & (w <= width) & (h <= height)
        out_w[ok], out_h[ok] = w[ok], h[ok]
        done |= ok
    if not done.all():
        rest = ~done
        in_ratio = width[rest] / height[rest]
        fw = width[rest].astype(np.int64).copy()
        fh = height[rest].astype(np.int64).copy()
        narrow = in_ratio < min(ratio)
        wide = in_ratio > max(ratio)
        fh[narrow] = np.round(fw[narrow] / min(ratio)).astype(np.int64)
        fw[wide] = np.round(fh[wide] * max(ratio)).astype(np.int64)
        out_w[rest], out_h[rest] = fw, fh
    return out_w, out_h


def monte_carlo_ratio(
    train_res: int,
    test_res: int,
    crop_pct: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    image_sizes: Sequence[tuple[int, int]],
    *,
    samples: int = 200_000,
    seed: int = 0,
    resize_mode: str = "shorter",
) -> tuple[float, float]:
    """Mean and standard error of the apparent-size ratio under torchvision's real sampler.

    Training magnifies the image by K_train / √(w·h) (geometric mean of the two axis scales of
    the crop resized to a square); testing by K_image / (shorter side) (or / height).

    Args:
        image_sizes: (width, height) of source images, sampled uniformly.
    """
    if not image_sizes:
        raise UserInputError("image_sizes is empty")
    rng = np.random.default_rng(seed)
    sizes = np.asarray(image_sizes, dtype=np.int64)
    pick = rng.integers(0, len(sizes), size=samples)
    width, height = sizes[pick, 0], sizes[pick, 1]
    w, h = sample_random_resized_crops(width, height, scale, ratio, rng)
    train_mag = train_res / np.sqrt(w.astype(np.float64) * h)
    k_image = test_res / crop_pct
    ref = np.minimum(width, height) if resize_mode == "shorter" else height
    test_mag = k_image / ref.astype(np.float64)
    r = test_mag / train_mag
    return float(r.mean()), float(r.std(ddof=1) / math.sqrt(samples))


def round_to_stride(value: float, stride: int) -> int:
    return int(max(stride, stride * round(value / stride)))


@dataclass
class PriorResult:
    """What `fixres-deploy prior` prints; every field is JSON-ready."""

    train_res: int
    crop_pct: float
    scale: tuple[float, float]
    ratio: tuple[float, float]
    stride: int
    expected_sqrt_sigma: float
    ratio_analytic: float
    ratio_monte_carlo: float
    ratio_monte_carlo_stderr: float
    image_sizes: list[tuple[int, int]]
    basis: str
    recommended_test_res_exact: float
    recommended_test_res: int
    candidates: list[int]
    explanation: str = field(default="")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"] = list(self.scale)
        d["ratio"] = list(self.ratio)
        d["image_sizes"] = [list(s) for s in self.image_sizes]
        return d


def resolution_prior(
    train_res: int,
    *,
    crop_pct: float = DEFAULT_CROP_PCT,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    stride: int = 32,
    image_sizes: Sequence[tuple[int, int]] = DEFAULT_IMAGE_SIZES,
    min_res: int | None = None,
    max_res: int | None = None,
    below: int = 1,
    above: int = 3,
    basis: str = "monte_carlo",
    samples: int = 200_000,
    seed: int = 0,
    resize_mode: str = "shorter",
) -> PriorResult:
    """Recommend a test resolution and candidates around it.

    Args:
        train_res: K_train.
        crop_pct: K_test / K_image of the test transform.
        scale: RandomResizedCrop area range used in training.
        ratio: RandomResizedCrop aspect range used in training.
        stride: candidates are multiples of it (32: the network stride; off-grid resolutions
            tested worse than their neighbours on real photos).
        image_sizes: source image (width, height) distribution for the Monte Carlo.
        min_res, max_res: clip range for candidates (default stride .. 4 × K_train).
        below, above: how many stride steps below / above the recommendation to list.
        basis: ``"monte_carlo"`` or ``"analytic"``: which ratio sets the recommendation.

    Returns:
        A :class:`PriorResult`; ``candidates`` always contains the train resolution (the
        baseline) when it is in range.
    """
    if train_res < 8 or int(train_res) != train_res:
        raise UserInputError(f"--train-res must be an integer >= 8, got {train_res}")
    if stride < 1:
        raise UserInputError(f"--stride must be >= 1, got {stride}")
    if not 0 < ratio[0] <= ratio[1]:
        raise UserInputError(f"ratio range must satisfy 0 < min <= max, got {ratio}")
    if not 0.05 < crop_pct <= 1:
        raise UserInputError(f"crop_pct must be in (0.05, 1], got {crop_pct}")
    if basis not in ("monte_carlo", "analytic"):
        raise UserInputError(f"basis must be 'monte_carlo' or 'analytic', got {basis!r}")
    for w, h in image_sizes:
        if w < 1 or h < 1:
            raise UserInputError(f"image sizes must be positive, got {w}x{h}")
    min_res = max(stride, train_res // 2) if min_res is None else min_res
    max_res = 4 * train_res if max_res is None else max_res
    if min_res > max_res:
        raise UserInputError(f"min_res {min_res} > max_res {max_res}")

    e_sqrt = expected_sqrt_area(scale)
    r_an = analytic_ratio(train_res, train_res, crop_pct, scale)
    r_mc, r_se = monte_carlo_ratio(
        train_res,
        train_res,
        crop_pct,
        scale,
        ratio,
        image_sizes,
        samples=samples,
        seed=seed,
        resize_mode=resize_mode,
    )
    r = r_mc if basis == "monte_carlo" else r_an
    # Apparent size grows linearly with K_test (crop_pct fixed): equal sizes at K_train / r.
    exact = train_res / r
    rec = min(max(round_to_stride(exact, stride), min_res), max_res)
    grid = {rec + i * stride for i in range(-below, above + 1)}
    if min_res <= train_res <= max_res:
        grid.add(train_res)
    candidates = sorted(c for c in grid if min_res <= c <= max_res)
    explanation = (
        f"Training with RandomResizedCrop(scale={scale}) shows objects magnified: at test "
        f"resolution {train_res} (resize {math.floor(train_res / crop_pct + 1e-6)}, crop {train_res}) they "
        f"appear {r:.3f}x the training size ({basis.replace('_', ' ')}; analytic {r_an:.3f}, "
        f"Monte Carlo {r_mc:.3f} ± {r_se:.3f}). Apparent size grows with K_test, so objects "
        f"match at K_test = {train_res}/{r:.3f} = {exact:.1f}, rounded to the stride {stride}: "
        f"{rec}. Fine-tune the classifier and last BatchNorm there (FixRes) and compare the "
        f"candidates {candidates}."
    )
    return PriorResult(
        train_res=int(train_res),
        crop_pct=float(crop_pct),
        scale=(float(scale[0]), float(scale[1])),
        ratio=(float(ratio[0]), float(ratio[1])),
        stride=int(stride),
        expected_sqrt_sigma=e_sqrt,
        ratio_analytic=r_an,
        ratio_monte_carlo=r_mc,
        ratio_monte_carlo_stderr=r_se,
        image_sizes=[(int(w), int(h)) for w, h in image_sizes],
        basis=basis,
        recommended_test_res_exact=exact,
        recommended_test_res=int(rec),
        candidates=[int(c) for c in candidates],
        explanation=explanation,
    )


def image_sizes_from_folder(root: str, limit: int = 2000, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) of up to ``limit`` images of a folder, read from headers only."""
    import random

    from PIL import Image

    from fixres_deploy.data.folders import index_image_folder

    index = index_image_folder(root)
    samples = list(index.samples)
    random.Random(seed).shuffle(samples)
    sizes = []
    for s in samples[:limit]:
        try:
            with Image.open(s.path) as im:
                sizes.append(im.size)
        except OSError:
            continue
    if not sizes:
        raise UserInputError(f"no readable images in '{root}' to take sizes from")
    return sizes
