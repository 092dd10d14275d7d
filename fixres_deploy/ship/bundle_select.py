"""Ship the selected sweep point: its engine, ONNX source and exact preprocessing, as a bundle."""

from __future__ import annotations

import os

from fixres_deploy.backends.base import EngineArtifact
from fixres_deploy.core.errors import UserInputError


def bundle_selected(
    sweep,
    report: dict,
    out_dir: str,
    *,
    index: int | None = None,
    tar: bool = False,
    triton_dir: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Bundle point ``index`` (default: the report's selection) of a sweep.

    Returns a dict with the bundle folder, its manifest path and, when asked, the tarball
    and the Triton repository.
    """
    from fixres_deploy.core.utils import sha256_file
    from fixres_deploy.export.onnx_export import read_onnx_preprocess
    from fixres_deploy.ship.bundle import make_bundle

    i = report["selected"] if index is None else index
    if not 0 <= i < len(sweep.points):
        raise UserInputError(f"point index {i} is out of range (0..{len(sweep.points) - 1})")
    p = sweep.points[i]
    if not p.ok or not p.engine:
        raise UserInputError(f"point {i} ({p.label}) has no engine to bundle: {p.error}")
    art = EngineArtifact.from_dict(p.engine)
    cfg = read_onnx_preprocess(p.onnx_path)
    if cfg is None:
        raise UserInputError(f"'{p.onnx_path}' records no preprocessing; re-export it with fixres-deploy")
    sources = [p.onnx_path] if p.onnx_path and p.onnx_path != art.path else []
    model = {
        "spec": sweep.config.get("model"),
        "base_checkpoint": sweep.config.get("checkpoint"),
        "checkpoint": p.checkpoint,
        "checkpoint_sha256": sha256_file(p.checkpoint) if p.checkpoint else None,
        "finetuned": p.finetuned,
        "finetuned_resolution": p.resolution if p.finetuned else None,
        "train_res": sweep.train_res,
    }
    metrics = {k: v for k, v in p.to_dict().items() if k not in ("correct1_bits", "engine")}
    manifest = make_bundle(
        out_dir,
        engines=[art],
        onnx_sources=sources,
        preprocess=cfg,
        class_names=sweep.class_names,
        model=model,
        metrics=metrics,
        selection={"index": i, "reason": report.get("reason"), "label": p.label},
        tar=tar,
        overwrite=overwrite,
    )
    out = {"dir": out_dir, "manifest": os.path.join(out_dir, "manifest.json"), "label": p.label}
    if tar:
        out["tar"] = out_dir.rstrip("/") + ".tar.gz"
    if triton_dir:
        from fixres_deploy.ship.triton import export_triton_repository

        out["triton"] = export_triton_repository(out_dir, triton_dir, overwrite=overwrite)
    out["manifest_format"] = getattr(manifest, "format", None)
    return out
