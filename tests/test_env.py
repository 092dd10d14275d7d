"""core/env: library versions by the distribution that provides a module, CPU facts from cpuinfo.

Distributions are simulated with real ``.dist-info`` folders on a temporary ``sys.path`` (the
same metadata pip writes), so importlib.metadata itself does the lookups.
"""

from __future__ import annotations

import sys

import pytest

from fixres_deploy.core import env


@pytest.fixture(autouse=True)
def _fresh_cache():
    env.clear_cache()
    yield
    env.clear_cache()


def _fake_dist(site, name: str, version: str, files: list[str]) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files + [f"{info.name}/METADATA"]))


def test_installed_onnxruntime_is_named_by_its_distribution():
    import onnxruntime

    rec = env.library("onnxruntime")
    assert rec["distribution"] == "onnxruntime" and rec["version"] == onnxruntime.__version__
    assert env.library("no_such_module_xyz") is None
    versions = env.library_versions("onnxruntime", "numpy")
    assert set(versions) == {"onnxruntime", "numpy"} and versions["numpy"]["distribution"] == "numpy"


def test_gpu_and_cuda_distributions_change_the_record(tmp_path, monkeypatch):
    plain = env.library_versions("onnxruntime", "tensorrt")
    site = tmp_path / "site"
    _fake_dist(site, "onnxruntime-gpu", "1.20.1", ["onnxruntime/__init__.py"])
    _fake_dist(site, "tensorrt-cu12-bindings", "10.16.0", ["tensorrt/__init__.py"])
    _fake_dist(site, "tensorrt-cu12-libs", "10.16.0", ["tensorrt_libs/__init__.py"])
    _fake_dist(site, "cuda-bindings", "12.9.0", ["cuda/bindings/__init__.py"])
    monkeypatch.setattr(sys, "path", [str(site)])
    env.clear_cache()
    recs = env.library_versions("onnxruntime", "tensorrt", "tensorrt_libs", "cuda")
    assert recs["onnxruntime"] == {"distribution": "onnxruntime-gpu", "version": "1.20.1"}
    assert recs["tensorrt"] == {"distribution": "tensorrt-cu12-bindings", "version": "10.16.0"}
    assert recs["tensorrt_libs"]["distribution"] == "tensorrt-cu12-libs"
    assert recs["cuda"] == {"distribution": "cuda-bindings", "version": "12.9.0"}
    # a store key built from these differs from the one built from the plain install
    assert {k: recs[k] for k in plain} != plain

    # an upgrade of the GPU wheel changes the record too
    site2 = tmp_path / "site2"
    _fake_dist(site2, "onnxruntime-gpu", "1.21.0", ["onnxruntime/__init__.py"])
    monkeypatch.setattr(sys, "path", [str(site2)])
    env.clear_cache()
    assert env.version_of("onnxruntime") == "1.21.0"


def test_two_distributions_of_one_module_are_both_listed(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _fake_dist(site, "cuda-python", "12.9.0", ["cuda/__init__.py"])
    _fake_dist(site, "cuda-bindings", "12.9.0", ["cuda/bindings/__init__.py"])
    monkeypatch.setattr(sys, "path", [str(site)])
    env.clear_cache()
    rec = env.library("cuda")
    assert rec["distributions"] == {"cuda-bindings": "12.9.0", "cuda-python": "12.9.0"}


def test_cpuinfo_parsed_from_a_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse avx2 avx512_vnni\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse avx2 avx512_vnni\n"
    )
    info = env.cpu_info(str(path))
    assert info.model == "Intel(R) Xeon(R) Platinum 8480+" and info.logical_cores == 2 and info.has_vnni
    path2 = tmp_path / "cpuinfo2"
    path2.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma f16c\n")
    assert not env.cpu_info(str(path2)).has_vnni and "fma" in env.cpu_info(str(path2)).flags
    missing = env.cpu_info(str(tmp_path / "absent"))
    assert missing.flags == frozenset() and not missing.has_vnni


def test_compute_capability_forms():
    assert env.normalize_compute_capability((8, 9)) == "8.9"
    assert env.normalize_compute_capability("sm_89") == "8.9"
    assert env.normalize_compute_capability(90) == "9.0"
    assert env.normalize_compute_capability("x") is None
