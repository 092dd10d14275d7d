"""torch backend: eager PyTorch, the accuracy reference every engine is compared with.

It runs a PyTorch module, not an ONNX file: a torch "engine" is an artifact pointing at a
checkpoint (``BuildOptions(extra={"checkpoint": "model.pt"})``), so the sweep can put the
reference beside the engines with the same Runner interface.
"""

from __future__ import annotations

import copy
import os
import time

import numpy as np

from fixres_deploy.backends.base import BuildOptions, EngineArtifact, Runner, ShapeSpec
from fixres_deploy.core.errors import UserInputError, require
from fixres_deploy.core.utils import sha256_file

BACKEND = "torch"


def set_tf32(torch, enabled: bool) -> tuple[bool, bool]:
    """Allow or forbid TF32 in cuBLAS matmuls and cuDNN convolutions; returns the previous flags.

    PyTorch allows TF32 in cuDNN by default (10-bit mantissa on Ampere and newer), so an
    "fp32" GPU row would silently be TF32; fixres-deploy forbids it unless asked, and labels
    a row that allowed it "tf32".
    """
    previous = (bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32))
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return previous


class TorchRunner(Runner):
    """Runs an ``nn.Module`` under ``torch.inference_mode``; numpy in, float32 numpy out.

    Args:
        model: the module (put in eval mode; never modified: fp16 or a GPU device run on a copy).
        shapes: optional ShapeSpec to refuse shapes like an engine would (None: any shape).
        device: "cpu", "cuda", "cuda:1", ...
        half: compute in float16 (the fp16 reference on a GPU).
        tf32: on a GPU in fp32, allow TF32 tensor cores (the row is then labelled "tf32");
            default False: fp32 is true fp32.
    """

    name = "torch"

    def __init__(
        self,
        model,
        *,
        shapes: ShapeSpec | None = None,
        device: str = "cpu",
        half: bool = False,
        tf32: bool = False,
        input_name: str = "input",
        output_name: str = "logits",
    ):
        super().__init__(input_name=input_name, output_name=output_name, shapes=shapes)
        self.model = model
        self.device = device
        self.half = half
        self.tf32 = tf32
        self._tf32_before: tuple[bool, bool] | None = None
        self._module = None
        self._torch = None

    @property
    def precision_label(self) -> str:
        """What the runner computes in: "fp16", "tf32" (fp32 on a GPU with TF32 allowed) or "fp32"."""
        if self.half:
            return "fp16"
        return "tf32" if self.tf32 and str(self.device).startswith("cuda") else "fp32"

    @classmethod
    def from_checkpoint(cls, path: str, **kw) -> TorchRunner:
        """A runner for a fixres-deploy checkpoint (model spec and weights read from it)."""
        from fixres_deploy.models.registry import load_model

        return cls(load_model(None, checkpoint=path).model, **kw)

    def activate_impl(self) -> None:
        torch = require("torch", "cpu", "the torch reference backend")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise UserInputError(f"torch device {self.device!r} requested but CUDA is not available")
        module = self.model
        if self.half or str(self.device) != "cpu":
            module = copy.deepcopy(module)
        module = module.to(self.device)
        if self.half:
            module = module.half()
        if str(self.device).startswith("cuda"):
            self._tf32_before = set_tf32(torch, self.tf32 and not self.half)
        self._module = module.eval()
        self._torch = torch

    def infer_impl(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device)
            if self.half:
                t = t.half()
            y = self._module(t)
        return y.float().cpu().numpy().astype(np.float32, copy=False)

    def deactivate_impl(self) -> None:
        torch = self._torch
        self._module = None
        if torch is not None and str(self.device).startswith("cuda"):
            if self._tf32_before is not None:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._tf32_before
                self._tf32_before = None
            torch.cuda.empty_cache()
        self._torch = None


def check_available() -> None:
    require("torch", "cpu", "the torch reference backend")


def build_impl(
    onnx_path: str, shapes: ShapeSpec, options: BuildOptions, *, out_dir: str, precision: str, name: str | None
) -> EngineArtifact:
    """An artifact pointing at the checkpoint in ``options.extra["checkpoint"]`` (loaded once to check it)."""
    torch = require("torch", "cpu", "the torch reference backend")
    ckpt = (options.extra or {}).get("checkpoint")
    if not ckpt:
        raise UserInputError(
            f"the torch backend runs a PyTorch checkpoint, not the ONNX file '{onnx_path}': pass "
            "BuildOptions(extra={'checkpoint': 'model.pt'}) (CLI: --checkpoint model.pt)"
        )
    if not os.path.isfile(ckpt):
        raise UserInputError(f"checkpoint '{ckpt}' does not exist")
    if precision == "int8":
        raise UserInputError(
            "the torch reference backend runs fp32 or fp16 only; int8 engines come from ONNX Runtime or TensorRT"
        )
    from fixres_deploy.models.registry import load_model

    device = (options.extra or {}).get("device", "cpu")
    t0 = time.perf_counter()
    loaded = load_model(None, checkpoint=ckpt)
    build_s = time.perf_counter() - t0
    return EngineArtifact(
        backend=BACKEND,
        precision=precision,
        path=os.fspath(ckpt),
        source_onnx=onnx_path,
        shapes=shapes,
        build_s=build_s,
        sha256=sha256_file(ckpt),
        size_bytes=os.path.getsize(ckpt),
        meta={
            "torch_version": torch.__version__,
            "model": loaded.spec,
            "device": device,
            "half": precision == "fp16",
            "note": "eager PyTorch reference; path is the checkpoint",
        },
    )


def runner_from_artifact(artifact: EngineArtifact, **options) -> TorchRunner:
    """Options: device (default: the artifact's), half (default: precision == fp16), tf32 (default False)."""
    unknown = sorted(set(options) - {"device", "half", "tf32"})
    if unknown:
        raise UserInputError(f"unknown torch runner option(s) {unknown}; known: ['device', 'half', 'tf32']")
    return TorchRunner.from_checkpoint(
        artifact.path,
        shapes=artifact.shapes,
        device=options.get("device", artifact.meta.get("device", "cpu")),
        half=options.get("half", artifact.precision == "fp16"),
        tf32=bool(options.get("tf32", False)),
        input_name=artifact.input_name,
        output_name=artifact.output_name,
    )
