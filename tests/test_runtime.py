"""The torch-free runtime: same answers as the torch model fed torchvision's transform, engine
shapes respected (fixed-batch padding), unreadable images reported, no torch imported, and
the `fixres-deploy predict` output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fixres_deploy.backends.base import EngineArtifact, ShapeProfile, ShapeSpec
from fixres_deploy.cli.app import main
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig, eval_transform
from fixres_deploy.data.folders import index_image_folder, load_rgb
from fixres_deploy.models.registry import load_model
from fixres_deploy.ship.bundle import make_bundle
from fixres_deploy.ship.manifest import BundleError
from fixres_deploy.ship.runtime import Classifier, predict_bundle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _bundle(model, class_names, cfg, out, *, batch=None, max_batch=16, tar=False):
    """Export ``model`` at cfg's resolution (dynamic batch, or fixed ``batch``) and bundle it."""
    k = cfg.test_input_size
    os.makedirs(os.path.dirname(out), exist_ok=True)
    onnx_path = f"{out}_src_r{k}_b{batch or 'dyn'}.onnx"
    x = torch.randn(batch or 2, 3, k, k)
    dyn = None if batch else {"input": {0: "batch"}, "logits": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            model,
            x,
            onnx_path,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=dyn,
            opset_version=17,
        )
    shapes = (
        ShapeSpec.fixed(batch, k)
        if batch
        else ShapeSpec.dynamic([ShapeProfile((1, 3, k, k), (8, 3, k, k), (max_batch, 3, k, k))])
    )
    art = EngineArtifact(backend="onnxruntime", precision="fp32", path=onnx_path, source_onnx=onnx_path, shapes=shapes)
    make_bundle(
        out,
        engines=[art],
        onnx_sources=[],
        preprocess=cfg,
        class_names=class_names,
        model={"spec": "fixres:tiny_resnet"},
        metrics={},
        tar=tar,
    )
    return str(out)


@pytest.fixture(scope="module")
def trained(demo_trained):
    loaded = load_model(None, None, demo_trained["checkpoint"])
    val = index_image_folder(demo_trained["val"])
    return loaded, val


@pytest.fixture(scope="module")
def base_cfg(trained):
    loaded, _ = trained
    return PreprocessConfig.from_dict(loaded.preprocess)


@pytest.fixture(scope="module")
def dyn_bundle(trained, base_cfg, tmp_path_factory):
    loaded, val = trained
    return _bundle(loaded.model, val.classes, base_cfg, str(tmp_path_factory.mktemp("rt") / "dyn"), tar=True)


def _torch_reference(model, cfg, paths):
    tf = eval_transform(cfg)
    x = torch.stack([tf(load_rgb(p)) for p in paths])
    with torch.no_grad():
        logits = model(x)
    return x.numpy(), torch.softmax(logits, 1).numpy()


@pytest.mark.parametrize("variant", ["checkpoint", "other"])
def test_runtime_matches_torch_on_real_images(trained, base_cfg, tmp_path, variant):
    loaded, val = trained
    cfg = base_cfg
    if variant == "other":  # resolution, crop, filter and resize mode all off the defaults
        cfg = PreprocessConfig(
            test_input_size=80,
            train_input_size=base_cfg.test_input_size,
            crop_pct=0.75,
            interpolation="bicubic",
            resize_mode="height",
        )
        assert cfg.to_dict() != base_cfg.to_dict()
    paths = [s.path for s in val.samples]
    labels = np.array([s.label for s in val.samples])
    assert len(paths) >= 200
    b = _bundle(loaded.model, val.classes, cfg, str(tmp_path / "b"))
    x_ref, p_ref = _torch_reference(loaded.model, cfg, paths)
    with Classifier(b) as clf:
        assert clf.preprocess == cfg
        x_rt = np.stack([clf.prepare(p) for p in paths])
        preds = clf.classify_paths(paths, top_k=2)
    assert x_rt.shape == x_ref.shape == (len(paths), 3, cfg.test_input_size, cfg.test_input_size)
    assert np.abs(x_rt - x_ref).max() < 1e-5
    idx_rt = np.array([p.index for p in preds])
    agreement = (idx_rt == p_ref.argmax(1)).mean()
    assert agreement >= 0.995, agreement
    assert len(set(idx_rt.tolist())) >= 5  # not a constant predictor: the agreement means something
    assert (idx_rt == labels).mean() > 0.2  # a trained model (chance: 0.1)
    scores = np.array([p.score for p in preds])
    np.testing.assert_allclose(scores, p_ref.max(1), atol=1e-4)
    assert all(p.path == q for p, q in zip(preds, paths))
    assert all(
        p.label == val.classes[p.index] and len(p.top_k) == 2 and p.top_k[0]["score"] >= p.top_k[1]["score"]
        for p in preds
    )


def test_fixed_batch_engine_is_padded(trained, base_cfg, dyn_bundle, tmp_path):
    loaded, val = trained
    paths = [s.path for s in val.samples[::40]][:6]
    assert len(paths) == 6
    b = _bundle(loaded.model, val.classes, base_cfg, str(tmp_path / "fixed4"), batch=4)
    shapes = []
    with Classifier(b) as clf:
        assert (clf.min_batch, clf.max_batch) == (4, 4)
        real_predict = clf.runner.predict
        clf.runner.predict = lambda x: (shapes.append(x.shape), real_predict(x))[1]
        preds = clf.classify_paths(paths, batch_size=3)  # a fixed engine ignores the request
        with pytest.raises(Exception):  # the engine itself takes exactly 4
            real_predict(np.zeros((2, 3, 64, 64), np.float32))
    assert [s[0] for s in shapes] == [4, 4]
    assert len(preds) == 6
    _, p_ref = _torch_reference(loaded.model, base_cfg, paths)
    assert [p.index for p in preds] == p_ref.argmax(1).tolist()
    np.testing.assert_allclose([p.score for p in preds], p_ref.max(1), atol=1e-4)
    with Classifier(dyn_bundle) as clf:
        shapes.clear()
        real_predict = clf.runner.predict
        clf.runner.predict = lambda x: (shapes.append(x.shape), real_predict(x))[1]
        dyn = clf.classify_paths(paths, batch_size=4)
        assert [s[0] for s in shapes] == [4, 2]  # dynamic: no padding, batches up to the request
        big = clf.classify_paths(paths * 5, batch_size=1000)  # clamped to the profile max (16)
        assert max(s[0] for s in shapes[2:]) == 16
    assert [p.index for p in dyn] == [p.index for p in preds]
    assert [p.index for p in big] == [p.index for p in preds] * 5


def test_unreadable_images_are_reported_not_fatal(trained, dyn_bundle, tmp_path):
    _, val = trained
    good = [val.samples[0].path, val.samples[-1].path]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(good[0], "rb").read()[:300])
    missing = str(tmp_path / "missing.png")
    with Classifier(dyn_bundle) as clf:
        alone = clf.classify_paths(good)
        preds = clf.classify_paths([good[0], str(broken), str(truncated), missing, good[1]])
    assert len(preds) == 5
    for p, name in zip(preds[1:4], ["broken.jpg", "truncated.jpg", "missing.png"]):
        assert not p.ok and name in p.error and p.label is None and p.score is None
    assert [preds[0].index, preds[4].index] == [a.index for a in alone]
    assert preds[0].score == pytest.approx(alone[0].score, abs=1e-6)
    # all unreadable: still one entry each
    with Classifier(dyn_bundle) as clf:
        assert [p.ok for p in clf.classify_paths([str(broken), missing])] == [False, False]


def test_classify_images_pil_and_arrays(trained, dyn_bundle):
    _, val = trained
    paths = [s.path for s in val.samples[:5]]
    pils = [load_rgb(p) for p in paths]
    arrays = [np.asarray(im) for im in pils]
    with Classifier(dyn_bundle) as clf:
        by_path = clf.classify_paths(paths, top_k=3)
        by_pil = clf.classify_images(pils, top_k=3)
        by_arr = clf.classify_images(arrays, top_k=3, names=[f"a{i}" for i in range(5)])
        gray = clf.classify_images([np.asarray(pils[0].convert("L"))])
        with pytest.raises(UserInputError, match="uint8"):
            clf.classify_images([arrays[0].astype(np.float32)])
        with pytest.raises(UserInputError, match="classify_paths"):
            clf.classify_images(paths[:1])
    assert [p.top_k for p in by_path] == [p.top_k for p in by_pil] == [p.top_k for p in by_arr]
    assert by_pil[0].path == "<image 0>" and by_arr[2].path == "a2"
    assert gray[0].ok


def test_tar_bundle_and_context_manager(dyn_bundle, trained):
    _, val = trained
    with Classifier(dyn_bundle + ".tar.gz") as clf:
        tmp_root = clf.bundle_dir
        assert os.path.isfile(os.path.join(tmp_root, "manifest.json"))
        p = clf.classify_paths([val.samples[0].path])[0]
        assert clf.runner.is_active
    assert not clf.runner.is_active and not os.path.exists(tmp_root)
    assert p.ok
    with pytest.raises(BundleError, match="no 'tensorrt' engine"):
        Classifier(dyn_bundle, backend="tensorrt")


_NO_TORCH = "import sys, json\nsys.modules['torch'] = None\nsys.modules['torchvision'] = None\n"


def test_runtime_imports_and_runs_without_torch(dyn_bundle, trained):
    _, val = trained
    paths = [s.path for s in val.samples[::50]]
    script = _NO_TORCH + (
        "from fixres_deploy.ship.runtime import predict_bundle\n"
        "preds = predict_bundle(sys.argv[1], sys.argv[2:], top_k=2)\n"
        "loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('torch', 'torchvision'))\n"
        "print(json.dumps({'loaded': loaded, 'preds': [p.to_dict() for p in preds]}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, dyn_bundle, *paths],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FIXRES_NO_PROGRESS": "1"},
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    here = predict_bundle(dyn_bundle, paths, top_k=2)
    assert [p["index"] for p in out["preds"]] == [p.index for p in here]
    assert [p["score"] for p in out["preds"]] == pytest.approx([p.score for p in here], abs=1e-6)


def test_predict_cli_lines(dyn_bundle, trained, tmp_path):
    _, val = trained
    folder = tmp_path / "imgs"
    folder.mkdir()
    for s in val.samples[:3]:
        (folder / os.path.basename(s.path)).write_bytes(open(s.path, "rb").read())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    single = val.samples[-1].path
    # through the real CLI, in a process where torch cannot be imported
    script = _NO_TORCH + "from fixres_deploy.cli.app import main\nsys.exit(main(sys.argv[1:]))\n"
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "predict",
            "--bundle",
            dyn_bundle,
            single,
            str(folder),
            str(broken),
            "--top-k",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stderr  # one image could not be read
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert len(rows) == 5
    assert rows[0]["path"] == single and [r["path"] for r in rows[1:4]] == sorted(str(p) for p in folder.iterdir())
    for r in rows[:4]:
        assert set(r) == {"path", "label", "index", "score", "top_k"}
        assert r["label"] == val.classes[r["index"]] and 0 < r["score"] <= 1
        assert len(r["top_k"]) == 3 and r["top_k"][0]["score"] >= r["top_k"][2]["score"]
        assert r["top_k"][0]["label"] == r["label"]
    assert rows[4]["path"] == str(broken) and "broken.png" in rows[4]["error"]
    ref = predict_bundle(dyn_bundle, [single])[0]
    assert rows[0]["index"] == ref.index and rows[0]["score"] == pytest.approx(ref.score, abs=1e-5)


def test_predict_cli_in_process(dyn_bundle, trained, capsys):
    _, val = trained
    assert main(["predict", "--bundle", dyn_bundle, val.samples[0].path]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and set(rows[0]) == {"path", "label", "index", "score"}
