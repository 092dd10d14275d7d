"""The environment, read once: library versions by distribution, CPU facts, GPU facts.

Result-store keys, bundle manifests, benchmark reports and the int8 flavor choice all need to
know what they run on. They read it here, so every record names the same facts the same way.

Library versions are looked up by the *distribution that provides a module*, not by the
module's name: ``import onnxruntime`` may come from ``onnxruntime`` or ``onnxruntime-gpu``,
``import tensorrt`` from ``tensorrt-cu12-bindings`` or ``tensorrt-cu13-bindings``, ``import
cuda`` from ``cuda-python`` or ``cuda-bindings``. A plain-name lookup records None for those,
and a store key then does not change when they are upgraded. Nothing is imported to find a
version (importlib.metadata only).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

log = logging.getLogger(__name__)

CPUINFO_PATH = "/proc/cpuinfo"

#: modules whose versions determine a result (store keys): the pipeline's libraries
PIPELINE_MODULES = ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt", "numpy", "fixres_deploy")
#: modules a bundle's runtime needs
RUNTIME_MODULES = ("onnxruntime", "onnx", "numpy", "PIL", "fixres_deploy")
#: extra modules recorded with TensorRT engines (the libraries wheel and the CUDA bindings)
TENSORRT_MODULES = ("tensorrt", "tensorrt_libs", "cuda")


# --------------------------------------------------------------------------- libraries


@functools.cache
def _module_distributions() -> dict[str, tuple[str, ...]]:
    """Top-level module -> the installed distributions that provide it (scanned once)."""
    return {mod: tuple(sorted(set(dists))) for mod, dists in metadata.packages_distributions().items()}


def clear_cache() -> None:
    """Forget what was read (after installing or removing packages in a running process)."""
    _module_distributions.cache_clear()
    _system_cpu_info.cache_clear()
    current_gpu.cache_clear()


def library(module: str) -> dict | None:
    """``{"distribution": name, "version": v}`` of the distribution providing ``module``.

    When several distributions provide the module (``tensorrt`` and ``tensorrt-cu12-bindings``)
    all are listed in ``"distributions"`` with their versions, the first one naming the record.
    None when nothing installed provides it.
    """
    dists = _module_distributions().get(module) or ()
    if not dists:  # not mapped (e.g. an editable install): try the module name as a distribution name
        dists = (module.replace("_", "-"),)
    found = []
    for dist in dists:
        try:
            found.append((metadata.metadata(dist)["Name"] or dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            continue
    if not found:
        return None
    record = {"distribution": found[0][0], "version": found[0][1]}
    if len(found) > 1:
        record["distributions"] = {name: version for name, version in found}
    return record


def library_versions(*modules: str) -> dict[str, dict | None]:
    """``{module: library(module)}`` for each module (default: :data:`PIPELINE_MODULES`)."""
    return {m: library(m) for m in (modules or PIPELINE_MODULES)}


def version_of(module: str) -> str | None:
    """The installed version of the distribution providing ``module`` (None when absent)."""
    rec = library(module)
    return rec["version"] if rec else None


# --------------------------------------------------------------------------- CPU


@dataclass(frozen=True)
class CpuInfo:
    """CPU facts from /proc/cpuinfo (empty where the file is absent, e.g. macOS)."""

    model: str = ""
    flags: frozenset = field(default_factory=frozenset)
    logical_cores: int | None = None

    @property
    def has_vnni(self) -> bool:
        """AVX512-VNNI or AVX-VNNI: int8 dot products in one instruction."""
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    def to_dict(self) -> dict:
        return {"model": self.model, "flags": sorted(self.flags), "logical_cores": self.logical_cores}


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags, and the processor count, of a cpuinfo text."""
    model, flags, processors = "", frozenset(), 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            processors += 1
        elif key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / ARM
            flags = frozenset(value.split())
    return CpuInfo(model=model, flags=flags, logical_cores=processors or os.cpu_count())


def cpu_info(path: str | None = None) -> CpuInfo:
    """:func:`parse_cpuinfo` of /proc/cpuinfo (read once) or of ``path`` (read now).

    Where the file is unreadable (not Linux) the model is the platform's processor name.
    """
    return _read_cpuinfo(path) if path else _system_cpu_info()


@functools.cache
def _system_cpu_info() -> CpuInfo:
    return _read_cpuinfo(CPUINFO_PATH)


def _read_cpuinfo(path: str) -> CpuInfo:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return CpuInfo(model=platform.processor() or "", logical_cores=os.cpu_count())


def machine_id() -> dict:
    """What a latency figure depends on besides the engine: CPU model, cores, OS (store keys)."""
    return {
        "cpu": cpu_info().model,
        "cores": os.cpu_count(),
        "system": platform.system(),
        "machine": platform.machine(),
    }


def machine_info() -> dict:
    """What numbers were measured on, for reports: platform, Python, CPU, GPU, library versions."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_info().model,
        "gpu": current_gpu(),
        "libraries": library_versions("numpy", "onnxruntime", "torch", "tensorrt"),
    }


# --------------------------------------------------------------------------- GPU


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


@functools.cache
def current_gpu() -> dict | None:
    """``{"name", "compute_capability"}`` of the first visible CUDA GPU, or None (probed once).

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
