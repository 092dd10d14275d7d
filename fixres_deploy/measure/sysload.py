"""CPU use of *other* processes while we measure: is this latency number trustworthy?

On a shared machine a benchmark is only as good as the quiet it ran in: OpenMP / ONNX Runtime
threads spin-wait, so another process's load slows torch eager ~10x and ONNX Runtime ~3x on
the 2-core boxes this project runs on (measured there). A latency without the load it was
measured under cannot be compared with anything, so every measurement records it.

Method (Linux): the machine's busy time comes from ``/proc/stat`` (all CPUs, in jiffies), our
own from ``/proc/self/stat`` (all our threads) plus our live descendants (found through
``/proc/self/task/*/children``) and our reaped children (``cutime``/``cstime``). Then::

    other_cores_busy = (machine busy - our busy) / elapsed          [cores]

``steal`` time (the hypervisor running another VM on our CPU) is reported separately as
``steal_cores``; it slows us just as much, so :func:`contention` adds it.

A cheap background sampler (default 10 Hz: it reads two small files per sample, ~30 µs)
records the per-interval load so that a short burst is not averaged away (``max_other_cores``).

On other operating systems every function returns ``None`` instead of guessing.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

_STAT = "/proc/stat"
_SELF = "/proc/self"


def supported() -> bool:
    """True where /proc gives machine-wide and per-process CPU time (Linux)."""
    return os.path.exists(_STAT) and os.path.exists(os.path.join(_SELF, "stat"))


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100


_HZ = _clock_ticks()


@dataclass(frozen=True)
class Snapshot:
    """CPU time counters at one instant (all in seconds of CPU time, ``t`` monotonic)."""

    t: float
    machine_busy_s: float  # user+nice+system+irq+softirq over all CPUs (guest is inside user)
    steal_s: float
    ours_s: float  # our threads + live descendants + reaped children


def _read_machine() -> tuple[float, float, int]:
    """(busy seconds excluding steal, steal seconds, number of CPUs) from /proc/stat."""
    with open(_STAT, "rb") as f:
        data = f.read()
    first, _, rest = data.partition(b"\n")
    v = [int(x) for x in first.split()[1:]]
    v += [0] * (8 - len(v))
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    ncpu = rest.count(b"\ncpu") + (1 if rest.startswith(b"cpu") else 0)
    return (user + nice + system + irq + softirq) / _HZ, steal / _HZ, max(1, ncpu)


def _proc_times(pid: str) -> tuple[float, float]:
    """(own utime+stime, reaped children's cutime+cstime) of a process in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()  # comm may contain spaces and parens
    # after ')': state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17) -> offset 3
    return (int(fields[11]) + int(fields[12])) / _HZ, (int(fields[13]) + int(fields[14])) / _HZ


def _children(pid: str) -> list[str]:
    out: list[str] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(x.decode() for x in f.read().split())
        except OSError:
            continue
    return out


def _our_seconds(include_children: bool) -> float:
    me = str(os.getpid())
    own, reaped = _proc_times(me)
    total = own + (reaped if include_children else 0.0)
    if include_children:
        stack = _children(me)
        seen: set[str] = set()
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                c_own, c_reaped = _proc_times(pid)
            except (OSError, ValueError, IndexError):
                continue  # exited between listing and reading
            total += c_own + c_reaped
            stack.extend(_children(pid))
    return total


def snapshot(include_children: bool = True) -> Snapshot | None:
    """Current counters, or None where /proc is not available."""
    if not supported():
        return None
    try:
        busy, steal, _ = _read_machine()
        ours = _our_seconds(include_children)
    except (OSError, ValueError, IndexError):
        return None
    return Snapshot(time.monotonic(), busy, steal, ours)


def total_cores() -> int:
    """CPUs the kernel schedules on (from /proc/stat; os.cpu_count() elsewhere)."""
    if supported():
        try:
            return _read_machine()[2]
        except (OSError, ValueError):
            pass
    return os.cpu_count() or 1


def between(a: Snapshot, b: Snapshot) -> dict:
    """Average load between two snapshots, in cores."""
    dt = max(b.t - a.t, 1e-9)
    machine = (b.machine_busy_s - a.machine_busy_s) / dt
    ours = (b.ours_s - a.ours_s) / dt
    # /proc/stat is tick-sampled while per-process times are precise: clamp small negatives.
    return {
        "elapsed_s": dt,
        "machine_cores_busy": machine,
        "our_cores_busy": max(0.0, ours),
        "other_cores_busy": max(0.0, machine - ours),
        "steal_cores": max(0.0, (b.steal_s - a.steal_s) / dt),
    }


class LoadMonitor:
    """Context manager measuring other processes' CPU use during a block.

    Example::

        with LoadMonitor() as mon:
            run_benchmark()
        mon.result()  # {'other_cores_busy': 0.04, 'total_cores': 2, 'our_cores_busy': 1.97, ...}

    Args:
        interval_s: background sampling period (None or 0: only start and end, no thread).
        include_children: count our child processes as ours (a data-loader worker or a
            server we spawned is our load, not contention).
    """

    def __init__(self, interval_s: float | None = 0.1, *, include_children: bool = True):
        self.interval_s = interval_s
        self.include_children = include_children
        self._start: Snapshot | None = None
        self._end: Snapshot | None = None
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LoadMonitor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._samples = []
        self._end = None
        self._start = snapshot(self.include_children)
        if self._start is not None and self.interval_s and self.interval_s > 0:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="fixres-load-monitor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        prev = self._start
        while not self._stop.wait(self.interval_s):
            cur = snapshot(self.include_children)
            if cur is None or prev is None:
                return
            self._samples.append(between(prev, cur)["other_cores_busy"])
            prev = cur

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._start is not None and self._end is None:
            self._end = snapshot(self.include_children)

    def result(self) -> dict | None:
        """Load during the block; None where /proc is unavailable.

        Keys: other_cores_busy (mean over the block, cores), max_other_cores (highest sampled
        interval), our_cores_busy, machine_cores_busy, steal_cores, total_cores, elapsed_s,
        samples (number of background samples).
        """
        if self._start is None:
            return None
        end = self._end or snapshot(self.include_children)
        if end is None:
            return None
        r = between(self._start, end)
        r["total_cores"] = total_cores()
        r["samples"] = len(self._samples)
        r["max_other_cores"] = max(self._samples) if self._samples else r["other_cores_busy"]
        return r


def contention(load: dict | None, threshold_cores: float) -> bool:
    """Whether a measurement ran while others used more than ``threshold_cores`` (incl. steal)."""
    if not load:
        return False
    return (load.get("other_cores_busy", 0.0) + load.get("steal_cores", 0.0)) > threshold_cores


def merge(loads: list[dict | None]) -> dict | None:
    """Time-weighted average of several LoadMonitor results (e.g. the repeats of a benchmark)."""
    loads = [d for d in loads if d]
    if not loads:
        return None
    total_t = sum(d["elapsed_s"] for d in loads) or 1e-9
    out = {
        k: sum(d[k] * d["elapsed_s"] for d in loads) / total_t
        for k in ("machine_cores_busy", "our_cores_busy", "other_cores_busy", "steal_cores")
    }
    out["elapsed_s"] = total_t
    out["total_cores"] = loads[0]["total_cores"]
    out["samples"] = sum(d["samples"] for d in loads)
    out["max_other_cores"] = max(d["max_other_cores"] for d in loads)
    return out
