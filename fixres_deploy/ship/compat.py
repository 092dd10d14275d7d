"""Can a bundled engine run on this machine? Library versions and the GPU, checked before running.

ONNX Runtime: the library loads the model (the only honest test that this version supports
its opsets). TensorRT: the same TensorRT major.minor as the build, and the same GPU (or one
that satisfies the recorded hardware-compatibility level); plans do not move across GPUs or
TensorRT versions (TensorRT issues #564, #818). Machine facts come from
:mod:`fixres_deploy.core.env`.
"""

from __future__ import annotations

import importlib
import os
import re

from fixres_deploy.core import env
from fixres_deploy.core.errors import MissingDependencyError, require
from fixres_deploy.ship.manifest import BundleEngine


def _sm(cc: str | None) -> str:
    return f"sm_{cc.replace('.', '')}" if cc else "sm_?"


def tensorrt_requirements(meta: dict) -> dict:
    """What a TensorRT plan needs, from the ``meta`` the TensorRT backend writes.

    Reads ``tensorrt_version``, ``gpu.name``, ``gpu.compute_capability`` and
    ``config.hardware_compatibility`` (see ``backends/tensorrt_backend.build_impl``).
    """
    gpu = meta.get("gpu") if isinstance(meta.get("gpu"), dict) else {}
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    version = meta.get("tensorrt_version")
    return {
        "tensorrt_version": str(version) if version else None,
        "gpu_name": gpu.get("name"),
        "compute_capability": env.normalize_compute_capability(gpu.get("compute_capability")),
        "hardware_compatibility": str(config.get("hardware_compatibility") or "none").lower(),
    }


def _major_minor(version: str | None) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", str(version or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


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
                "(pip install 'fixres-deploy[gpu-cu12]' or '[gpu-cu13]'), which is not installed here"
            )
        else:
            have = getattr(trt, "__version__", None)
            if _major_minor(have) != _major_minor(built):
                problems.append(
                    f"TensorRT engine {engine.file} was built with TensorRT {built} but TensorRT "
                    f"{have} is installed: plans load only in the same major.minor; rebuild it here"
                )
        here = env.current_gpu()
        if here is None:
            problems.append(
                f"TensorRT engine built for {gpu} ({_sm(cc)}) cannot be verified/run here: no CUDA GPU "
                "found (run the bundled ONNX with --backend onnxruntime, or rebuild on this machine)"
            )
        else:
            hw = (req.get("hardware_compatibility") or "none").lower()
            here_cc = here.get("compute_capability")
            if hw == "ampere_plus":
                ok = (_major_minor(here_cc) or (0, 0)) >= (8, 0)
            elif hw == "same_compute_capability":
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
