"""Precision variants of an ONNX model: fp32, fp16 and int8, with precision in the graph.

TensorRT 11 builds strongly typed networks only (no FP16/INT8 builder flags, no
calibrators): the precision an engine computes in must be written into the ONNX file.
So each precision is its own ONNX file, built here once and consumed by every backend:

* fp16: the graph converted to float16 with fp32 inputs/outputs and numerically sensitive
  ops kept in fp32 (:data:`FP16_KEEP_FP32_OPS`). NVIDIA ModelOpt AutoCast is used when
  installed, else ONNX Runtime's converter.
* int8: explicit QuantizeLinear/DequantizeLinear (QDQ) from ONNX Runtime's
  ``quantize_static``, in one of two flavors:

  - ``"tensorrt"`` (``s8s8_symmetric``): int8 activations AND weights, symmetric,
    zero-point 0 — the only int8 TensorRT accepts;
  - ``"ort_cpu"`` (``u8s8``): uint8 asymmetric activations, int8 weights — what ONNX
    Runtime's fast int8 kernels want on x86 CPUs (measured on 2 AVX2 cores without VNNI,
    resnet18 at 96 px, batch 8: u8 activations ran at 2.6x the fp32 speed, symmetric s8 at 0.9x).

  Biases stay float in both (``QuantizeBias=False``): otherwise quantize_static adds int32
  DequantizeLinear nodes on Conv/Gemm biases, a type TensorRT has no Q/DQ for.

Calibration ranges are computed by us with ONNX Runtime's calibrators (so that Entropy gets
its real 2048-bin histogram: through ``quantize_static`` it silently equals MinMax) and fed
to ``quantize_static`` through its calibration-cache file. The ranges are cached on disk,
keyed by the fp32 model's sha256, the input resolution, the method, the calibration data's
hash and the symmetry, under ``calibration/cache/`` (or ``$FIXRES_CACHE_DIR``).

The sensitive layers decide most of the int8 accuracy (resnet18 at 96 px on 3,925 held-out
Imagenette photos, symmetric s8: −4.9 top-1 points with every layer quantized, −0.6 with the
first conv and the classifier in float), so by default they stay float
(``float_layers="default"``); :func:`layer_sensitivity` measures it per layer.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fixres_deploy.core.errors import FixResError, UserInputError, require
from fixres_deploy.core.utils import atomic_path, sha256_bytes, sha256_file, stable_hash, write_json

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
# flavor name (what callers pass) -> recorded flavor (what the graph is)
INT8_FLAVORS = {"tensorrt": "s8s8_symmetric", "ort_cpu": "u8s8"}
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_FLOAT_LAYERS = "default"
# Histogram sizes of the entropy calibrator: ORT's create_calibrator defaults to 128/128,
# which makes KL-divergence calibration degenerate to MinMax; TensorRT's entropy
# calibrator uses 2048 bins quantized to 128 levels.
ENTROPY_NUM_BINS = 2048
ENTROPY_NUM_QUANTIZED_BINS = 128
PERCENTILE_NUM_BINS = 2048
CALIBRATION_CHUNK = 16  # images per calibration inference (a fixed-batch model uses its own)
CACHE_ENV = "FIXRES_CACHE_DIR"
DEFAULT_CACHE_DIR = os.path.join("calibration", "cache")
META_PRECISION = "fixres_deploy.precision.variants"
META_INT8_FLAVOR = "fixres_deploy.int8_flavor"
META_FLOAT_LAYERS = "fixres_deploy.float_layers"

# Ops kept in fp32 in fp16 variants, on top of the converter's own list. Reductions and
# exponentials accumulate or amplify rounding (GlobalAveragePool/ReduceMean over a 12x12
# map sums 144 fp16 values; Softmax/Exp overflow above ~11), normalizations divide by small
# variances, and Resize/TopK/Range/CumSum deal in coordinates or indices where fp16's 11-bit
# mantissa is visibly wrong above 2048. Conv/Gemm/elementwise ops — the compute — go fp16.
FP16_KEEP_FP32_OPS = (
    "Softmax",
    "LogSoftmax",
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Erf",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceProd",
    "GlobalAveragePool",
    "GlobalLpPool",
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "LpNormalization",
    "Resize",
    "Upsample",
    "TopK",
    "Range",
    "CumSum",
    "NonMaxSuppression",
    "RoiAlign",
)
# Ops walked through when locating the first conv / the classifier from the graph's ends.
_PASS_THROUGH_OPS = {
    "Identity",
    "Cast",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Softmax",
    "LogSoftmax",
    "Transpose",
}
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


class QuantizationError(FixResError):
    """A quantized graph came out wrong (e.g. a TensorRT-flavor graph with a u8 Q/DQ)."""


# --------------------------------------------------------------------------- result


@dataclass
class PrecisionVariant:
    """One precision variant of an exported ONNX model; saved as ``<path>.json``.

    Attributes:
        path: the variant's .onnx file.
        precision: "fp32", "fp16" or "int8".
        source_onnx: the fp32 ONNX file it was made from.
        sha256: of ``path``.
        build_s: seconds to make it (calibration included unless cached).
        flavor: int8 only: "s8s8_symmetric" (TensorRT) or "u8s8" (ONNX Runtime CPU).
        float_layers: node names kept in float (int8: excluded from quantization; fp16:
            nodes of the fp32-kept op types plus the user's block list).
        calibration: int8 only: method, data hash, manifest set hash, n_images,
            resolution, cache key, cache hit, calibrate_s.
        converter: the tool that wrote it.
        meta: anything else worth keeping (source sha256, options, counts).
    """

    path: str
    precision: str
    source_onnx: str
    sha256: str
    build_s: float
    flavor: str | None = None
    float_layers: list[str] = field(default_factory=list)
    calibration: dict | None = None
    converter: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PrecisionVariant:
        return cls(**d)

    def write_sidecar(self) -> str:
        return write_json(self.path + ".json", self.to_dict())


# --------------------------------------------------------------------------- helpers


def _onnx():
    return require("onnx", "cpu", "ONNX precision variants")


def _ort():
    return require("onnxruntime", "cpu", "ONNX precision variants")


def _check_src(src) -> str:
    src = os.fspath(src)
    if not os.path.isfile(src):
        raise UserInputError(f"ONNX file '{src}' does not exist; export one with `fixres-deploy export`")
    return src


def _graph_inputs(model) -> list:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(value_info) -> list:
    return [d.dim_value if d.dim_value > 0 else None for d in value_info.type.tensor_type.shape.dim]


def _copy_metadata(src_model, dst_model, extra: dict[str, str]) -> None:
    from fixres_deploy.export.onnx_export import set_metadata

    props = {p.key: p.value for p in src_model.metadata_props}
    props.update(extra)
    set_metadata(dst_model, props)


class _DropMessages(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


@contextlib.contextmanager
def _quiet_ort_quantization():
    """Drop quantize_static's "consider pre-processing" warnings (logged on the root logger).

    Our graphs come from the exporters with BatchNorm folded and shapes inferred; ORT's
    optimizer runs at session creation anyway.
    """
    flt = _DropMessages("pre-process", "pre-processing")
    root = logging.getLogger()
    root.addFilter(flt)
    for h in root.handlers:
        h.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)
        for h in root.handlers:
            h.removeFilter(flt)


def _session(path: str):
    from fixres_deploy.precision.qdq_fp16 import is_fp16_qdq

    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if is_fp16_qdq(path):  # ORT CPU's optimizer mis-fuses fp16 Q/DQ graphs (precision/qdq_fp16.py)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own types
        raise QuantizationError(f"ONNX Runtime cannot load '{path}': {str(exc).splitlines()[0]}") from exc


def _run(session, x: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Run a float32 NCHW batch through a one-input session (chunked to a fixed batch)."""
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = fixed or chunk or len(x)
    outs = []
    for start in range(0, len(x), step):
        part = x[start : start + step]
        n = len(part)
        if fixed and n < fixed:
            part = np.concatenate([part, np.repeat(part[-1:], fixed - n, axis=0)])
        outs.append(session.run(None, {inp.name: np.ascontiguousarray(part, dtype=np.float32)})[0][:n])
    return np.concatenate(outs)


def _sample_input(model, session) -> np.ndarray:
    """A deterministic input of the graph's shape (dynamic dims: the recorded resolution)."""
    from fixres_deploy.export.onnx_export import META_PREPROCESS

    meta = {p.key: p.value for p in model.metadata_props}
    k = 64
    if META_PREPROCESS in meta:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            k = int(json.loads(meta[META_PREPROCESS])["test_input_size"])
    shape = session.get_inputs()[0].shape
    dims = [d if isinstance(d, int) else (1 if i == 0 else 3 if i == 1 else k) for i, d in enumerate(shape)]
    return np.random.default_rng(0).standard_normal(dims).astype(np.float32)


def _verify_fp32_io(path: str, model) -> dict:
    """Load ``path`` in ORT CPU, check float32 IO, run one input; returns a few facts."""
    session = _session(path)
    bad = [
        f"{v.name}: {v.type}"
        for v in list(session.get_inputs()) + list(session.get_outputs())
        if v.type != "tensor(float)"
    ]
    if bad:
        raise QuantizationError(f"'{path}' does not have float32 inputs/outputs: {bad}")
    y = session.run(None, {session.get_inputs()[0].name: _sample_input(model, session)})[0]
    if y.dtype != np.float32 or not np.all(np.isfinite(y)):
        raise QuantizationError(f"'{path}' produced {y.dtype} output with non-finite values")
    return {"output_shape": list(y.shape)}


# --------------------------------------------------------------------------- fp32 / fp16


def _autocast_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("modelopt.onnx.autocast") is not None
    except ModuleNotFoundError:  # parent package 'modelopt' missing
        return False


def convert_fp16(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    keep_io_types: bool = True,
    op_block_list: Sequence[str] | None = None,
    node_block_list: Sequence[str] | None = None,
) -> PrecisionVariant:
    """Convert an fp32 ONNX file to fp16 compute with (by default) fp32 inputs and outputs.

    Converter: NVIDIA ModelOpt AutoCast (``modelopt.onnx.autocast``) when importable, the
    tool TensorRT 11's docs point to; else ONNX Runtime's
    ``onnxruntime.transformers.float16`` (else onnxconverter-common).

    Args:
        src, dst: fp32 input and fp16 output paths (dst written atomically, + ``.json``).
        keep_io_types: keep graph inputs/outputs fp32 (Casts inside), so callers never
            change their buffers.
        op_block_list: op types kept in fp32; default :data:`FP16_KEEP_FP32_OPS` (added to
            the converter's own list of ops without fp16 kernels).
        node_block_list: node names kept in fp32.

    On CPUs ONNX Runtime runs fp16 graphs slower than fp32 (it wraps fp32 Conv/Gemm kernels
    in Casts: 1.1-1.6x slower, measured with ONNX Runtime 1.32 on 2 AVX2 cores); on GPUs it is
    the other way round. Measure.
    """
    onnx = _onnx()
    src = _check_src(src)
    dst = os.fspath(dst)
    ops = list(FP16_KEEP_FP32_OPS if op_block_list is None else op_block_list)
    nodes = list(node_block_list or [])
    t0 = time.perf_counter()
    src_model = onnx.load(src)
    if _autocast_available():
        from modelopt.onnx.autocast import convert_to_mixed_precision

        log.info("fp16: converting with NVIDIA ModelOpt AutoCast")
        model = convert_to_mixed_precision(
            onnx_path=src,
            low_precision_type="fp16",
            nodes_to_exclude=nodes or None,
            op_types_to_exclude=ops or None,
            keep_io_types=keep_io_types,
        )
        converter = "modelopt.onnx.autocast"
    else:
        try:
            from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

            converter = "onnxruntime.transformers.float16"
        except ImportError:
            try:
                from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
            except ImportError as exc:
                raise require("onnxruntime.transformers.float16", "cpu", "fp16 conversion") from exc
            converter = "onnxconverter_common.float16"
        log.info("fp16: ModelOpt AutoCast not installed; converting with %s", converter)
        model = convert_float_to_float16(
            onnx.load(src),
            keep_io_types=keep_io_types,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(ops)),
            node_block_list=nodes or None,
        )
    kept = [n.name for n in src_model.graph.node if n.op_type in set(ops) or n.name in set(nodes)]
    n_fp16_inits = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    _copy_metadata(src_model, model, {META_PRECISION: "fp16", META_FLOAT_LAYERS: json.dumps(kept)})
    with atomic_path(dst) as tmp:
        onnx.save(model, tmp)
        facts = _verify_fp32_io(tmp, model) if keep_io_types else {}
    variant = PrecisionVariant(
        path=dst,
        precision="fp16",
        source_onnx=src,
        sha256=sha256_file(dst),
        build_s=round(time.perf_counter() - t0, 3),
        flavor=None,
        float_layers=kept,
        calibration=None,
        converter=converter,
        meta={
            "source_sha256": sha256_file(src),
            "keep_io_types": keep_io_types,
            "op_block_list": ops,
            "node_block_list": nodes,
            "fp16_initializers": n_fp16_inits,
            **facts,
        },
    )
    variant.write_sidecar()
    return variant


def _copy_fp32(src: str, dst: str) -> PrecisionVariant:
    t0 = time.perf_counter()
    if os.path.abspath(src) != os.path.abspath(dst):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    variant = PrecisionVariant(
        path=dst,
        precision="fp32",
        source_onnx=src,
        sha256=sha256_file(dst),
        build_s=round(time.perf_counter() - t0, 3),
        converter="copy",
        meta={"source_sha256": sha256_file(src)},
    )
    variant.write_sidecar()
    return variant


# --------------------------------------------------------------------------- int8: graph facts


def _producers(model) -> dict[str, Any]:
    return {o: n for n in model.graph.node for o in n.output}


def _consumers(model) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def default_float_layers(model_or_path) -> list[str]:
    """The first Conv (fed by the graph input) and the classifier (Gemm/MatMul feeding the output).

    These two decide most of the int8 accuracy loss of a CNN classifier: the first conv sees
    raw normalized pixels with few channels (per-channel ranges do not help it), the
    classifier's logits are the result.
    """
    onnx = _onnx()
    model = (
        onnx.load(os.fspath(model_or_path), load_external_data=False)
        if isinstance(model_or_path, (str, os.PathLike))
        else model_or_path
    )
    consumers = _consumers(model)
    producers = _producers(model)
    names: list[str] = []
    # forward from the input through pass-through ops to the first Conv
    frontier = [i.name for i in _graph_inputs(model)]
    seen = set()
    first_conv = None
    while frontier and first_conv is None:
        nxt = []
        for t in frontier:
            for n in consumers.get(t, []):
                if n.name in seen:
                    continue
                seen.add(n.name)
                if n.op_type == "Conv":
                    first_conv = n
                    break
                if n.op_type in _PASS_THROUGH_OPS | {"Sub", "Div", "Mul", "Add", "Pad"}:
                    nxt.extend(n.output)
            if first_conv is not None:
                break
        frontier = nxt
    if first_conv is not None:
        names.append(first_conv.name)
    else:
        log.warning("no Conv found downstream of the graph input; the first-layer default is skipped")
    # backward from the output through pass-through ops to Gemm / MatMul(+Add)
    for out in model.graph.output:
        node = producers.get(out.name)
        while node is not None and node.op_type in _PASS_THROUGH_OPS:
            node = producers.get(node.input[0])
        if node is None:
            continue
        if node.op_type == "Add":
            mm = [
                producers.get(i)
                for i in node.input
                if producers.get(i) is not None and producers[i].op_type == "MatMul"
            ]
            if mm:
                names.extend([mm[0].name, node.name])
                continue
        if node.op_type in ("Gemm", "MatMul"):
            names.append(node.name)
        else:
            log.warning("the graph output is produced by %s, not Gemm/MatMul: no classifier default", node.op_type)
    if any(not n for n in names):
        raise QuantizationError("a default float layer has no node name; name the graph's nodes (re-export)")
    return list(dict.fromkeys(names))


def _resolve_float_layers(model, float_layers) -> list[str]:
    if float_layers is None:
        return []
    if isinstance(float_layers, str):
        if float_layers != DEFAULT_FLOAT_LAYERS:
            raise UserInputError(f"float_layers must be 'default', None or a list of node names, got {float_layers!r}")
        return default_float_layers(model)
    names = list(float_layers)
    known = {n.name for n in model.graph.node}
    unknown = [n for n in names if n not in known]
    if unknown:
        convs = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")][:8]
        raise UserInputError(f"float layers {unknown} are not nodes of the graph; e.g. {convs}")
    return names


def _quantizable_op_types() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


# --------------------------------------------------------------------------- int8: calibration


class _BatchReader:
    """An ORT CalibrationDataReader over a slice of a float32 NCHW array."""

    def __init__(self, name: str, x: np.ndarray, step: int, fixed: int | None):
        self.name, self.x, self.step, self.fixed = name, x, step, fixed
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.x):
            return None
        part = self.x[self.pos : self.pos + self.step]
        self.pos += self.step
        if self.fixed and len(part) < self.fixed:
            part = np.concatenate([part, np.repeat(part[-1:], self.fixed - len(part), axis=0)])
        return {self.name: np.ascontiguousarray(part, dtype=np.float32)}

    def __len__(self):
        return -(-len(self.x) // self.step)


def compute_calibration_ranges(
    src: str | os.PathLike,
    batches: np.ndarray,
    *,
    method: str = "minmax",
    symmetric: bool = False,
    percentile: float = 99.999,
    num_bins: int | None = None,
):
    """Activation ranges of every quantizable tensor, with ONNX Runtime's calibrators.

    Unlike ``quantize_static(calibrate_method=Entropy)``, whose histogram defaults cannot be
    changed, Entropy here uses :data:`ENTROPY_NUM_BINS` bins quantized to
    :data:`ENTROPY_NUM_QUANTIZED_BINS` levels (TensorRT's entropy-calibrator setting).

    Args:
        src: fp32 ONNX file.
        batches: float32 (N, 3, K, K) preprocessed calibration images.
        method: "minmax", "percentile" or "entropy".
        symmetric: symmetric ranges (TensorRT flavor) for the histogram methods.
        percentile: percentile of |x| kept by "percentile".
        num_bins: histogram bins (default 2048 for entropy/percentile).

    Returns:
        ``onnxruntime.quantization.calibrate.TensorsData``.
    """
    from onnxruntime.quantization import calibrate as ort_calib

    onnx = _onnx()
    model = onnx.load(os.fspath(src), load_external_data=False)
    inp = _graph_inputs(model)[0]
    fixed = _dims(inp)[0]
    step = fixed or CALIBRATION_CHUNK
    if method == "minmax":
        cm = ort_calib.CalibrationMethod.MinMax
        # Not "max_intermediate_outputs": in onnxruntime 1.32 MinMaxCalibrater drops the
        # outputs collected so far when that count is reached (clear without compute).
        # Memory stays bounded because each collect_data call below merges its group.
        opts = {"symmetric": symmetric}
    elif method == "entropy":
        cm = ort_calib.CalibrationMethod.Entropy
        opts = {
            "symmetric": symmetric,
            "num_bins": num_bins or ENTROPY_NUM_BINS,
            "num_quantized_bins": ENTROPY_NUM_QUANTIZED_BINS,
        }
    elif method == "percentile":
        cm = ort_calib.CalibrationMethod.Percentile
        opts = {"symmetric": symmetric, "num_bins": num_bins or PERCENTILE_NUM_BINS, "percentile": float(percentile)}
    else:
        raise UserInputError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    with tempfile.TemporaryDirectory(prefix="fixres-calib-") as tmpdir:
        calibrator = ort_calib.create_calibrator(
            Path(os.fspath(src)),
            _quantizable_op_types(),
            augmented_model_path=os.path.join(tmpdir, "augmented.onnx"),
            calibrate_method=cm,
            extra_options=opts,
        )
        # Feed batch by batch: each collect_data call folds its batch into the ranges or
        # histograms, instead of holding every intermediate tensor of every image in memory.
        # The histogram calibrators print progress on stdout: keep it for the debug log.
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            for group in batches if isinstance(batches, list) else [batches]:
                for start in range(0, len(group), step):
                    # One batch per call: ORT's HistogramCollector stacks a call's batches with
                    # np.asarray and fails on a shorter last batch.
                    calibrator.collect_data(_BatchReader(inp.name, group[start : start + step], step, fixed))
            ranges = calibrator.compute_data()
        if buf.getvalue().strip():
            log.debug("calibrator output:\n%s", buf.getvalue().strip())
        del calibrator
    return ranges


def calibration_cache_dir(cache=None) -> Path | None:
    """Where calibration ranges are cached: ``cache`` (a folder), $FIXRES_CACHE_DIR, or
    ``calibration/cache`` under the current directory. ``cache=False`` disables it."""
    if cache is False:
        return None
    if cache is None or cache is True:
        return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)
    return Path(os.fspath(cache))


_RANGE_ATTRS = ("lowest", "highest", "avg", "std")


def _ranges_only(ranges):
    """Drop the histograms (2048 bins per tensor): the quantizer reads only the ranges."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    data = {
        name: TensorData(**{k: getattr(td, k) for k in _RANGE_ATTRS if hasattr(td, k)}) for name, td in ranges.items()
    }
    return TensorsData(ranges.calibration_method, data)


def _save_ranges(ranges, path: str, key_fields: dict) -> None:
    from onnxruntime.quantization.calibrate import CalibrationCacheEncoder

    payload = _ranges_only(ranges).to_dict()
    payload["smooth_quant"] = False
    payload["fixres_deploy"] = key_fields
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, cls=CalibrationCacheEncoder)


def _load_ranges(path: str, key_fields: dict):
    from onnxruntime.quantization.calibrate import TensorsData

    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("fixres_deploy") != json.loads(json.dumps(key_fields)):
            return None
        return TensorsData.from_dict(raw)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable calibration cache %s (%s)", path, exc)
        return None


def _calibration(
    src: str,
    batches: np.ndarray,
    *,
    method: str,
    symmetric: bool,
    percentile: float,
    cache,
    set_hash: str | None,
    flavor: str,
) -> tuple[Any, dict]:
    """Ranges (from the cache when possible) and the record of how they were made."""
    import onnxruntime

    groups = batches if isinstance(batches, list) else [batches]
    key_fields = {
        "format": 1,
        "model_sha256": sha256_file(src),
        "resolution": [int(batches.shape[2]), int(batches.shape[3])]
        if not isinstance(batches, list)
        else [[int(g.shape[2]), int(g.shape[3])] for g in groups],
        "method": method,
        "percentile": float(percentile) if method == "percentile" else None,
        "num_bins": ENTROPY_NUM_BINS
        if method == "entropy"
        else PERCENTILE_NUM_BINS
        if method == "percentile"
        else None,
        "data_sha256": sha256_bytes(b"".join(np.ascontiguousarray(g, dtype=np.float32).tobytes() for g in groups)),
        "n_images": sum(len(g) for g in groups),
        "symmetric": bool(symmetric),
        "flavor": flavor,
        "onnxruntime": onnxruntime.__version__,
    }
    key = stable_hash(key_fields)
    record = {
        "method": method,
        "set_hash": set_hash,
        "data_sha256": key_fields["data_sha256"],
        "n_images": key_fields["n_images"],
        "resolution": int(groups[0].shape[2]) if len(groups) == 1 else [int(g.shape[2]) for g in groups],
        "symmetric": bool(symmetric),
        "cache_key": key,
        "cache_file": None,
        "cache_hit": False,
        "calibrate_s": 0.0,
    }
    if method == "percentile":
        record["percentile"] = float(percentile)
    if method in ("entropy", "percentile"):
        record["num_bins"] = key_fields["num_bins"]
    folder = calibration_cache_dir(cache)
    path = str(folder / f"ranges-{method}-{key[:24]}.json") if folder is not None else None
    if path and os.path.isfile(path):
        ranges = _load_ranges(path, key_fields)
        if ranges is not None:
            record.update(cache_file=path, cache_hit=True)
            log.info("int8: reusing calibration ranges %s", path)
            return ranges, record
    t0 = time.perf_counter()
    ranges = compute_calibration_ranges(src, batches, method=method, symmetric=symmetric, percentile=percentile)
    record["calibrate_s"] = round(time.perf_counter() - t0, 3)
    if path:
        _save_ranges(ranges, path, key_fields)
        record["cache_file"] = path
    return ranges, record


def _quantize_with_ranges(
    src: str,
    dst: str,
    ranges,
    *,
    method: str,
    flavor: str,
    per_channel: bool,
    nodes_to_exclude: list[str],
    nodes_to_quantize: list[str] | None = None,
    reduce_range: bool = False,
) -> None:
    """quantize_static in QDQ format with precomputed ranges (its calibration-cache file)."""
    import inspect

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cm = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    if ranges.calibration_method != cm:  # ORT refuses a cache made by another method
        from onnxruntime.quantization.calibrate import TensorsData

        ranges = TensorsData(cm, dict(ranges.data))
    symmetric_act = flavor == "tensorrt"
    extra = {
        "ActivationSymmetric": symmetric_act,
        "WeightSymmetric": True,
        # No int32 bias Q/DQ: TensorRT's quantized types are INT8/INT4/FP8/FP4 only.
        "QuantizeBias": False,
    }
    act_type = QuantType.QInt8 if symmetric_act else QuantType.QUInt8
    kwargs = dict(
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        reduce_range=reduce_range,
        activation_type=act_type,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(nodes_to_exclude),
        nodes_to_quantize=list(nodes_to_quantize or []),
        calibrate_method=cm,
        extra_options=extra,
    )
    with tempfile.TemporaryDirectory(prefix="fixres-quant-") as tmpdir, _quiet_ort_quantization():
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            cache_file = os.path.join(tmpdir, "ranges.json")
            _save_ranges(ranges, cache_file, {})
            quantize_static(src, dst, None, calibration_cache_path=cache_file, **kwargs)
        else:  # onnxruntime < 1.32: no cache parameter; drive its QDQ quantizer directly
            from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
            from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

            model = load_model_with_shape_infer(Path(src))
            quantizer = QDQQuantizer(
                model,
                per_channel,
                reduce_range,
                QuantType.QInt8,
                act_type,
                ranges,
                kwargs["nodes_to_quantize"],
                kwargs["nodes_to_exclude"],
                _quantizable_op_types(),
                extra,
            )
            quantizer.quantize_model()
            quantizer.model.save_model_to_file(dst, False)


def _normalize_flavor(flavor: str) -> str:
    reverse = {v: k for k, v in INT8_FLAVORS.items()}
    flavor = reverse.get(flavor, flavor)
    if flavor not in INT8_FLAVORS:
        raise UserInputError(f"int8 flavor must be one of {sorted(INT8_FLAVORS)}, got {flavor!r}")
    return flavor


def _check_batches(batches, model, src: str):
    """One float32 (N, 3, K, K) array, or a list of them at several resolutions (a mix for a
    dynamic-resolution graph: each array is fed on its own, the ranges cover all)."""
    if isinstance(batches, (list, tuple)) and batches and all(np.ndim(b) == 4 for b in batches):
        if len(batches) == 1:
            return _check_batches(batches[0], model, src)
        return [_check_batches(b, model, src) for b in batches]
    if batches is None:
        raise UserInputError(
            "int8 needs calibration images: pass --calibration-data (a manifest from "
            "`fixres-deploy calibration` or an image folder)"
        )
    batches = np.asarray(batches)
    if batches.ndim != 4 or batches.shape[1] != 3 or len(batches) < 1:
        raise UserInputError(f"calibration batches must be float32 (N, 3, K, K), got shape {batches.shape}")
    if not np.all(np.isfinite(batches)):
        raise UserInputError("calibration batches contain NaN/inf")
    dims = _dims(_graph_inputs(model)[0])
    for axis, name in ((2, "height"), (3, "width")):
        if dims[axis] is not None and dims[axis] != batches.shape[axis]:
            raise UserInputError(
                f"calibration images are {batches.shape[2]}x{batches.shape[3]} px but '{src}' has a fixed "
                f"{name} of {dims[axis]}; calibrate at the deployment resolution (the model's input size)"
            )
    return np.ascontiguousarray(batches, dtype=np.float32)


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration_batches: np.ndarray,
    *,
    flavor: str = "tensorrt",
    method: str = "minmax",
    per_channel: bool = True,
    float_layers: str | Sequence[str] | None = DEFAULT_FLOAT_LAYERS,
    percentile: float = 99.999,
    cache=None,
    reduce_range: bool = False,
    calibration_set_hash: str | None = None,
    nodes_to_quantize: Sequence[str] | None = None,
    write_sidecar: bool = True,
    fp16_float_parts: bool | None = None,
) -> PrecisionVariant:
    """Quantize an fp32 ONNX file to an int8 QDQ graph (see module docstring for flavors).

    Args:
        src, dst: fp32 input, int8 output (dst written atomically, + ``.json`` sidecar).
        calibration_batches: float32 (N, 3, K, K), eval transform at the deployment
            resolution (:func:`fixres_deploy.precision.calibration.calibration_batches`); or a
            list of such arrays at several resolutions (a dynamic-resolution graph served at
            all of them: ranges cover the mix).
        flavor: "tensorrt" (s8 symmetric activations and weights, zero-point 0) or
            "ort_cpu" (u8 asymmetric activations, s8 weights).
        method: "minmax", "percentile" or "entropy" (real 2048-bin KL; slow: ~1 s per
            tensor on two cores).
        per_channel: per-output-channel weight scales.
        float_layers: "default" (first conv + classifier, :func:`default_float_layers`),
            a list of node names, or None (quantize everything).
        percentile: for method "percentile".
        cache: calibration-range cache folder; None → $FIXRES_CACHE_DIR or
            ``calibration/cache``; False → no cache.
        reduce_range: 7-bit weights (ORT's advice for u8s8 on CPUs without VNNI, where the
            AVX2 kernel can saturate); off by default so the graph is machine-independent.
        calibration_set_hash: the manifest's set_hash, recorded (the cache key uses the
            hash of the preprocessed data itself).
        nodes_to_quantize: quantize only these nodes (layer-sensitivity studies).
        write_sidecar: write ``<dst>.json``.
        fp16_float_parts: the graph's float parts (float layers, scales, elementwise ops) in
            fp16 with fp32 I/O (precision/qdq_fp16.py); default: True for the TensorRT flavor,
            whose strongly typed build would otherwise run them in fp32.

    Raises:
        UserInputError: bad flavor/method/float layers, or batches that do not fit.
        QuantizationError: the result violates the flavor's contract (a bug, not your input).
    """
    onnx = _onnx()
    src = _check_src(src)
    dst = os.fspath(dst)
    flavor = _normalize_flavor(flavor)
    if method not in CALIBRATION_METHODS:
        raise UserInputError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    src_model = onnx.load(src)
    batches = _check_batches(calibration_batches, src_model, src)
    floats = _resolve_float_layers(src_model, float_layers)
    t0 = time.perf_counter()
    symmetric = flavor == "tensorrt"
    half_floats = symmetric if fp16_float_parts is None else bool(fp16_float_parts)
    ranges, record = _calibration(
        src,
        batches,
        method=method,
        symmetric=symmetric,
        percentile=percentile,
        cache=cache,
        set_hash=calibration_set_hash,
        flavor=flavor,
    )
    with atomic_path(dst) as tmp:
        _quantize_with_ranges(
            src,
            tmp,
            ranges,
            method=method,
            flavor=flavor,
            per_channel=per_channel,
            nodes_to_exclude=floats,
            nodes_to_quantize=list(nodes_to_quantize or []),
            reduce_range=reduce_range,
        )
        model = onnx.load(tmp)
        if half_floats:
            from fixres_deploy.precision.qdq_fp16 import float_parts_to_fp16

            model = float_parts_to_fp16(model, keep_fp32_ops=FP16_KEEP_FP32_OPS)
        _copy_metadata(
            src_model,
            model,
            {META_PRECISION: "int8", META_INT8_FLAVOR: INT8_FLAVORS[flavor], META_FLOAT_LAYERS: json.dumps(floats)},
        )
        onnx.save(model, tmp)
        problems = check_tensorrt_qdq(model) if flavor == "tensorrt" else _int32_qdq(model)
        if problems:
            raise QuantizationError(f"int8 {flavor} graph of '{src}' is not valid: " + "; ".join(problems[:5]))
        session = _session(tmp)
        first = batches[0] if isinstance(batches, list) else batches
        y = _run(session, first[: max(1, min(4, len(first)))])
        if not np.all(np.isfinite(y)):
            raise QuantizationError(f"int8 graph of '{src}' produces non-finite outputs")
    counts = {op: sum(1 for n in model.graph.node if n.op_type == op) for op in ("QuantizeLinear", "DequantizeLinear")}
    variant = PrecisionVariant(
        path=dst,
        precision="int8",
        source_onnx=src,
        sha256=sha256_file(dst),
        build_s=round(time.perf_counter() - t0, 3),
        flavor=INT8_FLAVORS[flavor],
        float_layers=floats,
        calibration=record,
        converter="onnxruntime.quantization.quantize_static",
        meta={
            "source_sha256": sha256_file(src),
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "activation_type": "int8" if symmetric else "uint8",
            "weight_type": "int8",
            "quantize_bias": False,
            "float_parts": "fp16" if half_floats else "fp32",
            "qdq_counts": counts,
        },
    )
    if write_sidecar:
        variant.write_sidecar()
    return variant


# --------------------------------------------------------------------------- int8: checks


def _initializer_arrays(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:  # Constant nodes count too
        if n.op_type == "Constant" and n.attribute:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _int32_qdq(model) -> list[str]:
    consts = _initializer_arrays(model)
    problems = []
    for n in model.graph.node:
        if n.op_type in _QDQ_OPS:
            for name in list(n.input[:1]) + list(n.input[2:3]):
                arr = consts.get(name)
                if arr is not None and arr.dtype == np.int32:
                    problems.append(
                        f"{n.op_type} '{n.name}' has an int32 {'input' if name == n.input[0] else 'zero point'} "
                        "(bias quantization; TensorRT has no int32 Q/DQ)"
                    )
    return problems


def check_tensorrt_qdq(path_or_model) -> list[str]:
    """Problems that keep TensorRT from building an int8 QDQ graph; [] means OK.

    Checked on every QuantizeLinear/DequantizeLinear: the zero point exists, is int8 and
    all zeros (symmetric; no uint8/asymmetric activations); no int32 Q/DQ (quantized bias);
    weights feeding a DequantizeLinear are int8.
    """
    onnx = _onnx()
    model = onnx.load(os.fspath(path_or_model)) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    consts = _initializer_arrays(model)
    problems = _int32_qdq(model)
    for n in model.graph.node:
        if n.op_type not in _QDQ_OPS:
            continue
        if len(n.input) < 3 or not n.input[2]:
            problems.append(f"{n.op_type} '{n.name}' has no zero point (defaults to uint8)")
            continue
        zp = consts.get(n.input[2])
        if zp is None:
            problems.append(f"{n.op_type} '{n.name}' zero point '{n.input[2]}' is not a constant")
            continue
        if zp.dtype == np.int32:
            continue  # reported by _int32_qdq
        if zp.dtype != np.int8:
            problems.append(f"{n.op_type} '{n.name}' zero point is {zp.dtype} (asymmetric u8); TensorRT needs int8")
        elif np.any(zp != 0):
            problems.append(
                f"{n.op_type} '{n.name}' zero point is {zp.ravel()[:4].tolist()} (asymmetric); TensorRT needs 0"
            )
        if n.op_type == "DequantizeLinear":
            w = consts.get(n.input[0])
            if w is not None and w.dtype not in (np.int8,):
                problems.append(f"DequantizeLinear '{n.name}' dequantizes {w.dtype} weights; TensorRT needs int8")
    return problems


# --------------------------------------------------------------------------- sensitivity


@dataclass
class SensitivityReport:
    """Per-layer int8 sensitivity and the smallest float set meeting an accuracy budget.

    Attributes:
        fp32_top1: top-1 of the fp32 model on the evaluation images (ORT CPU).
        n_eval: number of evaluation images.
        per_layer: [{"node", "op_type", "top1", "drop_pts"}] with only that node quantized.
        all_quantized_drop_pts: drop with every candidate quantized.
        greedy_path: [{"float_layers", "top1", "drop_pts"}] as layers go back to float, most
            sensitive first.
        chosen_float_layers: the first set on the path within the budget (or the last tried).
        final_drop_pts: drop of the chosen set. met_budget: final_drop_pts <= budget_pts.
    """

    flavor: str
    method: str
    budget_pts: float
    fp32_top1: float
    n_eval: int
    per_layer: list[dict]
    all_quantized_drop_pts: float
    greedy_path: list[dict]
    chosen_float_layers: list[str]
    final_drop_pts: float
    met_budget: bool
    calibration: dict | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SensitivityReport:
        return cls(**d)


def layer_sensitivity(
    src: str | os.PathLike,
    calibration_batches: np.ndarray,
    eval_batches: np.ndarray,
    eval_labels: np.ndarray,
    *,
    flavor: str = "tensorrt",
    method: str = "minmax",
    candidates: Sequence[str] | None = None,
    budget_pts: float = 1.0,
    per_channel: bool = True,
    cache=None,
    max_steps: int | None = None,
) -> SensitivityReport:
    """Which layers must stay float for int8 to cost at most ``budget_pts`` top-1 points?

    1. Each candidate is quantized alone (the rest float): its top-1 drop vs fp32.
    2. Greedy: everything quantized, then the most sensitive layers go back to float one at
       a time until the drop is within the budget.

    One calibration (cached) serves every variant; each variant is a quantize_static with
    fixed ranges plus one ORT pass over ``eval_batches`` (held-out images, not the
    calibration ones). With a few hundred evaluation images one image is ~0.3 points: keep
    the budget above the noise.

    Args:
        src: fp32 ONNX file.
        calibration_batches: float32 (N, 3, K, K) calibration images.
        eval_batches, eval_labels: held-out images and their integer labels.
        flavor, method: as in :func:`quantize_int8`.
        candidates: node names to study; default every Conv/Gemm/MatMul.
        budget_pts: allowed top-1 drop in percentage points.
        max_steps: stop the greedy walk after this many layers (default: all candidates).
    """
    onnx = _onnx()
    src = _check_src(src)
    flavor = _normalize_flavor(flavor)
    t_start = time.perf_counter()
    model = onnx.load(src)
    batches = _check_batches(calibration_batches, model, src)
    eval_batches = np.ascontiguousarray(eval_batches, dtype=np.float32)
    eval_labels = np.asarray(eval_labels).astype(np.int64)
    if len(eval_batches) != len(eval_labels) or len(eval_labels) == 0:
        raise UserInputError(
            f"eval_batches ({len(eval_batches)}) and eval_labels ({len(eval_labels)}) must match and be non-empty"
        )
    op_of = {n.name: n.op_type for n in model.graph.node}
    if candidates is None:
        candidates = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    else:
        candidates = _resolve_float_layers(model, list(candidates))
    if not candidates:
        raise UserInputError(f"'{src}' has no Conv/Gemm/MatMul nodes to study")
    ranges, record = _calibration(
        src,
        batches,
        method=method,
        symmetric=flavor == "tensorrt",
        percentile=99.999,
        cache=cache,
        set_hash=None,
        flavor=flavor,
    )

    def top1(path: str) -> float:
        logits = _run(_session(path), eval_batches, chunk=CALIBRATION_CHUNK)
        return float((logits.argmax(1) == eval_labels).mean())

    fp32 = top1(src)
    with tempfile.TemporaryDirectory(prefix="fixres-sens-") as tmpdir:
        qpath = os.path.join(tmpdir, "q.onnx")

        def quantized_top1(exclude: list[str], only: list[str] | None = None) -> float:
            _quantize_with_ranges(
                src,
                qpath,
                ranges,
                method=method,
                flavor=flavor,
                per_channel=per_channel,
                nodes_to_exclude=exclude,
                nodes_to_quantize=only,
            )
            return top1(qpath)

        per_layer = []
        for name in candidates:
            acc = quantized_top1([], only=[name])
            per_layer.append(
                {"node": name, "op_type": op_of.get(name), "top1": acc, "drop_pts": round(100 * (fp32 - acc), 4)}
            )
        order = [d["node"] for d in sorted(per_layer, key=lambda d: -d["drop_pts"])]
        floats: list[str] = []
        acc = quantized_top1([])
        all_drop = round(100 * (fp32 - acc), 4)
        path = [{"float_layers": [], "top1": acc, "drop_pts": all_drop}]
        steps = len(order) if max_steps is None else min(len(order), int(max_steps))
        for name in order[:steps]:
            if path[-1]["drop_pts"] <= budget_pts:
                break
            floats = floats + [name]
            acc = quantized_top1(floats)
            path.append({"float_layers": list(floats), "top1": acc, "drop_pts": round(100 * (fp32 - acc), 4)})
    within = [p for p in path if p["drop_pts"] <= budget_pts]
    chosen = within[0] if within else path[-1]
    return SensitivityReport(
        flavor=INT8_FLAVORS[flavor],
        method=method,
        budget_pts=float(budget_pts),
        fp32_top1=fp32,
        n_eval=len(eval_labels),
        per_layer=per_layer,
        all_quantized_drop_pts=all_drop,
        greedy_path=path,
        chosen_float_layers=list(chosen["float_layers"]),
        final_drop_pts=chosen["drop_pts"],
        met_budget=bool(within),
        calibration=record,
        seconds=round(time.perf_counter() - t_start, 2),
    )


# --------------------------------------------------------------------------- dispatch


def make_precision_variant(
    onnx_path: str | os.PathLike,
    precision: str,
    out_path: str | os.PathLike,
    *,
    calibration_batches: np.ndarray | None = None,
    flavor: str = "tensorrt",
    method: str = "minmax",
    float_layers: str | Sequence[str] | None = DEFAULT_FLOAT_LAYERS,
    cache=None,
    calibration_set_hash: str | None = None,
) -> PrecisionVariant:
    """The precision variant an engine builder needs: fp32 (copy), fp16 or int8.

    Raises:
        UserInputError: unknown precision, or int8 without calibration images (the message
            names ``--calibration-data``).
    """
    src = _check_src(onnx_path)
    out = os.fspath(out_path)
    if precision == "fp32":
        return _copy_fp32(src, out)
    if precision == "fp16":
        return convert_fp16(src, out)
    if precision == "int8":
        if calibration_batches is None:
            raise UserInputError(
                f"int8 needs calibration images to build '{out}': pass --calibration-data (a manifest made "
                "with `fixres-deploy calibration --data DIR --out calibration/NAME.json`, or an image folder)"
            )
        return quantize_int8(
            src,
            out,
            calibration_batches,
            flavor=flavor,
            method=method,
            float_layers=float_layers,
            cache=cache,
            calibration_set_hash=calibration_set_hash,
        )
    raise UserInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def default_int8_flavor(backend: str, *, device: str = "cpu") -> str:
    """The int8 flavor to build for a backend.

    * TensorRT (and ONNX Runtime on a GPU): "tensorrt" — TensorRT accepts only symmetric
      int8 with zero-point 0.
    * ONNX Runtime on a CPU: "ort_cpu" (u8 activations, s8 weights), with or without VNNI.
      Measured (tools/bench_engines.py, resnet18 on Imagenette, ONNX Runtime 1.32, 2 threads)
      on a Xeon *with* AVX512-VNNI: symmetric s8 ran at 0.51-0.93x the fp32 speed, u8s8 at
      1.36-2.36x; on an AVX2 EPYC without VNNI it was the same (0.9x vs 2.6x). ONNX
      Runtime's fast x86 int8 GEMM path is built around u8 x s8 products.
    """
    if backend == "tensorrt" or device != "cpu":
        return "tensorrt"
    return "ort_cpu"
