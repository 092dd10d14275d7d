"""Faults injected one by one (issue 8): each must end in a clear error or a correct recovery.

Nothing corrupt may be measured or shipped: corrupt and truncated store artifacts, moved run
folders, a full disk, SIGKILL/SIGTERM mid-stage, symlink loops, 16-bit and other PIL modes,
mismatched classes, oversized resolutions, bad ``--out`` paths, archive bombs, permissions.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fixres_deploy.cli.app import main

# --------------------------------------------------------------------------- a tiny pipeline run


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, demo_small):
    """A tiny_resnet with BN statistics of the demo images (input-dependent predictions)."""
    import torch
    from helpers import spread_model

    from fixres_deploy.core.preprocess import PreprocessConfig, preprocess_pil
    from fixres_deploy.data.folders import index_image_folder, load_rgb
    from fixres_deploy.models.registry import save_checkpoint

    index = index_image_folder(f"{demo_small}/train")
    cfg = PreprocessConfig(test_input_size=64)
    x = np.stack([preprocess_pil(load_rgb(s.path), cfg) for s in index.samples[::4]])
    model = spread_model(x, 10)
    path = tmp_path_factory.mktemp("faults_ck") / "base.pt"
    torch.manual_seed(0)
    save_checkpoint(
        path,
        model,
        spec="fixres:tiny_resnet",
        num_classes=10,
        class_names=index.classes,
        preprocess={"test_input_size": 64, "train_input_size": 64},
    )
    return str(path)


def _write_toml(path, ckpt, demo, out, resolutions=(64,)):
    path.write_text(
        textwrap.dedent(f"""
        [model]
        checkpoint = "{ckpt}"

        [data]
        train = "{demo}/train"
        eval = "{demo}/val"

        [sweep]
        resolutions = {list(resolutions)}
        precisions = ["fp32"]
        backends = ["onnxruntime"]
        batch_sizes = [2]
        shape_modes = ["fixed"]
        finetune = [false]
        exporter = "torchscript"
        latency = {{ warmup_iters = 1, warmup_s = 0.0, min_iters = 3, budget_s = 0.05, repeats = 1, check_load = false }}

        [select]
        objective = "max_accuracy"

        [output]
        dir = "{out}"
        """)
    )
    return str(path)


def _run(config, capsys) -> tuple[int, dict | None, str]:
    rc = main(["run", "--config", config, "--json"])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else None), cap.err


def _selected_engine(out) -> str:
    rep = json.loads(open(os.path.join(out, "report.json")).read())
    return rep["points"][rep["selected"]]["engine_path"]


def _umask() -> int:
    from fixres_deploy.core.utils import current_umask

    return current_umask()


def _bundle_engine_sha(out) -> str:
    manifest = json.loads(open(os.path.join(out, "bundle", "manifest.json")).read())
    engine_file = manifest["engines"][0]["file"]
    return _sha(os.path.join(out, "bundle", engine_file))


# --------------------------------------------------------------------------- 1. corrupt artifacts


def _zero_weights(path) -> None:
    import onnx

    size = os.path.getsize(path)
    raw = max((t.raw_data for t in onnx.load(str(path)).graph.initializer), key=len)
    data = open(path, "rb").read()
    start = data.find(raw)
    assert start > 0 and len(raw) > 1000
    a, b = start + len(raw) // 4, start + 3 * len(raw) // 4
    with open(path, "wb") as f:
        f.write(data[:a] + b"\0" * (b - a) + data[b:])
    assert os.path.getsize(path) == size
    onnx.load(str(path))  # still parses


def test_1_corrupt_and_truncated_store_artifacts_are_quarantined_and_recomputed(
    tmp_path, base_ckpt, demo_small, capsys, caplog
):
    out = tmp_path / "run"
    config = _write_toml(tmp_path / "run.toml", base_ckpt, demo_small, "run")
    rc, _, _ = _run(config, capsys)
    assert rc == 0
    engine = _selected_engine(out)
    assert engine.startswith(str(out / "store" / "artifacts"))
    good_sha = _sha(engine)
    assert _bundle_engine_sha(out) == good_sha
    top1 = json.loads((out / "report.json").read_text())["points"][0]["top1"]

    # zero the middle half of its largest weight tensor: same size, still a valid ONNX file,
    # wrong predictions (the 92% -> 41%)
    _zero_weights(engine)
    size = os.path.getsize(engine)
    caplog.clear()
    rc, second, _ = _run(config, capsys)
    assert rc == 0
    assert "failed verification" in caplog.text and engine in caplog.text
    assert second["store"]["misses"] >= 1
    quarantined = list((out / "store" / "quarantine").iterdir())
    assert len(quarantined) == 1 and (quarantined[0] / "problems.txt").read_text().count("sha256") == 1
    assert _sha(engine) == good_sha  # recomputed
    assert _bundle_engine_sha(out) == good_sha  # the bundle ships the recomputed engine
    assert json.loads((out / "report.json").read_text())["points"][0]["top1"] == top1

    # a truncated artifact recovers the same way (it used to block every rerun)
    with open(engine, "r+b") as f:
        f.truncate(size // 2)
    caplog.clear()
    rc, _, _ = _run(config, capsys)
    assert rc == 0 and "truncated" in caplog.text
    assert _sha(engine) == good_sha and _bundle_engine_sha(out) == good_sha

    # `store check` reports a bad record (exit 1) and quarantines it; then the store is clean
    with open(engine, "r+b") as f:
        f.write(b"garbage")
    assert main(["store", "check", str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["bad"]) == 1 and report["bad"][0]["stage"] == "engine"
    assert not os.path.exists(engine)
    assert main(["store", "check", str(out / "store"), "--json"]) == 0
    capsys.readouterr()
    # gc: quarantine and nothing else (every artifact folder is referenced)
    assert main(["store", "gc", str(out), "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["unreferenced"] == [] and len(planned["quarantine"]) == 3
    assert (out / "store" / "quarantine").exists()
    assert main(["store", "gc", str(out), "--json"]) == 0
    capsys.readouterr()
    assert list((out / "store" / "quarantine").iterdir()) == []


def test_1b_one_key_quarantined_twice_within_a_second(tmp_path):
    """Two quarantines of one key by one process in the same second once collided (Errno 39)."""
    from fixres_deploy.sweep.store import ResultStore

    store = ResultStore(tmp_path / "store")

    def make(d):
        (d / "engine.onnx").write_bytes(b"engine bytes")
        return {"path": str(d / "engine.onnx"), "files": [str(d / "engine.onnx")]}

    dests = []
    for _ in range(2):
        rec, _ = store.run("engine", {"k": 1}, make)
        dests.append(store.quarantine(rec["key"], ["test"]))
    assert dests[0] != dests[1] and all((d / "artifacts" / "engine.onnx").exists() for d in dests)
    assert stat.S_IMODE(os.stat(dests[0]).st_mode) == 0o777 & ~_umask()


# --------------------------------------------------------------------------- 2. copied run folder


def test_2_copied_run_folder_uses_its_own_files(tmp_path, base_ckpt, demo_small, capsys):
    config_a = _write_toml(tmp_path / "a.toml", base_ckpt, demo_small, "runs/a")
    rc, _, _ = _run(config_a, capsys)
    assert rc == 0
    run_a, run_b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    shutil.copytree(run_a, run_b, symlinks=True)
    shutil.rmtree(run_a)  # the original is gone: nothing may point into it
    config_b = _write_toml(tmp_path / "b.toml", base_ckpt, demo_small, "runs/b")
    rc, second, _ = _run(config_b, capsys)
    assert rc == 0, "the copied run must work without the original folder"
    assert second["store"]["misses"] == 0  # every stage reused from the copied store
    assert _selected_engine(run_b).startswith(str(run_b / "store"))
    assert _bundle_engine_sha(run_b) == _sha(_selected_engine(run_b))
    # no stored record, manifest or Triton file names the original folder (nor any absolute store path)
    for folder in ("store/objects", "bundle", "triton"):
        for dirpath, _, files in os.walk(run_b / folder):
            for name in files:
                text = open(os.path.join(dirpath, name), "rb").read().decode("utf-8", "replace")
                assert str(run_a) not in text, os.path.join(dirpath, name)
                if folder != "triton":
                    assert str(run_b / "store") not in text, os.path.join(dirpath, name)


# --------------------------------------------------------------------------- 3. transient failures


def test_3_disk_full_is_not_cached_and_the_rerun_completes(tmp_path, base_ckpt, demo_small, capsys, monkeypatch):
    import fixres_deploy.engines.engine as engine_mod

    config = _write_toml(tmp_path / "run.toml", base_ckpt, demo_small, "run", resolutions=(64, 96))
    real = engine_mod.build_verified_engine
    calls = {"n": 0}

    def full_disk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second engine: the disk fills up while writing it
            raise OSError(errno.ENOSPC, "No space left on device", "engine.onnx")
        return real(*a, **k)

    monkeypatch.setattr(engine_mod, "build_verified_engine", full_disk)
    rc, _, err = _run(config, capsys)
    assert rc != 0, "a full disk must fail the run, not drop points"
    assert "No space left on device" in err and "run the same command again" in err
    monkeypatch.setattr(engine_mod, "build_verified_engine", real)
    rc, summary, _ = _run(config, capsys)
    assert rc == 0
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(rep["points"]) == 2 and all(p["error"] is None for p in rep["points"])
    assert summary["store"]["hits"] > 0  # the first engine and everything before it were kept


def test_3_error_kinds():
    from fixres_deploy.sweep.store import DETERMINISTIC, ENVIRONMENTAL, error_kind

    assert error_kind(OSError(errno.ENOSPC, "full")) == ENVIRONMENTAL
    assert error_kind(OSError(errno.EDQUOT, "quota")) == ENVIRONMENTAL
    assert error_kind(MemoryError()) == ENVIRONMENTAL
    assert error_kind(subprocess.CalledProcessError(-9, ["trtexec"])) == ENVIRONMENTAL
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError("export failed") from inner
    except RuntimeError as wrapped:
        assert error_kind(wrapped) == ENVIRONMENTAL
    assert error_kind(RuntimeError("TensorRT cannot build this graph")) == DETERMINISTIC
    assert error_kind(FileNotFoundError(errno.ENOENT, "x")) == DETERMINISTIC


# --------------------------------------------------------------------------- 10. orphan temp folders

_STAGE_SCRIPT = """
import sys, time
from pathlib import Path
from fixres_deploy.sweep.store import ResultStore
try:
    from fixres_deploy.core.interrupt import sigterm_as_interrupt
except ImportError:  # before the fix: SIGTERM kills at once
    from contextlib import nullcontext as sigterm_as_interrupt

store = ResultStore(sys.argv[1])
def slow(d):
    (d / "half.bin").write_bytes(b"x" * 1000)
    Path(sys.argv[2]).write_text("ready")
    time.sleep(60)
    return {}
with sigterm_as_interrupt():
    store.run("slow", {"a": 1}, slow)
"""


def _start_stage(tmp_path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", _STAGE_SCRIPT, str(tmp_path / "store"), str(ready)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "stage did not start"
        time.sleep(0.05)
    return proc


def _temp_dirs(store):
    return [p for p in (store / "artifacts").iterdir() if p.name.startswith(".")]


def test_10_sigkill_orphans_are_removed_and_sigterm_cleans_up(tmp_path, capsys):
    from fixres_deploy.sweep.store import ResultStore

    store = tmp_path / "store"
    proc = _start_stage(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    orphans = _temp_dirs(store)
    assert len(orphans) == 1  # SIGKILL leaves the temp folder: nothing can run
    # `store gc --dry-run` lists it; opening the store (any run) removes it
    assert main(["store", "gc", str(store), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["orphans"] == [str(orphans[0])]
    ResultStore(store)
    assert _temp_dirs(store) == []
    # a live process's temp folder is left alone
    (tmp_path / "ready").unlink()
    proc = _start_stage(tmp_path)
    ResultStore(store)
    assert len(_temp_dirs(store)) == 1
    # SIGTERM: the process cleans up its own temp folder and exits 143-style
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    assert _temp_dirs(store) == []
    assert list(ResultStore(store).records()) == []


def test_store_record_schema_and_old_records(tmp_path, caplog):
    """Records are stamped (format, schema_version); an old record is a miss, said so."""
    from fixres_deploy.sweep.store import STORE_RECORD_FORMAT, STORE_SCHEMA_VERSION, ResultStore

    store = ResultStore(tmp_path)
    rec, _ = store.run("s", {"a": 1}, lambda d: {"path": str(d / "f.txt")} if (d / "f.txt").write_text("x") else {})
    raw = json.loads(store._record_path(rec["key"]).read_text())
    assert raw["format"] == STORE_RECORD_FORMAT and raw["schema_version"] == STORE_SCHEMA_VERSION
    assert raw["result"]["path"] == f"@store/artifacts/{rec['key']}/f.txt"
    assert raw["files"] == {"f.txt": {"size_bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}}
    raw["schema_version"] = 1
    store._record_path(rec["key"]).write_text(json.dumps(raw))
    calls = []
    _, cached = store.run("s", {"a": 1}, lambda d: calls.append(1) or {})
    assert not cached and calls and "schema_version 1" in caplog.text


# --------------------------------------------------------------------------- 4. resource bounds


def test_4_oversized_resolution_is_refused_before_any_work(tmp_path, demo_small, capsys, monkeypatch):
    import fixres_deploy.models.registry as registry

    def no_work(*a, **k):
        raise AssertionError("the model was loaded: the limit must be checked first")

    monkeypatch.setattr(registry, "load_model", no_work)
    monkeypatch.delenv("FIXRES_MAX_PIXELS", raising=False)
    data = f"{demo_small}/val"
    rc = main(
        ["evaluate", "--model", "fixres:tiny_resnet", "--num-classes", "10", "--data", data, "--resolution", "100000"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "100000x100000" in err and "--max-pixels" in err and "available memory" in err
    # finetune and bench are bounded the same way
    rc = main(
        [
            "finetune",
            "--model",
            "fixres:tiny_resnet",
            "--data",
            data,
            "--resolutions",
            "64,100000",
            "--out",
            str(tmp_path / "ft"),
        ]
    )
    assert rc == 2 and "--max-pixels" in capsys.readouterr().err
    rc = main(["bench", "--onnx", "missing.onnx", "--resolutions", "100000", "--batch-sizes", "1"])
    assert rc == 2 and "--max-pixels" in capsys.readouterr().err
    # the limit can be set explicitly: by flag or environment (named in the message)
    rc = main(
        [
            "evaluate",
            "--model",
            "fixres:tiny_resnet",
            "--data",
            data,
            "--resolution",
            "64",
            "--batch-size",
            "4",
            "--max-pixels",
            "1000",
        ]
    )
    assert rc == 2 and "limit of 1,000 (--max-pixels)" in capsys.readouterr().err
    monkeypatch.setenv("FIXRES_MAX_PIXELS", "2000")
    rc = main(["evaluate", "--model", "fixres:tiny_resnet", "--data", data, "--resolution", "64"])
    assert rc == 2 and "limit of 2,000 (FIXRES_MAX_PIXELS)" in capsys.readouterr().err


def test_4_limit_from_memory_and_the_sweep_checks_it(tmp_path, base_ckpt, demo_small, monkeypatch, capsys):
    from fixres_deploy.core import limits

    monkeypatch.delenv("FIXRES_MAX_PIXELS", raising=False)
    monkeypatch.setattr(limits, "available_memory_bytes", lambda: 8 * 2**30)
    limit, source = limits.max_pixels()
    assert limit == 8 * 2**30 * limits.MEMORY_FRACTION // limits.BYTES_PER_INPUT_PIXEL and "8.0 GiB" in source
    assert limits.available_memory_bytes() == 8 * 2**30
    monkeypatch.undo()
    assert limits.available_memory_bytes() > 0  # read from this machine (/proc/meminfo or sysconf)
    config = _write_toml(tmp_path / "run.toml", base_ckpt, demo_small, "run", resolutions=(64, 50000))
    rc, _, err = _run(config, capsys)
    assert rc == 2 and "50000x50000" in err and "--max-pixels" in err
    assert not (tmp_path / "run" / "store" / "artifacts").exists() or not any(
        (tmp_path / "run" / "store" / "artifacts").iterdir()
    )


# --------------------------------------------------------------------------- 8. --out validated up front


def _immutable_folder(path):
    """A folder nobody (root included) can write in: chattr +i, or mode 0555 for non-root."""
    path.mkdir()
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(path)], check=False)
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    pytest.skip("no way to make a read-only folder here (root without chattr)")


@pytest.mark.parametrize(
    "cmd, kind",
    [
        (["build", "--onnx", "m.onnx", "--resolutions", "64"], "dir"),
        (["export", "--checkpoint", "c.pt", "--resolution", "64"], "file"),
        (["bench", "--onnx", "m.onnx"], "file"),
        (["triton", "--bundle", "b"], "dir"),
        (["bundle", "--index", "i.json", "--artifact", "0"], "dir"),
        (["sweep", "--checkpoint", "c.pt", "--data", "d"], "dir"),
    ],
)
def test_8_bad_out_is_one_clear_error(tmp_path, capsys, cmd, kind):
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    wrong = a_file if kind == "dir" else a_folder
    assert main([*cmd, "--out", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"--out '{wrong}'" in err
    assert ("is an existing file" if kind == "dir" else "is a folder") in err
    # under a file: nothing can be created
    assert main([*cmd, "--out", str(a_file / "sub" / "x")]) == 2
    assert "is a file" in capsys.readouterr().err
    # a read-only folder
    ro = tmp_path / "ro"
    restore = _immutable_folder(ro)
    try:
        assert main([*cmd, "--out", str(ro / "out")]) == 2
        err = capsys.readouterr().err
        assert "cannot write in" in err and str(ro) in err
    finally:
        restore()


def test_8_run_checks_its_output_folder(tmp_path, base_ckpt, demo_small, capsys):
    (tmp_path / "taken").write_text("x")
    config = _write_toml(tmp_path / "run.toml", base_ckpt, demo_small, "taken")
    rc, _, err = _run(config, capsys)
    assert rc == 2 and "is an existing file" in err and "[output] dir" in err


# --------------------------------------------------------------------------- 12. smaller ones


def test_12_resolution_lists(capsys, caplog):
    from fixres_deploy.core.errors import UserInputError
    from fixres_deploy.core.utils import parse_int_list
    from fixres_deploy.sweep.config import SweepConfig

    assert main(["bench", "--onnx", "m.onnx", "--resolutions", ""]) == 2
    err = capsys.readouterr().err
    assert "--resolutions is empty" in err and "profile" not in err
    assert parse_int_list("64,96,64", "--resolutions") == [64, 96]
    assert "more than once" in caplog.text
    with pytest.raises(UserInputError, match="empty"):
        SweepConfig(checkpoint="c.pt", train_data="d", resolutions=[])


def test_12_ansi_escapes_are_stripped_from_errors(capsys, monkeypatch):
    import fixres_deploy.cli.app as app
    from fixres_deploy.core.errors import UserInputError

    def colored(args):
        raise UserInputError("\x1b[31mbad\x1b[0m input \x1b[1;33mhere\x1b[0m")

    monkeypatch.setitem(app.COMMANDS, "prior", colored)
    assert main(["prior", "--train-res", "64"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "bad input here" in err


# --------------------------------------------------------------------------- 5. symlink loops


def test_5_symlink_loops_are_listed_once(tmp_path, capsys, caplog):
    from conftest import write_random_folder

    from fixres_deploy.data.folders import index_image_folder

    root = tmp_path / "imgs"
    write_random_folder(str(root), classes=("a", "b", "circle"), per_class=4)
    (root / "circle" / "loop").symlink_to("..")  # back to the root: every class again, forever
    (root / "a" / "self").symlink_to(".")
    (root / "b" / "deeper").mkdir()
    (root / "b" / "deeper" / "up").symlink_to("../..")
    index = index_image_folder(str(root))
    assert len(index) == 12 and index.classes == ["a", "b", "circle"]
    assert sorted(os.path.basename(s.path) for s in index.samples) == sorted(
        f"{c}_{i}.{'png' if i % 2 else 'jpg'}" for c in ("a", "b", "circle") for i in range(4)
    )
    assert "symlink loop" in caplog.text and "loop" in caplog.text
    # a link to a folder outside is followed (once)
    outside = tmp_path / "more"
    write_random_folder(str(outside), classes=("x",), per_class=2)
    (root / "a" / "extra").symlink_to(outside / "x")
    from fixres_deploy.data.folders import walk_images

    assert len(walk_images(root / "a")) == 6
    rc = main(
        ["evaluate", "--model", "fixres:tiny_resnet", "--num-classes", "3", "--data", str(root)]
        + ["--resolution", "32", "--json", "--workers", "0"]
    )
    assert rc == 0 and json.loads(capsys.readouterr().out)["n"] == 14


def test_12_predict_on_an_empty_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    rc = main(["predict", "--bundle", str(tmp_path / "no_bundle"), str(tmp_path / "empty")])
    cap = capsys.readouterr()
    assert rc == 2 and "holds no image files" in cap.err and cap.out == ""


# --------------------------------------------------------------------------- 6. every PIL mode


def _gray_rgb(img):
    from fixres_deploy.core.preprocess import to_rgb

    out = to_rgb(img)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_6_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    """A dark 16-bit image used to come out all white (saturated at 255) with 0.74 confidence."""
    from PIL import Image

    from fixres_deploy.core.preprocess import PreprocessConfig, eval_transform, preprocess_pil
    from fixres_deploy.data.folders import load_rgb

    values = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    values[:, :8] = 1000  # dark: 1000/65535 of full scale
    path = tmp_path / "scan16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")  # what PIL makes of a 16-bit PNG
    rgb = np.asarray(load_rgb(str(path)))
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 1], expected)
    assert rgb[:, :8].max() == 4 and rgb.mean() < 140  # not saturated
    # the torch-free runtime's preprocessing and the torchvision one see the same pixels
    cfg = PreprocessConfig(test_input_size=32)
    with Image.open(path) as raw:
        raw.load()
        a = preprocess_pil(raw, cfg)
        b = eval_transform(cfg)(raw).numpy()
    assert np.allclose(a, b, atol=1e-5)
    assert np.allclose(a, preprocess_pil(Image.fromarray(rgb), cfg))


def test_6_mode_I16B():
    from PIL import Image

    values = np.array([[0, 257, 65535, 32768]], dtype=">u2")
    img = Image.frombytes("I;16B", (4, 1), values.tobytes())
    assert img.mode == "I;16B"
    assert _gray_rgb(img)[0, :, 0].tolist() == [0, 1, 255, 128]


def test_6_mode_I_32bit_int():
    from PIL import Image

    img = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32))
    assert img.mode == "I"
    assert _gray_rgb(img)[0, :, 0].tolist() == [0, 255, 255, 0]  # 16-bit range, clipped


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_6_mode_F(scale):
    from PIL import Image

    img = Image.fromarray(
        np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32) * np.float32(scale / 2 if scale > 1 else 1)
    )
    assert img.mode == "F"
    got = _gray_rgb(img)[0, :, 0].tolist()
    if scale == 1.0:  # [0, 1] data (max 2.0 > 1 here: read as [0, 255])
        assert got == [0, 0, 1, 2]
    else:
        assert got == [0, 64, 128, 255]
    assert _gray_rgb(Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32)))[0, :, 0].tolist() == [0, 64, 255]


def test_6_mode_P_with_transparency():
    from PIL import Image

    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 1  # the blue entry is transparent
    assert _gray_rgb(img)[0].tolist() == [[255, 0, 0], [255, 255, 255]]
    del img.info["transparency"]
    assert _gray_rgb(img)[0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_6_mode_PA():
    from PIL import Image

    img = Image.new("RGBA", (2, 1))
    img.putdata([(10, 20, 30, 255), (10, 20, 30, 0)])
    pa = img.convert("P").convert("PA")
    pa.putpixel((1, 0), (pa.getpixel((1, 0))[0], 0))
    assert pa.mode == "PA"
    assert _gray_rgb(pa)[0].tolist() == [[10, 20, 30], [255, 255, 255]]


def test_6_modes_RGBA_and_LA_on_white():
    from PIL import Image

    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 0), (200, 100, 0, 255), (0, 0, 0, 128)])
    got = _gray_rgb(rgba)[0].tolist()
    assert got[0] == [255, 255, 255] and got[1] == [200, 100, 0] and all(126 <= v <= 128 for v in got[2])
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (40, 255)])
    assert _gray_rgb(la)[0].tolist() == [[255, 255, 255], [40, 40, 40]]


def test_6_modes_CMYK_YCbCr_1_L():
    from PIL import Image

    assert _gray_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0)))[0, 0].tolist() == [255, 255, 255]
    assert _gray_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))[0, 0].tolist() == [255, 0, 0]
    src = Image.new("RGB", (1, 1), (200, 60, 30))
    assert np.abs(_gray_rgb(src.convert("YCbCr"))[0, 0].astype(int) - [200, 60, 30]).max() <= 3
    bw = Image.new("1", (2, 1))
    bw.putpixel((1, 0), 1)
    assert _gray_rgb(bw)[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    assert _gray_rgb(Image.new("L", (1, 1), 77))[0, 0].tolist() == [77, 77, 77]


# --------------------------------------------------------------------------- 7. class folders vs checkpoint


def test_7_class_folders_must_match_the_checkpoint(tmp_path, demo_small, capsys):
    import torch

    from fixres_deploy.models.registry import build_model, save_checkpoint

    classes = sorted(os.listdir(f"{demo_small}/val"))
    nine = tmp_path / "nine"
    for c in classes[1:]:  # the first class is missing: every label would shift by one
        shutil.copytree(f"{demo_small}/val/{c}", nine / c)
    model, _, _ = build_model("fixres:tiny_resnet", 10)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    args = ["evaluate", "--model", "fixres:tiny_resnet", "--checkpoint", str(plain), "--resolution", "32"]
    rc = main([*args, "--data", str(nine)])
    err = capsys.readouterr().err
    assert rc == 2 and "9 class folders" in err and "10 outputs" in err and classes[1] in err
    assert "records its class names" in err
    # the full folder is fine
    assert main([*args, "--data", f"{demo_small}/val", "--workers", "0", "--json"]) == 0
    capsys.readouterr()
    # a checkpoint with names: a subset is mapped by name; an unknown folder names both lists
    named = save_checkpoint(
        tmp_path / "named.pt", model, spec="fixres:tiny_resnet", num_classes=10, class_names=classes
    )
    args = ["evaluate", "--checkpoint", str(named), "--resolution", "32", "--workers", "0", "--json"]
    assert main([*args, "--data", str(nine)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 9 * len(os.listdir(nine / classes[1]))
    (nine / "zebra").mkdir()
    shutil.copy(next((nine / classes[1]).iterdir()), nine / "zebra")
    assert main([*args, "--data", str(nine)]) == 2
    err = capsys.readouterr().err
    assert "['zebra']" in err and "model classes" in err and classes[0] in err


# --------------------------------------------------------------------------- 9. archive bombs


def _tar_with(path, members: list[tuple[str, int]], *, declared_only: bool = False):
    """A .tar.gz with files of the given sizes (``declared_only``: the last member is a header without data)."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tf:
        for name, size in members:
            info = tarfile.TarInfo(name)
            info.size = size
            info.mode = 0o644
            last = name == members[-1][0]
            tf.addfile(info, None if declared_only and last else io.BytesIO(b"\0" * size))
    return str(path)


def test_9_archive_bombs_are_refused_from_their_headers(tmp_path, capsys, monkeypatch):
    from fixres_deploy.ship.archive import extract_bundle
    from fixres_deploy.ship.manifest import BundleError

    monkeypatch.delenv("FIXRES_BUNDLE_MAX_FILES", raising=False)
    monkeypatch.delenv("FIXRES_BUNDLE_MAX_BYTES", raising=False)
    # a header declaring 20 GiB (the data is not even there): refused before anything is written
    bomb = _tar_with(
        tmp_path / "bomb.tar.gz", [("b/manifest.json", 10), ("b/huge.bin", 20 * 2**30)], declared_only=True
    )
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match="refused; nothing was extracted.*over the budget"):
        extract_bundle(bomb, dest)
    assert list(dest.iterdir()) == []
    rc = main(["bundle", "--verify", bomb])
    out = capsys.readouterr().out
    assert rc == 3 and "FIXRES_BUNDLE_MAX_BYTES" in out
    # budgets from the environment: total bytes and number of files
    small = _tar_with(tmp_path / "small.tar.gz", [(f"b/f{i}.bin", 500) for i in range(10)])
    monkeypatch.setenv("FIXRES_BUNDLE_MAX_BYTES", "2000")
    with pytest.raises(BundleError, match="over the budget of 2,000"):
        extract_bundle(small, tmp_path / "d2")
    assert list((tmp_path / "d2").iterdir()) == []
    monkeypatch.delenv("FIXRES_BUNDLE_MAX_BYTES")
    monkeypatch.setenv("FIXRES_BUNDLE_MAX_FILES", "5")
    with pytest.raises(BundleError, match="more than 5 files"):
        extract_bundle(small, tmp_path / "d3")
    assert list((tmp_path / "d3").iterdir()) == []
    monkeypatch.setenv("FIXRES_BUNDLE_MAX_FILES", "50")
    with pytest.raises(BundleError, match="holds no manifest.json"):  # within budget: extracted, then checked
        extract_bundle(small, tmp_path / "d4")


# --------------------------------------------------------------------------- 11. permissions


def test_11_shipped_files_are_readable_by_other_users(tmp_path):
    from test_bundle import export_onnx, ort_artifact

    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.ship.archive import bundle_tar_path
    from fixres_deploy.ship.bundle import make_bundle
    from fixres_deploy.ship.triton import export_triton_repository

    onnx = export_onnx(tmp_path / "m.onnx")
    old = os.umask(0o022)
    try:
        out = tmp_path / "bundle"
        make_bundle(
            out,
            engines=[ort_artifact(onnx)],
            onnx_sources=[],
            preprocess=PreprocessConfig(test_input_size=64),
            class_names=[f"c{i}" for i in range(10)],
            model={},
            metrics={},
            tar=True,
        )
        triton = export_triton_repository(out, tmp_path / "triton")
        modes = {}
        for root in (out, triton):
            modes[root] = stat.S_IMODE(os.stat(root).st_mode)
            for dirpath, dirnames, filenames in os.walk(root):
                for name in dirnames + filenames:
                    full = os.path.join(dirpath, name)
                    modes[full] = stat.S_IMODE(os.stat(full).st_mode)
        modes[bundle_tar_path(out)] = stat.S_IMODE(os.stat(bundle_tar_path(out)).st_mode)
        wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o755 if os.path.isdir(p) else 0o644)}
        assert wrong == {}
        assert any(str(p).endswith("manifest.json") for p in modes)
        # a stricter umask is honoured ("unless told otherwise")
        os.umask(0o077)
        make_bundle(
            tmp_path / "private",
            engines=[ort_artifact(onnx)],
            onnx_sources=[],
            preprocess=PreprocessConfig(test_input_size=64),
            class_names=[f"c{i}" for i in range(10)],
            model={},
            metrics={},
        )
        assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(tmp_path / "private" / "manifest.json").st_mode) == 0o600
    finally:
        os.umask(old)
