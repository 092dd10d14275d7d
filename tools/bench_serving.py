"""Load test of `fixres-deploy serve`: open-loop Poisson arrivals, a steady phase and a burst.

The same trace (arrival times and images, from --seed) is replayed against three servers of
one multires bundle: fixed at the most accurate resolution, fixed at the fastest, and
adaptive. Each request carries a labelled image, so the top-1 of the answers is known per
phase. Open loop: a request is sent at its arrival time whether or not earlier ones were
answered (a closed loop would hide queueing, the thing measured here).

    python tools/bench_serving.py --bundle runs/multires/bundle --images runs/demo/data/val \\
        --slo-p99-ms 100 --out runs/serving

Writes OUT/serving.json, OUT/serving.md (the table) and OUT/serving.png (latency and chosen
resolution over time). Bounded: at most --max-requests per mode, each request times out after
--timeout-s; the servers listen on 127.0.0.1 only. Refusals (503) count as SLO misses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_trace(phases: list[tuple[str, float, float]], n_images: int, seed: int, max_requests: int) -> list[dict]:
    """Poisson arrivals: ``phases`` = [(name, seconds, requests per second)]; images in a shuffled
    cycle (every image about equally often, so the top-1 of the answers estimates the set's)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_images)
    trace, t0 = [], 0.0
    for name, seconds, rate in phases:
        t = t0
        while True:
            t += rng.exponential(1.0 / rate)
            if t >= t0 + seconds or len(trace) >= max_requests:
                break
            trace.append({"t": t, "phase": name, "image": int(order[len(trace) % n_images])})
        t0 += seconds
    return trace


def load_images(folder: str) -> list[tuple[bytes, str]]:
    from fixres_deploy.data.folders import index_image_folder

    index = index_image_folder(folder)
    return [(open(s.path, "rb").read(), index.classes[s.label]) for s in index.samples]


def start_server(args, port: int, fixed: int | None) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "fixres_deploy", "serve", "--bundle", args.bundle, "--slo-p99-ms", str(args.slo_p99_ms),
        "--host", "127.0.0.1", "--port", str(port), "--max-delay-ms", str(args.max_delay_ms),
        "--workers", str(args.workers),
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.max_batch:
        cmd += ["--max-batch", str(args.max_batch)]
    if fixed is not None:
        cmd += ["--fixed-resolution", str(fixed)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


async def replay(port: int, trace: list[dict], images, timeout_s: float) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    results: list[dict] = [dict() for _ in trace]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=timeout_s) as client:
        for _ in range(10):  # warm-up (connections, first batches); not measured
            await client.post("/v1/classify", content=images[0][0], headers={"Content-Type": "image/jpeg"})

        async def one(i: int, item: dict, start: float) -> None:
            delay = start + item["t"] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            data, label = images[item["image"]]
            rec = {"t": sent - start, "phase": item["phase"], "label": label}
            try:
                headers = {"Content-Type": "image/jpeg", "X-Request-Start": f"t={time.time():.6f}"}
                r = await client.post("/v1/classify", content=data, headers=headers)
                rec["status"] = r.status_code
                if r.status_code == 200:
                    body = r.json()
                    rec.update(correct=body["label"] == label, resolution=body["resolution"], batch=body["batch_size"])
            except httpx.HTTPError as exc:
                rec["status"] = 0
                rec["error"] = type(exc).__name__
            rec["latency_ms"] = (time.perf_counter() - sent) * 1e3
            results[i] = rec

        start = time.perf_counter()
        await asyncio.gather(*(one(i, item, start) for i, item in enumerate(trace)))
    return results


def summarize(results: list[dict], phases, slo_ms: float) -> dict:
    out = {}
    for name, seconds, _rate in phases + [("all", sum(p[1] for p in phases), None)]:
        rs = [r for r in results if name == "all" or r["phase"] == name]
        ok = [r for r in rs if r.get("status") == 200]
        lat = np.array([r["latency_ms"] for r in ok]) if ok else np.array([np.nan])
        late = sum(1 for r in ok if r["latency_ms"] > slo_ms)
        res_counts: dict[int, int] = {}
        for r in ok:
            res_counts[r["resolution"]] = res_counts.get(r["resolution"], 0) + 1
        out[name] = {
            "sent": len(rs),
            "ok": len(ok),
            "refused_503": sum(1 for r in rs if r.get("status") == 503),
            "failed": sum(1 for r in rs if r.get("status") not in (200, 503)),
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "slo_misses": late + (len(rs) - len(ok)),
            "slo_miss_rate": (late + len(rs) - len(ok)) / max(1, len(rs)),
            "throughput_rps": len(ok) / seconds,
            "top1": float(np.mean([r["correct"] for r in ok])) if ok else float("nan"),
            "resolutions": dict(sorted(res_counts.items())),
        }
    return out


def table(summary: dict, phases, slo_ms: float) -> str:
    lines = [
        f"| mode | phase | sent | p50 ms | p99 ms | SLO misses (>{slo_ms:g} ms or 503) | 503 | throughput rps | top-1 | resolutions served |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, per in summary.items():
        for name in [p[0] for p in phases] + ["all"]:
            s = per[name]
            res = ", ".join(f"{r}:{c}" for r, c in s["resolutions"].items())
            lines.append(
                f"| {mode} | {name} | {s['sent']} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                f"{s['slo_misses']} ({100 * s['slo_miss_rate']:.1f}%) | {s['refused_503']} | {s['throughput_rps']:.1f} | "
                f"{s['top1']:.3f} | {res} |"
            )
    return "\n".join(lines)


def plot(all_results: dict, phases, slo_ms: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colors = {"fixed-most-accurate": "tab:red", "fixed-fastest": "tab:blue", "adaptive": "tab:green"}
    for mode, results in all_results.items():
        ok = [r for r in results if r.get("status") == 200]
        ax1.scatter(
            [r["t"] for r in ok], [r["latency_ms"] for r in ok], s=4, alpha=0.5, label=mode, color=colors.get(mode)
        )
        refused = [r for r in results if r.get("status") == 503]
        if refused:
            ax1.scatter(
                [r["t"] for r in refused], [slo_ms * 0.05] * len(refused), marker="x", s=8, color=colors.get(mode)
            )
        ax2.scatter(
            [r["t"] for r in ok], [r["resolution"] for r in ok], s=4, alpha=0.4, label=mode, color=colors.get(mode)
        )
    ax1.axhline(slo_ms, color="k", ls="--", lw=1, label=f"SLO {slo_ms:g} ms")
    t = 0.0
    for name, seconds, _ in phases:
        if name.startswith("burst"):
            for ax in (ax1, ax2):
                ax.axvspan(t, t + seconds, color="0.9", zorder=0)
        t += seconds
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms), x: 503")
    ax1.legend(loc="upper left", fontsize=8)
    ax2.set_ylabel("resolution served (px)")
    ax2.set_xlabel("time (s); shaded: burst")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="a multires bundle (fixres-deploy export-multires --bundle)")
    p.add_argument("--images", required=True, help="labelled image folder ROOT/<class>/<image> (the bundle's classes)")
    p.add_argument("--slo-p99-ms", type=float, default=100.0)
    p.add_argument("--steady-rps", type=float, default=20.0)
    p.add_argument("--burst-rps", type=float, default=120.0)
    p.add_argument("--steady-s", type=float, default=10.0)
    p.add_argument("--burst-s", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=3000, help="per mode")
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument("--modes", default="fixed-most-accurate,fixed-fastest,adaptive")
    p.add_argument("--threads", type=int, default=1, help="the server's ONNX Runtime threads")
    p.add_argument("--workers", type=int, default=1, help="the server's preprocessing threads")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/serving")
    args = p.parse_args(argv)

    sys.path.insert(0, REPO)
    from fixres_deploy.ship.manifest import load_manifest

    manifest = load_manifest(args.bundle)
    if manifest.multires is None:
        raise SystemExit(f"{args.bundle} is not a multires bundle")
    mr = manifest.multires
    acc = {a["resolution"]: a["top1"] for a in mr.accuracy}
    most_accurate = max(mr.resolutions, key=lambda r: (acc.get(r) or 0.0, r))
    rows = dict(zip(mr.resolutions, mr.latency["service_ms"]))
    fastest = min(mr.resolutions, key=lambda r: rows[r][-1])
    images = load_images(args.images)
    phases = [
        ("steady", args.steady_s, args.steady_rps),
        ("burst", args.burst_s, args.burst_rps),
        ("after", args.steady_s, args.steady_rps),
    ]
    trace = make_trace(phases, len(images), args.seed, args.max_requests)
    modes = {"fixed-most-accurate": most_accurate, "fixed-fastest": fastest, "adaptive": None}
    all_results, summary = {}, {}
    for mode in args.modes.split(","):
        port = _free_port()
        proc = start_server(args, port, modes[mode])
        try:
            wait_ready(port, proc)
            results = asyncio.run(replay(port, trace, images, args.timeout_s))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        all_results[mode] = results
        summary[mode] = summarize(results, phases, args.slo_p99_ms)
        s = summary[mode]
        print(
            f"{mode}: steady p99 {s['steady']['p99_ms']:.1f} ms top-1 {s['steady']['top1']:.3f}; "
            f"burst p99 {s['burst']['p99_ms']:.1f} ms top-1 {s['burst']['top1']:.3f}, misses {s['burst']['slo_misses']}",
            flush=True,
        )
    os.makedirs(args.out, exist_ok=True)
    doc = {
        "bundle": os.path.abspath(args.bundle),
        "slo_p99_ms": args.slo_p99_ms,
        "phases": [{"name": n, "seconds": s, "rps": r} for n, s, r in phases],
        "requests_per_mode": len(trace),
        "resolutions": mr.resolutions,
        "accuracy": mr.accuracy,
        "latency_table": {"batch_sizes": mr.latency["batch_sizes"], "service_ms": mr.latency["service_ms"]},
        "modes": {m: (modes[m] if modes[m] is not None else "adaptive") for m in summary},
        "summary": summary,
        "args": vars(args),
    }
    with open(os.path.join(args.out, "serving.json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = table(summary, phases, args.slo_p99_ms)
    with open(os.path.join(args.out, "serving.md"), "w") as f:
        f.write(md + "\n")
    plot(all_results, phases, args.slo_p99_ms, os.path.join(args.out, "serving.png"))
    print(md)
    print(f"wrote {args.out}/serving.json, serving.md, serving.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
