"""Multi-process runs on CPU with gloo: fine-tune, evaluation, failure and sharded sweeps.

Processes are launched as torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT per process; one
test goes through torchrun itself) on a tiny model and the small generated demo folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.models.registry import build_model, save_checkpoint
from fixres_deploy.sweep import shard as shard_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "dist_worker.py")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# The training path differs between 1 and 2 ranks only through the BN layer's batch statistics
# in train mode (each rank normalises its half of the global batch); measured max |Δw| / max |w|
# of the classifier is about 1e-2 on this data: the tolerance below leaves room for it.
TRAIN_REL_TOL = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(FIXRES_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO, **extra)
    return env


def launch(world: int, args: list[str], *, worker_opts=(), timeout_s: float = 300, **extra_env):
    """Run the worker as ``world`` processes (world 1: no launcher variables at all).

    The rendezvous port is picked free just before; if another process on this shared
    machine took it in between, the launch is repeated once on a new port.
    """
    runs = _launch(world, args, worker_opts, timeout_s, extra_env)
    if world > 1 and any("address already in use" in err.lower() for _, _, err in runs):
        runs = _launch(world, args, worker_opts, timeout_s, extra_env)
    return runs


def _launch(world, args, worker_opts, timeout_s, extra_env):
    port = _free_port()
    procs = []
    for r in range(world):
        env = _env(**extra_env)
        if world > 1:
            env.update(
                RANK=str(r),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(r),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, *worker_opts, "--", *args]
                if args[0] != "eval"
                else [sys.executable, WORKER, *args],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, o, e))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, demo_small):
    """tiny_resnet with a wide random classifier: input-dependent predictions without training."""
    import torch

    torch.manual_seed(0)
    model = build_model("fixres:tiny_resnet", 10)[0]
    torch.nn.init.normal_(model.fc.weight, std=0.5)
    path = tmp_path_factory.mktemp("dist_ck") / "base.pt"
    save_checkpoint(
        path,
        model,
        spec="fixres:tiny_resnet",
        num_classes=10,
        class_names=sorted(os.listdir(f"{demo_small}/train")),
        preprocess={"test_input_size": 64, "train_input_size": 64},
    )
    return str(path)


def _ft_args(ckpt, demo, out, *extra):
    return [
        "finetune",
        "--checkpoint",
        ckpt,
        "--data",
        f"{demo}/train",
        "--val-data",
        f"{demo}/val",
        "--out",
        str(out),
        "--workers",
        "0",
        "--batch-size",
        "24",
        *extra,
    ]


def _load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def _ok(runs):
    for rc, out, err in runs:
        assert rc == 0, f"exit {rc}\n{out}\n{err[-3000:]}"


BN = ("layer4.0.bn2", "layer4.0.downsample.1")


def test_torchrun_two_ranks_bn_stats_and_top1_equal_one(ckpt, demo_small, tmp_path):
    """`torchrun --nproc-per-node 2 -m fixres_deploy finetune` == the single-process command."""
    args = _ft_args(ckpt, demo_small, tmp_path / "one", "--resolutions", "64", "--bn-stats-only")
    _ok(launch(1, args))
    two = _ft_args(ckpt, demo_small, tmp_path / "two", "--resolutions", "64", "--bn-stats-only")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "fixres_deploy",
    ]
    proc = subprocess.run(cmd + two, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _load(tmp_path / "one" / "model_r64.pt"), _load(tmp_path / "two" / "model_r64.pt")
    for bn in BN:
        for buf in ("running_mean", "running_var"):
            assert _rel(b[f"{bn}.{buf}"], a[f"{bn}.{buf}"]) <= 1e-5, (bn, buf)
    base = _load(ckpt)
    assert _rel(a[f"{BN[0]}.running_var"], base[f"{BN[0]}.running_var"]) > 1e-3  # the pass did change them
    ra = json.loads((tmp_path / "one" / "finetune.json").read_text())["results"][0]
    rb = json.loads((tmp_path / "two" / "finetune.json").read_text())["results"][0]
    assert (ra["n"], ra["top1_after"], ra["top5_after"]) == (rb["n"], rb["top1_after"], rb["top5_after"])
    assert rb["finetune"]["world_size"] == 2 and ra["finetune"]["world_size"] == 1
    assert ra["n"] == len([f for _, _, fs in os.walk(f"{demo_small}/val") for f in fs])


def test_sharded_evaluation_gathers_per_image_results_in_order(ckpt, demo_small, tmp_path):
    one, two = tmp_path / "e1.json", tmp_path / "e2.json"
    _ok(launch(1, ["eval", ckpt, f"{demo_small}/val", "64", str(one)]))
    _ok(launch(2, ["eval", ckpt, f"{demo_small}/val", "64", str(two)]))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["indices"] == b["indices"] == list(range(a["n"]))
    assert a["correct1_bits"] == b["correct1_bits"] and a["top1"] == b["top1"] and a["top5"] == b["top5"]
    assert 0 < a["top1"] < 1  # a non-trivial set of hits


@pytest.fixture(scope="module")
def one_rank_training(ckpt, demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_one")
    _ok(launch(1, _ft_args(ckpt, demo_small, out, *TRAIN_ARGS)))
    return out


# 160 images in global batches of 53: the last batch holds one image, so one rank has none
# and takes the zero-weight DDP step.
TRAIN_ARGS = ("--resolutions", "64", "--epochs", "2", "--lr", "0.05", "--batch-size", "53")


@pytest.mark.parametrize("cache", ["cached", "naive"])
def test_training_path_two_ranks_within_tolerance(ckpt, demo_small, tmp_path, one_rank_training, cache):
    extra = TRAIN_ARGS + (("--no-cache",) if cache == "naive" else ())
    _ok(launch(2, _ft_args(ckpt, demo_small, tmp_path / "two", *extra)))
    one = one_rank_training
    a, b = _load(one / "model_r64.pt"), _load(tmp_path / "two" / "model_r64.pt")
    base = _load(ckpt)
    assert _rel(a["fc.weight"], base["fc.weight"]) > 1e-3  # it trained
    assert _rel(b["fc.weight"], a["fc.weight"]) <= TRAIN_REL_TOL
    assert float((b["fc.bias"] - a["fc.bias"]).abs().max()) <= TRAIN_REL_TOL * float(a["fc.weight"].abs().max())
    for bn in BN:  # the final exact pass sees the frozen trunk's activations: equal whatever the training
        assert _rel(b[f"{bn}.running_mean"], a[f"{bn}.running_mean"]) <= 1e-5
        assert _rel(b[f"{bn}.running_var"], a[f"{bn}.running_var"]) <= 1e-5
    ra = json.loads((one / "finetune.json").read_text())["results"][0]
    rb = json.loads((tmp_path / "two" / "finetune.json").read_text())["results"][0]
    assert rb["finetune"]["mode"] == cache and rb["finetune"]["world_size"] == 2
    assert ra["finetune"]["steps"] == rb["finetune"]["steps"] == 2 * 4
    assert abs(ra["top1_after"] - rb["top1_after"]) <= 0.05


def test_killed_rank_fails_cleanly_and_rerun_resumes(ckpt, demo_small, tmp_path):
    out = tmp_path / "ft"
    args = _ft_args(ckpt, demo_small, out, "--resolutions", "56,64", "--bn-stats-only")
    (rc0, _, err0), (rc1, _, _) = launch(
        2, args, worker_opts=("--die-rank", "1", "--die-at", "2"), timeout_s=240, FIXRES_DIST_TIMEOUT_S="60"
    )
    assert rc1 == -9  # the injected fault: rank 1 was killed
    assert rc0 == 2, err0[-2000:]
    assert "peer process died" in err0 and "Rerun the same command" in err0
    assert (out / "model_r56.pt").exists() and (out / "finetune_r56.json").exists()
    assert not (out / "finetune.json").exists() and not (out / "model_r64.pt").exists()
    first = (out / "model_r56.pt").stat().st_mtime_ns
    runs = launch(2, args)
    _ok(runs)
    assert "@56: resumed" in runs[0][2]
    assert (out / "model_r56.pt").stat().st_mtime_ns == first  # not recomputed
    results = json.loads((out / "finetune.json").read_text())["results"]
    assert [r["resolution"] for r in results] == [56, 64]


# --------------------------------------------------------------------------- sharded sweeps


def test_shard_from_launcher_environments():
    assert shard_mod.shard_from_env({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert shard_mod.shard_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3)
    assert shard_mod.shard_from_env(
        {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "8"}
    ) == (1, 4)
    assert shard_mod.shard_from_env({"JOB_COMPLETION_INDEX": "0", "FIXRES_SHARD_COUNT": "2"}) == (0, 2)
    with pytest.raises(UserInputError, match="FIXRES_SHARD_COUNT"):
        shard_mod.shard_from_env({"JOB_COMPLETION_INDEX": "0"})
    with pytest.raises(UserInputError, match="pass --shard K/N"):
        shard_mod.shard_from_env({})
    with pytest.raises(UserInputError, match="0 <= K < N"):
        shard_mod.parse_shard("2/2")
    assert shard_mod.resolve_shard("0/1") is None  # one shard is the whole sweep
    cells = [(r, ft) for r in (32, 48, 64, 96, 128) for ft in (False, True)]
    parts = [shard_mod.my_cells(cells, (k, 3)) for k in range(3)]
    assert sorted(c for p in parts for c in p) == sorted(cells)  # every cell exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert parts == [shard_mod.my_cells(list(reversed(cells)), (k, 3)) for k in range(3)]  # order-free


def test_config_rejects_a_bad_shard(ckpt, demo_small):
    from fixres_deploy.sweep.config import SweepConfig

    with pytest.raises(UserInputError, match="shard"):
        SweepConfig(checkpoint=ckpt, train_data=f"{demo_small}/train", shard="3of4", backends=["onnxruntime"])


def test_store_same_key_race_is_benign(tmp_path):
    """Two writers (shards) computing one stage at once: both get one complete record."""
    from fixres_deploy.sweep.store import ResultStore

    gate = threading.Barrier(2)
    results = []

    def make(d):
        gate.wait(timeout=30)  # both are inside fn before either publishes
        (d / "a.bin").write_bytes(b"x" * 1000)
        return {"path": str(d / "a.bin"), "files": [str(d / "a.bin")]}

    def worker():
        results.append(ResultStore(tmp_path).run("s", {"k": 1}, make)[0])

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0]["key"] == results[1]["key"]
    for rec in results:
        assert rec["error"] is None and open(rec["result"]["path"], "rb").read() == b"x" * 1000
    leftovers = [p.name for p in (tmp_path / "artifacts").iterdir() if p.name.startswith(".")]
    assert leftovers == []


FAST_LATENCY = {
    "warmup_iters": 1,
    "warmup_s": 0.0,
    "min_iters": 3,
    "max_iters": 10,
    "budget_s": 0.02,
    "repeats": 1,
    "remeasure_if_contended": 0,
    "check_load": False,
}


def _sweep_toml(path, ckpt, demo, store):
    path.write_text(
        f"""schema_version = 1
[model]
checkpoint = "{ckpt}"
[data]
train = "{demo}/train"
eval = "{demo}/val"
[sweep]
resolutions = [48, 64]
precisions = ["fp32"]
backends = ["onnxruntime"]
shape_modes = ["fixed"]
batch_sizes = [1]
finetune = [false, true]
finetune_epochs = 1
exporter = "torchscript"
threads = 1
latency = {{ {", ".join(f"{k} = {json.dumps(v)}" for k, v in FAST_LATENCY.items())} }}
store = "{store}"
[output]
dir = "{path.parent / "out"}"
"""
    )
    return str(path)


def _accuracy(points):
    return sorted(
        (p.resolution, p.finetuned, p.precision, p.backend, p.shape_mode, p.batch_size, p.top1, p.correct1_bits)
        for p in points
    )


def test_two_shards_in_parallel_then_merge_recomputes_nothing(ckpt, demo_small, tmp_path):
    from fixres_deploy.sweep.config import PipelineConfig, read_config
    from fixres_deploy.sweep.shard import TIMING_STAGES
    from fixres_deploy.sweep.store import ResultStore
    from fixres_deploy.sweep.sweep import run_sweep

    store = tmp_path / "shared_store"
    cfg_path = _sweep_toml(tmp_path / "sweep.toml", ckpt, demo_small, store)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fixres_deploy", "run", "--config", cfg_path, "--shard", f"{k}/2", "--json"],
            env=_env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    summaries = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(s["shard"][0] for s in summaries) == [0, 1] and all(s["store_misses"] > 0 for s in summaries)
    assert not (tmp_path / "out" / "sweep.json").exists()  # shards do not assemble
    by_shards = {r["key"]: r["created"] for r in ResultStore(store).records()}
    assert len(by_shards) == sum(s["store_misses"] for s in summaries)  # no stage computed twice
    pc = read_config(cfg_path, PipelineConfig)
    merged = run_sweep(pc.sweep, tmp_path / "merged")
    after = {r["key"]: (r["stage"], r["created"]) for r in ResultStore(store).records()}
    new = {after[k][0] for k in after if k not in by_shards}
    assert new <= set(TIMING_STAGES)  # the merge only times (competitors together, on this machine)
    assert all(after[k][1] == c for k, c in by_shards.items())  # nothing recomputed
    assert merged.store_hits >= len(by_shards)
    assert all(p.ok for p in merged.points) and len(merged.points) == 4
    ref_cfg = read_config(cfg_path, PipelineConfig, overrides={"sweep.store": str(tmp_path / "ref_store")}).sweep
    ref = run_sweep(ref_cfg, tmp_path / "ref")
    assert _accuracy(merged.points) == _accuracy(ref.points)


def _point(cpu: str, latency_ms: float, top1: float):
    from fixres_deploy.fixres.evaluate import pack_bits
    from fixres_deploy.sweep.points import SweepPoint

    hits = np.arange(40) < int(top1 * 40)
    return SweepPoint(
        resolution=64,
        precision="fp32",
        backend="onnxruntime",
        batch_size=1,
        shape_mode="fixed",
        finetuned=cpu == "B",
        top1=top1,
        top1_ci=[top1 - 0.1, top1 + 0.1],
        n=40,
        correct1_bits=pack_bits(hits),
        latency_p50_ms=latency_ms,
        latency_p90_ms=latency_ms,
        latency_p99_ms=latency_ms,
        latency_mean_ms=latency_ms,
        latency_std_ms=0.01,
        throughput_ips=1000 / latency_ms,
        machine={"cpu": cpu, "cores": 2, "system": "Linux", "machine": "x86_64"},
    )


def test_selection_refuses_latencies_from_two_machines():
    from fixres_deploy.choose.select import select_point
    from fixres_deploy.sweep.config import SelectionConfig

    points = [_point("A", 1.0, 0.8), _point("B", 2.0, 0.9)]
    with pytest.raises(UserInputError, match="2 different machines") as exc:
        select_point(points, SelectionConfig())
    assert "A x2" in str(exc.value) and "--allow-mixed-machines" in str(exc.value)
    assert select_point(points, SelectionConfig(allow_mixed_machines=True)) is not None
    same = [_point("A", 1.0, 0.8), _point("A", 2.0, 0.9)]
    assert select_point(same, SelectionConfig()) is not None
