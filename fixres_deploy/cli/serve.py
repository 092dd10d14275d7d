"""`fixres-deploy export-multires` and `fixres-deploy serve`: adaptive-resolution serving.

Imports nothing heavy at module level (the library is imported inside the handlers).
"""

from __future__ import annotations

import argparse

from fixres_deploy.cli.app import _emit, command


@command("export-multires")
def cmd_export_multires(args: argparse.Namespace) -> int:
    from fixres_deploy.core.utils import parse_int_list

    checkpoints = list(args.checkpoints)
    if args.bundle:
        from fixres_deploy.export.multires import build_multires_bundle

        out = build_multires_bundle(
            checkpoints,
            args.bundle,
            work_dir=args.work_dir,
            backend=args.backend,
            precision=args.precision,
            validation_data=args.validation_data,
            val_data=args.val_data,
            val_limit=args.val_limit or None,
            calibration_data=args.calibration_data,
            max_batch=args.max_batch,
            batch_sizes=parse_int_list(args.batch_sizes, "--batch-sizes"),
            threads=args.threads,
            workers=args.workers,
            latency_images=args.latency_images,
            repeats=args.repeats,
            exporter=args.exporter,
            overwrite=args.overwrite,
            tar=args.tar,
            triton_repo=args.triton,
        )

        def human(d: dict) -> str:
            mr = d["multires"]
            acc = {a["resolution"]: a["top1"] for a in mr["accuracy"]}
            lines = [f"bundle {d['bundle']} (ONNX {d['onnx']}); service ms per batch {mr['latency']['batch_sizes']}:"]
            for r, row in zip(mr["resolutions"], mr["latency"]["service_ms"]):
                top1 = f"{acc[r]:.4f}" if acc.get(r) is not None else "n/a"
                lines.append(f"  {r:>4} px  top-1 {top1}  " + "  ".join(f"{v:8.2f}" for v in row))
            if d.get("triton"):
                lines.append(f"Triton model repository: {d['triton']}")
            return "\n".join(lines)

        _emit(args, out, human)
        return 0
    if not args.out:
        from fixres_deploy.core.errors import UserInputError

        raise UserInputError(
            "give --out FILE.onnx (the head-bank graph) or --bundle DIR (graph, engine, measured bundle)"
        )
    from fixres_deploy.export.multires import export_multires

    result, fset = export_multires(checkpoints, args.out, validation_data=args.validation_data, exporter=args.exporter)
    d = {**result.to_dict(), "resolutions": fset.resolutions}
    _emit(
        args,
        d,
        lambda _: (
            f"wrote {result.path}: heads for {fset.resolutions} px, largest difference to the checkpoints "
            f"{(result.validation or {}).get('max_abs_diff', float('nan')):.3g}"
        ),
    )
    return 0


@command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    from fixres_deploy.ship.serve.app import ServerConfig, serve

    config = ServerConfig(
        slo_p99_ms=args.slo_p99_ms,
        fixed_resolution=args.fixed_resolution,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        max_queue=args.max_queue,
        margin=args.margin,
    )
    serve(
        args.bundle,
        config,
        host=args.host,
        port=args.port,
        threads=args.threads,
        workers=args.workers,
        verify=not args.no_verify,
    )
    return 0


def _export_multires_parser(sub) -> None:
    p = sub.add_parser(
        "export-multires",
        help="one ONNX graph (and bundle) serving every FixRes resolution: shared trunk, head bank",
        description="From FixRes checkpoints of ONE base model at R1..Rn (fixres-deploy finetune --resolutions), "
        "export one dynamic-shape graph whose head (adapted BatchNorm folded to scale/shift + classifier) is "
        "chosen from the input height, validated against each checkpoint at its resolution. With --bundle, "
        "also build the engine, measure top-1 and the latency table per (resolution, batch) on this machine, "
        "and write a bundle for `fixres-deploy serve`.",
    )
    p.add_argument("--checkpoints", nargs="+", required=True, help="FixRes checkpoints, one per resolution")
    p.add_argument("--out", help="write only the head-bank ONNX here")
    p.add_argument("--bundle", help="write a multires bundle (for fixres-deploy serve) here")
    p.add_argument("--work-dir", help="where the ONNX, variants and engine are made (default BUNDLE.work)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    p.add_argument("--validation-data", help="images for the export validation (default: rendered demo images)")
    p.add_argument("--val-data", help="labelled image folder: the engine's top-1 per resolution goes in the manifest")
    p.add_argument(
        "--val-limit",
        type=int,
        default=400,
        help="score at most N --val-data images, class-balanced (default 400; 0: all of them)",
    )
    p.add_argument("--calibration-data", help="int8: images like the deployment's (calibrated at every resolution)")
    p.add_argument("--max-batch", type=int, default=16, help="the engine's largest batch (default 16)")
    p.add_argument("--batch-sizes", default="1,2,4,8,16", help="latency table columns (default 1,2,4,8,16)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads while timing (use the server's)")
    p.add_argument("--workers", type=int, default=2, help="preprocessing threads while timing (use the server's)")
    p.add_argument("--latency-images", help="image folder timing the table (default: rendered demo images)")
    p.add_argument("--repeats", type=int, default=7, help="timing repeats per table cell (median kept)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript", "auto"])
    p.add_argument("--triton", help="also write a Triton model repository here")
    p.add_argument("--tar", action="store_true", help="also write BUNDLE.tar.gz")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP inference server that picks the resolution per batch to meet a p99 latency objective",
        description="Serve a multires bundle (export-multires --bundle) over HTTP: the Open Inference "
        "Protocol (KServe v2: /v2/health/ready, /v2/models/NAME, /v2/models/NAME/infer), POST /v1/classify "
        "(image bytes), /healthz and /metrics (Prometheus). Requests are batched; each batch runs at the "
        "most accurate resolution whose predicted completion keeps its requests within --slo-p99-ms; "
        "requests that cannot be served in time even at the lowest resolution get 503 with Retry-After. "
        "Needs: pip install 'fixres-deploy[serve]'.",
    )
    p.add_argument("--bundle", required=True, help="a multires bundle folder or .tar.gz")
    p.add_argument("--slo-p99-ms", type=float, required=True, help="latency objective, arrival to answer (ms)")
    p.add_argument("--fixed-resolution", type=int, help="serve only this resolution (no adaptation)")
    p.add_argument("--max-batch", type=int, help="most requests per batch (default: engine max, at most 16)")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest wait for a batch to fill (default 5)")
    p.add_argument("--max-queue", type=int, default=512, help="hard bound of waiting requests (default 512)")
    p.add_argument("--margin", type=float, default=0.8, help="fraction of the objective the policy plans with")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--workers", type=int, default=2, help="preprocessing threads (default 2)")
    p.add_argument("--no-verify", action="store_true", help="skip the bundle's hash and compatibility checks")


PARSERS = [_export_multires_parser, _serve_parser]
