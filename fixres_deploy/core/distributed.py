"""torch.distributed for fixres-deploy: one process per GPU (or CPU share), launched by torchrun.

``torchrun --nproc-per-node N -m fixres_deploy finetune ...`` sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`session` reads them, opens the process group
(NCCL on CUDA, gloo on CPU) and closes it at exit. Without those variables nothing is
initialised and every helper here is the identity of a one-process run, so the same command
without torchrun is unchanged.

Failure is made explicit: collectives run under a timeout (``FIXRES_DIST_TIMEOUT_S``,
default 600 s), and a peer that dies or times out turns into :class:`DistributedError` naming
the operation, which the command line prints as one line with a non-zero exit. Files are
written by rank 0 alone (:func:`main_only`), atomically, and the other ranks wait for them.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from fixres_deploy.core.errors import FixResError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "FIXRES_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
T = TypeVar("T")


class DistributedError(FixResError):
    """A peer process died, or a collective timed out: the job stops on every rank."""


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


def timeout_s() -> float:
    """The collective/rendezvous timeout in seconds (``FIXRES_DIST_TIMEOUT_S``)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError as exc:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from exc
    if value <= 0:
        raise DistributedError(f"{TIMEOUT_ENV} must be > 0, got {value}")
    return value


def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    """True inside a multi-process group (torchrun with WORLD_SIZE > 1)."""
    try:
        dist = _dist()
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return _dist().get_rank() if is_initialized() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints results."""
    return rank() == 0


def shard() -> tuple[int, int]:
    """(rank, world size) of this process, for strided data sharding."""
    return rank(), world_size()


def device() -> str:
    """``cuda:LOCAL_RANK`` under NCCL, else ``cpu``."""
    if is_initialized() and _dist().get_backend() == "nccl":
        return f"cuda:{env_world()[2]}"
    return "cpu"


def init_from_env(backend: str | None = None) -> bool:
    """Open the process group from torchrun's variables; False (nothing done) when WORLD_SIZE <= 1.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
    """
    r, world, local = env_world()
    if world <= 1 or is_initialized():
        return is_initialized()
    import torch

    dist = _dist()
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise DistributedError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    except Exception as exc:  # rendezvous failures raise several types (RuntimeError, DistStoreError, ...)
        raise DistributedError(
            f"rank {r}/{world}: cannot join the process group at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} within {timeout_s():.0f} s ({type(exc).__name__}: {exc})"
        ) from exc
    log.info("rank %d/%d joined the %s process group", r, world, backend)
    return True


def destroy() -> None:
    if is_initialized():
        with contextlib.suppress(Exception):
            _dist().destroy_process_group()


@contextlib.contextmanager
def session(backend: str | None = None) -> Iterator[bool]:
    """Process group for the duration of a command; yields whether it is distributed."""
    started = init_from_env(backend)
    try:
        yield started
    finally:
        if started:
            destroy()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a dead peer or a timeout inside the block into a one-line :class:`DistributedError`."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as exc:  # DistBackendError, gloo "Connection closed by peer", timeouts
        raise DistributedError(
            f"rank {rank()}/{world_size()}: {what} failed — a peer process died or did not answer within "
            f"{timeout_s():.0f} s ({TIMEOUT_ENV}) ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Rerun the same command: finished work is resumed from the output folder."
        ) from exc


def barrier(what: str = "barrier") -> None:
    if is_initialized():
        with collective(what):
            if _dist().get_backend() == "nccl":
                _dist().barrier(device_ids=[env_world()[2]])
            else:
                _dist().barrier()


def all_reduce_sum(tensor, what: str = "all-reduce"):
    """Sum ``tensor`` over ranks in place (on the process group's device) and return it."""
    if not is_initialized():
        return tensor
    dist = _dist()
    dev = device()
    work = tensor.to(dev) if dev != "cpu" else tensor
    with collective(what):
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work.to(tensor.device))
    return tensor


def all_gather_object(obj: Any, what: str = "all-gather") -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    with collective(what):
        _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, what: str = "broadcast", src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    with collective(what):
        _dist().broadcast_object_list(box, src=src)
    return box[0]


def main_only(fn: Callable[[], T], what: str = "write") -> T:
    """Run ``fn`` on rank 0 only (a file write); the others wait and receive its return value.

    The writers of the project are atomic (temp + rename), so once the barrier passes every
    rank sees the complete file. An exception on rank 0 is re-raised on every rank.
    """
    if not is_initialized():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the others learn of it
            error = exc
    shared = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"), what)
    if error is not None:
        raise error
    if shared[1] is not None:
        raise DistributedError(f"rank {rank()}: rank 0 failed to {what}: {shared[1]}")
    return shared[0]
