"""Work per image from the ONNX graph, at any input resolution: how much did we ask for?

A latency alone does not say whether an engine is good: "12 ms" is fast for 3.6 GFLOPs and
slow for 0.3. With the FLOPs per image, a latency becomes an achieved GFLOP/s that can be set
against the machine's peak (:func:`fixres_deploy.measure.bench.measure_peak_gflops`), and the
resolution trade-off becomes explicit: the work grows with K_test squared.

Method: fix the input to (N, C, K, K) on a copy of the graph (N = the graph's fixed batch,
else 1), run ONNX shape inference, then sum per node:

    Conv            2 x Cout x Hout x Wout x Cin/groups x kH x kW  (+1 per output for a bias)
    ConvTranspose   2 x Cin x Hin x Win x Cout/groups x kH x kW    (+1 per output for a bias)
    Gemm / MatMul   2 x M x N x K                                   (+M x N for Gemm's C)
    other compute   1 per output element (activations, Add/Mul, BatchNormalization, pools,
                    Softmax, Resize, ...); global pools and reductions: 1 per *input* element
                    (a 512x7x7 average is 25k additions, not 512)
    free            0: data movement (Reshape, Flatten, Transpose, Concat, Slice, Gather, ...)
                    and precision plumbing (Cast, QuantizeLinear, DequantizeLinear)

Precision variants of one model count the same: a Conv between DequantizeLinear nodes is still
that Conv, QLinearConv / ConvInteger / QLinearMatMul / MatMulInteger / com.microsoft QGemm /
FusedConv are counted as their float ops, and fp16 Casts are free. (ONNX Runtime's QDQ
quantizer drops a Relu that follows a quantized Conv, so an int8 graph's "other" can be a
little lower; conv and gemm are identical.)

Totals are per image: the graph's batch is divided out.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from fixres_deploy.core.errors import UserInputError

# op_type -> (data input index, weight input index, bias input index or None)
_CONV_OPS = {
    "Conv": (0, 1, 2),
    "FusedConv": (0, 1, 2),  # com.microsoft, after ORT graph fusion
    "ConvInteger": (0, 1, None),
    "QLinearConv": (0, 3, 8),
}
# op_type -> (A index, B index, C/bias index or None)
_MATMUL_OPS = {
    "MatMul": (0, 1, None),
    "MatMulInteger": (0, 1, None),
    "QLinearMatMul": (0, 3, None),
    "FusedMatMul": (0, 1, None),  # com.microsoft
}
_GEMM_OPS = {
    "Gemm": (0, 1, 2),
    "QGemm": (0, 3, 6),  # com.microsoft
}
_FREE_OPS = frozenset(
    {
        "Reshape",
        "Flatten",
        "Transpose",
        "Shape",
        "Size",
        "Gather",
        "GatherElements",
        "GatherND",
        "Concat",
        "Split",
        "Slice",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Constant",
        "ConstantOfShape",
        "Cast",
        "CastLike",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "Expand",
        "Tile",
        "Pad",
        "Range",
        "NonZero",
        "Dropout",
        "SpaceToDepth",
        "DepthToSpace",
        "Optional",
        "OptionalGetElement",
        "SequenceConstruct",
        "ScatterND",
        "ScatterElements",
    }
)
# reductions whose cost is the input size, not the (tiny) output size
_INPUT_COST_OPS = frozenset(
    {
        "GlobalAveragePool",
        "GlobalMaxPool",
        "GlobalLpPool",
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSumExp",
        "ReduceSumSquare",
        "ArgMax",
        "ArgMin",
    }
)


@dataclass
class FlopsReport:
    """FLOPs per image of one ONNX graph at one input resolution.

    Attributes:
        total_gflops: conv + gemm + other, per image (1 GFLOP = 1e9 floating-point operations;
            a multiply-add is 2).
        conv_gflops: Conv / ConvTranspose (and their quantized forms).
        gemm_gflops: Gemm / MatMul (and their quantized forms).
        other_gflops: elementwise, activation, normalization, pooling ops.
        per_op_type: op_type -> {"nodes": n, "gflops": x, "kind": "conv"|"gemm"|"other"|"free"}.
        resolution: the input side K used (input fixed to N x C x K x K).
        batch: the graph batch the counts were divided by.
        unresolved: names of nodes whose shapes inference could not determine (not counted);
            empty for the graphs this toolkit exports.
    """

    total_gflops: float
    conv_gflops: float
    gemm_gflops: float
    other_gflops: float
    per_op_type: dict = field(default_factory=dict)
    resolution: int | None = None
    batch: int = 1
    unresolved: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FlopsReport:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def _load(model: Any):
    onnx = __import__("onnx")
    if isinstance(model, onnx.ModelProto):
        return copy.deepcopy(model)
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise UserInputError(f"ONNX file '{path}' does not exist")
    try:
        # Weights are not needed, only their shapes (which the initializer protos keep).
        return onnx.load(path, load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / google.protobuf errors
        raise UserInputError(f"'{path}' is not a readable ONNX model: {exc}") from exc


def data_input(model) -> Any:
    """The graph input that is not an initializer (the image tensor)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not inputs:
        raise UserInputError("the ONNX graph has no data input")
    return inputs[0]


def input_dims(model) -> list[int | str | None]:
    """Dims of the data input: ints where fixed, the symbolic name (or None) where dynamic."""
    dims = []
    for d in data_input(model).type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return dims


def _fix_input(model, resolution: int | None, channels: int) -> tuple[int, int]:
    """Set the data input to (N, C, K, K) in place; return (batch, resolution)."""
    inp = data_input(model)
    dims = input_dims(model)
    if len(dims) != 4:
        raise UserInputError(f"expected a 4-D image input (N,C,H,W), the graph's input '{inp.name}' has dims {dims}")
    batch = dims[0] if isinstance(dims[0], int) else 1
    c = dims[1] if isinstance(dims[1], int) else channels
    if resolution is None:
        if isinstance(dims[2], int) and dims[2] == dims[3]:
            resolution = dims[2]
        else:
            raise UserInputError(
                f"input '{inp.name}' has dynamic spatial dims {dims[2:]}: pass the resolution to count FLOPs at"
            )
    resolution = int(resolution)
    shape = inp.type.tensor_type.shape
    for d, v in zip(shape.dim, (batch, c, resolution, resolution)):
        d.ClearField("dim_param")
        d.dim_value = v
    # Stale intermediate shapes (from another resolution) would contradict the new ones.
    del model.graph.value_info[:]
    for out in model.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    return batch, resolution


def _topological_sort(graph) -> None:
    """Reorder nodes so that producers come first (in place).

    Shape inference walks nodes in file order, but ONNX Runtime accepts any order, and some
    converters (onnxruntime's float16 with keep_io_types) append the input Casts last.
    """
    produced_by: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for o in node.output:
            produced_by[o] = i
    deps = [
        {produced_by[x] for x in node.input if x in produced_by and produced_by[x] != i}
        for i, node in enumerate(graph.node)
    ]
    order: list[int] = []
    state = [0] * len(graph.node)  # 0 new, 1 visiting, 2 done
    for start in range(len(graph.node)):
        stack = [(start, iter(sorted(deps[start])))]
        if state[start]:
            continue
        state[start] = 1
        while stack:
            i, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[i] = 2
                order.append(i)
                stack.pop()
            elif state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(deps[nxt]))))
    if order != list(range(len(graph.node))):
        nodes = [copy.deepcopy(graph.node[i]) for i in order]
        del graph.node[:]
        graph.node.extend(nodes)


def _shape_map(model) -> dict[str, list[int] | None]:
    shapes: dict[str, list[int] | None] = {}

    def dims_of(vi) -> list[int] | None:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            return None
        out = []
        for d in t.shape.dim:
            if not d.HasField("dim_value"):
                return None
            out.append(int(d.dim_value))
        return out

    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        shapes[vi.name] = dims_of(vi)
    for t in model.graph.initializer:
        shapes[t.name] = [int(d) for d in t.dims]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    shapes[node.output[0]] = [int(d) for d in a.t.dims]
    return shapes


def _prod(xs) -> int:
    return int(math.prod(xs)) if xs is not None else 0


def count_flops(model: Any, resolution: int | None = None, *, channels: int = 3) -> FlopsReport:
    """FLOPs per image of an ONNX model (a path or a ModelProto) at input K x K.

    Args:
        model: ONNX file path or ``onnx.ModelProto`` (not modified).
        resolution: K; ``None`` uses a fixed-shape graph's own resolution.
        channels: C for graphs whose channel dim is dynamic.

    Raises:
        UserInputError: unreadable file, not a 4-D image input, or a dynamic graph without
            ``resolution``.
    """
    onnx = __import__("onnx")
    m = _load(model)
    batch, resolution = _fix_input(m, resolution, channels)
    _topological_sort(m.graph)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # onnx.shape_inference.InferenceError and friends: retry the plain way
        try:
            m = onnx.shape_inference.infer_shapes(m)
        except Exception as exc:
            raise UserInputError(f"ONNX shape inference failed at resolution {resolution}: {exc}") from exc
    shapes = _shape_map(m)

    def shp(node, i):
        if i is None or i >= len(node.input) or not node.input[i]:
            return None
        return shapes.get(node.input[i])

    def has(node, i) -> bool:
        return i is not None and i < len(node.input) and bool(node.input[i])

    kinds = {"conv": 0.0, "gemm": 0.0, "other": 0.0}
    per_op: dict[str, dict] = {}
    unresolved: list[str] = []

    for node in m.graph.node:
        op = node.op_type
        out = shapes.get(node.output[0]) if node.output else None
        flops: float | None = None
        kind = "other"
        if op in _CONV_OPS:
            kind = "conv"
            _, wi, bi = _CONV_OPS[op]
            w = shp(node, wi)
            if out is not None and w is not None and len(w) >= 3:
                flops = 2.0 * _prod(out) * _prod(w[1:]) + (_prod(out) if has(node, bi) else 0)
        elif op == "ConvTranspose":
            kind = "conv"
            x, w = shp(node, 0), shp(node, 1)
            if x is not None and w is not None and len(w) >= 3:
                flops = 2.0 * _prod(x) * _prod(w[1:]) + (_prod(out) if has(node, 2) and out else 0)
        elif op in _GEMM_OPS:
            kind = "gemm"
            ai, bi, ci = _GEMM_OPS[op]
            a, b = shp(node, ai), shp(node, bi)
            attrs = {at.name: at.i for at in node.attribute if at.name in ("transA", "transB")}
            if a is not None and b is not None and len(a) == 2 and len(b) == 2:
                mm, k = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
                n = b[0] if attrs.get("transB") else b[1]
                flops = 2.0 * mm * n * k + (mm * n if has(node, ci) else 0)
        elif op in _MATMUL_OPS:
            kind = "gemm"
            ai, bi, _ = _MATMUL_OPS[op]
            a = shp(node, ai)
            if out is not None and a is not None and len(a) >= 1:
                flops = 2.0 * max(_prod(out), 1) * a[-1]
        elif op in _FREE_OPS:
            kind = "free"
            flops = 0.0
        elif op in _INPUT_COST_OPS:
            x = shp(node, 0)
            flops = float(_prod(x)) if x is not None else None
        else:
            flops = float(_prod(out)) if out is not None else None
        entry = per_op.setdefault(op, {"nodes": 0, "gflops": 0.0, "kind": kind})
        entry["nodes"] += 1
        if flops is None:
            unresolved.append(node.name or f"{op}#{len(unresolved)}")
            continue
        g = flops / batch / 1e9
        entry["gflops"] += g
        if kind != "free":
            kinds[kind] += g

    return FlopsReport(
        total_gflops=sum(kinds.values()),
        conv_gflops=kinds["conv"],
        gemm_gflops=kinds["gemm"],
        other_gflops=kinds["other"],
        per_op_type=dict(sorted(per_op.items(), key=lambda kv: -kv[1]["gflops"])),
        resolution=resolution,
        batch=batch,
        unresolved=unresolved,
    )


_CACHE: dict[tuple, FlopsReport] = {}


def flops_per_image(onnx_path: str, resolution: int | None = None) -> FlopsReport:
    """:func:`count_flops` of a file, cached per (path, mtime, size, resolution) in this process."""
    st = os.stat(onnx_path)
    key = (os.path.abspath(onnx_path), st.st_mtime_ns, st.st_size, resolution)
    if key not in _CACHE:
        _CACHE[key] = count_flops(onnx_path, resolution)
    return _CACHE[key]
