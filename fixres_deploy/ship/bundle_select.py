"""Ship the selected sweep point: its engine, ONNX source and exact preprocessing, as a bundle."""

from __future__ import annotations

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

    The bundle is made by :func:`fixres_deploy.ship.bundle.bundle_artifact`, exactly as
    ``fixres-deploy bundle --index`` makes one; the point's measurements become its metrics.

    Returns:
        :func:`bundle_artifact`'s dict plus the point's ``label``.
    """
    from fixres_deploy.ship.bundle import bundle_artifact

    i = report["selected"] if index is None else index
    if not 0 <= i < len(sweep.points):
        raise UserInputError(f"point index {i} is out of range (0..{len(sweep.points) - 1})")
    p = sweep.points[i]
    if not p.ok or not p.engine:
        raise UserInputError(f"point {i} ({p.label}) has no engine to bundle: {p.error}")
    out = bundle_artifact(
        EngineArtifact.from_dict(p.engine),
        out_dir,
        checkpoint=p.checkpoint,
        labels=list(sweep.class_names),
        metrics={k: v for k, v in p.to_dict().items() if k not in ("correct1_bits", "engine")},
        selection={"index": i, "reason": report.get("reason"), "label": p.label},
        tar=tar,
        overwrite=overwrite,
        triton_repo=triton_dir,
        triton_options={"overwrite": overwrite},
    )
    return {**out, "label": p.label}
