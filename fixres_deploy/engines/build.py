"""`fixres-deploy build`: engines for every backend × precision × shape, recorded in one index.

Every engine is made by the shared routine :mod:`fixres_deploy.engines.engine` (the one the
sweep, ``bench`` and ``run`` use): each precision variant (fp16 graph, int8 Q/DQ graph) is made
ONCE per (precision, flavor, calibration resolution) and shared by every engine that needs it.
A dynamic engine has one Q/DQ graph for all its shapes: it is calibrated at a profile's opt
resolution, and the index says which.

A failed build (including a missing library for one backend) is recorded with its message
and exception type; the other builds go on. ``index.json`` lists every artifact (flat
``EngineArtifact`` fields plus ``name``, ``shape_mode``, ``resolution``/``profiles``, ``quant``),
and the Q/DQ / fp16 ONNX variants with their sha256.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from fixres_deploy.backends.base import (
    BACKENDS,
    PRECISIONS,
    BuildOptions,
    EngineArtifact,
    ShapeSpec,
    check_onnx_accepts,
    error_artifact,
    onnx_io,
)
from fixres_deploy.core.errors import MissingDependencyError, UserInputError
from fixres_deploy.core.schema import check_schema, stamp
from fixres_deploy.core.utils import progress, read_json, sha256_file, write_json
from fixres_deploy.engines.engine import EngineMaker, engine_name, with_timing_cache

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "fixres-deploy/build-index"
#: 2: ``schema_version`` (was ``version``); the one reader is :meth:`BuildIndex.load`
INDEX_SCHEMA_VERSION = 2


@dataclass
class BuildIndex:
    """Everything one ``build_engines`` call produced, as written to ``out_dir/index.json``.

    Attributes:
        source_onnx, source_sha256: the exported model the variants and engines come from.
        out_dir: the build folder (paths inside it are stored relative to it).
        artifacts: one flat dict per requested engine: ``EngineArtifact`` fields plus
            ``name``, ``shape_mode``, ``resolution`` and ``batch`` (fixed) or ``profiles``
            (dynamic), ``quant`` (precision variant used: path, sha256, flavor, calibration)
            and ``error_type`` when ``error`` is set.
        variants: the ONNX precision variants made (fp16, int8 Q/DQ) with path and sha256.
        request: the arguments of the call.
        preprocess: the preprocessing read from the ONNX metadata (None if absent).
        created: UTC ISO time; build_s: wall seconds of the whole call.
    """

    source_onnx: str
    source_sha256: str
    out_dir: str
    artifacts: list[dict] = field(default_factory=list)
    variants: list[dict] = field(default_factory=list)
    request: dict = field(default_factory=dict)
    preprocess: dict | None = None
    created: str = ""
    build_s: float = 0.0

    @property
    def ok(self) -> list[dict]:
        return [a for a in self.artifacts if not a.get("error")]

    @property
    def failed(self) -> list[dict]:
        return [a for a in self.artifacts if a.get("error")]

    def engine_artifacts(self, *, include_failed: bool = False) -> list[EngineArtifact]:
        """The entries as EngineArtifacts with absolute paths (ready for ``load_runner``)."""
        out = []
        for entry in self.artifacts:
            if entry.get("error") and not include_failed:
                continue
            out.append(entry_artifact(entry, self.out_dir))
        return out

    def find(
        self,
        *,
        backend: str | None = None,
        precision: str | None = None,
        resolution: int | None = None,
        shape_mode: str | None = None,
    ) -> list[dict]:
        """Entries matching every given field (a dynamic entry matches a resolution it serves)."""
        out = []
        for e in self.artifacts:
            if backend and e.get("backend") != backend:
                continue
            if precision and e.get("precision") != precision:
                continue
            if shape_mode and e.get("shape_mode") != shape_mode:
                continue
            if resolution is not None:
                if e.get("shape_mode") == "fixed" and e.get("resolution") != resolution:
                    continue
                if e.get("shape_mode") == "dynamic" and not any(
                    p["min"][2] <= resolution <= p["max"][2] for p in e.get("profiles") or []
                ):
                    continue
            out.append(e)
        return out

    def artifact(self, key: str | int) -> EngineArtifact:
        """The successful engine at position ``key`` or with name ``key`` (absolute paths).

        Raises:
            UserInputError: no such entry (the message lists the names), or a failed build.
        """
        text = str(key)
        if text.lstrip("-").isdigit():
            i = int(text)
            if not -len(self.artifacts) <= i < len(self.artifacts):
                raise UserInputError(
                    f"artifact {i} is out of range: '{self.out_dir}/{INDEX_NAME}' lists {len(self.artifacts)} artifacts"
                )
            entry = self.artifacts[i]
        else:
            found = [e for e in self.artifacts if e.get("name") == text]
            if not found:
                names = [e.get("name") for e in self.artifacts]
                raise UserInputError(
                    f"no artifact {text!r} in '{self.out_dir}/{INDEX_NAME}'; give a position "
                    f"0..{len(self.artifacts) - 1} or one of {names}"
                )
            entry = found[0]
        if entry.get("error"):
            raise UserInputError(
                f"artifact {key!r} of '{self.out_dir}/{INDEX_NAME}' is a failed build "
                f"({entry.get('backend')} {entry.get('precision')}): {entry['error']}"
            )
        return entry_artifact(entry, self.out_dir)

    def to_dict(self) -> dict:
        return stamp(asdict(self), INDEX_FORMAT, INDEX_SCHEMA_VERSION)

    @classmethod
    def from_dict(cls, d: dict, source: str = INDEX_NAME) -> BuildIndex:
        check_schema(
            d,
            INDEX_FORMAT,
            INDEX_SCHEMA_VERSION,
            source,
            "Rebuild the engines with this fixres-deploy (fixres-deploy build).",
        )
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def load(cls, path: str | os.PathLike) -> BuildIndex:
        """The one reader of ``index.json`` (or a build folder); ``out_dir`` becomes the index's folder."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, INDEX_NAME)
        index = cls.from_dict(read_json(path), path)
        index.out_dir = os.path.dirname(os.path.abspath(path))
        return index

    def save(self, path: str | os.PathLike | None = None) -> str:
        return write_json(path or os.path.join(self.out_dir, INDEX_NAME), self.to_dict())


def _rel(path: str | None, out_dir: str) -> str | None:
    """Paths inside the build folder are stored relative to it (the folder can be moved)."""
    if not path:
        return path
    ap, base = os.path.abspath(path), os.path.abspath(out_dir)
    return os.path.relpath(ap, base) if os.path.commonpath([ap, base]) == base else ap


def _abs(path: str | None, out_dir: str) -> str | None:
    if not path or os.path.isabs(path):
        return path
    return os.path.join(os.path.abspath(out_dir), path)


def entry_artifact(entry: dict, out_dir: str) -> EngineArtifact:
    """An index entry back as an EngineArtifact with absolute paths."""
    names = set(EngineArtifact.__dataclass_fields__)
    art = EngineArtifact.from_dict({k: v for k, v in entry.items() if k in names})
    art.path = _abs(art.path, out_dir)
    art.source_onnx = _abs(art.source_onnx, out_dir)
    return art


@dataclass
class _Plan:
    backend: str
    precision: str
    shapes: ShapeSpec
    name: str
    calibration_resolution: int | None
    resolution: int | None = None
    batch: int | None = None


def _calibration_resolution(shapes: ShapeSpec) -> int:
    """One Q/DQ graph serves every profile of a dynamic engine: calibrate at the middle profile's opt."""
    opts = sorted(p.opt[2] for p in shapes.profiles)
    return opts[len(opts) // 2]


def _validate_request(onnx_path, backends, precisions, resolutions, batch_sizes, max_batch, bands) -> None:
    if not os.path.isfile(onnx_path):
        raise UserInputError(f"ONNX file '{onnx_path}' does not exist")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UserInputError(f"unknown backend(s) {unknown or backends}; choose from {sorted(BACKENDS)}")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise UserInputError(f"unknown precision(s) {bad or precisions}; choose from {list(PRECISIONS)}")
    if not resolutions or min(resolutions) < 8:
        raise UserInputError(f"resolutions must be integers >= 8, got {list(resolutions)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserInputError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if max_batch < 1:
        raise UserInputError(f"max batch must be >= 1, got {max_batch}")
    if bands < 1:
        raise UserInputError(f"bands must be >= 1, got {bands}")


def build_engines(
    onnx_path: str | os.PathLike,
    *,
    backends: Sequence[str],
    precisions: Sequence[str],
    resolutions: Sequence[int],
    dynamic: bool = False,
    bands: int = 1,
    batch_sizes: Sequence[int] = (1,),
    max_batch: int = 8,
    calibration_data: Any = None,
    calibration_method: str = "minmax",
    calibration_limit: int | None = None,
    int8_flavor: str | None = None,
    float_layers: Any = "default",
    calibration_cache: Any = None,
    options: BuildOptions | None = None,
    out_dir: str | os.PathLike,
) -> BuildIndex:
    """Build every requested engine; failures are recorded, not raised.

    Args:
        onnx_path: the exported fp32 ONNX (dynamic axes for ``dynamic`` or several resolutions;
            its metadata carries the preprocessing used for calibration).
        backends: e.g. ``["onnxruntime", "tensorrt"]``.
        precisions: subset of ``fp32``, ``fp16``, ``int8``.
        resolutions: test resolutions; fixed mode builds one engine per resolution × batch.
        dynamic: one engine per backend × precision with profiles over ``resolutions``.
        bands: number of dynamic profiles (contiguous resolution groups).
        batch_sizes: fixed: one engine per batch size; dynamic: the first is the profiles' opt batch.
        max_batch: the dynamic profiles' max batch.
        calibration_data: image folder or calibration manifest (required for int8).
        calibration_method, float_layers: passed to ``make_precision_variant``.
        calibration_limit: at most this many calibration images.
        calibration_cache: calibration-range cache folder for ``make_precision_variant``
            (None: its default, ``$FIXRES_CACHE_DIR`` or ``calibration/cache``; False: none).
        int8_flavor: Q/DQ flavor for every backend (default: the backend's own).
        options: BuildOptions for the backends (TensorRT timing cache defaults to
            ``out_dir/tensorrt.timing.cache``, shared by all builds).
        out_dir: build folder; ``index.json`` is written there.

    Returns:
        The BuildIndex (also saved to ``out_dir/index.json``).

    Raises:
        UserInputError: a request that cannot be built at all (missing ONNX, unknown
            backend/precision, shapes a fixed-shape export cannot serve, int8 without
            calibration data or preprocessing metadata).
    """
    t_start = time.perf_counter()
    onnx_path = os.fspath(onnx_path)
    out_dir = os.fspath(out_dir)
    backends = list(dict.fromkeys(backends))
    precisions = list(dict.fromkeys(precisions))
    resolutions = sorted({int(r) for r in resolutions})
    batch_sizes = [int(b) for b in batch_sizes]
    _validate_request(onnx_path, backends, precisions, resolutions, batch_sizes, max_batch, bands)
    options = options or BuildOptions()
    if "tensorrt" in backends:
        options = with_timing_cache(options, out_dir)

    from fixres_deploy.export.onnx_export import read_onnx_preprocess

    cfg = read_onnx_preprocess(onnx_path)
    if "int8" in precisions:
        if calibration_data is None:
            raise UserInputError(
                "int8 needs calibration images: pass --calibration-data DIR "
                "(an image folder like the deployment images, or a calibration manifest)"
            )
        if cfg is None:
            raise UserInputError(
                f"'{onnx_path}' records no preprocessing (ONNX metadata fixres_deploy.core.preprocess), so calibration "
                "images cannot be prepared like deployment images: export it with fixres-deploy export"
            )

    plans: list[_Plan] = []
    for backend in backends:
        for precision in precisions:
            if dynamic:
                opt_batch = min(batch_sizes[0], max_batch)
                shapes = ShapeSpec.resolution_bands(resolutions, max_batch=max_batch, opt_batch=opt_batch, bands=bands)
                plans.append(
                    _Plan(
                        backend,
                        precision,
                        shapes,
                        engine_name(backend, precision, shapes),
                        _calibration_resolution(shapes),
                    )
                )
            else:
                for r in resolutions:
                    for b in batch_sizes:
                        shapes = ShapeSpec.fixed(b, r)
                        plans.append(
                            _Plan(
                                backend,
                                precision,
                                shapes,
                                engine_name(backend, precision, shapes),
                                r,
                                resolution=r,
                                batch=b,
                            )
                        )

    # A fixed-shape export cannot serve other shapes: refuse the whole request up front.
    io = onnx_io(onnx_path)
    for plan in plans:
        check_onnx_accepts(onnx_path, plan.shapes, io)
    os.makedirs(out_dir, exist_ok=True)

    maker = EngineMaker(
        onnx_path,
        out_dir,
        preprocess=cfg,
        calibration_data=calibration_data,
        calibration_method=calibration_method,
        calibration_limit=calibration_limit,
        calibration_cache=calibration_cache,
        int8_flavor=int8_flavor,
        float_layers=float_layers,
        options=options,
    )
    unavailable = {b: _unavailable(b) for b in backends}
    entries = []
    for plan in progress(plans, desc="engines"):
        entries.append(_build_one(plan, onnx_path, out_dir, maker, unavailable[plan.backend]))

    index = BuildIndex(
        source_onnx=os.path.abspath(onnx_path),
        source_sha256=sha256_file(onnx_path),
        out_dir=out_dir,
        artifacts=entries,
        variants=[_rel_quant(v, out_dir) for v in maker.records()],
        request={
            "backends": backends,
            "precisions": precisions,
            "resolutions": resolutions,
            "dynamic": dynamic,
            "bands": bands,
            "batch_sizes": batch_sizes,
            "max_batch": max_batch,
            "calibration_data": os.fspath(calibration_data)
            if isinstance(calibration_data, (str, os.PathLike))
            else None,
            "calibration_method": calibration_method,
            "calibration_limit": calibration_limit,
            "int8_flavor": int8_flavor,
            "float_layers": float_layers,
            "options": options.to_dict(),
        },
        preprocess=cfg.to_dict() if cfg is not None else None,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        build_s=round(time.perf_counter() - t_start, 3),
    )
    index.save()
    return index


def _unavailable(backend: str) -> MissingDependencyError | None:
    """The MissingDependencyError of a backend whose library is absent (checked once, up front)."""
    import importlib

    module = importlib.import_module(BACKENDS[backend])
    try:
        getattr(module, "check_available", lambda: None)()
    except MissingDependencyError as exc:
        return exc
    return None


def _rel_quant(quant: dict | None, out_dir: str) -> dict | None:
    if quant and quant.get("variant_path"):
        quant = dict(quant, variant_path=_rel(quant["variant_path"], out_dir))
    return quant


def _build_one(
    plan: _Plan,
    onnx_path: str,
    out_dir: str,
    maker: EngineMaker,
    unavailable: MissingDependencyError | None = None,
) -> dict:
    quant = None
    try:
        if unavailable is not None:
            raise unavailable  # no precision variant is made for a backend that cannot build
        art, quant = maker.engine(
            plan.backend,
            plan.precision,
            plan.shapes,
            calibration_resolution=plan.calibration_resolution,
            name=plan.name,
        )
        if quant and plan.precision == "int8" and plan.shapes.mode == "dynamic":
            quant["calibration_note"] = (
                f"dynamic engine: one Q/DQ graph for every profile, calibrated at the "
                f"profile opt resolution {plan.calibration_resolution}; other resolutions reuse those ranges"
            )
    except Exception as exc:  # a missing library, a bad variant, a backend bug: recorded, the build goes on
        log.warning("build %s failed: %s: %s", plan.name, type(exc).__name__, exc)
        art = error_artifact(plan.backend, plan.precision, onnx_path, plan.shapes, exc)
    entry = art.to_dict()
    entry["path"] = _rel(art.path, out_dir)
    entry["source_onnx"] = _rel(art.source_onnx, out_dir)
    entry.update(
        {
            "name": plan.name,
            "shape_mode": plan.shapes.mode,
            "resolution": plan.resolution,
            "batch": plan.batch,
            "profiles": [p.to_dict() for p in plan.shapes.profiles] if plan.shapes.mode == "dynamic" else None,
            "quant": _rel_quant(quant, out_dir),
            "error_type": (art.meta or {}).get("error_type") if art.error else None,
        }
    )
    return entry
