"""What a latency is keyed by, the paired ratio interval, and the FixRes pooled-feature diagnostic."""

from __future__ import annotations

import numpy as np
import pytest

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.stats import paired_ratio_interval
from fixres_deploy.measure.graph_key import graph_signature

# --------------------------------------------------------------------------- graph signature


def _qdq_model(path, *, scale: float, weight_seed: int, quantize_input: bool = True, reshape_to=(1, -1)):
    """x -> [Q -> DQ] -> Conv(W) -> Reshape: a tiny int8-style graph with one Q/DQ pair."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(weight_seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "s"),
        numpy_helper.from_array(np.array(weight_seed % 7, dtype=np.uint8), "zp"),
        numpy_helper.from_array(np.array(reshape_to, dtype=np.int64), "shape"),
    ]
    nodes = []
    src = "x"
    if quantize_input:
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"]),
        ]
        src = "xdq"
    nodes += [
        helper.make_node("Conv", [src, "W"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["y", "shape"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"g{weight_seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", "d"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="preprocess", value=f'{{"seed": {weight_seed}}}')
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def test_signature_ignores_weights_and_scales_but_not_structure(tmp_path):
    a = graph_signature(_qdq_model(tmp_path / "a.onnx", scale=0.02, weight_seed=1))
    # other weights, another calibration scale and zero point, other metadata: same work
    assert graph_signature(_qdq_model(tmp_path / "b.onnx", scale=0.05, weight_seed=2)) == a
    # another Q/DQ placement, another reshape target: other work
    assert graph_signature(_qdq_model(tmp_path / "c.onnx", scale=0.02, weight_seed=1, quantize_input=False)) != a
    assert graph_signature(_qdq_model(tmp_path / "d.onnx", scale=0.02, weight_seed=1, reshape_to=(-1, 4))) != a


def test_signature_reads_exporter_deduplicated_weights_as_copies(tmp_path):
    """Equal weights deduplicated into Identity nodes (TorchScript exporter) describe like separate ones."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def model(path, dedup: bool):
        w1 = np.ones((2, 2), dtype=np.float32)
        w2 = w1 if dedup else 2 * w1
        inits = [numpy_helper.from_array(w1, "w1")]
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"])]
        if dedup:
            nodes.insert(0, helper.make_node("Identity", ["w1"], ["w2"]))
        else:
            inits.append(numpy_helper.from_array(w2, "w2"))
        nodes.append(helper.make_node("MatMul", ["h", "w2"], ["y"]))
        g = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
            inits,
        )
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
        return str(path)

    assert graph_signature(model(tmp_path / "a.onnx", True)) == graph_signature(model(tmp_path / "b.onnx", False))


def test_signature_of_two_exports_of_one_architecture(tmp_path):
    import torch

    from fixres_deploy.models.registry import build_model

    sigs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_model("fixres:tiny_resnet", 10)[0].eval()
        p = tmp_path / f"m{seed}.onnx"
        torch.onnx.export(m, torch.zeros(1, 3, 32, 32), p, dynamo=False, input_names=["x"])
        sigs.append(graph_signature(p))
    torch.manual_seed(0)
    wide = build_model("fixres:tiny_resnet", 12)[0].eval()  # another classifier size: other work
    torch.onnx.export(wide, torch.zeros(1, 3, 32, 32), tmp_path / "w.onnx", dynamo=False, input_names=["x"])
    assert sigs[0] == sigs[1] != graph_signature(tmp_path / "w.onnx")


def test_signature_of_a_bad_file_names_it(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        graph_signature(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    with pytest.raises(UserInputError, match="junk.onnx"):
        graph_signature(tmp_path / "junk.onnx")


# --------------------------------------------------------------------------- paired ratio


def test_paired_ratio_cancels_drift_and_resolves_a_small_difference():
    rng = np.random.default_rng(0)
    drift = np.linspace(1.0, 3.0, 12) * rng.uniform(0.9, 1.1, 12)  # the machine slows 3x over the run
    fast = 1.0 * drift
    slow = 1.05 * drift * rng.uniform(0.99, 1.01, 12)  # 5% slower, measured in the same rounds
    r = paired_ratio_interval(slow, fast, seed=1)
    assert r["ci"][0] < 1.05 < r["ci"][1] and r["ci"][0] > 1.0 and not r["contains_1"] and r["rounds"] == 12
    # unpaired, the drift hides the difference: a shuffled pairing gives a wide interval around 1
    shuffled = paired_ratio_interval(slow, rng.permutation(fast), seed=1)
    assert shuffled["contains_1"] and shuffled["ci"][1] - shuffled["ci"][0] > 10 * (r["ci"][1] - r["ci"][0])
    assert paired_ratio_interval(slow, fast, seed=1) == r  # seeded: reproducible


def test_paired_ratio_of_equal_engines_contains_one_and_refuses_bad_input():
    rng = np.random.default_rng(2)
    a = rng.uniform(1.0, 1.2, 10)
    b = a * rng.uniform(0.97, 1.03, 10)
    assert paired_ratio_interval(a, b)["contains_1"]
    with pytest.raises(ValueError, match="2 rounds"):
        paired_ratio_interval([1.0], [1.0])
    with pytest.raises(ValueError, match="equal"):
        paired_ratio_interval([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="positive"):
        paired_ratio_interval([1.0, 0.0], [1.0, 1.0])


# --------------------------------------------------------------------------- FixRes diagnostic


def test_pooled_feature_zeros_equal_a_direct_torch_computation():
    import torch

    from fixres_deploy.fixres.diagnostics import bn_shift, feature_summary, pooled_features, resolution_diagnostic
    from fixres_deploy.fixres.finetune import resolve_fixres_modules
    from fixres_deploy.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("fixres:tiny_resnet", 10)[0].eval()
    mods = resolve_fixres_modules(model)
    x = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    feats = pooled_features(model, x, mods.head_names[0], batch_size=4)
    with torch.inference_mode():  # the model's own forward, written out
        t = torch.from_numpy(x)
        h = model.relu(model.bn1(model.conv1(t)))
        h = model.layer4(model.layer3(model.layer2(model.layer1(h))))
        direct = torch.flatten(model.avgpool(h), 1).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)
    summary = feature_summary(feats)
    assert summary["zero_fraction"] == pytest.approx(float((direct == 0).mean()))
    assert 0.0 < summary["zero_fraction"] < 1.0  # a ReLU network has some exact zeros
    assert summary["quantiles"][0] == pytest.approx(direct.min()) and len(summary["quantiles"]) == 101

    # a "fine-tune" that moves the pre-pool BN's running mean by one standard deviation
    tuned = build_model("fixres:tiny_resnet", 10)[0].eval()
    tuned.load_state_dict(model.state_dict())
    for name in mods.bn_names:
        bn = tuned.get_submodule(name)
        bn.running_mean += torch.sqrt(bn.running_var + bn.eps)
    assert bn_shift(model, model, mods.bn_names)["mean_shift_sigma"] == 0.0
    shift = bn_shift(model, tuned, mods.bn_names)
    assert shift["mean_shift_sigma"] == pytest.approx(1.0) and shift["var_ratio"] == pytest.approx(1.0)
    row = resolution_diagnostic(
        model, tuned, x, 32, classifier=mods.head_names[0], bn_names=mods.bn_names, train_res=64
    )
    # shifting the BN mean up lowers the pre-ReLU values: more exact zeros after the pool
    assert row["finetuned"]["zero_fraction"] > row["base"]["zero_fraction"] and not row["is_train_res"]
    with pytest.raises(UserInputError, match="nope"):
        pooled_features(model, x, "nope")


# --------------------------------------------------------------------------- adaptive rounds in the sweep


def test_sweep_asks_for_the_front_neighbours_and_the_naive_pairs():
    """The pairs the sweep's round count waits for follow the Pareto front of the current medians."""
    from types import SimpleNamespace

    from fixres_deploy.sweep.latency_groups import LatencyGroups, _Pending
    from fixres_deploy.sweep.points import SweepPoint

    def pt(res, prec, ft, top1):
        return SweepPoint(
            resolution=res,
            precision=prec,
            backend="onnxruntime",
            batch_size=1,
            shape_mode="fixed",
            finetuned=ft,
            top1=top1,
        )

    # engines: 0 fp32@64, 1 int8@64, 2 fp32@96, 3 int8@96; FixRes and base weights of one graph share an engine
    points = [
        (pt(64, "fp32", False, 0.70), "e0"),  # the naive deployment
        (pt(64, "fp32", True, 0.71), "e0"),
        (pt(64, "int8", True, 0.69), "e1"),
        (pt(96, "fp32", True, 0.75), "e2"),
        (pt(96, "int8", True, 0.74), "e3"),
        (pt(96, "int8", False, 0.60), "e3"),
    ]
    keys = ["e0", "e1", "e2", "e3"]
    groups = LatencyGroups(SimpleNamespace(cfg=SimpleNamespace(train_res=64)))
    members = [_Pending(p, {}, {}, k) for p, k in points]
    pairs = groups._pairs_that_matter(members, keys, 1)
    # int8 twice as fast as fp32, 96 px 2x the cost of 64: the front is int8@64 < fp32@64 < int8@96 < fp32@96
    front_pairs = {(1, 0), (0, 3), (3, 2)}
    naive_pairs = {(0, 1), (0, 2), (0, 3)}
    got = {tuple(sorted(p)) for p in pairs(p50_ms=[1.0, 0.5, 2.0, 1.0 + 0.4])}
    assert got == {tuple(sorted(p)) for p in front_pairs | naive_pairs}
    # when int8 is no faster than fp32, the int8 engines drop off the front and out of the pairs
    got = {tuple(sorted(p)) for p in pairs([1.0, 1.2, 2.0, 2.5])}
    assert got == {(0, 2)}
    # a naive point per shape mode (the report takes the selected point's): both are paired with the front
    dyn = pt(64, "fp32", False, 0.70)
    dyn.shape_mode = "dynamic"
    members.append(_Pending(dyn, {}, {}, "e4"))
    pairs = groups._pairs_that_matter(members, keys + ["e4"], 1)
    got = {tuple(sorted(p)) for p in pairs([1.0, 1.2, 2.0, 2.5, 1.1])}
    assert {(0, 4), (2, 4)} <= got and (0, 2) in got


def test_paired_ratio_with_three_rounds_gives_a_finite_or_open_interval_never_an_error():
    """Bootstrap-t on 3 rounds (resamples of one repeated round have rounding-only spread): no overflow."""
    r = paired_ratio_interval([0.412603, 0.26816300000000004, 0.2887235], [0.16866, 0.241559, 0.1721955])
    lo, hi = r["ci"]
    assert 0.0 <= lo <= r["ratio"] <= hi and r["rounds"] == 3
    assert r["contains_1"] == (lo <= 1.0 <= hi)
