"""Multi-resolution export: one head-bank graph equals every FixRes checkpoint at its resolution."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import fixres_checkpoints, torch_logits

pytest.importorskip("onnxruntime")

RES = (48, 64, 80)


@pytest.fixture(scope="module")
def checkpoints(demo_trained, tmp_path_factory):
    return fixres_checkpoints(demo_trained, tmp_path_factory.mktemp("fixres_ck"), RES)


@pytest.fixture(scope="module")
def exported(checkpoints, demo_trained, tmp_path_factory):
    from fixres_deploy.export.multires import export_multires

    path = tmp_path_factory.mktemp("mr") / "multires.onnx"
    result, fset = export_multires(checkpoints, path, validation_data=demo_trained["val"])
    return result, fset


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def test_head_bank_equals_each_checkpoint_at_its_resolution(exported, demo_trained):
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.export.onnx_export import validation_batches

    result, fset = exported
    assert result.validation["passed"]
    assert sorted({r["resolution"] for r in result.validation["runs"]}) == list(RES)
    from fixres_deploy.export.onnx_export import read_onnx_metadata

    assert json.loads(read_onnx_metadata(result.path)["fixres_deploy.multires"])["resolutions"] == list(RES)
    session = _session(result.path)
    assert [i.name for i in session.get_inputs()] == ["input"]  # one input: the head follows the height
    cfg = PreprocessConfig.from_dict(result.preprocess)
    batches = validation_batches(demo_trained["val"], cfg, RES, n=8)
    for i, r in enumerate(RES):
        got = session.run(None, {"input": batches[r]})[0]
        own = torch_logits(fset.models[i].model, batches[r])
        np.testing.assert_allclose(got, own, rtol=1e-4, atol=1e-4)
        # the heads really differ: another checkpoint's head would not pass this comparison
        other = torch_logits(fset.models[(i + 1) % len(RES)].model, batches[r])
        assert np.abs(other - own).max() > 1e-3


def test_between_resolutions_the_nearest_head_runs(exported, demo_trained):
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.export.onnx_export import validation_batches

    result, fset = exported
    cfg = PreprocessConfig.from_dict(result.preprocess)
    x = validation_batches(demo_trained["val"], cfg, [52], n=4)[52]  # nearest: 48
    got = _session(result.path).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, torch_logits(fset.models[0].model, x), rtol=1e-4, atol=1e-4)


def test_only_fixres_modules_are_banked(exported):
    _, fset = exported
    assert fset.resolutions == list(RES)
    assert fset.head_names == ["fc"]
    assert fset.bn_names and all("layer4" in n for n in fset.bn_names)


def test_validation_error_states_largest_difference(exported, demo_trained):
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.export.onnx_export import ExportValidationError, validate_onnx, validation_batches

    result, fset = exported
    cfg = PreprocessConfig.from_dict(result.preprocess)
    batches = validation_batches(demo_trained["val"], cfg, [RES[0]], n=4)
    wrong = {RES[0]: fset.models[2].model}  # the 80 px checkpoint compared at 48 px
    with pytest.raises(ExportValidationError, match="largest difference .* at 48 px; tolerance") as err:
        validate_onnx(result.path, wrong, batches)
    assert not err.value.report.passed


def test_checkpoints_with_different_trunks_are_refused(checkpoints, tmp_path):
    import torch

    from fixres_deploy.export.multires import TrunkMismatchError, load_fixres_set

    payload = torch.load(checkpoints[1], weights_only=True)
    payload["state_dict"]["layer1.0.conv1.weight"] = payload["state_dict"]["layer1.0.conv1.weight"] + 0.5
    bad = tmp_path / "other_trunk.pt"
    torch.save(payload, bad)
    with pytest.raises(TrunkMismatchError, match=r"layer1\.0\.conv1\.weight \(max diff 0\.5\)"):
        load_fixres_set([checkpoints[0], str(bad)])


def test_checkpoint_sets_that_cannot_share_a_bank_are_refused(checkpoints, tmp_path):
    from fixres_deploy.core.errors import UserInputError
    from fixres_deploy.export.multires import load_fixres_set

    with pytest.raises(UserInputError, match=">= 2 resolutions"):
        load_fixres_set(checkpoints[:1])
    with pytest.raises(UserInputError, match="same resolution"):
        load_fixres_set([checkpoints[0], checkpoints[0]])
    with pytest.raises(UserInputError, match="does not exist"):
        load_fixres_set([checkpoints[0], str(tmp_path / "missing.pt")])


def test_int8_calibrated_on_a_mix_of_resolutions(exported, demo_trained, tmp_path):
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.export.onnx_export import validation_batches
    from fixres_deploy.precision.calibration import calibration_batches
    from fixres_deploy.precision.variants import make_precision_variant

    result, _ = exported
    cfg = PreprocessConfig.from_dict(result.preprocess)
    mix = [calibration_batches(demo_trained["train"], cfg.at_resolution(r), limit=16) for r in (RES[0], RES[-1])]
    v = make_precision_variant(
        result.path, "int8", tmp_path / "mr.int8.onnx", calibration_batches=mix, flavor="ort_cpu", cache=False
    )
    assert v.calibration["resolution"] == [RES[0], RES[-1]]
    assert v.calibration["n_images"] == sum(len(m) for m in mix)
    fp32, int8 = _session(result.path), _session(v.path)
    for r in RES:
        x = validation_batches(demo_trained["val"], cfg, [r], n=16)[r]
        a, b = fp32.run(None, {"input": x})[0], int8.run(None, {"input": x})[0]
        assert np.isfinite(b).all()
        assert (a.argmax(1) == b.argmax(1)).mean() >= 0.75


def test_bundle_records_resolutions_accuracy_and_latency_table(checkpoints, demo_trained, tmp_path):
    from fixres_deploy.cli.app import main
    from fixres_deploy.ship.manifest import BundleError, load_manifest, read_manifest
    from fixres_deploy.ship.verify import verify_bundle

    bundle = tmp_path / "bundle"
    rc = main(
        [
            "export-multires", "--checkpoints", *checkpoints, "--bundle", str(bundle),
            "--validation-data", demo_trained["val"], "--val-data", demo_trained["val"],
            "--max-batch", "8", "--batch-sizes", "1,4,8", "--repeats", "2", "--threads", "1",
            "--triton", str(tmp_path / "triton"),
        ]
    )  # fmt: skip
    assert rc == 0
    verify_bundle(str(bundle)).raise_if_failed()
    m = load_manifest(bundle)
    mr = m.multires
    assert mr.resolutions == list(RES)
    assert [a["resolution"] for a in mr.accuracy] == list(RES)
    assert all(0.0 <= a["top1"] <= 1.0 and a["n"] > 0 for a in mr.accuracy)
    assert max(a["top1"] for a in mr.accuracy) >= 0.6  # the demo model is accurate at its resolutions
    assert mr.latency["batch_sizes"] == [1, 4, 8]
    assert len(mr.latency["service_ms"]) == len(RES) and all(len(row) == 3 for row in mr.latency["service_ms"])
    assert all(row == sorted(row) and row[0] > 0 for row in mr.latency["service_ms"])
    assert mr.latency["machine_key"] and mr.latency["machine"]["cores"]
    profile = m.primary.shapes.profiles[0]
    assert profile.min[2] == RES[0] and profile.max[2] == RES[-1] and len(m.primary.shapes.profiles) == 1
    config = (tmp_path / "triton" / "bundle" / "config.pbtxt").read_text()
    assert "fixres_deploy.multires" in config and "client" in config

    # the section has one reader: a table without a row per resolution is refused
    d = json.loads((bundle / "manifest.json").read_text())
    d["multires"]["latency"]["service_ms"] = d["multires"]["latency"]["service_ms"][:1]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(d))
    with pytest.raises(BundleError, match="one row per resolution"):
        read_manifest(broken)
