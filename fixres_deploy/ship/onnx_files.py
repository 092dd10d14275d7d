"""ONNX files in a bundle: read their facts without loading weights, copy them with their external data."""

from __future__ import annotations

import os
import shutil

from fixres_deploy.backends.base import EngineArtifact
from fixres_deploy.core.errors import UserInputError, require


def onnx_facts(path: str) -> dict:
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


def unique_name(name: str, used: set[str]) -> str:
    base, ext = os.path.splitext(name)
    if name.endswith(".onnx.data"):
        base, ext = name[: -len(".onnx.data")], ".onnx.data"
    candidate, i = name, 1
    while candidate in used:
        candidate = f"{base}_{i}{ext}"
        i += 1
    used.add(candidate)
    return candidate


def copy_onnx(src: str, dest_dir: str, rel_dir: str, used: set[str]) -> tuple[str, list[str], dict]:
    """Copy an ONNX file and its external-data files; returns (rel path, rel externals, facts)."""
    facts = onnx_facts(src)
    name = os.path.basename(src)
    if facts["external"] and name in used:
        raise UserInputError(
            f"two ONNX files named '{name}' with external data cannot share one bundle folder; rename one"
        )
    name = unique_name(name, used)
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


def check_onnx_io(path: str, facts: dict, art: EngineArtifact, num_classes: int) -> None:
    if art.input_name not in facts["inputs"]:
        raise UserInputError(f"'{path}' has no input '{art.input_name}' (inputs: {sorted(facts['inputs'])})")
    out = facts["outputs"].get(art.output_name)
    if out is None:
        raise UserInputError(f"'{path}' has no output '{art.output_name}' (outputs: {sorted(facts['outputs'])})")
    if len(out) == 2 and isinstance(out[1], int) and out[1] > 0 and out[1] != num_classes:
        raise UserInputError(
            f"'{path}' outputs {out[1]} classes but {num_classes} class names were given: wrong labels for this model"
        )
