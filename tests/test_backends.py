"""Engine backends on a real exported model: ONNX Runtime (CPU) vs the torch reference.

The model is fixres:tiny_resnet with its BatchNorm statistics estimated on real demo images
and a classifier scaled so that the logits spread (a random-init net's outputs are nearly
constant, which would make any agreement check pass). Every comparison also checks that the
reference's predictions vary over the images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import spread_model, torch_logits

from fixres_deploy.backends import BuildOptions, ShapeSpec, build_engine, load_runner
from fixres_deploy.backends.base import EngineArtifact, ShapeError, onnx_io
from fixres_deploy.core.errors import FixResError, MissingDependencyError, UserInputError

RES = 64


def _resize(x: np.ndarray, res: int) -> np.ndarray:
    import torch

    t = torch.nn.functional.interpolate(torch.from_numpy(x), size=(res, res), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(t.numpy())


def _assert_close(y: np.ndarray, ref: np.ndarray) -> None:
    assert y.dtype == np.float32 and y.shape == ref.shape
    if len(ref) > 1:
        assert len(set(ref.argmax(1).tolist())) >= 2, "reference predictions are constant: the check would be vacuous"
    scale = np.abs(ref).max()
    assert np.abs(y - ref).max() / scale < 1e-4
    cos = (y * ref).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.99999
    assert (y.argmax(1) == ref.argmax(1)).all()


@pytest.fixture(scope="module")
def exported(demo_small, tmp_path_factory):
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.export.onnx_export import export_onnx
    from fixres_deploy.precision.calibration import calibration_batches

    root = tmp_path_factory.mktemp("backends")
    cfg = PreprocessConfig(RES)
    images = calibration_batches(os.path.join(demo_small, "train"), cfg, limit=40)
    model = spread_model(images[:32])
    result = export_onnx(model, root / "model.onnx", cfg, dynamic=True, exporter="torchscript", tolerance=None)
    return SimpleNamespace(model=model, onnx=result.path, images=_diverse(model, images), root=root, cfg=cfg)


def _diverse(model, images: np.ndarray, n: int = 8) -> np.ndarray:
    """n images, those with distinct predicted classes first (so small subsets vary too)."""
    pred = torch_logits(model, images).argmax(1)
    first = [int(np.flatnonzero(pred == c)[0]) for c in np.unique(pred)]
    order = first + [i for i in range(len(images)) if i not in first]
    assert len(first) >= 3, f"the test model predicts only {len(first)} classes on real images"
    return np.ascontiguousarray(images[order[:n]])


def test_ort_fixed_engine_matches_torch_and_records_build(exported, tmp_path):
    art = build_engine(
        "onnxruntime",
        exported.onnx,
        ShapeSpec.fixed(8, RES),
        BuildOptions(threads=1),
        out_dir=str(tmp_path),
        name="fixed64",
    )
    assert art.error is None
    # A fixed-shape copy of the dynamic export, so ORT plans for one shape.
    assert onnx_io(art.path).input_dims == (8, 3, RES, RES)
    assert onnx_io(exported.onnx).dynamic_axes == [0, 2, 3]
    from fixres_deploy.core.utils import sha256_file

    assert art.sha256 == sha256_file(art.path) and art.size_bytes == os.path.getsize(art.path)
    assert art.meta["fixed_shape_copy"] is True and art.meta["threads"] == 1
    assert art.meta["providers"] == ["CPUExecutionProvider"]
    assert os.path.getsize(art.meta["optimized_model"]) > 0
    assert art.build_s > 0
    # Round trip through JSON, as the index stores it.
    art2 = EngineArtifact.from_dict(json.loads(json.dumps(art.to_dict())))
    with load_runner(art2) as runner:
        assert runner.session.get_session_options().intra_op_num_threads == 1
        y = runner.predict(exported.images)
    _assert_close(y, torch_logits(exported.model, exported.images))


def test_ort_dynamic_engine_runs_five_resolutions(exported, tmp_path):
    resolutions = [48, 64, 80, 96, 128]
    shapes = ShapeSpec.resolution_bands(resolutions, max_batch=4, bands=2)
    art = build_engine(
        "onnxruntime",
        exported.onnx,
        shapes,
        BuildOptions(threads=1, save_optimized=False),
        out_dir=str(tmp_path),
        name="dyn",
    )
    assert art.error is None and art.meta["fixed_shape_copy"] is False and art.meta["optimized_model"] is None
    assert onnx_io(art.path).dynamic_axes == [0, 2, 3]
    with load_runner(art) as runner:
        for r in resolutions:
            x = _resize(exported.images[:3], r)
            _assert_close(runner.predict(x), torch_logits(exported.model, x))
        with pytest.raises(ShapeError, match="profile 1"):
            runner.predict(_resize(exported.images[:1], 160))
        with pytest.raises(ShapeError, match="dynamic-shape"):
            runner.predict(np.zeros((5, 3, 64, 64), np.float32))  # batch above max_batch 4


def test_fixed_engine_refuses_other_shapes(exported, tmp_path):
    art = build_engine(
        "onnxruntime",
        exported.onnx,
        ShapeSpec.fixed(2, RES),
        BuildOptions(threads=1),
        out_dir=str(tmp_path),
        name="fixed",
    )
    with load_runner(art) as runner:
        runner.predict(exported.images[:2])
        with pytest.raises(ShapeError, match=r"fixed-shape engine.*profile 0: min \[2, 3, 64, 64\]"):
            runner.predict(_resize(exported.images[:2], 96))
        with pytest.raises(ShapeError, match="profile 0"):
            runner.predict(exported.images[:3])
    # A runner on the fixed ONNX without an artifact still refuses with our ShapeError.
    from fixres_deploy.backends.onnxruntime_backend import OnnxRuntimeRunner

    with OnnxRuntimeRunner(art.path) as runner:
        with pytest.raises(ShapeError, match="profile 0"):
            runner.predict(_resize(exported.images[:2], 96))
    # The fixed ONNX cannot become an engine for another resolution: export --dynamic.
    with pytest.raises(UserInputError, match="--dynamic"):
        build_engine("onnxruntime", art.path, ShapeSpec.fixed(2, 96), out_dir=str(tmp_path), name="bad")
    with pytest.raises(UserInputError, match="--dynamic"):
        build_engine("onnxruntime", art.path, ShapeSpec.resolution_bands([64, 96]), out_dir=str(tmp_path))


def test_runner_lifecycle(exported, tmp_path):
    art = build_engine(
        "onnxruntime",
        exported.onnx,
        ShapeSpec.fixed(1, RES),
        BuildOptions(threads=1),
        out_dir=str(tmp_path),
        name="life",
    )
    runner = load_runner(art)
    with pytest.raises(FixResError, match="not active"):
        runner.predict(exported.images[:1])
    with runner:
        assert runner.is_active and runner.session is not None
        with pytest.raises(FixResError, match="already active"):
            runner.activate()
        with pytest.raises(UserInputError, match="feed dict"):
            runner.infer({"wrong": exported.images[:1]})
        y = runner.infer({art.input_name: exported.images[:1].astype(np.float64)})[art.output_name]
        assert y.dtype == np.float32 and runner.last_infer_ms > 0
    assert not runner.is_active and runner.session is None
    with pytest.raises(FixResError, match="not active"):
        runner.predict(exported.images[:1])
    with pytest.raises(UserInputError, match="unknown ONNX Runtime runner option"):
        load_runner(art, cuda_graph=True)
    failed = EngineArtifact.from_dict({**art.to_dict(), "error": "boom"})
    with pytest.raises(UserInputError, match="failed build"):
        load_runner(failed)


def test_failed_ort_build_is_recorded_not_raised(tmp_path):
    """A valid request ORT cannot build (an unknown operator) comes back as an error artifact."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["input"], ["logits"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = str(tmp_path / "bad.onnx")
    onnx.save(model, path)
    art = build_engine("onnxruntime", path, ShapeSpec.fixed(1, 8), out_dir=str(tmp_path / "out"))
    assert art.error and art.path is None
    assert art.meta["error_type"] and art.meta["error_type"] in art.error
    assert "NoSuchOp" in art.error


def test_provider_and_option_errors(exported, tmp_path):
    with pytest.raises(MissingDependencyError, match=r"fixres-deploy\[ort-gpu\]"):
        build_engine(
            "onnxruntime",
            exported.onnx,
            ShapeSpec.fixed(1, RES),
            BuildOptions(providers=["CUDAExecutionProvider"]),
            out_dir=str(tmp_path),
        )
    with pytest.raises(UserInputError, match="unknown ONNX Runtime execution provider"):
        build_engine(
            "onnxruntime",
            exported.onnx,
            ShapeSpec.fixed(1, RES),
            BuildOptions(providers=["NoSuchExecutionProvider"]),
            out_dir=str(tmp_path),
        )
    with pytest.raises(UserInputError, match="graph optimization level"):
        build_engine(
            "onnxruntime",
            exported.onnx,
            ShapeSpec.fixed(1, RES),
            BuildOptions(graph_optimization="max"),
            out_dir=str(tmp_path),
        )
    with pytest.raises(UserInputError, match="unknown backend"):
        build_engine("openvino", exported.onnx, ShapeSpec.fixed(1, RES), out_dir=str(tmp_path))
    # TensorRT-only options are recorded as ignored, not silently dropped.
    art = build_engine(
        "onnxruntime",
        exported.onnx,
        ShapeSpec.fixed(1, RES),
        BuildOptions(threads=1, workspace_mb=512, save_optimized=False),
        out_dir=str(tmp_path),
    )
    assert art.meta["ignored_options"] == ["workspace_mb"]


def test_missing_libraries_name_the_extra(exported, tmp_path, monkeypatch):
    from fixres_deploy.backends import cuda_utils

    for name in ("tensorrt", "tensorrt_bindings"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'fixres-deploy\[gpu-cu12\]'.*gpu-cu13"):
        build_engine("tensorrt", exported.onnx, ShapeSpec.fixed(1, RES), out_dir=str(tmp_path))
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", None)
    with pytest.raises(MissingDependencyError, match=r"polygraphy.*fixres-deploy\[gpu-cu12\]"):
        from fixres_deploy.backends.tensorrt_backend import import_polygraphy

        import_polygraphy()
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"cuda-python.*fixres-deploy\[gpu-cu12\]"):
        cuda_utils.import_cudart()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"fixres-deploy\[cpu\]"):
        build_engine("onnxruntime", exported.onnx, ShapeSpec.fixed(1, RES), out_dir=str(tmp_path))


def test_torch_free_import_and_run(exported, tmp_path):
    """The production path: the ORT/TensorRT backends import and an ORT engine runs without torch."""
    art = build_engine(
        "onnxruntime",
        exported.onnx,
        ShapeSpec.fixed(2, RES),
        BuildOptions(threads=1),
        out_dir=str(tmp_path),
        name="prod",
    )
    np.save(tmp_path / "x.npy", exported.images[:2])
    (tmp_path / "art.json").write_text(json.dumps(art.to_dict()))
    code = (
        "import json, sys, numpy as np\n"
        "import fixres_deploy.backends.onnxruntime_backend, fixres_deploy.backends.tensorrt_backend\n"
        "import fixres_deploy.backends.cuda_utils, fixres_deploy.backends.base\n"
        "from fixres_deploy.backends import load_runner\n"
        f"art = json.load(open({str(tmp_path / 'art.json')!r}))\n"
        "with load_runner(art) as r:\n"
        f"    y = r.predict(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'y': y.tolist()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["torch"] is False
    _assert_close(np.asarray(doc["y"], dtype=np.float32), torch_logits(exported.model, exported.images[:2]))


def test_torch_backend_reference(exported, tmp_path):
    from fixres_deploy.backends.torch_backend import TorchRunner
    from fixres_deploy.models.registry import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "m.pt", exported.model, spec="fixres:tiny_resnet", num_classes=10)
    with pytest.raises(UserInputError, match="checkpoint"):
        build_engine("torch", exported.onnx, ShapeSpec.fixed(1, RES), out_dir=str(tmp_path))
    with pytest.raises(UserInputError, match="fp32 or fp16"):
        build_engine(
            "torch",
            exported.onnx,
            ShapeSpec.fixed(1, RES),
            BuildOptions(extra={"checkpoint": ckpt}),
            out_dir=str(tmp_path),
            precision="int8",
        )
    art = build_engine(
        "torch",
        exported.onnx,
        ShapeSpec.resolution_bands([64, 96], max_batch=8),
        BuildOptions(extra={"checkpoint": ckpt}),
        out_dir=str(tmp_path),
    )
    assert art.path == ckpt and art.meta["model"] == "fixres:tiny_resnet"
    ref = torch_logits(exported.model, exported.images)
    with load_runner(art) as runner:
        _assert_close(runner.predict(exported.images), ref)
        with pytest.raises(ShapeError):
            runner.predict(_resize(exported.images[:1], 128))
    # fp16 on a copy: the user's module stays fp32.
    with TorchRunner(exported.model, half=True) as runner:
        y16 = runner.predict(exported.images)
    assert next(exported.model.parameters()).dtype.is_floating_point
    assert str(next(exported.model.parameters()).dtype) == "torch.float32"
    assert y16.dtype == np.float32 and (y16.argmax(1) == ref.argmax(1)).mean() >= 0.75
    assert np.abs(y16 - ref).max() / np.abs(ref).max() < 0.05


def test_tensorrt_precision_checks_on_real_graphs(exported, tmp_path):
    """The TensorRT backend's graph inspection and refusals (no TensorRT needed)."""
    from fixres_deploy.backends.tensorrt_backend import check_precision_request, graph_precision

    carried = graph_precision(exported.onnx)
    assert carried == {"qdq": False, "fp16": False}
    check_precision_request("fp32", carried, legacy_fp16_flag=False, onnx_path=exported.onnx)
    with pytest.raises(UserInputError, match="explicit"):
        check_precision_request("int8", carried, legacy_fp16_flag=False, onnx_path=exported.onnx)
    with pytest.raises(UserInputError, match="strongly typed"):
        check_precision_request("fp16", carried, legacy_fp16_flag=False, onnx_path=exported.onnx)
    check_precision_request("fp16", carried, legacy_fp16_flag=True, onnx_path=exported.onnx)
    precision = pytest.importorskip("fixres_deploy.precision.variants")
    fp16 = precision.make_precision_variant(exported.onnx, "fp16", str(tmp_path / "m16.onnx"))
    carried16 = graph_precision(fp16.path)
    assert carried16["fp16"] and not carried16["qdq"]
    with pytest.raises(UserInputError, match="fp32 was requested"):
        check_precision_request("fp32", carried16, legacy_fp16_flag=False, onnx_path=fp16.path)


# --------------------------------------------------------------------------- GPU


def _ort_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _cuda_device_available() -> bool:
    try:
        from fixres_deploy.backends.cuda_utils import ensure_device, import_cudart

        ensure_device(import_cudart())
        return True
    except (FixResError, ImportError):
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _ort_cuda_available(), reason="onnxruntime-gpu with CUDAExecutionProvider not installed")
def test_ort_cuda_io_binding_matches_torch(exported, tmp_path):
    art = build_engine(
        "onnxruntime",
        exported.onnx,
        ShapeSpec.resolution_bands([64, 96], max_batch=8),
        BuildOptions(providers=["CUDAExecutionProvider", "CPUExecutionProvider"]),
        out_dir=str(tmp_path),
    )
    assert art.error is None, art.error
    with load_runner(art) as runner:
        assert runner.io_binding
        y = runner.predict(exported.images)
    ref = torch_logits(exported.model, exported.images)
    assert (y.argmax(1) == ref.argmax(1)).all() and np.abs(y - ref).max() / np.abs(ref).max() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_device_available(), reason="no CUDA device (cuda-python could not see one)")
def test_tensorrt_engine_matches_torch(exported, tmp_path):
    pytest.importorskip("tensorrt")
    shapes = ShapeSpec.resolution_bands([48, 64, 96], max_batch=8, bands=2)
    art = build_engine(
        "tensorrt",
        exported.onnx,
        shapes,
        BuildOptions(timing_cache=str(tmp_path / "t.cache")),
        out_dir=str(tmp_path),
        name="trt",
    )
    assert art.error is None, art.error
    assert os.path.getsize(art.meta["layers_json"]) > 0 and os.path.getsize(tmp_path / "t.cache") > 0
    ref = torch_logits(exported.model, exported.images)
    for graph in (False, True):
        with load_runner(art, cuda_graph=graph) as runner:
            for r in (48, 64, 96):
                x = _resize(exported.images, r)
                y = runner.predict(x)
                yr = torch_logits(exported.model, x)
                assert (y.argmax(1) == yr.argmax(1)).mean() >= 0.875
            with pytest.raises(ShapeError, match="profile"):
                runner.predict(_resize(exported.images[:1], 128))
    assert ref.shape == (8, 10)


def test_gpu_check_script_runs_on_cpu(tmp_path):
    """tools/gpu_check.py (the prepared one-shot GPU script) runs its CPU parts here."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "gpu_check.py")
    env = {**os.environ, "OUT": str(tmp_path), "FIXRES_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not doc["errors"], doc["errors"]
    ort_rows = [r for r in doc["rows"] if r["engine"] == "ort-cpu-fp32"]
    assert {(r["resolution"], r["batch"]) for r in ort_rows} == {(32, 1), (32, 2), (48, 1), (48, 2)}
    assert all(r["top1_agree"] == 1.0 and r["max_rel_err"] < 1e-4 and r["p50_ms"] > 0 for r in ort_rows)
    if not doc["env"]["torch_cuda"]:
        assert "torch-cuda" in doc["skipped"] and "ort-cpu-fp32" in out.stdout
