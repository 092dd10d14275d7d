"""CLI for shipping: `bundle` (make / verify), `predict` (torch-free runtime), `triton`.

Nothing heavy is imported at module level (see fixres_deploy.cli.app).
"""

from __future__ import annotations

import argparse
import json
import sys

from fixres_deploy.cli.app import _emit, command

VERIFY_FAILED_EXIT = 3


def _read_json_arg(path: str | None):
    if not path:
        return None
    from fixres_deploy.core.utils import read_json

    return read_json(path)


def _read_labels(path: str | None) -> list[str] | None:
    if not path:
        return None
    from fixres_deploy.core.errors import UserInputError

    try:
        with open(path, encoding="utf-8") as f:
            return [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError as exc:
        raise UserInputError(f"cannot read labels file '{path}': {exc}") from exc


def _triton_options(args: argparse.Namespace) -> dict:
    from fixres_deploy.core.utils import parse_int_list

    return {
        "model_name": args.model_name,
        "max_batch_size": args.max_batch_size,
        "dynamic_batching": not args.no_dynamic_batching,
        "preferred_batch_sizes": parse_int_list(args.preferred_batch_sizes, "--preferred-batch-sizes")
        if args.preferred_batch_sizes
        else None,
        "max_queue_delay_us": args.max_queue_delay_us,
        "instance_count": args.instance_count,
        "kind": args.kind,
        "overwrite": args.overwrite,
    }


def _add_triton_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Triton model configuration")
    g.add_argument("--model-name", help="model folder / name in the repository (default: the bundle folder's name)")
    g.add_argument(
        "--max-batch-size",
        type=int,
        help="dynamic-batch engines: at most the profile max (default); fixed-batch engines get 0",
    )
    g.add_argument("--no-dynamic-batching", action="store_true", help="leave out the dynamic_batching block")
    g.add_argument("--preferred-batch-sizes", help="comma-separated (default: the profiles' opt batches above 1)")
    g.add_argument("--max-queue-delay-us", type=int, default=100, help="dynamic batcher queue delay")
    g.add_argument("--instance-count", type=int, default=1)
    g.add_argument(
        "--kind",
        choices=["KIND_CPU", "KIND_GPU", "KIND_AUTO"],
        help="instance kind (default: KIND_GPU for TensorRT, KIND_CPU for ONNX Runtime)",
    )


# --------------------------------------------------------------------------- bundle


@command("bundle")
def cmd_bundle(args: argparse.Namespace) -> int:
    if args.verify:
        from fixres_deploy.ship.verify import verify_bundle

        report = verify_bundle(args.verify, backend=args.backend)
        if args.json:
            print(json.dumps(report.to_dict()))
        elif report.ok:
            print(f"OK {report.path} ({report.backend} engine {report.engine})")
            for note in report.notes:
                print(f"  note: {note}")
        else:
            print(f"REFUSED {report.path}:")
            for problem in report.problems:
                print(f"  - {problem}")
        return 0 if report.ok else VERIFY_FAILED_EXIT
    from fixres_deploy.core.errors import UserInputError
    from fixres_deploy.ship.bundle import bundle_from_index

    missing = [
        flag
        for flag, value in (("--index", args.index), ("--artifact", args.artifact), ("--out", args.out))
        if value is None
    ]
    if missing:
        raise UserInputError(f"bundle: give --verify DIR, or {', '.join(missing)} to make a bundle")
    result = bundle_from_index(
        args.index,
        args.artifact,
        args.out,
        checkpoint=args.checkpoint,
        metrics=_read_json_arg(args.metrics),
        selection=_read_json_arg(args.selection),
        labels=_read_labels(args.labels),
        tar=args.tar,
        overwrite=args.overwrite,
        triton_repo=args.triton,
        triton_options=_triton_options(args) if args.triton else None,
    )
    from fixres_deploy.ship.manifest import read_manifest

    m = read_manifest(result["manifest"]).to_dict()
    _emit(
        args,
        result | {"files": len(m["files"]) + 1},
        lambda r: "\n".join(
            [
                f"bundle  {r['dir']}  ({m['backend']} {m['precision']} @{m['resolution']}px, "
                f"{m['shape_mode']} shapes, {len(m['class_names'])} classes, {r['files']} files)"
            ]
            + ([f"tar     {r['tar']}"] if r["tar"] else [])
            + ([f"triton  {r['triton']}"] if r["triton"] else [])
        ),
    )
    return 0


def _bundle_parser(sub) -> None:
    p = sub.add_parser(
        "bundle",
        help="make a production bundle from a build index, or verify one",
        description="Make: copy one built engine, its ONNX source, labels and the exact preprocessing into a "
        "folder with a manifest of sha256 hashes and versions. Verify (--verify): check a bundle folder or "
        ".tar.gz before trusting it (exit 3 with the reasons when refused).",
    )
    p.add_argument("--verify", metavar="DIR", help="verify a bundle folder or .tar.gz instead of making one")
    p.add_argument("--backend", help="with --verify: the backend that will run it (default: the primary engine's)")
    p.add_argument("--index", help="BUILD_DIR/index.json written by fixres-deploy build")
    p.add_argument("--artifact", help="which artifact of the index: its position (0-based) or key/name")
    p.add_argument("--out", help="bundle folder to create")
    p.add_argument(
        "--checkpoint", help="the checkpoint the engine came from (recorded: spec, sha256, fine-tune resolution)"
    )
    p.add_argument("--labels", help="class names file (one per line) when the ONNX metadata has none")
    p.add_argument("--metrics", help="JSON file of the selected operating point's metrics (a sweep point)")
    p.add_argument("--selection", help="JSON file describing how the point was selected")
    p.add_argument("--tar", action="store_true", help="also write DIR.tar.gz")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle / Triton model folder")
    p.add_argument("--triton", metavar="REPO_DIR", help="also export a Triton model repository")
    _add_triton_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")


# --------------------------------------------------------------------------- predict


@command("predict")
def cmd_predict(args: argparse.Namespace) -> int:
    from fixres_deploy.ship.runtime import predict_bundle

    preds = predict_bundle(
        args.bundle,
        args.images,
        batch_size=args.batch_size,
        top_k=args.top_k,
        backend=args.backend,
        verify=not args.no_verify,
        threads=args.threads,
    )
    failed = 0
    for p in preds:
        if p.error is not None:
            failed += 1
            row = {"path": p.path, "error": p.error}
        else:
            row = {"path": p.path, "label": p.label, "index": p.index, "score": round(p.score, 6)}
            if args.top_k > 1:
                row["top_k"] = [dict(t, score=round(t["score"], 6)) for t in p.top_k]
        try:
            print(json.dumps(row), flush=True)
        except BrokenPipeError:  # `predict ... | head`: the reader is gone, stop quietly
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            break
    return 1 if failed else 0


def _predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images with a bundle (torch-free runtime); one JSON line per image",
        description="Prints one JSON object per image: path, label, index, score (softmax probability); "
        "'error' instead for an unreadable file. Exit status 1 when any image could not be read.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder or .tar.gz")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--top-k", type=int, default=1, help="also list the k best classes")
    p.add_argument("--batch-size", type=int, help="images per engine call (default: the engine's batch / profile max)")
    p.add_argument("--backend", help="run another engine of the bundle, e.g. onnxruntime for a TensorRT bundle's ONNX")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-verify", action="store_true", help="skip the bundle verification (hashes, versions, GPU)")


# --------------------------------------------------------------------------- triton


@command("triton")
def cmd_triton(args: argparse.Namespace) -> int:
    from fixres_deploy.ship.triton import export_triton_repository

    target = export_triton_repository(args.bundle, args.out, backend=args.backend, **_triton_options(args))
    _emit(args, {"model_dir": target}, lambda r: f"Triton model written to {r['model_dir']}")
    return 0


def _triton_parser(sub) -> None:
    p = sub.add_parser("triton", help="export a bundle as a Triton Inference Server model repository")
    p.add_argument("--bundle", required=True, help="bundle folder")
    p.add_argument("--out", required=True, help="Triton model repository folder")
    p.add_argument("--backend", help="which engine of the bundle (default: the primary)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    _add_triton_args(p)
    p.add_argument("--json", action="store_true")


PARSERS = [_bundle_parser, _predict_parser, _triton_parser]
