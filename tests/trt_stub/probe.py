"""Run in a subprocess by tests/test_trt_api.py, one per TensorRT version.

Loads the stub libraries (RTLD_GLOBAL, so the bindings' DT_NEEDED sonames resolve to them),
imports the real ``tensorrt_bindings`` wheel of that version, checks the names and
signatures the backend uses (the request, derived from the backend's AST by the test),
calls the backend's version-gated functions with the real module, and prints one JSON
report on stdout. It asserts nothing itself: the test does.

    python probe.py REQUEST.json
"""

from __future__ import annotations

import ctypes
import inspect
import json
import os
import sys
import traceback


def _load(request: dict):
    for lib in request["stub_libs"]:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    sys.modules["tensorrt_libs"] = None  # never the real libraries, even if a libs wheel is installed
    sys.path.insert(0, request["site"])
    import tensorrt_bindings as trt

    sys.modules["tensorrt"] = trt  # what fixres_deploy's import_tensorrt() will find
    return trt


# --------------------------------------------------------------------------- signatures


def _split_top(text: str) -> list[str]:
    """Split at commas outside (), [], {}, <> (pybind11 defaults look like <Enum.X: 0>)."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _params_after(doc: str, start: int) -> str | None:
    depth = 0
    for i in range(start, len(doc)):
        if doc[i] == "(":
            depth += 1
        elif doc[i] == ")":
            depth -= 1
            if depth == 0:
                return doc[start + 1 : i]
    return None


def pybind_overloads(obj, name: str) -> list[list[tuple[str, bool]]]:
    """Each overload's parameters (name, has_default), ``self`` removed, from the pybind11 docstring."""
    doc = getattr(obj, "__doc__", None) or ""
    overloads = []
    pos = 0
    while True:
        i = doc.find(f"{name}(", pos)
        if i < 0:
            break
        params = _params_after(doc, i + len(name))
        pos = i + len(name) + 1
        if params is None or params.strip() in ("*args, **kwargs",):
            continue
        parsed = []
        for p in _split_top(params):
            pname = p.split(":", 1)[0].split("=", 1)[0].strip()
            if pname in ("self", "") or pname.startswith("*"):
                continue
            parsed.append((pname, "=" in p))
        overloads.append(parsed)
    return overloads


def signature_problem(obj, name: str, npos: int, kws: list[str]) -> str | None:
    """None when some overload accepts ``npos`` positional args and keywords ``kws``."""
    try:  # plain Python functions of the package (trt.nptype, trt.volume)
        sig = inspect.signature(obj)
        try:
            sig.bind(*range(npos), **{k: None for k in kws})
            return None
        except TypeError as exc:
            return f"{name}{sig}: {exc}"
    except (TypeError, ValueError):
        pass
    overloads = pybind_overloads(obj, name)
    if not overloads:
        return f"{name}: no parseable signature in its docstring"
    for params in overloads:
        names = [p for p, _ in params]
        if npos > len(params) or any(k not in names[npos:] for k in kws):
            continue
        given = set(names[:npos]) | set(kws)
        if all(p in given or has_default for p, has_default in params):
            return None
    shown = " | ".join("(" + ", ".join(p + ("=…" if d else "") for p, d in o) + ")" for o in overloads)
    return f"{name}: no overload takes {npos} positional + keywords {kws}; signatures {shown}"


# --------------------------------------------------------------------------- checks


def resolve_chain(trt, chain: str):
    obj = trt
    for part in chain.split("."):
        if not hasattr(obj, part):
            return False, None
        obj = getattr(obj, part)
    return True, obj


def check_api(trt, request: dict) -> dict:
    chains = {c: resolve_chain(trt, c)[0] for c in request["chains"]}
    members = {}
    for cls, member, ctx in request["members"]:
        c = getattr(trt, cls, None)
        if c is None or not hasattr(c, member):
            members[f"{cls}.{member}"] = "missing"
            continue
        attr = inspect.getattr_static(c, member, None)
        if ctx == "store" and not (isinstance(attr, property) and attr.fset is not None):
            members[f"{cls}.{member}"] = "not settable"
        else:
            members.setdefault(f"{cls}.{member}", "ok")
    problems, checked = [], []
    for call in request["calls"]:
        if call["owner"]:  # a method on a TensorRT object
            cls = getattr(trt, call["owner"], None)
            obj = getattr(cls, call["name"], None) if cls is not None else None
            label, name = f"{call['owner']}.{call['name']}", call["name"]
        else:  # trt.Builder(...), trt.nptype(...): a constructor or a module function
            ok, obj = resolve_chain(trt, call["name"])
            label, name = call["name"], call["name"].rsplit(".", 1)[-1]
            if ok and inspect.isclass(obj):
                obj, label, name = obj.__init__, f"{call['name']}.__init__", "__init__"
            elif not ok:
                obj = None
        if obj is None:
            continue  # reported as missing by the chain/member checks
        problem = signature_problem(obj, name, call["npos"], call["kws"])
        kws = "".join(f", {k}=" for k in call["kws"])
        checked.append(f"{label}({call['npos']} positional{kws})")
        if problem:
            problems.append(f"line {call['line']}: {label}: {problem}")
    return {"chains": chains, "members": members, "signature_problems": problems,
            "checked_signatures": sorted(set(checked))}


def _err(fn):
    try:
        value = fn()
        return {"ok": True, "value": value}
    except Exception as exc:  # reported to the test, which asserts on the type and message
        return {"ok": False, "type": type(exc).__name__, "message": str(exc)}


def check_behaviour(trt, request: dict) -> dict:
    import numpy as np

    from fixres_deploy.backends import tensorrt_backend as tb
    from fixres_deploy.backends.base import BuildOptions, ShapeSpec

    out: dict = {"version": trt.__version__, "file": trt.__file__, "major": tb.trt_major(trt)}
    out["check_version"] = _err(lambda: tb.check_version(trt))
    out["builder_direct"] = _err(lambda: repr(trt.Builder(trt.Logger())))
    out["runtime_direct"] = _err(lambda: repr(trt.Runtime(trt.Logger())))
    logger = tb.make_logger(trt)
    logger.log(trt.ILogger.Severity.ERROR, "probe error message")
    out["logger"] = {"is_ilogger": isinstance(logger, trt.ILogger), "errors": logger.errors}
    out["create_builder"] = _err(lambda: repr(tb.create_builder(trt, logger)))
    out["create_runtime"] = _err(lambda: repr(tb.create_runtime(trt, logger)))
    from fixres_deploy.backends.cuda_utils import ensure_device, import_cudart

    out["cuda_device"] = _err(lambda: ensure_device(import_cudart()))["ok"]
    strongly = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    out["strongly_typed_bit"] = 1 << int(strongly)
    out["network_flags"] = {
        "carries": tb.network_creation_flags(trt, carries_precision=True, legacy_fp16_flag=False),
        "fp32": tb.network_creation_flags(trt, carries_precision=False, legacy_fp16_flag=False),
        "legacy": tb.network_creation_flags(trt, carries_precision=False, legacy_fp16_flag=True),
    }
    out["fp16_flags_legacy"] = _err(
        lambda: [f.name for f in tb.precision_builder_flags(trt, precision="fp16", legacy_fp16_flag=True)])
    out["fp16_flags_default"] = _err(
        lambda: [f.name for f in tb.precision_builder_flags(trt, precision="fp16", legacy_fp16_flag=False)])
    out["legacy_int8"] = _err(lambda: tb.precision_builder_flags(trt, precision="int8", legacy_fp16_flag=True))
    out["hardware_levels"] = {n: tb.hardware_compatibility_level(trt, n).name for n in tb.HARDWARE_COMPATIBILITY}
    out["hardware_bad"] = _err(lambda: tb.hardware_compatibility_level(trt, "hopper_only"))
    out["validate_legacy"] = _err(lambda: tb.validate_options(trt, BuildOptions(legacy_fp16_flag=True), precision="fp16"))
    out["nptype"] = {"FLOAT": np.dtype(trt.nptype(trt.DataType.FLOAT)).name,
                     "HALF": np.dtype(trt.nptype(trt.DataType.HALF)).name}
    shapes = ShapeSpec.fixed(1, request["onnx_res"])
    out["build_fp32"] = _err(lambda: tb.build_impl(request["onnx"], shapes, BuildOptions(), out_dir=request["out_dir"],
                                                   precision="fp32", name="probe").to_dict())
    out["build_legacy_fp16"] = _err(lambda: tb.build_impl(
        request["onnx"], shapes, BuildOptions(legacy_fp16_flag=True), out_dir=request["out_dir"],
        precision="fp16", name="probe16").to_dict())
    runner = tb.TensorRTRunner(request["plan"], shapes=shapes)
    out["runner_activate"] = _err(lambda: runner.activate() and None)
    out["runner_active_after_failure"] = runner.is_active
    return out


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        request = json.load(f)
    try:
        trt = _load(request)
        report = {"api": check_api(trt, request), "behaviour": check_behaviour(trt, request)}
    except Exception:  # any failure here is the test's finding: print it as data
        report = {"fatal": traceback.format_exc()}
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FIXRES_NO_PROGRESS", "1")
    sys.exit(main())
