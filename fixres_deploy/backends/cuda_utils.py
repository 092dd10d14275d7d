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

from fixres_deploy.core.errors import FixResError, require_any


class CudaError(FixResError, RuntimeError):
    """A CUDA runtime call failed (no device, out of memory, a bad launch, ...)."""


def import_cudart(feature: str = "TensorRT engines"):
    """The CUDA runtime bindings of cuda-python (``cuda.bindings.runtime``, else ``cuda.cudart``).

    cuda-python >= 12.6 moved the bindings to ``cuda.bindings``; older releases only have
    ``from cuda import cudart``.
    """
    return require_any(("cuda.bindings.runtime", "cuda.cudart"), "gpu", feature, "cuda-python (CUDA runtime bindings)")


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


class CudaGraph:
    """One captured and instantiated CUDA graph of ``launch_fn`` on a stream.

    Capturing removes the per-launch CPU cost of enqueueing every kernel (trtexec in
    TensorRT 11 captures by default). Addresses are baked into the graph: re-capture after
    any buffer is reallocated or the input shape changes.
    """

    def __init__(self, cudart, stream: Stream, launch_fn: Callable[[], None]):
        self._cudart = cudart
        self.graph = None
        self.graph_exec = None
        check(
            cudart,
            cudart.cudaStreamBeginCapture(stream.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture",
        )
        try:
            launch_fn()
        finally:
            # End the capture even when the launch failed, or the stream stays unusable.
            graph = check(cudart, cudart.cudaStreamEndCapture(stream.stream), "cudaStreamEndCapture")
        self.graph = graph
        self.graph_exec = check(cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def launch(self, stream: Stream) -> None:
        check(self._cudart, self._cudart.cudaGraphLaunch(self.graph_exec, stream.stream), "cudaGraphLaunch")

    def free(self) -> None:
        if self.graph_exec is not None:
            ge, self.graph_exec = self.graph_exec, None
            check(self._cudart, self._cudart.cudaGraphExecDestroy(ge), "cudaGraphExecDestroy")
        if self.graph is not None:
            g, self.graph = self.graph, None
            check(self._cudart, self._cudart.cudaGraphDestroy(g), "cudaGraphDestroy")
