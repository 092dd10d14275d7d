#!/usr/bin/env python
"""One-shot GPU check: latency and agreement of every engine path this project has.

Meant for a short, lent GPU session (run it once, keep the JSON): torch eager fp32/fp16 on
CUDA per resolution, ONNX Runtime CPU vs its CUDA execution provider (when onnxruntime-gpu is
installed), and TensorRT (when importable) through fixres_deploy's own backend — one dynamic
engine per precision over the resolutions, plus a fixed engine at the middle resolution
(static vs dynamic is itself a result), with and without CUDA graphs. Every engine's
output is compared with torch fp32 on the same input (relative error, top-1 agreement).

It also runs without a GPU: it says what is missing and measures the CPU parts, so it can be
checked here at a tiny size:

    python tools/gpu_check.py --quick

Latencies are end to end per ``predict`` call (host numpy in, host numpy out: copies
included), p50/p90 over ``--iters`` calls after ``--warmup``.

Output: a table on stdout; JSON to ``$OUT/gpu_check.json`` when ``$OUT`` is set (or ``--out``).
Each section catches its own failure and records it, so one broken path never hides the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _percentiles(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "iters": len(ms),
    }


def time_fn(fn, *, warmup: int, iters: int, sync=None) -> dict:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return _percentiles(times)


def agreement(y: np.ndarray, ref: np.ndarray) -> dict:
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    scale = float(np.abs(ref).max()) or 1.0
    cos = (y * ref).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    return {
        "max_rel_err": float(np.abs(y - ref).max() / scale),
        "min_cosine": float(cos.min()),
        "top1_agree": float((y.argmax(1) == ref.argmax(1)).mean()),
    }


class Skip(Exception):
    """A section that cannot run on this machine (no CUDA, library missing): reported, not an error."""


class Check:
    """Collects rows and section errors; never lets one section stop the others."""

    def __init__(self):
        self.rows: list[dict] = []
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.env: dict = {}

    def section(self, name: str, fn) -> None:
        from fixres_deploy.core.errors import MissingDependencyError

        t0 = time.perf_counter()
        try:
            fn()
        except (Skip, MissingDependencyError) as exc:
            self.skipped[name] = str(exc).splitlines()[0]
            print(f"[{name}] skipped: {self.skipped[name]}", file=sys.stderr)
        except Exception as exc:  # recorded: the point of the script is to report everything it can
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"[{name}] FAILED: {self.errors[name]}", file=sys.stderr)
            traceback.print_exc(limit=3, file=sys.stderr)
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def add(self, engine: str, res: int, batch: int, lat: dict, agree: dict | None = None, **extra) -> None:
        row = {"engine": engine, "resolution": res, "batch": batch, **lat, **(agree or {}), **extra}
        self.rows.append(row)
        print(
            f"  {engine:<34} {res:>4} b{batch:<3} p50 {lat['p50_ms']:8.3f} ms"
            + (f"  top1 {agree['top1_agree']:.3f} rel {agree['max_rel_err']:.1e}" if agree else ""),
            file=sys.stderr,
        )

    def table(self) -> str:
        lines = [
            f"{'engine':<34} {'res':>4} {'batch':>5} {'p50_ms':>9} {'p90_ms':>9} {'img/s':>9} {'top1':>6} {'rel_err':>8}"
        ]
        for r in self.rows:
            ips = r["batch"] / (r["p50_ms"] / 1e3) if r["p50_ms"] > 0 else float("nan")
            top1 = f"{r['top1_agree']:.3f}" if "top1_agree" in r else "-"
            rel = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
            lines.append(
                f"{r['engine']:<34} {r['resolution']:>4} {r['batch']:>5} {r['p50_ms']:>9.3f} "
                f"{r['p90_ms']:>9.3f} {ips:>9.1f} {top1:>6} {rel:>8}"
            )
        for k, v in self.skipped.items():
            lines.append(f"skipped {k}: {v}")
        for k, v in self.errors.items():
            lines.append(f"FAILED {k}: {v}")
        return "\n".join(lines)


def environment() -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count()}
    import torch

    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.cuda.is_available()
    if env["torch_cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["ort_providers"] = ort.get_available_providers()
    except ImportError as exc:
        env["onnxruntime"] = f"missing ({exc})"
    try:
        from fixres_deploy.backends.tensorrt_backend import import_tensorrt

        env["tensorrt"] = import_tensorrt().__version__
    except ImportError as exc:
        env["tensorrt"] = f"missing ({str(exc).splitlines()[0][:120]})"
    try:
        from fixres_deploy.backends.cuda_utils import device_info, ensure_device, import_cudart

        cudart = import_cudart()
        ensure_device(cudart)
        env["cuda_device"] = device_info(cudart)
    except Exception as exc:  # no driver, no device, no cuda-python: all just facts to report
        env["cuda_device"] = f"unavailable ({type(exc).__name__}: {str(exc)[:160]})"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="torchvision:resnet50", help="model spec (random weights unless --checkpoint)")
    ap.add_argument("--checkpoint", help="fixres-deploy checkpoint (its model spec and weights)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--resolutions", default="160,224,288")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--trt-opt-level", type=int, default=3)
    ap.add_argument("--no-fixed", action="store_true", help="skip the fixed-shape TensorRT engine")
    ap.add_argument("--cpu-iters", type=int, help="iterations for CPU paths (default: iters/5, at least 3)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 resolutions, few iterations (a smoke run)")
    ap.add_argument("--out", help="folder for gpu_check.json (default $OUT)")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.num_classes, args.resolutions, args.batches = "fixres:tiny_resnet", 10, "32,48", "1,2"
        args.iters, args.warmup = 5, 1
    resolutions = [int(r) for r in args.resolutions.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    cpu_iters = args.cpu_iters or max(3, args.iters // 5)
    os.environ.setdefault("FIXRES_NO_PROGRESS", "1")

    import torch

    from fixres_deploy.models.registry import build_model, load_model

    chk = Check()
    chk.env = environment()
    print(json.dumps(chk.env, indent=1), file=sys.stderr)
    cuda = bool(chk.env.get("torch_cuda"))
    if not cuda:
        print("CUDA is not available: running the CPU parts only (torch CPU, ONNX Runtime CPU)", file=sys.stderr)

    if args.checkpoint:
        model = load_model(None, checkpoint=args.checkpoint).model
    else:
        torch.manual_seed(0)
        model = build_model(args.model, args.num_classes)[0]
    model.eval()
    rng = np.random.default_rng(0)
    inputs = {(r, b): rng.standard_normal((b, 3, r, r)).astype(np.float32) for r in resolutions for b in batches}
    with torch.inference_mode():
        refs = {k: model(torch.from_numpy(x)).numpy() for k, x in inputs.items()}

    work = tempfile.mkdtemp(prefix="gpu_check_")
    onnx_path = os.path.join(work, "model.onnx")

    def torch_cpu():
        for (r, b), x in inputs.items():
            t = torch.from_numpy(x)
            with torch.inference_mode():
                lat = time_fn(lambda: model(t), warmup=1, iters=cpu_iters)
            chk.add("torch-cpu-fp32", r, b, lat)

    def torch_cuda():
        if not cuda:
            raise Skip("CUDA not available to torch")
        dev = torch.device("cuda")
        m32 = model.to(dev)
        import copy

        m16 = copy.deepcopy(m32).half()
        for (r, b), x in inputs.items():
            t = torch.from_numpy(x).to(dev)
            with torch.inference_mode():
                lat = time_fn(lambda: m32(t), warmup=args.warmup, iters=args.iters, sync=torch.cuda.synchronize)
                chk.add("torch-cuda-fp32", r, b, lat, agreement(m32(t).float().cpu().numpy(), refs[(r, b)]))
                t16 = t.half()
                lat = time_fn(lambda: m16(t16), warmup=args.warmup, iters=args.iters, sync=torch.cuda.synchronize)
                chk.add("torch-cuda-fp16", r, b, lat, agreement(m16(t16).float().cpu().numpy(), refs[(r, b)]))
        model.to("cpu")

    def export():
        from fixres_deploy.core.preprocess import PreprocessConfig
        from fixres_deploy.export.onnx_export import export_onnx

        res = export_onnx(
            model.to("cpu"),
            onnx_path,
            PreprocessConfig(resolutions[len(resolutions) // 2]),
            dynamic=True,
            exporter="torchscript" if args.quick else "auto",
            tolerance=None,
            write_sidecar=False,
        )
        chk.env["export"] = {"exporter": res.exporter, "export_s": res.export_s, "fallback": res.fallback_reason}

    def run_artifact(label: str, art, **runner_options):
        from fixres_deploy.backends import load_runner

        if art.error:
            raise RuntimeError(f"{label} build failed: {art.error}")
        with load_runner(art, **runner_options) as runner:
            for (r, b), x in inputs.items():
                try:
                    art.shapes.check(x.shape)
                except ValueError:
                    continue
                y = runner.predict(x)
                iters = cpu_iters if "cpu" in label else args.iters
                lat = time_fn(lambda: runner.predict(x), warmup=args.warmup, iters=iters)
                chk.add(label, r, b, lat, agreement(y, refs[(r, b)]), build_s=round(art.build_s, 2))

    def ort():
        from fixres_deploy.backends import BuildOptions, ShapeSpec, build_engine

        shapes = ShapeSpec.resolution_bands(resolutions, max_batch=max(batches))
        art = build_engine(
            "onnxruntime",
            onnx_path,
            shapes,
            BuildOptions(save_optimized=False),
            out_dir=os.path.join(work, "ort"),
            name="ort_cpu",
        )
        run_artifact("ort-cpu-fp32", art)
        if "CUDAExecutionProvider" in chk.env.get("ort_providers", []):
            art = build_engine(
                "onnxruntime",
                onnx_path,
                shapes,
                BuildOptions(providers=["CUDAExecutionProvider", "CPUExecutionProvider"], save_optimized=False),
                out_dir=os.path.join(work, "ort"),
                name="ort_cuda",
            )
            run_artifact("ort-cuda-fp32", art)
        else:
            chk.env["ort_cuda"] = "CUDAExecutionProvider not available (needs onnxruntime-gpu)"

    def tensorrt():
        from fixres_deploy.backends import BuildOptions, ShapeSpec, build_engine
        from fixres_deploy.backends.tensorrt_backend import import_tensorrt, trt_major

        trt = import_tensorrt()
        if not cuda:
            raise Skip("TensorRT needs a CUDA GPU")
        out = os.path.join(work, "trt")
        cache = os.path.join(work, "trt.timing.cache")
        base = dict(timing_cache=cache, optimization_level=args.trt_opt_level, workspace_mb=4096)
        shapes = ShapeSpec.resolution_bands(resolutions, max_batch=max(batches), opt_batch=batches[0])
        fp16_src, fp16_opts = onnx_path, BuildOptions(**base, legacy_fp16_flag=True)
        if trt_major(trt) >= 11:  # no FP16 flag: build from an fp16 graph
            from fixres_deploy.precision.variants import make_precision_variant

            fp16_src = make_precision_variant(onnx_path, "fp16", os.path.join(work, "model.fp16.onnx")).path
            fp16_opts = BuildOptions(**base)
        art32 = build_engine("tensorrt", onnx_path, shapes, BuildOptions(**base), out_dir=out, name="trt_fp32_dyn")
        chk.env["trt_fp32_meta"] = {
            k: art32.meta.get(k) for k in ("gpu", "strongly_typed", "num_layers", "timing_cache")
        }
        run_artifact("trt-fp32-dynamic", art32)
        art16 = build_engine(
            "tensorrt", fp16_src, shapes, fp16_opts, out_dir=out, name="trt_fp16_dyn", precision="fp16"
        )
        run_artifact("trt-fp16-dynamic", art16)
        run_artifact("trt-fp16-dynamic-cudagraph", art16, cuda_graph=True)
        if not args.no_fixed:
            mid = resolutions[len(resolutions) // 2]
            for b in batches:
                art = build_engine(
                    "tensorrt",
                    fp16_src,
                    ShapeSpec.fixed(b, mid),
                    fp16_opts,
                    out_dir=out,
                    name=f"trt_fp16_r{mid}_b{b}",
                    precision="fp16",
                )
                run_artifact("trt-fp16-fixed", art)
                run_artifact("trt-fp16-fixed-cudagraph", art, cuda_graph=True)

    chk.section("torch-cpu", torch_cpu)
    chk.section("torch-cuda", torch_cuda)
    chk.section("export", export)
    if os.path.isfile(onnx_path):
        chk.section("onnxruntime", ort)
        chk.section("tensorrt", tensorrt)

    print(chk.table())
    out_dir = args.out or os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "gpu_check.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(
                {"env": chk.env, "rows": chk.rows, "errors": chk.errors, "skipped": chk.skipped, "args": vars(args)},
                f,
                indent=1,
                default=str,
            )
        print(f"wrote {path}")
    return 0 if chk.rows else 1


if __name__ == "__main__":
    sys.exit(main())
