"""The `fixres-deploy` command line: thin wrappers over one library function per subcommand.

Nothing heavy is imported at module level, so `fixres-deploy --help` works without torch,
onnxruntime, tensorrt or CUDA. Errors the user can fix are printed in one line (exit 2);
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from fixres_deploy import __version__
from fixres_deploy.core.errors import FixResError
from fixres_deploy.data.folders import DEFAULT_VAL_FRACTION

log = logging.getLogger("fixres_deploy.cli.app")

COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {}


def command(name: str):
    def wrap(fn):
        COMMANDS[name] = fn
        return fn

    return wrap


def _floats3(text: str) -> tuple[float, float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def _range2(text: str) -> tuple[float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected 'min,max', got {text!r}")
    return parts[0], parts[1]


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            w, h = item.lower().split("x")
            out.append((int(w), int(h)))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"image sizes look like '500x375,375x500', got {text!r}") from exc
    return out


def _emit(args: argparse.Namespace, obj: Any, human: Callable[[Any], str] | None = None) -> None:
    if getattr(args, "json", False) or human is None:
        print(json.dumps(obj, indent=None if getattr(args, "json", False) else 2, default=str))
    else:
        print(human(obj))


# --------------------------------------------------------------------------- shared options


def _add_model_args(p: argparse.ArgumentParser, *, required_checkpoint: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="model spec: torchvision:resnet50, fixres:tiny_resnet, "
        "fixres:efficientnet_lite0, package.module:factory (optional with a fixres-deploy checkpoint)",
    )
    g.add_argument("--num-classes", type=int, help="classifier size (inferred from the checkpoint when omitted)")
    g.add_argument(
        "--checkpoint",
        required=required_checkpoint,
        help="weights: a state dict, a dict with 'state_dict'/'model', or a fixres-deploy checkpoint",
    )
    g.add_argument(
        "--weights",
        help="torchvision weights enum name (downloads; needs internet), e.g. ResNet50_Weights.IMAGENET1K_V2",
    )


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preprocessing (defaults: what the checkpoint recorded, else ImageNet conventions)")
    g.add_argument("--train-res", type=int, help="K_train, the resolution the model was trained at")
    g.add_argument("--crop-pct", type=float, help="K_test / K_image (default 0.875)")
    g.add_argument("--interpolation", choices=["nearest", "bilinear", "bicubic", "lanczos"])
    g.add_argument(
        "--resize-mode", choices=["shorter", "height"], help="shorter side (torchvision) or height (FixRes repository)"
    )
    g.add_argument("--mean", type=_floats3, help="r,g,b mean of [0,1] pixels")
    g.add_argument("--std", type=_floats3, help="r,g,b std of [0,1] pixels")


def _add_limit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-pixels",
        type=int,
        help="largest batch x height x width per call (default: derived from available memory; "
        "env FIXRES_MAX_PIXELS); see docs/robustness.md",
    )


def _check_pixels(args: argparse.Namespace, resolutions, batch_sizes, flags: str) -> None:
    from fixres_deploy.core.limits import check_pixels

    check_pixels(args.command, resolutions, batch_sizes, override=getattr(args, "max_pixels", None), flags=flags)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--workers", type=int, help="data-loading processes (default: cores - 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")


def load_from_args(args: argparse.Namespace, image_size: int | None = None):
    from fixres_deploy.models.registry import load_model

    return load_model(args.model, args.num_classes, args.checkpoint, weights=args.weights, image_size=image_size)


def preprocess_from_args(args: argparse.Namespace, loaded, resolution: int | None):
    from fixres_deploy.core.preprocess import resolve_preprocess

    return resolve_preprocess(
        loaded.preprocess,
        test_input_size=resolution,
        train_input_size=args.train_res,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        resize_mode=args.resize_mode,
        mean=args.mean,
        std=args.std,
        default_mean=loaded.default_mean,
        default_std=loaded.default_std,
    )


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


# --------------------------------------------------------------------------- prior


@command("prior")
def cmd_prior(args: argparse.Namespace) -> int:
    from fixres_deploy.fixres.prior import DEFAULT_IMAGE_SIZES, image_sizes_from_folder, resolution_prior

    sizes = args.image_sizes or DEFAULT_IMAGE_SIZES
    if args.image_folder:
        sizes = image_sizes_from_folder(args.image_folder)
    result = resolution_prior(
        args.train_res,
        crop_pct=args.crop_pct,
        scale=args.scale,
        ratio=args.ratio,
        stride=args.stride,
        image_sizes=sizes,
        min_res=args.min_res,
        max_res=args.max_res,
        below=args.below,
        above=args.above,
        basis=args.basis,
        samples=args.samples,
        seed=args.seed,
        resize_mode=args.resize_mode,
    )
    _emit(
        args,
        result.to_dict(),
        lambda r: (
            f"train resolution      {r['train_res']}\n"
            f"E[sqrt(sigma)]        {r['expected_sqrt_sigma']:.4f}\n"
            f"size ratio analytic   {r['ratio_analytic']:.4f}\n"
            f"size ratio MC         {r['ratio_monte_carlo']:.4f} ± {r['ratio_monte_carlo_stderr']:.4f}\n"
            f"recommended test res  {r['recommended_test_res']} (exact {r['recommended_test_res_exact']:.1f})\n"
            f"candidates            {r['candidates']}\n\n{r['explanation']}"
        ),
    )
    return 0


def _prior_parser(sub) -> None:
    p = sub.add_parser(
        "prior",
        help="recommend test resolutions from the apparent-object-size argument",
        description="The FixRes resolution prior: E[sqrt(sigma)] * K_image / K_train, "
        "analytic and by Monte Carlo of torchvision's RandomResizedCrop.",
    )
    p.add_argument("--train-res", type=int, required=True, help="K_train")
    p.add_argument("--crop-pct", type=float, default=0.875, help="K_test / K_image of the test transform")
    p.add_argument("--scale", type=_range2, default=(0.08, 1.0), help="RandomResizedCrop area range 'min,max'")
    p.add_argument("--ratio", type=_range2, default=(3 / 4, 4 / 3), help="RandomResizedCrop aspect range 'min,max'")
    p.add_argument("--stride", type=int, default=32, help="round candidates to multiples of this")
    p.add_argument("--min-res", type=int, help="smallest candidate (default max(stride, K_train/2))")
    p.add_argument("--max-res", type=int, help="largest candidate (default 4 K_train)")
    p.add_argument("--below", type=int, default=1, help="candidates below the recommendation (stride steps)")
    p.add_argument("--above", type=int, default=3, help="candidates above the recommendation (stride steps)")
    p.add_argument(
        "--basis",
        choices=["monte_carlo", "analytic"],
        default="monte_carlo",
        help="which ratio sets the recommendation",
    )
    p.add_argument("--image-sizes", type=_sizes, help="source image sizes 'WxH,...' (default 500x375)")
    p.add_argument("--image-folder", help="take source image sizes from an image folder")
    p.add_argument("--resize-mode", choices=["shorter", "height"], default="shorter")
    p.add_argument("--samples", type=int, default=200_000, help="Monte Carlo samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


# --------------------------------------------------------------------------- evaluate


@command("evaluate")
def cmd_evaluate(args: argparse.Namespace) -> int:
    from fixres_deploy.fixres.evaluate import evaluate_checkpoint

    _check_pixels(args, [args.resolution], [args.batch_size], "--resolution/--batch-size")
    _set_threads(args)
    loaded = load_from_args(args, image_size=args.resolution)
    cfg = preprocess_from_args(args, loaded, args.resolution)
    result = evaluate_checkpoint(loaded, args.data, cfg, batch_size=args.batch_size, workers=args.workers)
    d = result.to_dict()
    _emit(
        args,
        d,
        lambda r: (
            f"top-1 {r['top1']:.4f} [{r['top1_ci'][0]:.4f}, {r['top1_ci'][1]:.4f}]  "
            f"top-5 {r['top5']:.4f}  n={r['n']} skipped={r['skipped']} @{r['resolution']}"
        ),
    )
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1/top-5 with 95%% CIs of a model on an image folder")
    _add_model_args(p)
    _add_preprocess_args(p)
    p.add_argument("--data", required=True, help="ImageFolder root (DIR/<class>/<image>)")
    p.add_argument("--resolution", type=int, required=True, help="test resolution K_test")
    p.add_argument("--batch-size", type=int, default=64)
    _add_limit_arg(p)
    _common(p)


# --------------------------------------------------------------------------- finetune


@command("finetune")
def cmd_finetune(args: argparse.Namespace) -> int:
    from fixres_deploy.core import distributed

    _set_threads(args)
    with distributed.session():  # under torchrun: one process group for the command; else nothing
        return _finetune(args, main=distributed.is_main())


def _finetune(args: argparse.Namespace, *, main: bool) -> int:
    from fixres_deploy.core.utils import parse_int_list
    from fixres_deploy.fixres.finetune import FinetuneOptions, finetune_checkpoint

    resolutions = parse_int_list(args.resolutions, "--resolutions")
    _check_pixels(args, resolutions, [args.batch_size], "--resolutions/--batch-size")
    loaded = load_from_args(args, image_size=max(resolutions))
    cfg = preprocess_from_args(args, loaded, resolutions[0])
    opts = FinetuneOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        augmentation=args.augmentation,
        train_bn_affine=args.train_bn_affine,
        bn_stats_only=args.bn_stats_only,
        final_bn_pass=not args.no_final_bn_pass,
        cache=not args.no_cache,
        cache_budget_gb=args.cache_budget_gb,
        cache_dtype=args.cache_dtype,
        cache_dir=args.cache_dir,
        workers=args.workers,
        seed=args.seed,
    )
    results = finetune_checkpoint(
        loaded,
        args.data,
        args.val_data,
        cfg,
        resolutions,
        out_dir=args.out,
        opts=opts,
        bn=args.bn,
        head=args.head,
        val_fraction=args.val_fraction,
    )
    rows = [r.to_dict() for r in results]
    if not main:
        return 0  # rank 0 prints the result
    _emit(
        args,
        rows,
        lambda rs: "\n".join(
            ["resolution  top1_before          top1_after           checkpoint"]
            + [
                f"{r['resolution']:>10}  {r['top1_before']:.4f} [{r['top1_before_ci'][0]:.3f},{r['top1_before_ci'][1]:.3f}]"
                f"  {r['top1_after']:.4f} [{r['top1_after_ci'][0]:.3f},{r['top1_after_ci'][1]:.3f}]  {r['checkpoint']}"
                for r in rs
            ]
        ),
    )
    return 0


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="FixRes fine-tune (classifier + pre-pool BN) at test resolutions")
    _add_model_args(p)
    _add_preprocess_args(p)
    p.add_argument("--data", required=True, help="fine-tune images (ImageFolder root; a training split)")
    p.add_argument(
        "--val-data",
        help="held-out images for before/after accuracy (default: a hash split of --data, see --val-fraction)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"held-out share when --val-data is omitted (default {DEFAULT_VAL_FRACTION})",
    )
    p.add_argument("--resolutions", required=True, help="comma-separated test resolutions, e.g. 128,160")
    p.add_argument("--out", required=True, help="output folder for model_r{K}.pt and finetune.json")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, help="SGD learning rate (default: 10x FixRes' 8e-3*batch/512)")
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine")
    p.add_argument(
        "--augmentation",
        choices=["test", "test2", "train"],
        default="test",
        help="test DA (cacheable), test DA2 (flip, jitter, shifted crop) or train DA (RRC)",
    )
    p.add_argument("--train-bn-affine", action="store_true", help="also train the BN weight and bias")
    p.add_argument("--bn-stats-only", action="store_true", help="no training: re-estimate BN statistics in one pass")
    p.add_argument("--no-final-bn-pass", action="store_true", help="keep the EMA statistics of training")
    p.add_argument("--no-cache", action="store_true", help="naive loop (no activation cache)")
    p.add_argument(
        "--cache-budget-gb",
        type=float,
        help="most the activation cache may take per process (default: half the free memory, or disk with "
        "--cache-dir, per process); beyond it images are streamed every epoch",
    )
    p.add_argument(
        "--cache-dtype",
        choices=["fp32", "fp16"],
        default="fp32",
        help="activation cache storage (fp16: half the bytes)",
    )
    p.add_argument("--cache-dir", help="keep the activation cache on disk here (one file per rank), not in memory")
    p.add_argument("--bn", action="append", help="BatchNorm module to adapt (repeatable; default: discovered)")
    p.add_argument("--head", action="append", help="classifier module to train (repeatable; default: discovered)")
    p.add_argument("--seed", type=int, default=0)
    _add_limit_arg(p)
    _common(p)


# --------------------------------------------------------------------------- data & base model


@command("demo-data")
def cmd_demo_data(args: argparse.Namespace) -> int:
    from fixres_deploy.data.demo import write_demo_data

    summary = write_demo_data(args.out, train_per_class=args.train_per_class, val_per_class=args.val_per_class)
    _emit(args, summary, lambda s: f"wrote {s['train']} train + {s['val']} val images to {s['root']}/{{train,val}}")
    return 0


def _demo_data_parser(sub) -> None:
    p = sub.add_parser("demo-data", help="write the built-in procedurally generated data set (DIR/train, DIR/val)")
    p.add_argument("--out", required=True)
    p.add_argument("--train-per-class", type=int, default=120)
    p.add_argument("--val-per-class", type=int, default=60)
    p.add_argument("--json", action="store_true")


@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    from fixres_deploy.data.folders import index_image_folder
    from fixres_deploy.models.train import TrainOptions, train_and_save

    _set_threads(args)
    opts = TrainOptions(
        train_res=args.train_res,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        scale=args.scale,
        workers=args.workers,
        seed=args.seed,
    )
    summary = train_and_save(args.model, index_image_folder(args.data), args.out, opts, num_classes=args.num_classes)
    last = summary["history"][-1]
    _emit(
        args,
        {k: v for k, v in summary.items() if k != "history"} | {"last_epoch": last},
        lambda s: (
            f"trained {args.model} at {args.train_res} px in {s['seconds']:.0f} s "
            f"(train top-1 {last['train_top1']:.3f}) -> {s['checkpoint']}"
        ),
    )
    return 0


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a base model at a low resolution with RandomResizedCrop")
    p.add_argument("--model", default="fixres:tiny_resnet")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--data", required=True, help="ImageFolder root")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--train-res", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--scale", type=_range2, default=(0.08, 1.0), help="RandomResizedCrop area range")
    p.add_argument("--seed", type=int, default=0)
    _common(p)


# --------------------------------------------------------------------------- demo


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from fixres_deploy.sweep.pipeline import run_demo

    _set_threads(args)
    summary = run_demo(args.out, size=args.size)
    _emit(
        args,
        summary,
        lambda s: "\n".join(
            [
                f"demo finished in {s['seconds']:.0f} s -> {args.out}",
                f"report: {s['report_md']} (plots beside it), bundle: {s.get('bundle', {}).get('dir')}",
                s["reason"],
            ]
        ),
    )
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole job on the built-in demo data (README's main command)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", choices=["full", "test"], default="full", help="'test' is a smaller, faster run")
    _common(p)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fixres-deploy",
        description="Fine-tune a classifier for its test resolution (FixRes), export it, build "
        "engines, measure accuracy and latency, pick the operating point and ship it.",
    )
    parser.add_argument("--version", action="version", version=f"fixres-deploy {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    for module_name in COMMAND_MODULES:
        # Each module registers its handlers with @command and lists parser builders in
        # PARSERS; like this one, it must import nothing heavy at module level.
        module = importlib.import_module(module_name)
        for add in module.PARSERS:
            add(sub)
    return parser


# Subcommands of later pipeline stages live in their own modules (same conventions).
COMMAND_MODULES = [
    name
    for name in (
        "fixres_deploy.cli.export",  # export, calibration
        "fixres_deploy.cli.build",  # build
        "fixres_deploy.cli.bench",  # bench
        "fixres_deploy.cli.sweep",  # sweep, select, report, run
        "fixres_deploy.cli.ship",  # bundle, predict, triton
        "fixres_deploy.cli.store",  # store check, store gc
        "fixres_deploy.cli.serve",  # export-multires, serve
    )
    if importlib.util.find_spec(name) is not None
]

# What each command's --out is (checked before any work by core.paths.check_out).
OUT_KINDS = {
    **dict.fromkeys(("build", "sweep", "run", "finetune", "report", "demo", "demo-data", "bundle", "triton"), "dir"),
    **dict.fromkeys(("export", "bench", "train", "calibration"), "file"),
}

PARSERS: list[Callable] = [
    _demo_parser,
    _prior_parser,
    _evaluate_parser,
    _finetune_parser,
    _demo_data_parser,
    _train_parser,
]


def main(argv: list[str] | None = None) -> int:
    from fixres_deploy.core.utils import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    setup_logging(-1 if args.quiet else args.verbose)
    from fixres_deploy.core.interrupt import Terminated, sigterm_as_interrupt
    from fixres_deploy.core.utils import strip_ansi

    try:
        with sigterm_as_interrupt():
            out = getattr(args, "out", None)
            if out and args.command in OUT_KINDS:
                from fixres_deploy.core.paths import check_out

                check_out(out, OUT_KINDS[args.command])  # before any work
            return int(COMMANDS[args.command](args) or 0)
    except FixResError as exc:
        if args.debug:
            raise
        print(f"fixres-deploy {args.command}: error: {strip_ansi(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named: one line, not a traceback
        if args.debug:
            raise
        print(
            f"fixres-deploy {args.command}: error: {strip_ansi(str(exc))} (--debug shows the traceback)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 143 if terminated else 130
