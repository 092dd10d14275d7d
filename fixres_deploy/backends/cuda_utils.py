"""CUDA runtime helpers over cuda-python: device and pinned buffers, a stream, CUDA graphs.

cuda-python was chosen over pycuda: binary wheels for every CUDA version, no compiler at
install time, and NVIDIA's own TensorRT samples use it. Every call goes through
:func:`check`, which turns the ``(cudaError_t, *values)`` tuples cuda-python returns into
values or a :class:`CudaError` that names the call and the CUDA error.

Imports nothing heavy at module level (numpy only); cuda-python is imported lazily by
:func:`import_cudart`, so this module loads in a torch-free production process.
Convention (checked by tests/test_trt_api.py): the runtime module is always bound to a name
``cudart``, so every ``cudart.<name>`` used here can be verified against the installed
bindings without a GPU.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from fixres_deploy.core.errors import GPU_EXTRA, GPU_EXTRA_HINT, FixResError, require_any


class CudaError(FixResError, RuntimeError):
    """A CUDA runtime call failed (no device, out of memory, a bad launch, ...)."""


def import_cudart(feature: str = "TensorRT engines"):
    """The CUDA runtime bindings of cuda-python (``cuda.bindings.runtime``, else ``cuda.cudart``).

    cuda-python >= 12.6 moved the bindings to ``cuda.bindings``; older releases only have
    ``from cuda import cudart``.
    """
    return require_any(
        ("cuda.bindings.runtime", "cuda.cudart"),
        GPU_EXTRA,
        feature,
        "cuda-python (CUDA runtime bindings)",
        GPU_EXTRA_HINT,
    )


def check(cudart, result: Any, what: str):
    """Unpack a cuda-python result tuple; raise CudaError unless it reports cudaSuccess.

    Returns:
        None, the single value, or a tuple of values after the error code.
    """
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise CudaError(f"{what} failed: {error_text(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def error_text(cudart, err) -> str:
    """'cudaErrorNoDevice (no CUDA-capable device is detected)' for an error code."""
    name = getattr(err, "name", str(err))
    try:
        code, desc = cudart.cudaGetErrorString(err)
        if code == cudart.cudaError_t.cudaSuccess:
            text = desc.decode() if isinstance(desc, bytes) else str(desc)
            return f"{name} ({text})"
    except (TypeError, ValueError, AttributeError):  # an unusual error object: keep its name
        pass
    return str(name)


def ensure_device(cudart, device: int = 0) -> None:
    """Fail early and clearly when there is no usable GPU (instead of a TensorRT nullptr)."""
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        raise CudaError(
            f"no usable CUDA device: cudaGetDeviceCount failed with {error_text(cudart, err)}. "
            "TensorRT engines need an NVIDIA GPU with a working driver."
        )
    if count <= device:
        raise CudaError(f"CUDA device {device} requested but {count} device(s) present")
    check(cudart, cudart.cudaSetDevice(device), f"cudaSetDevice({device})")


def device_info(cudart, device: int | None = None) -> dict:
    """Name, compute capability and memory of a GPU, plus runtime/driver versions.

    Engines are tied to the compute capability and the TensorRT version (TensorRT issues
    #564, #818), so every artifact records them.
    """
    if device is None:
        device = check(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    prop = check(cudart, cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    info = {
        "device": int(device),
        "name": str(name),
        "compute_capability": f"{prop.major}.{prop.minor}",
        "total_memory_mb": int(prop.totalGlobalMem) // (1 << 20),
        "multiprocessors": int(prop.multiProcessorCount),
    }
    err, rt = cudart.cudaRuntimeGetVersion()
    if err == cudart.cudaError_t.cudaSuccess:
        info["cuda_runtime_version"] = int(rt)
    err, drv = cudart.cudaDriverGetVersion()
    if err == cudart.cudaError_t.cudaSuccess:
        info["cuda_driver_version"] = int(drv)
    return info


class DeviceBuffer:
    """``nbytes`` of device memory; ``ptr`` is the address TensorRT binds; ``free()`` releases it."""

    def __init__(self, cudart, nbytes: int):
        self._cudart = cudart
        self.nbytes = int(max(1, nbytes))
        self.ptr = int(check(cudart, cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(self._cudart, self._cudart.cudaFree(ptr), "cudaFree")


class PinnedBuffer:
    """Page-locked host memory (fast, truly asynchronous copies), viewed as a numpy array."""

    def __init__(self, cudart, nbytes: int):
        self._cudart = cudart
        self.nbytes = int(max(1, nbytes))
        self.ptr = int(check(cudart, cudart.cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})"))
        raw = ctypes.cast(self.ptr, ctypes.POINTER(ctypes.c_uint8))
        self._bytes = np.ctypeslib.as_array(raw, (self.nbytes,))

    def view(self, dtype, shape) -> np.ndarray:
        """A numpy view of the first ``prod(shape)`` elements (no copy)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        if count * dtype.itemsize > self.nbytes:
            raise CudaError(f"pinned buffer of {self.nbytes} bytes cannot hold {shape} {dtype}")
        return self._bytes[: count * dtype.itemsize].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self._bytes = None
            check(self._cudart, self._cudart.cudaFreeHost(ptr), "cudaFreeHost")


class Stream:
    """A non-blocking CUDA stream; ``handle`` is the integer TensorRT's enqueue takes."""

    def __init__(self, cudart):
        self._cudart = cudart
        self.stream = check(
            cudart, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
        )

    @property
    def handle(self) -> int:
        return int(self.stream)

    def copy_htod(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        check(
            self._cudart,
            self._cudart.cudaMemcpyAsync(
                dst_ptr, src_ptr, nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
            ),
            "cudaMemcpyAsync host->device",
        )

    def copy_dtoh(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        check(
            self._cudart,
            self._cudart.cudaMemcpyAsync(
                dst_ptr, src_ptr, nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
            ),
            "cudaMemcpyAsync device->host",
        )

    def synchronize(self) -> None:
        check(self._cudart, self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            check(self._cudart, self._cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")


def memcpy_async(cudart, dst_ptr: int, src_ptr: int, nbytes: int, kind: str, stream) -> None:
    """``cudaMemcpyAsync`` on a raw stream handle; ``kind`` is "htod" or "dtoh"."""
    kinds = {
        "htod": cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
        "dtoh": cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
    }
    check(cudart, cudart.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, kinds[kind], stream), f"cudaMemcpyAsync {kind}")


def synchronize(cudart, stream) -> None:
    check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


class EventTimer:
    """Four CUDA events recorded on a stream around H2D, compute and D2H; device milliseconds between them.

    Host timers around an asynchronous call measure the launch, not the work: events are
    timestamped by the GPU in stream order (CUDA programming guide, "Events").
    """

    SPANS = (("h2d_ms", 0, 1), ("compute_ms", 1, 2), ("d2h_ms", 2, 3))

    def __init__(self, cudart, count: int = 4):
        self._cudart = cudart
        self.events: list = []
        try:
            for _ in range(count):
                self.events.append(check(cudart, cudart.cudaEventCreate(), "cudaEventCreate"))
        except CudaError:
            self.free()
            raise

    def record(self, index: int, stream) -> None:
        check(self._cudart, self._cudart.cudaEventRecord(self.events[index], stream), f"cudaEventRecord({index})")

    def span_ms(self, start: int, end: int) -> float:
        """Device time between two recorded events (the later one must have completed)."""
        return float(
            check(
                self._cudart,
                self._cudart.cudaEventElapsedTime(self.events[start], self.events[end]),
                "cudaEventElapsedTime",
            )
        )

    def elapsed_ms(self) -> dict:
        """{"h2d_ms", "compute_ms", "d2h_ms"} after the stream was synchronized."""
        return {name: self.span_ms(a, b) for name, a, b in self.SPANS}

    def free(self) -> None:
        events, self.events = self.events, []
        for event in events:
            check(self._cudart, self._cudart.cudaEventDestroy(event), "cudaEventDestroy")


class CudaGraph:
    """One captured and instantiated CUDA graph of ``launch_fn`` on a stream (a raw handle).

    Capturing removes the per-launch CPU cost of enqueueing every kernel (trtexec in
    TensorRT 11 captures by default). Addresses and shapes are baked into the graph: see
    :class:`GraphCache` for when it must be captured again.
    """

    def __init__(self, cudart, stream, launch_fn: Callable[[], None]):
        self._cudart = cudart
        self.graph = None
        self.graph_exec = None
        check(
            cudart,
            cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture",
        )
        try:
            launch_fn()
        except BaseException as exc:
            # End the capture (else the stream stays unusable) and free the partial graph, but
            # raise the launch's own error: a failing cudaStreamEndCapture must not mask it.
            err, *rest = cudart.cudaStreamEndCapture(stream)
            if err == cudart.cudaError_t.cudaSuccess and rest and rest[0] is not None:
                cudart.cudaGraphDestroy(rest[0])
            raise CudaError(f"CUDA graph capture failed in the captured launch: {type(exc).__name__}: {exc}") from exc
        self.graph = check(cudart, cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        try:
            self.graph_exec = check(cudart, cudart.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")
        except CudaError:
            self.free()
            raise

    def launch(self, stream) -> None:
        check(self._cudart, self._cudart.cudaGraphLaunch(self.graph_exec, stream), "cudaGraphLaunch")

    def free(self) -> None:
        if self.graph_exec is not None:
            ge, self.graph_exec = self.graph_exec, None
            check(self._cudart, self._cudart.cudaGraphExecDestroy(ge), "cudaGraphExecDestroy")
        if self.graph is not None:
            g, self.graph = self.graph, None
            check(self._cudart, self._cudart.cudaGraphDestroy(g), "cudaGraphDestroy")


class GraphCache:
    """CUDA graphs of one execution context, keyed by (profile, input shape).

    TensorRT's best practices: after an input-shape change, call the enqueue once without
    capture before capturing or replaying (the context updates shape-dependent state lazily).
    So any switch of key destroys every cached graph, and a key is captured only after a plain
    enqueue with that key was the last thing done on the context. :meth:`run` enforces it.
    """

    def __init__(self, cudart, stream, enqueue: Callable[[], None]):
        self._cudart = cudart
        self._stream = stream
        self._enqueue = enqueue
        self._graphs: dict[tuple, CudaGraph] = {}
        self._ready: tuple | None = None  # the key of the last plain enqueue, if nothing changed since

    def note_plain_enqueue(self, key: tuple) -> None:
        """The caller set the context up for ``key`` and enqueued once outside any capture."""
        if key != self._ready:
            self.invalidate()
        self._ready = key

    def invalidate(self) -> None:
        """Destroy all graphs (a shape/profile/buffer change made them stale)."""
        graphs, self._graphs = self._graphs, {}
        self._ready = None
        errors = []
        for graph in graphs.values():
            try:
                graph.free()
            except CudaError as exc:
                errors.append(str(exc))
        if errors:
            raise CudaError("; ".join(errors))

    def run(self, key: tuple) -> str:
        """Replay the graph of ``key`` (capturing it first); returns "plain", "captured" or "replayed".

        A key that was not the last plain enqueue gets a plain enqueue now instead of a graph.
        """
        if key != self._ready:
            self.invalidate()
            self._enqueue()
            self._ready = key
            return "plain"
        graph = self._graphs.get(key)
        if graph is None:
            graph = CudaGraph(self._cudart, self._stream, self._enqueue)
            self._graphs[key] = graph
            graph.launch(self._stream)
            return "captured"
        graph.launch(self._stream)
        return "replayed"

    def __len__(self) -> int:
        return len(self._graphs)
