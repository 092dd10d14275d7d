"""The float parts of a TensorRT-flavored Q/DQ graph in fp16, with fp32 inputs and outputs.

Why: TensorRT builds Q/DQ graphs strongly typed (always in TensorRT 11): every layer without
Q/DQ runs in the type the graph gives it. With fp32 float parts (the first conv and the
classifier kept float, the elementwise ops between quantized convs, the Q/DQ scales) those run
in fp32/TF32 and int8 ends up no faster than fp16. So the TensorRT flavor's float parts are
converted to fp16 here, Q/DQ scales included (fp16 scales need ONNX opset >= 19, so the graph
is upgraded first); graph inputs and outputs stay fp32 (Casts inside).

fp16 cannot hold scales below 2**-24 (and loses precision below 2**-14): per-channel weight
scales of near-zero channels can be that small and would become 0 (a division by zero in
QuantizeLinear). :func:`lift_tiny_scales` raises them to :data:`FP16_MIN_SCALE` first and
re-quantizes the int8 weights behind them, so the dequantized weights keep their values.

ONNX Runtime's CPU graph optimizer mis-fuses these fp16 Q/DQ graphs (measured with ONNX Runtime
1.32 on EfficientNet-Lite0, 300 held-out Imagenette photos: top-1 10.7% at level "all", 97.7%
with optimizations disabled, fp32 97.3%; tools/int8_flavors_photos.py); sessions on them must
run with graph optimizations disabled: :func:`ort_graph_optimization_for`.
"""

from __future__ import annotations

import os

import numpy as np

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FP16_MIN_SCALE = float(2.0**-14)  # smallest normal fp16
FP16_QDQ_MIN_OPSET = 19  # QuantizeLinear/DequantizeLinear accept fp16 scales from opset 19


def _arrays(model) -> dict:
    from onnx import numpy_helper

    return {t.name: (t, numpy_helper.to_array(t)) for t in model.graph.initializer}


def lift_tiny_scales(model, min_scale: float = FP16_MIN_SCALE) -> int:
    """Raise Q/DQ scales below ``min_scale`` to it (in place); returns how many values changed.

    A DequantizeLinear of a constant int8 weight gets its weight re-quantized with the new
    scale (``round(q * old / new)``), so ``q * scale`` stays as close to the original as the
    coarser grid allows; activation Q/DQ pairs share the scale, so both move together.
    """
    from onnx import numpy_helper

    inits = _arrays(model)
    changed = 0
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 2:
            continue
        scale_name = node.input[1]
        if scale_name in done or scale_name not in inits:
            continue
        tensor, scale = inits[scale_name]
        tiny = scale < min_scale
        if not np.any(tiny):
            continue
        new_scale = np.where(tiny, np.float32(min_scale), scale).astype(scale.dtype)
        weight = node.input[0]
        if node.op_type == "DequantizeLinear" and weight in inits:
            wt, q = inits[weight]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            ratio = (scale / new_scale).astype(np.float64)
            if ratio.ndim:  # per-channel: broadcast along the channel axis
                shape = [1] * q.ndim
                shape[axis] = -1
                ratio = ratio.reshape(shape)
            info = np.iinfo(q.dtype)
            q_new = np.clip(np.round(q.astype(np.float64) * ratio), info.min, info.max).astype(q.dtype)
            wt.CopyFrom(numpy_helper.from_array(q_new, weight))
        tensor.CopyFrom(numpy_helper.from_array(new_scale, scale_name))
        changed += int(np.count_nonzero(tiny))
        done.add(scale_name)
    return changed


def default_opset(model) -> int:
    return next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)


def float_parts_to_fp16(model, *, keep_fp32_ops=()):
    """A copy of a Q/DQ model whose float tensors (scales included) are fp16; I/O stays fp32.

    Args:
        model: an int8 Q/DQ ``onnx.ModelProto`` (symmetric s8, fp32 float parts).
        keep_fp32_ops: op types kept in fp32 (numerically sensitive ones, e.g. Softmax).
    """
    import onnx
    from onnx import version_converter

    work = onnx.ModelProto()
    work.CopyFrom(model)
    lift_tiny_scales(work)
    if default_opset(work) < FP16_QDQ_MIN_OPSET:
        work = version_converter.convert_version(work, FP16_QDQ_MIN_OPSET)
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError:  # pragma: no cover - onnxruntime without its transformers tools
        from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    return convert_float_to_float16(
        work,
        keep_io_types=True,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops)),
    )


def is_fp16_qdq(path_or_model) -> bool:
    """Whether a graph has Q/DQ nodes with fp16 scales (the TensorRT int8 flavor's float parts)."""
    import onnx

    model = (
        onnx.load(os.fspath(path_or_model), load_external_data=False)
        if isinstance(path_or_model, (str, os.PathLike))
        else path_or_model
    )
    half = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    return any(n.op_type in QDQ_OPS and len(n.input) > 1 and n.input[1] in half for n in model.graph.node)


def ort_graph_optimization_for(path: str, requested: str) -> str:
    """The ONNX Runtime graph optimization level safe for ``path``: "disable" on fp16 Q/DQ graphs."""
    if requested != "disable" and is_fp16_qdq(path):
        return "disable"
    return requested
