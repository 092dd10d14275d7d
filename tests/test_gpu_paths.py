"""The GPU code paths' logic, checked without a GPU: CUDA graph cache, event timing, the
TensorRT runner's shape-switch protocol, ONNX Runtime provider options, provider check and IO
binding reuse (on the CPU provider, a real session).

The CUDA runtime is replaced by a recording fake with cuda-python's calling convention
(``(cudaError_t, *values)`` tuples), so the order of launches is asserted exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fixres_deploy.backends.base import ShapeSpec
from fixres_deploy.backends.cuda_utils import CudaError, EventTimer, GraphCache


class FakeCudart:
    """Records every call; errors injectable per function name."""

    class cudaError_t:
        cudaSuccess = 0
        cudaErrorStreamCaptureInvalidated = 901

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self):
        self.log: list[tuple] = []
        self.fail: dict[str, int] = {}
        self._n = 0
        self.times = {}

    def _new(self, kind):
        self._n += 1
        return f"{kind}{self._n}"

    def _ret(self, name, *values):
        err = self.fail.get(name, 0)
        return (err, *values) if values else (err,)

    def cudaGetErrorString(self, err):
        return (0, b"injected")

    def cudaStreamBeginCapture(self, stream, mode):
        self.log.append(("begin", stream))
        return self._ret("cudaStreamBeginCapture")

    def cudaStreamEndCapture(self, stream):
        graph = self._new("graph")
        self.log.append(("end", stream, graph))
        return self._ret("cudaStreamEndCapture", graph)

    def cudaGraphInstantiate(self, graph, flags):
        ge = self._new("exec")
        self.log.append(("instantiate", graph, ge))
        return self._ret("cudaGraphInstantiate", ge)

    def cudaGraphLaunch(self, ge, stream):
        self.log.append(("launch", ge))
        return self._ret("cudaGraphLaunch")

    def cudaGraphExecDestroy(self, ge):
        self.log.append(("destroy_exec", ge))
        return (0,)

    def cudaGraphDestroy(self, g):
        self.log.append(("destroy_graph", g))
        return (0,)

    def cudaEventCreate(self):
        ev = self._new("event")
        self.log.append(("event_create", ev))
        return self._ret("cudaEventCreate", ev)

    def cudaEventRecord(self, ev, stream):
        self.log.append(("record", ev))
        return (0,)

    def cudaEventElapsedTime(self, a, b):
        return (0, self.times.get((a, b), 1.0))

    def cudaEventDestroy(self, ev):
        self.log.append(("event_destroy", ev))
        return (0,)


def _cache():
    cudart = FakeCudart()
    cache = GraphCache(cudart, "stream0", lambda: cudart.log.append(("enqueue",)))
    return cudart, cache


def test_graph_cache_plain_enqueue_before_capture_and_after_every_shape_switch():
    cudart, cache = _cache()
    a, b = (0, (1, 3, 32, 32)), (0, (2, 3, 32, 32))
    steps = [cache.run(k) for k in (a, a, a, b, b, a)]
    assert steps == ["plain", "captured", "replayed", "plain", "captured", "plain"]
    assert cudart.log == [
        ("enqueue",),  # a: first use -> plain enqueue (TensorRT applies the shape lazily)
        ("begin", "stream0"),
        ("enqueue",),
        ("end", "stream0", "graph1"),
        ("instantiate", "graph1", "exec2"),
        ("launch", "exec2"),  # a: captured, then launched
        ("launch", "exec2"),  # a: replayed
        ("destroy_exec", "exec2"),  # b: the switch makes a's graph stale
        ("destroy_graph", "graph1"),
        ("enqueue",),  # b: plain first
        ("begin", "stream0"),
        ("enqueue",),
        ("end", "stream0", "graph3"),
        ("instantiate", "graph3", "exec4"),
        ("launch", "exec4"),
        ("destroy_exec", "exec4"),  # back to a: never replay a graph from before the switch
        ("destroy_graph", "graph3"),
        ("enqueue",),
    ]
    assert len(cache) == 0


def test_graph_cache_respects_a_plain_enqueue_done_by_the_caller():
    cudart, cache = _cache()
    key = (1, (4, 3, 64, 64))
    cache.note_plain_enqueue(key)  # e.g. Polygraphy's TrtRunner.infer set the shape and enqueued
    assert cache.run(key) == "captured"
    cache.note_plain_enqueue((1, (8, 3, 64, 64)))
    assert len(cache) == 0 and ("destroy_exec", "exec2") in cudart.log


def test_failed_capture_ends_it_frees_the_partial_graph_and_keeps_the_cause():
    cudart = FakeCudart()
    calls = []

    def enqueue():
        calls.append(1)
        if len(calls) == 2:  # the enqueue inside the capture fails
            raise RuntimeError("execute_async_v3 failed: illegal address")

    cache = GraphCache(cudart, "s", enqueue)
    cache.run("k")
    cudart.fail["cudaStreamEndCapture"] = cudart.cudaError_t.cudaErrorStreamCaptureInvalidated
    with pytest.raises(CudaError, match="illegal address") as info:
        cache.run("k")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert [e[0] for e in cudart.log] == ["begin", "end"]  # capture ended; no instantiate
    assert len(cache) == 0
    # capture ended fine but the launch failed: the partial graph is destroyed
    cudart2 = FakeCudart()
    calls.clear()
    cache2 = GraphCache(cudart2, "s", enqueue)
    cache2.run("k")
    with pytest.raises(CudaError, match="illegal address"):
        cache2.run("k")
    assert [e[0] for e in cudart2.log] == ["begin", "end", "destroy_graph"]


def test_failed_instantiate_frees_the_graph():
    cudart, cache = _cache()
    cache.run("k")
    cudart.fail["cudaGraphInstantiate"] = 1
    with pytest.raises(CudaError, match="cudaGraphInstantiate failed"):
        cache.run("k")
    assert cudart.log[-1] == ("destroy_graph", "graph1") and len(cache) == 0


def test_event_timer_spans_and_cleanup():
    cudart = FakeCudart()
    timer = EventTimer(cudart)
    ev = timer.events
    cudart.times = {(ev[0], ev[1]): 0.25, (ev[1], ev[2]): 3.5, (ev[2], ev[3]): 0.125}
    for i in range(4):
        timer.record(i, "s")
    assert timer.elapsed_ms() == {"h2d_ms": 0.25, "compute_ms": 3.5, "d2h_ms": 0.125}
    timer.free()
    assert [e for e in cudart.log if e[0] == "event_destroy"] == [("event_destroy", e) for e in ev]
    # creation failing half-way frees what was created
    cudart2 = FakeCudart()
    orig = cudart2.cudaEventCreate
    made = []

    def flaky():
        made.append(1)
        return orig() if len(made) < 3 else (2, None)

    cudart2.cudaEventCreate = flaky
    with pytest.raises(CudaError):
        EventTimer(cudart2)
    assert len([e for e in cudart2.log if e[0] == "event_destroy"]) == 2


# --------------------------------------------------------------------------- TensorRT runner protocol


class _FakeContext:
    def __init__(self, log):
        self.log = log

    def execute_async_v3(self, stream):
        self.log.append(("execute", stream))
        return True

    def get_tensor_shape(self, name):
        return self.shape


class _FakeTrtRunner:
    """Polygraphy's TrtRunner as the backend uses it."""

    def __init__(self, log, cudart):
        self.log, self.cudart = log, cudart
        self.context = _FakeContext(log)
        self.stream = SimpleNamespace(ptr=7)
        self.is_active = False
        self.device_input_buffers = {"input": SimpleNamespace(ptr=100)}
        self.output_allocator = SimpleNamespace(buffers={"logits": SimpleNamespace(ptr=200)})

    def activate(self):
        self.is_active = True

    def deactivate(self):
        self.is_active = False
        self.log.append(("deactivate",))

    def set_profile(self, index):
        self.log.append(("set_profile", index))

    def infer(self, feed):
        x = feed["input"]
        self.log.append(("trt_runner_infer", tuple(x.shape)))
        self.context.shape = (x.shape[0], 10)
        return {"logits": np.full((x.shape[0], 10), 1.0, np.float32)}


def test_tensorrt_runner_shape_switch_protocol(tmp_path, monkeypatch):
    """Every shape switch goes through a plain (Polygraphy) enqueue; graphs only after it; device times recorded."""
    from fixres_deploy.backends import cuda_utils
    from fixres_deploy.backends import tensorrt_backend as tb

    log: list = []
    cudart = FakeCudart()
    cudart.log = log
    cudart.cudaMemcpyAsync = lambda dst, src, n, kind, stream: log.append(("memcpy", kind)) or (0,)
    cudart.cudaStreamSynchronize = lambda s: log.append(("sync",)) or (0,)
    engine = SimpleNamespace(
        num_io_tensors=2,
        get_tensor_name=lambda i: ["input", "logits"][i],
        get_tensor_dtype=lambda name: "FLOAT",
        num_optimization_profiles=2,
    )
    trt = SimpleNamespace(__version__="10.16.1.11", nptype=lambda d: np.float32)
    pg = SimpleNamespace(TrtRunner=lambda e: _FakeTrtRunner(log, cudart))
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tb, "import_polygraphy", lambda: pg)
    monkeypatch.setattr(tb, "import_cudart", lambda: cudart)
    monkeypatch.setattr(tb, "ensure_device", lambda c, d=0: None)
    monkeypatch.setattr(tb, "load_engine", lambda t, p, blob, hint="": engine)
    monkeypatch.setattr(cuda_utils, "check", cuda_utils.check)
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    shapes = ShapeSpec.resolution_bands([32, 64], max_batch=4, bands=2)
    runner = tb.TensorRTRunner(str(plan), shapes=shapes, cuda_graph=True)
    a = np.zeros((1, 3, 32, 32), np.float32)
    b = np.zeros((2, 3, 64, 64), np.float32)
    with runner:
        log.clear()
        timings = []
        for x in (a, a, a, b, a):
            runner.predict(x)
            timings.append(runner.last_cuda_timing_ms())
    kinds = [e[0] for e in log if e[0] in ("set_profile", "trt_runner_infer", "execute", "launch", "begin")]
    assert kinds == [
        "set_profile",
        "trt_runner_infer",  # a: plain enqueue through Polygraphy
        "begin",
        "execute",
        "launch",  # a: captured after the plain enqueue, launched
        "launch",  # a: replayed
        "set_profile",
        "trt_runner_infer",  # b: a switch of shape and profile -> plain again
        "set_profile",
        "trt_runner_infer",  # back to a -> plain again, no stale replay
    ]
    assert timings[0] is None and timings[3] is None and timings[4] is None
    assert timings[1] == timings[2] == {"h2d_ms": 1.0, "compute_ms": 1.0, "d2h_ms": 1.0}
    assert ("deactivate",) in log and not runner.is_active


# --------------------------------------------------------------------------- ONNX Runtime GPU providers


def test_provider_options_for_cuda_and_tensorrt_eps(tmp_path):
    from fixres_deploy.backends.onnxruntime_backend import default_provider_options

    shapes = ShapeSpec.resolution_bands([160, 224, 288], max_batch=8, bands=2)
    cache = str(tmp_path / "cache")
    opts = default_provider_options(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        None,
        device_id=1,
        cache_dir=cache,
        shapes=shapes,
        input_name="image",
    )
    trt, cuda, cpu = opts
    assert cuda == {"device_id": 1} and cpu == {}
    assert trt == {
        "device_id": 1,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": "image:1x3x160x160,image:1x3x224x224",
        "trt_profile_opt_shapes": "image:1x3x160x160,image:1x3x288x288",
        "trt_profile_max_shapes": "image:8x3x160x160,image:8x3x288x288",
    }
    # the user's options win over the defaults
    given = default_provider_options(["CUDAExecutionProvider"], [{"device_id": 3, "arena_extend_strategy": "x"}])
    assert given == [{"device_id": 3, "arena_extend_strategy": "x"}]
    assert default_provider_options(["CPUExecutionProvider"], None) is None


def _tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_tensorrt_ep_build_does_not_serialize_and_a_cpu_fallback_is_refused(tmp_path, monkeypatch):
    """ORT with the TensorRT EP: no optimized_model_filepath (compiled nodes), and a session that
    silently fell back to CPU is a recorded error, never CPU numbers in a TensorRT EP row."""
    ort = pytest.importorskip("onnxruntime")
    from fixres_deploy.backends import BuildOptions, build_engine

    seen = {}
    real_session = ort.InferenceSession

    class FallbackSession(real_session):
        def __init__(self, path, sess_options=None, providers=None, provider_options=None):
            seen["optimized_model_filepath"] = sess_options.optimized_model_filepath
            seen["provider_options"] = provider_options
            super().__init__(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FallbackSession)
    onnx_path = _tiny_onnx(tmp_path / "m.onnx")
    art = build_engine(
        "onnxruntime",
        onnx_path,
        ShapeSpec.fixed(1, 16),
        BuildOptions(providers=["TensorrtExecutionProvider"]),
        out_dir=str(tmp_path / "e"),
    )
    assert seen["optimized_model_filepath"] == ""  # not set for a compiling EP
    assert seen["provider_options"][0]["trt_engine_cache_enable"] is True
    assert seen["provider_options"][0]["trt_profile_min_shapes"] == "input:1x3x16x16"
    assert art.error and art.meta["error_type"] == "ProviderFallbackError"
    assert "TensorrtExecutionProvider" in art.error and "CPUExecutionProvider" in art.error
    assert "not saved" in art.meta["optimized_model_note"]


def test_cpu_build_still_saves_the_optimized_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    from fixres_deploy.backends import BuildOptions, build_engine

    art = build_engine(
        "onnxruntime", _tiny_onnx(tmp_path / "m.onnx"), ShapeSpec.fixed(1, 16), BuildOptions(), out_dir=str(tmp_path)
    )
    assert (
        art.error is None
        and art.meta["optimized_model"]
        and (tmp_path / "onnxruntime_fp32_fixed.optimized.onnx").exists()
    )
    assert art.meta["providers"] == ["CPUExecutionProvider"] and art.meta["provider_options"] is None


def test_io_binding_buffers_are_allocated_once_per_shape(tmp_path):
    """IO binding (the GPU providers' path), on the CPU device: same OrtValues reused, right results."""
    pytest.importorskip("onnxruntime")
    from fixres_deploy.backends.onnxruntime_backend import OnnxRuntimeRunner

    path = _tiny_onnx(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    plain = OnnxRuntimeRunner(path, io_binding=False)
    bound = OnnxRuntimeRunner(path, io_binding=True)
    with plain, bound:
        xs = [rng.normal(size=s).astype(np.float32) for s in [(1, 3, 16, 16), (1, 3, 16, 16), (2, 3, 24, 24)]]
        xs.append(rng.normal(size=(1, 3, 16, 16)).astype(np.float32))
        outs = []
        for x in xs:
            y = bound.predict(x)
            np.testing.assert_allclose(y, plain.predict(x), rtol=1e-5, atol=1e-6)
            outs.append(y)
        assert len(bound._bindings) == 2  # one per shape
        state = bound._bindings[((1, 3, 16, 16), "<f4")]
        first_in, first_out = state["input"], state["output"]
        bound.predict(xs[0])
        assert state["input"] is first_in and state["output"] is first_out
        assert not np.allclose(outs[0], outs[3])  # a new input in the same buffers gives new logits


def test_torch_fp32_forbids_tf32_and_labels_it_when_allowed():
    torch = pytest.importorskip("torch")
    from fixres_deploy.backends.torch_backend import TorchRunner, set_tf32

    before = set_tf32(torch, True)
    try:
        assert set_tf32(torch, False) == (True, True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    model = torch.nn.Conv2d(3, 4, 3)
    assert TorchRunner(model, device="cuda").precision_label == "fp32"
    assert TorchRunner(model, device="cuda", tf32=True).precision_label == "tf32"
    assert TorchRunner(model, device="cuda", tf32=True, half=True).precision_label == "fp16"
    assert TorchRunner(model, device="cpu", tf32=True).precision_label == "fp32"  # no TF32 on a CPU


def test_gpu_check_dry_run_prints_the_plan():
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "gpu_check.py")
    out = subprocess.run(
        [sys.executable, script, "--dry-run", "--resolutions", "160,224", "--batches", "1,8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert "cuda-helpers" in plan["sections"] and "torch-cuda" in plan["sections"]
    assert len(plan["torch_cuda_cases"]) == 2 * 2 * 4 * 2  # res x batch x {fp32, tf32, fp16, bf16} x {eager, graph}
    assert "224px b8 bf16 graph" in plan["torch_cuda_cases"]
