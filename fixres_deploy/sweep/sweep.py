"""The sweep: accuracy and latency of every engine across resolutions, precisions, batch sizes.

Grid: candidate resolutions × {base model, FixRes fine-tuned at that resolution} ×
precision (fp32 / fp16 / int8) × backend × shape mode (fixed / dynamic) × batch size. Each
point's top-1/top-5 are measured on the engine itself (not the torch model) and its latency
with :mod:`fixres_deploy.measure.bench`.

Every stage goes through a :class:`fixres_deploy.sweep.store.ResultStore`, keyed by everything that
determines it: checkpoint and data hashes, resolution, precision, options, library versions
(and, for latency, the machine). An interrupted sweep resumes; a repeated one measures
nothing twice; a changed input re-measures only what depends on it. A failed stage is
recorded with its error and the sweep goes on.

Accuracy does not depend on the batch size, so it is measured once per engine graph and
shape mode (at the largest batch of the grid). Latency does not depend on the weights: it is
keyed by the graph's structure, and all engines of one batch size are timed together,
interleaved in rounds, after every engine is built (:mod:`fixres_deploy.sweep.latency_groups`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fixres_deploy.core.env import PIPELINE_MODULES, library_versions, machine_id
from fixres_deploy.core.limits import check_pixels
from fixres_deploy.core.schema import check_schema, stamp
from fixres_deploy.core.utils import progress, read_json, sha256_file, write_json
from fixres_deploy.sweep.config import SweepConfig
from fixres_deploy.sweep.latency_groups import LatencyGroups
from fixres_deploy.sweep.points import SweepPoint
from fixres_deploy.sweep.shard import merge_note, my_cells, resolve_shard, write_manifest
from fixres_deploy.sweep.store import ResultStore, StageFailed

log = logging.getLogger(__name__)

SWEEP_FORMAT = "fixres-deploy/sweep"
#: 2: latency per graph structure, timed per batch in interleaved rounds (latency_groups,
#: points' latency_rounds); FixRes diagnostics
SWEEP_SCHEMA_VERSION = 2


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
    tensorrt_int8_prediction: list[dict] = field(default_factory=list)  # sweep/trt_int8.py
    latency_groups: list[dict] = field(default_factory=list)
    diagnostics: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["points"] = [p.to_dict() for p in self.points]
        return stamp(d, SWEEP_FORMAT, SWEEP_SCHEMA_VERSION)

    @classmethod
    def from_dict(cls, d: dict, source: str = "sweep.json") -> SweepResult:
        check_schema(
            d,
            SWEEP_FORMAT,
            SWEEP_SCHEMA_VERSION,
            source,
            "Re-run the sweep with this fixres-deploy (stage results are reused from its store).",
        )
        d = {k: v for k, v in d.items() if k not in ("format", "schema_version")}
        d["points"] = [SweepPoint.from_dict(p) for p in d["points"]]
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SweepResult:
        """The one reader of ``sweep.json``."""
        return cls.from_dict(read_json(path), os.fspath(path))

    def save(self, path: str | os.PathLike) -> str:
        """The one writer of ``sweep.json``."""
        return write_json(path, self.to_dict())


class _EvalCache:
    """Preprocessed evaluation images per resolution, in memory: decode once, evaluate many."""

    def __init__(self, index, base_cfg):
        self.index = index
        self.base_cfg = base_cfg
        self.arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, list]] = {}

    def get(self, res: int):
        if res not in self.arrays:
            from fixres_deploy.core.preprocess import eval_transform
            from fixres_deploy.data.folders import make_loader

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


def run_sweep(cfg: SweepConfig, out_dir: str | os.PathLike) -> SweepResult:
    """`fixres-deploy sweep`: measure the grid, write OUT/sweep.json, return the result."""
    return _Sweep(cfg, out_dir).run()


class _Sweep:
    """One sweep: the set-up shared by all stages, one method per stage, a flat main loop.

    Every stage goes through ``self.store.run(stage, inputs, fn)``; ``inputs`` holds the hashes
    of the upstream artifacts, so a record is reused exactly when nothing it depends on changed.
    """

    def __init__(self, cfg: SweepConfig, out_dir: str | os.PathLike):
        import torch

        from fixres_deploy.core.preprocess import resolve_preprocess
        from fixres_deploy.data.folders import class_balanced_subset, split_by_hash
        from fixres_deploy.fixres.evaluate import index_for_model
        from fixres_deploy.fixres.finetune import resolve_fixres_modules
        from fixres_deploy.fixres.prior import image_sizes_from_folder, resolution_prior
        from fixres_deploy.measure.bench import measure_peak_gflops
        from fixres_deploy.models.registry import load_model

        self.t_start = time.perf_counter()
        cfg.validate()
        for backend in cfg.backends:  # a missing library fails now, not after fine-tuning and export
            from fixres_deploy.engines.build import _unavailable

            if (missing := _unavailable(backend)) is not None:
                raise missing
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # a shard leaves temp folders alone: other shards (maybe on other hosts) may be writing them
        self.store = ResultStore(cfg.store or self.out_dir / "store", clean_orphans=resolve_shard(cfg.shard) is None)
        self.lat_cfg = cfg.latency_config()
        self.versions = library_versions(*PIPELINE_MODULES)
        self.machine = machine_id()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

        self.loaded = loaded = load_model(cfg.model, cfg.num_classes, cfg.checkpoint)
        recorded = loaded.preprocess or {}
        base_cfg = resolve_preprocess(
            loaded.preprocess,
            test_input_size=cfg.train_res or recorded.get("train_input_size") or recorded.get("test_input_size"),
            default_mean=loaded.default_mean,
            default_std=loaded.default_std,
        )
        self.train_res = cfg.train_res or base_cfg.train_input_size or base_cfg.test_input_size
        self.base_cfg = base_cfg.at_resolution(self.train_res)
        self.train_index = index_for_model(cfg.train_data, loaded)
        if cfg.eval_data:
            self.eval_index = index_for_model(cfg.eval_data, loaded)
        else:
            self.train_index, self.eval_index = split_by_hash(self.train_index, cfg.val_fraction)
        if cfg.eval_limit:
            self.eval_index = class_balanced_subset(
                self.eval_index, max(1, cfg.eval_limit // len(self.eval_index.classes))
            )
        self.class_names = loaded.class_names or self.train_index.classes
        self.ckpt_sha = sha256_file(cfg.checkpoint)
        self.train_hash = self.train_index.content_hash()
        self.eval_hash = self.eval_index.content_hash()
        self.prior = None
        if cfg.resolutions:
            self.resolutions = sorted(set(int(r) for r in cfg.resolutions))
            if len(self.resolutions) < len(cfg.resolutions):
                log.warning("duplicate resolutions in %s: each is measured once", list(cfg.resolutions))
        else:
            self.prior = resolution_prior(
                self.train_res,
                stride=cfg.prior_stride,
                crop_pct=self.base_cfg.crop_pct,
                image_sizes=image_sizes_from_folder(cfg.train_data, limit=300),
                samples=50_000,
            )
            self.resolutions = sorted(set(self.prior.candidates) | {self.train_res})
        self.max_batch = max(cfg.batch_sizes)
        check_pixels(
            "sweep", self.resolutions, [self.max_batch], override=cfg.max_pixels, flags="resolutions/batch_sizes"
        )
        self.mods = resolve_fixres_modules(loaded.model)
        self.shard = resolve_shard(cfg.shard)  # (K, N) or None; see sweep/shard.py
        self.peak = None
        if not self.shard:  # a machine figure: measured where the latencies are (the merge)
            peak_rec, _ = self.store.run(
                "peak",
                {"machine": self.machine, "versions": self.versions, "threads": cfg.threads},
                lambda d: measure_peak_gflops(threads=cfg.threads),
            )
            self.peak = (peak_rec.get("result") or {}).get("peak_gflops")
        self.eval_cache = _EvalCache(self.eval_index, self.base_cfg)
        self.points: list[SweepPoint] = []
        self.failures: list[dict] = []
        self.groups = LatencyGroups(self)

    # -- helpers --------------------------------------------------------------------------
    def _run(self, stage: str, inputs: dict, fn, what: str) -> dict:
        rec, _ = self.store.run(stage, inputs, fn, retry_failed=self.cfg.retry_failed)
        if rec["error"]:
            self.failures.append({"stage": stage, "what": what, "error": rec["error"], "key": rec["key"]})
            log.warning("%s failed for %s: %s", stage, what, rec["error"])
            raise StageFailed(f"{stage}: {rec['error']}")
        return rec

    # -- stages ---------------------------------------------------------------------------
    def model_at(self, res: int, ft: bool) -> tuple[str, str]:
        """(checkpoint path, sha256): the base model, or the FixRes fine-tune at ``res``."""
        if not ft:
            return self.cfg.checkpoint, self.ckpt_sha
        import copy

        from fixres_deploy.fixres.finetune import FinetuneOptions, fixres_finetune
        from fixres_deploy.models.registry import fixres_record, save_checkpoint

        rcfg = self.base_cfg.at_resolution(res)
        cfg = self.cfg

        def do_ft(d: Path) -> dict:
            model = copy.deepcopy(self.loaded.model)
            stats = fixres_finetune(
                model,
                self.train_index,
                rcfg,
                FinetuneOptions(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr),
                mods=self.mods,
            )
            path = save_checkpoint(
                d / f"model_r{res}.pt",
                model,
                spec=self.loaded.spec,
                num_classes=self.loaded.num_classes,
                class_names=self.class_names,
                preprocess=rcfg.to_dict(),
                fixres=fixres_record(res, stats.to_dict()),
            )
            return {"checkpoint": str(path), "finetune": stats.to_dict(), "files": [str(path)]}

        inputs = {
            "checkpoint": self.ckpt_sha,
            "train": self.train_hash,
            "resolution": res,
            "preprocess": rcfg.to_dict(),
            "epochs": cfg.finetune_epochs,
            "lr": cfg.finetune_lr,
            "modules": self.mods.to_dict(),
            "versions": {"torch": self.versions["torch"]},
        }
        rec = self._run("finetune", inputs, do_ft, f"@{res}")
        path = rec["result"]["checkpoint"]
        return path, sha256_file(path)

    def export(self, res: int, ckpt_path: str, model_sha: str, ft: bool) -> tuple[str, str, float | None]:
        """(ONNX path, sha256, GFLOPs per image) of a dynamic-axes export of the checkpoint."""
        from fixres_deploy.export.onnx_export import export_onnx
        from fixres_deploy.models.flops import count_flops
        from fixres_deploy.models.registry import load_model

        rcfg = self.base_cfg.at_resolution(res)

        def do_export(d: Path) -> dict:
            lm = load_model(self.loaded.spec, self.loaded.num_classes, ckpt_path, image_size=res)
            path = d / f"model_r{res}.onnx"
            er = export_onnx(
                lm.model,
                path,
                rcfg,
                dynamic=True,
                exporter=self.cfg.exporter,
                validation_images=self.train_index,
                validate_resolutions=[res],
                class_names=self.class_names,
                model_spec=self.loaded.spec,
                write_sidecar=False,
            )
            return {"onnx": str(path), "export": er.to_dict(), "files": [str(path)]}

        inputs = {
            "model": model_sha,
            "preprocess": rcfg.to_dict(),
            "exporter": self.cfg.exporter,
            "class_names": self.class_names,
            "versions": self.versions,
        }
        rec = self._run("export", inputs, do_export, f"@{res} ft={ft}")
        path = rec["result"]["onnx"]
        sha = sha256_file(path)
        flops_rec, _ = self.store.run(
            "flops", {"onnx": sha, "resolution": res}, lambda d: count_flops(path, res).to_dict()
        )
        return path, sha, (flops_rec.get("result") or {}).get("total_gflops")

    def build_options(self):
        """The BuildOptions of every sweep engine (TensorRT timing cache kept in the store)."""
        from fixres_deploy.backends.base import BuildOptions
        from fixres_deploy.engines.engine import with_timing_cache

        return with_timing_cache(BuildOptions(threads=self.cfg.threads), self.store.root)

    def variant(
        self, res: int, onnx_path: str, onnx_sha: str, precision: str, backend: str, ft: bool
    ) -> tuple[str, str, dict]:
        """(path, sha256, int8 details) of the precision variant for ``backend``.

        The recipe and the file come from :mod:`fixres_deploy.engines.engine`, exactly as in
        ``fixres-deploy build``; only the caching (result store) is the sweep's.
        """
        from fixres_deploy.engines.engine import legacy_fp16_quant, make_variant, variant_recipe

        cfg = self.cfg
        int8 = precision == "int8"
        recipe = variant_recipe(backend, precision, res if int8 else None, options=self.build_options())
        if recipe.route == "source":
            return onnx_path, onnx_sha, {}
        if recipe.route == "legacy_fp16":
            return onnx_path, onnx_sha, legacy_fp16_quant()

        float_layers, sensitivity = cfg.int8_float_layers, None
        if int8 and float_layers == "sensitivity":
            sensitivity = self.sensitivity(res, onnx_path, onnx_sha, recipe.flavor, ft)
            float_layers = sensitivity["chosen_float_layers"]

        def do_variant(d: Path) -> dict:
            calibration = None
            if int8:
                calibration = self.calibration_subset()
            info = make_variant(
                onnx_path,
                recipe,
                d,
                calibration_data=calibration,
                preprocess=self.base_cfg,
                calibration_method=cfg.calibration_method,
                float_layers=float_layers,
            )
            return {"variant": info, "path": info["variant_path"], "files": [info["variant_path"]]}

        inputs = {
            "onnx": onnx_sha,
            "recipe": recipe.to_dict(),
            "method": cfg.calibration_method if int8 else None,
            "float_layers": float_layers if int8 else None,
            "qdq_float_parts": "fp16" if recipe.flavor == "tensorrt" else None,  # precision/qdq_fp16.py
            "calibration": {
                "train": self.train_hash,
                "n": cfg.calibration_size,
                "preprocess": self.base_cfg.at_resolution(res).to_dict(),
            }
            if int8
            else None,
            "versions": self.versions,
        }
        rec = self._run("variant", inputs, do_variant, f"{precision} @{res} ft={ft}")
        path = rec["result"]["path"]
        quant = {k: rec["result"]["variant"].get(k) for k in ("flavor", "float_layers", "calibration")} if int8 else {}
        if sensitivity is not None:
            quant["sensitivity"] = {
                k: sensitivity[k]
                for k in ("budget_pts", "fp32_top1", "n_eval", "all_quantized_drop_pts", "final_drop_pts", "met_budget")
            }
        return path, sha256_file(path), quant

    def calibration_subset(self):
        """The int8 calibration images: class-balanced from the training split."""
        from fixres_deploy.data.folders import class_balanced_subset

        per_class = max(1, self.cfg.calibration_size // len(self.train_index.classes))
        return class_balanced_subset(self.train_index, per_class)

    def sensitivity(self, res: int, onnx_path: str, onnx_sha: str, flavor: str, ft: bool) -> dict:
        """Which layers of this graph must stay float for int8 to cost at most the budget?

        :func:`fixres_deploy.precision.variants.layer_sensitivity` on this graph (each layer
        quantized alone, then greedily back to float, most sensitive first), calibrated on the
        calibration images and scored on other training images — never on the held-out split
        the sweep reports, so choosing the layers does not peek at the figures it is judged by.
        Stored like every stage; the sweep's int8 variant then keeps the chosen layers float.
        """
        from fixres_deploy.data.folders import class_balanced_subset
        from fixres_deploy.precision.variants import layer_sensitivity

        cfg = self.cfg
        calib = self.calibration_subset()
        used = {s.path for s in calib.samples}
        pool = self.train_index.subset([s for s in self.train_index.samples if s.path not in used])
        score = class_balanced_subset(pool, max(1, cfg.int8_sensitivity_images // len(pool.classes)), seed=1)

        def do_sensitivity(d: Path) -> dict:
            xc = _EvalCache(calib, self.base_cfg).get(res)[0]
            xe, ye = _EvalCache(score, self.base_cfg).get(res)[:2]
            rep = layer_sensitivity(
                onnx_path,
                xc,
                xe,
                ye,
                flavor=flavor,
                method=cfg.calibration_method,
                budget_pts=cfg.int8_sensitivity_budget_pts,
            )
            return rep.to_dict()

        inputs = {
            "onnx": onnx_sha,
            "flavor": flavor,
            "method": cfg.calibration_method,
            "budget_pts": cfg.int8_sensitivity_budget_pts,
            "calibration": {"train": self.train_hash, "n": cfg.calibration_size},
            "score": {"train": self.train_hash, "n": cfg.int8_sensitivity_images, "seed": 1},
            "preprocess": self.base_cfg.at_resolution(res).to_dict(),
            "versions": self.versions,
        }
        rec = self._run("sensitivity", inputs, do_sensitivity, f"int8 layer sensitivity @{res} ft={ft}")
        return rec["result"]

    def shapes_for(self, res: int, mode: str) -> dict[int, object]:
        """ShapeSpec per batch size: fixed engines per batch; one dynamic engine for all."""
        from fixres_deploy.backends.base import ShapeProfile, ShapeSpec

        if mode == "fixed":
            return {b: ShapeSpec.fixed(b, res) for b in sorted(set(self.cfg.batch_sizes) | {self.max_batch})}
        # one profile over every candidate resolution and batch, tuned (opt) for this one
        band = ShapeSpec.resolution_bands(self.resolutions, max_batch=self.max_batch).profiles[0]
        dyn = ShapeSpec.dynamic([ShapeProfile(band.min, (self.max_batch, 3, res, res), band.max)])
        return {b: dyn for b in self.cfg.batch_sizes}

    def engine(self, var_path: str, var_sha: str, backend: str, precision: str, shapes, what: str) -> dict:
        """The engine of one variant and shape spec, built and checked as ``fixres-deploy build`` does."""
        from fixres_deploy.engines.engine import build_verified_engine

        options = self.build_options()

        def do_engine(d: Path) -> dict:
            art = build_verified_engine(backend, var_path, precision, shapes, options, out_dir=d)
            if art.error:
                raise RuntimeError(art.error)
            files = [art.path] if art.path and str(art.path).startswith(str(d)) else []
            return {"artifact": art.to_dict(), "files": files}

        inputs = {
            "variant": var_sha,
            "backend": backend,
            "precision": precision,
            "shapes": shapes.to_dict(),
            "options": {k: v for k, v in options.to_dict().items() if k != "timing_cache"},
            "versions": self.versions,
        }
        return self._run("engine", inputs, do_engine, what)["result"]["artifact"]

    def accuracy(self, art: dict, res: int, mode: str, what: str) -> dict:
        """Top-1/top-5 of the engine itself on the evaluation images (once per engine graph)."""
        from fixres_deploy.backends.base import load_runner
        from fixres_deploy.fixres.evaluate import evaluate_runner_on_arrays, pack_bits

        def do_acc(d: Path) -> dict:
            x, y, idx, skipped = self.eval_cache.get(res)
            r = evaluate_runner_on_arrays(
                load_runner(art), x, y, idx, skipped, self.max_batch, fixed_batch=(mode == "fixed")
            )
            return {
                "top1": r.top1,
                "top1_ci": list(r.top1_ci),
                "top5": r.top5,
                "top5_ci": list(r.top5_ci),
                "n": r.n,
                "skipped": r.skipped,
                "correct1_bits": pack_bits(r.correct1),
            }

        inputs = {
            "engine": art.get("sha256") or art.get("path"),
            "eval": self.eval_hash,
            "preprocess": self.base_cfg.at_resolution(res).to_dict(),
            "batch": self.max_batch,
            "versions": self.versions,
        }
        return self._run("accuracy", inputs, do_acc, what)["result"]

    def diagnostics(self, resolutions: Sequence[int] | None = None) -> dict | None:
        """The FixRes diagnostic per resolution (:mod:`fixres_deploy.fixres.diagnostics`), one stage each."""
        from fixres_deploy.fixres.diagnostics import resolution_diagnostic, spread_indices
        from fixres_deploy.models.registry import load_model

        if not self.mods.head_names:
            return None
        rows = []
        for res in self.resolutions if resolutions is None else resolutions:
            ft = None
            if True in self.cfg.finetune:
                try:
                    ft = self.model_at(res, True)
                except StageFailed:
                    continue

            def do_diag(d: Path, ft=ft, res=res) -> dict:
                x = self.eval_cache.get(res)[0]
                x = x[spread_indices(len(x), self.cfg.diagnostic_images)]
                tuned = (
                    load_model(self.loaded.spec, self.loaded.num_classes, ft[0], image_size=res).model if ft else None
                )
                return resolution_diagnostic(
                    self.loaded.model,
                    tuned,
                    x,
                    res,
                    classifier=self.mods.head_names[0],
                    bn_names=self.mods.bn_names,
                    train_res=self.train_res,
                )

            inputs = {
                "checkpoint": self.ckpt_sha,
                "finetuned": ft[1] if ft else None,
                "eval": self.eval_hash,
                "images": self.cfg.diagnostic_images,
                "preprocess": self.base_cfg.at_resolution(res).to_dict(),
                "modules": self.mods.to_dict(),
                "versions": {"torch": self.versions["torch"]},
            }
            try:
                rows.append(self._run("diagnostic", inputs, do_diag, f"@{res}")["result"])
            except StageFailed:
                continue
        return {
            "images": min(self.cfg.diagnostic_images, len(self.eval_index)),
            "classifier": self.mods.head_names[0],
            "bn_modules": list(self.mods.bn_names),
            "train_res": self.train_res,
            "resolutions": rows,
        }

    # -- grid -----------------------------------------------------------------------------
    def measure_mode(self, base: dict, var_path: str, var_sha: str, mode: str) -> None:
        """Engines, accuracy and latency of one (variant, backend, shape mode): one point per batch."""
        res, backend, precision = base["resolution"], base["backend"], base["precision"]
        what = f"{backend} {precision} @{res} {mode}{' FixRes' if base['finetuned'] else ''}"
        engines: dict[int, dict] = {}
        shape_specs = self.shapes_for(res, mode)
        try:
            for b, shapes in shape_specs.items():
                engines[b] = (
                    engines[next(iter(engines))]
                    if mode == "dynamic" and engines
                    else self.engine(var_path, var_sha, backend, precision, shapes, what)
                )
            acc = self.accuracy(
                engines[self.max_batch] if mode == "fixed" else engines[self.cfg.batch_sizes[0]], res, mode, what
            )
        except StageFailed as exc:
            self.points.extend(SweepPoint(batch_size=b, error=str(exc), **base) for b in self.cfg.batch_sizes)
            return
        for b in self.cfg.batch_sizes:
            art = engines[b]
            point = SweepPoint(
                batch_size=b,
                **base,
                top1=acc["top1"],
                top1_ci=acc["top1_ci"],
                top5=acc["top5"],
                top5_ci=acc["top5_ci"],
                n=acc["n"],
                correct1_bits=acc["correct1_bits"],
                engine_path=art.get("path"),
                engine=art,
            )
            self.groups.add(point, art, var_path, b, res, shape_specs[b].to_dict())  # timed in run()
            self.points.append(point)

    def run(self) -> SweepResult:
        from fixres_deploy.sweep import trt_int8

        cfg = self.cfg
        self.trt_int8_rows: list[dict] = []
        per_model = len(cfg.precisions) * len(cfg.backends) * len(cfg.shape_modes)
        bar = progress(total=len(self.resolutions) * len(cfg.finetune) * per_model, desc="sweep")
        mine = my_cells([(res, ft) for res in self.resolutions for ft in cfg.finetune], self.shard)
        for res in self.resolutions:
            for ft in cfg.finetune:
                if (res, ft) not in mine:  # another shard's cell
                    bar.update(per_model)
                    continue
                bar.set_postfix_str(f"{'fine-tune + ' if ft else ''}export @{res}")
                try:
                    ckpt_path, model_sha = self.model_at(res, ft)
                    onnx_path, onnx_sha, gflops = self.export(res, ckpt_path, model_sha, ft)
                except StageFailed:
                    bar.update(per_model)
                    continue
                if trt_int8.enabled(cfg):
                    with contextlib.suppress(StageFailed):  # a failure is recorded in failures
                        self.trt_int8_rows.append(trt_int8.predict(self, res, ft, onnx_path, onnx_sha))
                for precision in cfg.precisions:
                    for backend in cfg.backends:
                        base = dict(
                            resolution=res,
                            precision=precision,
                            backend=backend,
                            finetuned=ft,
                            checkpoint=ckpt_path,
                            gflops_per_image=gflops,
                            peak_gflops=self.peak,
                        )
                        try:
                            var_path, var_sha, quant = self.variant(res, onnx_path, onnx_sha, precision, backend, ft)
                        except StageFailed as exc:
                            self.points.extend(
                                SweepPoint(batch_size=b, shape_mode=m, error=str(exc), **base)
                                for m in cfg.shape_modes
                                for b in cfg.batch_sizes
                            )
                            bar.update(len(cfg.shape_modes))
                            continue
                        for mode in cfg.shape_modes:
                            bar.set_postfix_str(f"{backend} {precision} @{res} {mode}{' FixRes' if ft else ''}")
                            self.measure_mode(
                                dict(base, shape_mode=mode, onnx_path=var_path, quant=quant), var_path, var_sha, mode
                            )
                            bar.update(1)
        bar.close()
        if self.shard:  # a shard: its cells' stages only; competitors are timed together by the merge
            if cfg.diagnostic_images:
                self.diagnostics([r for r in self.resolutions if (r, True in cfg.finetune) in mine])
            write_manifest(self.store.root, cfg.to_dict(), self.shard, self.machine, self.store.misses, self.store.hits)
            return self._result([], None)
        latency_groups = self.groups.run()  # competitors timed together, interleaved in rounds
        diagnostics = self.diagnostics() if cfg.diagnostic_images else None
        for p in self.points:
            if p.latency_p50_ms is not None:
                p.machine = self.machine
        merge_note(self.store, self.cfg.to_dict())
        result = self._result(latency_groups, diagnostics)
        result.save(self.out_dir / "sweep.json")
        return result

    def _result(self, latency_groups: list[dict], diagnostics: dict | None) -> SweepResult:
        from fixres_deploy.sweep import trt_int8

        cfg = self.cfg
        result = SweepResult(
            points=self.points,
            train_res=self.train_res,
            resolutions=self.resolutions,
            config=cfg.to_dict(),
            prior=self.prior.to_dict() if self.prior else None,
            class_names=list(self.class_names),
            preprocess=self.base_cfg.to_dict(),
            peak_gflops=self.peak,
            seconds=time.perf_counter() - self.t_start,
            store_hits=self.store.hits,
            store_misses=self.store.misses,
            failures=self.failures,
            finetune_curve=_curve_from_points(self.points, self.train_res),
            tensorrt_int8_prediction=trt_int8.with_fp32_reference(self.trt_int8_rows, self.points),
            latency_groups=latency_groups,
            diagnostics=diagnostics,
        )
        return result


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
