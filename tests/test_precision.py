"""Precision variants: fp16 with fp32 IO, int8 Q/DQ for TensorRT and ORT CPU, calibration cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import numpy_helper  # noqa: E402

from fixres_deploy.core.errors import UserInputError  # noqa: E402
from fixres_deploy.precision import variants as P  # noqa: E402

# Measured on the demo_trained tiny_resnet at 64 px, 128 calibration (train) + 400 held-out
# (val) images: top-1 drops within ±0.75 pts for both flavors, with or without float layers;
# argmax agreement with fp32 0.94-0.98. The margins below leave room for another trained model.
MAX_DROP_PTS = 5.0
MIN_AGREEMENT = 0.85


@pytest.fixture(scope="module")
def setup(demo_trained, tmp_path_factory):
    from fixres_deploy.core.preprocess import resolve_preprocess
    from fixres_deploy.export.onnx_export import export_onnx
    from fixres_deploy.models.registry import load_model
    from fixres_deploy.precision.calibration import calibration_batches, make_calibration_manifest

    root = tmp_path_factory.mktemp("precision")
    loaded = load_model(None, checkpoint=demo_trained["checkpoint"])
    cfg = resolve_preprocess(loaded.preprocess, test_input_size=64)
    fp32 = export_onnx(loaded.model, root / "fp32.onnx", cfg, dynamic=True, tolerance=None).path
    calib = calibration_batches(demo_trained["train"], cfg, limit=128)
    held = make_calibration_manifest(demo_trained["val"], None, size=400, classes=loaded.class_names)
    eval_x = calibration_batches(held, cfg)
    eval_y = np.array([i["label"] for i in held.images])
    ref = P._run(P._session(fp32), eval_x, 32)
    return {
        "root": root,
        "fp32": fp32,
        "cfg": cfg,
        "calib": calib,
        "x": eval_x,
        "y": eval_y,
        "ref": ref,
        "cache": str(root / "cache"),
    }


def _predict(path, x):
    return P._run(P._session(path), x, 32)


def _consts(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_fp16_runs_with_fp32_io_and_keeps_sensitive_ops(setup):
    from fixres_deploy.export.onnx_export import read_onnx_preprocess

    v = P.convert_fp16(setup["fp32"], setup["root"] / "fp16.onnx")
    assert v.precision == "fp16" and v.converter.startswith("onnxruntime")
    sess = P._session(v.path)
    assert [i.type for i in sess.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)"]
    y = _predict(v.path, setup["x"])
    assert y.dtype == np.float32
    ref = setup["ref"]
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-2
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.98

    m = onnx.load(v.path)
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer) >= 10
    reduce = [n for n in m.graph.node if n.op_type in ("ReduceMean", "GlobalAveragePool")]
    assert reduce and {n.name for n in reduce} <= set(v.float_layers)
    # the pooled reduction really runs in fp32: its input comes from a Cast to float
    producers = {o: n for n in m.graph.node for o in n.output}
    cast = producers[reduce[0].input[0]]
    assert cast.op_type == "Cast" and next(a.i for a in cast.attribute if a.name == "to") == onnx.TensorProto.FLOAT
    assert read_onnx_preprocess(v.path) == setup["cfg"]
    assert json.loads(open(v.path + ".json").read())["sha256"] == v.sha256


@pytest.mark.parametrize("flavor", ["tensorrt", "ort_cpu"])
def test_int8_flavors_accuracy_and_graph_contract(setup, flavor):
    v = P.quantize_int8(
        setup["fp32"], setup["root"] / f"int8_{flavor}.onnx", setup["calib"], flavor=flavor, cache=setup["cache"]
    )
    assert v.precision == "int8" and v.flavor == P.INT8_FLAVORS[flavor]
    from fixres_deploy.export.onnx_export import read_onnx_metadata, read_onnx_preprocess

    assert read_onnx_preprocess(v.path) == setup["cfg"]  # metadata carried over
    assert read_onnx_metadata(v.path)[P.META_INT8_FLAVOR] == v.flavor
    y = _predict(v.path, setup["x"])
    ref, labels = setup["ref"], setup["y"]
    drop_pts = 100 * ((ref.argmax(1) == labels).mean() - (y.argmax(1) == labels).mean())
    assert drop_pts <= MAX_DROP_PTS
    assert (y.argmax(1) == ref.argmax(1)).mean() >= MIN_AGREEMENT

    m = onnx.load(v.path)
    consts = _consts(m)
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) >= 20
    zps = [consts[n.input[2]] for n in qdq]
    assert not any(z.dtype == np.int32 for z in zps)  # no bias Q/DQ
    assert not any(consts[n.input[0]].dtype == np.int32 for n in qdq if n.input[0] in consts)
    weights_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in consts]
    assert weights_dq and all(consts[n.input[0]].dtype == np.int8 for n in weights_dq)
    act_zps = [consts[n.input[2]] for n in qdq if n.op_type == "QuantizeLinear"]
    if flavor == "tensorrt":
        assert all(z.dtype == np.int8 and not z.any() for z in zps)
        assert P.check_tensorrt_qdq(v.path) == []
        # float parts in fp16 (scales included) with fp32 I/O: TensorRT's strongly typed build
        # then runs the non-quantized layers in fp16, not fp32
        from fixres_deploy.precision.qdq_fp16 import is_fp16_qdq

        assert v.meta["float_parts"] == "fp16" and is_fp16_qdq(v.path)
        assert all(consts[n.input[1]].dtype == np.float16 for n in qdq)
        sess = P._session(v.path)
        assert [i.type for i in sess.get_inputs()] == [o.type for o in sess.get_outputs()] == ["tensor(float)"]
    else:
        assert all(z.dtype == np.uint8 for z in act_zps) and any(z.any() for z in act_zps)
        problems = P.check_tensorrt_qdq(v.path)
        assert problems and all("uint8" in p or "asymmetric" in p for p in problems)

    # the default float layers (first conv, classifier) stay float: float weights, no DQ on them
    floats = P.default_float_layers(setup["fp32"])
    assert v.float_layers == floats and len(floats) == 2
    nodes = {n.name: n for n in m.graph.node}
    producers = {o: n for n in m.graph.node for o in n.output}
    for name in floats:
        node = nodes[name]
        assert node.op_type in ("Conv", "Gemm")
        assert consts[node.input[1]].dtype == (np.float16 if flavor == "tensorrt" else np.float32)
        assert node.input[0] not in producers or producers[node.input[0]].op_type != "DequantizeLinear"
    # with no float layers, the first conv is quantized
    allq = P.quantize_int8(
        setup["fp32"],
        setup["root"] / f"int8_{flavor}_all.onnx",
        setup["calib"],
        flavor=flavor,
        float_layers=None,
        cache=setup["cache"],
    )
    m2 = onnx.load(allq.path)
    producers2 = {o: n for n in m2.graph.node for o in n.output}
    first = next(n for n in m2.graph.node if n.name == floats[0])
    assert producers2[first.input[1]].op_type == "DequantizeLinear"
    assert allq.calibration["cache_hit"]  # same ranges: float layers do not change calibration


def test_lift_tiny_scales_keeps_dequantized_weights():
    """Scales below fp16's normal range are lifted; int8 weights behind them are re-quantized."""
    from onnx import TensorProto, helper

    from fixres_deploy.precision.qdq_fp16 import FP16_MIN_SCALE, lift_tiny_scales

    q = np.array([[100, -50], [127, 3], [-128, 64]], dtype=np.int8)  # 3 output channels (axis 0)
    scale = np.array([1e-6, 0.01, 3e-5], dtype=np.float32)
    before = q.astype(np.float64) * scale[:, None]
    act_scale = np.array(1e-7, dtype=np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wf"], axis=0),
        helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zp"], ["xf"]),
    ]
    inits = [
        numpy_helper.from_array(q, "w"),
        numpy_helper.from_array(scale, "w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zp"),
        numpy_helper.from_array(act_scale, "a_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "a_zp"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [
            helper.make_tensor_value_info("wf", TensorProto.FLOAT, [3, 2]),
            helper.make_tensor_value_info("xf", TensorProto.FLOAT, [2]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    assert lift_tiny_scales(model) == 3  # two weight channels + the activation scale
    c = _consts(model)
    assert c["w_scale"][1] == np.float32(0.01) and (c["w_scale"] >= np.float32(FP16_MIN_SCALE)).all()
    assert c["a_scale"] == np.float32(FP16_MIN_SCALE)
    after = c["w"].astype(np.float64) * c["w_scale"].astype(np.float64)[:, None]
    assert np.array_equal(c["w"][1], q[1])  # untouched channel
    assert np.abs(after - before).max() <= FP16_MIN_SCALE / 2 + 1e-12  # values kept, on the coarser grid
    assert np.float16(c["w_scale"]).min() > 0  # representable in fp16 now (no zero scale)


def test_calibration_cache_is_reused(setup, tmp_path, monkeypatch):
    calls = []
    real = P.compute_calibration_ranges

    def counting(*a, **kw):
        calls.append(kw.get("method"))
        return real(*a, **kw)

    monkeypatch.setattr(P, "compute_calibration_ranges", counting)
    cache = tmp_path / "cache"
    x = setup["calib"][:32]
    v1 = P.quantize_int8(setup["fp32"], tmp_path / "a.onnx", x, cache=cache)
    assert calls == ["minmax"] and not v1.calibration["cache_hit"]
    assert os.path.isfile(v1.calibration["cache_file"]) and str(cache) in v1.calibration["cache_file"]
    v2 = P.quantize_int8(setup["fp32"], tmp_path / "b.onnx", x, cache=cache, float_layers=None)
    assert calls == ["minmax"] and v2.calibration["cache_hit"]
    assert v2.calibration["cache_key"] == v1.calibration["cache_key"]
    # anything that changes the ranges changes the key
    P.quantize_int8(setup["fp32"], tmp_path / "c.onnx", x, cache=cache, flavor="ort_cpu")
    P.quantize_int8(setup["fp32"], tmp_path / "d.onnx", x[:31], cache=cache)
    assert calls == ["minmax"] * 3
    # FIXRES_CACHE_DIR is the default location
    monkeypatch.setenv("FIXRES_CACHE_DIR", str(tmp_path / "envcache"))
    v5 = P.quantize_int8(setup["fp32"], tmp_path / "e.onnx", x)
    assert v5.calibration["cache_file"].startswith(str(tmp_path / "envcache"))
    # the cached graph equals the freshly calibrated one
    a, b = onnx.load(tmp_path / "a.onnx"), onnx.load(tmp_path / "e.onnx")
    qa = {n.name: _consts(a)[n.input[1]] for n in a.graph.node if n.op_type == "QuantizeLinear"}
    qb = {n.name: _consts(b)[n.input[1]] for n in b.graph.node if n.op_type == "QuantizeLinear"}
    assert qa.keys() == qb.keys() and all(np.array_equal(qa[k], qb[k]) for k in qa)


def test_entropy_ranges_differ_from_minmax(demo_small, tmp_path):
    """Real KL-divergence ranges (2048 bins) reach the graph; a small CNN keeps it fast."""
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.export.onnx_export import export_onnx
    from fixres_deploy.precision.calibration import calibration_batches

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    ).eval()
    cfg = PreprocessConfig(32)
    src = export_onnx(net, tmp_path / "small.onnx", cfg, dynamic=True, exporter="torchscript", tolerance=None).path
    x = calibration_batches(os.path.join(demo_small, "train"), cfg, limit=40)
    kw = {"cache": tmp_path / "cache", "float_layers": None}
    mm = P.quantize_int8(src, tmp_path / "mm.onnx", x, method="minmax", **kw)
    en = P.quantize_int8(src, tmp_path / "en.onnx", x, method="entropy", **kw)
    assert en.calibration["method"] == "entropy" and en.calibration["num_bins"] == P.ENTROPY_NUM_BINS

    def act_scales(path):
        m = onnx.load(path)
        c = _consts(m)
        return {
            n.input[0]: float(c[n.input[1]])
            for n in m.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in c
        }

    s_mm, s_en = act_scales(mm.path), act_scales(en.path)
    assert s_mm.keys() == s_en.keys() and len(s_mm) >= 3
    ratios = [s_en[k] / s_mm[k] for k in s_mm]
    assert min(ratios) < 0.95, ratios  # entropy clips outliers somewhere; MinMax never does
    assert max(ratios) <= 1.0 + 1e-6
    assert P.check_tensorrt_qdq(en.path) == []


def test_layer_sensitivity_greedy_path(setup):
    x, y = setup["x"][:200], setup["y"][:200]
    cands = P.default_float_layers(setup["fp32"])
    m = onnx.load(setup["fp32"])
    convs = [n.name for n in m.graph.node if n.op_type == "Conv"]
    cands = cands + convs[3:5]
    rep = P.layer_sensitivity(
        setup["fp32"], setup["calib"], x, y, candidates=cands, budget_pts=-100.0, cache=setup["cache"]
    )
    assert [d["node"] for d in rep.per_layer] == cands and rep.n_eval == 200
    assert abs(rep.fp32_top1 - (setup["ref"][:200].argmax(1) == y).mean()) < 1e-9
    # impossible budget: the walk adds every candidate, most sensitive first
    assert not rep.met_budget and len(rep.greedy_path) == len(cands) + 1
    assert rep.greedy_path[0]["float_layers"] == [] and rep.greedy_path[0]["drop_pts"] == rep.all_quantized_drop_pts
    order = [p["float_layers"][-1] for p in rep.greedy_path[1:]]
    drops = {d["node"]: d["drop_pts"] for d in rep.per_layer}
    assert sorted(order) == sorted(cands) and [drops[n] for n in order] == sorted(drops.values(), reverse=True)
    assert rep.chosen_float_layers == rep.greedy_path[-1]["float_layers"]
    # everything float: int8 graph equals fp32 on the candidates' share; the last step is near fp32
    generous = P.layer_sensitivity(
        setup["fp32"], setup["calib"], x, y, candidates=cands, budget_pts=100.0, cache=setup["cache"]
    )
    assert generous.met_budget and generous.chosen_float_layers == [] and len(generous.greedy_path) == 1
    assert json.loads(json.dumps(generous.to_dict()))["flavor"] == "s8s8_symmetric"


def test_dispatcher_flavors_and_bad_inputs(setup, tmp_path):
    v = P.make_precision_variant(setup["fp32"], "fp32", tmp_path / "copy.onnx")
    assert v.precision == "fp32" and v.sha256 == P.sha256_file(setup["fp32"])
    with pytest.raises(UserInputError, match="--calibration-data"):
        P.make_precision_variant(setup["fp32"], "int8", tmp_path / "q.onnx")
    with pytest.raises(UserInputError, match="precision must be one of"):
        P.make_precision_variant(setup["fp32"], "int4", tmp_path / "q.onnx")
    with pytest.raises(UserInputError, match="flavor"):
        P.quantize_int8(setup["fp32"], tmp_path / "q.onnx", setup["calib"][:4], flavor="gpu")
    with pytest.raises(UserInputError, match="not nodes of the graph"):
        P.quantize_int8(setup["fp32"], tmp_path / "q.onnx", setup["calib"][:4], float_layers=["nope"])
    with pytest.raises(UserInputError, match="does not exist"):
        P.make_precision_variant(tmp_path / "none.onnx", "fp16", tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()

    # a fixed 64-px model refuses calibration images of another resolution
    from fixres_deploy.export.onnx_export import export_onnx
    from fixres_deploy.models.registry import build_model

    model, _, _ = build_model("fixres:tiny_resnet", 10)
    fixed = export_onnx(model, tmp_path / "fixed.onnx", setup["cfg"], exporter="torchscript", tolerance=None).path
    wrong = np.zeros((4, 3, 96, 96), np.float32)
    with pytest.raises(UserInputError, match="deployment resolution"):
        P.quantize_int8(fixed, tmp_path / "q.onnx", wrong)


def test_default_int8_flavor_follows_backend_and_device():
    # u8 activations for ONNX Runtime on any CPU (with or without VNNI: measured faster than
    # symmetric s8, see the docstring); symmetric s8 wherever TensorRT runs the graph
    assert P.default_int8_flavor("onnxruntime") == "ort_cpu"
    assert P.default_int8_flavor("tensorrt") == "tensorrt"
    assert P.default_int8_flavor("onnxruntime", device="cuda") == "tensorrt"
