"""Write a production bundle: one folder (or .tar.gz) that says exactly what runs and how.

:func:`bundle_artifact` is the one way a bundle is made from an engine: ``fixres-deploy bundle
--index`` (:func:`bundle_from_index`) and the sweep's bundle of the selected point
(:func:`fixres_deploy.ship.bundle_select.bundle_selected`) both call it, so both write the same
``model`` record and read preprocessing and labels the same way. :func:`make_bundle` writes
the tree and the manifest (:mod:`fixres_deploy.ship.manifest`); the archive is
:mod:`fixres_deploy.ship.archive`, checks before running are :mod:`fixres_deploy.ship.verify`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime
from typing import Any

from fixres_deploy.backends.base import EngineArtifact
from fixres_deploy.core import env
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig
from fixres_deploy.core.utils import sha256_file, share_tree, write_json
from fixres_deploy.ship.archive import bundle_tar_path, write_bundle_tar
from fixres_deploy.ship.compat import tensorrt_requirements
from fixres_deploy.ship.manifest import (
    BUNDLE_FORMAT,
    ENGINE_DIR,
    LABELS_NAME,
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    ONNX_DIR,
    ONNX_SUFFIXES,
    BundleEngine,
    BundleManifest,
    batch_range,
    portable,
)
from fixres_deploy.ship.onnx_files import check_onnx_io, copy_onnx, unique_name

log = logging.getLogger(__name__)


def _file_table(root: str) -> dict[str, dict]:
    table = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel == MANIFEST_NAME:
                continue
            table[rel] = {"sha256": sha256_file(full), "size_bytes": os.path.getsize(full)}
    return table


def make_bundle(
    out_dir: str | os.PathLike,
    *,
    engines: list[EngineArtifact],
    onnx_sources: list[str],
    preprocess: PreprocessConfig,
    class_names: list[str],
    model: dict,
    metrics: dict,
    selection: dict | None = None,
    tar: bool = False,
    overwrite: bool = False,
    multires: Any = None,
) -> BundleManifest:
    """Write a production bundle; nothing half-written ever appears at ``out_dir``.

    Args:
        out_dir: the bundle folder to create.
        engines: built artifacts; the first is the primary engine (what the runtime runs by
            default). Each engine's ``source_onnx`` is bundled too.
        onnx_sources: further ONNX files to carry (e.g. the fp32 reference).
        preprocess: the exact preprocessing the engine's accuracy was measured with.
        class_names: label names in output-index order.
        model: spec, checkpoint sha256, fine-tuned resolution, ...
        metrics: the selected operating point's measurements (a SweepPoint dict) or any metrics.
        selection: how the point was chosen (constraints, candidates), if known.
        tar: also write ``out_dir.tar.gz`` beside the folder.
        overwrite: replace an existing bundle at ``out_dir``.
        multires: a :class:`~fixres_deploy.ship.manifest.MultiresInfo` for a head-bank engine
            (every resolution must be accepted by every engine).

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not engines:
        raise UserInputError("a bundle needs at least one engine")
    if not isinstance(preprocess, PreprocessConfig):
        raise UserInputError(f"preprocess must be a PreprocessConfig, got {type(preprocess).__name__}")
    class_names = [str(c) for c in class_names or []]
    if not class_names:
        raise UserInputError("a bundle needs the class names (labels)")
    bad = [c for c in class_names if not c or "\n" in c or "\r" in c]
    if bad:
        raise UserInputError(f"class names must be non-empty single lines, got {bad[:3]}")
    if os.path.exists(out_dir) and not overwrite:
        raise UserInputError(f"'{out_dir}' already exists: choose another folder or pass overwrite (--overwrite)")
    resolution = preprocess.test_input_size
    for art in engines:
        if art.error:
            raise UserInputError(f"cannot bundle a failed build ({art.backend} {art.precision}): {art.error}")
        if not art.path or not os.path.isfile(art.path):
            raise UserInputError(f"engine file '{art.path}' does not exist")
        if art.shapes is None:
            raise UserInputError(f"engine '{art.path}' records no input shapes")
        if batch_range(art.shapes, resolution) is None:
            raise UserInputError(
                f"engine '{art.path}' does not accept {resolution}x{resolution} inputs (profiles "
                f"{[p.to_dict() for p in art.shapes.profiles]}), but the preprocessing makes them"
            )
        if art.source_onnx and not os.path.isfile(art.source_onnx):
            raise UserInputError(f"ONNX source '{art.source_onnx}' of engine '{art.path}' does not exist")
        for r in multires.resolutions if multires is not None else ():
            if batch_range(art.shapes, r) is None:
                raise UserInputError(f"engine '{art.path}' does not accept {r}x{r} inputs of the multires section")
    for src in onnx_sources:
        if not os.path.isfile(src):
            raise UserInputError(f"ONNX source '{src}' does not exist")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    try:
        manifest = _write_bundle_tree(
            tmp, engines, onnx_sources, preprocess, class_names, model, metrics, selection, multires
        )
        share_tree(tmp)  # readable by the serving user (0755/0644 with umask 022), not mkdtemp's 0700
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tar:
        write_bundle_tar(out_dir)
    log.info("bundle written to %s (%d files)", out_dir, len(manifest.files) + 1)
    return manifest


def _replace_dir(tmp: str, out_dir: str) -> None:
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".old", dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write_bundle_tree(
    root, engines, onnx_sources, preprocess, class_names, model, metrics, selection, multires=None
) -> BundleManifest:
    used: set[str] = set()
    by_real: dict[str, tuple[str, list[str], dict]] = {}
    by_sha: dict[str, tuple[str, list[str], dict]] = {}
    sources: list[str] = []

    def add_source(path: str) -> tuple[str, list[str], dict]:
        real = os.path.realpath(path)
        if real not in by_real:
            rel, ext, facts = copy_onnx(path, root, ONNX_DIR, used)
            by_real[real] = (rel, ext, facts)
            by_sha[sha256_file(path)] = (rel, ext, facts)
            sources.append(rel)
        return by_real[real]

    for art in engines:
        if art.source_onnx:
            add_source(art.source_onnx)
    for src in onnx_sources:
        add_source(src)

    num_classes = len(class_names)
    bundle_engines = []
    engine_used: set[str] = set()
    for art in engines:
        is_onnx = art.path.endswith(ONNX_SUFFIXES)
        sha = sha256_file(art.path)
        opset, externals = None, []
        if is_onnx and sha in by_sha:  # an ONNX Runtime engine that is its source: stored once
            rel, externals, facts = by_sha[sha]
        elif is_onnx:
            rel, externals, facts = copy_onnx(art.path, root, ENGINE_DIR, engine_used)
        else:
            name = unique_name(os.path.basename(art.path), engine_used)
            os.makedirs(os.path.join(root, ENGINE_DIR), exist_ok=True)
            shutil.copyfile(art.path, os.path.join(root, ENGINE_DIR, name))
            rel, facts = f"{ENGINE_DIR}/{name}", None
        if facts is not None:
            check_onnx_io(art.path, facts, art, num_classes)
            opset = facts["opset"]
        if art.backend == "tensorrt":
            requires = tensorrt_requirements(art.meta)
            missing = [k for k in ("tensorrt_version", "gpu_name", "compute_capability") if not requires[k]]
            if missing:
                raise UserInputError(
                    f"TensorRT engine '{art.path}' records no {missing} in its meta: a plan runs only on the GPU "
                    "and TensorRT version it was built with, so the bundle must say which; rebuild it with fixres-deploy build"
                )
        elif art.backend == "onnxruntime":
            requires = {"onnxruntime_version": (art.meta or {}).get("onnxruntime_version")}
        else:
            requires = {}
        src_rel = by_real[os.path.realpath(art.source_onnx)][0] if art.source_onnx else None
        bundle_engines.append(
            BundleEngine(
                file=rel,
                backend=art.backend,
                precision=art.precision,
                shapes=art.shapes,
                input_name=art.input_name,
                output_name=art.output_name,
                source_onnx=src_rel,
                external_data=externals,
                opset=opset,
                requires=requires,
                build_s=float(art.build_s or 0.0),
                meta=portable(art.meta or {}),
            )
        )

    with open(os.path.join(root, LABELS_NAME), "w", encoding="utf-8") as f:
        f.write("\n".join(class_names) + "\n")

    primary = bundle_engines[0]
    modules = list(env.RUNTIME_MODULES)
    if any(e.backend == "tensorrt" for e in bundle_engines):
        modules += list(env.TENSORRT_MODULES)
    libraries = env.library_versions(*modules)  # of the machine that bundled (the plan's own: in requires)
    hardware = None
    if primary.backend == "tensorrt":
        hardware = {
            k: primary.requires[k]
            for k in ("gpu_name", "compute_capability", "tensorrt_version", "hardware_compatibility")
        }
    manifest = BundleManifest(
        format=BUNDLE_FORMAT,
        schema_version=MANIFEST_SCHEMA_VERSION,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=portable(model or {}),
        resolution=preprocess.test_input_size,
        precision=primary.precision,
        backend=primary.backend,
        shape_mode=primary.shapes.mode,
        profiles=[p.to_dict() for p in primary.shapes.profiles],
        input_name=primary.input_name,
        output_name=primary.output_name,
        num_classes=num_classes,
        preprocess=preprocess.to_dict(),
        class_names=list(class_names),
        engines=bundle_engines,
        onnx_sources=sources,
        metrics=portable(metrics or {}),
        selection=portable(selection) if selection is not None else None,
        libraries=libraries,
        hardware=hardware,
        files=_file_table(root),
        multires=multires,
    )
    manifest.digest = manifest.compute_digest()
    write_json(os.path.join(root, MANIFEST_NAME), manifest.to_dict())
    return manifest


# --------------------------------------------------------------------------- from an engine artifact


def _onnx_fixres_metadata(path: str | None) -> dict[str, Any]:
    """The ``fixres_deploy.*`` ONNX metadata of ``path`` (JSON values decoded)."""
    from fixres_deploy.export.onnx_export import read_onnx_metadata

    meta: dict[str, Any] = {}
    if path and os.path.isfile(path):
        for key, value in read_onnx_metadata(path).items():
            if key.startswith("fixres_deploy."):
                try:
                    meta[key] = json.loads(value)
                except json.JSONDecodeError:
                    meta[key] = value
    return meta


def model_record(onnx_meta: dict, checkpoint: str | None) -> tuple[dict, dict]:
    """(the manifest's ``model`` record, the checkpoint's metadata) for an engine's source.

    The spec comes from the checkpoint (or the ONNX metadata); the fine-tuned resolution and
    top-1 from the checkpoint's ``fixres`` record (:func:`fixres_deploy.models.registry.fixres_record`).
    """
    from fixres_deploy.export.onnx_export import META_CLASS_NAMES, META_PREPROCESS

    ck_meta: dict = {}
    model: dict = {
        "spec": onnx_meta.get("fixres_deploy.model"),
        "num_classes": None,
        "checkpoint": None,
        "checkpoint_sha256": None,
        "finetuned_resolution": None,
        "finetune_top1_after": None,
        "onnx_metadata": {k: v for k, v in onnx_meta.items() if k not in (META_PREPROCESS, META_CLASS_NAMES)},
    }
    if checkpoint:
        from fixres_deploy.models.registry import read_checkpoint  # torch: only when a checkpoint is given

        _, ck_meta = read_checkpoint(checkpoint)
        fixres = ck_meta.get("fixres") or {}
        model.update(
            {
                "spec": ck_meta.get("model") or model["spec"],
                "num_classes": ck_meta.get("num_classes"),
                "checkpoint": os.path.basename(checkpoint),
                "checkpoint_sha256": sha256_file(checkpoint),
                "finetuned_resolution": fixres.get("resolution"),
                "finetune_top1_after": fixres.get("top1_after"),
            }
        )
    return model, ck_meta


def bundle_artifact(
    art: EngineArtifact,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    labels: list[str] | None = None,
    metrics: dict | None = None,
    selection: dict | None = None,
    onnx_sources: list[str] | None = None,
    tar: bool = False,
    overwrite: bool = False,
    triton_repo: str | None = None,
    triton_options: dict | None = None,
    multires: Any = None,
) -> dict:
    """Bundle one built engine: the one path from an engine artifact to a bundle.

    Preprocessing and labels come from the ONNX metadata (``fixres_deploy.core.preprocess``,
    ``fixres_deploy.class_names``) of the artifact's source, falling back to the checkpoint's;
    ``labels`` overrides both.

    Args:
        art: a successful build (absolute paths).
        checkpoint: the checkpoint the engine's ONNX was exported from (model record).
        metrics: the measurements to record (a sweep point, or any dict).
        selection: how the engine was chosen.
        onnx_sources: further ONNX files to carry (e.g. the fp32 reference).
        triton_repo: also export a Triton model repository there (options: ``triton_options``).
        multires: the manifest's ``multires`` section (a head-bank engine), see :func:`make_bundle`.

    Returns:
        ``{"dir": bundle folder, "manifest": manifest.json path, "tar": path|None, "triton": model dir|None}``.
    """
    from fixres_deploy.export.onnx_export import META_CLASS_NAMES, META_PREPROCESS

    if art.error:
        raise UserInputError(f"cannot bundle a failed build ({art.backend} {art.precision}): {art.error}")
    onnx_for_meta = art.source_onnx or (art.path if art.path and art.path.endswith(ONNX_SUFFIXES) else None)
    onnx_meta = _onnx_fixres_metadata(onnx_for_meta)
    model, ck_meta = model_record(onnx_meta, checkpoint)
    pre = onnx_meta.get(META_PREPROCESS) or ck_meta.get("preprocess")
    if not pre:
        raise UserInputError(
            f"no preprocessing recorded in '{onnx_for_meta}' (ONNX metadata fixres_deploy.core.preprocess)"
            " nor in a --checkpoint: export the ONNX with fixres-deploy export"
        )
    cfg = PreprocessConfig.from_dict(pre if isinstance(pre, dict) else json.loads(pre))
    if art.shapes is not None and batch_range(art.shapes, cfg.test_input_size) is None and art.resolutions:
        cfg = cfg.at_resolution(art.resolutions[0])  # a checkpoint's preprocessing at the engine's resolution
    names = labels or onnx_meta.get(META_CLASS_NAMES) or ck_meta.get("class_names")
    if not names:
        raise UserInputError(f"no class names in '{onnx_for_meta}' metadata nor the checkpoint: pass --labels FILE")
    out_dir = os.path.abspath(os.fspath(out_dir))
    make_bundle(
        out_dir,
        engines=[art],
        onnx_sources=list(onnx_sources or []),
        preprocess=cfg,
        class_names=list(names),
        model=model,
        metrics=metrics or {},
        selection=selection,
        tar=tar,
        overwrite=overwrite,
        multires=multires,
    )
    triton_dir = None
    if triton_repo:
        from fixres_deploy.ship.triton import export_triton_repository

        triton_dir = export_triton_repository(out_dir, triton_repo, **(triton_options or {}))
    return {
        "dir": out_dir,
        "manifest": os.path.join(out_dir, MANIFEST_NAME),
        "tar": bundle_tar_path(out_dir) if tar else None,
        "triton": triton_dir,
    }


def bundle_from_index(
    index_path: str | os.PathLike,
    artifact: str | int,
    out_dir: str | os.PathLike,
    **kwargs: Any,
) -> dict:
    """`fixres-deploy bundle --index`: :func:`bundle_artifact` of one entry of a build's index.json.

    Args:
        index_path: the index (or its build folder), read by :class:`fixres_deploy.engines.build.BuildIndex`.
        artifact: the entry's position in the index or its ``name``.
        kwargs: passed to :func:`bundle_artifact`.
    """
    from fixres_deploy.engines.build import BuildIndex

    index = BuildIndex.load(index_path)
    art = index.artifact(artifact)
    return bundle_artifact(art, out_dir, **kwargs)
