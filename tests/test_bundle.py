"""Production bundle: manifest content and round trip, tamper and incompatibility refusal,
safe archive extraction, and `fixres-deploy bundle` from a build index."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
import types

import numpy as np
import pytest
import torch

from fixres_deploy.backends.base import EngineArtifact, ShapeProfile, ShapeSpec
from fixres_deploy.cli.app import main
from fixres_deploy.core import env
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig
from fixres_deploy.core.utils import sha256_file, write_json
from fixres_deploy.engines.build import BuildIndex
from fixres_deploy.models.registry import build_model, fixres_record
from fixres_deploy.ship.archive import extract_bundle
from fixres_deploy.ship.bundle import make_bundle
from fixres_deploy.ship.manifest import BundleError, BundleManifest, load_manifest
from fixres_deploy.ship.verify import verify_bundle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CLASSES = [f"class_{i}" for i in range(10)]
RES = 64
# as backends/tensorrt_backend.build_impl writes it
TRT_META = {"tensorrt_version": "10.16.0", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}}


def export_onnx(path, *, res=RES, batch=None, num_classes=10, seed=0, metadata=None):
    """A random-init tiny_resnet exported with the TorchScript exporter (dynamic batch unless ``batch``)."""
    torch.manual_seed(seed)
    model, _, _ = build_model("fixres:tiny_resnet", num_classes)
    model.eval()
    x = torch.randn(batch or 2, 3, res, res)
    dyn = None if batch else {"input": {0: "batch"}, "logits": {0: "batch"}}
    torch.onnx.export(
        model,
        x,
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes=dyn,
        opset_version=17,
    )
    if metadata:
        import onnx

        m = onnx.load(str(path))
        for k, v in metadata.items():
            p = m.metadata_props.add()
            p.key, p.value = k, v
        onnx.save(m, str(path))
    return str(path)


def ort_artifact(onnx_path, *, batch=None, max_batch=8):
    shapes = (
        ShapeSpec.fixed(batch, RES)
        if batch
        else ShapeSpec.dynamic([ShapeProfile((1, 3, RES, RES), (4, 3, RES, RES), (max_batch, 3, RES, RES))])
    )
    return EngineArtifact(
        backend="onnxruntime",
        precision="fp32",
        path=onnx_path,
        source_onnx=onnx_path,
        shapes=shapes,
        sha256=sha256_file(onnx_path),
        size_bytes=os.path.getsize(onnx_path),
        meta={"onnxruntime_version": "1.32.0"},
    )


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    return export_onnx(tmp_path_factory.mktemp("onnx") / "tiny_r64_fp32.onnx")


@pytest.fixture(scope="module")
def cfg():
    return PreprocessConfig(
        test_input_size=RES, train_input_size=48, crop_pct=0.8, interpolation="bicubic", resize_mode="height"
    )


@pytest.fixture
def good_bundle(tmp_path, onnx_file, cfg):
    out = tmp_path / "bundle"
    manifest = make_bundle(
        out,
        engines=[ort_artifact(onnx_file)],
        onnx_sources=[],
        preprocess=cfg,
        class_names=CLASSES,
        model={"spec": "fixres:tiny_resnet", "finetuned_resolution": RES},
        metrics={"top1": 0.9, "latency_p50_ms": 1.5},
        selection={"rule": "fastest within 1pt"},
        tar=True,
    )
    return str(out), manifest


def test_manifest_content_and_round_trip(good_bundle, onnx_file, cfg):
    out, manifest = good_bundle
    d = json.load(open(os.path.join(out, "manifest.json")))
    assert d["format"] == "fixres-deploy/bundle" and d["schema_version"] == 3 and d["multires"] is None
    assert d["preprocess"] == cfg.to_dict()  # the EXACT preprocessing, derived fields included
    assert d["resolution"] == RES and d["precision"] == "fp32" and d["backend"] == "onnxruntime"
    assert d["shape_mode"] == "dynamic" and d["profiles"][0]["max"] == [8, 3, RES, RES]
    assert d["input_name"] == "input" and d["output_name"] == "logits"
    assert d["class_names"] == CLASSES and d["num_classes"] == 10
    assert d["metrics"]["top1"] == 0.9 and d["selection"]["rule"].startswith("fastest")
    # libraries by module, each named by the distribution that provides it
    assert set(d["libraries"]) >= {"fixres_deploy", "onnxruntime", "onnx", "numpy", "PIL"}
    assert d["libraries"]["PIL"]["distribution"].lower() == "pillow" and d["hardware"] is None
    assert d["libraries"]["fixres_deploy"]["distribution"] == "fixres-deploy"
    # the ORT engine IS its source: stored once, referenced by both
    eng = d["engines"][0]
    assert eng["file"] == eng["source_onnx"] == "onnx/tiny_r64_fp32.onnx"
    assert eng["opset"][""] == 17
    # every file hashed, with the right size
    on_disk = sorted(
        os.path.relpath(os.path.join(dp, f), out).replace(os.sep, "/") for dp, _, fs in os.walk(out) for f in fs
    )
    assert sorted([*d["files"], "manifest.json"]) == sorted(on_disk)
    for rel, info in d["files"].items():
        assert info["sha256"] == sha256_file(os.path.join(out, rel))
        assert info["size_bytes"] == os.path.getsize(os.path.join(out, rel))
    assert d["files"]["onnx/tiny_r64_fp32.onnx"]["sha256"] == sha256_file(onnx_file)
    assert open(os.path.join(out, "labels.txt")).read().splitlines() == CLASSES
    # round trips
    loaded = load_manifest(out)
    assert loaded == manifest
    assert BundleManifest.from_dict(json.loads(json.dumps(loaded.to_dict()))) == loaded
    assert loaded.preprocess_config() == cfg
    assert loaded.digest == loaded.compute_digest()
    # no temp folders left beside the bundle
    assert sorted(os.listdir(os.path.dirname(out))) == ["bundle", "bundle.tar.gz"]


def test_verify_ok_and_cli(good_bundle, capsys):
    out, _ = good_bundle
    rep = verify_bundle(out)
    assert rep.ok, rep.problems
    assert rep.backend == "onnxruntime"
    assert main(["bundle", "--verify", out]) == 0
    assert capsys.readouterr().out.startswith("OK")
    assert verify_bundle(out + ".tar.gz").ok
    assert main(["bundle", "--verify", out + ".tar.gz"]) == 0


@pytest.mark.parametrize("module", ["fixres_deploy", "fixres_deploy.cli"])
def test_python_dash_m_runs_every_subcommand(good_bundle, module):
    """`python -m fixres_deploy bundle --verify DIR` once failed with KeyError: 'bundle' (a second module copy)."""
    import subprocess

    out, _ = good_bundle
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, not another install
    env_ = dict(os.environ, PYTHONPATH=repo)
    ok = subprocess.run(
        [sys.executable, "-m", module, "bundle", "--verify", out], capture_output=True, text=True, env=env_
    )
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stderr
    os.unlink(os.path.join(out, "manifest.json"))
    bad = subprocess.run(
        [sys.executable, "-m", module, "bundle", "--verify", out], capture_output=True, text=True, env=env_
    )
    assert bad.returncode != 0 and "manifest.json" in (bad.stdout + bad.stderr) and "Traceback" not in bad.stderr
    helped = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env_)
    from fixres_deploy.cli.app import COMMANDS

    assert helped.returncode == 0 and all(name in helped.stdout for name in COMMANDS)


def _copy(out, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(out, dst)
    return str(dst)


def test_tampered_bundles_refused(good_bundle, tmp_path, capsys):
    from fixres_deploy.ship.runtime import Classifier

    out, _ = good_bundle
    # 1. one flipped byte in the engine
    b1 = _copy(out, tmp_path, "flipped")
    eng = os.path.join(b1, "onnx", "tiny_r64_fp32.onnx")
    data = bytearray(open(eng, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(eng, "wb").write(bytes(data))
    rep = verify_bundle(b1)
    assert not rep.ok and any("onnx/tiny_r64_fp32.onnx: sha256 mismatch" in p for p in rep.problems)
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Classifier(b1)
    assert main(["bundle", "--verify", b1]) == 3
    assert "sha256 mismatch" in capsys.readouterr().out
    # 2. the manifest edited (the preprocessing changed by hand)
    b2 = _copy(out, tmp_path, "edited")
    mp = os.path.join(b2, "manifest.json")
    d = json.load(open(mp))
    d["preprocess"]["interpolation"] = "bilinear"
    json.dump(d, open(mp, "w"))
    rep = verify_bundle(b2)
    assert not rep.ok and any("edited after bundling" in p for p in rep.problems)
    # 3. an unlisted file dropped next to the engine
    b3 = _copy(out, tmp_path, "extra")
    open(os.path.join(b3, "onnx", "other.onnx"), "wb").write(b"\x00" * 10)
    rep = verify_bundle(b3)
    assert not rep.ok and any("onnx/other.onnx: file not listed" in p for p in rep.problems)
    # 4. a listed file removed, 5. labels changed
    b4 = _copy(out, tmp_path, "missing")
    os.remove(os.path.join(b4, "labels.txt"))
    assert any("labels.txt: listed in the manifest but missing" in p for p in verify_bundle(b4).problems)
    # 6. a symlink in place of the engine
    b5 = _copy(out, tmp_path, "symlink")
    os.remove(eng5 := os.path.join(b5, "onnx", "tiny_r64_fp32.onnx"))
    os.symlink(os.path.join(out, "onnx", "tiny_r64_fp32.onnx"), eng5)
    assert any("symlink" in p for p in verify_bundle(b5).problems)
    # 7. a newer format version
    b6 = _copy(out, tmp_path, "newer")
    mp = os.path.join(b6, "manifest.json")
    d = json.load(open(mp))
    d["schema_version"] = 99
    json.dump(d, open(mp, "w"))
    rep = verify_bundle(b6)
    assert not rep.ok and "schema_version 99" in rep.problems[0] and "reads schema_version 3" in rep.problems[0]
    with pytest.raises(BundleError, match="Rebundle"):
        load_manifest(b6)


def test_tampered_archive_refused(good_bundle, tmp_path):
    out, _ = good_bundle
    tar = tmp_path / "tampered.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        for dp, _, fs in os.walk(out):
            for f in fs:
                full = os.path.join(dp, f)
                arc = "bundle/" + os.path.relpath(full, out)
                data = open(full, "rb").read()
                if f == "labels.txt":
                    data = data.replace(b"class_3", b"class_X")
                info = tarfile.TarInfo(arc)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    rep = verify_bundle(str(tar))
    assert not rep.ok and any("labels.txt" in p for p in rep.problems)


def test_incompatible_opset_refused(tmp_path, cfg):
    import onnx

    src = export_onnx(tmp_path / "m.onnx")
    m = onnx.load(src)
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 99  # no onnxruntime knows this opset
    onnx.save(m, src)
    make_bundle(
        tmp_path / "b",
        engines=[ort_artifact(src)],
        onnx_sources=[],
        preprocess=cfg,
        class_names=CLASSES,
        model={},
        metrics={},
    )
    rep = verify_bundle(tmp_path / "b")
    assert not rep.ok
    assert any("onnxruntime" in p and "cannot load" in p and "99" in p for p in rep.problems), rep.problems


def _trt_bundle(tmp_path, onnx_file, cfg, meta=TRT_META):
    tmp_path.mkdir(parents=True, exist_ok=True)
    plan = tmp_path / "tiny_r64_fp16.plan"
    plan.write_bytes(np.random.default_rng(0).bytes(4096))  # a plan's bytes: only its bookkeeping is checked here
    art = EngineArtifact(
        backend="tensorrt",
        precision="fp16",
        path=str(plan),
        source_onnx=onnx_file,
        shapes=ShapeSpec.fixed(4, RES),
        meta=dict(meta),
    )
    out = tmp_path / "trt_bundle"
    make_bundle(
        out,
        engines=[art],
        onnx_sources=[],
        preprocess=cfg,
        class_names=CLASSES,
        model={"spec": "fixres:tiny_resnet"},
        metrics={},
    )
    return str(out)


def test_tensorrt_bundle_refused_here_with_reason(tmp_path, onnx_file, cfg, monkeypatch, capsys):
    from fixres_deploy.ship.runtime import Classifier

    monkeypatch.setattr(env, "current_gpu", lambda: None)  # this machine: no GPU (stated, not probed)
    out = _trt_bundle(tmp_path, onnx_file, cfg)
    m = load_manifest(out)
    assert m.hardware == {
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "tensorrt_version": "10.16.0",
        "hardware_compatibility": "none",
    }
    # libraries: this machine's, by distribution; the plan's own TensorRT is in hardware/requires
    assert m.libraries["onnxruntime"]["distribution"] == "onnxruntime" and "cuda" in m.libraries
    assert m.engines[0].file == "engine/tiny_r64_fp16.plan" and m.engines[0].source_onnx == "onnx/tiny_r64_fp32.onnx"
    rep = verify_bundle(out)
    assert not rep.ok
    text = "\n".join(rep.problems)
    assert "TensorRT engine built for NVIDIA H100 80GB HBM3 (sm_90) cannot be verified/run here" in text
    if "tensorrt" not in sys.modules:
        assert "needs the 'tensorrt' Python package 10.16.0" in text
    with pytest.raises(BundleError, match="sm_90"):
        Classifier(out)
    assert main(["bundle", "--verify", out]) == 3
    assert "sm_90" in capsys.readouterr().out
    # the bundled ONNX source still runs on this machine
    rep = verify_bundle(out, backend="onnxruntime")
    assert rep.ok, rep.problems
    assert any("sm_90" in n for n in rep.notes)
    with Classifier(out, backend="onnxruntime") as clf:
        assert clf.engine.file == "onnx/tiny_r64_fp32.onnx" and clf.max_batch == 4
        preds = clf.classify_images([np.full((70, 90, 3), 120, np.uint8)])
    assert preds[0].ok and preds[0].label in CLASSES


def test_tensorrt_version_and_gpu_comparison(tmp_path, onnx_file, cfg, monkeypatch):
    """The comparison rules, with the installed TensorRT and the GPU stated by the test."""
    out = _trt_bundle(tmp_path, onnx_file, cfg)
    fake_trt = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    monkeypatch.setattr(env, "current_gpu", lambda: h100)
    fake_trt.__version__ = "10.16.1"  # same major.minor: fine
    assert verify_bundle(out).ok
    fake_trt.__version__ = "11.4.0"
    rep = verify_bundle(out)
    assert not rep.ok and "built with TensorRT 10.16.0 but TensorRT 11.4.0 is installed" in rep.problems[0]
    fake_trt.__version__ = "10.16.0"
    monkeypatch.setattr(env, "current_gpu", lambda: {"name": "NVIDIA L4", "compute_capability": "8.9"})
    rep = verify_bundle(out)
    assert not rep.ok and "cannot run on this NVIDIA L4 (sm_89)" in rep.problems[0]
    # an ampere_plus hardware-compatible plan moves to another Ampere+ GPU
    out2 = _trt_bundle(
        tmp_path / "hw", onnx_file, cfg, meta=TRT_META | {"config": {"hardware_compatibility": "ampere_plus"}}
    )
    assert verify_bundle(out2).ok
    monkeypatch.setattr(env, "current_gpu", lambda: {"name": "Tesla T4", "compute_capability": "7.5"})
    assert not verify_bundle(out2).ok


def test_make_bundle_refuses_bad_input(tmp_path, onnx_file, cfg):
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"plan")
    art = EngineArtifact(
        backend="tensorrt",
        precision="fp16",
        path=str(plan),
        source_onnx=onnx_file,
        shapes=ShapeSpec.fixed(1, RES),
        meta={},
    )
    with pytest.raises(UserInputError, match="GPU"):
        make_bundle(
            tmp_path / "a", engines=[art], onnx_sources=[], preprocess=cfg, class_names=CLASSES, model={}, metrics={}
        )
    with pytest.raises(UserInputError, match="outputs 10 classes but 3"):
        make_bundle(
            tmp_path / "b",
            engines=[ort_artifact(onnx_file)],
            onnx_sources=[],
            preprocess=cfg,
            class_names=["a", "b", "c"],
            model={},
            metrics={},
        )
    with pytest.raises(UserInputError, match="does not accept 96x96"):
        make_bundle(
            tmp_path / "c",
            engines=[ort_artifact(onnx_file)],
            onnx_sources=[],
            preprocess=cfg.at_resolution(96),
            class_names=CLASSES,
            model={},
            metrics={},
        )
    # nothing half-written was left behind
    assert sorted(os.listdir(tmp_path)) == ["x.plan"]
    make_bundle(
        tmp_path / "d",
        engines=[ort_artifact(onnx_file)],
        onnx_sources=[],
        preprocess=cfg,
        class_names=CLASSES,
        model={},
        metrics={},
    )
    with pytest.raises(UserInputError, match="already exists"):
        make_bundle(
            tmp_path / "d",
            engines=[ort_artifact(onnx_file)],
            onnx_sources=[],
            preprocess=cfg,
            class_names=CLASSES,
            model={},
            metrics={},
        )
    m = make_bundle(
        tmp_path / "d",
        engines=[ort_artifact(onnx_file)],
        onnx_sources=[],
        preprocess=cfg,
        class_names=CLASSES,
        model={"v": 2},
        metrics={},
        overwrite=True,
    )
    assert load_manifest(tmp_path / "d").model == {"v": 2} == m.model
    assert verify_bundle(tmp_path / "d").ok


# --------------------------------------------------------------------------- safe extraction


def _evil_tar(path, kind):
    with tarfile.open(path, "w:gz") as tf:
        good = tarfile.TarInfo("b/manifest.json")
        good.size = 2
        tf.addfile(good, io.BytesIO(b"{}"))
        if kind == "dotdot":
            info = tarfile.TarInfo("b/../../evil.txt")
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
        elif kind == "absolute":
            info = tarfile.TarInfo(str(path.parent / "abs_evil.txt"))
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
        elif kind == "symlink":
            info = tarfile.TarInfo("b/link")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        elif kind == "hardlink":
            info = tarfile.TarInfo("b/hard")
            info.type = tarfile.LNKTYPE
            info.linkname = "b/manifest.json"
            tf.addfile(info)
        elif kind == "device":
            info = tarfile.TarInfo("b/dev")
            info.type = tarfile.CHRTYPE
            info.devmajor, info.devminor = 1, 3
            tf.addfile(info)


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("dotdot", "'..'"),
        ("absolute", "absolute path"),
        ("symlink", "links are not allowed"),
        ("hardlink", "links are not allowed"),
        ("device", "not a regular file"),
    ],
)
def test_unsafe_archive_refused(tmp_path, kind, reason):
    work = tmp_path / "work"
    work.mkdir()
    tar = work / "evil.tar.gz"
    _evil_tar(tar, kind)
    dest = work / "dest"
    with pytest.raises(BundleError, match=reason):
        extract_bundle(tar, dest)
    assert os.listdir(dest) == []  # nothing extracted, not even the harmless member
    assert sorted(os.listdir(work)) == ["dest", "evil.tar.gz"]  # nothing written beside dest
    assert not (tmp_path / "evil.txt").exists()
    rep = verify_bundle(str(tar))
    assert not rep.ok and reason.strip("'") in rep.problems[0]


def test_extract_good_archive(good_bundle, tmp_path):
    out, _ = good_bundle
    root = extract_bundle(out + ".tar.gz", tmp_path / "x")
    assert os.path.basename(root) == "bundle"
    assert verify_bundle(root).ok
    assert load_manifest(root) == load_manifest(out)


# --------------------------------------------------------------------------- CLI from a build index


def test_cli_bundle_from_index(tmp_path, cfg, capsys):
    from fixres_deploy.models.registry import save_checkpoint

    build = tmp_path / "build"
    (build / "onnx").mkdir(parents=True)
    meta = {
        "fixres_deploy.core.preprocess": cfg.to_json(),
        "fixres_deploy.class_names": json.dumps(CLASSES),
        "fixres_deploy.model": "fixres:tiny_resnet",
    }
    onnx_path = export_onnx(build / "onnx" / "model_r64_fp32.onnx", metadata=meta)
    art = ort_artifact(onnx_path)
    entry = art.to_dict() | {
        "name": "ort-fp32-r64",
        "path": "onnx/model_r64_fp32.onnx",
        "source_onnx": "onnx/model_r64_fp32.onnx",
    }
    failed = {"name": "ort-fp32-failed", "backend": "onnxruntime", "precision": "fp32", "error": "failed"}
    BuildIndex(
        source_onnx=onnx_path, source_sha256=sha256_file(onnx_path), out_dir=str(build), artifacts=[failed, entry]
    ).save()
    torch.manual_seed(0)
    model, _, _ = build_model("fixres:tiny_resnet", 10)
    ck = save_checkpoint(
        tmp_path / "model_r64.pt",
        model,
        spec="fixres:tiny_resnet",
        num_classes=10,
        class_names=CLASSES,
        preprocess=cfg.to_dict(),
        fixres=fixres_record(64, {}),
    )
    write_json(tmp_path / "point.json", {"top1": 0.93, "latency_p50_ms": 2.0})
    out = tmp_path / "ship" / "b1"
    repo = tmp_path / "triton"
    rc = main(
        [
            "bundle",
            "--index",
            str(build / "index.json"),
            "--artifact",
            "ort-fp32-r64",
            "--out",
            str(out),
            "--checkpoint",
            ck,
            "--metrics",
            str(tmp_path / "point.json"),
            "--tar",
            "--triton",
            str(repo),
            "--json",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dir"] == str(out) and os.path.isfile(res["tar"])
    m = load_manifest(out)
    assert m.preprocess == cfg.to_dict() and m.class_names == CLASSES
    assert m.model["checkpoint_sha256"] == sha256_file(ck) and m.model["finetuned_resolution"] == 64
    assert m.model["spec"] == "fixres:tiny_resnet" and m.metrics["top1"] == 0.93
    assert verify_bundle(out).ok and verify_bundle(res["tar"]).ok
    assert os.path.isfile(repo / "b1" / "config.pbtxt") and os.path.isfile(repo / "b1" / "1" / "model.onnx")
    # by position; a failed build is refused with its reason; bad keys are named
    assert main(["bundle", "--index", str(build / "index.json"), "--artifact", "1", "--out", str(tmp_path / "b2")]) == 0
    capsys.readouterr()
    assert main(["bundle", "--index", str(build / "index.json"), "--artifact", "0", "--out", str(tmp_path / "b3")]) == 2
    assert "failed build" in capsys.readouterr().err
    assert (
        main(["bundle", "--index", str(build / "index.json"), "--artifact", "nope", "--out", str(tmp_path / "b4")]) == 2
    )
    assert "ort-fp32-r64" in capsys.readouterr().err


def test_two_engines_primary_and_fallback(tmp_path, onnx_file, cfg, monkeypatch):
    from fixres_deploy.ship.runtime import Classifier

    monkeypatch.setattr(env, "current_gpu", lambda: None)
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"\x01" * 512)
    trt = EngineArtifact(
        backend="tensorrt",
        precision="fp16",
        path=str(plan),
        source_onnx=onnx_file,
        shapes=ShapeSpec.fixed(1, RES),
        meta={"tensorrt_version": "11.4.0", "gpu": {"name": "NVIDIA L4", "compute_capability": "8.9"}},
    )
    m = make_bundle(
        tmp_path / "b",
        engines=[trt, ort_artifact(onnx_file)],
        onnx_sources=[onnx_file],
        preprocess=cfg,
        class_names=CLASSES,
        model={},
        metrics={},
    )
    assert [e.backend for e in m.engines] == ["tensorrt", "onnxruntime"] and m.backend == "tensorrt"
    assert m.onnx_sources == ["onnx/tiny_r64_fp32.onnx"]  # one copy, however many references
    assert m.hardware["gpu_name"] == "NVIDIA L4" and m.hardware["compute_capability"] == "8.9"
    assert not verify_bundle(tmp_path / "b").ok
    rep = verify_bundle(tmp_path / "b", backend="onnxruntime")
    assert rep.ok and rep.engine == "onnx/tiny_r64_fp32.onnx"
    with Classifier(tmp_path / "b", backend="onnxruntime") as clf:
        assert clf.max_batch == 8 and clf.engine.backend == "onnxruntime"
