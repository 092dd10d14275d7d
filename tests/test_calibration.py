"""Calibration sets: class-balanced hashed manifests, sha256 verification, eval-transform batches."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

from fixres_deploy.core.errors import DataError, UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig, eval_transform
from fixres_deploy.core.utils import sha256_file
from fixres_deploy.precision.calibration import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    CalibrationManifest,
    calibration_batches,
    load_calibration_manifest,
    make_calibration_manifest,
    set_hash_of,
)


@pytest.fixture
def demo_copy(demo_small, tmp_path):
    """A private copy of the demo train split (tests modify files)."""
    dst = tmp_path / "train"
    shutil.copytree(os.path.join(demo_small, "train"), dst)
    return str(dst)


def test_manifest_is_class_balanced_hashed_and_reproducible(demo_small, tmp_path):
    root = os.path.join(demo_small, "train")
    out = tmp_path / "calibration" / "demo.json"
    m = make_calibration_manifest(root, out, size=25, seed=3)

    assert len(m) == 25
    counts = Counter(i["class"] for i in m.images)
    assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 1
    for item in m.images:
        assert "\\" not in item["path"] and not os.path.isabs(item["path"])
        assert m.classes[item["label"]] == item["class"] == item["path"].split("/")[0]
        assert item["sha256"] == sha256_file(os.path.join(root, *item["path"].split("/")))
    assert m.set_hash == set_hash_of(m.images)

    on_disk = json.loads(out.read_text())
    assert on_disk["format"] == MANIFEST_FORMAT and on_disk["schema_version"] == MANIFEST_VERSION == 2
    assert on_disk["seed"] == 3 and on_disk["size"] == 25 and on_disk["root"] == os.path.abspath(root)
    loaded = load_calibration_manifest(out)
    assert loaded == m and loaded.manifest_path == str(out)

    again = make_calibration_manifest(root, None, size=25, seed=3)
    other = make_calibration_manifest(root, None, size=25, seed=4)
    assert again.set_hash == m.set_hash
    assert other.set_hash != m.set_hash
    # the hash does not depend on the order of the list
    assert set_hash_of(list(reversed(m.images))) == m.set_hash


def test_batches_equal_eval_transform_at_target_resolution(demo_small, tmp_path):
    from fixres_deploy.data.folders import load_rgb

    m = make_calibration_manifest(os.path.join(demo_small, "train"), tmp_path / "c.json", size=12)
    cfg = PreprocessConfig(48, crop_pct=0.8, interpolation="bicubic")
    x = calibration_batches(tmp_path / "c.json", cfg)
    assert x.shape == (12, 3, 48, 48) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    tf = eval_transform(cfg)
    ref = np.stack([tf(load_rgb(p)).numpy() for p, _ in m.resolve()])
    np.testing.assert_array_equal(x, ref)

    # another resolution = another eval transform, not a resize of the same tensors
    x64 = calibration_batches(m, cfg.at_resolution(64))
    assert x64.shape == (12, 3, 64, 64)

    # limit keeps the class balance
    lim = calibration_batches(m, cfg, limit=10)
    assert lim.shape[0] == 10


def test_folder_and_index_sources(demo_small):
    from fixres_deploy.data.folders import class_balanced_subset, index_image_folder

    cfg = PreprocessConfig(32)
    x = calibration_batches(os.path.join(demo_small, "val"), cfg, limit=20)
    assert x.shape == (20, 3, 32, 32)
    idx = class_balanced_subset(index_image_folder(os.path.join(demo_small, "val")), 1)
    assert calibration_batches(idx, cfg).shape == (10, 3, 32, 32)
    with pytest.raises(UserInputError, match="neither a calibration manifest"):
        calibration_batches(os.path.join(demo_small, "nope"), cfg)


def test_changed_and_missing_images_are_named_with_the_fix(demo_copy, tmp_path):
    from PIL import Image

    out = tmp_path / "c.json"
    m = make_calibration_manifest(demo_copy, out, size=10)
    changed = m.images[0]["path"]
    missing = m.images[5]["path"]
    img_path = os.path.join(demo_copy, *changed.split("/"))
    with Image.open(img_path) as img:
        img.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(img_path, format="JPEG")
    os.unlink(os.path.join(demo_copy, *missing.split("/")))

    with pytest.raises(DataError) as err:
        calibration_batches(out, PreprocessConfig(32))
    msg = str(err.value)
    assert changed in msg and missing in msg
    assert "changed" in msg and "missing" in msg and "regenerate" in msg and "fixres-deploy calibration" in msg

    # regenerating fixes it (and gives another set hash: cached ranges are not reused)
    m2 = make_calibration_manifest(demo_copy, out, size=10)
    assert calibration_batches(out, PreprocessConfig(32)).shape[0] == 10
    assert m2.set_hash != m.set_hash


def test_hand_edited_manifest_and_moved_root(demo_copy, tmp_path):
    out = tmp_path / "c.json"
    make_calibration_manifest(demo_copy, out, size=6)
    d = json.loads(out.read_text())

    edited = dict(d, images=[dict(d["images"][0], sha256="0" * 64)] + d["images"][1:])
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(UserInputError, match="set_hash"):
        load_calibration_manifest(tmp_path / "edited.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserInputError, match="is not a fixres-deploy/calibration-set file"):
        load_calibration_manifest(tmp_path / "other.json")
    # a version-1 manifest ("version" key, no schema_version) is refused with both versions and the fix
    old = {k: v for k, v in d.items() if k != "schema_version"} | {"version": 1}
    (tmp_path / "v1.json").write_text(json.dumps(old))
    with pytest.raises(UserInputError, match=r"schema_version None.*reads schema_version 2.*fixres-deploy calibration"):
        load_calibration_manifest(tmp_path / "v1.json")

    moved = tmp_path / "moved"
    shutil.move(demo_copy, moved)
    with pytest.raises(DataError, match="does not exist here"):
        calibration_batches(out, PreprocessConfig(32))
    x = calibration_batches(load_calibration_manifest(out, root=moved), PreprocessConfig(32))
    assert x.shape == (6, 3, 32, 32)
    assert isinstance(CalibrationManifest.from_dict(d), CalibrationManifest)


def test_cli_calibration_json(demo_small, tmp_path, capsys):
    from fixres_deploy.cli.app import main

    out = tmp_path / "calibration" / "demo.json"
    rc = main(
        [
            "calibration",
            "--data",
            os.path.join(demo_small, "train"),
            "--out",
            str(out),
            "--size",
            "30",
            "--seed",
            "1",
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 30 and summary["manifest"] == str(out)
    assert sorted(summary["per_class"].values()) == [3] * 10
    assert load_calibration_manifest(out).set_hash == summary["set_hash"]

    rc = main(["calibration", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x.json")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
