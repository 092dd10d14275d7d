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
    gated = {c: resolve_chain(trt, c)[0] for c in request.get("gated", [])}
    return {"chains": chains, "gated": gated, "members": members, "signature_problems": problems,
            "checked_signatures": sorted(set(checked))}


def _err(fn):
    try:
        value = fn()
        return {"ok": True, "value": value}
    except Exception as exc:  # reported to the test, which asserts on the type and message
        return {"ok": False, "type": type(exc).__name__, "message": str(exc)}


class _Recorder:
    """A stand-in IBuilderConfig / Builder: records what Polygraphy's CreateConfig does to it."""

    def __init__(self, log):
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name):
        log = self._log

        def method(*args, **kwargs):
            log.append([name, [_show(a) for a in args], {k: _show(v) for k, v in kwargs.items()}])
            if name == "create_builder_config":
                return _Recorder(log)
            if name == "create_timing_cache":
                return _Recorder(log)
            return True

        return method

    def __setattr__(self, name, value):
        self._log.append(["set " + name, [_show(value)], {}])


def _show(v):
    name = getattr(v, "name", None)
    if name is not None and type(v).__module__.startswith("tensorrt"):
        return f"{type(v).__name__}.{name}"
    if isinstance(v, (bytes, bytearray)):
        return f"bytes[{len(v)}]"
    return repr(v) if not isinstance(v, (int, float, str)) else v


def check_behaviour(trt, request: dict) -> dict:
    import numpy as np

    from fixres_deploy.backends import tensorrt_backend as tb
    from fixres_deploy.backends.base import BuildOptions, ShapeSpec

    pg = tb.import_polygraphy()
    out: dict = {"version": trt.__version__, "file": trt.__file__, "major": tb.trt_major(trt)}
    out["check_version"] = _err(lambda: tb.check_version(trt))
    out["builder_direct"] = _err(lambda: repr(trt.Builder(trt.Logger())))
    out["runtime_direct"] = _err(lambda: repr(trt.Runtime(trt.Logger())))
    from fixres_deploy.backends.cuda_utils import ensure_device, import_cudart

    out["cuda_device"] = _err(lambda: ensure_device(import_cudart()))["ok"]
    out["gated_present"] = {name: tb.gated_name_expected(name, tb.trt_version(trt)) for name in tb.VERSION_GATED}
    out["strongly_typed"] = {
        "carries": tb.strongly_typed_network(trt, carries_precision=True, legacy_fp16_flag=False),
        "fp32": tb.strongly_typed_network(trt, carries_precision=False, legacy_fp16_flag=False),
        "legacy": tb.strongly_typed_network(trt, carries_precision=False, legacy_fp16_flag=True),
    }
    out["fp16_legacy"] = _err(lambda: tb.legacy_fp16_allowed(trt, precision="fp16", legacy_fp16_flag=True))
    out["fp16_default"] = _err(lambda: tb.legacy_fp16_allowed(trt, precision="fp16", legacy_fp16_flag=False))
    out["legacy_int8"] = _err(lambda: tb.legacy_fp16_allowed(trt, precision="int8", legacy_fp16_flag=True))
    out["hardware_levels"] = {
        n: _err(lambda n=n: _show(tb.hardware_compatibility_level(trt, n))) for n in tb.HARDWARE_COMPATIBILITY
    }
    out["hardware_bad"] = _err(lambda: tb.hardware_compatibility_level(trt, "hopper_only"))
    out["validate_legacy"] = _err(lambda: tb.validate_options(trt, BuildOptions(legacy_fp16_flag=True), precision="fp16"))
    out["nptype"] = {"FLOAT": np.dtype(trt.nptype(trt.DataType.FLOAT)).name,
                     "HALF": np.dtype(trt.nptype(trt.DataType.HALF)).name}
    # Polygraphy's CreateConfig run against the real module's enums on a recording config.
    dyn = ShapeSpec.resolution_bands([request["onnx_res"], 2 * request["onnx_res"]], max_batch=4, bands=2)
    carried = {"qdq": False, "fp16": False}
    configs = {
        "fp32": (BuildOptions(workspace_mb=64, optimization_level=4, timing_cache=request["out_dir"] + "/t.cache"), "fp32"),
        "tf32": (BuildOptions(tf32=True), "fp32"),
        "ampere": (BuildOptions(hardware_compatibility="ampere_plus"), "fp32"),
        "same_cc": (BuildOptions(hardware_compatibility="same_compute_capability"), "fp32"),
        "legacy_fp16": (BuildOptions(legacy_fp16_flag=True), "fp16"),
    }
    # the head-bank engine of export-multires: one profile spanning every resolution
    from fixres_deploy.export.multires import multires_shapes

    shapes_of = {"multires": multires_shapes([64, 80, 96, 128], 16)}
    configs["multires"] = (BuildOptions(), "fp32")
    out["config_calls"] = {}
    for label, (opts, precision) in configs.items():
        def run(opts=opts, precision=precision, shapes=shapes_of.get(label, dyn)):
            net, cfg, applied = tb.make_loaders(trt, pg, request["onnx"], shapes, opts, precision=precision,
                                                carried=carried)
            log = []
            cfg(_Recorder(log), None)  # network None: Polygraphy skips the profile step
            return {"applied": applied, "calls": log, "profiles": [str(p) for p in cfg.profiles or []],
                    "strongly_typed": net.strongly_typed}
        out["config_calls"][label] = _err(run)
    # Every call Polygraphy made on the recorder must exist on the real IBuilderConfig / Builder.
    problems, checked = [], set()
    for label, entry in out["config_calls"].items():
        for name, args, kwargs in (entry["value"]["calls"] if entry["ok"] else []):
            owner = trt.Builder if name == "create_builder_config" else trt.IBuilderConfig
            if name.startswith("set "):
                attr = inspect.getattr_static(owner, name[4:], None)
                if not (isinstance(attr, property) and attr.fset is not None):
                    problems.append(f"{label}: {owner.__name__}.{name[4:]} is not a settable property")
            elif not hasattr(owner, name):
                problems.append(f"{label}: {owner.__name__}.{name} missing")
            else:
                p = signature_problem(getattr(owner, name), name, len(args), list(kwargs))
                if p:
                    problems.append(f"{label}: {p}")
            checked.add(f"{owner.__name__}.{name.removeprefix('set ')}")
    out["config_api"] = {"problems": problems, "checked": sorted(checked)}
    shapes = ShapeSpec.fixed(1, request["onnx_res"])
    net, cfg, _ = tb.make_loaders(trt, pg, request["onnx"], shapes, BuildOptions(), precision="fp32", carried=carried)
    out["polygraphy_build"] = _err(lambda: tb.build_plan(trt, pg, net, cfg, None))
    out["polygraphy_load"] = _err(lambda: tb.load_engine(trt, pg, b"not a plan"))
    out["build_fp32"] = _err(lambda: tb.build_impl(request["onnx"], shapes, BuildOptions(), out_dir=request["out_dir"],
                                                   precision="fp32", name="probe").to_dict())
    out["build_legacy_fp16"] = _err(lambda: tb.build_impl(
        request["onnx"], shapes, BuildOptions(legacy_fp16_flag=True), out_dir=request["out_dir"],
        precision="fp16", name="probe16").to_dict())
    out["build_same_cc"] = _err(lambda: tb.build_impl(
        request["onnx"], shapes, BuildOptions(hardware_compatibility="same_compute_capability"),
        out_dir=request["out_dir"], precision="fp32", name="probe_cc").to_dict())
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
