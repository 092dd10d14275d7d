"""The production bundle: one folder (or .tar.gz) that says exactly what runs and how.

A bundle holds the engine file(s), the ONNX source(s) they were built from, ``labels.txt``
and ``manifest.json``. The manifest records the EXACT preprocessing (FixRes lives or dies by
it: the same network is several points worse with another resize or crop), the shapes the
engine accepts, the measured metrics, the library versions, for TensorRT the GPU the plan
was built for (plans do not move across GPUs or TensorRT versions), and the sha256 and size
of every file. :func:`verify_bundle` checks all of that before anything runs, so a
tampered, truncated or incompatible bundle is refused with the reason instead of giving
silently wrong answers.

Layout::

    BUNDLE/manifest.json    format id + version, everything above, a digest of itself
    BUNDLE/labels.txt       one class name per line, index order
    BUNDLE/engine/*         engine files that differ from their ONNX source (.plan, optimized .onnx)
    BUNDLE/onnx/*           the ONNX source(s) (an ONNX Runtime engine that IS its source lives here)

This module imports only the standard library, numpy-free helpers of this package and,
lazily, onnx / onnxruntime / tensorrt: the torch-free runtime depends on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fixres_deploy.backends.base import EngineArtifact, ShapeSpec
from fixres_deploy.core.errors import MissingDependencyError, UserInputError, require
from fixres_deploy.core.preprocess import PreprocessConfig
from fixres_deploy.core.utils import atomic_path, read_json, sha256_file, stable_hash, write_json

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "fixres-deploy/bundle"
BUNDLE_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.txt"
ENGINE_DIR = "engine"
ONNX_DIR = "onnx"
TAR_SUFFIX = ".tar.gz"
ONNX_SUFFIXES = (".onnx",)


class BundleError(UserInputError):
    """A bundle is malformed, was modified after bundling, or cannot run on this machine."""


# --------------------------------------------------------------------------- data


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
class BundleManifest:
    """Everything ``manifest.json`` records; the primary engine is ``engines[0]``.

    ``resolution``, ``precision``, ``backend``, ``shape_mode``, ``profiles``, ``input_name``
    and ``output_name`` repeat the primary engine's facts at the top level so a reader in
    another language (or a person) finds them without walking the engine list.
    ``digest`` is the sha256 of the manifest's canonical JSON without itself: an edit of the
    manifest after bundling is detected like an edit of any other file.
    """

    format: str
    version: int
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
    digest: str | None = None

    @property
    def primary(self) -> BundleEngine:
        return self.engines[0]

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["engines"] = [e.to_dict() for e in self.engines]
        # A JSON round trip makes tuples lists, so the digest is the same before and after saving.
        return json.loads(json.dumps(d, default=_json_default))

    @classmethod
    def from_dict(cls, d: dict) -> BundleManifest:
        if not isinstance(d, dict):
            raise BundleError(f"a bundle manifest must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names - set(d) if n not in ("labels_file", "digest"))
        if missing:
            raise BundleError(f"bundle manifest lacks {missing}")
        unknown = sorted(set(d) - names)
        if unknown:
            raise BundleError(f"unknown bundle manifest keys {unknown} (written by a newer fixres-deploy?)")
        d = dict(d)
        d["engines"] = [BundleEngine.from_dict(e) for e in d["engines"]]
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


@dataclass
class VerifyReport:
    """Result of :func:`verify_bundle`: ``ok`` is False when anything in ``problems``.

    ``notes`` hold what does not stop the chosen engine from running (another engine of the
    bundle that cannot run here, for example).
    """

    path: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    engine: str | None = None
    backend: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise BundleError(f"bundle '{self.path}' refused:\n  - " + "\n  - ".join(self.problems))


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


def load_manifest(bundle_dir: str | os.PathLike) -> BundleManifest:
    """Read ``bundle_dir/manifest.json`` (no integrity checks: see :func:`verify_bundle`)."""
    path = os.path.join(os.fspath(bundle_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        raise BundleError(f"'{bundle_dir}' is not a fixres-deploy bundle: no {MANIFEST_NAME} in it")
    d = read_json(path)
    _check_format(d, path)
    return BundleManifest.from_dict(d)


def _check_format(d: Any, where: str) -> None:
    if not isinstance(d, dict) or d.get("format") != BUNDLE_FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise BundleError(
            f"'{where}' is not a fixres-deploy bundle manifest (format {got!r}, expected {BUNDLE_FORMAT!r})"
        )
    if d.get("version") not in SUPPORTED_VERSIONS:
        raise BundleError(
            f"'{where}' has bundle format version {d.get('version')!r}; this fixres-deploy reads "
            f"{list(SUPPORTED_VERSIONS)}: upgrade fixres-deploy (or rebundle with this one)"
        )


# --------------------------------------------------------------------------- facts


def batch_range(shapes: ShapeSpec, resolution: int, channels: int = 3) -> tuple[int, int] | None:
    """(min, max) batch of the profile that accepts ``channels×resolution×resolution`` with the
    largest max batch; None when no profile accepts that resolution."""
    best = None
    for p in shapes.profiles:
        accepts = all(lo <= v <= hi for lo, v, hi in zip(p.min[1:], (channels, resolution, resolution), p.max[1:]))
        if accepts and (best is None or p.max[0] > best[1]):
            best = (p.min[0], p.max[0])
    return best


def library_versions(names: Sequence[str] = ("onnxruntime", "onnx", "numpy", "pillow")) -> dict[str, str | None]:
    """Installed versions from package metadata (nothing is imported)."""
    from importlib import metadata

    from fixres_deploy import __version__

    dists = {
        "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
        "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"),
        "pillow": ("pillow", "Pillow"),
    }
    out: dict[str, str | None] = {"fixres-deploy": __version__}
    for name in names:
        out[name] = None
        for dist in dists.get(name, (name,)):
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[name] = metadata.version(dist)
                break
    return out


def _dig(d: dict, *paths: str):
    """First non-empty value among dotted ``paths`` of a nested dict."""
    for path in paths:
        cur: Any = d
        for part in path.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur not in (None, "", [], {}):
            return cur
    return None


def normalize_compute_capability(value: Any) -> str | None:
    """(8, 9), [8, 9], "8.9", "sm_89", "89", 89 → "8.9"."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).strip().lower().removeprefix("sm_").removeprefix("sm")
    if re.fullmatch(r"\d+\.\d+", text):
        return text
    if re.fullmatch(r"\d{2,3}", text):
        return f"{int(text) // 10}.{int(text) % 10}"
    return None


def _sm(cc: str | None) -> str:
    return f"sm_{cc.replace('.', '')}" if cc else "sm_?"


def tensorrt_requirements(meta: dict) -> dict:
    """What a TensorRT plan needs, read tolerantly from an artifact's ``meta``."""
    version = _dig(
        meta,
        "tensorrt_version",
        "trt_version",
        "versions.tensorrt",
        "library_versions.tensorrt",
        "libraries.tensorrt",
        "tensorrt",
    )
    gpu = _dig(meta, "gpu_name", "device_name", "gpu.name", "device.name", "gpu")
    cc = _dig(meta, "compute_capability", "gpu.compute_capability", "device.compute_capability", "sm")
    hw = _dig(meta, "hardware_compatibility", "options.hardware_compatibility", "build_options.hardware_compatibility")
    return {
        "tensorrt_version": str(version) if isinstance(version, (str, int, float)) else None,
        "gpu_name": gpu if isinstance(gpu, str) else None,
        "compute_capability": normalize_compute_capability(cc),
        "hardware_compatibility": str(hw).lower() if hw else "none",
    }


def current_gpu() -> dict | None:
    """Name and compute capability of the first visible CUDA GPU, or None.

    cuda-python first (it honours CUDA_VISIBLE_DEVICES), then ``nvidia-smi``.
    """
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            cudart = importlib.import_module(mod)
        except ImportError:
            continue
        try:
            err, count = cudart.cudaGetDeviceCount()
            if int(err) != 0 or count < 1:
                return None
            err, prop = cudart.cudaGetDeviceProperties(0)
            if int(err) == 0:
                name = prop.name
                if isinstance(name, (bytes, bytearray)):
                    name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
                return {"name": str(name).strip(), "compute_capability": f"{prop.major}.{prop.minor}"}
        except (RuntimeError, AttributeError, TypeError, ValueError) as exc:
            log.debug("cuda-python GPU query failed: %s", exc)
        break
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    if not lines:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    idx = int(visible) if visible.isdigit() and int(visible) < len(lines) else 0
    name, _, cc = lines[idx].rpartition(",")
    return {"name": name.strip(), "compute_capability": normalize_compute_capability(cc.strip())}


def _major_minor(version: str | None) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", str(version or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _onnx_facts(path: str) -> dict:
    """Opset, external-data files and input/output shapes of an ONNX file (weights not loaded)."""
    onnx = require("onnx", "cpu", "bundling ONNX files")
    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: an unreadable file
        raise UserInputError(f"'{path}' is not a readable ONNX model: {exc}") from exc
    external = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    external.add(entry.value)

    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in vi.type.tensor_type.shape.dim]

    inits = {t.name for t in model.graph.initializer}
    return {
        "opset": {(o.domain or ""): int(o.version) for o in model.opset_import},
        "external": sorted(external),
        "inputs": {vi.name: dims(vi) for vi in model.graph.input if vi.name not in inits},
        "outputs": {vi.name: dims(vi) for vi in model.graph.output},
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


# --------------------------------------------------------------------------- make


def _unique_name(name: str, used: set[str]) -> str:
    base, ext = os.path.splitext(name)
    if name.endswith(".onnx.data"):
        base, ext = name[: -len(".onnx.data")], ".onnx.data"
    candidate, i = name, 1
    while candidate in used:
        candidate = f"{base}_{i}{ext}"
        i += 1
    used.add(candidate)
    return candidate


def _copy_onnx(src: str, dest_dir: str, rel_dir: str, used: set[str]) -> tuple[str, list[str], dict]:
    """Copy an ONNX file and its external-data files; returns (rel path, rel externals, facts)."""
    facts = _onnx_facts(src)
    name = os.path.basename(src)
    if facts["external"] and name in used:
        raise UserInputError(
            f"two ONNX files named '{name}' with external data cannot share one bundle folder; rename one"
        )
    name = _unique_name(name, used)
    os.makedirs(os.path.join(dest_dir, rel_dir), exist_ok=True)
    shutil.copyfile(src, os.path.join(dest_dir, rel_dir, name))
    externals = []
    for loc in facts["external"]:
        if os.path.isabs(loc) or ".." in loc.replace("\\", "/").split("/"):
            raise UserInputError(f"'{src}' names external data outside its folder ({loc!r}); re-save it with onnx")
        ext_src = os.path.join(os.path.dirname(src), loc)
        if not os.path.isfile(ext_src):
            raise UserInputError(f"'{src}' needs its external data file '{ext_src}', which does not exist")
        if loc in used:
            raise UserInputError(f"external data '{loc}' of '{src}' collides with another bundled file")
        used.add(loc)
        target = os.path.join(dest_dir, rel_dir, loc)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(ext_src, target)
        externals.append(f"{rel_dir}/{loc}")
    return f"{rel_dir}/{name}", externals, facts


def _check_onnx_io(path: str, facts: dict, art: EngineArtifact, num_classes: int) -> None:
    if art.input_name not in facts["inputs"]:
        raise UserInputError(f"'{path}' has no input '{art.input_name}' (inputs: {sorted(facts['inputs'])})")
    out = facts["outputs"].get(art.output_name)
    if out is None:
        raise UserInputError(f"'{path}' has no output '{art.output_name}' (outputs: {sorted(facts['outputs'])})")
    if len(out) == 2 and isinstance(out[1], int) and out[1] > 0 and out[1] != num_classes:
        raise UserInputError(
            f"'{path}' outputs {out[1]} classes but {num_classes} class names were given: wrong labels for this model"
        )


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


def bundle_tar_path(out_dir: str | os.PathLike) -> str:
    """Where ``make_bundle(..., tar=True)`` writes the archive: ``DIR.tar.gz`` beside DIR."""
    return os.fspath(out_dir).rstrip("/\\") + TAR_SUFFIX


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
    for src in onnx_sources:
        if not os.path.isfile(src):
            raise UserInputError(f"ONNX source '{src}' does not exist")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    try:
        manifest = _write_bundle_tree(tmp, engines, onnx_sources, preprocess, class_names, model, metrics, selection)
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
    root, engines, onnx_sources, preprocess, class_names, model, metrics, selection
) -> BundleManifest:
    used: set[str] = set()
    by_real: dict[str, tuple[str, list[str], dict]] = {}
    by_sha: dict[str, tuple[str, list[str], dict]] = {}
    sources: list[str] = []

    def add_source(path: str) -> tuple[str, list[str], dict]:
        real = os.path.realpath(path)
        if real not in by_real:
            rel, ext, facts = _copy_onnx(path, root, ONNX_DIR, used)
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
            rel, externals, facts = _copy_onnx(art.path, root, ENGINE_DIR, engine_used)
        else:
            name = _unique_name(os.path.basename(art.path), engine_used)
            os.makedirs(os.path.join(root, ENGINE_DIR), exist_ok=True)
            shutil.copyfile(art.path, os.path.join(root, ENGINE_DIR, name))
            rel, facts = f"{ENGINE_DIR}/{name}", None
        if facts is not None:
            _check_onnx_io(art.path, facts, art, num_classes)
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
            requires = {
                "onnxruntime_version": _dig(
                    art.meta,
                    "onnxruntime_version",
                    "versions.onnxruntime",
                    "library_versions.onnxruntime",
                    "onnxruntime",
                )
            }
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
                meta=json.loads(json.dumps(art.meta or {}, default=_json_default)),
            )
        )

    with open(os.path.join(root, LABELS_NAME), "w", encoding="utf-8") as f:
        f.write("\n".join(class_names) + "\n")

    primary = bundle_engines[0]
    names = ["onnxruntime", "onnx", "numpy", "pillow"]
    if any(e.backend == "tensorrt" for e in bundle_engines):
        names.append("tensorrt")
    libraries = library_versions(names)
    hardware = None
    if primary.backend == "tensorrt":
        hardware = {
            k: primary.requires[k]
            for k in ("gpu_name", "compute_capability", "tensorrt_version", "hardware_compatibility")
        }
        libraries["tensorrt"] = primary.requires["tensorrt_version"]  # what the plan was built with
    manifest = BundleManifest(
        format=BUNDLE_FORMAT,
        version=BUNDLE_VERSION,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=json.loads(json.dumps(model or {}, default=_json_default)),
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
        metrics=json.loads(json.dumps(metrics or {}, default=_json_default)),
        selection=json.loads(json.dumps(selection, default=_json_default)) if selection is not None else None,
        libraries=libraries,
        hardware=hardware,
        files=_file_table(root),
    )
    manifest.digest = manifest.compute_digest()
    write_json(os.path.join(root, MANIFEST_NAME), manifest.to_dict())
    return manifest


def write_bundle_tar(bundle_dir: str | os.PathLike) -> str:
    """``DIR.tar.gz`` beside the bundle: one top-level folder, regular files only, no owners."""
    bundle_dir = os.path.abspath(os.fspath(bundle_dir))
    top = os.path.basename(bundle_dir)
    target = bundle_tar_path(bundle_dir)

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with atomic_path(target) as tmp:
        with tarfile.open(tmp, "w:gz") as tf:
            tf.add(bundle_dir, arcname=top, recursive=False, filter=clean)
            for dirpath, dirnames, filenames in os.walk(bundle_dir):
                dirnames.sort()
                for name in sorted(dirnames) + sorted(filenames):
                    full = os.path.join(dirpath, name)
                    arc = top + "/" + os.path.relpath(full, bundle_dir).replace(os.sep, "/")
                    tf.add(full, arcname=arc, recursive=False, filter=clean)
    return target


# --------------------------------------------------------------------------- extract


def _member_problem(m: tarfile.TarInfo, dest_real: str) -> str | None:
    name = m.name
    if not name or "\x00" in name:
        return f"member {name!r}: empty or invalid name"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return f"member {name!r}: absolute path"
    if ".." in norm.split("/"):
        return f"member {name!r}: '..' in its path"
    target = os.path.realpath(os.path.join(dest_real, norm))
    if os.path.commonpath([target, dest_real]) != dest_real:
        return f"member {name!r}: escapes the destination"
    if m.issym() or m.islnk():
        return f"member {name!r}: links are not allowed in a bundle (-> {m.linkname!r})"
    if not (m.isreg() or m.isdir()):
        return f"member {name!r}: not a regular file or folder (devices, fifos are not allowed)"
    return None


def extract_bundle(tar_path: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Safely extract a bundle archive into ``dest``; return the bundle folder inside it.

    Every member is checked BEFORE anything is written: no absolute paths, no ``..``, nothing
    resolving outside ``dest``, no symlinks, hardlinks or devices — regular files and folders
    only. Extraction then also uses tarfile's ``filter="data"`` where Python has it.
    """
    tar_path = os.fspath(tar_path)
    if not os.path.isfile(tar_path):
        raise BundleError(f"bundle archive '{tar_path}' does not exist")
    os.makedirs(dest, exist_ok=True)
    dest_real = os.path.realpath(dest)
    try:
        with tarfile.open(tar_path, "r:*") as tf:
            members = tf.getmembers()
            problems = [p for p in (_member_problem(m, dest_real) for m in members) if p]
            if problems:
                raise BundleError(
                    f"unsafe bundle archive '{tar_path}' refused; nothing was extracted:\n  - "
                    + "\n  - ".join(problems)
                )
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest_real, members=members, filter="data")
            else:  # pragma: no cover - Python without PEP 706; our own checks above still hold
                tf.extractall(dest_real, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"cannot read bundle archive '{tar_path}': {exc}") from exc
    if os.path.isfile(os.path.join(dest_real, MANIFEST_NAME)):
        return dest_real
    tops = {m.name.replace("\\", "/").split("/")[0] for m in members if m.name}
    for top in sorted(tops):
        if os.path.isfile(os.path.join(dest_real, top, MANIFEST_NAME)):
            return os.path.join(dest_real, top)
    raise BundleError(f"archive '{tar_path}' holds no {MANIFEST_NAME}: not a fixres-deploy bundle")


# --------------------------------------------------------------------------- verify


def _safe_rel(rel: str) -> bool:
    return bool(rel) and not rel.startswith("/") and ".." not in rel.split("/") and "\\" not in rel


def _check_files(root: str, manifest: BundleManifest) -> list[str]:
    problems = []
    for rel, info in sorted(manifest.files.items()):
        if not _safe_rel(rel):
            problems.append(f"manifest lists an unsafe path {rel!r}")
            continue
        full = os.path.join(root, rel)
        if os.path.islink(full):
            problems.append(f"{rel}: is a symlink (bundles hold regular files only)")
        elif not os.path.isfile(full):
            problems.append(f"{rel}: listed in the manifest but missing")
        elif os.path.getsize(full) != info.get("size_bytes"):
            problems.append(f"{rel}: size {os.path.getsize(full)} bytes, manifest says {info.get('size_bytes')}")
        elif sha256_file(full) != info.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch (the file was modified after bundling)")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full):
                if rel not in manifest.files:
                    problems.append(f"{rel}: symlink inside the bundle")
                continue
            if name in filenames and rel != MANIFEST_NAME and rel not in manifest.files:
                problems.append(f"{rel}: file not listed in the manifest (added after bundling)")
    return problems


def _check_content(root: str, manifest: BundleManifest) -> list[str]:
    problems = []
    try:
        cfg = manifest.preprocess_config()
    except UserInputError as exc:
        return [f"manifest preprocessing is invalid: {exc}"]
    if cfg.test_input_size != manifest.resolution:
        problems.append(
            f"manifest resolution {manifest.resolution} differs from the preprocessing's "
            f"test_input_size {cfg.test_input_size}"
        )
    if manifest.num_classes != len(manifest.class_names):
        problems.append(f"manifest num_classes {manifest.num_classes} but {len(manifest.class_names)} class names")
    labels = os.path.join(root, manifest.labels_file)
    if os.path.isfile(labels):
        with open(labels, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if lines != list(manifest.class_names):
            problems.append(f"{manifest.labels_file} does not match the manifest's class names")
    for e in manifest.engines:
        for rel in [e.file, *e.external_data] + ([e.source_onnx] if e.source_onnx else []):
            if rel not in manifest.files:
                problems.append(f"engine file {rel!r} is not in the manifest's file list")
        if batch_range(e.shapes, cfg.test_input_size) is None:
            problems.append(f"engine {e.file} does not accept the preprocessing's {cfg.test_input_size}px input")
    return problems


def engine_runtime_problems(root: str, engine: BundleEngine, *, check_load: bool = True) -> list[str]:
    """Why ``engine`` cannot run on this machine (empty when it can, as far as can be checked).

    ONNX Runtime: the library is importable and (``check_load``) loads the model — the only
    honest test that this version supports the model's opsets and operators. TensorRT: the
    library's major.minor equals the one the plan was built with, and the GPU equals the
    recorded one (or satisfies the recorded hardware-compatibility level).
    """
    if engine.backend == "onnxruntime":
        try:
            ort = require("onnxruntime", "cpu", f"running the ONNX Runtime engine {engine.file}")
        except MissingDependencyError as exc:
            return [str(exc)]
        if not check_load:
            return []
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        try:
            ort.InferenceSession(os.path.join(root, engine.file), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises Fail / InvalidGraph / NotImplemented / RuntimeException
            msg = str(exc)
            cut = msg.find("ONNX Runtime ")
            msg = (msg[cut:] if cut > 0 else msg).splitlines()[0][:400]
            return [
                f"onnxruntime {getattr(ort, '__version__', '?')} cannot load {engine.file} "
                f"(opsets {engine.opset}): {msg}"
            ]
        return []
    if engine.backend == "tensorrt":
        req = engine.requires
        built = req.get("tensorrt_version")
        gpu, cc = req.get("gpu_name"), req.get("compute_capability")
        problems = []
        try:
            trt = importlib.import_module("tensorrt")
        except ImportError:
            problems.append(
                f"TensorRT engine {engine.file} needs the 'tensorrt' Python package {built} "
                "(pip install 'fixres-deploy[gpu]'), which is not installed here"
            )
        else:
            have = getattr(trt, "__version__", None)
            if _major_minor(have) != _major_minor(built):
                problems.append(
                    f"TensorRT engine {engine.file} was built with TensorRT {built} but TensorRT "
                    f"{have} is installed: plans load only in the same major.minor; rebuild it here"
                )
        here = current_gpu()
        if here is None:
            problems.append(
                f"TensorRT engine built for {gpu} ({_sm(cc)}) cannot be verified/run here: no CUDA GPU "
                "found (run the bundled ONNX with --backend onnxruntime, or rebuild on this machine)"
            )
        else:
            hw = (req.get("hardware_compatibility") or "none").lower()
            here_cc = here.get("compute_capability")
            if hw in ("ampere_plus", "ampere+"):
                ok = (_major_minor(here_cc) or (0, 0)) >= (8, 0)
            elif hw in ("same_compute_capability", "same_cc"):
                ok = here_cc == cc
            else:
                ok = here_cc == cc and (here.get("name") or "").strip() == (gpu or "").strip()
            if not ok:
                problems.append(
                    f"TensorRT engine built for {gpu} ({_sm(cc)}) cannot run on this {here.get('name')} "
                    f"({_sm(here_cc)}): plans do not move across GPUs; rebuild it here "
                    "or run the bundled ONNX with --backend onnxruntime"
                )
        return problems
    try:
        importlib.import_module(f"fixres_deploy.backends.{engine.backend}_backend")
    except ImportError as exc:
        return [f"engine {engine.file}: backend {engine.backend!r} is not available here ({exc})"]
    return []


def verify_bundle(
    path: str | os.PathLike,
    *,
    backend: str | None = None,
    check_runtime: bool = True,
    check_load: bool = True,
) -> VerifyReport:
    """Check a bundle folder or ``.tar.gz`` before trusting it.

    Args:
        path: the bundle folder or archive.
        backend: the backend that will run it (None: the primary engine's).
        check_runtime: also check that the engine can run on this machine (library version,
            GPU); off for tools that only copy files (the Triton export).
        check_load: ONNX Runtime engines: actually load the model (catches unsupported opsets).

    Returns:
        A :class:`VerifyReport`; ``ok`` is False with the reasons in ``problems``.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and (path.endswith((TAR_SUFFIX, ".tgz", ".tar"))):
        with tempfile.TemporaryDirectory(prefix="fixres-bundle-") as tmp:
            try:
                root = extract_bundle(path, tmp)
            except BundleError as exc:
                return VerifyReport(path=path, ok=False, problems=[str(exc)])
            report = verify_bundle(root, backend=backend, check_runtime=check_runtime, check_load=check_load)
            report.path = path
            return report
    if not os.path.isdir(path):
        return VerifyReport(path=path, ok=False, problems=[f"'{path}' is neither a bundle folder nor a .tar.gz"])
    mpath = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(mpath):
        return VerifyReport(
            path=path, ok=False, problems=[f"no {MANIFEST_NAME} in '{path}': not a fixres-deploy bundle"]
        )
    try:
        raw = read_json(mpath)
        _check_format(raw, mpath)
        manifest = BundleManifest.from_dict(raw)
    except (UserInputError, KeyError, TypeError, ValueError) as exc:
        return VerifyReport(path=path, ok=False, problems=[f"{MANIFEST_NAME}: {exc}"])
    problems: list[str] = []
    notes: list[str] = []
    if manifest.digest != manifest.compute_digest():
        problems.append(f"{MANIFEST_NAME} was edited after bundling (its digest does not match its content)")
    problems += _check_files(path, manifest)
    problems += _check_content(path, manifest)
    try:
        engine = manifest.engine_for(backend)
    except BundleError as exc:
        return VerifyReport(path=path, ok=False, problems=problems + [str(exc)], notes=notes)
    if check_runtime:
        intact = not problems
        problems += engine_runtime_problems(path, engine, check_load=check_load and intact)
        for other in manifest.engines:
            if other.file != engine.file:
                notes += [f"(other engine) {p}" for p in engine_runtime_problems(path, other, check_load=False)]
    return VerifyReport(
        path=path, ok=not problems, problems=problems, notes=notes, engine=engine.file, backend=engine.backend
    )


# --------------------------------------------------------------------------- from a build index


def _index_entries(index_path: str) -> list[dict]:
    raw = read_json(index_path)
    entries = raw.get("artifacts") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserInputError(f"'{index_path}' has no 'artifacts' list of objects: not a build index")
    return entries


def _pick_entry(entries: list[dict], key: str | int, index_path: str) -> dict:
    text = str(key)
    if text.lstrip("-").isdigit():
        i = int(text)
        if not -len(entries) <= i < len(entries):
            raise UserInputError(f"--artifact {i} is out of range: '{index_path}' lists {len(entries)} artifacts")
        return entries[i]
    for e in entries:
        names = {str(e.get(k)) for k in ("key", "name", "id") if e.get(k) is not None}
        if e.get("path"):
            base = os.path.basename(str(e["path"]))
            names |= {base, os.path.splitext(base)[0]}
        if text in names:
            return e
    avail = [e.get("key") or e.get("name") or os.path.basename(str(e.get("path"))) for e in entries]
    raise UserInputError(
        f"no artifact {text!r} in '{index_path}'; give an index 0..{len(entries) - 1} or one of {avail}"
    )


def _resolve(path: str | None, base_dir: str) -> str | None:
    """Index paths are relative to the index's folder (the build folder can be moved)."""
    if not path or os.path.isabs(path):
        return path
    return os.path.join(base_dir, path)


def bundle_from_index(
    index_path: str | os.PathLike,
    artifact: str | int,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    metrics: dict | None = None,
    selection: dict | None = None,
    labels: list[str] | None = None,
    tar: bool = False,
    overwrite: bool = False,
    triton_repo: str | None = None,
    triton_options: dict | None = None,
) -> dict:
    """`fixres-deploy bundle --index`: bundle one artifact of a build index.

    Preprocessing and labels come from the ONNX metadata (``fixres_deploy.core.preprocess``,
    ``fixres_deploy.class_names``) of the artifact's source, falling back to the checkpoint's.

    Returns:
        ``{"bundle": dir, "tar": path|None, "triton": model dir|None, "manifest": dict}``.
    """
    index_path = os.fspath(index_path)
    base_dir = os.path.dirname(os.path.abspath(index_path))
    entry = _pick_entry(_index_entries(index_path), artifact, index_path)
    known = {f.name for f in dataclasses.fields(EngineArtifact)}
    try:
        art = EngineArtifact.from_dict({k: v for k, v in entry.items() if k in known})
    except (TypeError, KeyError) as exc:
        raise UserInputError(f"artifact {artifact!r} of '{index_path}' is not an engine artifact: {exc}") from exc
    if art.error:
        raise UserInputError(
            f"artifact {artifact!r} of '{index_path}' is a failed build ({art.backend} {art.precision}): {art.error}"
        )
    art.path = _resolve(art.path, base_dir)
    art.source_onnx = _resolve(art.source_onnx, base_dir)
    from fixres_deploy.export.onnx_export import META_CLASS_NAMES, META_PREPROCESS, read_onnx_metadata

    onnx_for_meta = art.source_onnx or (art.path if art.path and art.path.endswith(ONNX_SUFFIXES) else None)
    meta: dict[str, Any] = {}
    if onnx_for_meta and os.path.isfile(onnx_for_meta):
        for key, value in read_onnx_metadata(onnx_for_meta).items():
            if key.startswith("fixres_deploy."):
                try:
                    meta[key] = json.loads(value)
                except json.JSONDecodeError:
                    meta[key] = value

    ck_meta: dict = {}
    model: dict = {
        "spec": meta.get("fixres_deploy.model"),
        "onnx_metadata": {k: v for k, v in meta.items() if k not in (META_PREPROCESS, META_CLASS_NAMES)},
    }
    if checkpoint:
        from fixres_deploy.models.registry import read_checkpoint  # torch: only when a checkpoint is given

        _, ck_meta = read_checkpoint(checkpoint)
        model.update(
            {
                "spec": ck_meta.get("model") or model.get("spec"),
                "num_classes": ck_meta.get("num_classes"),
                "checkpoint": os.path.basename(checkpoint),
                "checkpoint_sha256": sha256_file(checkpoint),
                "finetuned_resolution": _dig(ck_meta, "fixres.resolution"),
                "finetune_top1_after": _dig(ck_meta, "fixres.top1_after"),
            }
        )
    pre = meta.get(META_PREPROCESS) or ck_meta.get("preprocess")
    if not pre:
        raise UserInputError(
            f"no preprocessing recorded in '{onnx_for_meta}' (ONNX metadata fixres_deploy.core.preprocess)"
            " nor in a --checkpoint: export the ONNX with fixres-deploy export"
        )
    cfg = PreprocessConfig.from_dict(pre if isinstance(pre, dict) else json.loads(pre))
    if art.shapes is not None and batch_range(art.shapes, cfg.test_input_size) is None and art.resolutions:
        cfg = cfg.at_resolution(art.resolutions[0])  # a checkpoint's preprocessing at the engine's resolution
    names = labels or meta.get(META_CLASS_NAMES) or ck_meta.get("class_names")
    if not names:
        raise UserInputError(f"no class names in '{onnx_for_meta}' metadata nor the checkpoint: pass --labels FILE")
    if metrics is None:
        metrics = entry.get("metrics") or entry.get("point") or {}
    manifest = make_bundle(
        out_dir,
        engines=[art],
        onnx_sources=[],
        preprocess=cfg,
        class_names=list(names),
        model=model,
        metrics=metrics,
        selection=selection,
        tar=tar,
        overwrite=overwrite,
    )
    triton_dir = None
    if triton_repo:
        from fixres_deploy.ship.triton import export_triton_repository

        triton_dir = export_triton_repository(out_dir, triton_repo, **(triton_options or {}))
    return {
        "bundle": os.path.abspath(os.fspath(out_dir)),
        "tar": bundle_tar_path(os.path.abspath(os.fspath(out_dir))) if tar else None,
        "triton": triton_dir,
        "manifest": manifest.to_dict(),
    }
