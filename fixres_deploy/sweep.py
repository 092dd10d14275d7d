"""The sweep: accuracy and latency of every engine across resolutions, precisions, batch sizes.

Grid: candidate resolutions × {base model, FixRes fine-tuned at that resolution} ×
precision (fp32 / fp16 / int8) × backend × shape mode (fixed / dynamic) × batch size. Each
point's top-1/top-5 are measured on the engine itself (not the torch model) and its latency
with :mod:`fixres_deploy.bench`.

Every stage goes through a :class:`fixres_deploy.store.ResultStore`, keyed by everything that
determines it: checkpoint and data hashes, resolution, precision, options, library versions
(and, for latency, the machine). An interrupted sweep resumes; a repeated one measures
nothing twice; a changed input re-measures only what depends on it. A failed stage is
recorded with its error and the sweep goes on.

Accuracy does not depend on the batch size, so it is measured once per engine graph and
shape mode (at the largest batch of the grid); latency is measured per batch size.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from fixres_deploy.errors import UserInputError
from fixres_deploy.points import SweepPoint
from fixres_deploy.store import ResultStore, library_versions, machine_id
from fixres_deploy.utils import progress, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

SHAPE_MODES = ("fixed", "dynamic")


@dataclass
class SweepConfig:
    """What to sweep (every field can come from a TOML file or flags).

    Attributes:
        checkpoint: the base model (trained at ``train_res``).
        model: model spec (optional for fixres-deploy checkpoints).
        num_classes: classifier size (optional: inferred).
        train_data: fine-tune and calibration images (a training split).
        eval_data: held-out evaluation images; when None, ``train_data`` is split by a hash
            of each file name and ``val_fraction`` of it is held out (never fine-tuned on).
        val_fraction: held-out share for that split.
        train_res: K_train (default: what the checkpoint records).
        resolutions: candidate test resolutions (default: the prior's candidates).
        prior_stride: stride of the prior's candidate grid (the network's total stride).
        precisions, backends, shape_modes, batch_sizes: the grid.
        finetune: which of (False, True) to measure: base model and/or FixRes fine-tuned.
        finetune_epochs, finetune_lr: FixRes fine-tune options.
        calibration_size: int8 calibration images (class-balanced from train_data).
        calibration_method: "minmax", "percentile" or "entropy".
        int8_float_layers: "default" (first conv + classifier in float) or "none".
        exporter: ONNX exporter ("dynamo", "torchscript", "auto").
        eval_limit: evaluate on at most this many images (class-balanced), None: all.
        eval_batch: batch size of the accuracy runs.
        latency: LatencyConfig fields (dict) or a preset name ("quick", "standard", "thorough").
        threads: ONNX Runtime intra-op threads (None: library default).
        store: result store folder (default: OUT/store).
        retry_failed: re-run stages whose stored result is a failure.
    """

    checkpoint: str
    train_data: str
    eval_data: str | None = None
    val_fraction: float = 0.3
    model: str | None = None
    num_classes: int | None = None
    train_res: int | None = None
    resolutions: list[int] | None = None
    prior_stride: int = 32
    precisions: list[str] = field(default_factory=lambda: ["fp32", "fp16", "int8"])
    backends: list[str] = field(default_factory=lambda: ["onnxruntime"])
    shape_modes: list[str] = field(default_factory=lambda: ["fixed", "dynamic"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    finetune: list[bool] = field(default_factory=lambda: [False, True])
    finetune_epochs: int = 8
    finetune_lr: float | None = None
    calibration_size: int = 256
    calibration_method: str = "minmax"
    int8_float_layers: str = "default"
    exporter: str = "dynamo"
    eval_limit: int | None = None
    eval_batch: int = 32
    latency: dict | str = "standard"
    threads: int | None = None
    store: str | None = None
    retry_failed: bool = False

    def validate(self) -> None:
        for name in ("checkpoint",):
            if not os.path.isfile(getattr(self, name)):
                raise UserInputError(f"{name} '{getattr(self, name)}' does not exist")
        for name in ("train_data", "eval_data"):
            if getattr(self, name) is None and name == "eval_data":
                continue
            if not os.path.isdir(getattr(self, name)):
                raise UserInputError(f"{name} '{getattr(self, name)}' is not a folder (ImageFolder root)")
        bad = [p for p in self.precisions if p not in ("fp32", "fp16", "int8")]
        if bad:
            raise UserInputError(f"unknown precisions {bad}; choose from fp32, fp16, int8")
        bad = [m for m in self.shape_modes if m not in SHAPE_MODES]
        if bad:
            raise UserInputError(f"unknown shape modes {bad}; choose from {SHAPE_MODES}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UserInputError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if not self.finetune:
            raise UserInputError("finetune must list False and/or True")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepResult:
    """All points of a sweep plus what is needed to report on them without re-measuring."""

    points: list[SweepPoint]
    train_res: int
    resolutions: list[int]
    config: dict
    prior: dict | None
    class_names: list[str]
    preprocess: dict
    peak_gflops: float | None
    seconds: float
    store_hits: int
    store_misses: int
    failures: list[dict] = field(default_factory=list)
    finetune_curve: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["points"] = [p.to_dict() for p in self.points]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SweepResult:
        d = dict(d)
        d["points"] = [SweepPoint.from_dict(p) for p in d["points"]]
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SweepResult:
        return cls.from_dict(read_json(path))


def available_backends() -> list[str]:
    """Backends that can run here: onnxruntime when importable; tensorrt with a CUDA GPU."""
    import importlib.util

    out = []
    if importlib.util.find_spec("onnxruntime") is not None:
        out.append("onnxruntime")
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import torch

            if torch.cuda.is_available():
                out.append("tensorrt")
        except ImportError:
            pass
    return out


def _latency_config(spec):
    from fixres_deploy.bench import LatencyConfig

    if isinstance(spec, str):
        presets = {"quick": LatencyConfig.quick, "standard": LatencyConfig.standard, "thorough": LatencyConfig.thorough}
        if spec not in presets:
            raise UserInputError(f"latency preset must be one of {sorted(presets)}, got {spec!r}")
        return presets[spec]()
    return LatencyConfig.from_dict(spec)


class _EvalCache:
    """Preprocessed evaluation images per resolution, in memory: decode once, evaluate many."""

    def __init__(self, index, base_cfg):
        self.index = index
        self.base_cfg = base_cfg
        self.arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, list]] = {}

    def get(self, res: int):
        if res not in self.arrays:
            from fixres_deploy.data import make_loader
            from fixres_deploy.preprocess import eval_transform

            xs, ys, idx, skipped = [], [], [], []
            loader = make_loader(self.index, eval_transform(self.base_cfg.at_resolution(res)), batch_size=64)
            for images, labels, indices, sk in progress(loader, desc=f"preprocess eval @{res}"):
                skipped.extend(sk)
                if images is not None:
                    xs.append(images.numpy())
                    ys.append(labels.numpy())
                    idx.append(indices.numpy())
            self.arrays.clear()  # keep one resolution at a time: memory stays bounded
            self.arrays[res] = (np.concatenate(xs), np.concatenate(ys), np.concatenate(idx), skipped)
        return self.arrays[res]


def _evaluate_runner(runner, x: np.ndarray, y: np.ndarray, idx: np.ndarray, skipped: list, batch: int, fixed_batch: bool):
    from fixres_deploy.evaluate import AccuracyMeter

    meter = AccuracyMeter()
    meter.skips.extend(skipped)
    with runner:
        for s in range(0, len(x), batch):
            xb = x[s : s + batch]
            n = len(xb)
            if fixed_batch and n < batch:
                xb = np.concatenate([xb, np.zeros((batch - n,) + xb.shape[1:], dtype=xb.dtype)])
            logits = runner.predict(np.ascontiguousarray(xb))[:n]
            meter.update(logits, y[s : s + n], idx[s : s + n])
    return meter.result()


def run_sweep(cfg: SweepConfig, out_dir: str | os.PathLike) -> SweepResult:
    """`fixres-deploy sweep`: measure the grid, write OUT/sweep.json, return the result."""
    import torch

    from fixres_deploy.backends.base import BuildOptions, ShapeSpec, build_engine, load_runner
    from fixres_deploy.bench import measure_latency, measure_peak_gflops
    from fixres_deploy.calibration import calibration_batches
    from fixres_deploy.data import class_balanced_subset, index_image_folder
    from fixres_deploy.evaluate import index_for_model, pack_bits
    from fixres_deploy.export import export_onnx
    from fixres_deploy.finetune import FinetuneOptions, fixres_finetune, resolve_fixres_modules
    from fixres_deploy.flops import count_flops
    from fixres_deploy.models import load_model, save_checkpoint
    from fixres_deploy.precision import default_int8_flavor, make_precision_variant
    from fixres_deploy.preprocess import resolve_preprocess
    from fixres_deploy.prior import image_sizes_from_folder, resolution_prior

    t_start = time.perf_counter()
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(cfg.store or out_dir / "store")
    lat_cfg = _latency_config(cfg.latency)
    versions = library_versions("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt", "numpy", "fixres-deploy")
    machine = machine_id()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    loaded = load_model(cfg.model, cfg.num_classes, cfg.checkpoint)
    base_cfg = resolve_preprocess(loaded.preprocess, test_input_size=cfg.train_res or
                                  (loaded.preprocess or {}).get("train_input_size") or
                                  (loaded.preprocess or {}).get("test_input_size"),
                                  default_mean=loaded.default_mean, default_std=loaded.default_std)
    train_res = cfg.train_res or base_cfg.train_input_size or base_cfg.test_input_size
    if train_res is None:
        raise UserInputError("the train resolution is unknown: pass --train-res")
    base_cfg = base_cfg.at_resolution(train_res)
    train_index = index_for_model(cfg.train_data, loaded)
    if cfg.eval_data:
        eval_index = index_for_model(cfg.eval_data, loaded)
    else:
        from fixres_deploy.data import split_by_hash

        train_index, eval_index = split_by_hash(train_index, cfg.val_fraction)
    if cfg.eval_limit:
        eval_index = class_balanced_subset(eval_index, max(1, cfg.eval_limit // len(eval_index.classes)))
    class_names = loaded.class_names or train_index.classes
    ckpt_sha = sha256_file(cfg.checkpoint)
    train_hash = train_index.content_hash()
    eval_hash = eval_index.content_hash()

    prior = None
    if cfg.resolutions:
        resolutions = sorted(set(int(r) for r in cfg.resolutions))
    else:
        prior = resolution_prior(train_res, stride=cfg.prior_stride, crop_pct=base_cfg.crop_pct,
                                 image_sizes=image_sizes_from_folder(cfg.train_data, limit=300), samples=50_000)
        resolutions = sorted(set(prior.candidates) | {train_res})
    backends = [b for b in cfg.backends]
    max_batch = max(cfg.batch_sizes)
    mods = resolve_fixres_modules(loaded.model)
    peak_rec, _ = store.run("peak", {"machine": machine, "versions": versions, "threads": cfg.threads},
                            lambda d: measure_peak_gflops(threads=cfg.threads))
    peak = (peak_rec.get("result") or {}).get("peak_gflops")

    n_tasks = len(resolutions) * len(cfg.finetune) * len(cfg.precisions) * len(backends) * len(cfg.shape_modes)
    bar = progress(total=n_tasks, desc="sweep")
    points: list[SweepPoint] = []
    failures: list[dict] = []
    eval_cache = _EvalCache(eval_index, base_cfg)

    def fail(stage: str, what: str, rec: dict) -> None:
        failures.append({"stage": stage, "what": what, "error": rec["error"], "key": rec["key"]})
        log.warning("%s failed for %s: %s", stage, what, rec["error"])

    for res in resolutions:
        rcfg = base_cfg.at_resolution(res)
        for ft in cfg.finetune:
            # ---- model at this resolution: base, or FixRes fine-tuned -------------------
            if ft:
                ft_inputs = {"checkpoint": ckpt_sha, "train": train_hash, "resolution": res,
                             "preprocess": rcfg.to_dict(), "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr,
                             "modules": mods.to_dict(), "versions": {"torch": versions["torch"]}}

                def do_ft(d: Path, rcfg=rcfg, res=res) -> dict:
                    import copy

                    model = copy.deepcopy(loaded.model)
                    stats = fixres_finetune(model, train_index, rcfg, FinetuneOptions(
                        epochs=cfg.finetune_epochs, lr=cfg.finetune_lr), mods=mods)
                    path = save_checkpoint(d / f"model_r{res}.pt", model, spec=loaded.spec,
                                           num_classes=loaded.num_classes, class_names=class_names,
                                           preprocess=rcfg.to_dict())
                    return {"checkpoint": str(path), "finetune": stats.to_dict(), "files": [str(path)]}

                bar.set_postfix_str(f"fine-tune @{res}")
                rec, _ = store.run("finetune", ft_inputs, do_ft, retry_failed=cfg.retry_failed)
                if rec["error"]:
                    fail("finetune", f"@{res}", rec)
                    bar.update(len(cfg.precisions) * len(backends) * len(cfg.shape_modes))
                    continue
                ckpt_path = rec["result"]["checkpoint"]
                model_sha = sha256_file(ckpt_path)
            else:
                ckpt_path, model_sha = cfg.checkpoint, ckpt_sha

            # ---- ONNX export (dynamic axes; fixed engines get fixed copies) --------------
            exp_inputs = {"model": model_sha, "preprocess": rcfg.to_dict(), "exporter": cfg.exporter,
                          "class_names": class_names, "versions": versions}

            def do_export(d: Path, rcfg=rcfg, ckpt_path=ckpt_path, res=res) -> dict:
                lm = load_model(None if loaded.spec is None else loaded.spec, loaded.num_classes, ckpt_path,
                                image_size=res)
                path = d / f"model_r{res}.onnx"
                er = export_onnx(lm.model, path, rcfg, dynamic=True, exporter=cfg.exporter,
                                 validation_images=train_index, validate_resolutions=[res],
                                 class_names=class_names, model_spec=loaded.spec, write_sidecar=False)
                return {"onnx": str(path), "export": er.to_dict(), "files": [str(path)]}

            bar.set_postfix_str(f"export @{res}{' FixRes' if ft else ''}")
            rec, _ = store.run("export", exp_inputs, do_export, retry_failed=cfg.retry_failed)
            if rec["error"]:
                fail("export", f"@{res} ft={ft}", rec)
                bar.update(len(cfg.precisions) * len(backends) * len(cfg.shape_modes))
                continue
            onnx_path = rec["result"]["onnx"]
            onnx_sha = sha256_file(onnx_path)
            flops_rec, _ = store.run("flops", {"onnx": onnx_sha, "resolution": res},
                                     lambda d, p=onnx_path, r=res: count_flops(p, r).to_dict())
            gflops = (flops_rec.get("result") or {}).get("total_gflops")

            for precision in cfg.precisions:
                for backend in backends:
                    flavor = default_int8_flavor(backend) if precision == "int8" else None
                    var_inputs = {"onnx": onnx_sha, "precision": precision, "flavor": flavor,
                                  "method": cfg.calibration_method if precision == "int8" else None,
                                  "float_layers": cfg.int8_float_layers if precision == "int8" else None,
                                  "calibration": {"train": train_hash, "n": cfg.calibration_size,
                                                  "preprocess": rcfg.to_dict()} if precision == "int8" else None,
                                  "versions": versions}

                    def do_variant(d: Path, precision=precision, flavor=flavor, onnx_path=onnx_path, rcfg=rcfg, res=res):
                        batches = None
                        if precision == "int8":
                            calib = class_balanced_subset(train_index, max(1, cfg.calibration_size // len(train_index.classes)))
                            batches = calibration_batches(calib, rcfg)
                        out = d / f"model_r{res}.{precision}.onnx"
                        fl = None if cfg.int8_float_layers == "none" else cfg.int8_float_layers
                        v = make_precision_variant(onnx_path, precision, str(out), calibration_batches=batches,
                                                   flavor=flavor or "tensorrt", method=cfg.calibration_method,
                                                   float_layers=fl)
                        return {"variant": v.to_dict(), "path": v.path, "files": [v.path]}

                    bar.set_postfix_str(f"{precision} variant @{res}")
                    vrec, _ = store.run("variant", var_inputs, do_variant, retry_failed=cfg.retry_failed)
                    if vrec["error"]:
                        fail("variant", f"{precision} @{res} ft={ft}", vrec)
                        bar.update(len(cfg.shape_modes))
                        continue
                    var_path = vrec["result"]["path"]
                    var_sha = sha256_file(var_path)
                    quant = {k: vrec["result"]["variant"].get(k) for k in ("flavor", "float_layers", "calibration")} \
                        if precision == "int8" else {}

                    for mode in cfg.shape_modes:
                        bar.set_postfix_str(f"{backend} {precision} @{res} {mode}{' FixRes' if ft else ''}")
                        shapes_by_batch: dict[int, ShapeSpec] = {}
                        if mode == "fixed":
                            for b in sorted(set(cfg.batch_sizes) | {max_batch}):
                                shapes_by_batch[b] = ShapeSpec.fixed(b, res)
                        else:
                            dyn = ShapeSpec.resolution_bands(resolutions, max_batch=max_batch, opt_batch=max_batch)
                            # the profile's opt at this resolution: what TensorRT tunes for
                            from fixres_deploy.backends.base import ShapeProfile

                            prof = dyn.profiles[0]
                            dyn = ShapeSpec.dynamic([ShapeProfile(prof.min, (max_batch, 3, res, res), prof.max)])
                            for b in cfg.batch_sizes:
                                shapes_by_batch[b] = dyn
                        engines: dict[int, dict] = {}
                        for b, shapes in shapes_by_batch.items():
                            if mode == "dynamic" and engines:
                                engines[b] = next(iter(engines.values()))
                                continue
                            eng_inputs = {"variant": var_sha, "backend": backend, "shapes": shapes.to_dict(),
                                          "threads": cfg.threads, "versions": versions}

                            def do_engine(d: Path, shapes=shapes, backend=backend, var_path=var_path, precision=precision):
                                art = build_engine(backend, var_path, shapes, BuildOptions(threads=cfg.threads),
                                                   out_dir=str(d), precision=precision)
                                if art.error:
                                    raise RuntimeError(art.error)
                                files = [art.path] if art.path and str(art.path).startswith(str(d)) else []
                                return {"artifact": art.to_dict(), "files": files}

                            erec, _ = store.run("engine", eng_inputs, do_engine, retry_failed=cfg.retry_failed)
                            engines[b] = erec
                        # accuracy: once per (graph, backend, mode), at the largest batch
                        acc_engine = engines[max_batch] if mode == "fixed" else engines[cfg.batch_sizes[0]]
                        base_point = dict(resolution=res, precision=precision, backend=backend, shape_mode=mode,
                                          finetuned=ft, onnx_path=var_path, checkpoint=ckpt_path, quant=quant,
                                          gflops_per_image=gflops, peak_gflops=peak)
                        if acc_engine["error"]:
                            fail("engine", f"{backend} {precision} @{res} {mode}", acc_engine)
                            for b in cfg.batch_sizes:
                                points.append(SweepPoint(batch_size=b, error=f"engine: {acc_engine['error']}", **base_point))
                            bar.update(1)
                            continue
                        art = acc_engine["result"]["artifact"]
                        acc_inputs = {"engine": art.get("sha256") or acc_engine["key"], "eval": eval_hash,
                                      "preprocess": rcfg.to_dict(), "batch": max_batch, "versions": versions}

                        def do_acc(d: Path, art=art, res=res, mode=mode):
                            x, y, idx, skipped = eval_cache.get(res)
                            runner = load_runner(art)
                            r = _evaluate_runner(runner, x, y, idx, skipped, max_batch, fixed_batch=(mode == "fixed"))
                            return {"top1": r.top1, "top1_ci": list(r.top1_ci), "top5": r.top5,
                                    "top5_ci": list(r.top5_ci), "n": r.n, "skipped": r.skipped,
                                    "correct1_bits": pack_bits(r.correct1)}

                        arec, _ = store.run("accuracy", acc_inputs, do_acc, retry_failed=cfg.retry_failed)
                        if arec["error"]:
                            fail("accuracy", f"{backend} {precision} @{res} {mode}", arec)
                        for b in cfg.batch_sizes:
                            erec = engines[b]
                            point = SweepPoint(batch_size=b, **base_point)
                            if arec["error"] or erec["error"]:
                                point.error = arec["error"] or erec["error"]
                                points.append(point)
                                continue
                            acc = arec["result"]
                            point.top1, point.top1_ci, point.top5, point.top5_ci = acc["top1"], acc["top1_ci"], acc["top5"], acc["top5_ci"]
                            point.n, point.correct1_bits = acc["n"], acc["correct1_bits"]
                            eart = erec["result"]["artifact"]
                            point.engine_path = eart.get("path")
                            point.engine = eart
                            lat_inputs = {"engine": eart.get("sha256") or erec["key"], "batch": b, "resolution": res,
                                          "latency": lat_cfg.to_dict(), "machine": machine, "threads": cfg.threads,
                                          "versions": versions}

                            def do_lat(d: Path, eart=eart, b=b, res=res):
                                runner = load_runner(eart)
                                x = np.random.default_rng(0).standard_normal((b, 3, res, res)).astype(np.float32)
                                with runner:
                                    lr = measure_latency(runner, x, lat_cfg)
                                return lr.to_dict()

                            lrec, _ = store.run("latency", lat_inputs, do_lat, retry_failed=cfg.retry_failed)
                            point.key = lrec["key"]
                            if lrec["error"]:
                                fail("latency", point.label, lrec)
                                point.error = lrec["error"]
                            else:
                                _fill_latency(point, lrec["result"])
                            points.append(point)
                        bar.update(1)
    bar.close()
    result = SweepResult(
        points=points, train_res=train_res, resolutions=resolutions, config=cfg.to_dict(),
        prior=prior.to_dict() if prior else None, class_names=list(class_names), preprocess=base_cfg.to_dict(),
        peak_gflops=peak, seconds=time.perf_counter() - t_start, store_hits=store.hits, store_misses=store.misses,
        failures=failures, finetune_curve=_curve_from_points(points, train_res),
    )
    write_json(out_dir / "sweep.json", result.to_dict())
    return result


def _fill_latency(point: SweepPoint, lat: dict) -> None:
    point.latency_p50_ms = lat["latency_p50_ms"]
    point.latency_p90_ms = lat["latency_p90_ms"]
    point.latency_p99_ms = lat["latency_p99_ms"]
    point.latency_mean_ms = lat["latency_mean_ms"]
    point.latency_std_ms = lat["latency_std_ms"]
    point.throughput_ips = lat["throughput_ips"]
    point.contended = bool(lat.get("contended"))
    point.latency_meta = {
        "repeat_p50_ms": lat.get("latency_p50_repeats_ms"),
        "iters": lat.get("iters"),
        "threads": lat.get("threads"),
        "load": lat.get("load"),
        "remeasured": lat.get("remeasured"),
        "p50_spread_pct": lat.get("p50_spread_pct"),
    }
    if point.gflops_per_image and point.throughput_ips:
        point.achieved_gflops = point.gflops_per_image * point.throughput_ips


def _curve_from_points(points: Sequence[SweepPoint], train_res: int) -> list[dict]:
    """Top-1 per resolution with and without fine-tuning (fp32; any backend/mode/batch)."""
    out: dict[tuple[int, bool], SweepPoint] = {}
    for p in points:
        if p.precision == "fp32" and p.top1 is not None:
            out.setdefault((p.resolution, p.finetuned), p)
    rows = []
    for res in sorted({r for r, _ in out}):
        row = {"resolution": res, "is_train_res": res == train_res}
        for ft, name in ((False, "no_finetune"), (True, "finetuned")):
            p = out.get((res, ft))
            row[name] = {"top1": p.top1, "top1_ci": p.top1_ci} if p else None
        rows.append(row)
    return rows
