"""One ONNX graph for every FixRes resolution: a shared trunk and a bank of per-resolution heads.

FixRes fine-tuning at a test resolution R changes only the BatchNorm(s) that feed the global
pool and the classifier (:mod:`fixres_deploy.fixres.finetune`); the rest of the network — the
trunk — is the base model's. So the checkpoints fine-tuned at R1..Rn of one base model share
every trunk weight, and one dynamic-shape graph can serve all of them:

* the trunk runs once (the model cut at the adapted BatchNorms' inputs,
  :class:`fixres_deploy.fixres.finetune.TailSplit`);
* the tail's adapted BatchNorms become per-resolution affine maps (eval BN folded to
  ``x * scale + shift``) and the classifier's weights are stacked: ``(n, C)`` scales and
  shifts, ``(n, K, C)`` weights, ``(n, K)`` biases;
* the head is picked from the input's height inside the graph: the index of the resolution
  nearest to H (``ArgMin |R - H|``), then ``Gather`` on the banks.

Why the height and not an extra ``res_index`` input: the graph keeps the one input / one
output contract of every other export, so the precision variants, the engine builders (one
TensorRT profile spanning R1..Rn), the bundle, the runtime and Triton take it unchanged, and a
client cannot pair an image of one resolution with another resolution's head by mistake.
Inputs are square (H = W), as the preprocessing makes them.

:func:`export_multires` validates the file against EACH checkpoint at ITS resolution (the
usual names/shapes/values checks of :func:`fixres_deploy.export.onnx_export.validate_onnx`, one
:class:`~fixres_deploy.export.onnx_export.ExportValidationError` stating the largest
difference and the tolerance); :func:`build_multires_bundle` makes the engines through
:mod:`fixres_deploy.engines.engine`, measures per-resolution accuracy and the latency table
per (resolution, batch) on this machine, and writes a bundle whose manifest has a
``multires`` section (read by ``fixres-deploy serve``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fixres_deploy.core.errors import UserInputError

log = logging.getLogger(__name__)

MULTIRES_FORMAT = "fixres-deploy/multires"
MULTIRES_SCHEMA_VERSION = 1
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
#: ONNX metadata key of the head bank's description (:func:`multires_metadata`)
META_MULTIRES = "fixres_deploy.multires"


class TrunkMismatchError(UserInputError):
    """Checkpoints that are not FixRes fine-tunes of one base model (their trunks differ)."""


@dataclass
class FixResSet:
    """FixRes checkpoints of one base model, sorted by resolution.

    Attributes:
        checkpoints: the files, in resolution order.
        resolutions: the test resolution of each (its ``fixres`` record).
        models: the loaded :class:`~fixres_deploy.models.registry.LoadedModel` of each.
        bn_names, head_names: the adapted modules (the head bank), found on the first model.
        top1: held-out top-1 each checkpoint's fine-tune recorded (None when not measured).
    """

    checkpoints: list[str]
    resolutions: list[int]
    models: list[Any]
    bn_names: list[str]
    head_names: list[str]
    top1: list[float | None] = field(default_factory=list)

    @property
    def base(self):
        return self.models[0]


def _resolution_of(path: str, loaded) -> int:
    fixres = loaded.checkpoint_meta.get("fixres") or {}
    if fixres.get("resolution"):
        return int(fixres["resolution"])
    raise UserInputError(
        f"checkpoint '{path}' has no FixRes record (fixres.resolution): give checkpoints written by "
        "`fixres-deploy finetune` (one per resolution, of the same base model)"
    )


def load_fixres_set(checkpoints: Sequence[str | os.PathLike]) -> FixResSet:
    """Load FixRes checkpoints and check they can share one trunk.

    Raises:
        UserInputError: fewer than two checkpoints, a missing FixRes record, two checkpoints
            of one resolution, different models / classes / preprocessing.
        TrunkMismatchError: a weight outside the adapted BatchNorms and classifier differs
            (the message names the files, the first differing weights and their largest difference).
    """
    import torch

    from fixres_deploy.fixres.finetune import resolve_fixres_modules
    from fixres_deploy.models.registry import load_model

    paths = [os.fspath(p) for p in checkpoints]
    if len(paths) < 2:
        raise UserInputError(f"a multi-resolution export needs checkpoints at >= 2 resolutions, got {len(paths)}")
    for p in paths:
        if not os.path.isfile(p):
            raise UserInputError(f"checkpoint '{p}' does not exist")
    loaded = [load_model(None, None, p) for p in paths]
    res = [_resolution_of(p, m) for p, m in zip(paths, loaded)]
    if len(set(res)) != len(res):
        dup = sorted({r for r in res if res.count(r) > 1})
        raise UserInputError(f"two checkpoints are fine-tuned at the same resolution {dup}: give one per resolution")
    order = sorted(range(len(paths)), key=lambda i: res[i])
    paths, loaded, res = [paths[i] for i in order], [loaded[i] for i in order], [res[i] for i in order]
    first = loaded[0]
    for p, m in zip(paths[1:], loaded[1:]):
        for what, a, b in (
            ("model", first.spec, m.spec),
            ("number of classes", first.num_classes, m.num_classes),
            ("class names", first.class_names, m.class_names),
        ):
            if a != b:
                raise UserInputError(f"'{p}' and '{paths[0]}' differ in {what} ({b!r} vs {a!r}): not one base model")
        pa = dict(first.preprocess or {})
        pb = dict(m.preprocess or {})
        for d in (pa, pb):
            d.pop("test_input_size", None)
            d.pop("resize_size", None)
        if pa != pb:
            raise UserInputError(f"'{p}' and '{paths[0]}' use other preprocessing besides the resolution: {pb} vs {pa}")

    mods = resolve_fixres_modules(first.model)
    adapted = tuple(mods.bn_names) + tuple(mods.head_names)

    def is_adapted(key: str) -> bool:
        return any(key == m or key.startswith(m + ".") for m in adapted)

    ref = first.model.state_dict()
    for p, m in zip(paths[1:], loaded[1:]):
        other = m.model.state_dict()
        diffs = []
        for key, value in ref.items():
            if is_adapted(key):
                continue
            if key not in other or other[key].shape != value.shape:
                diffs.append((key, float("inf")))
            elif not torch.equal(other[key], value):
                diffs.append((key, float((other[key].double() - value.double()).abs().max())))
        if diffs:
            listed = ", ".join(f"{k} (max diff {d:.3g})" for k, d in diffs[:5])
            raise TrunkMismatchError(
                f"'{p}' and '{paths[0]}' differ outside the FixRes-adapted modules {list(adapted)}: {len(diffs)} "
                f"weight(s), e.g. {listed}. A head bank needs FixRes fine-tunes of ONE base model (fixres-deploy "
                "finetune --resolutions R1,R2,... from the same checkpoint)."
            )
    top1 = [(m.checkpoint_meta.get("fixres") or {}).get("top1_after") for m in loaded]
    return FixResSet(paths, res, loaded, list(mods.bn_names), list(mods.head_names), top1)


# --------------------------------------------------------------------------- the head-bank model


def _bank_affine(x, scales, shifts, idx):
    """Eval BatchNorm of the selected resolution, folded to ``x * scale + shift``."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    return x * scales.index_select(0, idx).reshape(shape) + shifts.index_select(0, idx).reshape(shape)


def _bank_linear(x, weights, biases, idx):
    """The selected resolution's classifier (weights ``(n, K, C)``, biases ``(n, K)``)."""
    import torch

    w = weights.index_select(0, idx)[0]
    b = biases.index_select(0, idx)[0]
    return torch.nn.functional.linear(x, w, b)


def build_head_bank_model(fset: FixResSet):
    """The torch module exported by :func:`export_multires` (see the module docstring).

    Raises:
        UserInputError: an adapted module is neither a BatchNorm nor a Linear layer (no bank
            for it), or a BatchNorm without running statistics.
    """
    import torch
    import torch.fx as fx
    from torch import nn

    from fixres_deploy.fixres.finetune import TailSplit

    base = fset.base.model.eval()
    split = TailSplit(base, fset.bn_names)
    banks: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}
    for name in fset.bn_names + fset.head_names:
        mods = [m.model.get_submodule(name) for m in fset.models]
        m0 = mods[0]
        if isinstance(m0, nn.modules.batchnorm._BatchNorm):
            scales, shifts = [], []
            for m in mods:
                if m.running_mean is None or m.running_var is None:
                    raise UserInputError(f"BatchNorm '{name}' keeps no running statistics: it cannot be folded")
                s = 1.0 / torch.sqrt(m.running_var.double() + m.eps)
                if m.weight is not None:
                    s = s * m.weight.double()
                t = -m.running_mean.double() * s
                if m.bias is not None:
                    t = t + m.bias.double()
                scales.append(s.float())
                shifts.append(t.float())
            banks[name] = (torch.stack(scales), torch.stack(shifts), "affine")
        elif isinstance(m0, nn.Linear):
            w = torch.stack([m.weight.detach().float() for m in mods])
            b = torch.stack(
                [m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features) for m in mods]
            )
            banks[name] = (w, b, "linear")
        else:
            raise UserInputError(
                f"FixRes-adapted module '{name}' is a {type(m0).__name__}: the head bank handles BatchNorm and "
                "Linear layers only"
            )

    class HeadBankModel(nn.Module):
        """Shared trunk, then the head of the resolution nearest to the input height."""

        def __init__(self):
            super().__init__()
            self.trunk = split.trunk
            self.register_buffer("resolutions", torch.tensor([float(r) for r in fset.resolutions]))
            for i, (a, b, _) in enumerate(banks.values()):
                self.register_buffer(f"bank{i}_a", a.contiguous())
                self.register_buffer(f"bank{i}_b", b.contiguous())
            self.tail = self._tail_with_banks(split.tail)

        def _tail_with_banks(self, tail):
            graph = fx.Graph()
            env: dict = {}
            placeholders = [n for n in tail.graph.nodes if n.op == "placeholder"]
            for n in placeholders:
                env[n] = graph.placeholder(n.name)
            idx = graph.placeholder("head_index")
            holder = nn.Module()
            keys = list(banks)
            for n in tail.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "call_module" and n.target in banks:
                    i = keys.index(n.target)
                    a = graph.get_attr(f"bank{i}_a")
                    b = graph.get_attr(f"bank{i}_b")
                    fn = _bank_affine if banks[n.target][2] == "affine" else _bank_linear
                    env[n] = graph.call_function(fn, (env[n.args[0]], a, b, idx))
                else:
                    env[n] = graph.node_copy(n, lambda a: env[a])
            for i in range(len(keys)):
                setattr(holder, f"bank{i}_a", getattr(self, f"bank{i}_a"))
                setattr(holder, f"bank{i}_b", getattr(self, f"bank{i}_b"))
            for n in tail.graph.nodes:
                if n.op == "call_module" and n.target not in banks:
                    holder_path = n.target.split(".")
                    parent = holder
                    for part in holder_path[:-1]:
                        if not hasattr(parent, part):
                            parent.add_module(part, nn.Module())
                        parent = getattr(parent, part)
                    parent.add_module(holder_path[-1], tail.get_submodule(n.target))
            return fx.GraphModule(holder, graph)

        def forward(self, x):
            idx = torch.argmin(torch.abs(self.resolutions - x.shape[2])).reshape(1)
            frontier = self.trunk(x)
            return self.tail(*frontier, idx)

    return HeadBankModel().eval()


# --------------------------------------------------------------------------- export


def multires_metadata(fset: FixResSet) -> dict:
    """What the ONNX file records about its head bank (``fixres_deploy.multires`` metadata)."""
    return {
        "resolutions": list(fset.resolutions),
        "head_selection": "nearest resolution to the input height",
        "adapted_modules": {"batchnorm": list(fset.bn_names), "classifier": list(fset.head_names)},
    }


def export_multires(
    checkpoints: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    validation_data=None,
    exporter: str = "dynamo",
    opset: int | None = None,
    tolerance=None,
):
    """Export the head-bank graph of FixRes checkpoints at R1..Rn and validate it per resolution.

    Args:
        checkpoints: one FixRes checkpoint per resolution, of one base model.
        out_path: the .onnx to write (plus ``<out>.json``, the export record).
        validation_data: images to validate on (folder, index or PIL list; None: rendered demo images).
        exporter, opset: as ``fixres-deploy export``.
        tolerance: a :class:`~fixres_deploy.export.onnx_export.ValidationTolerance` (default: export's).

    Returns:
        ``(ExportResult, FixResSet)``; the result's ``validation`` compares the file at each
        R_i with checkpoint i.

    Raises:
        TrunkMismatchError, UserInputError: see :func:`load_fixres_set`.
        ExportValidationError: the file differs from a checkpoint at its resolution (largest
            difference and tolerance in the message).
    """
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.export.onnx_export import ValidationTolerance, export_onnx

    fset = load_fixres_set(checkpoints)
    model = build_head_bank_model(fset)
    base = fset.base
    if not base.preprocess:
        raise UserInputError(
            f"checkpoint '{fset.checkpoints[0]}' records no preprocessing: fine-tune it with fixres-deploy"
        )
    cfg = PreprocessConfig.from_dict(base.preprocess).at_resolution(fset.resolutions[-1])
    result = export_onnx(
        model,
        out_path,
        cfg,
        dynamic=True,
        exporter=exporter,
        opset=opset,
        validation_images=validation_data,
        validate_resolutions=fset.resolutions,
        class_names=base.class_names,
        model_spec=base.spec,
        tolerance=tolerance or ValidationTolerance(),
        reference_models={r: m.model for r, m in zip(fset.resolutions, fset.models)},
        extra_metadata={META_MULTIRES: json.dumps(multires_metadata(fset), sort_keys=True)},
    )
    return result, fset


# --------------------------------------------------------------------------- engines, table, bundle


def load_latency_images(source, n: int = 16) -> list:
    """Decoded RGB images to time preprocessing + inference with (real sizes matter: the resize
    cost depends on the source image). ``source``: an image folder, or None (rendered demo images)."""
    from fixres_deploy.export.onnx_export import _pil_images

    return [im.convert("RGB") for im in _pil_images(source, n)]


def measure_latency_table(
    batch_runner,
    resolutions: Sequence[int],
    batch_sizes: Sequence[int],
    images: Sequence,
    *,
    repeats: int = 7,
) -> dict:
    """Median service time per (resolution, batch): the server's own batch work, timed.

    ``batch_runner`` is a :class:`fixres_deploy.ship.serve.model.BatchRunner` (preprocessing
    of decoded images at the resolution + inference), the same code the server runs per batch,
    so the policy plans with what a batch really costs. Resolutions are interleaved within
    each repeat so that a slow spell of the machine is spread over all cells.

    Returns:
        ``{"batch_sizes", "service_ms" (rows per resolution), "preprocess_ms_per_image", "repeats"}``.
    """
    if not images:
        raise UserInputError("no images to measure the latency table with")
    images = list(images)
    pool = images * (2 + max(batch_sizes) // len(images))  # any start in images has a full batch after it
    samples: dict[tuple[int, int], list[float]] = {(r, b): [] for r in resolutions for b in batch_sizes}
    pre: dict[int, list[float]] = {r: [] for r in resolutions}
    for r in resolutions:  # warm up every shape once (allocators, kernels)
        for b in batch_sizes:
            batch_runner.probabilities(pool[:b], r)
    for rep in range(int(repeats)):
        for r in resolutions:
            for b in batch_sizes:
                start = (rep * b) % len(images)  # other images each repeat
                chunk = pool[start : start + b]
                t0 = time.perf_counter()
                batch_runner.probabilities(chunk, r)
                samples[(r, b)].append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            batch_runner.prepare(pool[: max(batch_sizes)], r)
            pre[r].append((time.perf_counter() - t0) * 1e3 / max(batch_sizes))
    rows = [[round(float(np.median(samples[(r, b)])), 4) for b in batch_sizes] for r in resolutions]
    # a larger batch never takes less time than a smaller one (noise on a busy machine)
    rows = [list(np.maximum.accumulate(row)) for row in rows]
    return {
        "batch_sizes": [int(b) for b in batch_sizes],
        "service_ms": rows,
        "preprocess_ms_per_image": [round(float(np.median(pre[r])), 4) for r in resolutions],
        "repeats": int(repeats),
    }


def measure_accuracy(
    batch_runner, val_data, resolutions: Sequence[int], class_names, *, limit: int | None = 400
) -> list[dict]:
    """Top-1 of the engine at each resolution on a labelled image folder (torch-free path)."""
    from fixres_deploy.data.folders import class_balanced_subset, index_image_folder, load_rgb

    index = index_image_folder(val_data, classes=class_names)
    if limit is not None and len(index) > limit:
        index = class_balanced_subset(index, max(1, limit // max(1, len(index.classes))), seed=0)
    images, labels = [], []
    for s in index.samples:
        try:
            images.append(load_rgb(s.path))
            labels.append(s.label)
        except Exception as exc:  # PIL raises many types; an unreadable image is skipped
            log.warning("accuracy: skipping unreadable %s (%s)", s.path, exc)
    if not images:
        raise UserInputError(f"no readable images in '{val_data}' to measure accuracy")
    out = []
    labels_arr = np.asarray(labels)
    for r in resolutions:
        probs = np.concatenate([batch_runner.probabilities(images[i : i + 32], r) for i in range(0, len(images), 32)])
        top1 = float((probs.argmax(1) == labels_arr).mean())
        out.append({"resolution": int(r), "top1": round(top1, 6), "n": len(images), "source": f"engine on {val_data}"})
    return out


def multires_shapes(resolutions: Sequence[int], max_batch: int):
    """The head-bank engine's shapes: ONE profile spanning R1..Rn, batch 1..max_batch (opt: batch 8 at the middle R).

    One profile, because the server switches resolution per batch: a profile switch costs an
    extra enqueue (and a CUDA-graph recapture); TensorRT tunes its tactics for ``opt``.
    """
    from fixres_deploy.backends.base import ShapeSpec

    return ShapeSpec.resolution_bands(resolutions, max_batch=int(max_batch), opt_batch=min(8, int(max_batch)), bands=1)


def build_multires_bundle(
    checkpoints: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    work_dir: str | os.PathLike | None = None,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    validation_data=None,
    val_data=None,
    val_limit: int | None = 400,
    calibration_data=None,
    calibration_limit: int | None = 256,
    max_batch: int = 16,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    threads: int | None = None,
    workers: int = 2,
    latency_images=None,
    repeats: int = 7,
    exporter: str = "dynamo",
    options=None,
    overwrite: bool = False,
    tar: bool = False,
    triton_repo: str | None = None,
) -> dict:
    """`fixres-deploy export-multires --bundle`: head-bank ONNX → engine → measured bundle.

    Args:
        checkpoints: FixRes checkpoints of one base model at R1..Rn.
        out_dir: the bundle folder.
        work_dir: where the ONNX, the variants and the engine are made (default ``<out_dir>.work``).
        backend: ``onnxruntime`` or ``tensorrt`` (one profile spanning R1..Rn, batch 1..max_batch,
            built by the TensorRT backend's build entry).
        precision: fp32, fp16 (:mod:`fixres_deploy.precision.variants`) or int8 (calibrated on
            ``calibration_data`` preprocessed at EVERY resolution: the ranges cover the mix).
        validation_data: images for the export's validation (None: rendered demo images).
        val_data: a labelled image folder: the engine's top-1 per resolution goes into the
            manifest; without it the checkpoints' recorded fine-tune top-1 is used.
        val_limit: score at most this many ``val_data`` images (class-balanced; None: all).
            The policy picks the most accurate feasible resolution by these figures: when
            resolutions differ by a point or two, score enough images to tell them apart.
        max_batch, batch_sizes: the engine's batch range and the latency table's columns.
        threads: ONNX Runtime intra-op threads for the table (and the server: same setting).
        workers: preprocessing threads for the table (and the server).
        latency_images: image folder whose decoded images time the table (None: rendered demo images).
        repeats: timing repeats per cell (median kept).
        options: :class:`fixres_deploy.backends.base.BuildOptions`.
        triton_repo: also write a Triton model repository (:mod:`fixres_deploy.ship.triton`).

    Returns:
        ``{"bundle", "onnx", "export", "engine", "multires", "triton"}``.
    """
    from fixres_deploy.backends.base import BuildOptions, load_runner
    from fixres_deploy.core import env
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.core.utils import sha256_file, stable_hash
    from fixres_deploy.engines.engine import EngineMaker, build_verified_engine, engine_device
    from fixres_deploy.ship.bundle import bundle_artifact
    from fixres_deploy.ship.manifest import MultiresInfo
    from fixres_deploy.ship.serve.model import BatchRunner

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise UserInputError(f"'{out_dir}' already exists: choose another folder or pass --overwrite")
    batch_sizes = sorted({int(b) for b in batch_sizes if int(b) <= int(max_batch)})
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserInputError(f"--batch-sizes must be >= 1 and <= --max-batch {max_batch}")
    if precision == "int8" and calibration_data is None:
        raise UserInputError(
            "int8 needs --calibration-data (images like the deployment's, preprocessed at every resolution)"
        )
    if val_limit is not None and int(val_limit) < 1:
        raise UserInputError(f"--val-limit must be >= 1 (or 0 for every image), got {val_limit}")
    if val_data is not None and not os.path.isdir(os.fspath(val_data)):
        raise UserInputError(f"--val-data '{val_data}' is not a folder (expected ROOT/<class>/<image>)")
    work = os.path.abspath(os.fspath(work_dir or out_dir + ".work"))
    os.makedirs(work, exist_ok=True)
    onnx_path = os.path.join(work, "multires.onnx")
    result, fset = export_multires(checkpoints, onnx_path, validation_data=validation_data, exporter=exporter)
    cfg = PreprocessConfig.from_dict(result.preprocess)
    res = fset.resolutions
    shapes = multires_shapes(res, max_batch)
    options = options or BuildOptions()
    if precision == "int8":
        from fixres_deploy.precision.calibration import calibration_batches
        from fixres_deploy.precision.variants import default_int8_flavor, make_precision_variant

        per = None if calibration_limit is None else max(1, int(calibration_limit) // len(res))
        mix = [calibration_batches(calibration_data, cfg.at_resolution(r), limit=per) for r in res]
        flavor = default_int8_flavor(backend, device=engine_device(backend, options))
        variant = make_precision_variant(
            onnx_path,
            "int8",
            os.path.join(work, f"multires.int8.{flavor}.mix.onnx"),
            calibration_batches=mix,
            flavor=flavor,
        )
        art = build_verified_engine(backend, variant.path, "int8", shapes, options, out_dir=work)
        quant = variant.to_dict()
    else:
        maker = EngineMaker(onnx_path, work, preprocess=cfg, options=options)
        art, quant = maker.engine(backend, precision, shapes)
    if art.error:
        raise UserInputError(f"the {backend} {precision} engine of '{onnx_path}' failed to build: {art.error}")

    runner = load_runner(art, **({"threads": threads} if threads and backend == "onnxruntime" else {}))
    runner.activate()
    try:
        br = BatchRunner(runner, cfg, max_batch=int(max_batch), workers=workers)
        try:
            if val_data is not None:
                accuracy = measure_accuracy(br, val_data, res, fset.base.class_names, limit=val_limit)
            else:
                accuracy = [
                    {"resolution": r, "top1": t, "n": None, "source": "checkpoint fine-tune record (top1_after)"}
                    for r, t in zip(res, fset.top1)
                ]
            images = load_latency_images(latency_images)
            table = measure_latency_table(br, res, batch_sizes, images, repeats=repeats)
        finally:
            br.close()
    finally:
        runner.deactivate()
    machine = env.machine_id()
    table.update(
        {
            "machine": machine,
            "machine_key": stable_hash(machine)[:16],
            "threads": threads,
            "workers": int(workers),
            "backend": backend,
            "precision": precision,
            "image_sizes": sorted({f"{im.size[0]}x{im.size[1]}" for im in images}),
        }
    )
    info = MultiresInfo(
        resolutions=list(res),
        accuracy=accuracy,
        latency=table,
        checkpoints=[
            {"resolution": r, "file": os.path.basename(p), "sha256": sha256_file(p)}
            for r, p in zip(res, fset.checkpoints)
        ],
    )
    bundled = bundle_artifact(
        art,
        out_dir,
        checkpoint=fset.checkpoints[-1],
        metrics={"multires_export": {"max_abs_diff": (result.validation or {}).get("max_abs_diff")}, "quant": quant},
        onnx_sources=[onnx_path] if art.source_onnx != onnx_path else [],
        tar=tar,
        overwrite=overwrite,
        triton_repo=triton_repo,
        multires=info,
    )
    return {
        "bundle": bundled["dir"],
        "onnx": onnx_path,
        "export": result.to_dict(),
        "engine": art.to_dict(),
        "multires": info.to_dict(),
        "triton": bundled["triton"],
    }
