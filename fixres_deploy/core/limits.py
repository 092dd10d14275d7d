"""Resource bounds checked before work: the largest batch x resolution a command accepts.

A resolution typo (``--resolution 100000``) must end in a one-line error, not in the kernel's
OOM killer taking the machine's other processes with it. The bound is in input pixels per
inference call (batch x height x width), derived from the memory available now:

    max_pixels = MemAvailable x MEMORY_FRACTION / BYTES_PER_INPUT_PIXEL

``BYTES_PER_INPUT_PIXEL`` (1 KiB) is a generous peak working set of a CNN forward pass per
input pixel: input and resized copies, the widest activations and their successors
(ResNet-50 at 224 px needs about a quarter of it, tiny_resnet less). The bound is a guard
against the impossible, not a tight fit: a model that needs less can go further with
``--max-pixels N`` (every command that allocates images has it; ``max_pixels`` in a run
config) or the environment variable ``FIXRES_MAX_PIXELS``.

Only the standard library is used (``/proc/meminfo``, ``os.sysconf``): no psutil.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from fixres_deploy.core.errors import UserInputError

ENV_MAX_PIXELS = "FIXRES_MAX_PIXELS"
BYTES_PER_INPUT_PIXEL = 1024
MEMORY_FRACTION = 0.5
FALLBACK_MAX_PIXELS = 16 * 1024 * 1024  # when the available memory cannot be read


def available_memory_bytes() -> int | None:
    """Memory available to new allocations (Linux MemAvailable; else free physical pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def max_pixels(override: int | None = None) -> tuple[int, str]:
    """(the limit in input pixels per call, where it comes from) — flag > environment > memory."""
    if override is not None:
        if override < 1:
            raise UserInputError(f"--max-pixels must be a positive number of pixels, got {override}")
        return int(override), "--max-pixels"
    env = os.environ.get(ENV_MAX_PIXELS)
    if env:
        try:
            value = int(float(env))
        except ValueError as exc:
            raise UserInputError(f"{ENV_MAX_PIXELS}={env!r} is not a number of pixels (e.g. 50000000)") from exc
        if value < 1:
            raise UserInputError(f"{ENV_MAX_PIXELS} must be a positive number of pixels, got {env!r}")
        return value, ENV_MAX_PIXELS
    avail = available_memory_bytes()
    if avail is None:
        return FALLBACK_MAX_PIXELS, "a default (available memory unknown)"
    limit = max(1, int(avail * MEMORY_FRACTION / BYTES_PER_INPUT_PIXEL))
    return limit, f"{avail / 2**30:.1f} GiB available memory at {BYTES_PER_INPUT_PIXEL} bytes per input pixel"


def check_pixels(
    command: str,
    resolutions: Iterable[int],
    batch_sizes: Iterable[int],
    *,
    override: int | None = None,
    flags: str = "--resolution/--batch-size",
) -> None:
    """Refuse, before any work, a batch x resolution larger than :func:`max_pixels`.

    Args:
        command: what is checked, for the message (``"evaluate"``).
        resolutions, batch_sizes: every value the command will use (the largest of each counts).
        override: the ``--max-pixels`` value, if given.
        flags: the flags that set resolution and batch, for the message.

    Raises:
        UserInputError: naming the request, the limit, where it comes from and how to override it.
    """
    res = max((int(r) for r in resolutions), default=0)
    batch = max((int(b) for b in batch_sizes), default=1)
    if res <= 0:
        return
    pixels = batch * res * res
    limit, source = max_pixels(override)
    if pixels > limit:
        side = int((limit / batch) ** 0.5)
        raise UserInputError(
            f"{command}: {batch} image(s) of {res}x{res} px per call are {pixels:,} input pixels, more than "
            f"the limit of {limit:,} ({source}); at batch {batch} the largest resolution is about {side} px. "
            f"Lower {flags}, or raise the limit with --max-pixels N (or {ENV_MAX_PIXELS}=N) if the model "
            "needs less memory"
        )
