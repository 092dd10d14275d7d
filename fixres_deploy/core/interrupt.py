"""SIGTERM handled like Ctrl-C: a terminated run cleans up what it was writing, then exits 143.

Without a handler, SIGTERM (``docker stop``, a batch scheduler's time limit, ``kill``) ends the
process at once and leaves temporary folders behind. Raised as :class:`Terminated`, a subclass
of KeyboardInterrupt, it runs every ``finally`` and ``except KeyboardInterrupt`` clean-up that
Ctrl-C runs (the result store removes its temp folder; nothing half-written is published).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
