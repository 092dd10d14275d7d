"""ONNX export: fixed/dynamic shapes, metadata, single file, validation on real images, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from fixres_deploy.core.errors import UserInputError  # noqa: E402
from fixres_deploy.core.preprocess import PreprocessConfig, resolve_preprocess  # noqa: E402
from fixres_deploy.export.onnx_export import (  # noqa: E402
    META_CLASS_NAMES,
    META_MODEL,
    META_PREPROCESS,
    ExportError,
    ExportResult,
    ExportValidationError,
    export_onnx,
    read_onnx_metadata,
    read_onnx_preprocess,
    validate_onnx,
    validation_batches,
)

FIVE_RES = [48, 64, 80, 96, 128]


@pytest.fixture(scope="module")
def trained(demo_trained):
    from fixres_deploy.models.registry import load_model

    loaded = load_model(None, checkpoint=demo_trained["checkpoint"])
    cfg = resolve_preprocess(loaded.preprocess, test_input_size=64)
    return loaded, cfg, demo_trained["val"]


@pytest.fixture(scope="module")
def dynamic_export(trained, tmp_path_factory):
    loaded, cfg, val = trained
    path = tmp_path_factory.mktemp("export") / "tiny_dyn.onnx"
    result = export_onnx(
        loaded.model,
        path,
        cfg,
        dynamic=True,
        validation_images=val,
        validate_resolutions=FIVE_RES,
        class_names=loaded.class_names,
        model_spec=loaded.spec,
    )
    return result


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_dynamic_dynamo_export_matches_torch_at_five_resolutions(trained, dynamic_export):
    loaded, cfg, val = trained
    r = dynamic_export
    assert r.exporter == "dynamo" and r.dynamic and r.batch_size is None
    assert r.input_shape == ["batch", 3, "height", "width"]
    assert r.validation["passed"] and r.validate_resolutions == FIVE_RES
    kinds = {(run["resolution"], run["kind"]) for run in r.validation["runs"]}
    assert kinds == {(k, kind) for k in FIVE_RES for kind in ("full", "batch1")}

    # Independent check: ORT vs torch on other real images at every resolution.
    sess = _session(r.path)
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    assert sess.get_outputs()[0].shape == ["batch", 10]
    from fixres_deploy.data.folders import index_image_folder

    index = index_image_folder(val, classes=loaded.class_names)
    imgs = index.subset(index.samples[::30][:12])
    batches = validation_batches(imgs, cfg, FIVE_RES, n=12)
    for k, x in batches.items():
        got = sess.run(["logits"], {"input": x})[0]
        with torch.inference_mode():
            ref = loaded.model(torch.from_numpy(x)).numpy()
        assert got.shape == ref.shape == (12, 10)
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        assert rel < 1e-4, (k, rel)
        assert cos.min() > 0.99999, (k, cos.min())
        assert (got.argmax(1) == ref.argmax(1)).all(), k
        # a trained model: predictions vary with the input (not a constant argmax)
        assert len(set(ref.argmax(1).tolist())) > 1


def test_metadata_single_file_and_sidecar(trained, dynamic_export):
    loaded, cfg, _ = trained
    r = dynamic_export
    meta = read_onnx_metadata(r.path)
    assert read_onnx_preprocess(r.path) == cfg
    assert json.loads(meta[META_PREPROCESS])["resize_size"] == cfg.resize_size
    assert json.loads(meta[META_CLASS_NAMES]) == loaded.class_names
    assert meta[META_MODEL] == loaded.spec
    folder = os.path.dirname(r.path)
    assert not [f for f in os.listdir(folder) if f.endswith(".data") or f.endswith(".tmp")]
    proto = onnx.load(r.path, load_external_data=False)
    from onnx.external_data_helper import uses_external_data

    assert not any(uses_external_data(t) for t in proto.graph.initializer)
    side = json.loads(open(r.path + ".json").read())
    assert ExportResult.from_dict(side) == r
    assert r.size_bytes == os.path.getsize(r.path) and len(r.sha256) == 64
    assert r.preprocess_config == cfg


def test_corrupted_weights_fail_validation_at_every_resolution(trained, dynamic_export, tmp_path):
    loaded, cfg, val = trained
    proto = onnx.load(dynamic_export.path)
    from onnx import numpy_helper

    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    init = next(t for t in proto.graph.initializer if t.name == gemm.input[1])
    w = numpy_helper.to_array(init).copy()
    w[0] += 0.2 * np.abs(w).max()
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, bad)

    batches = validation_batches(val, cfg, [48, 64, 96])
    with pytest.raises(ExportValidationError) as err:
        validate_onnx(bad, loaded.model, batches)
    report = err.value.report
    assert not report.passed
    failed_res = {run["resolution"] for run in report.runs if not run["ok"]}
    assert failed_res == {48, 64, 96}
    assert all(any(f"@{k} px" in m for m in report.mismatches) for k in (48, 64, 96))
    msg = str(err.value)
    assert "largest difference" in msg and "tolerance" in msg
    assert f"{report.max_abs_diff:.3g}" in msg

    with pytest.raises(ExportValidationError, match="graph outputs are"):
        validate_onnx(dynamic_export.path, loaded.model, batches, output_name="probs")


def test_fixed_export_torchscript_and_wrong_resolution(trained, tmp_path):
    loaded, cfg, val = trained
    r = export_onnx(
        loaded.model, tmp_path / "fixed.onnx", cfg, batch_size=3, exporter="torchscript", validation_images=val
    )
    assert r.exporter == "torchscript" and r.input_shape == [3, 3, 64, 64] and r.batch_size == 3
    assert r.validation["passed"] and r.validation["runs"][0]["images"] == 8
    sess = _session(r.path)
    with pytest.raises(Exception, match="(?i)invalid dimensions"):
        sess.run(None, {"input": np.zeros((3, 3, 96, 96), np.float32)})
    with pytest.raises(UserInputError, match="--dynamic"):
        export_onnx(loaded.model, tmp_path / "f2.onnx", cfg, validate_resolutions=[64, 96])
    with pytest.raises(UserInputError, match="fixed input of 64x64"):
        validate_onnx(r.path, loaded.model, validation_batches(val, cfg, [96]))


@pytest.mark.parametrize("spec", ["torchvision:mobilenet_v3_small", "torchvision:resnet18"])
def test_torchvision_structures_export(spec, tmp_path):
    """Random-init structure checks (no accuracy claims): shapes, dynamic axes, values relative to scale."""
    from fixres_deploy.models.registry import build_model

    model, _, _ = build_model(spec, 10)
    cfg = PreprocessConfig(64)
    fixed = export_onnx(model, tmp_path / "fixed.onnx", cfg, exporter="dynamo" if "resnet" in spec else "torchscript")
    assert fixed.input_shape == [1, 3, 64, 64] and fixed.validation["passed"]
    if "resnet" in spec:
        return
    dyn = export_onnx(model, tmp_path / "dyn.onnx", cfg, dynamic=True, validate_resolutions=[32, 64, 96])
    assert dyn.exporter == "dynamo" and dyn.input_shape == ["batch", 3, "height", "width"]
    sess = _session(dyn.path)
    for k, n in ((32, 1), (64, 3), (96, 2), (128, 2), (160, 1)):
        x = validation_batches(None, cfg, [k], n=n)[k]
        got = sess.run(None, {"input": x})[0]
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        # random-init MobileNet logits are ~1e-9: compare relative to their scale
        assert got.shape == (n, 10)
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


class _NoTorchExport(torch.nn.Module):
    """A model that refuses torch.export (like code using unsupported ops) but traces fine."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        if torch.compiler.is_exporting():
            raise NotImplementedError("this block has no torch.export support")
        return self.fc(self.conv(x).mean((2, 3)))


def test_dynamo_failure_is_explained_and_auto_falls_back(tmp_path):
    cfg = PreprocessConfig(32)
    with pytest.raises(ExportError, match="--exporter torchscript") as err:
        export_onnx(_NoTorchExport(), tmp_path / "m.onnx", cfg)
    assert "no torch.export support" in str(err.value)
    assert not (tmp_path / "m.onnx").exists()
    r = export_onnx(_NoTorchExport(), tmp_path / "m.onnx", cfg, exporter="auto")
    assert r.exporter == "torchscript" and "no torch.export support" in r.fallback_reason
    assert r.validation["passed"]


def test_cli_export_contract(trained, demo_trained, tmp_path, capsys):
    from fixres_deploy.cli.app import main
    from fixres_deploy.models.registry import build_model

    loaded, cfg, val = trained
    out = tmp_path / "model.onnx"
    rc = main(
        [
            "export",
            "--checkpoint",
            demo_trained["checkpoint"],
            "--resolution",
            "80",
            "--dynamic",
            "--exporter",
            "torchscript",
            "--validate-resolutions",
            "64,80",
            "--validation-data",
            val,
            "--out",
            str(out),
            "--json",
        ]
    )
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["path"] == str(out) and d["dynamic"] and d["resolution"] == 80
    assert d["validate_resolutions"] == [64, 80] and d["validation"]["passed"]
    assert d["class_names"] == loaded.class_names and d["model_spec"] == "fixres:tiny_resnet"
    assert read_onnx_preprocess(out) == cfg.at_resolution(80)  # the checkpoint's preprocessing, at 80
    assert json.loads(open(str(out) + ".json").read()) == d

    # a plain state dict with the README's torchvision contract (fixed, dynamo)
    model, _, _ = build_model("torchvision:resnet18", 10)
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd)
    rc = main(
        [
            "export",
            "--model",
            "torchvision:resnet18",
            "--num-classes",
            "10",
            "--checkpoint",
            str(sd),
            "--resolution",
            "64",
            "--out",
            str(tmp_path / "r18.onnx"),
            "--input-name",
            "images",
            "--output-name",
            "scores",
            "--json",
        ]
    )
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["exporter"] == "dynamo" and d["input_shape"] == [1, 3, 64, 64]
    assert [i.name for i in _session(d["path"]).get_inputs()] == ["images"]

    # bad inputs: one-line errors, exit 2
    rc = main(
        [
            "export",
            "--model",
            "fixres:tiny_resnet",
            "--checkpoint",
            str(tmp_path / "missing.pt"),
            "--resolution",
            "64",
            "--out",
            str(tmp_path / "x.onnx"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pt" in err
    rc = main(
        [
            "export",
            "--checkpoint",
            demo_trained["checkpoint"],
            "--resolution",
            "64",
            "--validate-resolutions",
            "64,96",
            "--out",
            str(tmp_path / "y.onnx"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--dynamic" in err and "96" in err
    assert not (tmp_path / "y.onnx").exists()
