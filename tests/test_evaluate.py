import json
import os

import numpy as np
import pytest
import torch

from fixres_deploy.cli.app import main
from fixres_deploy.core.errors import DataError
from fixres_deploy.core.preprocess import PreprocessConfig
from fixres_deploy.core.stats import mcnemar_test, wilson_interval
from fixres_deploy.data.folders import index_image_folder, split_by_hash
from fixres_deploy.fixres.evaluate import AccuracyMeter, EvalResult, evaluate_model
from fixres_deploy.models.registry import build_model


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(81, 263)  # textbook example: 0.3080 [0.2553, 0.3662]
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_counts_discordant_pairs():
    a = [True] * 30 + [False] * 10 + [True] * 60
    b = [False] * 30 + [True] * 10 + [True] * 60
    r = mcnemar_test(a, b)
    assert (r["b"], r["c"]) == (30, 10)
    assert r["p_value"] < 0.01 and r["diff"] == pytest.approx(0.2)
    same = mcnemar_test(a, a)
    assert same["p_value"] == 1.0


def test_meter_topk():
    m = AccuracyMeter()
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]], dtype=np.float32)
    m.update(logits, np.array([1, 2, 0]), np.array([2, 0, 1]))
    r = m.result()
    assert r.top1 == pytest.approx(1 / 3) and r.top5 == 1.0 and r.n == 3
    # per-image results come back in image order, and survive JSON
    assert list(r.indices) == [0, 1, 2] and list(r.correct1) == [False, False, True]
    again = EvalResult.from_dict(json.loads(json.dumps(r.to_dict(with_per_image=True))))
    assert list(again.correct1) == [False, False, True]


def test_corrupt_images_are_skipped_and_named(random_folder):
    bad = os.path.join(random_folder, "a", "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    empty = os.path.join(random_folder, "b", "empty.png")
    open(empty, "wb").close()
    model, _, _ = build_model("fixres:tiny_resnet", 3)
    res = evaluate_model(model, random_folder, PreprocessConfig(test_input_size=32), batch_size=4, workers=0)
    assert res.skipped == 2 and res.n == 12
    assert sorted(os.path.basename(s["path"]) for s in res.skipped_files) == ["broken.jpg", "empty.png"]


def test_bad_folders_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        index_image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no class sub-folders"):
        index_image_folder(tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="contains no images"):
        index_image_folder(tmp_path / "empty")


def test_hash_split_is_stable_and_disjoint(random_folder):
    idx = index_image_folder(random_folder)
    tr1, va1 = split_by_hash(idx, 0.3)
    _tr2, va2 = split_by_hash(idx, 0.3)
    assert [s.path for s in va1.samples] == [s.path for s in va2.samples]
    assert not {s.path for s in tr1.samples} & {s.path for s in va1.samples}
    assert len(tr1) + len(va1) == len(idx)


def test_held_out_split_as_a_folder_of_links_indexes_the_same(random_folder, tmp_path):
    from fixres_deploy.data.folders import link_index

    _, val = split_by_hash(index_image_folder(random_folder), 0.3)
    out = link_index(val, tmp_path / "val")
    again = index_image_folder(out, classes=val.classes)
    assert [(os.path.basename(s.path), s.label) for s in again.samples] == [
        (os.path.basename(s.path), s.label) for s in val.samples
    ]
    assert all(os.path.islink(s.path) for s in again.samples)
    link_index(val, out)  # a second call keeps the links
    assert len(index_image_folder(out, classes=val.classes)) == len(val)


def test_evaluate_cli_contract(tmp_path, random_folder, capsys):
    model, _, _ = build_model("torchvision:resnet18", 3)
    ck = tmp_path / "ck.pt"
    torch.save(model.state_dict(), ck)
    rc = main(
        [
            "evaluate",
            "--model",
            "torchvision:resnet18",
            "--num-classes",
            "3",
            "--checkpoint",
            str(ck),
            "--data",
            random_folder,
            "--resolution",
            "64",
            "--json",
            "--workers",
            "0",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("top1", "top1_ci", "top5", "n", "skipped"):
        assert key in out
    assert 0 <= out["top1_ci"][0] <= out["top1"] <= out["top1_ci"][1] <= 1
    assert out["n"] == 12 and out["skipped"] == 0


def test_evaluate_cli_bad_inputs(tmp_path, random_folder, capsys):
    model, _, _ = build_model("torchvision:resnet18", 10)
    ck = tmp_path / "ck.pt"
    torch.save(model.state_dict(), ck)
    rc = main(
        [
            "evaluate",
            "--model",
            "torchvision:resnet18",
            "--num-classes",
            "3",
            "--checkpoint",
            str(ck),
            "--data",
            random_folder,
            "--resolution",
            "64",
        ]
    )
    assert rc == 2 and "--num-classes 10" in capsys.readouterr().err
    rc = main(
        [
            "evaluate",
            "--model",
            "torchvision:resnet18",
            "--checkpoint",
            str(ck),
            "--data",
            str(tmp_path / "nowhere"),
            "--resolution",
            "64",
        ]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
