"""`fixres-deploy run --config` and `fixres-deploy demo` end to end (small sizes)."""

import json
import os

import pytest

from fixres_deploy.cli.app import main
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.sweep.pipeline import PipelineConfig


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


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ncheckpoint = 'x.pt'\n[data]\ntrain = 'd'\n[sweep]\nresolution = [1]\n[output]\ndir='o'\n")
    with pytest.raises(UserInputError, match="unknown keys \\['resolution'\\] in \\[sweep\\]"):
        PipelineConfig.from_toml(bad)
    bad.write_text("[model\n")
    with pytest.raises(UserInputError, match="not valid TOML"):
        PipelineConfig.from_toml(bad)
    with pytest.raises(UserInputError, match="does not exist"):
        PipelineConfig.from_toml(tmp_path / "none.toml")


@pytest.mark.slow
def test_demo_end_to_end_reduced(demo_trained):
    """The README's main command at test size (reuses the session's trained demo model)."""
    out = os.path.dirname(demo_trained["data"])
    assert main(["demo", "--out", out, "--size", "test", "--json"]) == 0
    rep = json.loads(open(os.path.join(out, "report.json")).read())
    assert os.path.exists(os.path.join(out, "report.md"))
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 3
    manifest = json.loads(open(os.path.join(out, "bundle", "manifest.json")).read())
    chosen = rep["points"][rep["selected"]]
    assert manifest["preprocess"]["test_input_size"] == chosen["resolution"]
    # the headline figures exist and the FixRes effect shows in the fp32 curve
    assert rep["iso_latency_gain"] is not None and rep["iso_accuracy_speedup"] is not None
    curve = {row["resolution"]: row for row in rep["finetune_curve"]}
    assert curve[96]["finetuned"]["top1"] > curve[64]["no_finetune"]["top1"]
    # the shipped bundle classifies images with the torch-free runtime
    from fixres_deploy.ship.runtime import predict_bundle

    val = demo_trained["val"]
    cls = sorted(os.listdir(val))[0]
    img = os.path.join(val, cls, sorted(os.listdir(os.path.join(val, cls)))[0])
    pred = predict_bundle(os.path.join(out, "bundle"), [img])[0]
    assert pred.error is None and pred.label in manifest["labels"] if "labels" in manifest else True
