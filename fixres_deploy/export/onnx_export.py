"""ONNX export with the preprocessing in the file, validated against torch on real images.

The exported file carries its preprocessing (``metadata_props``), so every later stage
(precision variants, engines, the production runtime) reads the resize/crop/normalization it
must use from the model itself instead of from a flag that can drift.

Exporters:
    ``"dynamo"`` (default): ``torch.onnx.export(..., dynamo=True)``, the torch.export-based
    exporter. Slower (seconds to tens of seconds) but the supported path; it folds BatchNorm
    into the convolutions and names dynamic axes after our ``torch.export.Dim``s.
    ``"torchscript"``: the legacy tracer (``dynamo=False``), deprecated but fast; useful when
    torch.export cannot capture a model.
    ``"auto"``: dynamo, then torchscript if dynamo raises; the result records which one ran
    and why it fell back. Nothing falls back silently unless ``"auto"`` is asked for.

Validation (the Hugging Face Optimum exporter's checks): names, then shapes, then values
(max abs diff, max error relative to the output's scale, per-image cosine, top-1 agreement)
at every resolution the file is meant to serve, on REAL preprocessed images. Random tensors
and random-init models hide bugs (a random-init MobileNet outputs ~1e-9; any absolute
difference looks perfect). Pass your own images (``validation_images``); without them a few
images of the built-in demo data set are rendered, which is only a smoke check.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fixres_deploy.core.errors import FixResError, UserInputError, require
from fixres_deploy.core.preprocess import PreprocessConfig
from fixres_deploy.core.utils import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

# Keys of the ONNX model's metadata_props written by this module.
META_PREPROCESS = "fixres_deploy.core.preprocess"
META_CLASS_NAMES = "fixres_deploy.class_names"
META_MODEL = "fixres_deploy.model"
META_VERSION = "fixres_deploy.version"

EXPORTERS = ("dynamo", "torchscript", "auto")
DYNAMIC_AXES = ("batch", "height", "width")
N_VALIDATION_IMAGES = 8
# Protobuf's hard limit; above it the weights must live in an external data file.
PROTOBUF_LIMIT_BYTES = 2 * 1024**3


class ExportError(FixResError):
    """The exporter could not turn the torch model into ONNX; the message says which and why."""


@dataclass(frozen=True)
class ValidationTolerance:
    """When an ONNX output counts as equal to torch's.

    Attributes:
        rtol: allowed max abs difference relative to the output's scale (max |torch output|).
        atol: allowed max abs difference on top of ``rtol * scale``.
        min_cosine: smallest allowed per-image cosine similarity of the logit vectors.
        min_top1_agreement: smallest allowed share of images with the same argmax, counted
            over images whose torch top-1/top-2 margin exceeds the allowed difference
            (closer calls may legitimately flip within tolerance and are reported apart).
    """

    rtol: float = 1e-3
    atol: float = 1e-4
    min_cosine: float = 0.9999
    min_top1_agreement: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ValidationTolerance:
        return cls(**d)


@dataclass
class ValidationReport:
    """Every comparison made between the ONNX file and torch.

    Attributes:
        passed: no mismatch anywhere.
        tolerance: the :class:`ValidationTolerance` used, as a dict.
        runs: one dict per (resolution, batch) run: shapes, max_abs_diff, max_rel_err,
            min_cosine, top1_agreement, n_ambiguous, ok, problems.
        mismatches: human-readable problems across all runs (empty when passed).
    """

    passed: bool
    tolerance: dict
    runs: list[dict] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((r["max_abs_diff"] for r in self.runs if r.get("max_abs_diff") is not None), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((r["max_rel_err"] for r in self.runs if r.get("max_rel_err") is not None), default=0.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "tolerance": dict(self.tolerance),
            "max_abs_diff": self.max_abs_diff,
            "max_rel_err": self.max_rel_err,
            "runs": [dict(r) for r in self.runs],
            "mismatches": list(self.mismatches),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ValidationReport:
        return cls(
            passed=d["passed"],
            tolerance=dict(d["tolerance"]),
            runs=list(d.get("runs", [])),
            mismatches=list(d.get("mismatches", [])),
        )


class ExportValidationError(FixResError):
    """The ONNX file does not reproduce torch within tolerance; ``.report`` has every run."""

    def __init__(self, message: str, report: ValidationReport):
        super().__init__(message)
        self.report = report


@dataclass
class ExportResult:
    """What `export` produced; saved beside the model as ``<model>.onnx.json``.

    Attributes:
        path: the .onnx file.
        sha256, size_bytes: identity of the file.
        resolution: K_test the preprocessing was resolved at (the fixed input size, or the
            reference size of a dynamic export).
        dynamic: axes batch/height/width are symbolic.
        batch_size: fixed batch of a static export (None when dynamic).
        input_name, output_name: tensor names in the graph.
        input_shape: the graph input's shape with symbolic names for dynamic axes.
        exporter: the exporter that produced the file ("dynamo" or "torchscript").
        fallback_reason: why ``exporter="auto"`` fell back to torchscript, if it did.
        opset: default-domain opset of the file.
        export_s: seconds spent in the exporter (validation excluded).
        validation: :class:`ValidationReport` as a dict (None when validation was skipped).
        validate_resolutions: resolutions validated.
        preprocess: the preprocessing dict written into the file.
        class_names: label names written into the file, if known.
        model_spec: the model spec written into the file, if known.
        external_data: weights live in ``<path>.data`` (only for models over 2 GB).
    """

    path: str
    sha256: str
    size_bytes: int
    resolution: int
    dynamic: bool
    batch_size: int | None
    input_name: str
    output_name: str
    input_shape: list
    exporter: str
    opset: int | None
    export_s: float
    validation: dict | None
    validate_resolutions: list[int]
    preprocess: dict
    class_names: list[str] | None = None
    model_spec: str | None = None
    fallback_reason: str | None = None
    external_data: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExportResult:
        return cls(**d)

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)


# --------------------------------------------------------------------------- metadata


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The model-level ``metadata_props`` of an ONNX file (weights are not loaded)."""
    onnx = require("onnx", "cpu", "reading ONNX metadata")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserInputError(f"ONNX file '{path}' does not exist")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise UserInputError(f"'{path}' is not a readable ONNX file: {exc}") from exc
    return {p.key: p.value for p in model.metadata_props}


def read_onnx_preprocess(path: str | os.PathLike) -> PreprocessConfig | None:
    """The preprocessing recorded by :func:`export_onnx`, or None for a foreign ONNX file."""
    meta = read_onnx_metadata(path)
    if META_PREPROCESS not in meta:
        return None
    try:
        return PreprocessConfig.from_dict(json.loads(meta[META_PREPROCESS]))
    except json.JSONDecodeError as exc:
        raise UserInputError(f"'{path}': metadata {META_PREPROCESS} is not JSON: {exc}") from exc


def set_metadata(model, props: dict[str, str]) -> None:
    """Set (replace) model-level metadata_props entries on an in-memory ModelProto."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in keep + list(props.items()):
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value


def _metadata_for(cfg: PreprocessConfig, class_names, model_spec) -> dict[str, str]:
    from fixres_deploy import __version__

    props = {META_PREPROCESS: cfg.to_json(), META_VERSION: __version__}
    if class_names:
        props[META_CLASS_NAMES] = json.dumps(list(class_names))
    if model_spec:
        props[META_MODEL] = str(model_spec)
    return props


# --------------------------------------------------------------------------- validation data


def _pil_images(source, n: int) -> list:
    """Up to ``n`` PIL images: from a folder/index (class-balanced) or rendered demo images."""
    from fixres_deploy.data.folders import ImageFolderIndex, class_balanced_subset, index_image_folder, load_rgb

    if source is None:
        from fixres_deploy.data.demo import CLASSES, render_image

        return [render_image(i % len(CLASSES), 900_001 + i) for i in range(n)]
    if isinstance(source, (list, tuple)):
        return list(source)[:n]
    index = source if isinstance(source, ImageFolderIndex) else index_image_folder(source)
    per_class = max(1, -(-n // max(1, len(index.classes))))
    chosen = class_balanced_subset(index, per_class, seed=0).samples
    images = []
    for s in chosen:
        if len(images) >= n:
            break
        try:
            images.append(load_rgb(s.path))
        except Exception as exc:  # PIL raises many types; a bad file is skipped, not fatal
            log.warning("validation: skipping unreadable image %s (%s)", s.path, exc)
    if not images:
        raise UserInputError(f"no readable validation images in '{index.root}'")
    return images


def validation_batches(
    source, cfg: PreprocessConfig, resolutions: Sequence[int], *, n: int = N_VALIDATION_IMAGES
) -> dict[int, np.ndarray]:
    """Real images preprocessed with the eval transform at each resolution.

    Args:
        source: an ImageFolder path, an ``ImageFolderIndex``, a list of PIL images, or None
            (render ``n`` images of the built-in demo data: a smoke check only; pass images
            like your deployment data).
        cfg: the preprocessing; only the resolution changes between batches.
        resolutions: K values to produce.
        n: images per batch.

    Returns:
        {K: float32 array (n, 3, K, K)}.
    """
    from fixres_deploy.core.preprocess import eval_transform

    images = _pil_images(source, n)
    out = {}
    for r in resolutions:
        tf = eval_transform(cfg.at_resolution(int(r)))
        out[int(r)] = np.stack([tf(img).numpy() for img in images]).astype(np.float32)
    return out


# --------------------------------------------------------------------------- validation


def _cpu_session(path: str):
    ort = require("onnxruntime", "cpu", "validating an ONNX export")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise UserInputError(f"ONNX Runtime cannot load '{path}': {exc}") from exc


def _compare(onnx_out: np.ndarray, torch_out: np.ndarray, tol: ValidationTolerance) -> dict:
    """Value statistics of one run (float64 to keep tiny random-init outputs meaningful)."""
    a = onnx_out.astype(np.float64).reshape(onnx_out.shape[0], -1)
    b = torch_out.astype(np.float64).reshape(torch_out.shape[0], -1)
    diff = np.abs(a - b)
    scale = float(np.abs(b).max()) if b.size else 0.0
    eps = np.finfo(np.float64).tiny
    max_abs = float(diff.max()) if diff.size else 0.0
    allowed = tol.atol + tol.rtol * scale
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    cos = np.where((na > 0) & (nb > 0), (a * b).sum(1) / np.maximum(na * nb, eps), np.where(na == nb, 1.0, 0.0))
    # top-1 agreement over images whose top-1/top-2 margin exceeds what tolerance allows
    if b.shape[1] >= 2:
        top2 = np.sort(b, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        clear = margin > 2 * allowed
    else:
        clear = np.ones(len(b), dtype=bool)
    agree = a.argmax(1) == b.argmax(1)
    n_clear = int(clear.sum())
    return {
        "max_abs_diff": max_abs,
        "max_rel_err": max_abs / max(scale, eps),
        "output_scale": scale,
        "allowed_abs_diff": allowed,
        "min_cosine": float(cos.min()) if len(cos) else 1.0,
        "top1_agreement": float(agree[clear].mean()) if n_clear else 1.0,
        "n_ambiguous": int(len(b) - n_clear),
    }


def _run_chunks(session, input_name: str, output_name: str, x: np.ndarray, fixed_batch: int | None) -> np.ndarray:
    """Run ``x`` through the session in chunks of the file's fixed batch (padding the last)."""
    if fixed_batch is None:
        return session.run([output_name], {input_name: x})[0]
    outs = []
    for start in range(0, len(x), fixed_batch):
        chunk = x[start : start + fixed_batch]
        n = len(chunk)
        if n < fixed_batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed_batch - n, axis=0)])
        outs.append(session.run([output_name], {input_name: chunk})[0][:n])
    return np.concatenate(outs)


def validate_onnx(
    onnx_path: str | os.PathLike,
    model,
    batches: dict[int, np.ndarray],
    *,
    input_name: str = "input",
    output_name: str = "logits",
    rtol: float = ValidationTolerance.rtol,
    atol: float = ValidationTolerance.atol,
    min_cosine: float = ValidationTolerance.min_cosine,
    min_top1_agreement: float = ValidationTolerance.min_top1_agreement,
) -> ValidationReport:
    """Compare ONNX Runtime (CPU) with torch on real images at every given resolution.

    Checks, in order, output names, output shapes, then values; all mismatches across all
    resolutions are collected before raising, so one run tells the whole story.

    Args:
        onnx_path: the exported file.
        model: the torch module it came from (put in eval mode), or ``{resolution: module}``
            to compare each resolution with its own reference.
        batches: {K: float32 (N, 3, K, K)} preprocessed real images. A file with a dynamic
            batch axis is also run on the first image alone (batch 1); a fixed-batch file is
            run in chunks of its batch size.
        input_name, output_name: graph tensor names.
        rtol, atol, min_cosine, min_top1_agreement: see :class:`ValidationTolerance`.

    Returns:
        The :class:`ValidationReport` (``passed`` is True).

    Raises:
        ExportValidationError: anything differs; ``.report`` holds every run and the message
            states the largest difference and the tolerance.
        UserInputError: a batch does not fit a fixed-shape file (wrong resolution).
    """
    import torch

    tol = ValidationTolerance(rtol=rtol, atol=atol, min_cosine=min_cosine, min_top1_agreement=min_top1_agreement)
    path = os.fspath(onnx_path)
    session = _cpu_session(path)
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    runs: list[dict] = []
    mismatches: list[str] = []
    names = [o.name for o in outputs]
    if [i.name for i in inputs] != [input_name]:
        mismatches.append(f"graph inputs are {[i.name for i in inputs]}, expected ['{input_name}']")
    if names != [output_name]:
        mismatches.append(f"graph outputs are {names}, expected ['{output_name}']")
    if mismatches:
        report = ValidationReport(False, tol.to_dict(), runs, mismatches)
        raise ExportValidationError(f"ONNX file '{path}': " + "; ".join(mismatches), report)

    in_shape = inputs[0].shape
    fixed_batch = in_shape[0] if isinstance(in_shape[0], int) else None
    fixed_hw = tuple(in_shape[2:]) if all(isinstance(d, int) for d in in_shape[2:]) else None
    references = model if isinstance(model, dict) else dict.fromkeys(batches, model)
    missing = sorted(set(batches) - set(references))
    if missing:
        raise UserInputError(f"no reference model for resolution(s) {missing} (have {sorted(references)})")
    for res in sorted(batches):
        model = references[res].eval()
        x = np.ascontiguousarray(batches[res], dtype=np.float32)
        if fixed_hw is not None and tuple(x.shape[2:]) != fixed_hw:
            raise UserInputError(
                f"'{path}' has a fixed input of {fixed_hw[0]}x{fixed_hw[1]} px and cannot be validated at "
                f"{res} px; export with --dynamic to serve several resolutions, or validate at {fixed_hw[0]}"
            )
        with torch.inference_mode():
            ref_full = model(torch.from_numpy(x)).float().numpy()
        plans = [("full", x, ref_full)]
        if fixed_batch is None and len(x) > 1:
            with torch.inference_mode():
                ref_one = model(torch.from_numpy(x[:1])).float().numpy()
            plans.append(("batch1", x[:1], ref_one))
        for kind, xb, ref in plans:
            run = {
                "resolution": int(res),
                "batch": len(xb) if fixed_batch is None else int(fixed_batch),
                "images": len(xb),
                "kind": kind,
                "problems": [],
            }
            try:
                got = _run_chunks(session, input_name, output_name, xb, fixed_batch)
            except Exception as exc:  # ORT raises its own exception types
                run["problems"].append(f"ONNX Runtime failed: {str(exc).splitlines()[0]}")
                run["ok"] = False
                runs.append(run)
                mismatches.append(f"@{res} px ({kind}): ONNX Runtime failed: {str(exc).splitlines()[0]}")
                continue
            run["onnx_shape"] = list(got.shape)
            run["torch_shape"] = list(ref.shape)
            if got.shape != ref.shape:
                run["problems"].append(f"shape {list(got.shape)} != torch {list(ref.shape)}")
            else:
                run.update(_compare(got, ref, tol))
                if run["max_abs_diff"] > run["allowed_abs_diff"] or not np.isfinite(run["max_abs_diff"]):
                    run["problems"].append(
                        f"max abs diff {run['max_abs_diff']:.3g} (relative {run['max_rel_err']:.3g}) > "
                        f"allowed {run['allowed_abs_diff']:.3g} (atol {tol.atol:g} + rtol {tol.rtol:g} x "
                        f"scale {run['output_scale']:.3g})"
                    )
                if run["min_cosine"] < tol.min_cosine:
                    run["problems"].append(f"min cosine {run['min_cosine']:.6f} < {tol.min_cosine}")
                if run["top1_agreement"] < tol.min_top1_agreement:
                    run["problems"].append(f"top-1 agreement {run['top1_agreement']:.3f} < {tol.min_top1_agreement}")
            run["ok"] = not run["problems"]
            runs.append(run)
            mismatches.extend(f"@{res} px ({kind}, {run['images']} images): {p}" for p in run["problems"])

    report = ValidationReport(not mismatches, tol.to_dict(), runs, mismatches)
    if mismatches:
        worst = max(
            (r for r in runs if r.get("max_abs_diff") is not None),
            key=lambda r: r["max_abs_diff"] / max(r["allowed_abs_diff"], 1e-30),
            default=None,
        )
        head = (
            f"largest difference {worst['max_abs_diff']:.3g} (relative {worst['max_rel_err']:.3g}) at "
            f"{worst['resolution']} px; tolerance {worst['allowed_abs_diff']:.3g} = atol {tol.atol:g} + "
            f"rtol {tol.rtol:g} x output scale {worst['output_scale']:.3g}"
            if worst
            else "no values compared"
        )
        raise ExportValidationError(
            f"ONNX file '{path}' does not match torch: {head}. {len(mismatches)} mismatch(es): "
            + "; ".join(mismatches[:8])
            + (" ..." if len(mismatches) > 8 else ""),
            report,
        )
    return report


# --------------------------------------------------------------------------- export


_NOISY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx")


@contextlib.contextmanager
def _quiet_loggers(*names: str, level: int = logging.WARNING):
    """Raise the level of third-party loggers for the duration of a block."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < level:
            lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


def _export_dynamo(model, example, tmp_onnx: str, *, dynamic, input_name, output_name, opset) -> None:
    import torch

    kwargs: dict[str, Any] = {
        "dynamo": True,
        "external_data": False,
        "input_names": [input_name],
        "output_names": [output_name],
    }
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    if dynamic:
        dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
        kwargs["dynamic_shapes"] = (dims,)
    # The dynamo exporter prints progress lines on stdout and its optimizer logs every pass
    # at INFO; keep the prints for the debug log and quieten the loggers while it runs.
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), warnings.catch_warnings(), _quiet_loggers(*_NOISY_LOGGERS):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), tmp_onnx, **kwargs)
    if buf.getvalue().strip():
        log.debug("dynamo exporter output:\n%s", buf.getvalue().strip())


def _export_torchscript(model, example, tmp_onnx: str, *, dynamic, input_name, output_name, opset) -> None:
    import torch

    kwargs: dict[str, Any] = {
        "dynamo": False,
        "input_names": [input_name],
        "output_names": [output_name],
        "do_constant_folding": True,
    }
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    if dynamic:
        kwargs["dynamic_axes"] = {input_name: {0: "batch", 2: "height", 3: "width"}, output_name: {0: "batch"}}
    with warnings.catch_warnings():
        # "legacy TorchScript-based ONNX export" DeprecationWarning: the user chose it.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), tmp_onnx, **kwargs)


def _first_line(exc: BaseException) -> str:
    """One readable line: the exception and its root cause (exporters wrap the real error)."""
    from fixres_deploy.core.utils import strip_ansi

    def line(e: BaseException) -> str:
        text = strip_ansi(str(e)).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")

    root = exc
    seen = {id(exc)}
    while (root.__cause__ or root.__context__) is not None and id(root.__cause__ or root.__context__) not in seen:
        root = root.__cause__ or root.__context__
        seen.add(id(root))
    return line(exc) if root is exc else f"{line(exc)} (caused by {line(root)})"


def _run_exporter(model, example, tmp_onnx, exporter, **kw) -> tuple[str, str | None]:
    """Run the chosen exporter; returns (exporter used, fallback reason)."""
    if exporter not in EXPORTERS:
        raise UserInputError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter in ("dynamo", "auto"):
        try:
            _export_dynamo(model, example, tmp_onnx, **kw)
            return "dynamo", None
        except Exception as exc:  # torch.export raises many types (UserError, ConstraintViolation...)
            reason = _first_line(exc)
            if exporter == "dynamo":
                raise ExportError(
                    f"the dynamo (torch.export) ONNX exporter failed: {reason}. Options: fix the model "
                    "for torch.export, or use the legacy exporter with --exporter torchscript "
                    "(or --exporter auto to try dynamo first). Run with --debug for the traceback."
                ) from exc
            log.warning("dynamo exporter failed (%s); falling back to torchscript (--exporter auto)", reason)
    else:
        reason = None
    try:
        _export_torchscript(model, example, tmp_onnx, **kw)
    except Exception as exc:  # the TorchScript tracer raises many types
        raise ExportError(
            f"the torchscript ONNX exporter failed: {_first_line(exc)}"
            + (f" (the dynamo exporter failed first: {reason})" if reason else "")
        ) from exc
    return "torchscript", reason


def _opset_of(model) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _shape_of(value_info) -> list:
    return [d.dim_param if d.dim_param else int(d.dim_value) for d in value_info.type.tensor_type.shape.dim]


def export_onnx(
    model,
    path: str | os.PathLike,
    cfg: PreprocessConfig,
    *,
    dynamic: bool = False,
    batch_size: int = 1,
    input_name: str = "input",
    output_name: str = "logits",
    exporter: str = "dynamo",
    opset: int | None = None,
    validation_images=None,
    validate_resolutions: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    model_spec: str | None = None,
    tolerance: ValidationTolerance | None = ValidationTolerance(),
    write_sidecar: bool = True,
    reference_models: dict | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Export a torch classifier to ONNX, record its preprocessing, validate it.

    Args:
        model: torch module (exported in eval mode).
        path: output .onnx; written atomically (temp + rename), as one file below 2 GB.
        cfg: the preprocessing; ``cfg.test_input_size`` is the input size K of a fixed
            export and the reference size of a dynamic one.
        dynamic: symbolic axes ``batch``, ``height``, ``width`` (else N x 3 x K x K).
        batch_size: N of a fixed export (ignored when dynamic).
        input_name, output_name: graph tensor names.
        exporter: "dynamo" (default), "torchscript" or "auto" (see module docstring).
        opset: ONNX opset (default: the exporter's).
        validation_images: ImageFolder path / ``ImageFolderIndex`` / list of PIL images;
            None renders a few demo images (pass your own data for a real check).
        validate_resolutions: K values to validate at. Default: K for a fixed export;
            K - 32, K, K + 32 for a dynamic one. A fixed export cannot be validated at
            another resolution (UserInputError).
        class_names: written to the metadata when given.
        model_spec: written to the metadata when given.
        tolerance: a :class:`ValidationTolerance`, or None to skip validation.
        write_sidecar: also write ``<path>.json`` with the :class:`ExportResult`.
        reference_models: ``{resolution: torch module}`` to validate against at each
            resolution instead of ``model`` (the multi-resolution head bank is checked against
            each FixRes checkpoint at its own resolution).
        extra_metadata: further ``metadata_props`` entries.

    Returns:
        The :class:`ExportResult`.

    Raises:
        ExportError: the exporter failed. ExportValidationError: the file does not match
        torch (the file is left in place for inspection, without a sidecar).
    """
    import torch

    onnx = require("onnx", "cpu", "ONNX export")
    path = os.fspath(path)
    k = cfg.test_input_size
    if int(batch_size) < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {batch_size}")
    if validate_resolutions is None:
        validate_resolutions = sorted({max(32, k - 32), k, k + 32}) if dynamic else [k]
    validate_resolutions = sorted({int(r) for r in validate_resolutions})
    if not dynamic and validate_resolutions != [k]:
        others = [r for r in validate_resolutions if r != k]
        raise UserInputError(
            f"a fixed export serves only {k} px but validation was asked at {others}; export with "
            f"--dynamic to serve several resolutions, or validate at {k}"
        )
    if min(validate_resolutions) < 8:
        raise UserInputError(f"validation resolutions must be >= 8, got {validate_resolutions}")

    if isinstance(validation_images, (str, os.PathLike)) and not os.path.isdir(validation_images):
        from fixres_deploy.core.errors import DataError

        raise DataError(
            f"validation image folder '{os.fspath(validation_images)}' does not exist (expected ROOT/<class>/<image>)"
        )

    model.eval()
    # torch.export specializes a batch axis whose example is 1: a dynamic batch needs >= 2.
    n_example = 2 if dynamic else int(batch_size)
    example = torch.zeros(n_example, 3, k, k)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fixres-export-") as tmpdir:
        tmp_onnx = os.path.join(tmpdir, "model.onnx")
        used, fallback = _run_exporter(
            model,
            example,
            tmp_onnx,
            exporter,
            dynamic=dynamic,
            input_name=input_name,
            output_name=output_name,
            opset=opset,
        )
        export_s = time.perf_counter() - t0
        proto = onnx.load(tmp_onnx)  # pulls any external data the exporter wrote into memory
    set_metadata(proto, {**_metadata_for(cfg, class_names, model_spec), **(extra_metadata or {})})
    if os.path.exists(path + ".json"):
        os.unlink(path + ".json")  # a sidecar describes the file beside it: never a stale one
    external = proto.ByteSize() >= PROTOBUF_LIMIT_BYTES - (64 << 20)
    with atomic_path(path) as tmp:
        if external:
            log.warning("model is larger than 2 GB: weights go to %s.data beside the .onnx", path)
            onnx.save(
                proto,
                tmp,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=os.path.basename(path) + ".data",
            )
        else:
            onnx.checker.check_model(proto)
            onnx.save(proto, tmp)
    if not external and os.path.exists(path + ".data"):
        log.warning("removing stale external data file %s (the new export is a single file)", path + ".data")
        os.unlink(path + ".data")

    report = None
    if tolerance is not None:
        batches = validation_batches(validation_images, cfg, validate_resolutions)
        report = validate_onnx(
            path,
            reference_models if reference_models is not None else model,
            batches,
            input_name=input_name,
            output_name=output_name,
            rtol=tolerance.rtol,
            atol=tolerance.atol,
            min_cosine=tolerance.min_cosine,
            min_top1_agreement=tolerance.min_top1_agreement,
        )
        if validation_images is None:
            log.info("validated on rendered demo images; pass validation images like your deployment data")

    result = ExportResult(
        path=path,
        sha256=sha256_file(path),
        size_bytes=os.path.getsize(path),
        resolution=k,
        dynamic=bool(dynamic),
        batch_size=None if dynamic else int(batch_size),
        input_name=input_name,
        output_name=output_name,
        input_shape=_shape_of(proto.graph.input[0]),
        exporter=used,
        opset=_opset_of(proto),
        export_s=round(export_s, 3),
        validation=report.to_dict() if report is not None else None,
        validate_resolutions=validate_resolutions if report is not None else [],
        preprocess=cfg.to_dict(),
        class_names=list(class_names) if class_names else None,
        model_spec=model_spec,
        fallback_reason=fallback,
        external_data=external,
    )
    if write_sidecar:
        write_json(path + ".json", result.to_dict())
    return result


def export_checkpoint(
    loaded,
    out_path: str | os.PathLike,
    cfg: PreprocessConfig,
    *,
    dynamic: bool = False,
    resolutions: Sequence[int] | None = None,
    exporter: str = "dynamo",
    input_name: str = "input",
    output_name: str = "logits",
    validation_data=None,
    batch_size: int = 1,
    opset: int | None = None,
) -> ExportResult:
    """`fixres-deploy export`: export a :class:`~fixres_deploy.models.registry.LoadedModel`.

    The class names and model spec the checkpoint carries go into the ONNX metadata; the
    result is also written to ``<out_path>.json``. See :func:`export_onnx` for the rest.
    """
    return export_onnx(
        loaded.model,
        out_path,
        cfg,
        dynamic=dynamic,
        batch_size=batch_size,
        input_name=input_name,
        output_name=output_name,
        exporter=exporter,
        opset=opset,
        validation_images=validation_data,
        validate_resolutions=resolutions,
        class_names=loaded.class_names,
        model_spec=loaded.spec,
    )
