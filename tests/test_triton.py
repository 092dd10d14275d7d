"""Triton model repository export: config.pbtxt content for dynamic- and fixed-batch engines,
the model file loadable by ONNX Runtime, labels, and the CLI."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from fixres_deploy.backends.base import EngineArtifact, ShapeProfile, ShapeSpec
from fixres_deploy.cli.app import main
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig
from fixres_deploy.models.registry import build_model
from fixres_deploy.ship.bundle import make_bundle
from fixres_deploy.ship.manifest import load_manifest
from fixres_deploy.ship.triton import export_triton_repository

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CLASSES = [f"label {i}" for i in range(7)]  # spaces: labels.txt is one name per line
RES = 64


# --------------------------------------------------------------------------- a pbtxt reader


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format, the subset Triton configs use: fields, messages, lists, comments.

    Repeated fields (``input [...]`` or a field given twice) become lists.
    """
    token_re = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"#]+')
    tokens = [t for t in token_re.findall(text) if t.strip() and not t.startswith("#")]
    assert "".join(tokens).replace(" ", "") == re.sub(r"#[^\n]*|\s+", "", text), "untokenizable text"
    pos = 0

    def value(tok):
        if tok.startswith('"'):
            return json.loads(tok)
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        if re.fullmatch(r"-?\d+\.\d*", tok):
            return float(tok)
        return tok  # an enum name

    def message(end):
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            if tokens[pos] == "{":
                pos += 1
                v = message("}")
                pos += 1
            elif tokens[pos] == "[":
                pos += 1
                v = []
                while tokens[pos] != "]":
                    if tokens[pos] == "{":
                        pos += 1
                        v.append(message("}"))
                        pos += 1
                    elif tokens[pos] != ",":
                        v.append(value(tokens[pos]))
                        pos += 1
                    else:
                        pos += 1
                pos += 1
            else:
                v = value(tokens[pos])
                pos += 1
            if key in out:
                out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [v]
            else:
                out[key] = v
        return out

    return message(None)


def test_parser_reads_a_handwritten_config():
    cfg = parse_pbtxt(
        'name: "m"  # c\nmax_batch_size: 8\ninput [ { name: "x" dims: [ 3, -1 ] } ]\n'
        'parameters { key: "a" value: { string_value: "{\\"k\\": 1}" } }\n'
        'parameters { key: "b" value: { string_value: "2" } }\n'
    )
    assert cfg["name"] == "m" and cfg["max_batch_size"] == 8 and cfg["input"][0]["dims"] == [3, -1]
    assert json.loads(cfg["parameters"][0]["value"]["string_value"]) == {"k": 1}
    assert cfg["parameters"][1]["key"] == "b"


# --------------------------------------------------------------------------- bundles


def _export(path, *, batch=None, dynamic_hw=False):
    torch.manual_seed(0)
    model, _, _ = build_model("fixres:tiny_resnet", len(CLASSES))
    model.eval()
    dyn = None
    if not batch:
        dyn = {"input": {0: "batch", 2: "h", 3: "w"} if dynamic_hw else {0: "batch"}, "logits": {0: "batch"}}
    torch.onnx.export(
        model,
        torch.randn(batch or 2, 3, RES, RES),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes=dyn,
        opset_version=17,
    )
    return str(path)


def _bundle(tmp_path, name, shapes, *, batch=None, dynamic_hw=False, backend="onnxruntime", meta=None):
    src = _export(tmp_path / f"{name}.onnx", batch=batch, dynamic_hw=dynamic_hw)
    path = src
    if backend == "tensorrt":
        path = str(tmp_path / f"{name}.plan")
        open(path, "wb").write(os.urandom(2048))  # copied byte for byte; never run here
    art = EngineArtifact(
        backend=backend,
        precision="fp16" if backend == "tensorrt" else "fp32",
        path=path,
        source_onnx=src,
        shapes=shapes,
        meta=meta or {},
    )
    cfg = PreprocessConfig(test_input_size=RES, crop_pct=0.9, interpolation="bicubic", resize_mode="height")
    out = tmp_path / name
    make_bundle(out, engines=[art], onnx_sources=[], preprocess=cfg, class_names=CLASSES, model={}, metrics={})
    return str(out)


def _profile(min_b, opt_b, max_b, lo=RES, hi=RES, opt=RES):
    return ShapeProfile((min_b, 3, lo, lo), (opt_b, 3, opt, opt), (max_b, 3, hi, hi))


def test_dynamic_batch_onnx_config(tmp_path):
    b = _bundle(tmp_path, "dyn", ShapeSpec.dynamic([_profile(1, 4, 16)]))
    repo = tmp_path / "repo"
    target = export_triton_repository(b, repo, instance_count=2, max_queue_delay_us=250)
    assert target == str(repo / "dyn")
    assert sorted(os.listdir(target)) == ["1", "config.pbtxt", "labels.txt"]
    assert os.listdir(os.path.join(target, "1")) == ["model.onnx"]
    cfg = parse_pbtxt(open(os.path.join(target, "config.pbtxt")).read())
    assert cfg["name"] == "dyn" and cfg["platform"] == "onnxruntime_onnx"
    assert cfg["max_batch_size"] == 16  # the profile max
    (inp,) = cfg["input"]
    assert inp == {"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [3, RES, RES]}
    (out,) = cfg["output"]
    assert out == {"name": "logits", "data_type": "TYPE_FP32", "dims": [len(CLASSES)], "label_filename": "labels.txt"}
    assert cfg["dynamic_batching"] == {"preferred_batch_size": [4], "max_queue_delay_microseconds": 250}
    assert cfg["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    params = {p["key"]: p["value"]["string_value"] for p in cfg["parameters"]}
    manifest = load_manifest(b)
    assert json.loads(params["fixres_deploy.core.preprocess"]) == manifest.preprocess
    assert params["fixres_deploy.manifest_digest"] == manifest.digest
    assert open(os.path.join(target, "labels.txt")).read().splitlines() == CLASSES
    # the model file is the bundle's engine and runs with the config's shapes
    import onnxruntime as ort

    sess = ort.InferenceSession(os.path.join(target, "1", "model.onnx"), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(os.path.join(b, manifest.primary.file), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 3, RES, RES)).astype(np.float32)
    y = sess.run(["logits"], {"input": x})[0]
    assert y.shape == (5, len(CLASSES))
    np.testing.assert_array_equal(y, ref.run(["logits"], {"input": x})[0])
    # options: smaller max batch, explicit preferred sizes, no batcher
    t2 = export_triton_repository(b, repo, model_name="dyn_small", max_batch_size=8, preferred_batch_sizes=[2, 8])
    c2 = parse_pbtxt(open(os.path.join(t2, "config.pbtxt")).read())
    assert c2["max_batch_size"] == 8 and c2["dynamic_batching"]["preferred_batch_size"] == [2, 8]
    t3 = export_triton_repository(b, repo, model_name="dyn_nobatcher", dynamic_batching=False)
    assert "dynamic_batching" not in parse_pbtxt(open(os.path.join(t3, "config.pbtxt")).read())
    with pytest.raises(UserInputError, match="outside the engine's batch range"):
        export_triton_repository(b, repo, model_name="x", max_batch_size=32)
    with pytest.raises(UserInputError, match="outside 1..max_batch_size"):
        export_triton_repository(b, repo, model_name="x", preferred_batch_sizes=[64])
    with pytest.raises(UserInputError, match="already exists"):
        export_triton_repository(b, repo)
    assert sorted(os.listdir(repo)) == ["dyn", "dyn_nobatcher", "dyn_small"]  # nothing half-written


def test_dynamic_hw_dims(tmp_path):
    b = _bundle(tmp_path, "hw", ShapeSpec.dynamic([_profile(1, 1, 8, lo=48, hi=96, opt=RES)]), dynamic_hw=True)
    target = export_triton_repository(b, tmp_path / "repo")
    cfg = parse_pbtxt(open(os.path.join(target, "config.pbtxt")).read())
    assert cfg["input"][0]["dims"] == [3, -1, -1] and cfg["max_batch_size"] == 8
    assert cfg["dynamic_batching"] == {"max_queue_delay_microseconds": 100}  # opt batch 1: no preference
    import onnxruntime as ort

    sess = ort.InferenceSession(os.path.join(target, "1", "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((2, 3, 96, 96), np.float32)})[0].shape == (2, len(CLASSES))


def test_fixed_batch_onnx_config(tmp_path):
    b = _bundle(tmp_path, "fixed", ShapeSpec.fixed(4, RES), batch=4)
    target = export_triton_repository(b, tmp_path / "repo")
    cfg = parse_pbtxt(open(os.path.join(target, "config.pbtxt")).read())
    assert cfg["max_batch_size"] == 0
    assert cfg["input"][0]["dims"] == [4, 3, RES, RES]
    assert cfg["output"][0]["dims"] == [4, len(CLASSES)]
    assert "dynamic_batching" not in cfg
    with pytest.raises(UserInputError, match="max_batch_size 0"):
        export_triton_repository(b, tmp_path / "repo", model_name="f2", max_batch_size=4)
    import onnxruntime as ort

    sess = ort.InferenceSession(os.path.join(target, "1", "model.onnx"), providers=["CPUExecutionProvider"])
    assert [d for d in sess.get_inputs()[0].shape] == cfg["input"][0]["dims"]


def test_tensorrt_plan_config(tmp_path):
    meta = {"tensorrt_version": "10.16.0", "gpu": {"name": "NVIDIA L4", "compute_capability": "8.9"}}
    b = _bundle(tmp_path, "trt", ShapeSpec.dynamic([_profile(1, 8, 32)]), backend="tensorrt", meta=meta)
    target = export_triton_repository(b, tmp_path / "repo")  # integrity checked; runnable here or not
    assert os.listdir(os.path.join(target, "1")) == ["model.plan"]
    assert (
        open(os.path.join(target, "1", "model.plan"), "rb").read()
        == open(os.path.join(b, load_manifest(b).primary.file), "rb").read()
    )
    text = open(os.path.join(target, "config.pbtxt")).read()
    assert "TensorRT 10.16.0 for NVIDIA L4" in text
    cfg = parse_pbtxt(text)
    assert cfg["platform"] == "tensorrt_plan" and cfg["max_batch_size"] == 32
    assert cfg["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [8]
    with pytest.raises(UserInputError, match="KIND_GPU"):
        export_triton_repository(b, tmp_path / "repo", model_name="t2", kind="KIND_CPU")
    # a tampered bundle is not exported
    plan = os.path.join(b, load_manifest(b).primary.file)
    open(plan, "ab").write(b"x")
    with pytest.raises(UserInputError, match="sha256|size"):
        export_triton_repository(b, tmp_path / "repo", model_name="t3")


def test_triton_cli(tmp_path, capsys):
    b = _bundle(tmp_path, "cli", ShapeSpec.dynamic([_profile(1, 4, 16)]))
    rc = main(
        [
            "triton",
            "--bundle",
            b,
            "--out",
            str(tmp_path / "repo"),
            "--model-name",
            "fixres_cls",
            "--max-batch-size",
            "8",
            "--preferred-batch-sizes",
            "4,8",
            "--kind",
            "KIND_GPU",
            "--json",
        ]
    )
    assert rc == 0
    target = json.loads(capsys.readouterr().out)["model_dir"]
    cfg = parse_pbtxt(open(os.path.join(target, "config.pbtxt")).read())
    assert cfg["name"] == "fixres_cls" and cfg["max_batch_size"] == 8
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert cfg["instance_group"][0]["kind"] == "KIND_GPU"
    assert main(["triton", "--bundle", b, "--out", str(tmp_path / "repo"), "--model-name", "fixres_cls"]) == 2
    assert "already exists" in capsys.readouterr().err
