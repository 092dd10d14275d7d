"""TensorRT backend through Polygraphy, NVIDIA's maintained TensorRT toolkit (TensorRT 10.x and 11.x).

Build: ``NetworkFromOnnxPath`` (ONNX parser; strongly typed where TensorRT 10 needs the flag)
→ ``CreateConfig`` (one Polygraphy ``Profile`` per shape band, timing cache, hardware
compatibility, builder optimization level, workspace pool, TF32 cleared unless
``BuildOptions.tf32``) → ``EngineBytesFromNetwork`` → ``.plan`` (written atomically) →
``EngineFromBytes`` for the layer report ``<name>.layers.json``. Run: Polygraphy's ``TrtRunner``
(engine → context, stream, dynamic shapes, output allocation).

What stays hand-written, each for one reason:

* the timed enqueue with CUDA events (``TrtRunner.infer`` synchronizes inside, so events cannot
  bracket the device work alone): :meth:`TensorRTRunner._enqueue_timed`;
* CUDA graphs (Polygraphy has none): :class:`fixres_deploy.backends.cuda_utils.GraphCache`;
* the engine inspector's per-layer JSON (Polygraphy prints layers, it does not return the JSON):
  :func:`inspect_engine`.

Precision, TensorRT 10 vs 11 (10.1 deprecated implicit quantization, 10.12 the FP16/INT8 builder
flags; the 11.4 bindings have neither): TensorRT 11 networks are always strongly typed, so
precision lives in the ONNX graph — an fp16 graph, or explicit Q/DQ for int8 (whose float parts
are fp16, see precision/variants.py). On TensorRT 10 such a graph is parsed strongly typed;
``legacy_fp16_flag`` keeps the old weakly-typed ``BuilderFlag.FP16`` route on 10 and is refused
on 11. TensorRT enables TF32 by default; Polygraphy clears it unless asked, so fp32 is fp32.

Code conventions, relied on by tests/test_trt_api.py (which checks every name used here
against the real bindings of TensorRT 10.0, the newest 10.x and 11.x, derived from this file's AST):

* The TensorRT module is always the name ``trt`` and is passed in to the functions that use
  it, so version-gated branches can be called with each version's real module.
* Variables (and ``self._x`` attributes) holding TensorRT objects are named after their type:
  see ``TRT_TYPE_OF_NAME``. Those names hold nothing else in this file.
* A name that exists only in some versions is listed in ``VERSION_GATED`` and only reached
  behind a ``hasattr`` check.
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
    EventTimer,
    GraphCache,
    device_info,
    ensure_device,
    import_cudart,
    memcpy_async,
    synchronize,
)
from fixres_deploy.core.errors import (
    GPU_EXTRA,
    GPU_EXTRA_HINT,
    FixResError,
    MissingDependencyError,
    UserInputError,
    require,
    require_any,
)
from fixres_deploy.core.utils import atomic_path, sha256_file

log = logging.getLogger(__name__)

BACKEND = "tensorrt"
SUPPORTED_MAJORS = (10, 11)

# Variable name -> TensorRT class of the object it holds (the contract test maps attribute
# accesses on these names to hasattr checks on the class).
TRT_TYPE_OF_NAME = {
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
    "inspector": "EngineInspector",
}

# "Class.member" -> (first version that has it, first version that no longer has it or None).
# Everything else used here must exist in every supported version (10.0 to 11.x).
VERSION_GATED = {
    "BuilderFlag.FP16": ("10.0", "11.0"),
    "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY": ("10.9", None),
}

HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")


class EngineBuildError(FixResError, RuntimeError):
    """TensorRT could not build an engine from a valid request (parser/builder failure)."""


class EngineLoadError(FixResError, RuntimeError):
    """A plan file could not be deserialized (other TensorRT version or GPU, corrupt file)."""


# --------------------------------------------------------------------------- modules & versions


def import_tensorrt(feature: str = "TensorRT engines"):
    """The ``tensorrt`` module (or the bare ``tensorrt_bindings`` wheel), else MissingDependencyError."""
    return require_any(
        ("tensorrt", "tensorrt_bindings"),
        GPU_EXTRA,
        feature,
        "tensorrt",
        GPU_EXTRA_HINT + " (needs an NVIDIA GPU and driver)",
    )


def import_polygraphy(feature: str = "TensorRT engines"):
    """``polygraphy.backend.trt`` (it imports TensorRT lazily, on first use)."""
    return require("polygraphy.backend.trt", GPU_EXTRA, feature)


def check_available() -> None:
    """Raise MissingDependencyError now rather than after precision variants were made."""
    import_tensorrt()
    import_polygraphy()
    import_cudart()


def trt_version(trt) -> tuple[int, ...]:
    """(10, 16, 1, 11) for '10.16.1.11' (suffixes like '.post1' ignored)."""
    parts = []
    for p in str(trt.__version__).split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def trt_major(trt) -> int:
    return trt_version(trt)[0]


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def gated_name_expected(name: str, version: tuple[int, ...]) -> bool:
    """Whether ``VERSION_GATED[name]`` says TensorRT ``version`` has the name."""
    since, until = VERSION_GATED[name]
    return version >= _version_tuple(since) and (until is None or version < _version_tuple(until))


def check_version(trt) -> int:
    major = trt_major(trt)
    if major < min(SUPPORTED_MAJORS):
        raise MissingDependencyError(
            f"TensorRT {trt.__version__} is too old: fixres-deploy needs TensorRT >= 10 "
            f"(pip install 'fixres-deploy[{GPU_EXTRA}]'{GPU_EXTRA_HINT})"
        )
    if major > max(SUPPORTED_MAJORS):
        log.warning(
            "TensorRT %s is newer than the versions this backend was checked against %s",
            trt.__version__,
            SUPPORTED_MAJORS,
        )
    return major


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


def strongly_typed_network(trt, *, carries_precision: bool, legacy_fp16_flag: bool) -> bool:
    """Whether to ask the parser for a strongly typed network.

    TensorRT 11: networks are always strongly typed (the flag is a deprecated no-op): False.
    TensorRT 10: a graph with fp16 tensors or Q/DQ is parsed strongly typed, so TensorRT keeps
    the graph's types; the legacy FP16 route needs weak typing.
    """
    return trt_major(trt) < 11 and carries_precision and not legacy_fp16_flag


def legacy_fp16_allowed(trt, *, precision: str, legacy_fp16_flag: bool) -> bool:
    """Whether the build sets BuilderFlag.FP16 (the weakly typed TensorRT 10 route)."""
    if not legacy_fp16_flag:
        return False
    if precision != "fp16":
        raise UserInputError(f"legacy_fp16_flag (--legacy-fp16) applies to fp16 builds only, not {precision}")
    if not hasattr(trt.BuilderFlag, "FP16"):
        raise UserInputError(
            f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (removed in TensorRT 11: networks are "
            "strongly typed). Drop --legacy-fp16: fixres-deploy builds fp16 from an fp16 ONNX graph."
        )
    return True


def hardware_compatibility_level(trt, name: str):
    """The enum member for a name; None for "none" (TensorRT's default: this GPU only).

    SAME_COMPUTE_CAPABILITY exists only from TensorRT 10.9: looked up only when asked for.
    """
    key = str(name).lower().replace("-", "_").replace("+", "_plus")
    if key not in HARDWARE_COMPATIBILITY:
        raise UserInputError(f"hardware compatibility must be one of {HARDWARE_COMPATIBILITY}, got {name!r}")
    if key == "none":
        return None
    if key == "ampere_plus":
        return trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if not hasattr(trt.HardwareCompatibilityLevel, "SAME_COMPUTE_CAPABILITY"):
        raise UserInputError(
            f"hardware compatibility 'same_compute_capability' needs TensorRT >= 10.9; this is "
            f"{trt.__version__}. Use 'ampere_plus' or 'none', or upgrade TensorRT."
        )
    return trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY


def validate_options(trt, options: BuildOptions, *, precision: str) -> None:
    """All checks that need no GPU: a bad request fails before any device work."""
    if options.workspace_mb is not None and options.workspace_mb < 1:
        raise UserInputError(f"workspace_mb must be >= 1, got {options.workspace_mb}")
    if options.optimization_level is not None and not 0 <= options.optimization_level <= 5:
        raise UserInputError(f"TensorRT builder optimization level must be 0-5, got {options.optimization_level}")
    hardware_compatibility_level(trt, options.hardware_compatibility)
    legacy_fp16_allowed(trt, precision=precision, legacy_fp16_flag=options.legacy_fp16_flag)
    if options.tf32 and precision != "fp32":
        raise UserInputError(f"tf32 applies to fp32 builds only, not {precision}")


def polygraphy_profiles(pg, input_name: str, shapes: ShapeSpec) -> list:
    """One Polygraphy Profile per ShapeSpec profile (fixed: min = opt = max)."""
    return [pg.Profile().add(input_name, min=p.min, opt=p.opt, max=p.max) for p in shapes.profiles]


def make_loaders(trt, pg, onnx_path: str, shapes: ShapeSpec, options: BuildOptions, *, precision: str, carried: dict):
    """Polygraphy's network and config loaders for a request (nothing runs until called).

    Returns:
        (network_loader, config_loader, applied): ``applied`` is what was set, for the meta.
    """
    from fixres_deploy.backends.base import onnx_io

    strongly = strongly_typed_network(
        trt, carries_precision=carried["qdq"] or carried["fp16"], legacy_fp16_flag=options.legacy_fp16_flag
    )
    legacy = legacy_fp16_allowed(trt, precision=precision, legacy_fp16_flag=options.legacy_fp16_flag)
    io = onnx_io(onnx_path)
    dynamic = bool(io.dynamic_axes)
    network_loader = pg.NetworkFromOnnxPath(os.fspath(onnx_path), strongly_typed=strongly)
    hw = hardware_compatibility_level(trt, options.hardware_compatibility)
    pools = {trt.MemoryPoolType.WORKSPACE: int(options.workspace_mb) << 20} if options.workspace_mb else None
    tf32 = bool(options.tf32) and precision == "fp32"
    config_loader = pg.CreateConfig(
        tf32=tf32,
        fp16=legacy,
        # a static network needs no profile (check_onnx_accepts matched its shape)
        profiles=polygraphy_profiles(pg, io.input_name, shapes) if dynamic else None,
        load_timing_cache=options.timing_cache,
        builder_optimization_level=options.optimization_level,
        hardware_compatibility_level=hw,
        memory_pool_limits=pools,
        # DETAILED: the engine inspector then reports each layer's tactic, precision and formats.
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
    )
    applied = {
        "strongly_typed": strongly or trt_major(trt) >= 11,
        "tf32": tf32,
        "legacy_fp16_flag": legacy,
        "num_profiles": len(shapes.profiles) if dynamic else 0,
        "hardware_compatibility": options.hardware_compatibility,
        "workspace_mb": options.workspace_mb,
        "builder_optimization_level": options.optimization_level,
        "timing_cache": options.timing_cache,
    }
    return network_loader, config_loader, applied


def _nullptr_hint(trt, exc: TypeError, what: str) -> str:
    return (
        f"TensorRT {trt.__version__} could not create a {what} ({exc}). Is a CUDA GPU visible and are the "
        "TensorRT libraries the ones this Python package was built for?"
    )


def build_plan(trt, pg, network_loader, config_loader, timing_cache: str | None) -> bytes:
    """Run Polygraphy's build; a nullptr from libnvinfer and Polygraphy's own errors become EngineBuildError."""
    from polygraphy.exception import PolygraphyException

    try:
        plan = pg.EngineBytesFromNetwork(network_loader, config=config_loader, save_timing_cache=timing_cache)()
    except TypeError as exc:  # pybind11: "factory function returned nullptr" (trt.Builder)
        if "nullptr" not in str(exc):
            raise
        raise EngineBuildError(_nullptr_hint(trt, exc, "builder")) from exc
    except PolygraphyException as exc:
        raise EngineBuildError(f"TensorRT (through Polygraphy) failed to build the engine: {exc}") from exc
    if plan is None:
        raise EngineBuildError("TensorRT failed to build the engine (no plan; see the TensorRT log above)")
    return bytes(plan)


def load_engine(trt, pg, plan: bytes, *, hint: str = ""):
    """Deserialize a plan with Polygraphy's EngineFromBytes; clear errors for a nullptr or a bad plan."""
    from polygraphy.exception import PolygraphyException

    try:
        engine = pg.EngineFromBytes(plan)()
    except TypeError as exc:  # trt.Runtime(logger) returned nullptr
        if "nullptr" not in str(exc):
            raise
        raise EngineLoadError(_nullptr_hint(trt, exc, "runtime")) from exc
    except PolygraphyException as exc:
        raise EngineLoadError(f"TensorRT could not deserialize the engine.{hint} {exc}") from exc
    if engine is None:
        raise EngineLoadError(f"TensorRT could not deserialize the engine.{hint}")
    return engine


def inspect_engine(trt, engine) -> dict:
    """Layer JSON from the engine inspector (hand-written: Polygraphy prints it, does not return it), IO dtypes."""
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
    """Build a TensorRT plan for ``shapes`` from an ONNX precision variant, through Polygraphy.

    Raises:
        MissingDependencyError: tensorrt, polygraphy or cuda-python missing.
        UserInputError: a request TensorRT cannot serve (fixed ONNX for another shape,
            legacy FP16 on TensorRT 11, fp16/int8 without a graph that carries it,
            SAME_COMPUTE_CAPABILITY before 10.9).
    Returns:
        The artifact; a parser/builder/CUDA failure is recorded in ``error``.
    """
    trt = import_tensorrt()
    pg = import_polygraphy()
    cudart = import_cudart()
    major = check_version(trt)
    io = check_onnx_accepts(onnx_path, shapes)
    carried = graph_precision(onnx_path)
    check_precision_request(precision, carried, legacy_fp16_flag=options.legacy_fp16_flag, onnx_path=onnx_path)
    validate_options(trt, options, precision=precision)
    network_loader, config_loader, applied = make_loaders(
        trt, pg, onnx_path, shapes, options, precision=precision, carried=carried
    )

    name = name or f"{BACKEND}_{precision}_{shapes.mode}"
    os.makedirs(out_dir, exist_ok=True)
    plan_path = os.path.join(out_dir, f"{name}.plan")
    layers_path = os.path.join(out_dir, f"{name}.layers.json")
    meta: dict = {
        "tensorrt_version": trt.__version__,
        "tensorrt_major": major,
        "graph_precision": carried,
        "strongly_typed": applied["strongly_typed"],
        "tf32": applied["tf32"],
        "options": options.to_dict(),
        "config": applied,
        "num_profiles": applied["num_profiles"],
    }
    t0 = time.perf_counter()
    try:
        ensure_device(cudart)
        meta["gpu"] = device_info(cudart)
        plan = build_plan(trt, pg, network_loader, config_loader, options.timing_cache)
        # Not SaveEngine: it writes in place; a crash must never leave half a plan.
        with atomic_path(plan_path) as tmp:
            with open(tmp, "wb") as f:
                f.write(plan)
        build_s = time.perf_counter() - t0
        try:
            details = inspect_engine(trt, load_engine(trt, pg, plan))
            with atomic_path(layers_path) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(details.pop("layers_json"))
            meta.update(details)
            meta["layers_json"] = layers_path
        except Exception as exc:  # the plan is good; only the report is missing
            meta["inspect_error"] = f"{type(exc).__name__}: {exc}"
    except (UserInputError, MissingDependencyError):
        raise
    except Exception as exc:  # CudaError, EngineBuildError, TensorRT's own errors: record, don't crash a sweep
        return error_artifact(BACKEND, precision, onnx_path, shapes, exc, build_s=time.perf_counter() - t0, meta=meta)
    return EngineArtifact(
        backend=BACKEND,
        precision=precision,
        path=plan_path,
        source_onnx=onnx_path,
        shapes=shapes,
        input_name=io.input_name,
        output_name=io.output_name,
        build_s=build_s,
        sha256=sha256_file(plan_path),
        size_bytes=os.path.getsize(plan_path),
        meta=meta,
    )


# --------------------------------------------------------------------------- runtime


class TensorRTRunner(Runner):
    """Runs a TensorRT plan with Polygraphy's ``TrtRunner``, timing the device work with CUDA events.

    The first call after an input-shape (or profile) change goes through ``TrtRunner.infer``:
    Polygraphy sets the shape, binds its buffers and enqueues once (the plain enqueue TensorRT
    needs after a shape change). Later calls with that shape use the hand-written
    :meth:`_enqueue_timed` on the same context and buffers: events around the copies and the
    enqueue (or a CUDA graph replay, with ``cuda_graph``), so ``last_cuda_timing_ms`` is device time.
    """

    name = "tensorrt"
    cuda_timing = True  # the benchmark harness records last_cuda_timing_ms() beside host time

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
        self._trt_runner = None
        self._engine = None
        self._cudart = None
        self._timer: EventTimer | None = None
        self._graphs: GraphCache | None = None
        self._key: tuple | None = None  # (profile, input shape) the context is set up for
        self._last_timing: dict | None = None
        self._in_dtype = self._out_dtype = np.dtype(np.float32)

    def activate_impl(self) -> None:
        trt = import_tensorrt()
        pg = import_polygraphy()
        cudart = import_cudart()
        check_version(trt)
        ensure_device(cudart, self.device_id)
        self._cudart = cudart
        try:
            with open(self.plan_path, "rb") as f:
                blob = f.read()
            self._engine = load_engine(trt, pg, blob, hint=self._load_hint(trt))
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            for tname in (self.input_name, self.output_name):
                if tname not in names:
                    raise EngineLoadError(f"'{self.plan_path}' has no tensor '{tname}' (tensors: {names})")
            self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self.input_name)))
            self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self.output_name)))
            self._trt_runner = pg.TrtRunner(self._engine)
            self._trt_runner.activate()
            self._timer = EventTimer(cudart)
            self._graphs = GraphCache(cudart, self._trt_runner.stream.ptr, self._execute)
        except BaseException:
            self._release()
            raise

    def _load_hint(self, trt) -> str:
        built = self.built_with
        hint = ""
        if built.get("tensorrt_version") and built["tensorrt_version"] != trt.__version__:
            hint = f" It was built with TensorRT {built['tensorrt_version']}; this process has {trt.__version__}."
        gpu = built.get("gpu") or {}
        if gpu:
            hint += f" It was built on {gpu.get('name')} (compute capability {gpu.get('compute_capability')})."
        return (
            f" '{self.plan_path}':{hint} Engines are tied to the TensorRT version and GPU: rebuild it here "
            "(fixres-deploy build)."
        )

    @property
    def _context(self):
        return self._trt_runner.context

    def _execute(self) -> None:
        context = self._context
        if not context.execute_async_v3(self._trt_runner.stream.ptr):
            raise FixResError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def infer_impl(self, x: np.ndarray) -> np.ndarray:
        index = self.shapes.check(x.shape) if self.shapes is not None else 0
        x = np.ascontiguousarray(x, dtype=self._in_dtype)  # an fp16-I/O engine takes fp16
        key = (index, tuple(x.shape))
        if key != self._key:
            # Shape or profile switch: Polygraphy sets it up and enqueues once; graphs are stale.
            self._graphs.invalidate()
            if self._engine.num_optimization_profiles > 1:
                self._trt_runner.set_profile(index)
            self._key = None
            out = self._trt_runner.infer({self.input_name: x})[self.output_name]
            self._key = key
            self._graphs.note_plain_enqueue(key)
            self._last_timing = None  # host path: no device-only time for this call
            return np.asarray(out, dtype=np.float32).copy()
        return self._enqueue_timed(x, key)

    def _enqueue_timed(self, x: np.ndarray, key: tuple) -> np.ndarray:
        """H2D, enqueue (or graph replay), D2H on Polygraphy's buffers, bracketed by four CUDA events."""
        runner, timer, cudart = self._trt_runner, self._timer, self._cudart
        stream = runner.stream.ptr
        dev_in = runner.device_input_buffers[self.input_name].ptr
        dev_out = runner.output_allocator.buffers[self.output_name].ptr
        out_shape = tuple(self._context.get_tensor_shape(self.output_name))
        host_out = np.empty(out_shape, dtype=self._out_dtype)
        timer.record(0, stream)
        memcpy_async(cudart, dev_in, x.ctypes.data, x.nbytes, "htod", stream)
        timer.record(1, stream)
        if self.cuda_graph:
            self._graphs.run(key)
        else:
            self._execute()
        timer.record(2, stream)
        memcpy_async(cudart, host_out.ctypes.data, dev_out, host_out.nbytes, "dtoh", stream)
        timer.record(3, stream)
        synchronize(cudart, stream)
        self._last_timing = timer.elapsed_ms()
        return host_out.astype(np.float32, copy=False)

    def last_cuda_timing_ms(self) -> dict | None:
        """{"h2d_ms", "compute_ms", "d2h_ms"} of the last call (None after a shape switch)."""
        return self._last_timing

    def _release(self) -> None:
        errors = []
        for step in (self._free_graphs, self._free_timer, self._deactivate_trt_runner):
            try:
                step()
            except (CudaError, FixResError) as exc:
                errors.append(str(exc))
        self._reset()
        if errors:
            log.warning("TensorRT runner cleanup: %s", "; ".join(errors))

    def _free_graphs(self) -> None:
        if self._graphs is not None:
            self._graphs.invalidate()

    def _free_timer(self) -> None:
        if self._timer is not None:
            self._timer.free()

    def _deactivate_trt_runner(self) -> None:
        if self._trt_runner is not None and self._trt_runner.is_active:
            self._trt_runner.deactivate()

    def deactivate_impl(self) -> None:
        # Graphs before the context (TrtRunner frees its context, buffers and stream).
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
