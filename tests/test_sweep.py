"""The sweep, its result store, the report and the pipeline on a small grid (real engines)."""

import json
import os

import pytest

from fixres_deploy.models.registry import build_model, save_checkpoint
from fixres_deploy.sweep.points import SweepPoint
from fixres_deploy.sweep.store import ResultStore
from fixres_deploy.sweep.sweep import SweepConfig, SweepResult, run_sweep

FAST_LATENCY = {
    "warmup_iters": 1,
    "warmup_s": 0.0,
    "min_iters": 3,
    "max_iters": 20,
    "budget_s": 0.06,
    "repeats": 3,
    "remeasure_if_contended": 0,
    "check_load": False,
}


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory, demo_small):
    import torch

    torch.manual_seed(0)
    model, _, _ = build_model("fixres:tiny_resnet", 10)
    path = tmp_path_factory.mktemp("ck") / "base.pt"
    save_checkpoint(
        path,
        model,
        spec="fixres:tiny_resnet",
        num_classes=10,
        class_names=sorted(os.listdir(f"{demo_small}/train")),
        preprocess={"test_input_size": 64, "train_input_size": 64},
    )
    return str(path)


def _cfg(ckpt, demo, out, **kw):
    base = dict(
        checkpoint=ckpt,
        train_data=f"{demo}/train",
        eval_data=f"{demo}/val",
        resolutions=[64, 96],
        precisions=["fp32", "int8"],
        batch_sizes=[2],
        shape_modes=["fixed"],
        finetune=[False, True],
        finetune_epochs=1,
        calibration_size=20,
        exporter="torchscript",
        latency=FAST_LATENCY,
        store=str(out / "store"),
        diagnostic_images=0,
    )
    base.update(kw)
    return SweepConfig(**base)


def test_store_records_and_failures(tmp_path):
    store = ResultStore(tmp_path)
    calls = []

    def make(d):
        calls.append(1)
        (d / "f.txt").write_text("x")
        return {"value": 3, "path": str(d / "f.txt"), "files": [str(d / "f.txt")]}

    rec, cached = store.run("s", {"a": 1}, make)
    assert not cached and rec["result"]["value"] == 3 and open(rec["result"]["path"]).read() == "x"
    rec2, cached2 = store.run("s", {"a": 1}, make)
    assert cached2 and rec2["key"] == rec["key"] and len(calls) == 1
    # a changed input is a new record; a vanished file triggers recomputation
    store.run("s", {"a": 2}, make)
    os.unlink(rec["result"]["path"])
    store.run("s", {"a": 1}, make)
    assert len(calls) == 3

    def boom(d):
        raise RuntimeError("no luck")

    frec, _ = store.run("s", {"b": 1}, boom)
    assert frec["error"] == "RuntimeError: no luck"
    again, cached3 = store.run("s", {"b": 1}, boom)
    assert cached3 and again["error"]  # failures are results too, not retried by default
    _retried, cached4 = store.run("s", {"b": 1}, boom, retry_failed=True)
    assert not cached4


def test_store_with_relative_root_rebases_absolute_paths(tmp_path, monkeypatch):
    """A store opened by a relative path (`--out runs/demo`) still moves absolute result paths into place."""
    monkeypatch.chdir(tmp_path)
    store = ResultStore("runs/x/store")

    def make(d):
        f = os.path.abspath(d / "v.onnx")  # stages return absolute paths (make_variant does)
        with open(f, "w") as fh:
            fh.write("v")
        return {"path": f, "files": [f]}

    rec, _ = store.run("variant", {"a": 1}, make)
    assert os.path.isabs(rec["result"]["path"]) and open(rec["result"]["path"]).read() == "v"
    assert f"{os.sep}.{rec['key'][:12]}." not in rec["result"]["path"]  # not the temp folder
    assert list(rec["files"]) == ["v.onnx"]  # recorded relative to the artifact folder, with size and sha256


def test_sweep_resume_reuse_and_invalidation(tmp_path, small_ckpt, demo_small, monkeypatch):

    out = tmp_path / "sw"
    cfg = _cfg(small_ckpt, demo_small, out)
    # 1. interrupted run: the latency stage (after every engine is built) raises KeyboardInterrupt
    import fixres_deploy.measure.bench as bench

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "measure_rounds", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, out)
    assert not (out / "sweep.json").exists()
    monkeypatch.undo()
    # 2. resume: fine-tunes, exports, variants, engines and accuracies are reused
    first = run_sweep(cfg, out)
    assert len(first.points) == 2 * 2 * 2  # res x finetune x precision (x 1 batch x 1 mode)
    assert all(p.ok for p in first.points), [p.error for p in first.points]
    assert first.store_hits >= 2 + 2 + 2 + 8 + 8
    # FixRes and base weights of one graph share one latency measurement (same record, same rounds)
    by = {(p.resolution, p.precision, p.finetuned): p for p in first.points}
    for res in (64, 96):
        for prec in ("fp32", "int8"):
            a, b = by[(res, prec, False)], by[(res, prec, True)]
            assert a.key == b.key and a.latency_p50_ms == b.latency_p50_ms
            assert a.latency_rounds["index"] == b.latency_rounds["index"] and a.top1 is not None
    assert len({p.key for p in first.points}) == 4
    [group] = first.latency_groups
    assert group["members"] == 4 and group["points"] == 8 and group["rounds"] == FAST_LATENCY["repeats"]
    # 3. repeat: nothing is measured twice
    second = run_sweep(cfg, out)
    assert second.store_misses == 0
    assert [p.latency_p50_ms for p in second.points] == [p.latency_p50_ms for p in first.points]
    # 4. a changed input re-measures only what it affects: a new batch size means new
    #    engines and latencies, but no new fine-tune, export, variant or accuracy
    store = ResultStore(out / "store")
    before = {s: sum(1 for _ in store.records(s)) for s in ("finetune", "export", "variant", "accuracy", "latency")}
    third = run_sweep(_cfg(small_ckpt, demo_small, out, batch_sizes=[2, 3]), out)
    after = {s: sum(1 for _ in store.records(s)) for s in before}
    assert after["finetune"] == before["finetune"] and after["export"] == before["export"]
    assert after["variant"] == before["variant"]
    assert after["latency"] == before["latency"] + 4  # 4 graph structures at the new batch size
    assert len(third.points) == 16
    # sweep.json round-trips
    again = SweepResult.load(out / "sweep.json")
    assert len(again.points) == 16 and isinstance(again.points[0], SweepPoint)


def test_sweep_records_failures_and_goes_on(tmp_path, small_ckpt, demo_small, monkeypatch):
    import fixres_deploy.engines.engine as engine_mod

    real = engine_mod.build_verified_engine

    def no_int8(backend, source, precision, *a, **k):
        if precision == "int8":
            raise RuntimeError("this backend cannot build the int8 graph")
        return real(backend, source, precision, *a, **k)

    monkeypatch.setattr(engine_mod, "build_verified_engine", no_int8)
    out = tmp_path / "sw"
    res = run_sweep(_cfg(small_ckpt, demo_small, out, finetune=[False], resolutions=[64]), out)
    by_precision = {p.precision: p for p in res.points}
    assert by_precision["fp32"].ok
    assert by_precision["int8"].error and "cannot build the int8 graph" in by_precision["int8"].error
    assert any(f["stage"] == "engine" for f in res.failures)


def test_sweep_refuses_an_unavailable_backend_before_any_work(tmp_path, small_ckpt, demo_small):
    import importlib.util

    from fixres_deploy.core.errors import MissingDependencyError

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    out = tmp_path / "sw"
    cfg = _cfg(small_ckpt, demo_small, out, backends=["onnxruntime", "tensorrt"], finetune=[False, True])
    with pytest.raises(MissingDependencyError, match=r"tensorrt.*fixres-deploy\[gpu-cu12\]"):
        run_sweep(cfg, out)
    assert not (out / "store").exists() or not any((out / "store" / "objects").iterdir())


def test_report_and_bundle_from_sweep(tmp_path, small_ckpt, demo_small):
    from fixres_deploy.choose.report import write_report
    from fixres_deploy.cli.app import main
    from fixres_deploy.ship.bundle_select import bundle_selected
    from fixres_deploy.ship.verify import verify_bundle

    out = tmp_path / "sw"
    sweep = run_sweep(_cfg(small_ckpt, demo_small, out, diagnostic_images=20), out)
    rep = write_report(sweep, out)
    data = json.loads((out / "report.json").read_text())
    for key in ("points", "pareto", "selected", "reason", "iso_latency_gain", "iso_accuracy_speedup"):
        assert key in data
    # TensorRT int8 accuracy predicted on CPU: one row per (resolution, fine-tune), the
    # TensorRT-flavored graph, beside the ORT fp32 top-1 of the same model
    pred = data["tensorrt_int8_prediction"]
    assert sorted((r["resolution"], r["finetuned"]) for r in pred) == [(64, False), (64, True), (96, False), (96, True)]
    for r in pred:
        assert r["flavor"] == "s8s8_symmetric" and r["graph_optimization"] == "disable"
        assert 0 <= r["top1"] <= 1 and r["fp32_top1"] is not None
        assert r["drop_pts"] == round(100 * (r["fp32_top1"] - r["top1"]), 2)
    assert "TensorRT int8 accuracy (predicted on CPU; latency needs TensorRT)" in (out / "report.md").read_text()
    # ratios per round with intervals; the re-run count; the FixRes diagnostic per resolution
    lr = data["latency_ratios"]
    assert lr["stat"] == "p50" and len(lr["front_neighbours"]) == len(data["pareto"]) - 1
    vs = lr["selected_vs_naive"]
    if vs["naive"] != vs["selected"]:
        assert vs["speedup"]["rounds"] == FAST_LATENCY["repeats"] and vs["speedup"]["ci"][0] <= vs["speedup"]["ci"][1]
    assert data["rerun_rounds"] == 0 and data["latency_groups"][0]["rounds"] == FAST_LATENCY["repeats"]
    assert data["latency_groups"][0]["stop"]["reason"] == "fixed"  # max_repeats 0: no rounds added
    diag = data["diagnostics"]
    assert [r["resolution"] for r in diag["resolutions"]] == [64, 96] and diag["images"] == 20
    for row in diag["resolutions"]:
        assert 0.0 <= row["base"]["zero_fraction"] <= 1.0 and row["finetuned"] and row["bn_shift"]
    md = (out / "report.md").read_text()
    assert "Why FixRes works" in md and "pooled_features.png" in md and "Latency ratios" in md
    p = data["points"][data["selected"]]
    for key in (
        "resolution",
        "precision",
        "backend",
        "batch_size",
        "shape_mode",
        "finetuned",
        "top1",
        "top1_ci",
        "latency_p50_ms",
        "latency_p99_ms",
        "throughput_ips",
    ):
        assert key in p
    assert all(0 <= i < len(data["points"]) for i in data["pareto"])
    assert (out / "report.md").exists() and all(os.path.exists(v) for v in rep["plots"].values())
    assert sorted(rep["plots"]) == sorted(
        ["accuracy_vs_resolution", "latency_vs_resolution", "accuracy_latency", "pooled_features"]
    )
    # regenerable from sweep.json without measuring
    assert main(["report", "--sweep", str(out / "sweep.json"), "--out", str(tmp_path / "r2"), "--json"]) == 0
    again = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert again["selected"] == data["selected"] and again["points"] == data["points"]
    # ship the selected point
    b = bundle_selected(sweep, rep, str(tmp_path / "bundle"), triton_dir=str(tmp_path / "triton"))
    assert verify_bundle(b["dir"]).ok
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["preprocess"]["test_input_size"] == p["resolution"]
    # select with a constraint nothing meets: a clear message, exit code 2
    assert main(["select", "--sweep", str(out / "sweep.json"), "--latency-budget-ms", "0.000001"]) == 2


def test_latency_record_shared_by_two_checkpoints_of_one_architecture(tmp_path, small_ckpt, demo_small):
    """Other weights, same graph: the second sweep finds the latency; accuracy is measured anew."""
    import torch

    torch.manual_seed(1)
    other_model, _, _ = build_model("fixres:tiny_resnet", 10)
    other = tmp_path / "other.pt"
    save_checkpoint(
        other,
        other_model,
        spec="fixres:tiny_resnet",
        num_classes=10,
        class_names=sorted(os.listdir(f"{demo_small}/train")),
        preprocess={"test_input_size": 64, "train_input_size": 64},
    )
    store_dir = tmp_path / "store"
    kw = dict(finetune=[False], resolutions=[64], store=str(store_dir))
    first = run_sweep(_cfg(small_ckpt, demo_small, tmp_path / "a", **kw), tmp_path / "a")
    store = ResultStore(store_dir)
    counts = {s: sum(1 for _ in store.records(s)) for s in ("latency", "latency_group", "accuracy")}
    assert counts == {"latency": 2, "latency_group": 1, "accuracy": 2}  # fp32 and int8
    second = run_sweep(_cfg(str(other), demo_small, tmp_path / "b", **kw), tmp_path / "b")
    after = {s: sum(1 for _ in store.records(s)) for s in counts}
    assert after == {"latency": 2, "latency_group": 1, "accuracy": 4}
    assert [p.key for p in second.points] == [p.key for p in first.points]
    assert [p.latency_p50_ms for p in second.points] == [p.latency_p50_ms for p in first.points]
    assert [p.correct1_bits for p in second.points] != [p.correct1_bits for p in first.points]


def test_sweep_int8_float_layers_chosen_by_the_sensitivity_analysis(tmp_path, small_ckpt, demo_small, monkeypatch):
    """'sensitivity': per graph, the analysis picks the float layers; the int8 variant keeps exactly those."""
    import onnx

    import fixres_deploy.precision.variants as variants_mod

    seen = {}
    real = variants_mod.layer_sensitivity

    def spy(src, calib, xe, ye, **kw):
        seen.update(n_calib=len(calib), n_score=len(xe), budget=kw["budget_pts"])
        return real(src, calib, xe, ye, **kw)

    monkeypatch.setattr(variants_mod, "layer_sensitivity", spy)
    import fixres_deploy.sweep.sweep as sweep_mod

    indexes = []
    real_cache = sweep_mod._EvalCache

    class Spy(real_cache):
        def __init__(self, index, base_cfg):
            indexes.append({s.path for s in index.samples})
            super().__init__(index, base_cfg)

    monkeypatch.setattr(sweep_mod, "_EvalCache", Spy)
    out = tmp_path / "sw"
    cfg = _cfg(
        small_ckpt,
        demo_small,
        out,
        finetune=[False],
        resolutions=[64],
        int8_float_layers="sensitivity",
        int8_sensitivity_budget_pts=0.0,
        int8_sensitivity_images=20,
    )
    res = run_sweep(cfg, out)
    (int8,) = [p for p in res.points if p.precision == "int8"]
    assert int8.ok, int8.error
    sens = int8.quant["sensitivity"]
    assert sens["budget_pts"] == 0.0 and sens["n_eval"] == seen["n_score"] == 20 and seen["n_calib"] == 20
    # the record holds the whole analysis; the variant's float layers are its choice
    # one analysis per graph and int8 flavor (the ORT engine's u8, the TensorRT prediction's s8)
    recs = list(ResultStore(out / "store").records("sensitivity"))
    (rec,) = [r for r in recs if r["result"]["flavor"] == int8.quant["flavor"]]
    chosen = rec["result"]["chosen_float_layers"]
    assert int8.quant["float_layers"] == chosen
    assert sens["final_drop_pts"] == rec["result"]["final_drop_pts"]
    assert len(rec["result"]["per_layer"]) >= 2  # every Conv/Gemm scored alone
    # those layers are not quantized in the engine's graph: no DequantizeLinear feeds them
    path = int8.engine["path"]
    path = path if os.path.isabs(path) else str(out / "store" / path)
    g = onnx.load(path).graph
    produced_by_dq = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.name for n in g.node if n.op_type in ("Conv", "Gemm") and set(n.input) & produced_by_dq}
    assert quantized and not quantized & set(chosen)
    # scored on training images outside the calibration set, never on the evaluated split
    train_dir, val_dir = f"{demo_small}/train", f"{demo_small}/val"
    calib_paths, score_paths = indexes[-2], indexes[-1]  # the last analysis: its calibration, then its scoring set
    assert len(calib_paths) == 20 and len(score_paths) == 20 and not calib_paths & score_paths
    assert all(p.startswith(train_dir) and not p.startswith(val_dir) for p in calib_paths | score_paths)
    again = run_sweep(cfg, out)
    assert [p.quant for p in again.points] == [p.quant for p in res.points]
    assert sum(1 for _ in ResultStore(out / "store").records("sensitivity")) == len(recs)  # reused, not re-run
