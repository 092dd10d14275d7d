"""ONNX Runtime backend: the CPU engine here, CUDA / TensorRT execution providers with onnxruntime-gpu.

"Building" an ONNX Runtime engine means: write the ONNX file the session will run into the
output folder (for a fixed ShapeSpec from a dynamic export, a copy with the input dims set,
so that ORT can plan memory and pick kernels for one shape), create the session once with
the requested threads, graph optimization level and providers (this validates the model and
measures the session start-up), and save ORT's optimized graph beside it for inspection.

This module must not import torch: the production runtime loads it in a torch-free process.
onnxruntime is imported lazily through ``fixres_deploy.core.errors.require``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np

from fixres_deploy.backends.base import (
    BuildOptions,
    EngineArtifact,
    OnnxIO,
    Runner,
    ShapeProfile,
    ShapeSpec,
    check_onnx_accepts,
    error_artifact,
)
from fixres_deploy.core.errors import FixResError, MissingDependencyError, UserInputError, require
from fixres_deploy.core.utils import atomic_path, sha256_file
from fixres_deploy.precision.qdq_fp16 import ort_graph_optimization_for

log = logging.getLogger(__name__)

BACKEND = "onnxruntime"
CPU_PROVIDER = "CPUExecutionProvider"
# Providers whose inputs/outputs live on the GPU: the runner binds them with IO binding.
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
GRAPH_LEVELS = ("disable", "basic", "extended", "layout", "all")


def import_onnxruntime(feature: str = "ONNX Runtime engines"):
    return require("onnxruntime", "cpu", feature)


def check_available() -> None:
    """Raise MissingDependencyError now rather than after precision variants were made."""
    import_onnxruntime()


def graph_optimization_level(ort, name: str):
    """Map "disable" / "basic" / "extended" / "layout" / "all" to ORT's enum."""
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):  # ORT >= 1.22
        levels["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
    if name not in levels:
        raise UserInputError(f"graph optimization level must be one of {sorted(levels)}, got {name!r}")
    return levels[name]


def resolve_providers(ort, providers: list[str] | None, provider_options: list[dict] | None):
    """Check the requested execution providers exist in this ONNX Runtime build.

    Returns:
        (providers, provider_options) ready for ``InferenceSession``.
    """
    providers = list(providers or [CPU_PROVIDER])
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        if any(p in GPU_PROVIDERS for p in missing):
            raise MissingDependencyError(
                f"ONNX Runtime execution provider(s) {missing} are not available in this onnxruntime "
                f"{ort.__version__} build (available: {available}). They need onnxruntime-gpu and a "
                "CUDA GPU: pip install 'fixres-deploy[ort-gpu]' (onnxruntime and onnxruntime-gpu conflict: "
                "uninstall onnxruntime first)"
            )
        raise UserInputError(f"unknown ONNX Runtime execution provider(s) {missing}; available: {available}")
    if provider_options is not None and len(provider_options) != len(providers):
        raise UserInputError(
            f"provider_options has {len(provider_options)} entries for {len(providers)} providers; give one dict per provider"
        )
    return providers, (list(provider_options) if provider_options is not None else None)


# Providers whose optimized graph ORT can serialize; compiling EPs (TensorRT, ...) put compiled
# nodes in the graph and ORT fails with "Unable to serialize model as it contains compiled nodes"
# (onnxruntime PR #5840).
SERIALIZABLE_PROVIDERS = (CPU_PROVIDER, "CUDAExecutionProvider")


class ProviderFallbackError(FixResError, RuntimeError):
    """ONNX Runtime dropped a requested execution provider (it falls back to CPU silently)."""


def check_session_providers(requested: list[str], session_providers: list[str], *, what: str) -> None:
    """Refuse a session that does not run on every provider requested (onnxruntime #23372).

    ORT logs a warning and runs on the CPU when a GPU provider cannot start (missing CUDA or
    cuDNN libraries, no device): a row labelled CUDA would hold CPU numbers.
    """
    missing = [p for p in requested if p not in session_providers]
    if missing:
        raise ProviderFallbackError(
            f"{what}: ONNX Runtime created the session without {missing} (it runs on {session_providers}). "
            "The provider is installed but could not start: check the CUDA/cuDNN/TensorRT libraries and the "
            "GPU (ONNX Runtime's log above names the missing library)."
        )


def shape_string(input_name: str, shapes: list[tuple[int, ...]]) -> str:
    """ORT TensorRT EP profile syntax: 'input:1x3x224x224' (one entry per profile, comma-separated)."""
    return ",".join(f"{input_name}:" + "x".join(str(int(d)) for d in s) for s in shapes)


def default_provider_options(
    providers: list[str],
    provider_options: list[dict] | None,
    *,
    device_id: int = 0,
    cache_dir: str | None = None,
    shapes: ShapeSpec | None = None,
    input_name: str = "input",
) -> list[dict] | None:
    """Per-provider options: the user's, over defaults that make GPU providers do the right thing.

    CUDA EP: ``device_id``. TensorRT EP: ``device_id``, an engine cache and a timing cache in
    ``cache_dir`` (else every session rebuilds its engines), and explicit profile shapes from the
    ShapeSpec (else the EP rebuilds the engine whenever a new input shape arrives).
    """
    user = list(provider_options) if provider_options is not None else [{} for _ in providers]
    out = []
    for name, given in zip(providers, user):
        opts: dict = {}
        if name in GPU_PROVIDERS:
            opts["device_id"] = int(device_id)
        if name == "TensorrtExecutionProvider":
            if cache_dir:
                os.makedirs(cache_dir, exist_ok=True)
                opts.update(
                    trt_engine_cache_enable=True,
                    trt_engine_cache_path=cache_dir,
                    trt_timing_cache_enable=True,
                    trt_timing_cache_path=cache_dir,
                )
            if shapes is not None:
                opts.update(
                    trt_profile_min_shapes=shape_string(input_name, [p.min for p in shapes.profiles]),
                    trt_profile_opt_shapes=shape_string(input_name, [p.opt for p in shapes.profiles]),
                    trt_profile_max_shapes=shape_string(input_name, [p.max for p in shapes.profiles]),
                )
        opts.update(given or {})
        out.append(opts)
    return out if provider_options is not None or any(out) else None


def session_options(ort, *, threads: int | None, graph_optimization: str, optimized_model_path: str | None = None):
    so = ort.SessionOptions()
    if threads:
        if threads < 1:
            raise UserInputError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = int(threads)
    so.graph_optimization_level = graph_optimization_level(ort, graph_optimization)
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
        # ORT warns that an ENABLE_ALL graph may hold hardware-specific nodes: that is why it
        # is saved for inspection only (see meta "optimized_model_note"), never run elsewhere.
        so.log_severity_level = 3
    return so


def write_engine_onnx(src: str, dst: str, io: OnnxIO, shapes: ShapeSpec) -> bool:
    """Copy ``src`` to ``dst`` (weights inline), fixing the input dims for a fixed ShapeSpec.

    Returns:
        True when dims were fixed (the source had dynamic axes).
    """
    import onnx

    model = onnx.load(src)  # with external data: the engine folder becomes self-contained
    fixed = False
    if shapes.mode == "fixed" and io.dynamic_axes:
        shape = shapes.profiles[0].opt
        inp = next(i for i in model.graph.input if i.name == io.input_name)
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            dim.Clear()
            dim.dim_value = int(shape[axis])
        # Intermediate shapes inferred for symbolic dims would now contradict the input.
        del model.graph.value_info[:]
        fixed = True
    with atomic_path(dst) as tmp:
        try:
            onnx.save_model(model, tmp)
        except ValueError:  # > 2 GB protobuf limit: keep the weights in a data file beside it
            onnx.save_model(
                model,
                tmp,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=os.path.basename(dst) + ".data",
            )
    return fixed


def build_impl(
    onnx_path: str, shapes: ShapeSpec, options: BuildOptions, *, out_dir: str, precision: str, name: str | None
) -> EngineArtifact:
    """Prepare an ONNX Runtime engine: the ONNX it runs, a validated session, the optimized graph.

    Raises:
        MissingDependencyError: onnxruntime (or a requested GPU provider) is not installed.
        UserInputError: the ONNX cannot serve ``shapes`` (fixed export asked for another
            shape), bad options.
    """
    ort = import_onnxruntime()
    io = check_onnx_accepts(onnx_path, shapes)
    providers, provider_options = resolve_providers(ort, options.providers, options.provider_options)
    graph_optimization_level(ort, options.graph_optimization)  # validate before any work
    if providers == [CPU_PROVIDER] and ort_graph_optimization_for(onnx_path, options.graph_optimization) != (
        options.graph_optimization
    ):  # ORT CPU mis-fuses fp16 Q/DQ graphs (precision/qdq_fp16.py)
        options = dataclasses.replace(options, graph_optimization="disable")
    name = name or f"{BACKEND}_{precision}_{shapes.mode}"
    os.makedirs(out_dir, exist_ok=True)
    engine_path = os.path.join(out_dir, f"{name}.onnx")
    save_optimized = options.save_optimized and all(p in SERIALIZABLE_PROVIDERS for p in providers)
    optimized_path = os.path.join(out_dir, f"{name}.optimized.onnx") if save_optimized else None
    provider_options = default_provider_options(
        providers,
        provider_options,
        device_id=int((options.extra or {}).get("device_id", 0)),
        cache_dir=os.path.join(out_dir, f"{name}.ort_trt_cache"),
        shapes=shapes,
        input_name=io.input_name,
    )
    meta = {
        "onnxruntime_version": ort.__version__,
        "providers_requested": providers,
        "provider_options": provider_options,
        "threads": options.threads,
        "graph_optimization": options.graph_optimization,
        "source_sha256": sha256_file(onnx_path),
        "source_input_dims": list(io.input_dims),
        "ignored_options": _ignored_options(options),
    }
    if options.save_optimized and not save_optimized:
        meta["optimized_model_note"] = (
            f"not saved: {providers} compile nodes ORT cannot serialize (only {list(SERIALIZABLE_PROVIDERS)} can)"
        )
    t0 = time.perf_counter()
    try:
        meta["fixed_shape_copy"] = write_engine_onnx(onnx_path, engine_path, io, shapes)
        if optimized_path:
            with atomic_path(optimized_path) as tmp_opt:
                so = session_options(
                    ort,
                    threads=options.threads,
                    graph_optimization=options.graph_optimization,
                    optimized_model_path=tmp_opt,
                )
                session = ort.InferenceSession(
                    engine_path, sess_options=so, providers=providers, provider_options=provider_options
                )
                if not os.path.exists(tmp_opt) or os.path.getsize(tmp_opt) == 0:
                    raise FixResError(f"ONNX Runtime did not write the optimized model to {tmp_opt}")
        else:
            so = session_options(ort, threads=options.threads, graph_optimization=options.graph_optimization)
            session = ort.InferenceSession(
                engine_path, sess_options=so, providers=providers, provider_options=provider_options
            )
        meta["providers"] = session.get_providers()
        check_session_providers(providers, meta["providers"], what=f"building '{engine_path}'")
        meta["input_type"] = session.get_inputs()[0].type
        meta["output_type"] = session.get_outputs()[0].type
        del session
    except (UserInputError, MissingDependencyError):
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types: record, don't crash a sweep
        return error_artifact(BACKEND, precision, onnx_path, shapes, exc, build_s=time.perf_counter() - t0, meta=meta)
    build_s = time.perf_counter() - t0
    meta["optimized_model"] = optimized_path
    if optimized_path:
        meta["optimized_model_note"] = (
            "ORT's optimized graph, for inspection: at level 'all' it may hold "
            "hardware-specific nodes; the engine runs the .onnx"
        )
    return EngineArtifact(
        backend=BACKEND,
        precision=precision,
        path=engine_path,
        source_onnx=onnx_path,
        shapes=shapes,
        input_name=io.input_name,
        output_name=io.output_name,
        build_s=build_s,
        sha256=sha256_file(engine_path),
        size_bytes=os.path.getsize(engine_path),
        meta=meta,
    )


def _ignored_options(options: BuildOptions) -> list[str]:
    """TensorRT-only options set by the user: recorded so nobody thinks they applied."""
    defaults = BuildOptions()
    names = ("workspace_mb", "optimization_level", "timing_cache", "hardware_compatibility", "legacy_fp16_flag")
    return [n for n in names if getattr(options, n) != getattr(defaults, n)]


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file in an ONNX Runtime session it owns.

    On the CPU provider the numpy input goes straight to ``session.run``. On the CUDA or
    TensorRT provider the runner uses IO binding: the input is copied to the GPU once, the
    output is bound on the device and copied back once, so ORT does not stage copies itself.
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str,
        *,
        shapes: ShapeSpec | None = None,
        threads: int | None = None,
        graph_optimization: str = "all",
        providers: list[str] | None = None,
        provider_options: list[dict] | None = None,
        io_binding: bool | None = None,
        device_id: int = 0,
        input_name: str | None = None,
        output_name: str | None = None,
    ):
        super().__init__(input_name=input_name or "input", output_name=output_name or "logits", shapes=shapes)
        if not os.path.isfile(onnx_path):
            raise UserInputError(f"ONNX file '{onnx_path}' does not exist")
        self.onnx_path = onnx_path
        self.threads = threads
        self.graph_optimization = graph_optimization
        self.providers = providers
        self.provider_options = provider_options
        self.io_binding = io_binding
        self.device_id = device_id
        self._names_given = input_name is not None and output_name is not None
        self.session = None
        self._ort = None
        self._input_dtype = np.float32
        self._device = "cpu"
        self._bindings: dict = {}

    def activate_impl(self) -> None:
        ort = import_onnxruntime()
        providers, provider_options = resolve_providers(ort, self.providers, self.provider_options)
        provider_options = default_provider_options(
            providers, provider_options, device_id=self.device_id, shapes=self.shapes, input_name=self.input_name
        )
        if providers == [CPU_PROVIDER]:  # ORT CPU mis-fuses fp16 Q/DQ graphs (precision/qdq_fp16.py)
            self.graph_optimization = ort_graph_optimization_for(self.onnx_path, self.graph_optimization)
        so = session_options(ort, threads=self.threads, graph_optimization=self.graph_optimization)
        self.session = ort.InferenceSession(
            self.onnx_path, sess_options=so, providers=providers, provider_options=provider_options
        )
        check_session_providers(providers, self.session.get_providers(), what=f"running '{self.onnx_path}'")
        self._ort = ort
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if not self._names_given:
            self.input_name, self.output_name = inp.name, out.name
        self._input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        if self.shapes is None and len(inp.shape) == 4 and all(isinstance(d, int) and d > 0 for d in inp.shape):
            # A fixed-shape ONNX run without an artifact: refuse other shapes with our ShapeError.
            s = tuple(inp.shape)
            self.shapes = ShapeSpec("fixed", (ShapeProfile(s, s, s),))
        primary = self.session.get_providers()[0]
        if self.io_binding is None:
            self.io_binding = primary in GPU_PROVIDERS
        self._device = "cuda" if primary in GPU_PROVIDERS else "cpu"
        self._bindings = {}

    def _bound_run(self, x: np.ndarray) -> np.ndarray:
        """IO binding with device buffers allocated once per input shape and reused.

        The first call of a shape lets ORT allocate the output on the device, then binds that
        OrtValue, so later calls copy the input in place and allocate nothing.
        """
        key = (tuple(x.shape), x.dtype.str)
        state = self._bindings.get(key)
        if state is None:
            binding = self.session.io_binding()
            x_dev = self._ort.OrtValue.ortvalue_from_shape_and_type(x.shape, x.dtype, self._device, self.device_id)
            binding.bind_ortvalue_input(self.input_name, x_dev)
            binding.bind_output(self.output_name, self._device, self.device_id)
            state = self._bindings[key] = {"binding": binding, "input": x_dev, "output": None}
        state["input"].update_inplace(x)
        binding = state["binding"]
        self.session.run_with_iobinding(binding)
        if state["output"] is None:
            state["output"] = binding.get_outputs()[0]
            binding.bind_ortvalue_output(self.output_name, state["output"])
        return binding.copy_outputs_to_cpu()[0]

    def infer_impl(self, x: np.ndarray) -> np.ndarray:
        if self._input_dtype != np.float32:
            x = x.astype(self._input_dtype)
        if self.io_binding:
            y = self._bound_run(np.ascontiguousarray(x))
        else:
            y = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(y, dtype=np.float32)

    def deactivate_impl(self) -> None:
        self._bindings = {}
        self.session = None
        self._ort = None


def runner_from_artifact(artifact: EngineArtifact, **options) -> OnnxRuntimeRunner:
    """A runner for a built ONNX Runtime artifact; ``options`` override the build's settings.

    Options: threads, graph_optimization, providers, provider_options, io_binding, device_id.
    """
    meta = artifact.meta or {}
    known = {"threads", "graph_optimization", "providers", "provider_options", "io_binding", "device_id"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserInputError(f"unknown ONNX Runtime runner option(s) {unknown}; known: {sorted(known)}")
    return OnnxRuntimeRunner(
        artifact.path,
        shapes=artifact.shapes,
        threads=options.get("threads", meta.get("threads")),
        graph_optimization=options.get("graph_optimization", meta.get("graph_optimization", "all")),
        providers=options.get("providers", meta.get("providers_requested")),
        provider_options=options.get("provider_options", meta.get("provider_options")),
        io_binding=options.get("io_binding"),
        device_id=options.get("device_id", 0),
        input_name=artifact.input_name,
        output_name=artifact.output_name,
    )
