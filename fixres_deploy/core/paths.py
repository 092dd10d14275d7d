"""Output paths checked before work: one clear message instead of a traceback after minutes.

Every command's ``--out`` is a folder or a file. :func:`check_out` refuses, up front, an
existing file where a folder is expected, a folder where a file is expected, and a place
that cannot be written (a read-only or immutable folder, a parent that is a file). The write
check is a real probe (a temporary file created and removed), so it also holds for root,
for whom permission bits say nothing.
"""

from __future__ import annotations

import os
import tempfile

from fixres_deploy.core.errors import UserInputError


def _probe_writable(folder: str) -> str | None:
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".fixres-write-check."):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_out(path: str | os.PathLike, kind: str = "dir", *, flag: str = "--out") -> str:
    """Return ``path`` when a ``kind`` (``"dir"`` or ``"file"``) can be written there; else raise.

    Raises:
        UserInputError: naming the flag, the path, what is wrong and what to do.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    path = os.fspath(path)
    if not path:
        raise UserInputError(f"{flag} is empty: give a {'folder' if kind == 'dir' else 'file'} path")
    if os.path.exists(path):
        if kind == "dir" and not os.path.isdir(path):
            raise UserInputError(
                f"{flag} '{path}' is an existing file, but a folder is expected: choose another path "
                "(or remove the file)"
            )
        if kind == "file" and os.path.isdir(path):
            raise UserInputError(
                f"{flag} '{path}' is a folder, but a file is expected: give a file path, e.g. "
                f"'{os.path.join(path, 'out')}...'"
            )
    folder = path if kind == "dir" and os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    # the nearest existing ancestor must be a folder we can write in
    ancestor = folder
    while not os.path.exists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if not os.path.isdir(ancestor):
        raise UserInputError(f"{flag} '{path}': '{ancestor}' is a file, so nothing can be created under it")
    problem = _probe_writable(ancestor)
    if problem:
        raise UserInputError(
            f"{flag} '{path}': cannot write in '{ancestor}' ({problem}); choose a writable location "
            "or fix the folder's permissions"
        )
    return path
