"""FixRes fine-tuning: adapt the classifier and the pre-pooling BatchNorm to a new test resolution.

Following facebookresearch/FixRes (imnet_finetune): the whole network is frozen and kept in
eval mode except
  * the classifier (trained: SGD, momentum 0.9, weight decay 1e-4), and
  * the BatchNorm layer(s) that feed the global pooling (put in train mode, so that their
    running statistics are re-estimated at the new resolution; their affine weight/bias are
    not trained in the reference, optionally trained here),
on training images under the *test* transform ("test DA").

Which BatchNorms? :func:`discover_fixres_modules` finds them for any CNN: it runs the model
once, takes the last 4-D activation with spatial extent (what the global pool consumes),
and walks the autograd graph backwards from it through parameter-free operations (ReLU, add,
activations) to the BatchNorms it reaches, crossing at most one residual add — for a ResNet
that is the last block's final BN (``layer4[-1].bn3`` / ``.bn2``), plus the downsample BN when
that block has one. The classifier is every parameterised module that runs after that point.

Speed: with the deterministic test transform, everything below the trainable BN is frozen and
gives the same activations every epoch. :class:`TailSplit` cuts the model's traced graph
(torch.fx) at the BN inputs; the trunk runs once per image to fill a cache, and every epoch
trains the small tail on the cache. The result is the same as the naive loop (same batches,
same order) at a fraction of the cost; ``tools/bench_finetune.py`` measures the speedup.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fixres_deploy.core import distributed as dist
from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.preprocess import PreprocessConfig, finetune_transform
from fixres_deploy.core.utils import progress
from fixres_deploy.data.folders import DEFAULT_VAL_FRACTION, ImageFolderIndex, SkipLog, make_loader

log = logging.getLogger(__name__)

BN_TYPES_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")


# --------------------------------------------------------------------------- discovery


@dataclass
class FixResModules:
    """Which modules FixRes adapts.

    Attributes:
        bn_names: BatchNorm modules right before global pooling (statistics re-estimated).
        head_names: parameterised modules after the pooling (the classifier, trained).
        prepool_module: the module whose output the global pool consumes.
        method: how they were found (``"autograd"``, ``"user"``, ``"fallback"``).
    """

    bn_names: list[str]
    head_names: list[str]
    prepool_module: str | None = None
    method: str = "autograd"

    def to_dict(self) -> dict:
        return asdict(self)


def _is_bn(module) -> bool:
    from torch import nn

    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def discover_fixres_modules(model, *, probe_size: int = 128, in_channels: int = 3) -> FixResModules:
    """Find the pre-pooling BatchNorm(s) and the classifier modules of a CNN classifier.

    Args:
        model: a torch module mapping N×C×H×W images to logits.
        probe_size: side of the probe image (large enough for the model's total stride).

    Returns:
        :class:`FixResModules`; ``bn_names`` may be empty for models without BatchNorm (the
        fine-tune then trains the classifier only, with a warning).
    """
    import torch

    names = {m: n for n, m in model.named_modules()}
    param_owner: dict[int, str] = {}
    for mname, module in model.named_modules():
        for p in module.parameters(recurse=False):
            param_owner[id(p)] = mname

    calls: list[tuple[str, Any]] = []  # (module name, output) per leaf-module call, in order

    def hook(module, _inp, out):
        calls.append((names[module], out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        with torch.enable_grad():
            x = torch.randn(1, in_channels, probe_size, probe_size, device=device)
            model(x)
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(saved_flags[id(p)])
        model.train(was_training)

    last_spatial = None
    for i, (_name, out) in enumerate(calls):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
            last_spatial = i
    if last_spatial is None:
        raise UserInputError("the model never produces a 4-D feature map; FixRes needs a CNN")
    prepool_name, prepool_out = calls[last_spatial]

    head: list[str] = []
    for mname, _ in calls[last_spatial + 1 :]:
        module = model.get_submodule(mname)
        if any(True for _ in module.parameters(recurse=False)) and mname not in head:
            head.append(mname)

    bns: list[str] = []
    seen: set[tuple[int, int]] = set()
    bn_modules = {n for n, m in model.named_modules() if _is_bn(m)}

    def visit(fn, adds: int) -> None:
        if fn is None or (id(fn), adds) in seen:
            return
        seen.add((id(fn), adds))
        owners = set()
        for nxt, _ in fn.next_functions:
            if nxt is not None and type(nxt).__name__ == "AccumulateGrad":
                owner = param_owner.get(id(nxt.variable))
                if owner is not None:
                    owners.add(owner)
        bn_owners = owners & bn_modules
        if bn_owners:
            for o in sorted(bn_owners):
                if o not in bns:
                    bns.append(o)
            return
        if owners:  # a convolution or linear layer: this path has no BN before it
            return
        if type(fn).__name__.startswith("Add"):
            if adds >= 1:
                return
            adds += 1
        for nxt, _ in fn.next_functions:
            visit(nxt, adds)

    visit(getattr(prepool_out, "grad_fn", None), 0)
    if not bns:
        log.warning(
            "no BatchNorm found before the global pool (after %s): FixRes will train the "
            "classifier only; name modules with --bn to override",
            prepool_name,
        )
    return FixResModules(bn_names=bns, head_names=head, prepool_module=prepool_name)


def resolve_fixres_modules(model, bn: Sequence[str] | None = None, head: Sequence[str] | None = None) -> FixResModules:
    """Discovered modules, overridden by names the user gives (checked to exist)."""
    found = discover_fixres_modules(model)
    known = dict(model.named_modules())
    for kind, names in (("--bn", bn), ("--head", head)):
        for name in names or []:
            if name not in known:
                import difflib

                close = difflib.get_close_matches(name, list(known), n=5)
                raise UserInputError(f"{kind} module '{name}' is not in the model; close names: {close}")
            if kind == "--bn" and not _is_bn(known[name]):
                raise UserInputError(f"--bn module '{name}' is a {type(known[name]).__name__}, not a BatchNorm")
    if bn:
        found.bn_names = list(bn)
        found.method = "user"
    if head:
        found.head_names = list(head)
        found.method = "user"
    if not found.head_names:
        raise UserInputError("no classifier found after the global pool; name it with --head")
    return found


def setup_fixres_training(model, mods: FixResModules, *, train_bn_affine: bool = False) -> list:
    """Freeze everything except the classifier (and optionally the BN affine parameters).

    The model is put in eval mode; the selected BNs are put in train mode so that their
    running statistics adapt. Returns the list of trainable parameters.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for name in mods.head_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
            trainable.append(p)
    for name in mods.bn_names:
        bn = model.get_submodule(name)
        bn.train()
        if train_bn_affine:
            for p in bn.parameters():
                p.requires_grad_(True)
                trainable.append(p)
    return trainable


# --------------------------------------------------------------------------- tail split


class TailSplit:
    """The model's traced graph cut in two at the inputs of the trainable BatchNorms.

    ``trunk(x)`` returns the tuple of frontier tensors (every value the tail needs from below:
    the BN inputs and, for a ResNet, the residual branch); ``tail(*frontier)`` returns the
    logits. Both run the model's own submodules, so training the tail trains the model.
    """

    def __init__(self, model, bn_names: Sequence[str]):
        import torch.fx as fx

        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
            raise UserInputError(f"cannot trace the model with torch.fx: {type(exc).__name__}: {exc}") from exc
        graph = gm.graph
        nodes = list(graph.nodes)
        bn_nodes = [n for n in nodes if n.op == "call_module" and n.target in set(bn_names)]
        if not bn_nodes:
            raise UserInputError(f"BN modules {list(bn_names)} not called in the traced graph")
        tail: set = set()
        stack = list(bn_nodes)
        while stack:
            n = stack.pop()
            if n in tail:
                continue
            tail.add(n)
            stack.extend(n.users)
        # Constants (get_attr) feeding the tail are recomputed there, not cached.
        changed = True
        while changed:
            changed = False
            for n in nodes:
                if n in tail:
                    for a in n.all_input_nodes:
                        if a not in tail and a.op == "get_attr":
                            tail.add(a)
                            changed = True
        output = next(n for n in nodes if n.op == "output")
        if output not in tail:
            raise UserInputError("the model output does not depend on the selected BatchNorms")
        frontier = []
        for n in nodes:
            if n in tail:
                for a in n.all_input_nodes:
                    if a not in tail and a not in frontier:
                        frontier.append(a)
        # ``x.size(0)`` (e.g. efficientnet's ``view(x.size(0), -1)``) is the batch size, an int:
        # it cannot be cached per image, so the tail recomputes it from a cached tensor.
        batch_sizes = [n for n in frontier if _is_batch_size_node(n)]
        frontier = [n for n in frontier if n not in batch_sizes]
        if not frontier:
            raise UserInputError("the tail of the model needs no cached activation; nothing to cache")
        self.frontier_names = [n.name for n in frontier]

        trunk_graph = fx.Graph()
        env: dict = {}
        needed: set = set()
        stack = list(frontier)
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            stack.extend(n.all_input_nodes)
        for n in nodes:
            if n in needed:
                env[n] = trunk_graph.node_copy(n, lambda a: env[a])
        trunk_graph.output(tuple(env[n] for n in frontier))
        tail_graph = fx.Graph()
        env2: dict = {}
        for i, n in enumerate(frontier):
            env2[n] = tail_graph.placeholder(f"frontier_{i}")
        for n in batch_sizes:
            env2[n] = tail_graph.call_method("size", (env2[frontier[0]], 0))
        for n in nodes:
            if n in tail:
                env2[n] = tail_graph.node_copy(n, lambda a: env2[a])
        self.trunk = fx.GraphModule(model, trunk_graph)
        self.tail = fx.GraphModule(model, tail_graph)


def _is_batch_size_node(node) -> bool:
    """An fx node computing ``t.size(0)`` (the batch size; activations are batch-first)."""
    if node.op != "call_method" or node.target != "size":
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return dim == 0


# --------------------------------------------------------------------------- training


@dataclass
class FinetuneOptions:
    """Knobs of one FixRes fine-tune (defaults tuned for small data sets and few epochs).

    Attributes:
        epochs: passes over the fine-tune data.
        batch_size: images per step (the global batch: under torchrun it is split over ranks).
        lr: SGD learning rate; ``None`` → FixRes' rule 8 × 1e-3 × batch / 512, times
            ``lr_boost`` (few epochs on small data need more than ImageNet's 56 epochs).
        lr_boost: multiplier of the FixRes rule when ``lr`` is None.
        momentum, weight_decay: as the reference.
        schedule: ``"cosine"`` (to zero over the run) or ``"step"`` (reference StepLR(30)).
        augmentation: ``"test"`` (cacheable), ``"test2"`` or ``"train"``.
        train_bn_affine: also train the BN weight/bias (the paper's wording allows it).
        bn_stats_only: no gradients at all, re-estimate the BN statistics in one pass.
        final_bn_pass: after training, re-estimate the BN statistics exactly in one
            no-gradient pass (cheap with the cache; removes the EMA noise of the last steps).
        cache: use the activation cache when the augmentation is deterministic.
        cache_budget_gb: most this process's share of the cache may take (memory, or disk with
            ``cache_dir``); beyond it the fine-tune streams images every epoch (the naive
            loop) and logs so. None: half the available memory divided by the processes on
            this machine (or half the free disk of ``cache_dir``).
        cache_dtype: ``"fp32"`` (exact) or ``"fp16"`` (half the bytes; the tail still
            computes in fp32, results differ by fp16 rounding of the activations).
        cache_dir: keep the cache on disk here (one memory-mapped file per rank and frontier
            tensor) instead of in memory.
        workers: data-loading processes (None: cores - 1).
        seed: for the batch order.
    """

    epochs: int = 8
    batch_size: int = 64
    lr: float | None = None
    lr_boost: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    augmentation: str = "test"
    train_bn_affine: bool = False
    bn_stats_only: bool = False
    final_bn_pass: bool = True
    cache: bool = True
    cache_budget_gb: float | None = None
    cache_dtype: str = "fp32"
    cache_dir: str | None = None
    workers: int | None = None
    seed: int = 0

    def effective_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 8 * 1e-3 * self.batch_size / 512 * self.lr_boost

    def check(self) -> None:
        """Clear errors for impossible values, before any image is read."""
        if self.epochs < 0 or self.batch_size < 1:
            raise UserInputError(f"epochs must be >= 0 and batch_size >= 1, got {self.epochs}, {self.batch_size}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise UserInputError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.cache_budget_gb is not None and self.cache_budget_gb < 0:
            raise UserInputError(f"--cache-budget-gb must be >= 0, got {self.cache_budget_gb}")


CACHE_DTYPES = ("fp32", "fp16")


@dataclass
class FinetuneStats:
    """What happened during one fine-tune (for logs, reports and the benchmark)."""

    mode: str  # "cached" or "naive"
    epochs: int
    steps: int
    images: int
    skipped: int
    cache_build_s: float = 0.0
    train_s: float = 0.0
    cache_bytes: int = 0
    final_loss: float = float("nan")
    lr: float = 0.0
    world_size: int = 1
    cache_note: str = ""
    fixres_modules: dict = field(default_factory=dict)
    skipped_files: list = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.cache_build_s + self.train_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_s"] = self.total_s
        return d


def _epoch_order(n: int, epoch: int, seed: int):
    import torch

    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


class _OrderSampler:
    """Batch sampler that yields the given index batches (shares the order with the cache)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _batches(n: int, epoch: int, opts: FinetuneOptions) -> list[list[int]]:
    order = _epoch_order(n, epoch, opts.seed).tolist()
    return [order[i : i + opts.batch_size] for i in range(0, n, opts.batch_size)]


def _make_optimizer(params, opts: FinetuneOptions, steps_total: int):
    import torch

    opt = torch.optim.SGD(params, lr=opts.effective_lr(), momentum=opts.momentum, weight_decay=opts.weight_decay)
    if opts.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps_total) / max(1, steps_total)))
        )
    elif opts.schedule == "step":
        sched = None  # StepLR(30 epochs) as the reference: stepped per epoch below
    else:
        raise UserInputError(f"schedule must be 'cosine' or 'step', got {opts.schedule!r}")
    return opt, sched


def _end_epoch(opt, epoch: int, opts: FinetuneOptions) -> None:
    """The reference's StepLR(step_size=30, gamma=0.1), stepped per epoch."""
    if opts.schedule == "step" and (epoch + 1) % 30 == 0:
        for g in opt.param_groups:
            g["lr"] *= 0.1


class _ExactBNStats:
    """Exact per-channel mean/variance of the selected BNs' inputs over one pass.

    PyTorch's cumulative average (``momentum=None``) weights every *batch* equally, so a
    short last batch skews it; summing x and x² per channel gives the population statistics
    whatever the batch sizes. The BNs run in eval mode during the pass (their output is not
    used for anything but the forward), and the statistics are written at the end. Under
    torchrun each rank sums over its share and the sums, sums of squares and counts are
    all-reduced (float64), so N ranks give the statistics of one pass over all images.
    """

    def __init__(self, model, bn_names: Sequence[str]):
        import torch

        self.model = model
        self.bns = {name: model.get_submodule(name) for name in bn_names}
        self.sums: dict = {}
        self.handles = []
        for name, bn in self.bns.items():
            self.sums[name] = [
                torch.zeros(bn.num_features, dtype=torch.float64),
                torch.zeros(bn.num_features, dtype=torch.float64),
                0,
            ]
            self.handles.append(bn.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_module, inputs):
            x = inputs[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            acc = self.sums[name]
            acc[0] += x.double().sum(dim=dims).cpu()
            acc[1] += (x.double() ** 2).sum(dim=dims).cpu()
            acc[2] += x.numel() // x.shape[1]

        return hook

    def __enter__(self):
        for bn in self.bns.values():
            bn.eval()
        return self

    def __exit__(self, exc_type, *_):
        import torch

        for h in self.handles:
            h.remove()
        if exc_type is not None:
            return
        for name, bn in self.bns.items():
            s, s2, n = self.sums[name]
            packed = dist.all_reduce_sum(
                torch.cat([s, s2, torch.tensor([float(n)], dtype=torch.float64)]), f"BN statistics of {name}"
            )
            c = bn.num_features
            s, s2, n = packed[:c], packed[c : 2 * c], int(round(float(packed[-1])))
            if n < 2:
                continue
            mean = s / n
            var = (s2 / n - mean**2).clamp_min(0) * n / (n - 1)  # unbiased, as BatchNorm stores
            bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(var.to(bn.running_var.dtype))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)


def _average_running_stats(model, bn_names: Sequence[str]) -> None:
    """Mean of the EMA statistics over ranks (training without a final exact pass)."""
    if dist.world_size() <= 1:
        return
    for name in bn_names:
        bn = model.get_submodule(name)
        for buf in (bn.running_mean, bn.running_var):
            buf.copy_(dist.all_reduce_sum(buf.detach().clone(), f"BN running stats of {name}") / dist.world_size())


def _estimate_cache_bytes(trunk, sample, dtype: str = "fp32") -> int:
    """Bytes one image takes in the activation cache (``sample``: a batch of at least one image).

    Raises:
        UserInputError: the trunk hands the tail something other than tensors (which a
            per-image cache cannot hold); the caller falls back to the naive loop.
    """
    import torch

    with torch.inference_mode():
        outs = trunk(sample[:1])
    bad = [type(o).__name__ for o in outs if not isinstance(o, torch.Tensor)]
    if bad:
        raise UserInputError(f"the cut passes non-tensor values ({', '.join(bad)}) to the tail; cannot cache them")
    item = {"fp32": None, "fp16": 2}[dtype]
    return sum(o.numel() * (item if item and o.is_floating_point() else o.element_size()) for o in outs)


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cache_budget_bytes(opts: FinetuneOptions) -> float:
    """This process's cache budget: the option, else half the free memory (or disk) per local process."""
    if opts.cache_budget_gb is not None:
        return opts.cache_budget_gb * 1e9
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if opts.cache_dir:
        os.makedirs(opts.cache_dir, exist_ok=True)
        return shutil.disk_usage(opts.cache_dir).free * 0.5 / local
    free = _available_memory_bytes()
    return (free if free is not None else 4e9) * 0.5 / local


class _FrontierCache:
    """The trunk's outputs for this rank's images: in memory, or memory-mapped files in ``cache_dir``.

    Rows are in the order they were added; ``rows(idx)`` returns fp32 tensors whatever the
    storage dtype.
    """

    def __init__(self, capacity: int, opts: FinetuneOptions, rank: int):
        self.capacity = capacity
        self.dtype = opts.cache_dtype
        self.dir = opts.cache_dir
        self.rank = rank
        self.parts: list[list] = []  # in memory: per frontier tensor, a list of chunks
        self.maps: list = []  # on disk: per frontier tensor, a numpy memmap
        self.tensors: list = []
        self.n = 0

    def _store(self, t):
        import torch

        t = t.detach()
        return t.to(torch.float16) if self.dtype == "fp16" and t.is_floating_point() else t.clone()

    def add(self, outs) -> None:
        import numpy as np

        outs = [self._store(o) for o in outs]
        if self.dir is None:
            if not self.parts:
                self.parts = [[] for _ in outs]
            for part, o in zip(self.parts, outs, strict=True):
                part.append(o)
        else:
            if not self.maps:
                folder = os.path.join(self.dir, f"rank{self.rank}")
                os.makedirs(folder, exist_ok=True)
                for i, o in enumerate(outs):
                    path = os.path.join(folder, f"frontier{i}.{self.dtype}.npy")
                    self.maps.append(
                        np.lib.format.open_memmap(
                            path, mode="w+", dtype=o.numpy().dtype, shape=(self.capacity,) + tuple(o.shape[1:])
                        )
                    )
            for m, o in zip(self.maps, outs, strict=True):
                m[self.n : self.n + len(o)] = o.numpy()
        self.n += len(outs[0])

    def finish(self) -> int:
        """Freeze the cache; returns its size in bytes."""
        import torch

        if self.dir is None:
            self.tensors = [torch.cat(p) for p in self.parts]
            self.parts = []
            return sum(t.numel() * t.element_size() for t in self.tensors)
        for m in self.maps:
            m.flush()
        return sum(m[: self.n].nbytes for m in self.maps)

    def rows(self, idx):
        import numpy as np
        import torch

        if self.dir is None:
            out = [t[idx] for t in self.tensors]
        else:
            order = np.asarray(idx, dtype=np.int64)
            out = [torch.from_numpy(np.ascontiguousarray(m[order])) for m in self.maps]
        return [o.float() if o.dtype == torch.float16 else o for o in out]


def fixres_finetune(
    model,
    train_index: ImageFolderIndex,
    cfg: PreprocessConfig,
    opts: FinetuneOptions | None = None,
    *,
    mods: FixResModules | None = None,
) -> FinetuneStats:
    """FixRes fine-tune ``model`` in place at ``cfg.test_input_size``.

    Under torchrun (an initialised process group) every rank calls this with the same
    arguments: each reads its share of the images, the BN statistics are exact over all
    ranks, the trainable parameters are trained with DistributedDataParallel on the global
    batch, and every rank ends with the same model.

    Args:
        model: the trained classifier (modified in place).
        train_index: fine-tune images (a training split, never the evaluation images).
        cfg: preprocessing at the target test resolution.
        opts: :class:`FinetuneOptions`.
        mods: which modules to adapt (discovered when omitted).

    Returns:
        :class:`FinetuneStats`. The model is left in eval mode, all parameters frozen back to
        their original ``requires_grad``.
    """
    import torch

    opts = opts or FinetuneOptions()
    opts.check()
    mods = mods or resolve_fixres_modules(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    torch.manual_seed(opts.seed)
    trainable = setup_fixres_training(model, mods, train_bn_affine=opts.train_bn_affine)
    cacheable = opts.cache and opts.augmentation == "test" and bool(mods.bn_names)
    split, per_image = None, 0
    if cacheable:
        try:
            split = TailSplit(model, mods.bn_names)
            probe = torch.zeros(1, 3, cfg.test_input_size, cfg.test_input_size)
            per_image = _estimate_cache_bytes(split.trunk, probe, opts.cache_dtype)
        except UserInputError as exc:
            log.warning("activation cache unavailable (%s); using the naive loop", exc)
            split = None
    note = ""
    if split is not None:
        rank, world = dist.shard()
        need = per_image * len(range(rank, len(train_index), world))
        budget = cache_budget_bytes(opts)
        # every rank must take the same path (their collectives must match)
        over = int(dist.all_reduce_sum(torch.tensor([int(need > budget)]), "cache budget"))
        if over:
            note = (
                f"activation cache needs {need / 1e9:.2f} GB per process, over the "
                f"{budget / 1e9:.2f} GB budget on {over} rank(s): streaming images every epoch (naive loop); "
                "raise --cache-budget-gb, use --cache-dtype fp16, --cache-dir DISK or more processes"
            )
            log.warning("%s", note)
            split = None
    try:
        if split is not None:
            stats = _finetune_cached(model, split, train_index, cfg, opts, mods, trainable)
        else:
            stats = _finetune_naive(model, train_index, cfg, opts, mods, trainable)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    stats.cache_note = note
    stats.world_size = dist.world_size()
    stats.fixres_modules = mods.to_dict()
    return stats


def _wrap_ddp(module, trainable):
    """DistributedDataParallel over ``module`` (only its trainable parameters synchronise)."""
    if dist.world_size() <= 1 or not trainable:
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = dist.device()
    # BN statistics are made exact by all-reduce, not copied from rank 0 at every forward
    # (torch >= 2.14 names the option forward_sync_buffers; broadcast_buffers before)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    with dist.collective("DistributedDataParallel set-up"):
        return DistributedDataParallel(module, device_ids=[dev] if dev != "cpu" else None, **no_sync)


@contextlib.contextmanager
def _bn_frozen(model, bn_names: Sequence[str]):
    """BN running statistics untouched by the forward inside (a zero-weight step)."""
    bns = [model.get_submodule(n) for n in bn_names]
    saved = [(bn.momentum, None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone()) for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, (mom, nbt) in zip(bns, saved, strict=True):
            bn.momentum = mom
            if nbt is not None:
                bn.num_batches_tracked.copy_(nbt)


def _step(opt, net, inputs, labels, global_count: int, model, mods, filler):
    """One SGD step on the global batch, of which this rank holds ``inputs``/``labels``.

    The loss is this rank's sum of cross-entropies divided by the global batch count (times
    the world size, which DDP's gradient averaging divides by again): the gradient is the
    one of the mean over the whole global batch, whatever the split between ranks. A rank
    with no image in the batch runs a zero-weight forward (on ``filler``, BN statistics
    untouched) so that its DDP all-reduce still matches the others'.
    """
    import torch.nn.functional as F

    world = dist.world_size()
    if labels is not None and len(labels):
        loss = F.cross_entropy(net(*inputs), labels, reduction="sum") * (world / global_count)
    else:
        with _bn_frozen(model, mods.bn_names):
            loss = net(*filler).sum() * 0.0
    opt.zero_grad(set_to_none=True)
    with dist.collective("gradient all-reduce"):
        loss.backward()
    opt.step()
    return loss


def _finetune_naive(model, index, cfg, opts, mods, trainable) -> FinetuneStats:
    import torch

    n = len(index)
    rank, world = dist.shard()
    transform = finetune_transform(cfg, opts.augmentation)
    skips = SkipLog()
    stats = FinetuneStats(mode="naive", epochs=opts.epochs, steps=0, images=n, skipped=0, lr=opts.effective_lr())
    t0 = time.perf_counter()
    loss_value = float("nan")

    def mine(batches):  # this rank's part of every global batch (an image belongs to rank i % world)
        return [[i for i in b if i % world == rank] for b in batches]

    if opts.bn_stats_only or not trainable:
        if mods.bn_names:
            loader = _naive_loader(index, transform, mine(_batches(n, 0, opts)), opts)
            with torch.no_grad(), _ExactBNStats(model, mods.bn_names):
                for images, _, _, skipped in progress(loader, desc=f"BN stats @{cfg.test_input_size}"):
                    skips.extend(skipped)
                    if images is not None:
                        model(images)
    else:
        steps_total = opts.epochs * math.ceil(n / opts.batch_size)
        opt, sched = _make_optimizer(trainable, opts, steps_total)
        net = _wrap_ddp(model, trainable)
        filler = (torch.zeros(2, 3, cfg.test_input_size, cfg.test_input_size),)
        bar = progress(total=steps_total, desc=f"fine-tune @{cfg.test_input_size} (naive)")
        for epoch in range(opts.epochs):
            loader = _naive_loader(index, transform, mine(_batches(n, epoch, opts)), opts)
            for images, labels, _, skipped in loader:
                if epoch == 0:
                    skips.extend(skipped)
                local = 0 if images is None else len(labels)
                count = int(dist.all_reduce_sum(torch.tensor([local]), "batch count")) if world > 1 else local
                if count:
                    loss = _step(opt, net, (images,), labels, count, model, mods, filler)
                    loss_value = float(loss.detach()) / (world if local else 1)
                    stats.steps += 1
                if sched is not None:
                    sched.step()
                bar.update(1)
            _end_epoch(opt, epoch, opts)
        bar.close()
        if opts.final_bn_pass and mods.bn_names:
            loader = _naive_loader(index, finetune_transform(cfg, "test"), mine(_batches(n, 0, opts)), opts)
            with torch.no_grad(), _ExactBNStats(model, mods.bn_names):
                for images, _, _, _ in progress(loader, desc="final BN pass"):
                    if images is not None:
                        model(images)
        elif mods.bn_names:
            _average_running_stats(model, mods.bn_names)
    stats.train_s = time.perf_counter() - t0
    skips.extend(_gather_skips(skips))
    stats.skipped = len(skips)
    stats.skipped_files = skips.skipped
    stats.final_loss = loss_value
    return stats


def _gather_skips(skips: SkipLog) -> list[dict]:
    """The other ranks' skipped files (each rank read its own share)."""
    if dist.world_size() <= 1:
        return []
    parts = dist.all_gather_object(skips.skipped, "gather skipped files")
    return [s for r, part in enumerate(parts) if r != dist.rank() for s in part]


def _naive_loader(index, transform, batches, opts):
    from torch.utils.data import DataLoader

    from fixres_deploy.data.folders import ImageDataset, collate_skipping, default_workers

    workers = default_workers() if opts.workers is None else opts.workers
    return DataLoader(
        ImageDataset(index, transform),
        batch_sampler=_OrderSampler(batches),
        num_workers=workers,
        collate_fn=collate_skipping,
    )


def _finetune_cached(model, split: TailSplit, index, cfg, opts, mods, trainable) -> FinetuneStats:
    import torch

    n = len(index)
    rank, world = dist.shard()
    transform = finetune_transform(cfg, "test")
    stats = FinetuneStats(mode="cached", epochs=opts.epochs, steps=0, images=n, skipped=0, lr=opts.effective_lr())
    skips = SkipLog()
    t0 = time.perf_counter()
    loader = make_loader(index, transform, batch_size=opts.batch_size, workers=opts.workers, shard=(rank, world))
    cache = _FrontierCache(len(range(rank, n, world)), opts, rank)
    labels_l, idx_l = [], []
    with torch.inference_mode():
        for images, labels, indices, skipped in progress(loader, desc=f"cache trunk @{cfg.test_input_size}"):
            skips.extend(skipped)
            if images is None:
                continue
            cache.add(split.trunk(images))
            labels_l.append(labels)
            idx_l.append(indices)
    stats.cache_bytes = int(dist.all_reduce_sum(torch.tensor([cache.finish() if cache.n else 0]), "cache size"))
    skips.extend(_gather_skips(skips))
    stats.skipped = len(skips)
    stats.skipped_files = skips.skipped
    local_ds = torch.cat(idx_l).tolist() if idx_l else []
    # Global rows: every readable image of every rank, in dataset-index order, so the batch
    # orders are those of one process (and of the naive loop whenever no image was skipped).
    all_ds = sorted(i for part in dist.all_gather_object(local_ds, "gather cache index") for i in part)
    if not all_ds:
        raise UserInputError(f"no readable images in '{index.root}' for the fine-tune")
    if not cache.n:
        raise UserInputError(f"rank {rank}/{world} has no readable image of '{index.root}': use fewer processes")
    labels_all = torch.cat(labels_l)
    row_of = {ds: r for r, ds in enumerate(local_ds)}
    stats.cache_build_s = time.perf_counter() - t0
    m = len(all_ds)
    t1 = time.perf_counter()
    loss_value = float("nan")
    tail = split.tail

    def local_rows(batch):
        return [row_of[all_ds[g]] for g in batch if all_ds[g] in row_of]

    def bn_pass():
        with torch.no_grad(), _ExactBNStats(model, mods.bn_names):
            for batch in _batches(m, 0, opts):
                rows = local_rows(batch)
                if rows:
                    tail(*cache.rows(torch.as_tensor(rows)))

    if opts.bn_stats_only or not trainable:
        bn_pass()
    else:
        steps_total = opts.epochs * math.ceil(m / opts.batch_size)
        opt, sched = _make_optimizer(trainable, opts, steps_total)
        net = _wrap_ddp(tail, trainable)
        filler = cache.rows(torch.arange(min(2, cache.n)))
        for epoch in progress(range(opts.epochs), desc=f"fine-tune @{cfg.test_input_size} (cached)"):
            for batch in _batches(m, epoch, opts):
                rows = torch.as_tensor(local_rows(batch), dtype=torch.long)
                inputs = cache.rows(rows) if len(rows) else None
                loss = _step(opt, net, inputs, labels_all[rows], len(batch), model, mods, filler)
                loss_value = float(loss.detach()) / world
                stats.steps += 1
                if sched is not None:
                    sched.step()
            _end_epoch(opt, epoch, opts)
        if opts.final_bn_pass:
            bn_pass()
        else:
            _average_running_stats(model, mods.bn_names)
    stats.train_s = time.perf_counter() - t1
    stats.final_loss = loss_value
    return stats


# --------------------------------------------------------------------------- multi-resolution


@dataclass
class ResolutionResult:
    """Before/after accuracy of the FixRes fine-tune at one test resolution."""

    resolution: int
    top1_before: float
    top1_after: float
    top1_before_ci: tuple[float, float]
    top1_after_ci: tuple[float, float]
    top5_before: float
    top5_after: float
    checkpoint: str | None
    n: int
    skipped: int
    finetune: dict
    preprocess: dict

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top1_before_ci"] = list(self.top1_before_ci)
        d["top1_after_ci"] = list(self.top1_after_ci)
        return d


RESUME_FORMAT = "fixres-deploy/finetune-resolution"
RESUME_SCHEMA_VERSION = 1
_RESULT_ONLY_OPTIONS = ("workers", "cache", "cache_budget_gb", "cache_dir")  # do not change the result


def _model_hash(model) -> str:
    """sha256 of the state dict (names and raw bytes): the identity of the base weights."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _resume_path(out_dir, res: int) -> str:
    return os.path.join(os.fspath(out_dir), f"finetune_r{res}.json")


def _read_resumable(out_dir, res: int, identity: dict) -> ResolutionResult | None:
    """The finished result at ``res`` of an earlier (interrupted) run with the same inputs, if any."""
    from fixres_deploy.core.schema import check_schema
    from fixres_deploy.core.utils import read_json

    path = _resume_path(out_dir, res)
    if not os.path.exists(path):
        return None
    doc = check_schema(read_json(path), RESUME_FORMAT, RESUME_SCHEMA_VERSION, path, "delete it to fine-tune again")
    result = doc["result"]
    if doc["inputs"] != identity or not (result.get("checkpoint") and os.path.exists(result["checkpoint"])):
        return None
    result["top1_before_ci"] = tuple(result["top1_before_ci"])
    result["top1_after_ci"] = tuple(result["top1_after_ci"])
    return ResolutionResult(**result)


def finetune_resolutions(
    loaded,
    train_index: ImageFolderIndex,
    val_index: ImageFolderIndex,
    base_cfg: PreprocessConfig,
    resolutions: Sequence[int],
    *,
    out_dir: str | os.PathLike | None = None,
    opts: FinetuneOptions | None = None,
    bn: Sequence[str] | None = None,
    head: Sequence[str] | None = None,
    eval_batch_size: int = 64,
) -> list[ResolutionResult]:
    """Fine-tune a copy of the model at each resolution; evaluate before and after.

    With ``out_dir``, each finished resolution leaves ``model_r{K}.pt`` and
    ``finetune_r{K}.json`` (written by rank 0, atomically); a rerun with the same model,
    data, options and preprocessing reuses them, so a killed job resumes at the first
    unfinished resolution. Under torchrun every rank runs this; evaluation is sharded.

    Args:
        loaded: a :class:`fixres_deploy.models.registry.LoadedModel` (its model is not modified).
        train_index: fine-tune images.
        val_index: evaluation images (held out).
        base_cfg: preprocessing; only ``test_input_size`` changes per resolution.
        resolutions: test resolutions to adapt to.
        out_dir: where to save ``model_r{K}.pt`` checkpoints (with their preprocessing).
    """
    from fixres_deploy.core.schema import stamp
    from fixres_deploy.core.utils import write_json
    from fixres_deploy.fixres.evaluate import evaluate_model
    from fixres_deploy.models.registry import fixres_record, save_checkpoint

    opts = opts or FinetuneOptions()
    opts.check()
    mods = resolve_fixres_modules(loaded.model, bn=bn, head=head)
    log.info("FixRes modules: BN %s, classifier %s", mods.bn_names, mods.head_names)
    shard = dist.shard()
    identity = None
    if out_dir is not None:
        identity = {
            "model": loaded.spec,
            "weights": _model_hash(loaded.model),
            "train": train_index.content_hash(),
            "val": val_index.content_hash(),
            "options": {k: v for k, v in asdict(opts).items() if k not in _RESULT_ONLY_OPTIONS},
            "modules": mods.to_dict(),
        }
    results = []
    for res in resolutions:
        cfg = base_cfg.at_resolution(res)
        if identity is not None:
            identity_r = dict(identity, preprocess=cfg.to_dict())
            done = _read_resumable(out_dir, res, identity_r)
            if done is not None:
                log.info("@%d: resumed from %s", res, _resume_path(out_dir, res))
                results.append(done)
                continue
        before = evaluate_model(
            loaded.model, val_index, cfg, batch_size=eval_batch_size, workers=opts.workers, shard=shard
        )
        model = copy.deepcopy(loaded.model)
        stats = fixres_finetune(model, train_index, cfg, opts, mods=mods)
        after = evaluate_model(model, val_index, cfg, batch_size=eval_batch_size, workers=opts.workers, shard=shard)
        result = ResolutionResult(
            resolution=res,
            top1_before=before.top1,
            top1_after=after.top1,
            top1_before_ci=before.top1_ci,
            top1_after_ci=after.top1_ci,
            top5_before=before.top5,
            top5_after=after.top5,
            checkpoint=None,
            n=after.n,
            skipped=after.skipped,
            finetune=stats.to_dict(),
            preprocess=cfg.to_dict(),
        )
        if out_dir is not None:

            def write(model=model, result=result, stats=stats, before=before, after=after, cfg=cfg, res=res) -> str:
                path = save_checkpoint(
                    os.path.join(os.fspath(out_dir), f"model_r{res}.pt"),
                    model,
                    spec=loaded.spec,
                    num_classes=loaded.num_classes,
                    class_names=loaded.class_names or train_index.classes,
                    preprocess=cfg.to_dict(),
                    fixres=fixres_record(res, stats.to_dict(), top1_before=before.top1, top1_after=after.top1),
                )
                doc = {
                    "inputs": dict(identity, preprocess=cfg.to_dict()),
                    "result": {**result.to_dict(), "checkpoint": path},
                }
                write_json(_resume_path(out_dir, res), stamp(doc, RESUME_FORMAT, RESUME_SCHEMA_VERSION))
                return path

            result.checkpoint = dist.main_only(write, f"write the checkpoint @{res}")
        log.info("@%d: top-1 %.4f -> %.4f (%s, %.1f s)", res, before.top1, after.top1, stats.mode, stats.total_s)
        results.append(result)
    return results


def finetune_checkpoint(
    loaded,
    data: str,
    val_data: str | None,
    base_cfg: PreprocessConfig,
    resolutions: Sequence[int],
    *,
    out_dir: str | os.PathLike,
    opts: FinetuneOptions | None = None,
    bn: Sequence[str] | None = None,
    head: Sequence[str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> list[ResolutionResult]:
    """`fixres-deploy finetune`: fine-tune at each resolution, save checkpoints and finetune.json.

    Without ``val_data`` the images of ``data`` are split by file-name hash so that the
    before/after accuracy is never measured on fine-tune images. Under torchrun only rank 0
    writes files.
    """
    from fixres_deploy.core.utils import write_json
    from fixres_deploy.data.folders import split_by_hash
    from fixres_deploy.fixres.evaluate import index_for_model

    for r in resolutions:
        if r < 8:
            raise UserInputError(f"--resolutions must be >= 8, got {r}")
    train_index = index_for_model(data, loaded)
    if val_data:
        val_index = index_for_model(val_data, loaded)
    else:
        train_index, val_index = split_by_hash(train_index, val_fraction)
        log.info(
            "held out %d of %d images of %s by file-name hash", len(val_index), len(val_index) + len(train_index), data
        )
    results = finetune_resolutions(
        loaded, train_index, val_index, base_cfg, resolutions, out_dir=out_dir, opts=opts, bn=bn, head=head
    )
    dist.main_only(
        lambda: write_json(
            os.path.join(os.fspath(out_dir), "finetune.json"),
            {
                "model": loaded.spec,
                "train_data": os.fspath(data),
                "val_data": os.fspath(val_data) if val_data else f"hash split of {data} ({val_fraction})",
                "options": asdict(opts or FinetuneOptions()),
                "world_size": dist.world_size(),
                "results": [r.to_dict() for r in results],
            },
        ),
        "write finetune.json",
    )
    return results
