"""The backend interface: build(onnx_variant, shapes, options) -> EngineArtifact; Runner.

A Runner is context-managed (activate / infer / deactivate), owns its buffers, and has the
same numpy-in, numpy-out contract for every backend: ``infer({"input": x}) -> {"logits": y}``
with float32 NCHW input and float32 output, whatever precision the engine computes in.
Public methods check their inputs and state; ``*_impl`` methods do the work (Polygraphy's
pattern), so every backend gets the same checks and the same errors.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fixres_deploy.core.errors import FixResError, UserInputError

# backend name -> module implementing `build_impl(onnx_path, shapes, options, out_dir)` and
# `runner_from_artifact(artifact, **options)`.
BACKENDS = {
    "torch": "fixres_deploy.backends.torch_backend",
    "onnxruntime": "fixres_deploy.backends.onnxruntime_backend",
    "tensorrt": "fixres_deploy.backends.tensorrt_backend",
}
PRECISIONS = ("fp32", "fp16", "int8")


class ShapeError(FixResError, ValueError):
    """An input shape the engine was not built for; the message names the profile(s)."""


@dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile: min/opt/max full input shapes (N, C, H, W)."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            v = tuple(int(x) for x in getattr(self, name))
            if len(v) != 4 or min(v) < 1:
                raise UserInputError(f"profile {name} shape must be 4 positive ints (N,C,H,W), got {v}")
            object.__setattr__(self, name, v)
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            raise UserInputError(f"profile must satisfy min <= opt <= max per axis, got {self}")

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == 4 and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict) -> ShapeProfile:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


@dataclass(frozen=True)
class ShapeSpec:
    """What input shapes an engine accepts: one fixed shape, or dynamic profiles.

    ``fixed(batch, res)`` builds an engine for exactly N×3×res×res; ``dynamic(profiles)`` for
    anything inside one of the profiles (TensorRT tunes tactics for each profile's ``opt``).
    """

    mode: str  # "fixed" or "dynamic"
    profiles: tuple[ShapeProfile, ...]

    @classmethod
    def fixed(cls, batch: int, resolution: int, channels: int = 3) -> ShapeSpec:
        s = (batch, channels, resolution, resolution)
        return cls("fixed", (ShapeProfile(s, s, s),))

    @classmethod
    def dynamic(cls, profiles: Sequence[ShapeProfile]) -> ShapeSpec:
        if not profiles:
            raise UserInputError("a dynamic shape spec needs at least one profile")
        return cls("dynamic", tuple(profiles))

    @classmethod
    def resolution_bands(
        cls, resolutions: Sequence[int], *, max_batch: int = 8, opt_batch: int = 1, bands: int = 1, channels: int = 3
    ) -> ShapeSpec:
        """Dynamic profiles covering ``resolutions``, split into ``bands`` contiguous groups.

        A profile keeps one set of tactics tuned for ``opt``; a narrow band per profile costs
        less speed than one wide range (TensorRT issue #1166).
        """
        res = sorted(set(int(r) for r in resolutions))
        if not res:
            raise UserInputError("no resolutions for dynamic profiles")
        bands = max(1, min(bands, len(res)))
        groups = [res[i * len(res) // bands : (i + 1) * len(res) // bands] for i in range(bands)]
        profiles = []
        for g in groups:
            mid = g[len(g) // 2]
            profiles.append(
                ShapeProfile(
                    (1, channels, g[0], g[0]), (opt_batch, channels, mid, mid), (max_batch, channels, g[-1], g[-1])
                )
            )
        return cls("dynamic", tuple(profiles))

    def check(self, shape: Sequence[int]) -> int:
        """Index of the first profile that accepts ``shape``; a clear ShapeError otherwise."""
        for i, p in enumerate(self.profiles):
            if p.contains(shape):
                return i
        desc = "; ".join(
            f"profile {i}: min {list(p.min)} opt {list(p.opt)} max {list(p.max)}" for i, p in enumerate(self.profiles)
        )
        raise ShapeError(
            f"input shape {list(shape)} is outside what this {self.mode}-shape engine was built for ({desc}). "
            "Rebuild with a profile that covers it (fixres-deploy build --dynamic / --resolutions / --max-batch)."
        )

    def to_dict(self) -> dict:
        return {"mode": self.mode, "profiles": [p.to_dict() for p in self.profiles]}

    @classmethod
    def from_dict(cls, d: dict) -> ShapeSpec:
        return cls(d["mode"], tuple(ShapeProfile.from_dict(p) for p in d["profiles"]))


@dataclass
class BuildOptions:
    """Backend build options; backends ignore what does not apply to them (and say so in meta).

    Attributes:
        threads: CPU threads for ONNX Runtime intra-op (None: library default).
        graph_optimization: ONNX Runtime level: "disable", "basic", "extended", "all".
        providers: ONNX Runtime execution providers (None: CPU; with onnxruntime-gpu CUDA /
            TensorRT EPs can be named here, options passed through ``provider_options``).
        provider_options: per-provider option dicts, passed through.
        save_optimized: ONNX Runtime: save the optimized model beside the engine.
        workspace_mb: TensorRT memory pool limit for the workspace.
        optimization_level: TensorRT builder optimization level (0-5; default 3).
        timing_cache: TensorRT timing cache file, loaded if present and saved after the build.
        hardware_compatibility: TensorRT hardware compatibility level ("none", "ampere_plus", ...).
        legacy_fp16_flag: TensorRT 10 only: set BuilderFlag.FP16 (weak typing) instead of
            relying on an fp16 graph; refused on TensorRT 11, which has no such flag.
        cuda_graph: runners capture the inference in a CUDA graph where supported.
        tf32: TensorRT fp32 builds may use TF32 tensor cores (10-bit mantissa); off by default,
            so an fp32 row is true fp32; an engine built with it records meta["tf32"] = True.
    """

    threads: int | None = None
    graph_optimization: str = "all"
    providers: list[str] | None = None
    provider_options: list[dict] | None = None
    save_optimized: bool = True
    workspace_mb: int | None = None
    optimization_level: int | None = None
    timing_cache: str | None = None
    hardware_compatibility: str = "none"
    legacy_fp16_flag: bool = False
    cuda_graph: bool = False
    tf32: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EngineArtifact:
    """What a build produced (or why it failed): everything needed to load and compare it.

    Attributes:
        backend, precision: e.g. "onnxruntime", "int8".
        path: the engine file (an .onnx for ONNX Runtime and torch-from-onnx, .plan for TensorRT).
        source_onnx: the ONNX precision variant it was built from.
        shapes: the ShapeSpec it accepts.
        input_name, output_name: tensor names.
        build_s: build seconds; sha256, size_bytes: of ``path``.
        meta: backend details (library versions, GPU name and compute capability for
            TensorRT, Q/DQ flavor of an int8 source, options used).
        error: set when the build failed; the other fields may then be empty.
    """

    backend: str
    precision: str
    path: str | None
    source_onnx: str | None
    shapes: ShapeSpec | None
    input_name: str = "input"
    output_name: str = "logits"
    build_s: float = 0.0
    sha256: str | None = None
    size_bytes: int | None = None
    meta: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def resolutions(self) -> list[int]:
        """Square resolutions this engine serves at its opt points (fixed: the one)."""
        if self.shapes is None:
            return []
        return sorted({p.opt[2] for p in self.shapes.profiles})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = self.shapes.to_dict() if self.shapes else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EngineArtifact:
        d = dict(d)
        d["shapes"] = ShapeSpec.from_dict(d["shapes"]) if d.get("shapes") else None
        return cls(**d)


class Runner:
    """Runs one engine: ``with runner: y = runner.infer({"input": x})["logits"]``.

    Subclasses implement ``activate_impl``, ``infer_impl`` and ``deactivate_impl`` and set
    ``input_name``, ``output_name`` and ``shapes``.
    """

    name = "runner"

    def __init__(self, *, input_name: str = "input", output_name: str = "logits", shapes: ShapeSpec | None = None):
        self.input_name = input_name
        self.output_name = output_name
        self.shapes = shapes
        self.is_active = False
        self.last_infer_ms: float | None = None

    # -- public, checked -------------------------------------------------------------
    def activate(self) -> Runner:
        if self.is_active:
            raise FixResError(f"{self.name} is already active")
        self.activate_impl()
        self.is_active = True
        return self

    def deactivate(self) -> None:
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise FixResError(f"{self.name} is not active: use 'with runner:' or runner.activate()")
        if not isinstance(feed, dict) or set(feed) != {self.input_name}:
            got = sorted(feed) if isinstance(feed, dict) else type(feed).__name__
            raise UserInputError(f"{self.name} expects a feed dict with exactly {{'{self.input_name}'}}, got {got}")
        x = feed[self.input_name]
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            raise UserInputError(
                f"{self.name}: input must be a 4-D numpy array (N,C,H,W), got {getattr(x, 'shape', type(x))}"
            )
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        x = np.ascontiguousarray(x)
        if self.shapes is not None:
            self.shapes.check(x.shape)
        t0 = time.perf_counter()
        out = self.infer_impl(x)
        self.last_infer_ms = (time.perf_counter() - t0) * 1e3
        return {self.output_name: out}

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Convenience: logits for one float32 NCHW batch."""
        return self.infer({self.input_name: x})[self.output_name]

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- backend-specific ---------------------------------------------------------------
    def activate_impl(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def infer_impl(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def deactivate_impl(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _backend_module(backend: str):
    if backend not in BACKENDS:
        raise UserInputError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend])


def build_engine(
    backend: str,
    onnx_path: str,
    shapes: ShapeSpec,
    options: BuildOptions | None = None,
    *,
    out_dir: str,
    precision: str = "fp32",
    name: str | None = None,
) -> EngineArtifact:
    """Build one engine; never raises for a failed build of a valid request (error recorded).

    Bad requests (unknown backend, missing file) raise UserInputError; a missing library
    raises MissingDependencyError naming the pip extra.
    """
    import os

    if precision not in PRECISIONS:
        raise UserInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not os.path.isfile(onnx_path):
        raise UserInputError(f"ONNX file '{onnx_path}' does not exist")
    module = _backend_module(backend)
    return module.build_impl(
        onnx_path, shapes, options or BuildOptions(), out_dir=out_dir, precision=precision, name=name
    )


def load_runner(artifact: EngineArtifact | dict, **options: Any) -> Runner:
    """A Runner for a built artifact (not yet active)."""
    if isinstance(artifact, dict):
        artifact = EngineArtifact.from_dict(artifact)
    if artifact.error:
        raise UserInputError(f"cannot run a failed build ({artifact.backend} {artifact.precision}): {artifact.error}")
    return _backend_module(artifact.backend).runner_from_artifact(artifact, **options)


# --------------------------------------------------------------------------- shared by backends
# (added with the engine backends; onnx is imported lazily, torch never)


def error_artifact(
    backend: str,
    precision: str,
    onnx_path: str | None,
    shapes: ShapeSpec | None,
    exc: BaseException,
    *,
    build_s: float = 0.0,
    meta: dict | None = None,
) -> EngineArtifact:
    """The record of a failed build: message and exception type, so a sweep can go on."""
    meta = dict(meta or {})
    meta["error_type"] = type(exc).__name__
    return EngineArtifact(
        backend=backend,
        precision=precision,
        path=None,
        source_onnx=onnx_path,
        shapes=shapes,
        build_s=build_s,
        meta=meta,
        error=f"{type(exc).__name__}: {exc}",
    )


@dataclass(frozen=True)
class OnnxIO:
    """Name and dims of an ONNX model's single image input and first output.

    ``input_dims`` holds an int per static axis and a string (the dim_param, or "?") per
    dynamic axis.
    """

    input_name: str
    input_dims: tuple
    output_name: str
    input_elem_type: int

    @property
    def dynamic_axes(self) -> list[int]:
        return [i for i, d in enumerate(self.input_dims) if not isinstance(d, int)]


def onnx_io(onnx_path: str) -> OnnxIO:
    """Read the input/output signature of an ONNX file without loading its weights."""
    import onnx

    try:
        model = onnx.load(onnx_path, load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a bad file
        raise UserInputError(f"'{onnx_path}' is not a readable ONNX model: {exc}") from exc
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(inputs) != 1 or not model.graph.output:
        raise UserInputError(
            f"'{onnx_path}' has {len(inputs)} graph inputs and {len(model.graph.output)} outputs; "
            "an image classifier needs exactly one input (N,C,H,W) and one output"
        )
    inp = inputs[0]
    dims = []
    for d in inp.type.tensor_type.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?"))
    if len(dims) != 4:
        raise UserInputError(f"'{onnx_path}': input '{inp.name}' has rank {len(dims)}, expected 4 (N,C,H,W)")
    return OnnxIO(inp.name, tuple(dims), model.graph.output[0].name, int(inp.type.tensor_type.elem_type))


def check_onnx_accepts(onnx_path: str, shapes: ShapeSpec, io: OnnxIO | None = None) -> OnnxIO:
    """Refuse, before any build, a ShapeSpec that the ONNX file's static axes cannot serve.

    A model exported with a fixed input cannot become an engine for another resolution or
    batch: the fix is a dynamic export, not a build option.
    """
    io = io or onnx_io(onnx_path)
    axis_names = ("batch", "channels", "height", "width")
    for p in shapes.profiles:
        for axis, d in enumerate(io.input_dims):
            if isinstance(d, int) and not (p.min[axis] == d == p.max[axis]):
                want = p.min[axis] if p.min[axis] == p.max[axis] else f"{p.min[axis]}..{p.max[axis]}"
                raise UserInputError(
                    f"'{onnx_path}' has a fixed input shape {list(io.input_dims)}, but an engine for "
                    f"{axis_names[axis]} {want} was requested ({shapes.mode} profile min {list(p.min)} "
                    f"max {list(p.max)}). Export the model with dynamic axes "
                    "(fixres-deploy export --dynamic) or request its own shape."
                )
    return io
