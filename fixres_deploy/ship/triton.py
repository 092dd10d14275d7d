"""Export a bundle as a Triton Inference Server model repository.

    REPO/<model_name>/config.pbtxt
    REPO/<model_name>/labels.txt        (the output's label_filename: Triton's classification extension)
    REPO/<model_name>/1/model.onnx      (platform onnxruntime_onnx)  or  1/model.plan (tensorrt_plan)

The config follows the engine's shape contract: an engine with a dynamic batch axis gets
``max_batch_size`` = its profile max and dims without the batch dimension (Triton batches
requests into it, ``dynamic_batching`` on); a fixed-batch engine gets ``max_batch_size: 0``
and its full shape. Triton does not preprocess images, so the exact preprocessing is put in
``parameters`` as JSON for the client (and the manifest digest, to tie the model to its bundle).
A TensorRT plan runs only in a Triton whose TensorRT matches the one it was built with, on
the same GPU: the config says so in a comment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.utils import share_tree
from fixres_deploy.ship.manifest import (
    LABELS_NAME,
    BundleEngine,
    BundleManifest,
    batch_range,
    load_manifest,
)
from fixres_deploy.ship.verify import verify_bundle

PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO")


def _q(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _model_name(bundle_dir: str, manifest: BundleManifest) -> str:
    base = os.path.basename(os.path.abspath(bundle_dir)) or f"fixres_{manifest.precision}_r{manifest.resolution}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)


def _io_dims(engine: BundleEngine, resolution: int, max_batch_size: int | None) -> tuple[int, list[int]]:
    """(max_batch_size, input dims) following the engine's shape contract."""
    profiles = engine.shapes.profiles
    rng = batch_range(engine.shapes, resolution)
    if rng is None:
        raise UserInputError(f"engine {engine.file} does not accept {resolution}px inputs")
    min_b, max_b = rng
    hw_fixed = all(p.min[2:] == p.max[2:] for p in profiles) and len({p.min[2:] for p in profiles}) == 1
    hw = list(profiles[0].min[2:]) if hw_fixed else [-1, -1]
    dynamic_batch = engine.shapes.mode == "dynamic" and max_b > min_b
    if not dynamic_batch:
        if max_batch_size not in (None, 0):
            raise UserInputError(
                f"engine {engine.file} takes exactly batch {max_b}: Triton needs max_batch_size 0 for it "
                "(rebuild it with a dynamic batch axis to let Triton batch requests)"
            )
        return 0, [max_b, 3, *hw]
    if min_b > 1:
        raise UserInputError(
            f"engine {engine.file} needs batches >= {min_b}; Triton sends batches from 1 (rebuild with min batch 1)"
        )
    if max_batch_size is None:
        max_batch_size = max_b
    if not 1 <= int(max_batch_size) <= max_b:
        raise UserInputError(f"max_batch_size {max_batch_size} is outside the engine's batch range 1..{max_b}")
    return int(max_batch_size), [3, *hw]


def render_config(
    manifest: BundleManifest,
    engine: BundleEngine,
    *,
    model_name: str,
    max_batch_size: int | None = None,
    dynamic_batching: bool = True,
    preferred_batch_sizes: list[int] | None = None,
    max_queue_delay_us: int = 100,
    instance_count: int = 1,
    kind: str | None = None,
) -> str:
    """The ``config.pbtxt`` text for ``engine`` of a bundle (see :func:`export_triton_repository`)."""
    if engine.backend not in PLATFORMS:
        raise UserInputError(f"Triton export supports {sorted(PLATFORMS)} engines, not {engine.backend!r}")
    platform, _ = PLATFORMS[engine.backend]
    kind = kind or ("KIND_GPU" if engine.backend == "tensorrt" else "KIND_CPU")
    if kind not in KINDS:
        raise UserInputError(f"instance kind must be one of {KINDS}, got {kind!r}")
    if engine.backend == "tensorrt" and kind == "KIND_CPU":
        raise UserInputError("a TensorRT plan runs on a GPU: use kind KIND_GPU")
    if int(instance_count) < 1:
        raise UserInputError(f"instance_count must be >= 1, got {instance_count}")
    if int(max_queue_delay_us) < 0:
        raise UserInputError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    mbs, dims = _io_dims(engine, manifest.resolution, max_batch_size)
    out_dims = [manifest.num_classes] if mbs > 0 else [dims[0], manifest.num_classes]
    lines = [
        f"# fixres-deploy bundle: {manifest.backend} {manifest.precision} @{manifest.resolution}px, "
        f"manifest digest {manifest.digest}",
    ]
    if manifest.multires is not None:
        res = manifest.multires.resolutions
        lines.append(
            f"# Multi-resolution head bank: resize the image to one of {res} px (preprocessing in parameters, "
            "test_input_size replaced); the graph runs the FixRes head of the resolution nearest to the input "
            "height. Choosing the resolution is the client's job (fixres-deploy serve does it per batch)."
        )
    if engine.backend == "tensorrt":
        req = engine.requires
        lines.append(
            f"# TensorRT plan built with TensorRT {req.get('tensorrt_version')} for {req.get('gpu_name')} "
            f"(compute capability {req.get('compute_capability')}): Triton's TensorRT and GPU must match."
        )
    lines += [
        f"name: {_q(model_name)}",
        f"platform: {_q(platform)}",
        f"max_batch_size: {mbs}",
        "input [",
        "  {",
        f"    name: {_q(engine.input_name)}",
        "    data_type: TYPE_FP32",
        "    format: FORMAT_NCHW",
        f"    dims: [ {', '.join(str(d) for d in dims)} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_q(engine.output_name)}",
        "    data_type: TYPE_FP32",
        f"    dims: [ {', '.join(str(d) for d in out_dims)} ]",
        f"    label_filename: {_q(LABELS_NAME)}",
        "  }",
        "]",
    ]
    if mbs > 0 and dynamic_batching:
        if preferred_batch_sizes is None:
            # The profiles' opt batches: where TensorRT tuned its tactics (ONNX Runtime: the measured batch).
            preferred_batch_sizes = sorted({p.opt[0] for p in engine.shapes.profiles if 1 < p.opt[0] <= mbs})
        bad = [b for b in preferred_batch_sizes if not 1 <= int(b) <= mbs]
        if bad:
            raise UserInputError(f"preferred batch sizes {bad} are outside 1..max_batch_size {mbs}")
        lines.append("dynamic_batching {")
        if preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: [ {', '.join(str(int(b)) for b in preferred_batch_sizes)} ]")
        lines.append(f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}")
        lines.append("}")
    lines += [
        "instance_group [",
        "  {",
        f"    count: {int(instance_count)}",
        f"    kind: {kind}",
        "  }",
        "]",
    ]
    params = {
        "fixres_deploy.core.preprocess": json.dumps(manifest.preprocess, sort_keys=True),
        "fixres_deploy.resolution": str(manifest.resolution),
        "fixres_deploy.precision.variants": manifest.precision,
        "fixres_deploy.manifest_digest": manifest.digest or "",
    }
    if manifest.multires is not None:
        params["fixres_deploy.multires"] = json.dumps(
            {
                "resolutions": manifest.multires.resolutions,
                "accuracy": manifest.multires.accuracy,
                "head_selection": manifest.multires.head_selection,
                "resolution_choice": "client",
            },
            sort_keys=True,
        )
    for key, value in params.items():
        lines += [
            "parameters {",
            f"  key: {_q(key)}",
            f"  value: {{ string_value: {_q(value)} }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def export_triton_repository(
    bundle_dir: str | os.PathLike,
    repo_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    max_batch_size: int | None = None,
    dynamic_batching: bool = True,
    preferred_batch_sizes: list[int] | None = None,
    max_queue_delay_us: int = 100,
    instance_count: int = 1,
    kind: str | None = None,
    backend: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``repo_dir/<model_name>/`` for Triton from a bundle; return that folder.

    Args:
        bundle_dir: a verified bundle folder (its files' hashes are checked; the engine need
            not be runnable on this machine).
        repo_dir: the Triton model repository (other models in it are left alone).
        model_name: defaults to the bundle folder's name.
        max_batch_size: for a dynamic-batch engine, at most its profile max (the default).
        dynamic_batching: add the ``dynamic_batching`` block (only when max_batch_size > 0).
        preferred_batch_sizes: default: the profiles' opt batch sizes above 1.
        max_queue_delay_us: how long Triton waits to fill a batch.
        instance_count, kind: the ``instance_group``; kind defaults to KIND_GPU for TensorRT,
            KIND_CPU for ONNX Runtime.
        backend: which engine of the bundle (default: the primary).
        overwrite: replace an existing model folder of that name.
    """
    bundle_dir = os.fspath(bundle_dir)
    verify_bundle(bundle_dir, backend=backend, check_runtime=False).raise_if_failed()
    manifest = load_manifest(bundle_dir)
    engine = manifest.engine_for(backend)
    name = model_name or _model_name(bundle_dir, manifest)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise UserInputError(f"model name {name!r}: use letters, digits, '_', '-', '.'")
    text = render_config(
        manifest,
        engine,
        model_name=name,
        max_batch_size=max_batch_size,
        dynamic_batching=dynamic_batching,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instance_count=instance_count,
        kind=kind,
    )
    repo_dir = os.path.abspath(os.fspath(repo_dir))
    target = os.path.join(repo_dir, name)
    if os.path.exists(target) and not overwrite:
        raise UserInputError(f"'{target}' already exists: pass overwrite (--overwrite) or another model name")
    os.makedirs(repo_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo_dir)
    try:
        version = os.path.join(tmp, "1")
        os.makedirs(version)
        _, filename = PLATFORMS[engine.backend]
        shutil.copyfile(os.path.join(bundle_dir, engine.file), os.path.join(version, filename))
        engine_dir = os.path.dirname(engine.file)
        for rel in engine.external_data:  # ONNX external data: same relative names beside model.onnx
            dst = os.path.join(version, os.path.relpath(rel, engine_dir))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(bundle_dir, rel), dst)
        shutil.copyfile(os.path.join(bundle_dir, manifest.labels_file), os.path.join(tmp, LABELS_NAME))
        with open(os.path.join(tmp, "config.pbtxt"), "w", encoding="utf-8") as f:
            f.write(text)
        share_tree(tmp)  # Triton usually runs as another user: 0755/0644, not mkdtemp's 0700
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
