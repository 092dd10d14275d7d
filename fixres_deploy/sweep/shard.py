"""Sharded sweeps: N processes (GPUs, machines, Slurm array tasks, Kubernetes pods) split one sweep.

``--shard K/N`` (``[sweep] shard = "K/N"``) makes a sweep compute only its share of the grid
into a shared result store and stop (no sweep.json, no selection, no report). The share is
deterministic: the grid cells — one per (resolution, fine-tuned or not), each holding every
stage downstream of that model (fine-tune, export, variants, engines, accuracy, diagnostics) — are
ordered by a hash of their key and dealt round-robin, so every shard computes the same split
without talking to the others and no stage is computed by two shards. Afterwards the same
command without ``--shard`` finds every record in the store and assembles the sweep with zero
recomputation: it computes only the timing stages (the machine's peak, and the latency groups
in which all competing engines are timed together, interleaved — see
:mod:`fixres_deploy.sweep.latency_groups`), which by design run in one process on the machine
the selection is for. :func:`merge_note` logs both counts.

``--shard auto`` reads the launcher's environment: torchrun's RANK/WORLD_SIZE, a Slurm array
(SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT, or SLURM_ARRAY_TASK_MIN/MAX), or a
Kubernetes indexed Job (JOB_COMPLETION_INDEX with the count from FIXRES_SHARD_COUNT).

Each shard leaves a manifest (``STORE/shards/<sweep>/K-of-N.json``) naming its machine. Every
point carries the machine key its latency was timed on, and the selection refuses to compare
latencies from different kinds of machine (:func:`check_one_machine`) unless
``allow_mixed_machines`` is set.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fixres_deploy.core.errors import UserInputError

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "fixres-deploy/sweep-shard"
MANIFEST_SCHEMA_VERSION = 1
SHARD_COUNT_ENV = "FIXRES_SHARD_COUNT"
# config fields that do not change what a shard computes
_NOT_IDENTITY = ("shard", "store", "retry_failed")


def check_shard_text(value: Any, label: str) -> None:
    """Validator of the ``shard`` config field: ``"K/N"`` with 0 <= K < N, or ``"auto"``."""
    if value is None or value == "auto":
        return
    parse_shard(value, label=label)


def parse_shard(text: str, *, label: str = "--shard") -> tuple[int, int]:
    """``"K/N"`` → (K, N), with a clear error."""
    try:
        k_text, n_text = str(text).split("/")
        k, n = int(k_text), int(n_text)
    except ValueError as exc:
        raise UserInputError(f'{label}: expected K/N (e.g. "0/4") or "auto", got {text!r}') from exc
    if n < 1 or not 0 <= k < n:
        raise UserInputError(f"{label}: shard {k}/{n} needs 0 <= K < N")
    return k, n


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as exc:
        raise UserInputError(f"--shard auto: {name}={env[name]!r} is not an integer") from exc


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(K, N) from the launcher's environment (torchrun, Slurm array, Kubernetes indexed Job).

    Raises:
        UserInputError: no known launcher variables, or an index without its count.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return parse_shard(f"{_int_env(env, 'RANK')}/{_int_env(env, 'WORLD_SIZE')}", label="RANK/WORLD_SIZE")
    if "SLURM_ARRAY_TASK_ID" in env:
        task = _int_env(env, "SLURM_ARRAY_TASK_ID")
        if "SLURM_ARRAY_TASK_MIN" in env:
            lo = _int_env(env, "SLURM_ARRAY_TASK_MIN")
            hi = _int_env(env, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in env else None
        else:
            lo, hi = 0, None
        if "SLURM_ARRAY_TASK_COUNT" in env:
            count = _int_env(env, "SLURM_ARRAY_TASK_COUNT")
        elif hi is not None:
            count = hi - lo + 1
        else:
            raise UserInputError("--shard auto: SLURM_ARRAY_TASK_ID without SLURM_ARRAY_TASK_COUNT or _MIN/_MAX")
        return parse_shard(f"{task - lo}/{count}", label="SLURM_ARRAY_TASK_ID")
    if "JOB_COMPLETION_INDEX" in env:
        if SHARD_COUNT_ENV not in env:
            raise UserInputError(
                f"--shard auto: JOB_COMPLETION_INDEX is set but not {SHARD_COUNT_ENV}; set it to the Job's "
                "completions (spec.completions) or pass --shard K/N"
            )
        return parse_shard(
            f"{_int_env(env, 'JOB_COMPLETION_INDEX')}/{_int_env(env, SHARD_COUNT_ENV)}", label="JOB_COMPLETION_INDEX"
        )
    raise UserInputError(
        "--shard auto: none of RANK/WORLD_SIZE (torchrun), SLURM_ARRAY_TASK_ID (Slurm array) or "
        "JOB_COMPLETION_INDEX (Kubernetes indexed Job) is set; pass --shard K/N"
    )


def resolve_shard(value: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The (K, N) a config's ``shard`` names; None for an unsharded sweep (N == 1 counts as unsharded)."""
    if value is None:
        return None
    k, n = shard_from_env(env) if value == "auto" else parse_shard(value)
    return None if n == 1 else (k, n)


def cell_hash(cell_key: Any) -> str:
    return hashlib.sha256(repr(cell_key).encode()).hexdigest()


def my_cells(cells: Sequence[Any], shard: tuple[int, int] | None) -> set:
    """The cells shard K of N computes: sorted by hash, dealt round-robin (balanced, deterministic)."""
    if shard is None:
        return set(cells)
    k, n = shard
    ordered = sorted(cells, key=cell_hash)
    return set(ordered[k::n])


def sweep_identity(config: dict) -> str:
    """A hash of the sweep config minus what does not change the computed records."""
    from fixres_deploy.core.utils import stable_hash

    return stable_hash({k: v for k, v in config.items() if k not in _NOT_IDENTITY})[:16]


def _manifest_dir(store_root: str | os.PathLike, config: dict) -> Path:
    return Path(store_root) / "shards" / sweep_identity(config)


def write_manifest(
    store_root: str | os.PathLike, config: dict, shard: tuple[int, int], machine: dict, computed: int, reused: int
) -> str:
    """Record that shard K/N of this sweep finished on ``machine`` (atomic write)."""
    from fixres_deploy.core.schema import stamp
    from fixres_deploy.core.utils import write_json

    k, n = shard
    doc = {"shard": [k, n], "machine": machine, "stages_computed": computed, "stages_reused": reused}
    path = _manifest_dir(store_root, config) / f"{k}-of-{n}.json"
    return write_json(path, stamp(doc, MANIFEST_FORMAT, MANIFEST_SCHEMA_VERSION))


TIMING_STAGES = ("peak", "latency_group", "latency")  # measured by the merge: competitors timed together


def shard_manifests(store_root: str | os.PathLike, config: dict) -> list[dict]:
    """The manifests of this sweep's finished shards."""
    from fixres_deploy.core.schema import check_schema
    from fixres_deploy.core.utils import read_json

    folder = _manifest_dir(store_root, config)
    paths = sorted(folder.glob("*-of-*.json")) if folder.is_dir() else []
    return [check_schema(read_json(p), MANIFEST_FORMAT, MANIFEST_SCHEMA_VERSION, p, "re-run that shard") for p in paths]


def merge_note(store, config: dict) -> dict | None:
    """After an unsharded run: how it used the shards' work (logged; None when there were no shards).

    ``recomputed`` counts stages of the shards' kind (everything but the timing stages) that
    this run computed: 0 when the shards covered the grid.
    """
    manifests = shard_manifests(store.root, config)
    if not manifests:
        return None
    recomputed = sum(n for stage, n in store.computed.items() if stage not in TIMING_STAGES)
    timed = {stage: n for stage, n in store.computed.items() if stage in TIMING_STAGES}
    note = {
        "shards": sorted(tuple(m["shard"]) for m in manifests),
        "reused": store.hits,
        "recomputed": recomputed,
        "timed_here": timed,
    }
    log.info(
        "assembled from %d shard(s): %d stage results reused, %d recomputed; timed here (competing engines "
        "together on this machine): %s",
        len(manifests),
        store.hits,
        recomputed,
        ", ".join(f"{n} {s}" for s, n in timed.items()) or "nothing",
    )
    return note


def shard_summary(cfg, out: str, computed: int, reused: int, seconds: float) -> dict:
    """What ``sweep``/``run`` print for a shard (no sweep.json, no selection)."""
    k, n = resolve_shard(cfg.shard) or (0, 1)
    return {
        "out": out,
        "shard": [k, n],
        "store_misses": computed,
        "store_hits": reused,
        "seconds": seconds,
        "reason": f"shard {k}/{n}: {computed} stages computed, {reused} reused; when every shard has finished, "
        "run the same command without --shard: it reuses these stages and times the competing engines together",
    }


def machine_label(machine: dict | None) -> str:
    if not machine:
        return "unknown machine"
    return f"{machine.get('cpu') or '?'} x{machine.get('cores')} {machine.get('system')}/{machine.get('machine')}"


def check_one_machine(points: Iterable, allow_mixed: bool) -> None:
    """Refuse to compare latencies timed on different machines (unless ``allow_mixed``).

    Raises:
        UserInputError: naming the machines and how many points each timed.
    """
    counts: dict[str, int] = {}
    for p in points:
        if getattr(p, "latency_p50_ms", None) is None:
            continue
        label = machine_label(getattr(p, "machine", None))
        counts[label] = counts.get(label, 0) + 1
    if len(counts) > 1 and not allow_mixed:
        listed = "; ".join(f"{m}: {c} points" for m, c in counts.items())
        raise UserInputError(
            f"the sweep's latencies were measured on {len(counts)} different machines ({listed}); their "
            "latencies are not comparable. Re-run the latency stages on one kind of machine, or pass "
            "--allow-mixed-machines ([select] allow_mixed_machines = true) to compare them anyway"
        )
