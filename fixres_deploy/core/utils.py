"""Small shared helpers: atomic writes, hashing, JSON, logging and progress bars."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("fixres_deploy")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds.

    Nothing half-written is ever left at ``path``: a crash leaves the old file (or none).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a file made by open() would not be
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_tree(root: str | os.PathLike) -> None:
    """Give a folder made with ``mkdtemp``/``mkstemp`` (0700/0600) the modes ``mkdir``/``open`` would.

    Folders become ``0777 & ~umask`` and files ``0666 & ~umask`` — 0755/0644 with the usual
    umask 022 — so a serving container running as another user can read what was shipped;
    a stricter umask (e.g. 077) keeps it private.
    """
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            full = os.path.join(dirpath, f)
            if not os.path.islink(full):
                os.chmod(full, 0o666 & ~mask)


def write_json(path: str | os.PathLike, obj: Any) -> str:
    """Write JSON atomically (sorted keys off: keep the writer's order for readability)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
    return os.fspath(path)


def read_json(path: str | os.PathLike) -> Any:
    from fixres_deploy.core.errors import UserInputError

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise UserInputError(f"'{path}' does not exist") from exc
    except json.JSONDecodeError as exc:
        raise UserInputError(f"'{path}' is not valid JSON: {exc}") from exc


def _json_default(obj: Any):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


_ANSI_ESCAPE = None


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (colours, cursor moves) that libraries put in errors.

    Error messages end up in log files, JSON reports and the CLI's one-line errors, where the
    escapes are noise (``\\x1b[31m``) rather than colour.
    """
    import re

    global _ANSI_ESCAPE
    if _ANSI_ESCAPE is None:
        _ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
    return _ANSI_ESCAPE.sub("", text)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``: a content address for configs."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def setup_logging(verbosity: int = 0) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def progress(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, **kw):
    """A tqdm bar on stderr; silent when FIXRES_NO_PROGRESS is set (tests, logs)."""
    from tqdm.auto import tqdm

    disable = bool(os.environ.get("FIXRES_NO_PROGRESS")) or kw.pop("disable", False)
    if not sys.stderr.isatty():
        kw.setdefault("mininterval", 10.0)  # logs and CI: a line every 10 s, not every update
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True, **kw)


def parse_int_list(text: str | Iterable[int], what: str = "list") -> list[int]:
    """'128,160, 192' → [128, 160, 192] with a clear error; duplicates dropped with a warning."""
    from fixres_deploy.core.errors import UserInputError

    if not isinstance(text, str):
        return [int(v) for v in text]
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise UserInputError(f"{what} must be comma-separated integers, got {text!r}") from exc
    if not values:
        raise UserInputError(f"{what} is empty: {text!r}; give comma-separated integers, e.g. 160,224")
    unique = list(dict.fromkeys(values))
    if len(unique) < len(values):  # measuring a value twice costs time and proves nothing
        log.warning("%s lists %s more than once: each is used once (%s)", what, text, ",".join(map(str, unique)))
    return unique
