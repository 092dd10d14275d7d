"""TensorRT backend: the native Python API of TensorRT 10.x and 11.x, cuda-python for memory.

Build: ONNX → ``OnnxParser`` → network → ``IBuilderConfig`` (workspace pool, optimization
level, hardware compatibility, timing cache, one optimization profile per shape band) →
``build_serialized_network`` → ``.plan`` (written atomically), with the engine inspector's
per-layer JSON saved beside it as ``<name>.layers.json``.

Precision, TensorRT 10 vs 11 (10.1 deprecated implicit quantization, 10.12 the FP16/INT8 builder
flags; the 11.4 bindings have neither): TensorRT 11 removed weak typing — every network
is strongly typed, BuilderFlag.FP16/INT8 and the calibrators are gone — so precision lives in
the ONNX graph: an fp16 graph, or explicit Q/DQ for int8. On TensorRT 10 a graph that carries
its precision is built with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (TensorRT must
not re-choose types); ``legacy_fp16_flag`` keeps the old weakly-typed ``BuilderFlag.FP16``
route on 10 and is refused on 11.

Code conventions, relied on by tests/test_trt_api.py (which checks every name used here
against the real 10.x and 11.x bindings, derived from this file's AST):

* The TensorRT module is always the name ``trt`` and is passed in to the functions that use
  it, so version-gated branches can be called with either version's real module.
* Variables (and ``self._x`` attributes) holding TensorRT objects are named after their type:
  see ``TRT_TYPE_OF_NAME``. Those names hold nothing else in this file.
* A name that exists only in some major versions is listed in ``VERSION_GATED`` and only
  reached behind a ``hasattr`` check.
* cuda-python's runtime module is always the name ``cudart`` (fixres_deploy/backends/cuda_utils.py).

This module must not import torch: the production runtime loads it in a torch-free process.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from fixres_deploy.backends.base import (
    BuildOptions,
    EngineArtifact,
    Runner,
    ShapeSpec,
    check_onnx_accepts,
    error_artifact,
)
from fixres_deploy.backends.cuda_utils import (
    CudaError,
    CudaGraph,
    DeviceBuffer,
    PinnedBuffer,
    Stream,
    device_info,
    ensure_device,
    import_cudart,
)
from fixres_deploy.core.errors import FixResError, MissingDependencyError, UserInputError, require_any
from fixres_deploy.core.utils import atomic_path, sha256_file

log = logging.getLogger(__name__)

BACKEND = "tensorrt"
SUPPORTED_MAJORS = (10, 11)

# Variable name -> TensorRT class of the object it holds (the contract test maps attribute
# accesses on these names to hasattr checks on the class).
TRT_TYPE_OF_NAME = {
    "builder": "Builder",
    "network": "INetworkDefinition",
    "network_input": "ITensor",
    "config": "IBuilderConfig",
    "parser": "OnnxParser",
    "parser_error": "ParserError",
    "profile": "IOptimizationProfile",
    "timing_cache": "ITimingCache",
    "plan": "IHostMemory",
    "runtime": "Runtime",
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
    "inspector": "EngineInspector",
}

# "Class.member" -> TensorRT major versions that have it. Everything else used here must
# exist in every supported major version.
VERSION_GATED = {
    "BuilderFlag.FP16": (10,),
}

HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")


class EngineBuildError(FixResError, RuntimeError):
    """TensorRT could not build an engine from a valid request (parser/builder failure)."""


class EngineLoadError(FixResError, RuntimeError):
    """A plan file could not be deserialized (other TensorRT version or GPU, corrupt file)."""


# --------------------------------------------------------------------------- module & versions


def import_tensorrt(feature: str = "TensorRT engines"):
    """The ``tensorrt`` module (or the bare ``tensorrt_bindings`` wheel), else MissingDependencyError."""
    return require_any(
        ("tensorrt", "tensorrt_bindings"), "gpu", feature, "tensorrt", " (needs an NVIDIA GPU and driver)"
    )


def check_available() -> None:
    """Raise MissingDependencyError now rather than after precision variants were made."""
    import_tensorrt()
    import_cudart()


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def check_version(trt) -> int:
    major = trt_major(trt)
    if major < min(SUPPORTED_MAJORS):
        raise MissingDependencyError(
            f"TensorRT {trt.__version__} is too old: fixres-deploy needs TensorRT >= 10 "
            "(pip install 'fixres-deploy[gpu]')"
        )
    if major > max(SUPPORTED_MAJORS):
        log.warning(
            "TensorRT %s is newer than the versions this backend was checked against %s",
            trt.__version__,
            SUPPORTED_MAJORS,
        )
    return major


def make_logger(trt, *, verbose: bool = False):
    """A TensorRT logger that forwards to Python logging and keeps errors for the report."""
    errors = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
    warning = trt.ILogger.Severity.WARNING
    info = trt.ILogger.Severity.INFO

    class _CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, sev, msg):  # called by TensorRT, possibly from its threads
            if sev in errors:
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif sev == warning:
                self.warnings.append(str(msg))
                log.warning("TensorRT: %s", msg)
            elif verbose or sev == info:
                log.debug("TensorRT: %s", msg)

    return _CollectingLogger()


# --------------------------------------------------------------------------- precision gating


def graph_precision(onnx_path: str) -> dict:
    """What precision the ONNX graph carries: explicit Q/DQ (int8) and/or fp16 tensors."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    graph = model.graph
    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    ops = {n.op_type for n in graph.node}
    fp16 = (
        any(t.data_type in half for t in graph.initializer)
        or any(
            v.type.tensor_type.elem_type in half
            for v in list(graph.input) + list(graph.output) + list(graph.value_info)
        )
        or any(a.name == "to" and a.i in half for n in graph.node if n.op_type == "Cast" for a in n.attribute)
    )
    return {"qdq": bool(ops & {"QuantizeLinear", "DequantizeLinear"}), "fp16": bool(fp16)}


def check_precision_request(precision: str, carried: dict, *, legacy_fp16_flag: bool, onnx_path: str) -> None:
    """Refuse a precision the graph does not carry (TensorRT would silently build fp32)."""
    if precision == "int8" and not carried["qdq"]:
        raise UserInputError(
            f"'{onnx_path}' has no QuantizeLinear/DequantizeLinear nodes: TensorRT int8 needs explicit "
            "quantization (implicit calibration was deprecated in 10.1 and removed in 11). Build with "
            "fixres-deploy build --precision int8 --calibration-data DIR, which writes the Q/DQ graph."
        )
    if precision == "fp16" and not carried["fp16"] and not legacy_fp16_flag:
        raise UserInputError(
            f"'{onnx_path}' is an fp32 graph: TensorRT 11 networks are strongly typed, so fp16 needs an "
            "fp16 ONNX (fixres-deploy build --precision fp16 converts it). On TensorRT 10 only, "
            "--legacy-fp16 sets BuilderFlag.FP16 on the fp32 graph instead."
        )
    if precision == "fp32" and (carried["qdq"] or carried["fp16"]):
        kind = "Q/DQ (int8)" if carried["qdq"] else "fp16"
        raise UserInputError(
            f"'{onnx_path}' carries {kind} precision but fp32 was requested; request the precision of the graph"
        )


def network_creation_flags(trt, *, carries_precision: bool, legacy_fp16_flag: bool) -> int:
    """Bit flags for ``builder.create_network``.

    TensorRT 11: networks are always strongly typed (the flag is a no-op): 0. TensorRT 10: a
    graph with fp16 tensors or Q/DQ is built strongly typed, so TensorRT keeps the graph's
    types; the legacy FP16 route needs weak typing.
    """
    if trt_major(trt) >= 11 or legacy_fp16_flag or not carries_precision:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def precision_builder_flags(trt, *, precision: str, legacy_fp16_flag: bool) -> list:
    """Builder flags a precision needs: none for strongly typed graphs, FP16 on the legacy route."""
    if not legacy_fp16_flag:
        return []
    if precision != "fp16":
        raise UserInputError(f"legacy_fp16_flag (--legacy-fp16) applies to fp16 builds only, not {precision}")
    if not hasattr(trt.BuilderFlag, "FP16"):
        raise UserInputError(
            f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (removed in TensorRT 11: networks are "
            "strongly typed). Drop --legacy-fp16: fixres-deploy builds fp16 from an fp16 ONNX graph."
        )
    return [trt.BuilderFlag.FP16]


def hardware_compatibility_level(trt, name: str):
    levels = {
        "none": trt.HardwareCompatibilityLevel.NONE,
        "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
        "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY,
    }
    key = str(name).lower().replace("-", "_").replace("+", "_plus")
    if key not in levels:
        raise UserInputError(f"hardware compatibility must be one of {HARDWARE_COMPATIBILITY}, got {name!r}")
    return levels[key]


def validate_options(trt, options: BuildOptions, *, precision: str) -> None:
    """All checks that need no GPU: a bad request fails before any device work."""
    if options.workspace_mb is not None and options.workspace_mb < 1:
        raise UserInputError(f"workspace_mb must be >= 1, got {options.workspace_mb}")
    if options.optimization_level is not None and not 0 <= options.optimization_level <= 5:
        raise UserInputError(f"TensorRT builder optimization level must be 0-5, got {options.optimization_level}")
    hardware_compatibility_level(trt, options.hardware_compatibility)
    precision_builder_flags(trt, precision=precision, legacy_fp16_flag=options.legacy_fp16_flag)


def configure(trt, config, options: BuildOptions, *, precision: str) -> dict:
    """Apply BuildOptions to an IBuilderConfig; returns what was set, for the artifact meta."""
    applied: dict = {}
    if options.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
        applied["workspace_mb"] = int(options.workspace_mb)
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)
        applied["builder_optimization_level"] = int(options.optimization_level)
    config.hardware_compatibility_level = hardware_compatibility_level(trt, options.hardware_compatibility)
    applied["hardware_compatibility"] = options.hardware_compatibility
    flags = precision_builder_flags(trt, precision=precision, legacy_fp16_flag=options.legacy_fp16_flag)
    for flag in flags:
        config.set_flag(flag)
    applied["builder_flags"] = [getattr(f, "name", str(f)) for f in flags]
    # DETAILED: the engine inspector then reports each layer's tactic, precision and formats.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    return applied


def add_profiles(builder, config, input_name: str, shapes: ShapeSpec) -> int:
    """One optimization profile per ShapeSpec profile (fixed: min = opt = max)."""
    for i, p in enumerate(shapes.profiles):
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, min=p.min, opt=p.opt, max=p.max)
        index = config.add_optimization_profile(profile)
        if index < 0:
            raise EngineBuildError(
                f"TensorRT rejected optimization profile {i} (min {list(p.min)} "
                f"opt {list(p.opt)} max {list(p.max)}) for input '{input_name}'"
            )
    return len(shapes.profiles)


def load_timing_cache(config, path: str | None, *, ignore_mismatch: bool = False) -> dict:
    """Attach a timing cache to the config: the file's content when present, else an empty one.

    A cache cuts rebuilds several-fold (onnxruntime PR #14767: 34.6 s → 7.7 s). A cache from
    another GPU/TensorRT is rejected unless ``ignore_mismatch``; then a fresh one is used.
    """
    data = b""
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    timing_cache = config.create_timing_cache(data)
    accepted = config.set_timing_cache(timing_cache, ignore_mismatch=ignore_mismatch)
    info = {"path": path, "loaded_bytes": len(data), "accepted": bool(accepted)}
    if not accepted and data:
        log.warning("timing cache %s does not match this GPU/TensorRT: starting a fresh one", path)
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    return info


def save_timing_cache(config, path: str) -> int:
    """Serialize the config's (updated) timing cache atomically; returns its size in bytes."""
    timing_cache = config.get_timing_cache()
    blob = timing_cache.serialize()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(blob)
    return os.path.getsize(path)


def create_builder(trt, logger):
    """``trt.Builder(logger)`` with a clear error when libnvinfer returns no builder."""
    try:
        return trt.Builder(logger)
    except TypeError as exc:  # pybind11: "factory function returned nullptr"
        detail = "; ".join(getattr(logger, "errors", [])[-3:])
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not create a builder ({exc}){': ' + detail if detail else ''}. "
            "Is a CUDA GPU visible and are the TensorRT libraries the ones this Python package was built for?"
        ) from exc


def create_runtime(trt, logger):
    """``trt.Runtime(logger)`` with a clear error when libnvinfer returns no runtime."""
    try:
        return trt.Runtime(logger)
    except TypeError as exc:  # pybind11: "factory function returned nullptr"
        raise EngineLoadError(
            f"TensorRT {trt.__version__} could not create a runtime ({exc}). Is a CUDA GPU visible and are "
            "the TensorRT libraries the ones this Python package was built for?"
        ) from exc


def parse_onnx(trt, network, logger, onnx_path: str):
    """Parse the ONNX file into ``network``; errors name the node. Keep the parser alive until the build ends."""
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        msgs = []
        for i in range(parser.num_errors):
            parser_error = parser.get_error(i)
            msgs.append(
                f"node {parser_error.node()} '{parser_error.node_name()}' ({parser_error.node_operator()}): "
                f"{parser_error.desc()} [{parser_error.code()}]"
            )
        raise EngineBuildError(
            f"TensorRT's ONNX parser rejected '{onnx_path}': " + " | ".join(msgs or ["(no details)"])
        )
    return parser


def inspect_engine(trt, logger, plan) -> dict:
    """Deserialize the plan once: layer JSON from the engine inspector, IO dtypes, layer count."""
    runtime = create_runtime(trt, logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineBuildError("TensorRT could not deserialize the engine it just built")
    inspector = engine.create_engine_inspector()
    layers = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    io = {}
    for i in range(engine.num_io_tensors):
        tname = engine.get_tensor_name(i)
        io[tname] = {
            "mode": "input" if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT else "output",
            "dtype": getattr(engine.get_tensor_dtype(tname), "name", "?"),
        }
    return {
        "layers_json": layers,
        "num_layers": int(engine.num_layers),
        "num_optimization_profiles": int(engine.num_optimization_profiles),
        "io": io,
    }


# --------------------------------------------------------------------------- build


def build_impl(
    onnx_path: str, shapes: ShapeSpec, options: BuildOptions, *, out_dir: str, precision: str, name: str | None
) -> EngineArtifact:
    """Build a TensorRT plan for ``shapes`` from an ONNX precision variant.

    Raises:
        MissingDependencyError: tensorrt or cuda-python missing.
        UserInputError: a request TensorRT cannot serve (fixed ONNX for another shape,
            legacy FP16 on TensorRT 11, fp16/int8 without a graph that carries it).
    Returns:
        The artifact; a parser/builder/CUDA failure is recorded in ``error``.
    """
    trt = import_tensorrt()
    cudart = import_cudart()
    major = check_version(trt)
    check_onnx_accepts(onnx_path, shapes)
    carried = graph_precision(onnx_path)
    check_precision_request(precision, carried, legacy_fp16_flag=options.legacy_fp16_flag, onnx_path=onnx_path)
    validate_options(trt, options, precision=precision)

    name = name or f"{BACKEND}_{precision}_{shapes.mode}"
    os.makedirs(out_dir, exist_ok=True)
    plan_path = os.path.join(out_dir, f"{name}.plan")
    layers_path = os.path.join(out_dir, f"{name}.layers.json")
    flags = network_creation_flags(
        trt, carries_precision=carried["qdq"] or carried["fp16"], legacy_fp16_flag=options.legacy_fp16_flag
    )
    meta: dict = {
        "tensorrt_version": trt.__version__,
        "tensorrt_major": major,
        "graph_precision": carried,
        "strongly_typed": major >= 11 or bool(flags),
        "options": options.to_dict(),
    }
    t0 = time.perf_counter()
    logger = make_logger(trt)
    try:
        ensure_device(cudart)
        meta["gpu"] = device_info(cudart)
        builder = create_builder(trt, logger)
        network = builder.create_network(flags)
        parser = parse_onnx(trt, network, logger, onnx_path)
        if network.num_inputs != 1:
            raise EngineBuildError(f"expected one network input, TensorRT sees {network.num_inputs}")
        network_input = network.get_input(0)
        input_name = network_input.name
        output_name = network.get_output(0).name
        config = builder.create_builder_config()
        meta["config"] = configure(trt, config, options, precision=precision)
        if any(int(d) < 0 for d in network_input.shape):
            meta["num_profiles"] = add_profiles(builder, config, input_name, shapes)
        else:  # a static network: no profile to add (check_onnx_accepts matched its shape)
            meta["num_profiles"] = 0
        cache_path = options.timing_cache
        if cache_path:
            meta["timing_cache"] = load_timing_cache(
                config, cache_path, ignore_mismatch=bool(options.extra.get("timing_cache_ignore_mismatch", False))
            )
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            detail = " | ".join(logger.errors[-5:]) or "no error message from TensorRT"
            raise EngineBuildError(f"TensorRT failed to build the engine: {detail}")
        del parser  # the parser owns the weights until the build is done
        if cache_path:
            meta["timing_cache"]["saved_bytes"] = save_timing_cache(config, cache_path)
        with atomic_path(plan_path) as tmp:
            with open(tmp, "wb") as f:
                f.write(plan)
        build_s = time.perf_counter() - t0
        try:
            details = inspect_engine(trt, logger, plan)
            with atomic_path(layers_path) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(details.pop("layers_json"))
            meta.update(details)
            meta["layers_json"] = layers_path
        except Exception as exc:  # the plan is good; only the report is missing
            meta["inspect_error"] = f"{type(exc).__name__}: {exc}"
        meta["warnings"] = logger.warnings[-20:]
    except (UserInputError, MissingDependencyError):
        raise
    except Exception as exc:  # CudaError, EngineBuildError, TensorRT's own errors: record, don't crash a sweep
        meta["log_errors"] = logger.errors[-10:]
        return error_artifact(BACKEND, precision, onnx_path, shapes, exc, build_s=time.perf_counter() - t0, meta=meta)
    return EngineArtifact(
        backend=BACKEND,
        precision=precision,
        path=plan_path,
        source_onnx=onnx_path,
        shapes=shapes,
        input_name=input_name,
        output_name=output_name,
        build_s=build_s,
        sha256=sha256_file(plan_path),
        size_bytes=os.path.getsize(plan_path),
        meta=meta,
    )


# --------------------------------------------------------------------------- runtime


class TensorRTRunner(Runner):
    """Runs a TensorRT plan: pinned host buffers, device buffers and a stream owned by the runner.

    ``infer`` selects the optimization profile that ShapeSpec.check picks for the input,
    sets the input shape, copies host → device, enqueues ``execute_async_v3`` (or launches a
    CUDA graph captured for that shape), copies back and returns float32 numpy.
    Buffers grow on demand and are freed in ``deactivate``.
    """

    name = "tensorrt"

    def __init__(
        self,
        plan_path: str,
        *,
        shapes: ShapeSpec | None = None,
        input_name: str = "input",
        output_name: str = "logits",
        cuda_graph: bool = False,
        device_id: int = 0,
        built_with: dict | None = None,
    ):
        super().__init__(input_name=input_name, output_name=output_name, shapes=shapes)
        if not os.path.isfile(plan_path):
            raise UserInputError(f"TensorRT plan '{plan_path}' does not exist")
        self.plan_path = plan_path
        self.cuda_graph = cuda_graph
        self.device_id = device_id
        self.built_with = built_with or {}
        self._reset()

    def _reset(self) -> None:
        # Drop references in dependency order: context, then engine, then runtime.
        self._context = None
        self._engine = None
        self._runtime = None
        self._logger = None
        self._trt = None
        self._cudart = None
        self._stream = None
        self._buffers: dict[str, tuple[DeviceBuffer, PinnedBuffer]] = {}
        self._graphs: dict[tuple, CudaGraph] = {}
        self._profile_index = 0  # a new execution context starts on profile 0
        self._dtypes: dict[str, np.dtype] = {}

    def activate_impl(self) -> None:
        trt = import_tensorrt()
        cudart = import_cudart()
        check_version(trt)
        ensure_device(cudart, self.device_id)
        self._trt, self._cudart = trt, cudart
        self._logger = make_logger(trt)
        try:
            self._runtime = create_runtime(trt, self._logger)
            with open(self.plan_path, "rb") as f:
                blob = f.read()
            self._engine = self._runtime.deserialize_cuda_engine(blob)
            if self._engine is None:
                raise EngineLoadError(self._load_failure_message(trt))
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            for tname in (self.input_name, self.output_name):
                if tname not in names:
                    raise EngineLoadError(f"'{self.plan_path}' has no tensor '{tname}' (tensors: {names})")
            for tname in names:
                self._dtypes[tname] = np.dtype(trt.nptype(self._engine.get_tensor_dtype(tname)))
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise EngineLoadError(
                    f"TensorRT could not create an execution context for '{self.plan_path}' "
                    f"(out of GPU memory?): {' | '.join(self._logger.errors[-3:])}"
                )
            self._stream = Stream(cudart)
        except BaseException:
            self._release()
            raise

    def _load_failure_message(self, trt) -> str:
        built = self.built_with
        hint = ""
        if built.get("tensorrt_version") and built["tensorrt_version"] != trt.__version__:
            hint = f" It was built with TensorRT {built['tensorrt_version']}; this process has {trt.__version__}."
        gpu = built.get("gpu") or {}
        if gpu:
            hint += f" It was built on {gpu.get('name')} (compute capability {gpu.get('compute_capability')})."
        detail = " | ".join(self._logger.errors[-3:])
        return (
            f"TensorRT could not deserialize '{self.plan_path}'.{hint} Engines are tied to the TensorRT "
            f"version and GPU: rebuild it here (fixres-deploy build). {detail}"
        )

    def _ensure_buffer(self, tname: str, nbytes: int) -> tuple[DeviceBuffer, PinnedBuffer]:
        have = self._buffers.get(tname)
        if have is not None and have[0].nbytes >= nbytes:
            return have
        if have is not None:
            have[0].free()
            have[1].free()
        self._free_graphs()  # captured graphs hold the old addresses
        pair = (DeviceBuffer(self._cudart, nbytes), PinnedBuffer(self._cudart, nbytes))
        self._buffers[tname] = pair
        self._context.set_tensor_address(tname, pair[0].ptr)
        return pair

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.handle):
            raise FixResError(f"TensorRT execute_async_v3 failed: {' | '.join(self._logger.errors[-3:])}")

    def infer_impl(self, x: np.ndarray) -> np.ndarray:
        index = self.shapes.check(x.shape) if self.shapes is not None else 0
        if index != self._profile_index:
            if not self._context.set_optimization_profile_async(index, self._stream.handle):
                raise FixResError(f"TensorRT could not select optimization profile {index}")
            self._profile_index = index
        if not self._context.set_input_shape(self.input_name, tuple(x.shape)):
            raise FixResError(f"TensorRT refused input shape {list(x.shape)} for profile {index}")
        out_shape = tuple(self._context.get_tensor_shape(self.output_name))
        in_dtype, out_dtype = self._dtypes[self.input_name], self._dtypes[self.output_name]
        x = np.ascontiguousarray(x, dtype=in_dtype)
        out_nbytes = int(np.prod(out_shape)) * out_dtype.itemsize
        dev_in, host_in = self._ensure_buffer(self.input_name, x.nbytes)
        dev_out, host_out = self._ensure_buffer(self.output_name, out_nbytes)
        host_in.view(in_dtype, x.shape)[...] = x
        self._stream.copy_htod(dev_in.ptr, host_in.ptr, x.nbytes)
        if self.cuda_graph:
            key = (index, tuple(x.shape))
            graph = self._graphs.get(key)
            if graph is None:
                self._execute()  # one plain enqueue first: TensorRT applies shape changes lazily
                graph = CudaGraph(self._cudart, self._stream, self._execute)
                self._graphs[key] = graph
            graph.launch(self._stream)
        else:
            self._execute()
        self._stream.copy_dtoh(host_out.ptr, dev_out.ptr, out_nbytes)
        self._stream.synchronize()
        return host_out.view(out_dtype, out_shape).astype(np.float32, copy=True)

    def _free_graphs(self) -> None:
        graphs, self._graphs = self._graphs, {}
        for graph in graphs.values():
            graph.free()

    def _release(self) -> None:
        errors = []
        for step in (self._free_graphs, self._free_buffers, self._destroy_stream):
            try:
                step()
            except CudaError as exc:
                errors.append(str(exc))
        self._reset()
        if errors:
            log.warning("TensorRT runner cleanup: %s", "; ".join(errors))

    def _free_buffers(self) -> None:
        buffers, self._buffers = self._buffers, {}
        for dev, host in buffers.values():
            dev.free()
            host.free()

    def _destroy_stream(self) -> None:
        if self._stream is not None:
            self._stream.destroy()

    def deactivate_impl(self) -> None:
        # Graphs and buffers before the context, the context before the engine.
        self._release()


def runner_from_artifact(artifact: EngineArtifact, **options) -> TensorRTRunner:
    """Options: cuda_graph (default: the build option), device_id."""
    unknown = sorted(set(options) - {"cuda_graph", "device_id"})
    if unknown:
        raise UserInputError(f"unknown TensorRT runner option(s) {unknown}; known: ['cuda_graph', 'device_id']")
    meta = artifact.meta or {}
    return TensorRTRunner(
        artifact.path,
        shapes=artifact.shapes,
        input_name=artifact.input_name,
        output_name=artifact.output_name,
        cuda_graph=options.get("cuda_graph", (meta.get("options") or {}).get("cuda_graph", False)),
        device_id=options.get("device_id", 0),
        built_with=meta,
    )
