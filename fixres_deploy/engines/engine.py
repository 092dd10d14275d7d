"""The one routine from an exported ONNX to a verified engine artifact.

``build`` (:mod:`fixres_deploy.engines.build`), the sweep, ``bench`` and ``run`` all make
engines through this module, so an engine that a sweep measured is the engine ``build`` ships:
same precision variant (same bytes), same checks, same options.

The route for one (backend, precision):

* fp32, and every torch engine: the exported ONNX itself.
* fp16: an fp16 graph (TensorRT 11 has no FP16 builder flag). With
  ``BuildOptions.legacy_fp16_flag`` TensorRT keeps the TensorRT 10 weak-typing route on the
  fp32 graph instead.
* int8: explicit Q/DQ from calibration images preprocessed exactly as in deployment, at the
  engine's resolution (retinanet-examples #255). The Q/DQ flavor follows the backend and
  device (:func:`fixres_deploy.precision.variants.default_int8_flavor`): TensorRT needs
  symmetric s8 with zero-point 0; ONNX Runtime on a CPU is fast only with u8 activations.
  A TensorRT engine is built only from a Q/DQ graph that passes
  :func:`fixres_deploy.precision.variants.check_tensorrt_qdq`.

The steps are separate functions (:func:`variant_recipe`, :func:`make_variant`,
:func:`build_verified_engine`) so that the sweep can cache each in its result store;
:class:`EngineMaker` chains them with an in-memory variant cache for ``build``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from fixres_deploy.backends.base import BuildOptions, EngineArtifact, ShapeSpec, build_engine
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.utils import sha256_file

TIMING_CACHE_NAME = "tensorrt.timing.cache"
_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}


@dataclass(frozen=True)
class VariantRecipe:
    """Which ONNX graph an engine of (backend, precision) is built from.

    Attributes:
        precision: "fp32", "fp16" or "int8".
        route: "source" (the exported ONNX itself), "variant" (an fp16 / int8 Q/DQ graph
            made by :func:`make_variant`) or "legacy_fp16" (TensorRT 10 FP16 flag on the fp32 graph).
        flavor: the int8 Q/DQ flavor (None otherwise).
        calibration_resolution: the int8 calibration resolution (None otherwise).
    """

    precision: str
    route: str
    flavor: str | None = None
    calibration_resolution: int | None = None

    @property
    def tag(self) -> str:
        """File-name tag, e.g. ``int8.ort_cpu.r64``: one variant file per distinct recipe."""
        res = f"r{self.calibration_resolution}" if self.calibration_resolution else None
        return ".".join(t for t in (self.precision, self.flavor, res) if t)

    def to_dict(self) -> dict:
        return asdict(self)


def engine_device(backend: str, options: BuildOptions | None = None) -> str:
    """ "cuda" for TensorRT and for ONNX Runtime with a GPU execution provider, else "cpu"."""
    if backend == "tensorrt":
        return "cuda"
    if backend == "onnxruntime" and _GPU_PROVIDERS & set((options.providers if options else None) or []):
        return "cuda"
    return "cpu"


def variant_recipe(
    backend: str,
    precision: str,
    calibration_resolution: int | None,
    *,
    options: BuildOptions | None = None,
    int8_flavor: str | None = None,
) -> VariantRecipe:
    """Decide the graph an engine is built from (see the module docstring)."""
    options = options or BuildOptions()
    if backend == "torch" or precision == "fp32":
        return VariantRecipe(precision, "source")
    if backend == "tensorrt" and precision == "fp16" and options.legacy_fp16_flag:
        return VariantRecipe(precision, "legacy_fp16")
    if precision == "fp16":
        return VariantRecipe(precision, "variant")  # one fp16 graph serves every backend
    if precision == "int8":
        from fixres_deploy.precision.variants import default_int8_flavor

        if calibration_resolution is None:
            raise UserInputError("an int8 variant needs a calibration resolution")
        flavor = int8_flavor or default_int8_flavor(backend, device=engine_device(backend, options))
        return VariantRecipe(precision, "variant", flavor, int(calibration_resolution))
    raise UserInputError(f"precision must be one of fp32, fp16, int8, got {precision!r}")


def variant_filename(onnx_path: str | os.PathLike, recipe: VariantRecipe) -> str:
    """``<stem>.<tag>.onnx``: the same name wherever the variant is made (build or sweep)."""
    stem = os.path.splitext(os.path.basename(os.fspath(onnx_path)))[0]
    return f"{stem}.{recipe.tag}.onnx"


def engine_name(backend: str, precision: str, shapes: ShapeSpec) -> str:
    """``<backend>_<precision>_r<res>_b<batch>`` (fixed) or ``<backend>_<precision>_dynamic``."""
    if shapes.mode == "fixed":
        b, _, h, _ = shapes.profiles[0].opt
        return f"{backend}_{precision}_r{h}_b{b}"
    return f"{backend}_{precision}_dynamic"


def legacy_fp16_quant() -> dict:
    """The ``quant`` record of an engine built by the TensorRT 10 FP16 flag (no variant file)."""
    return {"precision": "fp16", "route": "TensorRT 10 BuilderFlag.FP16 on the fp32 graph", "variant_path": None}


def make_variant(
    onnx_path: str | os.PathLike,
    recipe: VariantRecipe,
    out_dir: str | os.PathLike,
    *,
    calibration_data: Any = None,
    preprocess: Any = None,
    calibration_limit: int | None = None,
    calibration_method: str = "minmax",
    float_layers: Any = "default",
    calibration_cache: Any = None,
) -> dict:
    """Write the fp16 / int8 variant of a ``"variant"`` recipe into ``out_dir``.

    Args:
        onnx_path: the exported fp32 ONNX.
        recipe: from :func:`variant_recipe` (route "variant").
        out_dir: folder of the variant file (named by :func:`variant_filename`).
        calibration_data: int8: what :func:`fixres_deploy.precision.calibration.calibration_batches`
            accepts (image folder, calibration manifest, ImageFolderIndex).
        preprocess: int8: the deployment PreprocessConfig (set to the calibration resolution here).
        calibration_limit: at most this many calibration images.
        calibration_method, float_layers, calibration_cache: passed to ``make_precision_variant``
            (``float_layers`` "none" means no float layers).

    Returns:
        ``PrecisionVariant.to_dict()`` plus ``variant_path`` (absolute), ``variant_sha256``,
        ``variant_s`` and, for int8, ``calibration_resolution`` and ``calibration_images``.
    """
    from fixres_deploy.precision.variants import make_precision_variant

    if recipe.route != "variant":
        raise ValueError(f"recipe {recipe} has no variant file to make")
    out_path = os.path.join(os.fspath(out_dir), variant_filename(onnx_path, recipe))
    batches = None
    if recipe.precision == "int8":
        if calibration_data is None:
            raise UserInputError(
                "int8 needs calibration images: pass --calibration-data DIR "
                "(an image folder like the deployment images, or a calibration manifest)"
            )
        if preprocess is None:
            raise UserInputError(
                f"'{onnx_path}' records no preprocessing (ONNX metadata), so calibration images cannot be "
                "prepared like deployment images: export it with fixres-deploy export"
            )
        from fixres_deploy.precision.calibration import calibration_batches

        batches = calibration_batches(
            calibration_data, preprocess.at_resolution(recipe.calibration_resolution), limit=calibration_limit
        )
    t0 = time.perf_counter()
    kw = {"flavor": recipe.flavor} if recipe.flavor else {}
    variant = make_precision_variant(
        onnx_path,
        recipe.precision,
        out_path,
        calibration_batches=batches,
        method=calibration_method,
        float_layers=None if float_layers == "none" else float_layers,
        cache=calibration_cache,
        **kw,
    )
    info = variant.to_dict()
    info.update(
        {
            "variant_path": os.path.abspath(variant.path),
            "variant_sha256": sha256_file(variant.path),
            "variant_s": round(time.perf_counter() - t0, 3),
        }
    )
    if recipe.precision == "int8":
        info["calibration_resolution"] = recipe.calibration_resolution
        info["calibration_images"] = len(batches)
    return info


def tensorrt_qdq_problems(path: str) -> list[str]:
    """Why a Q/DQ graph cannot become a TensorRT engine (empty: it can)."""
    from fixres_deploy.precision.variants import check_tensorrt_qdq

    return list(check_tensorrt_qdq(path))


def build_verified_engine(
    backend: str,
    source_onnx: str,
    precision: str,
    shapes: ShapeSpec,
    options: BuildOptions | None = None,
    *,
    out_dir: str | os.PathLike,
    name: str | None = None,
    qdq_problems: list[str] | None = None,
) -> EngineArtifact:
    """Build one engine from the graph :func:`variant_recipe` chose, after the checks it needs.

    A TensorRT int8 engine is refused (UserInputError) when its Q/DQ graph is not
    TensorRT-compatible. A backend failure is recorded in the artifact's ``error`` (as
    :func:`fixres_deploy.backends.base.build_engine` does); callers decide whether to go on.

    Args:
        qdq_problems: a cached :func:`tensorrt_qdq_problems` result for ``source_onnx``.
    """
    if backend == "tensorrt" and precision == "int8":
        problems = qdq_problems if qdq_problems is not None else tensorrt_qdq_problems(source_onnx)
        if problems:
            raise UserInputError(f"the Q/DQ graph '{source_onnx}' is not TensorRT-compatible: {'; '.join(problems)}")
    return build_engine(
        backend,
        source_onnx,
        shapes,
        options,
        out_dir=os.fspath(out_dir),
        precision=precision,
        name=name or engine_name(backend, precision, shapes),
    )


def with_timing_cache(options: BuildOptions, folder: str | os.PathLike) -> BuildOptions:
    """``options`` with a TensorRT timing cache in ``folder`` unless one is set (rebuilds several-fold faster)."""
    if options.timing_cache:
        return options
    return BuildOptions(**{**options.to_dict(), "timing_cache": os.path.join(os.fspath(folder), TIMING_CACHE_NAME)})


class EngineMaker:
    """Engines from one ONNX: each precision variant made once, failures remembered.

    Used by ``build`` (many engines into one folder) and ``bench`` (one engine); the sweep
    calls the same step functions through its result store.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        out_dir: str | os.PathLike,
        *,
        preprocess: Any = None,
        calibration_data: Any = None,
        calibration_method: str = "minmax",
        calibration_limit: int | None = None,
        calibration_cache: Any = None,
        int8_flavor: str | None = None,
        float_layers: Any = "default",
        options: BuildOptions | None = None,
    ):
        self.onnx_path = os.fspath(onnx_path)
        self.out_dir = os.fspath(out_dir)
        self.preprocess = preprocess
        self.calibration_data = calibration_data
        self.calibration_method = calibration_method
        self.calibration_limit = calibration_limit
        self.calibration_cache = calibration_cache
        self.int8_flavor = int8_flavor
        self.float_layers = float_layers
        self.options = options or BuildOptions()
        self._variants: dict[VariantRecipe, dict | BaseException] = {}
        self._qdq: dict[str, list[str]] = {}

    def recipe(self, backend: str, precision: str, calibration_resolution: int | None) -> VariantRecipe:
        return variant_recipe(
            backend, precision, calibration_resolution, options=self.options, int8_flavor=self.int8_flavor
        )

    def variant(self, recipe: VariantRecipe) -> tuple[str, dict | None]:
        """(ONNX path to build from, quant record or None); a failed variant raises every time."""
        if recipe.route == "source":
            return self.onnx_path, None
        if recipe.route == "legacy_fp16":
            return self.onnx_path, legacy_fp16_quant()
        if recipe not in self._variants:
            try:
                self._variants[recipe] = make_variant(
                    self.onnx_path,
                    recipe,
                    os.path.join(self.out_dir, "variants"),
                    calibration_data=self.calibration_data,
                    preprocess=self.preprocess,
                    calibration_limit=self.calibration_limit,
                    calibration_method=self.calibration_method,
                    float_layers=self.float_layers,
                    calibration_cache=self.calibration_cache,
                )
            except Exception as exc:  # recorded once, reported by every engine that needed it
                self._variants[recipe] = exc
        made = self._variants[recipe]
        if isinstance(made, BaseException):
            raise made
        return made["variant_path"], dict(made)

    def engine(
        self,
        backend: str,
        precision: str,
        shapes: ShapeSpec,
        *,
        calibration_resolution: int | None = None,
        name: str | None = None,
    ) -> tuple[EngineArtifact, dict | None]:
        """(artifact, quant record); raises for a failed variant or a refused Q/DQ graph."""
        recipe = self.recipe(backend, precision, calibration_resolution if precision == "int8" else None)
        source, quant = self.variant(recipe)
        problems = None
        if backend == "tensorrt" and precision == "int8":
            if source not in self._qdq:
                self._qdq[source] = tensorrt_qdq_problems(source)
            problems = self._qdq[source]
        art = build_verified_engine(
            backend, source, precision, shapes, self.options, out_dir=self.out_dir, name=name, qdq_problems=problems
        )
        return art, quant

    def records(self) -> list[dict]:
        """Every variant made (or its error), for the build index."""
        out = []
        for recipe, made in self._variants.items():
            if isinstance(made, BaseException):
                out.append(
                    {
                        "precision": recipe.precision,
                        "flavor": recipe.flavor,
                        "calibration_resolution": recipe.calibration_resolution,
                        "error": f"{type(made).__name__}: {made}",
                        "error_type": type(made).__name__,
                    }
                )
            else:
                out.append(dict(made))
        return out
