"""`build_engines` / `fixres-deploy build`: every backend × precision × shape, failures recorded.

Real builds with ONNX Runtime on an exported tiny model (BatchNorm statistics from real demo
images so that its outputs vary), real fp16 / int8 precision variants with calibration on
demo images, and TensorRT as the failing backend (not installed here: its builds must be
recorded with their error while the others succeed).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import spread_model, torch_logits

from fixres_deploy.backends import BuildOptions, load_runner
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.utils import sha256_file
from fixres_deploy.engines.build import BuildIndex, build_engines

RES = 64


def _tensorrt_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def model_onnx(demo_small, tmp_path_factory):
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.export.onnx_export import export_onnx
    from fixres_deploy.precision.calibration import calibration_batches

    root = tmp_path_factory.mktemp("build")
    cfg = PreprocessConfig(RES)
    images = calibration_batches(os.path.join(demo_small, "val"), cfg, limit=40)
    model = spread_model(images[:32])
    res = export_onnx(model, root / "model.onnx", cfg, dynamic=True, exporter="torchscript", tolerance=None)
    return SimpleNamespace(
        model=model,
        onnx=res.path,
        images=np.ascontiguousarray(images[32:40]),
        calib=os.path.join(demo_small, "train"),
        root=root,
    )


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FIXRES_CACHE_DIR", str(tmp_path / "calibration_cache"))


def _check_entry_files(entry: dict, out_dir: str) -> str:
    path = entry["path"] if os.path.isabs(entry["path"]) else os.path.join(out_dir, entry["path"])
    assert entry["sha256"] == sha256_file(path) and entry["size_bytes"] == os.path.getsize(path)
    assert entry["build_s"] > 0 and entry["error"] is None and entry["error_type"] is None
    return path


def test_fp32_fixed_and_dynamic_index(model_onnx, tmp_path):
    fixed = build_engines(
        model_onnx.onnx,
        backends=["onnxruntime"],
        precisions=["fp32"],
        resolutions=[96, 64],
        batch_sizes=[1, 4],
        options=BuildOptions(threads=1),
        out_dir=str(tmp_path / "fixed"),
    )
    assert [(a["resolution"], a["batch"]) for a in fixed.artifacts] == [(64, 1), (64, 4), (96, 1), (96, 4)]
    assert all(a["shape_mode"] == "fixed" and a["profiles"] is None and a["quant"] is None for a in fixed.artifacts)
    for a in fixed.artifacts:
        _check_entry_files(a, fixed.out_dir)
        assert not os.path.isabs(a["path"])  # inside the build folder: stored relative, folder can move
        assert a["source_onnx"] == os.path.abspath(model_onnx.onnx)
    assert fixed.source_sha256 == sha256_file(model_onnx.onnx) and fixed.preprocess["test_input_size"] == RES

    # index.json round trip; runners from the reloaded index match torch.
    loaded = BuildIndex.load(tmp_path / "fixed")
    assert loaded.to_dict() == {**fixed.to_dict(), "out_dir": os.path.abspath(fixed.out_dir)}
    art = next(a for a in loaded.engine_artifacts() if a.shapes.profiles[0].opt == (4, 3, 64, 64))
    with load_runner(art) as runner:
        y = runner.predict(model_onnx.images[:4])
    ref = torch_logits(model_onnx.model, model_onnx.images[:4])
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-4

    dyn = build_engines(
        model_onnx.onnx,
        backends=["onnxruntime"],
        precisions=["fp32"],
        resolutions=[48, 64, 96, 128],
        dynamic=True,
        bands=2,
        max_batch=4,
        options=BuildOptions(threads=1),
        out_dir=str(tmp_path / "dyn"),
    )
    (entry,) = dyn.artifacts
    _check_entry_files(entry, dyn.out_dir)
    assert entry["shape_mode"] == "dynamic" and entry["resolution"] is None
    assert [(p["min"][2], p["max"][2], p["max"][0]) for p in entry["profiles"]] == [(48, 64, 4), (96, 128, 4)]
    assert dyn.find(resolution=80) == [] and dyn.find(resolution=96) == [entry]
    # What consumers (bench, bundle) do with index.json: keep the EngineArtifact fields of an
    # entry and resolve relative paths against the index's folder.
    from fixres_deploy.backends.base import EngineArtifact

    raw = json.loads((tmp_path / "dyn" / "index.json").read_text())["artifacts"][0]
    fields = {k: v for k, v in raw.items() if k in EngineArtifact.__dataclass_fields__}
    fields["path"] = os.path.join(tmp_path / "dyn", fields["path"])
    with load_runner(fields) as runner:
        for r in (48, 128):
            x = np.ascontiguousarray(np.resize(model_onnx.images[:2], (2, 3, r, r)))
            ref = torch_logits(model_onnx.model, x)
            assert np.abs(runner.predict(x) - ref).max() / np.abs(ref).max() < 1e-4


def test_fp16_int8_variants_and_failing_backend(model_onnx, tmp_path):
    from fixres_deploy.precision.variants import INT8_FLAVORS, default_int8_flavor

    out = tmp_path / "b"
    index = build_engines(
        model_onnx.onnx,
        backends=["onnxruntime", "tensorrt"],
        precisions=["fp16", "int8"],
        resolutions=[RES],
        batch_sizes=[8],
        calibration_data=model_onnx.calib,
        calibration_limit=24,
        options=BuildOptions(threads=1),
        out_dir=str(out),
    )
    by_name = {a["name"]: a for a in index.artifacts}
    assert set(by_name) == {f"{b}_{p}_r64_b8" for b in ("onnxruntime", "tensorrt") for p in ("fp16", "int8")}
    ort16, ort8 = by_name["onnxruntime_fp16_r64_b8"], by_name["onnxruntime_int8_r64_b8"]
    for a in (ort16, ort8):
        _check_entry_files(a, index.out_dir)
    if not _tensorrt_installed():
        for p in ("fp16", "int8"):
            t = by_name[f"tensorrt_{p}_r64_b8"]
            assert t["path"] is None and t["error_type"] == "MissingDependencyError"
            assert "fixres-deploy[gpu-cu12]" in t["error"] and t["error"].startswith("MissingDependencyError")
    assert len(index.ok) == 2 or _tensorrt_installed()

    # The variants: fp16 graph and int8 Q/DQ, each with path + sha256; the engines reference them.
    variants = {v["precision"]: v for v in index.variants}
    assert set(variants) == {"fp16", "int8"} and not any(v.get("error") for v in index.variants)
    for v in variants.values():
        vpath = os.path.join(index.out_dir, v["variant_path"])
        assert v["variant_sha256"] == sha256_file(vpath)
    q = ort8["quant"]
    assert (
        q["variant_path"] == variants["int8"]["variant_path"]
        and q["variant_sha256"] == variants["int8"]["variant_sha256"]
    )
    assert q["flavor"] == INT8_FLAVORS[default_int8_flavor("onnxruntime")]
    assert q["calibration_resolution"] == RES and q["calibration_images"] == 24
    assert ort16["quant"]["variant_path"] == variants["fp16"]["variant_path"]
    import onnx

    ops = {n.op_type for n in onnx.load(os.path.join(index.out_dir, ort8["path"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    # The engines compute: fp16 close to torch, int8 still the same function.
    ref = torch_logits(model_onnx.model, model_onnx.images)
    arts = {a.precision: a for a in index.engine_artifacts() if a.backend == "onnxruntime"}
    with load_runner(arts["fp16"]) as runner:
        y16 = runner.predict(model_onnx.images)
    with load_runner(arts["int8"]) as runner:
        y8 = runner.predict(model_onnx.images)
    assert np.abs(y16 - ref).max() / np.abs(ref).max() < 0.02
    cos8 = (y8 * ref).sum(1) / (np.linalg.norm(y8, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos8.min() > 0.9 and not np.allclose(y8, ref, rtol=0, atol=1e-6)  # quantized, yet faithful


def test_dynamic_int8_calibrates_at_the_opt_resolution(model_onnx, tmp_path):
    index = build_engines(
        model_onnx.onnx,
        backends=["onnxruntime"],
        precisions=["int8"],
        resolutions=[48, 64, 96],
        dynamic=True,
        max_batch=2,
        calibration_data=model_onnx.calib,
        calibration_limit=8,
        options=BuildOptions(threads=1, save_optimized=False),
        out_dir=str(tmp_path),
    )
    (entry,) = index.artifacts
    assert entry["error"] is None
    q = entry["quant"]
    assert entry["profiles"][0]["opt"][2] == 64 and q["calibration_resolution"] == 64
    assert "opt resolution 64" in q["calibration_note"]
    assert q["calibration"]["resolution"] == 64  # what precision.py saw: images at 64 px
    with load_runner(index.engine_artifacts()[0]) as runner:
        for r in (48, 96):
            assert runner.predict(np.zeros((2, 3, r, r), np.float32)).shape == (2, 10)


def test_failed_variant_is_recorded_and_others_go_on(model_onnx, tmp_path):
    empty = tmp_path / "no_images" / "cls"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    index = build_engines(
        model_onnx.onnx,
        backends=["onnxruntime"],
        precisions=["fp32", "int8"],
        resolutions=[RES],
        calibration_data=str(tmp_path / "no_images"),
        options=BuildOptions(threads=1),
        out_dir=str(tmp_path / "out"),
    )
    fp32, int8 = index.artifacts
    assert fp32["error"] is None and os.path.isfile(os.path.join(index.out_dir, fp32["path"]))
    assert int8["error"] and int8["path"] is None and int8["error_type"] in int8["error"]
    (v,) = index.variants
    assert v["precision"] == "int8" and v["error"] == int8["error"]
    saved = json.loads((tmp_path / "out" / "index.json").read_text())
    assert saved["artifacts"][1]["error"] == int8["error"]


def test_request_errors(model_onnx, tmp_path):
    common = dict(resolutions=[RES], out_dir=str(tmp_path))
    with pytest.raises(UserInputError, match="unknown backend"):
        build_engines(model_onnx.onnx, backends=["openvino"], precisions=["fp32"], **common)
    with pytest.raises(UserInputError, match="unknown precision"):
        build_engines(model_onnx.onnx, backends=["onnxruntime"], precisions=["int4"], **common)
    with pytest.raises(UserInputError, match="does not exist"):
        build_engines(str(tmp_path / "nope.onnx"), backends=["onnxruntime"], precisions=["fp32"], **common)
    with pytest.raises(UserInputError, match="calibration-data"):
        build_engines(model_onnx.onnx, backends=["onnxruntime"], precisions=["int8"], **common)
    # A fixed-shape export asked for other shapes: refused before anything is built.
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.export.onnx_export import export_onnx

    fixed = export_onnx(
        model_onnx.model, tmp_path / "fixed.onnx", PreprocessConfig(RES), exporter="torchscript", tolerance=None
    ).path
    with pytest.raises(UserInputError, match="--dynamic"):
        build_engines(
            fixed, backends=["onnxruntime"], precisions=["fp32"], resolutions=[RES, 96], out_dir=str(tmp_path)
        )
    with pytest.raises(UserInputError, match="--dynamic"):
        build_engines(
            fixed, backends=["onnxruntime"], precisions=["fp32"], resolutions=[RES], dynamic=True, out_dir=str(tmp_path)
        )
    ok = build_engines(
        fixed, backends=["onnxruntime"], precisions=["fp32"], resolutions=[RES], out_dir=str(tmp_path / "ok")
    )
    assert ok.artifacts[0]["error"] is None and ok.artifacts[0]["meta"]["fixed_shape_copy"] is False
    # An ONNX without the preprocessing metadata cannot be calibrated like deployment images.
    import onnx

    proto = onnx.load(model_onnx.onnx)
    del proto.metadata_props[:]
    bare = str(tmp_path / "bare.onnx")
    onnx.save(proto, bare)
    with pytest.raises(UserInputError, match="records no preprocessing"):
        build_engines(bare, backends=["onnxruntime"], precisions=["int8"], calibration_data=model_onnx.calib, **common)
    assert not os.path.exists(tmp_path / "index.json")


def test_cli_contract(model_onnx, tmp_path, capsys):
    from fixres_deploy.cli.app import main

    out = tmp_path / "cli"
    rc = main(
        [
            "build",
            "--onnx",
            model_onnx.onnx,
            "--backend",
            "onnxruntime,tensorrt",
            "--precision",
            "fp32",
            "--resolutions",
            "48,64",
            "--threads",
            "1",
            "--out",
            str(out),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert rc == 0
    assert [a["name"] for a in doc["artifacts"]] == [
        "onnxruntime_fp32_r48_b1",
        "onnxruntime_fp32_r64_b1",
        "tensorrt_fp32_r48_b1",
        "tensorrt_fp32_r64_b1",
    ]
    assert doc["artifacts"][0]["meta"]["threads"] == 1
    assert json.loads((out / "index.json").read_text())["artifacts"] == doc["artifacts"]
    if not _tensorrt_installed():
        rc = main(
            [
                "build",
                "--onnx",
                model_onnx.onnx,
                "--backend",
                "tensorrt",
                "--precision",
                "fp32,fp16",
                "--resolutions",
                "64",
                "--dynamic",
                "--out",
                str(tmp_path / "trt"),
            ]
        )
        captured = capsys.readouterr()
        assert rc == 1
        assert "tensorrt_fp32_dynamic" in captured.err and "fixres-deploy[gpu-cu12]" in captured.err
        assert "0/2 engines built" in captured.out
    rc = main(
        ["build", "--onnx", model_onnx.onnx, "--precision", "int8", "--resolutions", "64", "--out", str(tmp_path / "x")]
    )
    assert rc == 2 and "--calibration-data" in capsys.readouterr().err
