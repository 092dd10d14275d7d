"""What an engine's latency depends on: the structure of its ONNX graph, never its weights.

Two ONNX graphs that run the same operators on tensors of the same shapes and types do the same
work, whatever numbers their weights hold: the FixRes fine-tuned and the base model at one
resolution, or two int8 variants whose calibrations found different scales for the same Q/DQ
placement. Timing them separately only measures noise twice (and lets the noise pick a
winner), so their latency records share one key, built from :func:`graph_signature`.

The signature hashes, in graph order:

* every node's op type, domain and attributes (a tensor attribute by dtype and shape only,
  its values only when it is an integer tensor: those hold shapes, axes and pads);
* the graph's inputs and outputs (dtype and shape, symbolic dims by name) and the opset;
* every initializer's dtype and shape (values only for integer tensors of <= 64 elements:
  ``Reshape`` targets and ``Slice`` bounds change the work; int8/uint8 zero points and float
  scales do not, so int8 tensors are never hashed by value);
* the wiring between nodes, with tensor names replaced by their order of first appearance
  (exporters name tensors after parameters and counters that may differ between runs);
  an ``Identity`` of an initializer (an exporter's deduplication of equal weights) counts as
  a copy of that initializer; unused initializers are left out.

Left out: names, doc strings, metadata (the preprocessing record differs between a model
fine-tuned at 96 px and the base model tested at 96 px; the work does not), and float values.

Assumption (docs/measurement.md): on the CPU and GPU kernels this project uses, latency does
not depend on weight values. Denormal floats or sparsity-exploiting kernels would break it.
"""

from __future__ import annotations

import os
from typing import Any

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.utils import stable_hash

#: bump when the signature's definition changes (old latency records then stop matching)
GRAPH_SIGNATURE_VERSION = 1
_SMALL_INT_ELEMENTS = 64


def _is_integer(dtype: int) -> bool:
    from onnx import TensorProto

    return dtype in (TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.UINT16, TensorProto.UINT32)


def _tensor_desc(t, *, values: bool) -> list:
    """dtype, dims and (for small integer tensors when ``values``) the values of a TensorProto."""
    from onnx import numpy_helper

    dims = [int(d) for d in t.dims]
    n = 1
    for d in dims:
        n *= d
    desc: list[Any] = [int(t.data_type), dims]
    if values and _is_integer(t.data_type) and n <= _SMALL_INT_ELEMENTS:
        desc.append(numpy_helper.to_array(t).reshape(-1).tolist())
    return desc


def _value_info(vi) -> list:
    tt = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return [int(tt.elem_type), dims]


def _attribute(a) -> list:
    from onnx import AttributeProto

    if a.type == AttributeProto.TENSOR:
        return [a.name, "tensor", _tensor_desc(a.t, values=True)]
    if a.type == AttributeProto.TENSORS:
        return [a.name, "tensors", [_tensor_desc(t, values=True) for t in a.tensors]]
    if a.type == AttributeProto.GRAPH:
        return [a.name, "graph", _graph_desc(a.g)]
    if a.type == AttributeProto.GRAPHS:
        return [a.name, "graphs", [_graph_desc(g) for g in a.graphs]]
    from onnx import helper

    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    elif isinstance(v, list):
        v = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v]
    return [a.name, v]


def _graph_desc(g) -> dict:
    inits = {t.name: t for t in g.initializer}
    # Exporters deduplicate initializers with equal values into Identity nodes (the TorchScript
    # exporter does): how many there are depends on the weights. Such an Identity is read as a
    # copy of its initializer, so two graphs that differ only in weights describe alike.
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input and n.input[0] in inits}
    ids: dict[str, int] = {}

    def tid(name: str) -> int | None:
        if not name:
            return None  # an omitted optional input
        if name not in ids:
            ids[name] = len(ids)
        return ids[name]

    inputs = [[tid(v.name), *_value_info(v)] for v in g.input if v.name not in inits]
    nodes = [
        [
            n.domain or "ai.onnx",
            n.op_type,
            [tid(x) for x in n.input],
            [tid(x) for x in n.output],
            sorted((_attribute(a) for a in n.attribute), key=lambda a: a[0]),
        ]
        for n in g.node
        if not (n.output and n.output[0] in alias)
    ]
    outputs = [[tid(v.name), *_value_info(v)] for v in g.output]
    # initializers by the order they are first used (not by their order in the file)
    weights = sorted(
        [i, *_tensor_desc(inits[alias.get(name, name)], values=True)]
        for name, i in ids.items()
        if name in inits or name in alias
    )
    return {"inputs": inputs, "initializers": weights, "nodes": nodes, "outputs": outputs}


def graph_structure(model) -> dict:
    """The weight-free description of an ``onnx.ModelProto`` that :func:`graph_signature` hashes."""
    return {
        "version": GRAPH_SIGNATURE_VERSION,
        "opsets": sorted([o.domain or "ai.onnx", int(o.version)] for o in model.opset_import),
        "graph": _graph_desc(model.graph),
    }


def graph_signature(onnx_path: str | os.PathLike) -> str:
    """sha256 (hex) of the structure of an ONNX file: ops, attributes, shapes, dtypes, Q/DQ placement.

    Raises:
        UserInputError: the file is missing or not an ONNX model.
    """
    import onnx

    path = os.fspath(onnx_path)
    if not os.path.isfile(path):
        raise UserInputError(f"ONNX file '{path}' does not exist")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise UserInputError(f"'{path}' is not a readable ONNX model: {exc}") from exc
    return stable_hash(graph_structure(model))
