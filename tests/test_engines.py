"""The shared engine routine: `build` and the sweep make the same bytes from the same inputs.

A real sweep (tiny model, demo images, ONNX Runtime) and a real `build_engines` on the ONNX the
sweep exported, with the same calibration images: every precision variant and every engine
must have the same sha256. Also the routine's decisions (int8 flavor by backend and device,
the legacy fp16 route, the TensorRT Q/DQ refusal) on real graphs.
"""

from __future__ import annotations

import os

import pytest

from fixres_deploy.backends.base import BuildOptions, ShapeSpec
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.utils import sha256_file
from fixres_deploy.engines.engine import build_verified_engine, make_variant, variant_recipe

FAST_LATENCY = {
    "warmup_iters": 1,
    "warmup_s": 0.0,
    "min_iters": 2,
    "max_iters": 4,
    "budget_s": 0.01,
    "repeats": 1,
    "remeasure_if_contended": 0,
    "check_load": False,
}


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FIXRES_CACHE_DIR", str(tmp_path / "calibration_cache"))


@pytest.fixture(scope="module")
def swept(tmp_path_factory, demo_small):
    import torch

    from fixres_deploy.models.registry import build_model, save_checkpoint
    from fixres_deploy.sweep.sweep import SweepConfig, run_sweep

    root = tmp_path_factory.mktemp("engines")
    torch.manual_seed(0)
    model, _, _ = build_model("fixres:tiny_resnet", 10)
    ckpt = save_checkpoint(
        root / "base.pt",
        model,
        spec="fixres:tiny_resnet",
        num_classes=10,
        class_names=sorted(os.listdir(f"{demo_small}/train")),
        preprocess={"test_input_size": 64, "train_input_size": 64},
    )
    n_train = sum(len(files) for _, _, files in os.walk(f"{demo_small}/train"))
    cfg = SweepConfig(
        checkpoint=str(ckpt),
        train_data=f"{demo_small}/train",
        eval_data=f"{demo_small}/val",
        resolutions=[64],
        precisions=["fp32", "fp16", "int8"],
        backends=["onnxruntime"],
        batch_sizes=[2],
        shape_modes=["fixed"],
        finetune=[False],
        calibration_size=n_train,  # every training image, as `build --calibration-data` takes them
        exporter="torchscript",
        eval_limit=10,
        latency=FAST_LATENCY,
        store=str(root / "store"),
    )
    return run_sweep(cfg, root / "sweep"), root


def test_build_and_sweep_make_identical_variants_and_engines(swept, demo_small):
    from fixres_deploy.engines.build import build_engines

    result, root = swept
    points = {p.precision: p for p in result.points}
    assert set(points) == {"fp32", "fp16", "int8"} and not [p for p in result.points if p.error]
    exported = points["fp32"].onnx_path  # fp32 engines are built from the export itself
    index = build_engines(
        exported,
        backends=["onnxruntime"],
        precisions=["fp32", "fp16", "int8"],
        resolutions=[64],
        batch_sizes=[2],
        calibration_data=f"{demo_small}/train",
        out_dir=root / "build",
    )
    assert not index.failed
    for precision, point in points.items():
        (entry,) = index.find(backend="onnxruntime", precision=precision)
        built = index.engine_artifacts()[index.artifacts.index(entry)]
        # the graph the engine was built from: same bytes
        if precision == "fp32":
            assert entry["quant"] is None and point.quant == {}
        else:
            assert sha256_file(point.onnx_path) == entry["quant"]["variant_sha256"], precision
        # the engine itself: same bytes, same recorded hash
        assert sha256_file(point.engine["path"]) == sha256_file(built.path), precision
        assert point.engine["sha256"] == built.sha256
    # ONNX Runtime on this CPU: u8 activations, s8 weights (not TensorRT's symmetric s8)
    assert points["int8"].quant["flavor"] == index.find(precision="int8")[0]["quant"]["flavor"] == "u8s8"


def test_recipe_follows_backend_device_and_legacy_flag():
    assert variant_recipe("onnxruntime", "fp32", None).route == "source"
    assert variant_recipe("torch", "int8", 64).route == "source"
    assert variant_recipe("onnxruntime", "int8", 64).flavor == "ort_cpu"
    assert variant_recipe("tensorrt", "int8", 64).flavor == "tensorrt"
    gpu = BuildOptions(providers=["CUDAExecutionProvider"])
    assert variant_recipe("onnxruntime", "int8", 64, options=gpu).flavor == "tensorrt"
    assert variant_recipe("onnxruntime", "int8", 64, int8_flavor="tensorrt").flavor == "tensorrt"
    legacy = BuildOptions(legacy_fp16_flag=True)
    assert variant_recipe("tensorrt", "fp16", None, options=legacy).route == "legacy_fp16"
    assert variant_recipe("onnxruntime", "fp16", None, options=legacy).route == "variant"


def test_tensorrt_refuses_an_ort_cpu_qdq_graph(swept, demo_small, tmp_path):
    """A u8-activation Q/DQ graph is refused for TensorRT before any build (no TensorRT needed)."""
    from fixres_deploy.core.preprocess import PreprocessConfig

    result, _ = swept
    exported = next(p.onnx_path for p in result.points if p.precision == "fp32")
    recipe = variant_recipe("onnxruntime", "int8", 64)
    info = make_variant(
        exported,
        recipe,
        tmp_path,
        calibration_data=f"{demo_small}/train",
        preprocess=PreprocessConfig(64),
        calibration_limit=20,
    )
    with pytest.raises(UserInputError, match="not TensorRT-compatible"):
        build_verified_engine("tensorrt", info["variant_path"], "int8", ShapeSpec.fixed(1, 64), out_dir=tmp_path)
