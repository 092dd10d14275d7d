"""The bundle manifest (``manifest.json``): its schema, its one reader and the facts it records.

A bundle holds the engine file(s), the ONNX source(s) they were built from, ``labels.txt``
and ``manifest.json``. The manifest records the EXACT preprocessing (FixRes lives or dies by
it: the same network is several points worse with another resize or crop), the shapes the
engine accepts, the measured metrics, the library versions, for TensorRT the GPU the plan
was built for, and the sha256 and size of every file.

Layout::

    BUNDLE/manifest.json    format + schema_version, everything above, a digest of itself
    BUNDLE/labels.txt       one class name per line, index order
    BUNDLE/engine/*         engine files that differ from their ONNX source (.plan, optimized .onnx)
    BUNDLE/onnx/*           the ONNX source(s) (an ONNX Runtime engine that IS its source lives here)

Writer: :func:`fixres_deploy.ship.bundle.make_bundle`; reader: :func:`read_manifest` /
:func:`load_manifest`. Standard library only (the torch-free runtime depends on it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from fixres_deploy.backends.base import EngineArtifact, ShapeSpec
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig
from fixres_deploy.core.utils import read_json, stable_hash

BUNDLE_FORMAT = "fixres-deploy/bundle"
#: 2: ``schema_version`` (was ``version``), ``libraries`` by distribution, TensorRT facts as the backend writes them
#: 3: optional ``multires`` section (:class:`MultiresInfo`: a head-bank engine's resolutions, accuracy, latency table)
MANIFEST_SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.txt"
ENGINE_DIR = "engine"
ONNX_DIR = "onnx"
TAR_SUFFIX = ".tar.gz"
ONNX_SUFFIXES = (".onnx",)


class BundleError(UserInputError):
    """A bundle is malformed, was modified after bundling, or cannot run on this machine."""


@dataclass
class BundleEngine:
    """One engine inside a bundle (paths relative to the bundle root).

    Attributes:
        file: the engine file (``onnx/x.onnx`` when an ONNX Runtime engine is its source).
        backend, precision: as in :class:`EngineArtifact`.
        shapes: the input shapes it accepts.
        input_name, output_name: tensor names.
        source_onnx: the bundled ONNX it was built from (None if the bundle lacks it).
        external_data: bundled side files an ONNX engine needs (``.onnx.data``).
        opset: ``{domain: version}`` of an ONNX engine ("" is the default domain).
        requires: what it needs to run: ``tensorrt_version``, ``gpu_name``,
            ``compute_capability``, ``hardware_compatibility`` for TensorRT;
            ``onnxruntime_version`` it was built/measured with for ONNX Runtime.
        build_s: build seconds (for the record).
        meta: the artifact's backend details, as built.
    """

    file: str
    backend: str
    precision: str
    shapes: ShapeSpec
    input_name: str = "input"
    output_name: str = "logits"
    source_onnx: str | None = None
    external_data: list[str] = field(default_factory=list)
    opset: dict[str, int] | None = None
    requires: dict = field(default_factory=dict)
    build_s: float = 0.0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shapes"] = self.shapes.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BundleEngine:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BundleError(f"unknown engine keys {unknown} in the manifest (written by a newer fixres-deploy?)")
        d = dict(d)
        d["shapes"] = ShapeSpec.from_dict(d["shapes"])
        return cls(**d)

    def to_artifact(self, root: str) -> EngineArtifact:
        """The :class:`EngineArtifact` a backend's ``runner_from_artifact`` needs (absolute paths)."""
        return EngineArtifact(
            backend=self.backend,
            precision=self.precision,
            path=os.path.join(root, self.file),
            source_onnx=os.path.join(root, self.source_onnx) if self.source_onnx else None,
            shapes=self.shapes,
            input_name=self.input_name,
            output_name=self.output_name,
            build_s=self.build_s,
            meta=dict(self.meta),
        )


@dataclass
class MultiresInfo:
    """The ``multires`` section of a bundle whose engine serves several FixRes resolutions.

    Written by :func:`fixres_deploy.export.multires.build_multires_bundle`, read by
    ``fixres-deploy serve`` (:mod:`fixres_deploy.ship.serve`).

    Attributes:
        resolutions: R1 < ... < Rn; the graph picks the head of the resolution nearest to the
            input height, so a client resizes to one of these.
        accuracy: one ``{"resolution", "top1", "n", "source"}`` per resolution (``source``:
            what the top-1 was measured on).
        latency: the service-time table measured on the machine that built the bundle:
            ``batch_sizes``, ``service_ms`` (one row per resolution, one value per batch size:
            preprocessing of the decoded images at that resolution + inference, median),
            ``preprocess_ms_per_image`` (per resolution), ``machine`` and ``machine_key``
            (:func:`fixres_deploy.core.env.machine_id` and its hash), ``threads``, ``workers``.
        checkpoints: ``{"resolution", "file", "sha256"}`` of each FixRes checkpoint.
        head_selection: how the graph chooses the head (for readers of the file).
    """

    resolutions: list[int]
    accuracy: list[dict]
    latency: dict
    checkpoints: list[dict] = field(default_factory=list)
    head_selection: str = "nearest resolution to the input height"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MultiresInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or {"resolutions", "accuracy", "latency"} - set(d):
            raise BundleError("the manifest's multires section needs resolutions, accuracy and latency")
        unknown = sorted(set(d) - names)
        if unknown:
            raise BundleError(f"unknown multires keys {unknown} in the manifest (written by a newer fixres-deploy?)")
        info = cls(**d)
        rows = info.latency.get("service_ms") or []
        if len(rows) != len(info.resolutions) or any(
            len(r) != len(info.latency.get("batch_sizes") or []) for r in rows
        ):
            raise BundleError("the multires latency table does not have one row per resolution and batch size")
        return info


@dataclass
class BundleManifest:
    """Everything ``manifest.json`` records; the primary engine is ``engines[0]``.

    ``resolution``, ``precision``, ``backend``, ``shape_mode``, ``profiles``, ``input_name``
    and ``output_name`` repeat the primary engine's facts at the top level so a reader in
    another language (or a person) finds them without walking the engine list.
    ``digest`` is the sha256 of the manifest's canonical JSON without itself: an edit of the
    manifest after bundling is detected like an edit of any other file.
    """

    format: str
    schema_version: int
    created: str
    model: dict
    resolution: int
    precision: str
    backend: str
    shape_mode: str
    profiles: list[dict]
    input_name: str
    output_name: str
    num_classes: int
    preprocess: dict
    class_names: list[str]
    engines: list[BundleEngine]
    onnx_sources: list[str]
    metrics: dict
    selection: dict | None
    libraries: dict
    hardware: dict | None
    files: dict[str, dict]
    labels_file: str = LABELS_NAME
    multires: MultiresInfo | None = None
    digest: str | None = None

    @property
    def primary(self) -> BundleEngine:
        return self.engines[0]

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["engines"] = [e.to_dict() for e in self.engines]
        d["multires"] = self.multires.to_dict() if self.multires is not None else None
        # A JSON round trip makes tuples lists, so the digest is the same before and after saving.
        return json_safe(d)

    @classmethod
    def from_dict(cls, d: dict) -> BundleManifest:
        if not isinstance(d, dict):
            raise BundleError(f"a bundle manifest must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names - set(d) if n not in ("labels_file", "digest", "multires"))
        if missing:
            raise BundleError(f"bundle manifest lacks {missing}")
        unknown = sorted(set(d) - names)
        if unknown:
            raise BundleError(f"unknown bundle manifest keys {unknown} (written by a newer fixres-deploy?)")
        d = dict(d)
        d["engines"] = [BundleEngine.from_dict(e) for e in d["engines"]]
        if d.get("multires") is not None:
            d["multires"] = MultiresInfo.from_dict(d["multires"])
        if not d["engines"]:
            raise BundleError("bundle manifest lists no engine")
        return cls(**d)

    def compute_digest(self) -> str:
        d = self.to_dict()
        d.pop("digest", None)
        return stable_hash(d)

    def engine_for(self, backend: str | None = None) -> BundleEngine:
        """The engine to run: the primary one, or the first for ``backend``.

        A bundle whose engines cannot run here (a TensorRT plan on a CPU machine) still
        carries its ONNX source, so ``backend="onnxruntime"`` runs that source with the
        primary engine's shape contract (the plan was built from it, so it accepts at least
        those shapes).
        """
        if backend is None:
            return self.primary
        for e in self.engines:
            if e.backend == backend:
                return e
        if backend == "onnxruntime" and self.primary.source_onnx:
            p = self.primary
            return BundleEngine(
                file=p.source_onnx,
                backend="onnxruntime",
                precision=p.precision,
                shapes=p.shapes,
                input_name=p.input_name,
                output_name=p.output_name,
                source_onnx=p.source_onnx,
                external_data=list(self.files_beside(p.source_onnx)),
                opset=None,
                requires={},
                meta={"fallback_for": p.file},
            )
        have = sorted({e.backend for e in self.engines})
        raise BundleError(
            f"this bundle has no {backend!r} engine (it has {have}"
            f"{'' if not self.primary.source_onnx else ' and an ONNX source runnable with onnxruntime'})"
        )

    def files_beside(self, onnx_rel: str) -> list[str]:
        """External-data files recorded for the ONNX file ``onnx_rel`` (by any engine entry)."""
        for e in self.engines:
            if e.file == onnx_rel:
                return list(e.external_data)
        return [f for f in self.files if f.startswith(onnx_rel + ".") and not f.endswith(ONNX_SUFFIXES)]


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON types (tuples become lists, numpy scalars numbers): digests stay stable."""
    return json.loads(json.dumps(obj, default=_json_default))


def portable(obj: Any) -> Any:
    """:func:`json_safe` with absolute paths replaced by their file names.

    A manifest travels: the build machine's paths (``/home/me/runs/a/store/...``) are wrong
    where the bundle runs and point into the original folder of a copied run. Shipped files
    are named relative to the bundle (``engine/...``); provenance keeps the file name.
    """

    def strip(v: Any) -> Any:
        if isinstance(v, str) and len(v) < 4096 and "\n" not in v and os.path.isabs(v):
            return os.path.basename(v.rstrip("/\\")) or v
        if isinstance(v, list):
            return [strip(x) for x in v]
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items()}
        return v

    return strip(json_safe(obj))


def _json_default(obj: Any):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, tuple):
        return list(obj)
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover - numpy is a core dependency
        pass
    return str(obj)


def read_manifest(path: str | os.PathLike) -> BundleManifest:
    """The one reader of ``manifest.json`` (no integrity checks: see :func:`fixres_deploy.ship.verify.verify_bundle`)."""
    from fixres_deploy.core.schema import SchemaVersionError, check_schema

    d = read_json(path)
    try:
        check_schema(
            d,
            BUNDLE_FORMAT,
            MANIFEST_SCHEMA_VERSION,
            path,
            "Rebundle the engine with this fixres-deploy (fixres-deploy bundle), or run it with the version that made it.",
        )
    except SchemaVersionError as exc:
        raise BundleError(str(exc)) from None
    return BundleManifest.from_dict(d)


def load_manifest(bundle_dir: str | os.PathLike) -> BundleManifest:
    """Read ``bundle_dir/manifest.json`` (no integrity checks: see :func:`fixres_deploy.ship.verify.verify_bundle`)."""
    path = os.path.join(os.fspath(bundle_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        raise BundleError(f"'{bundle_dir}' is not a fixres-deploy bundle: no {MANIFEST_NAME} in it")
    return read_manifest(path)


def batch_range(shapes: ShapeSpec, resolution: int, channels: int = 3) -> tuple[int, int] | None:
    """(min, max) batch of the profile that accepts ``channels×resolution×resolution`` with the
    largest max batch; None when no profile accepts that resolution."""
    best = None
    for p in shapes.profiles:
        fits = all(lo <= v <= hi for lo, v, hi in zip(p.min[1:], (channels, resolution, resolution), p.max[1:]))
        if fits and (best is None or p.max[0] > best[1]):
            best = (p.min[0], p.max[0])
    return best
