"""The one config schema of `sweep` and `run`: TOML and flags, checks before work, precedence, effective config."""

from __future__ import annotations

import json
import os
import tomllib

import pytest

from fixres_deploy.cli.app import build_parser, main
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.sweep import config
from fixres_deploy.sweep.config import PipelineConfig, SelectionConfig, SweepConfig

VALID = """
[model]
checkpoint = "base.pt"

[data]
train = "data/train"

{extra}

[output]
dir = "out"
"""


@pytest.fixture
def workdir(tmp_path):
    """A folder with a checkpoint file and a data folder: only the TOML under test can be wrong."""
    (tmp_path / "base.pt").write_bytes(b"not read: the config is refused first")
    (tmp_path / "data" / "train").mkdir(parents=True)
    return tmp_path


BAD_TOML = [
    # (TOML snippet, what the message must contain)
    ('[sweep]\nfinetune = "no"', ["[sweep] finetune", "list of booleans", "finetune = [false, true]", '"no"']),
    ('[sweep]\nresolutions = "64,80"', ["[sweep] resolutions", "list of integers", "resolutions = [64, 96, 128]"]),
    ("[sweep]\nbatch_sizes = 1", ["[sweep] batch_sizes", "list of integers", "batch_sizes = [1, 8]"]),
    ('[select]\nlatency_budget_ms = "5"', ["[select] latency_budget_ms", "a number", "latency_budget_ms = 5.0"]),
    ("[sweep]\nprecisions = []", ["[sweep] precisions", "empty"]),
    ("[sweep]\nresolutions = []", ["[sweep] resolutions", "empty", "omit it"]),
    ("[sweep]\nbatch_sizes = [0, 8]", ["[sweep] batch_sizes", ">= 1"]),
    ('[sweep]\nprecisions = ["fp32", "int4"]', ["'int4'", "did you mean 'int8'", "fp32, fp16, int8"]),
    ("[sweep]\nresolution = [64]", ["unknown key 'resolution' in [sweep]", "did you mean 'resolutions'"]),
    ("[sweep]\nlatency_budget_ms = 5.0", ["'latency_budget_ms'", "belongs in [select]"]),
    ("[outptu]\ntar = true", ["unknown section [outptu]", "did you mean 'output'"]),
    ('[sweep]\nlatency = "fast"', ["[sweep] latency", "unknown preset 'fast'", "quick, standard, thorough"]),
    ("[sweep]\nlatency = { repeat = 3 }", ["[sweep] latency", "unknown key 'repeat'", "did you mean 'repeats'"]),
    ("[sweep]\nlatency = { repeats = 0 }", ["[sweep] latency", "repeats >= 1"]),
    ("[data]\nval_fraction = 1.5", ["[data] val_fraction", "between 0 and 1"]),
    ("[output]\nbundle = 1", ["[output] bundle", "true or false"]),
    ("schema_version = 2", ["schema_version 2", "schema_version 1"]),
    ('[sweep]\nshard = "4/4"', ["[sweep] shard", "0 <= K < N"]),
    ('[sweep]\nshard = "first"', ["[sweep] shard", "expected K/N", '"auto"']),
    ("[select]\nallow_mixed_machines = 1", ["[select] allow_mixed_machines", "true or false"]),
]


@pytest.mark.parametrize("snippet,expected", BAD_TOML, ids=[b[0].splitlines()[-1] for b in BAD_TOML])
def test_bad_toml_is_refused_before_any_work(workdir, capsys, snippet, expected):
    text = VALID.format(extra="")
    if snippet.startswith(("[data]", "[output]")):  # those sections exist already: add to them
        section, line = snippet.split("\n", 1)
        text = text.replace(section + "\n", f"{section}\n{line}\n")
    elif snippet.startswith("schema_version"):
        text = snippet + "\n" + text
    else:
        text = VALID.format(extra=snippet)
    (workdir / "run.toml").write_text(text)
    with pytest.raises(UserInputError) as exc:
        config.read_config(workdir / "run.toml")
    for part in expected:
        assert part in str(exc.value), (part, str(exc.value))
    # the command line: exit 2 with the same message, nothing written
    assert main(["run", "--config", str(workdir / "run.toml")]) == 2
    assert expected[0] in capsys.readouterr().err
    assert sorted(os.listdir(workdir)) == ["base.pt", "data", "run.toml"]


def test_missing_inputs_are_refused_before_any_work(workdir, capsys):
    (workdir / "run.toml").write_text(VALID.format(extra="").replace('dir = "out"', ""))
    assert main(["run", "--config", str(workdir / "run.toml")]) == 2
    assert "missing [output] dir (flag --out)" in capsys.readouterr().err
    # a checkpoint that does not exist: refused before the effective config or a store is written
    (workdir / "run.toml").write_text(VALID.format(extra="").replace("base.pt", "gone.pt"))
    assert main(["run", "--config", str(workdir / "run.toml")]) == 2
    assert "gone.pt' does not exist" in capsys.readouterr().err
    assert not (workdir / "out").exists()
    with pytest.raises(UserInputError, match="does not exist"):
        config.read_config(workdir / "none.toml")
    (workdir / "bad.toml").write_text("[model\n")
    with pytest.raises(UserInputError, match="not valid TOML"):
        config.read_config(workdir / "bad.toml")
    # without --config the same fields are required as flags
    assert main(["run", "--checkpoint", str(workdir / "base.pt"), "--out", str(workdir / "o2")]) == 2
    assert "missing [data] train (flag --data)" in capsys.readouterr().err


def test_python_construction_is_checked_too(workdir):
    base = {"checkpoint": str(workdir / "base.pt"), "train_data": str(workdir / "data" / "train")}
    with pytest.raises(UserInputError, match="SweepConfig.batch_sizes: expected a list of integers"):
        SweepConfig(**base, batch_sizes=1)
    with pytest.raises(UserInputError, match="SweepConfig.finetune: expected a list of booleans"):
        SweepConfig(**base, finetune="no")
    with pytest.raises(UserInputError, match="SelectionConfig.objective: unknown value 'fastest'"):
        SelectionConfig(objective="fastest")
    with pytest.raises(UserInputError, match="SelectionConfig.alpha: must lie strictly between 0 and 1"):
        SelectionConfig(alpha=1.0)
    # ints are accepted where numbers are expected, and stored as floats
    assert SelectionConfig(latency_budget_ms=5).latency_budget_ms == 5.0
    # the backends default is what can run here, resolved once (and recorded in the effective config)
    assert SweepConfig(**base).backends == config.available_backends()


def _parse(argv):
    from fixres_deploy.cli.sweep import pipeline_config

    return pipeline_config(build_parser().parse_args(argv))


def test_explicit_flags_override_the_file_and_only_they_do(workdir):
    extra = """
[sweep]
precisions = ["fp32", "int8"]
batch_sizes = [2]
retry_failed = false

[select]
objective = "min_latency"
latency_budget_ms = 5.0
"""
    (workdir / "run.toml").write_text(VALID.format(extra=extra) + "bundle = true\n")
    f = str(workdir / "run.toml")
    from_file = _parse(["run", "--config", f])
    assert from_file.sweep.precisions == ["fp32", "int8"] and from_file.select.latency_budget_ms == 5.0
    assert from_file.bundle and not from_file.sweep.retry_failed
    # paths in the file are relative to the file
    assert from_file.sweep.checkpoint == str(workdir / "base.pt") and from_file.out == str(workdir / "out")

    pc = _parse(
        [
            "run",
            "--config",
            f,
            "--latency-budget-ms",
            "7",
            "--retry-failed",
            "--no-bundle",
            "--no-triton",
            "--precisions",
            "fp32",
            "--finetuned-only",
            "--out",
            "elsewhere",
        ]
    )
    assert pc.select.latency_budget_ms == 7.0 and pc.sweep.retry_failed and not pc.bundle and not pc.triton
    assert pc.sweep.precisions == ["fp32"] and pc.sweep.finetune == [True] and pc.out == "elsewhere"
    # what no flag named keeps the file's value, else the field default (argparse defaults suppressed)
    assert pc.sweep.batch_sizes == [2] and pc.select.objective == "min_latency"
    assert pc.sweep.finetune_epochs == 8 and pc.sweep.val_fraction == config.DEFAULT_VAL_FRACTION
    # flags are checked like TOML values
    with pytest.raises(UserInputError, match="--precisions: unknown value 'fp64'"):
        _parse(["run", "--config", f, "--precisions", "fp32,fp64"])
    with pytest.raises(SystemExit):
        _parse(["run", "--config", f, "--batch-sizes", "1,x"])


def test_every_setting_has_one_flag_and_one_toml_key():
    leaves = list(config.leaves(PipelineConfig))
    flags = [leaf.flag for leaf in leaves]
    keys = [leaf.dest for leaf in leaves]
    assert len(set(flags)) == len(flags) and len(set(keys)) == len(keys)
    assert {leaf.section for leaf in leaves} == set(config.SECTIONS)
    # README's documented spellings
    by_dest = {leaf.dest: leaf.flag for leaf in leaves}
    assert by_dest["model.spec"] == "--model" and by_dest["data.train"] == "--data"
    assert by_dest["data.eval"] == "--eval-data" and by_dest["select.batch_size"] == "--target-batch"
    assert by_dest["output.dir"] == "--out" and by_dest["output.bundle"] == "--no-bundle"
    # README's commands parse
    p = build_parser()
    a = p.parse_args(["sweep", "--checkpoint", "CK.pt", "--data", "T", "--eval-data", "V", "--out", "sweep"])
    cfg_flags = config.values_from_args(a, SweepConfig)
    assert cfg_flags == {"model.checkpoint": "CK.pt", "data.train": "T", "data.eval": "V"}
    a = p.parse_args(["select", "--sweep", "s.json", "--latency-budget-ms", "5", "--target-batch", "1"])
    assert config.values_from_args(a, SelectionConfig) == {"select.latency_budget_ms": 5.0, "select.batch_size": 1}
    # one default for the held-out share: sweep, run and finetune agree
    f = p.parse_args(["finetune", "--data", "d", "--resolutions", "64", "--out", "o"])
    assert f.val_fraction == SweepConfig.__dataclass_fields__["val_fraction"].default == 0.3


def test_effective_config_round_trips(workdir):
    sweep = SweepConfig(
        checkpoint=str(workdir / "base.pt"),
        train_data=str(workdir / "data" / "train"),
        model="fixres:tiny_resnet",
        resolutions=[64, 96],
        precisions=["fp32"],
        backends=["onnxruntime"],
        finetune=[True],
        finetune_lr=0.01,
        latency={"repeats": 2, "budget_s": 0.5, "percentiles": [50.0, 95.0], "check_load": False},
        store=str(workdir / 'store "quoted"'),
    )
    pc = PipelineConfig(
        sweep=sweep, out=str(workdir / "out"), select=SelectionConfig(max_drop=0.01, precision="int8"), tar=True
    )
    path = config.write_effective_config(pc, workdir / "out")
    assert path == str(workdir / "out" / config.EFFECTIVE_CONFIG)
    doc = tomllib.loads(open(path).read())
    assert doc["schema_version"] == config.SCHEMA_VERSION and doc["model"]["spec"] == "fixres:tiny_resnet"
    assert "eval" not in doc["data"]  # None: left out, read back as the default
    assert config.read_config(path) == pc
    # the sweep command writes its own sections only, read back the same way
    p2 = config.write_effective_config(sweep, workdir / "s")
    assert config.read_config(p2, SweepConfig) == sweep
    assert "[output]" not in open(p2).read()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, demo_small):
    import torch

    from fixres_deploy.models.registry import build_model, save_checkpoint

    torch.manual_seed(0)
    model, _, _ = build_model("fixres:tiny_resnet", 10)
    path = tmp_path_factory.mktemp("cfg_ck") / "base.pt"
    save_checkpoint(
        path,
        model,
        spec="fixres:tiny_resnet",
        num_classes=10,
        class_names=sorted(os.listdir(f"{demo_small}/train")),
        preprocess={"test_input_size": 64, "train_input_size": 64},
    )
    return str(path)


def test_run_applies_flags_over_the_file_and_writes_the_effective_config(tmp_path, tiny_ckpt, demo_small, capsys):
    (tmp_path / "run.toml").write_text(f"""
[model]
checkpoint = "{tiny_ckpt}"

[data]
train = "{demo_small}/train"
eval = "{demo_small}/val"

[sweep]
resolutions = [64]
precisions = ["fp32"]
batch_sizes = [2]
shape_modes = ["fixed"]
finetune = [false]
exporter = "torchscript"
latency = {{ warmup_iters = 1, warmup_s = 0.0, min_iters = 3, max_iters = 3, repeats = 1, check_load = false }}

[select]
latency_budget_ms = 1000.0

[output]
dir = "out"
""")
    argv = ["run", "--config", str(tmp_path / "run.toml"), "--no-bundle", "--no-triton", "--latency-budget-ms", "2000"]
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = tmp_path / "out"
    assert (out / "report.json").exists() and not (out / "bundle").exists() and not (out / "triton").exists()
    assert summary["config"] == str(out / config.EFFECTIVE_CONFIG)
    effective = config.read_config(out / config.EFFECTIVE_CONFIG)
    assert not effective.bundle and not effective.triton and effective.select.latency_budget_ms == 2000.0
    assert effective.sweep.backends == ["onnxruntime"] and effective.sweep.checkpoint == tiny_ckpt
    report = json.loads((out / "report.json").read_text())
    assert report["selection_config"]["latency_budget_ms"] == 2000.0
    # the effective config reproduces the run: everything is a store hit
    assert main(["run", "--config", str(out / config.EFFECTIVE_CONFIG), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["store"]["misses"] == 0 and again["selected"] == summary["selected"]
