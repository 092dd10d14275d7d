#!/usr/bin/env python
"""One-shot GPU check: CUDA helper self-tests, torch CUDA latency per dtype, and every engine path.

Meant for a short, lent GPU session (run it once, keep the JSON and markdown; <= 8 minutes on an
H100/H200 with the defaults). It needs PyTorch with CUDA; cuda-python for the helper self-tests;
TensorRT, Polygraphy and onnxruntime-gpu only for their own sections (each is skipped with its
reason when missing):

* ``cuda-helpers``: fixres_deploy/backends/cuda_utils.py on the device — a pinned host buffer
  round trip, a CUDA graph captured and replayed across a shape switch through ``GraphCache``
  (plain enqueue first, graphs dropped on the switch; results checked after every call), and
  ``EventTimer`` device time against host time;
* ``torch-cuda``: per resolution x batch x {fp32, tf32, fp16, bf16} x {eager, CUDA graph}:
  device latency from CUDA events (host p50 beside it), the FLOP roofline % (model FLOP/s over
  the measured large-matmul peak of that dtype), and agreement with the CPU fp32 reference;
* ``onnxruntime`` (CPU, and CUDA EP with onnxruntime-gpu) and ``tensorrt`` (through the
  project's Polygraphy backend) when installed.

It also runs without a GPU: it says what is missing and measures the CPU parts, so it can be
checked here at a tiny size (``--quick``); ``--dry-run`` prints the plan and exits.

    python tools/gpu_check.py                # on the GPU machine; writes $OUT/gpu_check.{json,md}
    python tools/gpu_check.py --quick        # CPU smoke run
    python tools/gpu_check.py --dry-run

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

    def markdown(self) -> str:
        """The results as a markdown table (what goes into README)."""
        env = self.env
        lines = [
            f"GPU: {env.get('gpu', 'none')} (torch {env.get('torch')}, TensorRT {env.get('tensorrt')}, "
            f"onnxruntime {env.get('onnxruntime')})",
            "",
            "| engine | res | batch | device p50 ms | host p50 ms | img/s | roofline % | top-1 agree | max rel err |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            dev = r.get("device_p50_ms")
            p50 = dev if dev is not None else r["p50_ms"]
            ips = r["batch"] / (p50 / 1e3) if p50 > 0 else float("nan")
            lines.append(
                f"| {r['engine']} | {r['resolution']} | {r['batch']} | {dev if dev is None else f'{dev:.3f}'} | "
                f"{r['p50_ms']:.3f} | {ips:.0f} | {r.get('roofline_pct') if r.get('roofline_pct') is not None else '-'} | "
                f"{r.get('top1_agree', '-')} | {r['max_rel_err']:.1e} |"
                if "max_rel_err" in r
                else f"| {r['engine']} | {r['resolution']} | {r['batch']} | - | {r['p50_ms']:.3f} | {ips:.0f} | - | - | - |"
            )
        for k, v in self.skipped.items():
            lines.append(f"\nskipped {k}: {v}")
        for k, v in self.errors.items():
            lines.append(f"\nFAILED {k}: {v}")
        helpers = env.get("cuda_helpers")
        if helpers:
            lines += ["", "CUDA helper self-tests: " + json.dumps(helpers)]
        return "\n".join(lines) + "\n"

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


def cuda_helper_selftest() -> dict:
    """fixres_deploy/backends/cuda_utils.py on the device; raises on any wrong result."""
    from fixres_deploy.backends.cuda_utils import (
        DeviceBuffer,
        EventTimer,
        GraphCache,
        PinnedBuffer,
        Stream,
        check,
        ensure_device,
        import_cudart,
    )

    cudart = import_cudart()
    ensure_device(cudart)
    out: dict = {}
    n = 1 << 20
    stream = Stream(cudart)
    host, back = PinnedBuffer(cudart, n * 4), PinnedBuffer(cudart, n * 4)
    dev = DeviceBuffer(cudart, n * 4)
    src = host.view(np.float32, (n,))
    src[...] = np.arange(n, dtype=np.float32)
    timer = EventTimer(cudart)
    t0 = time.perf_counter()
    timer.record(0, stream.stream)
    stream.copy_htod(dev.ptr, host.ptr, n * 4)
    timer.record(1, stream.stream)
    timer.record(2, stream.stream)
    stream.copy_dtoh(back.ptr, dev.ptr, n * 4)
    timer.record(3, stream.stream)
    stream.synchronize()
    host_ms = (time.perf_counter() - t0) * 1e3
    if not np.array_equal(back.view(np.float32, (n,)), src):
        raise RuntimeError("pinned round trip returned different data")
    ev = timer.elapsed_ms()
    if not 0 < ev["h2d_ms"] <= host_ms or not 0 < ev["d2h_ms"] <= host_ms:
        raise RuntimeError(f"event times {ev} inconsistent with host time {host_ms:.3f} ms")
    out["pinned_round_trip"] = {"bytes": n * 4, **ev, "host_ms": host_ms}
    # graph capture + replay across a "shape" switch: the enqueue copies `size` floats D2D
    dst = DeviceBuffer(cudart, n * 4)
    size = {"n": 0}
    d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice

    def enqueue():
        check(cudart, cudart.cudaMemcpyAsync(dst.ptr, dev.ptr, size["n"] * 4, d2d, stream.stream), "d2d")

    cache = GraphCache(cudart, stream.stream, enqueue)
    steps = []
    for key in (1024, 1024, 1024, 4096, 4096, 1024):
        check(cudart, cudart.cudaMemsetAsync(dst.ptr, 0, n * 4, stream.stream), "memset")
        size["n"] = key
        steps.append(cache.run(key))
        stream.copy_dtoh(back.ptr, dst.ptr, n * 4)
        stream.synchronize()
        got = back.view(np.float32, (n,))
        if not (np.array_equal(got[:key], src[:key]) and not got[key:].any()):
            raise RuntimeError(f"graph step {len(steps)} ({steps[-1]}, {key} floats) produced wrong data")
    expected = ["plain", "captured", "replayed", "plain", "captured", "plain"]
    if steps != expected:
        raise RuntimeError(f"graph cache steps {steps}, expected {expected}")
    out["graph_cache"] = steps
    cache.invalidate()
    timer.free()
    for buf in (host, back, dev, dst):
        buf.free()
    stream.destroy()
    return out


def matmul_peaks(torch, dtypes) -> dict:
    """Measured large-matmul TFLOP/s per dtype: the roofline's compute ceiling on this GPU."""
    kinds = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    peaks = {}
    n = 8192
    for d in dtypes:
        set_precision(torch, d)
        a = torch.randn(n, n, device="cuda", dtype=kinds[d])
        b = torch.randn(n, n, device="cuda", dtype=kinds[d])
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        peaks[d] = round(2 * n**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12, 1)
    set_precision(torch, "fp32")
    return peaks


def set_precision(torch, dtype: str) -> None:
    """TF32 allowed only for the tf32 cases (PyTorch allows it in cuDNN by default)."""
    from fixres_deploy.backends.torch_backend import set_tf32

    set_tf32(torch, dtype == "tf32")


def model_gflops(model, resolutions, work) -> dict:
    """GFLOPs per image at each resolution (counted on an ONNX export of the model)."""
    from fixres_deploy.core.preprocess import PreprocessConfig
    from fixres_deploy.export.onnx_export import export_onnx
    from fixres_deploy.models.flops import flops_per_image

    path = os.path.join(work, "flops.onnx")
    export_onnx(
        model.to("cpu"),
        path,
        PreprocessConfig(resolutions[0]),
        dynamic=True,
        exporter="torchscript",
        tolerance=None,
        write_sidecar=False,
    )
    return {r: float(flops_per_image(path, r).total_gflops) for r in resolutions}


def torch_case(torch, model, x: np.ndarray, dtype: str, graph: bool, *, warmup: int, iters: int):
    """Device (CUDA events) and host latency of one torch case; returns (latency dict, logits)."""
    import copy

    kinds = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    set_precision(torch, dtype)
    m = copy.deepcopy(model).to("cuda", kinds[dtype]).eval()
    static_in = torch.from_numpy(x).to("cuda", kinds[dtype])
    with torch.inference_mode():
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    m(static_in)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_out = m(static_in)

            def run():
                g.replay()
                return static_out
        else:

            def run():
                return m(static_in)

        for _ in range(warmup):
            run()
        torch.cuda.synchronize()
        dev_ms, host_s = [], []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(iters):
            t0 = time.perf_counter()
            start.record()
            run()
            end.record()
            end.synchronize()
            host_s.append(time.perf_counter() - t0)
            dev_ms.append(start.elapsed_time(end))
        y = run().float().cpu().numpy()
    set_precision(torch, "fp32")
    lat = _percentiles(host_s)
    lat["device_p50_ms"] = float(np.percentile(dev_ms, 50))
    return lat, y


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
    ap.add_argument("--dtypes", default="fp32,tf32,fp16,bf16", help="torch CUDA compute types")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new torch cases after this")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (sections, grid) and exit")
    ap.add_argument("--out", help="folder for gpu_check.json and gpu_check.md (default $OUT)")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.num_classes, args.resolutions, args.batches = "fixres:tiny_resnet", 10, "32,48", "1,2"
        args.iters, args.warmup = 5, 1
    resolutions = [int(r) for r in args.resolutions.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = [d for d in args.dtypes.split(",") if d]
    if args.dry_run:
        plan = {
            "sections": ["torch-cpu", "cuda-helpers", "torch-cuda", "export", "onnxruntime", "tensorrt"],
            "model": args.checkpoint or args.model,
            "torch_cuda_cases": [
                f"{r}px b{b} {d} {g}" for r in resolutions for b in batches for d in dtypes for g in ("eager", "graph")
            ],
            "budget_s": args.budget_s,
        }
        print(json.dumps(plan, indent=1))
        return 0
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
                lat = time_fn(lambda t=t: model(t), warmup=1, iters=cpu_iters)
            chk.add("torch-cpu-fp32", r, b, lat)

    def cuda_helpers():
        if not cuda:
            raise Skip("no CUDA device")
        chk.env["cuda_helpers"] = cuda_helper_selftest()

    def torch_cuda():
        if not cuda:
            raise Skip("CUDA not available to torch")
        peaks = matmul_peaks(torch, dtypes)
        chk.env["matmul_peak_tflops"] = peaks
        gflops = model_gflops(model, resolutions, work)
        chk.env["model_gflops_per_image"] = gflops
        t_end = time.perf_counter() + args.budget_s
        for (r, b), x in inputs.items():
            for dtype in dtypes:
                for graph in (False, True):
                    if time.perf_counter() > t_end:
                        chk.skipped.setdefault("torch-cuda-budget", f"stopped at {r}px b{b} {dtype}: --budget-s")
                        return
                    lat, y = torch_case(torch, model, x, dtype, graph, warmup=args.warmup, iters=args.iters)
                    tflops = gflops.get(r, 0.0) * b / (lat["device_p50_ms"] / 1e3) / 1e3 if gflops.get(r) else None
                    peak = peaks.get(dtype)
                    chk.add(
                        f"torch-cuda-{dtype}{'-graph' if graph else ''}",
                        r,
                        b,
                        lat,
                        agreement(y, refs[(r, b)]),
                        achieved_tflops=tflops,
                        roofline_pct=round(100 * tflops / peak, 1) if tflops and peak else None,
                    )
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
                lat = time_fn(lambda x=x: runner.predict(x), warmup=args.warmup, iters=iters)
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
    chk.section("cuda-helpers", cuda_helpers)
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
        md = os.path.join(out_dir, "gpu_check.md")
        with open(md, "w", encoding="utf-8") as f:
            f.write(chk.markdown())
        print(f"wrote {path} and {md}")
    return 0 if chk.rows else 1


if __name__ == "__main__":
    sys.exit(main())
