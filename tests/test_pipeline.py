"""`fixres-deploy run --config` and `fixres-deploy demo` end to end (small sizes)."""

import json
import os

import pytest

from fixres_deploy.cli.app import main


def test_run_from_toml_is_resumable(tmp_path, demo_small, capsys):
    import torch

    from fixres_deploy.models.registry import build_model, save_checkpoint

    torch.manual_seed(0)
    model, _, _ = build_model("fixres:tiny_resnet", 10)
    save_checkpoint(
        tmp_path / "base.pt",
        model,
        spec="fixres:tiny_resnet",
        num_classes=10,
        class_names=sorted(os.listdir(f"{demo_small}/train")),
        preprocess={"test_input_size": 64, "train_input_size": 64},
    )
    (tmp_path / "run.toml").write_text(f"""
[model]
checkpoint = "base.pt"

[data]
train = "{demo_small}/train"
eval = "{demo_small}/val"

[sweep]
resolutions = [64, 96]
precisions = ["fp32", "fp16"]
batch_sizes = [2]
shape_modes = ["fixed", "dynamic"]
finetune_epochs = 1
exporter = "torchscript"
latency = {{ warmup_iters = 1, warmup_s = 0.0, min_iters = 3, budget_s = 0.05, repeats = 1, check_load = false }}

[select]
objective = "max_accuracy"

[output]
dir = "out"
""")
    assert main(["run", "--config", str(tmp_path / "run.toml"), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    out = tmp_path / "out"
    for f in ("report.json", "report.md", "sweep.json", "bundle/manifest.json", "triton"):
        assert (out / f).exists(), f
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["points"]) == 2 * 2 * 2 * 2  # res x finetune x precision x shape mode
    assert {p["shape_mode"] for p in rep["points"]} == {"fixed", "dynamic"}
    assert first["store"]["misses"] > 0
    # the same command again measures nothing
    assert main(["run", "--config", str(tmp_path / "run.toml"), "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["store"]["misses"] == 0 and second["selected"] == first["selected"]


@pytest.mark.slow
def test_demo_end_to_end_reduced(demo_trained):
    """The README's main command at test size (reuses the session's trained demo model)."""
    out = os.path.dirname(demo_trained["data"])
    assert main(["demo", "--out", out, "--size", "test", "--json"]) == 0
    rep = json.loads(open(os.path.join(out, "report.json")).read())
    assert os.path.exists(os.path.join(out, "report.md"))
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == [
        "accuracy_latency.png",
        "accuracy_vs_resolution.png",
        "latency_vs_resolution.png",
        "pooled_features.png",
    ]
    # competitors timed in interleaved rounds: the choice against naive comes with a paired interval
    vs = rep["latency_ratios"]["selected_vs_naive"]
    if vs["selected"] != vs["naive"]:
        assert (
            vs["speedup"]["rounds"] >= 3 and vs["speedup"]["ci"][0] <= vs["speedup"]["ratio"] <= vs["speedup"]["ci"][1]
        )
    assert [r["resolution"] for r in rep["diagnostics"]["resolutions"]] == [64, 96]
    manifest = json.loads(open(os.path.join(out, "bundle", "manifest.json")).read())
    chosen = rep["points"][rep["selected"]]
    assert manifest["preprocess"]["test_input_size"] == chosen["resolution"]
    # the headline figures exist and the FixRes effect shows in the fp32 curve
    assert rep["iso_latency_gain"] is not None and rep["iso_accuracy_speedup"] is not None
    curve = {row["resolution"]: row for row in rep["finetune_curve"]}
    assert curve[96]["finetuned"]["top1"] > curve[64]["no_finetune"]["top1"]
    # the shipped bundle classifies the held-out demo images with the torch-free runtime, as
    # accurately as the sweep measured the selected engine on the same images
    from fixres_deploy.data.folders import index_image_folder
    from fixres_deploy.ship.runtime import predict_bundle

    assert manifest["class_names"] == sorted(os.listdir(demo_trained["val"]))
    val = index_image_folder(demo_trained["val"])
    preds = predict_bundle(os.path.join(out, "bundle"), [s.path for s in val.samples])
    assert len(preds) == len(val.samples) == 400 and all(p.error is None for p in preds)
    truth = [val.classes[s.label] for s in val.samples]
    accuracy = sum(p.label == t for p, t in zip(preds, truth)) / len(preds)
    assert accuracy >= 0.8, accuracy  # the demo's selected points reach 90-97% (README)
    assert accuracy == pytest.approx(chosen["top1"], abs=0.02)  # same engine, same preprocessing, same images
