"""The TensorRT backend against the REAL TensorRT 10.x and 11.x Python bindings, without a GPU.

How: the binding wheels of the lowest TensorRT the project claims, the newest 10.x and the newest
11.x (``WHEELS``: tensorrt-cu12-bindings 10.0.1 and 10.16.1.11, tensorrt-cu13-bindings 11.4.0.106)
are pip-installed with ``--no-deps --target`` into a cache folder (once); their ``tensorrt.so``
needs libnvinfer / libnvonnxparser / libnvinfer_plugin by soname, so stub libraries with those
sonames (tests/trt_stub/nvinfer_stub.c, every factory returns NULL) are compiled with the
system C compiler and loaded with RTLD_GLOBAL first. In a subprocess per version
(tests/trt_stub/probe.py) the real module is then checked for every name the backend uses.

The list of names is DERIVED from the backend's source by AST, so it cannot drift:
* attribute chains on the module name ``trt`` (``trt.BuilderFlag.FP16``, ``trt.MemoryPoolType.WORKSPACE``);
* attributes and methods on variables named after TensorRT types (``TRT_TYPE_OF_NAME`` in the
  backend: builder, network, config, parser, profile, runtime, engine, context, ...), including
  ``self._engine``-style attributes, with assignments requiring a settable property;
* every call's positional count and keyword names, checked against the pybind11 signatures
  in the docstrings (all overloads);
* chains on ``cudart`` in the backend and cuda_utils, against cuda-python (installed here).
Names in ``VERSION_GATED`` must exist exactly in the versions declared there, and must be
reached only behind a ``hasattr`` check. Polygraphy's own calls into TensorRT are exercised as far
as the stubs allow: its ``CreateConfig`` runs on a recording builder/config with the real enums,
and its network and engine loaders up to the nullptr from the stub's ``createInferBuilder``.

Cache folder: ``$FIXRES_TRT_BINDINGS_CACHE`` or ``~/.cache/fixres-deploy/trt-bindings/``.
Run: ``pytest -m trt_api tests/test_trt_api.py``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.trt_api

ROOT = Path(__file__).resolve().parents[1]
BACKEND_SRC = ROOT / "fixres_deploy" / "backends" / "tensorrt_backend.py"
CUDA_SRC = ROOT / "fixres_deploy" / "backends" / "cuda_utils.py"
STUB_DIR = Path(__file__).resolve().parent / "trt_stub"
STUB_SRC = STUB_DIR / "nvinfer_stub.c"
PROBE = STUB_DIR / "probe.py"
STUB_LIBS = ("nvinfer", "nvinfer_plugin", "nvonnxparser")
# version -> bindings wheel: lowest claimed (pyproject: >=10.0.1), newest 10.x, newest 11.x.
WHEELS = {
    "10.0.1": "tensorrt-cu12-bindings",
    "10.16.1.11": "tensorrt-cu12-bindings",
    "11.4.0.106": "tensorrt-cu13-bindings",
}
VERSIONS = list(WHEELS)


def _major(version: str) -> int:
    return int(version.split(".")[0])


def _vt(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def cache_root() -> Path:
    env = os.environ.get("FIXRES_TRT_BINDINGS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fixres-deploy" / "trt-bindings"


# --------------------------------------------------------------------------- setup: wheels and stubs


def _installed(site: Path, version: str) -> bool:
    init = site / "tensorrt_bindings" / "__init__.py"
    return init.is_file() and f'__version__ = "{version}"' in init.read_text(encoding="utf-8", errors="replace")


def install_bindings(version: str) -> Path:
    """The bindings wheel of ``version`` in the cache (pip-installed once); pytest.skip if PyPI is unreachable."""
    package = WHEELS[version]
    site = cache_root() / version
    if _installed(site, version):
        return site
    try:
        site.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=site.parent))
    except OSError as exc:
        pytest.skip(f"cannot write the bindings cache {site.parent} ({exc}); set FIXRES_TRT_BINDINGS_CACHE")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-input",
        "--disable-pip-version-check",
        "--retries",
        "1",
        "--timeout",
        "30",
        "--target",
        str(tmp),
        f"{package}=={version}",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"pip install {package}=={version} timed out (PyPI unreachable?)")
    if out.returncode != 0 or not _installed(tmp, version):
        shutil.rmtree(tmp, ignore_errors=True)
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot install {package}=={version} from PyPI: {last}")
    try:
        os.rename(tmp, site)  # atomic; a concurrent run may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _installed(site, version):
        pytest.skip(f"bindings cache {site} is unusable (remove it and rerun)")
    return site


def build_stubs(major: int) -> list[str]:
    """Compile the stub libraries with soname ``lib<name>.so.<major>`` (cached by source hash)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc/clang) to build the TensorRT stub libraries")
    digest = hashlib.sha256(STUB_SRC.read_bytes()).hexdigest()[:16]
    out_dir = cache_root() / "stubs" / digest / str(major)
    paths = [out_dir / f"lib{name}.so.{major}" for name in STUB_LIBS]
    if all(p.is_file() for p in paths):
        return [str(p) for p in paths]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        pytest.skip(f"cannot write the stub cache {out_dir} ({exc}); set FIXRES_TRT_BINDINGS_CACHE")
    for name, path in zip(STUB_LIBS, paths):
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        cmd = [cc, "-shared", "-fPIC", "-O1", "-o", str(tmp), str(STUB_SRC), f"-Wl,-soname,lib{name}.so.{major}"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            pytest.skip(f"{cc} could not build the stub {path.name}: {res.stderr.strip()[-300:]}")
        os.replace(tmp, path)
    return [str(p) for p in paths]


# --------------------------------------------------------------------------- AST: what the backend uses


def _chain(node: ast.AST) -> list[str] | None:
    """['trt', 'BuilderFlag', 'FP16'] for trt.BuilderFlag.FP16; None when not rooted at a Name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return None


def _typed_receiver(node: ast.AST, types: dict[str, str]) -> str | None:
    """TensorRT class of ``builder`` / ``self._engine`` style receivers, by the naming convention."""
    if isinstance(node, ast.Name):
        return types.get(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return types.get(node.attr.lstrip("_"))
    return None


def backend_requirements(types: dict[str, str]) -> dict:
    """Everything tensorrt_backend.py uses from ``trt`` and from TensorRT objects (see module docstring)."""
    tree = ast.parse(BACKEND_SRC.read_text(encoding="utf-8"))
    chains, members, calls, hasattr_guards = set(), set(), [], []
    outer: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if id(node) in outer:
                continue
            ch = _chain(node)
            if ch and ch[0] == "trt":
                # only the longest chain: mark inner Attribute nodes as seen
                inner = node.value
                while isinstance(inner, ast.Attribute):
                    outer.add(id(inner))
                    inner = inner.value
                chains.add(".".join(ch[1:]))
                continue
            owner = _typed_receiver(node.value, types)
            if owner:
                ctx = "store" if isinstance(node.ctx, ast.Store) else "load"
                members.add((owner, node.attr, ctx))
        if isinstance(node, ast.Call):
            f = node.func
            star = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
            if star:
                continue
            entry = {"npos": len(node.args), "kws": [k.arg for k in node.keywords], "line": node.lineno}
            if isinstance(f, ast.Attribute):
                owner = _typed_receiver(f.value, types)
                ch = _chain(f)
                if owner:
                    calls.append({"owner": owner, "name": f.attr, **entry})
                elif ch and ch[0] == "trt" and not ch[-1].startswith("__"):
                    calls.append({"owner": None, "name": ".".join(ch[1:]), **entry})
            elif isinstance(f, ast.Name) and f.id == "hasattr" and len(node.args) == 2:
                ch = _chain(node.args[0])
                if ch and ch[0] == "trt" and isinstance(node.args[1], ast.Constant):
                    hasattr_guards.append(".".join(ch[1:] + [node.args[1].value]))
    return {"chains": sorted(chains), "members": sorted(members), "calls": calls, "hasattr_guards": hasattr_guards}


def cudart_requirements() -> tuple[set[str], list[dict]]:
    chains, calls = set(), []
    for src in (BACKEND_SRC, CUDA_SRC):
        tree = ast.parse(src.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                ch = _chain(node) or []
                # cudart.X... or self._cudart.X... (the same module kept on the object)
                rest = ch[1:] if ch[:1] == ["cudart"] else ch[2:] if ch[:2] == ["self", "_cudart"] else []
                if rest:
                    chains.add(".".join(rest))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                v = node.func.value
                if (isinstance(v, ast.Name) and v.id == "cudart") or (
                    isinstance(v, ast.Attribute) and v.attr == "_cudart"
                ):
                    calls.append(
                        {"name": node.func.attr, "npos": len(node.args), "line": node.lineno, "file": src.name}
                    )
    # drop prefixes of longer chains (cudaMemcpyKind when cudaMemcpyKind.cudaMemcpyHostToDevice is there)
    full = {c for c in chains if not any(o != c and o.startswith(c + ".") for o in chains)}
    return full, calls


@pytest.fixture(scope="module")
def backend():
    from fixres_deploy.backends import tensorrt_backend

    return tensorrt_backend


@pytest.fixture(scope="module")
def requirements(backend):
    return backend_requirements(backend.TRT_TYPE_OF_NAME)


@pytest.fixture(scope="module")
def probe_inputs(tmp_path_factory):
    """A real (tiny) ONNX classifier and a dummy plan file for the backend calls in the probe."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("trt_probe")
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [w],
    )
    onnx_path = root / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), onnx_path)
    plan = root / "dummy.plan"
    plan.write_bytes(b"not a real engine")
    return {"onnx": str(onnx_path), "onnx_res": 16, "plan": str(plan), "out_dir": str(root / "out")}


@pytest.fixture(scope="module")
def reports(requirements, backend, probe_inputs, tmp_path_factory):
    """{version: probe report} from one subprocess per TensorRT version."""
    out = {}
    for version in VERSIONS:
        site = install_bindings(version)
        libs = build_stubs(_major(version))
        request = {
            **requirements,
            **probe_inputs,
            "site": str(site),
            "stub_libs": libs,
            "members": [list(m) for m in requirements["members"]],
            "gated": sorted(backend.VERSION_GATED),
        }
        req_path = tmp_path_factory.mktemp(f"trt{version}") / "request.json"
        req_path.write_text(json.dumps(request))
        env = {
            **os.environ,
            "FIXRES_NO_PROGRESS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        res = subprocess.run(
            [sys.executable, str(PROBE), str(req_path)], capture_output=True, text=True, timeout=300, env=env
        )
        assert res.returncode == 0, f"probe for TensorRT {version} crashed (rc {res.returncode}): {res.stderr[-2000:]}"
        report = json.loads(res.stdout.strip().splitlines()[-1])
        assert "fatal" not in report, report.get("fatal")
        out[version] = report
    return out


# --------------------------------------------------------------------------- tests


def test_ast_sees_the_backend(requirements, backend):
    """The extractor is not vacuous: names we know the backend uses are in the derived list."""
    chains = set(requirements["chains"])
    assert {
        "MemoryPoolType.WORKSPACE",
        "LayerInformationFormat.JSON",
        "ProfilingVerbosity.DETAILED",
        "TensorIOMode.INPUT",
        "HardwareCompatibilityLevel.AMPERE_PLUS",
        "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY",
        "nptype",
    } <= chains
    methods = {(o, m) for o, m, _ in requirements["members"]}
    assert {
        ("ICudaEngine", "create_engine_inspector"),
        ("ICudaEngine", "get_tensor_dtype"),
        ("ICudaEngine", "num_optimization_profiles"),
        ("EngineInspector", "get_engine_information"),
        ("IExecutionContext", "execute_async_v3"),
        ("IExecutionContext", "get_tensor_shape"),
    } <= methods
    assert {"BuilderFlag.FP16", "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY"} <= set(
        requirements["hasattr_guards"]
    )


def test_version_gated_names_are_guarded(requirements, backend):
    for name in backend.VERSION_GATED:
        assert name in requirements["hasattr_guards"], f"{name} exists only in some versions: guard it with hasattr"
        assert (
            name in requirements["chains"]
            or name.split(".")[0] in requirements["chains"]
            or any(c.startswith(name.split(".")[0] + ".") for c in requirements["chains"])
        ), f"VERSION_GATED lists {name}, which the backend no longer uses"


@pytest.mark.parametrize("version", VERSIONS)
def test_stub_libraries_are_what_is_loaded(reports, version):
    b = reports[version]["behaviour"]
    assert b["version"] == version and b["major"] == _major(version)
    assert str(cache_root()) in b["file"]
    assert b["check_version"] == {"ok": True, "value": _major(version)}
    # The real bindings call into our stubs, whose factories return NULL.
    for key in ("builder_direct", "runtime_direct"):
        assert b[key]["ok"] is False and b[key]["type"] == "TypeError" and "nullptr" in b[key]["message"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_name_the_backend_uses_exists(reports, requirements, backend, version):
    api = reports[version]["api"]
    gated = backend.VERSION_GATED
    missing = [c for c, ok in api["chains"].items() if not ok and c not in gated]
    assert not missing, f"TensorRT {version} lacks trt.{missing}"
    for name in gated:
        expected = backend.gated_name_expected(name, _vt(version))
        assert api["gated"][name] is expected, (
            f"VERSION_GATED says {name} exists from/until {gated[name]}; TensorRT {version} disagrees"
        )
    bad = {k: v for k, v in api["members"].items() if v != "ok"}
    assert not bad, f"TensorRT {version}: {bad}"
    assert len(api["chains"]) == len(requirements["chains"])


def test_same_compute_capability_is_gated_at_10_9(reports):
    """The 10.0-10.8 crash: the member is absent there, and the backend knows it."""
    present = {v: r["api"]["gated"]["HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY"] for v, r in reports.items()}
    assert present == {"10.0.1": False, "10.16.1.11": True, "11.4.0.106": True}


@pytest.mark.parametrize("version", VERSIONS)
def test_call_signatures_match(reports, requirements, version):
    api = reports[version]["api"]
    assert not api["signature_problems"], "\n".join(api["signature_problems"])
    assert len(api["checked_signatures"]) >= 8
    assert "EngineInspector.get_engine_information(1 positional)" in api["checked_signatures"]
    assert "IExecutionContext.execute_async_v3(1 positional)" in api["checked_signatures"]


@pytest.mark.parametrize("version", VERSIONS)
def test_precision_gates_with_the_real_module(reports, version):
    b = reports[version]["behaviour"]
    major = _major(version)
    if major == 10:
        assert b["strongly_typed"] == {"carries": True, "fp32": False, "legacy": False}
        assert b["fp16_legacy"] == {"ok": True, "value": True}
        assert b["validate_legacy"]["ok"] is True
    else:  # always strongly typed: the flag is not asked for
        assert b["strongly_typed"] == {"carries": False, "fp32": False, "legacy": False}
        for key in ("fp16_legacy", "validate_legacy"):
            assert b[key]["ok"] is False and b[key]["type"] == "UserInputError"
            assert "no BuilderFlag.FP16" in b[key]["message"] and "11" in b[key]["message"]
    assert b["fp16_default"] == {"ok": True, "value": False}
    assert b["legacy_int8"]["ok"] is False and "fp16 builds only" in b["legacy_int8"]["message"]
    levels = b["hardware_levels"]
    assert levels["none"] == {"ok": True, "value": "None"}
    assert levels["ampere_plus"] == {"ok": True, "value": "HardwareCompatibilityLevel.AMPERE_PLUS"}
    if _vt(version) >= (10, 9):
        assert levels["same_compute_capability"] == {
            "ok": True,
            "value": "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY",
        }
    else:  # refused with a clear error, not an AttributeError on every build
        same = levels["same_compute_capability"]
        assert same["ok"] is False and same["type"] == "UserInputError" and "10.9" in same["message"]
    assert b["hardware_bad"]["type"] == "UserInputError"
    assert b["nptype"] == {"FLOAT": "float32", "HALF": "float16"}


def _calls(entry) -> list[tuple]:
    return [(c[0], tuple(c[1])) for c in entry["value"]["calls"]]


@pytest.mark.parametrize("version", VERSIONS)
def test_polygraphy_create_config_with_the_real_enums(reports, version):
    """Polygraphy's CreateConfig, run on a recording builder/config with this version's real module."""
    cfg = reports[version]["behaviour"]["config_calls"]
    fp32 = cfg["fp32"]
    assert fp32["ok"] is True, fp32
    calls = _calls(fp32)
    assert ("clear_flag", ("BuilderFlag.TF32",)) in calls  # fp32 is fp32: TF32 cleared
    assert not any(name == "set_flag" for name, _ in calls)
    assert ("set_memory_pool_limit", ("MemoryPoolType.WORKSPACE", 64 << 20)) in calls
    assert ("set builder_optimization_level", (4,)) in calls
    assert ("set profiling_verbosity", ("ProfilingVerbosity.DETAILED",)) in calls
    assert any(name == "set_timing_cache" for name, _ in calls)
    assert fp32["value"]["applied"]["num_profiles"] == 2 and len(fp32["value"]["profiles"]) == 2
    assert fp32["value"]["strongly_typed"] is False
    assert ("set_flag", ("BuilderFlag.TF32",)) in _calls(cfg["tf32"])
    ampere = _calls(cfg["ampere"])
    assert ("set hardware_compatibility_level", ("HardwareCompatibilityLevel.AMPERE_PLUS",)) in ampere
    if _vt(version) >= (10, 9):
        same = _calls(cfg["same_cc"])
        assert ("set hardware_compatibility_level", ("HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY",)) in same
    else:
        assert cfg["same_cc"]["ok"] is False and cfg["same_cc"]["type"] == "UserInputError"
    api = reports[version]["behaviour"]["config_api"]  # what Polygraphy called exists, with that arity
    assert not api["problems"], api["problems"]
    assert {
        "Builder.create_builder_config",
        "IBuilderConfig.clear_flag",
        "IBuilderConfig.set_memory_pool_limit",
        "IBuilderConfig.hardware_compatibility_level",
    } <= set(api["checked"])
    if _major(version) == 10:
        assert ("set_flag", ("BuilderFlag.FP16",)) in _calls(cfg["legacy_fp16"])
    else:
        assert cfg["legacy_fp16"]["ok"] is False and cfg["legacy_fp16"]["type"] == "UserInputError"


@pytest.mark.parametrize("version", VERSIONS)
def test_multires_engine_gets_one_profile_spanning_every_resolution(reports, version):
    """export-multires --backend tensorrt: the builder config Polygraphy makes has ONE profile, R1..Rn x batch 1..16."""
    entry = reports[version]["behaviour"]["config_calls"]["multires"]
    assert entry["ok"] is True, entry
    value = entry["value"]
    assert value["applied"]["num_profiles"] == 1 and len(value["profiles"]) == 1
    profile = value["profiles"][0].replace(" ", "")
    for shape in ("min=(1,3,64,64)", "opt=(8,3,96,96)", "max=(16,3,128,128)"):
        assert shape in profile, profile
    assert ("clear_flag", ("BuilderFlag.TF32",)) in _calls(entry)  # fp32 is fp32 here too


@pytest.mark.parametrize("version", VERSIONS)
def test_backend_fails_cleanly_without_a_gpu(reports, version):
    """Real bindings, stub libraries (and here no GPU): clear errors, never a crash or a nullptr TypeError."""
    b = reports[version]["behaviour"]
    major = _major(version)
    pb = b["polygraphy_build"]  # Polygraphy's NetworkFromOnnxPath reaches trt.Builder: the stub's NULL
    assert pb["ok"] is False and pb["type"] == "EngineBuildError" and "could not create a builder" in pb["message"]
    pl = b["polygraphy_load"]  # EngineFromBytes reaches trt.Runtime
    assert pl["ok"] is False and pl["type"] == "EngineLoadError" and "could not create a runtime" in pl["message"]
    # Without a GPU the device check fails first; with one, the stub's NULL builder/runtime does.
    gpu = b["cuda_device"]
    build_error, build_msg = (
        ("EngineBuildError", "could not create a builder") if gpu else ("CudaError", "no usable CUDA device")
    )
    build = b["build_fp32"]
    assert build["ok"] is True, build  # a recorded failure, not an exception
    art = build["value"]
    assert art["path"] is None and art["meta"]["error_type"] == build_error and build_msg in art["error"]
    assert art["meta"]["tensorrt_version"] == version
    assert art["meta"]["strongly_typed"] is (major >= 11)
    assert art["meta"]["tf32"] is False
    legacy = b["build_legacy_fp16"]
    if major == 10:
        assert legacy["ok"] is True and legacy["value"]["meta"]["error_type"] == build_error
    else:  # refused before any device work
        assert legacy["ok"] is False and legacy["type"] == "UserInputError"
    same = b["build_same_cc"]
    if _vt(version) >= (10, 9):
        assert same["ok"] is True and same["value"]["meta"]["error_type"] == build_error
    else:
        assert same["ok"] is False and same["type"] == "UserInputError"
    act = b["runner_activate"]
    run_error, run_msg = (
        ("EngineLoadError", "could not create a runtime") if gpu else ("CudaError", "no usable CUDA device")
    )
    assert act["ok"] is False and act["type"] == run_error and run_msg in act["message"]
    assert b["runner_active_after_failure"] is False


def test_cuda_python_names_exist():
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (cuda.bindings) not installed")
    chains, calls = cudart_requirements()
    assert {
        "cudaMalloc",
        "cudaMemcpyAsync",
        "cudaStreamBeginCapture",
        "cudaGraphInstantiate",
        "cudaGetDeviceProperties",
        "cudaMemcpyKind.cudaMemcpyHostToDevice",
    } <= chains
    missing = []
    for chain in sorted(chains):
        obj = cudart
        for part in chain.split("."):
            if not hasattr(obj, part):
                missing.append(chain)
                break
            obj = getattr(obj, part)
    assert not missing, f"cuda-python {getattr(cudart, '__file__', '')} lacks {missing}"
    # Arity against the Cython signature line "name(a, b, size_t count, ...)".
    problems = []
    for call in calls:
        doc = (getattr(cudart, call["name"]).__doc__ or "").strip().splitlines()[0]
        inside = doc[doc.index("(") + 1 : doc.rindex(")")]
        n = len([p for p in inside.split(",") if p.strip()])
        if n != call["npos"]:
            problems.append(
                f"{call['file']}:{call['line']} {call['name']} takes {n}, called with {call['npos']}: {doc}"
            )
    assert not problems, "\n".join(problems)


def test_cuda_utils_without_a_gpu():
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (cuda.bindings) not installed")
    from fixres_deploy.backends.cuda_utils import CudaError, check, ensure_device

    assert check(cudart, (cudart.cudaError_t.cudaSuccess, 7), "x") == 7
    assert check(cudart, (cudart.cudaError_t.cudaSuccess,), "x") is None
    with pytest.raises(CudaError, match=r"cudaMalloc\(8\) failed: cudaErrorMemoryAllocation"):
        check(cudart, (cudart.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc(8)")
    err, count = cudart.cudaGetDeviceCount()
    if err == cudart.cudaError_t.cudaSuccess and count > 0:
        pytest.skip("a CUDA device is present: the no-GPU message cannot be checked here")
    with pytest.raises(CudaError, match="no usable CUDA device"):
        ensure_device(cudart)
