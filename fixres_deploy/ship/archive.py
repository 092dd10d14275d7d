"""Bundle archives: write a ``.tar.gz`` of a bundle folder, extract one safely.

Extraction checks every member BEFORE anything is written (no absolute paths, no ``..``,
nothing resolving outside the destination, no links or devices) and refuses an archive whose
headers declare more files or bytes than a budget (an archive bomb fills the disk before
any manifest could be checked): ``FIXRES_BUNDLE_MAX_FILES`` (default 10,000) and
``FIXRES_BUNDLE_MAX_BYTES`` (default 8 GiB). The budget is checked while the headers are
read, so the first member over it stops the reading too.

Written archives and their files are readable by everyone (0644, folders 0755): a serving
container often runs as another user than the one who bundled.
"""

from __future__ import annotations

import os
import re
import tarfile

from fixres_deploy.core.utils import atomic_path
from fixres_deploy.ship.manifest import MANIFEST_NAME, TAR_SUFFIX, BundleError

ENV_MAX_FILES = "FIXRES_BUNDLE_MAX_FILES"
ENV_MAX_BYTES = "FIXRES_BUNDLE_MAX_BYTES"
DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_BYTES = 8 * 2**30


def _budget(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        n = int(float(value))
    except ValueError as exc:
        raise BundleError(f"{name}={value!r} is not a number") from exc
    if n < 1:
        raise BundleError(f"{name} must be positive, got {value!r}")
    return n


def extraction_budget() -> tuple[int, int]:
    """(max members, max total bytes) an extraction accepts (environment or defaults)."""
    return _budget(ENV_MAX_FILES, DEFAULT_MAX_FILES), _budget(ENV_MAX_BYTES, DEFAULT_MAX_BYTES)


def bundle_tar_path(out_dir: str | os.PathLike) -> str:
    """Where ``make_bundle(..., tar=True)`` writes the archive: ``DIR.tar.gz`` beside DIR."""
    return os.fspath(out_dir).rstrip("/\\") + TAR_SUFFIX


def write_bundle_tar(bundle_dir: str | os.PathLike) -> str:
    """``DIR.tar.gz`` beside the bundle: one top-level folder, regular files only, no owners."""
    bundle_dir = os.path.abspath(os.fspath(bundle_dir))
    top = os.path.basename(bundle_dir)
    target = bundle_tar_path(bundle_dir)

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with atomic_path(target) as tmp:
        with tarfile.open(tmp, "w:gz") as tf:
            tf.add(bundle_dir, arcname=top, recursive=False, filter=clean)
            for dirpath, dirnames, filenames in os.walk(bundle_dir):
                dirnames.sort()
                for name in sorted(dirnames) + sorted(filenames):
                    full = os.path.join(dirpath, name)
                    arc = top + "/" + os.path.relpath(full, bundle_dir).replace(os.sep, "/")
                    tf.add(full, arcname=arc, recursive=False, filter=clean)
    return target


def _member_problem(m: tarfile.TarInfo, dest_real: str) -> str | None:
    name = m.name
    if not name or "\x00" in name:
        return f"member {name!r}: empty or invalid name"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return f"member {name!r}: absolute path"
    if ".." in norm.split("/"):
        return f"member {name!r}: '..' in its path"
    target = os.path.realpath(os.path.join(dest_real, norm))
    if os.path.commonpath([target, dest_real]) != dest_real:
        return f"member {name!r}: escapes the destination"
    if m.issym() or m.islnk():
        return f"member {name!r}: links are not allowed in a bundle (-> {m.linkname!r})"
    if not (m.isreg() or m.isdir()):
        return f"member {name!r}: not a regular file or folder (devices, fifos are not allowed)"
    return None


def extract_bundle(tar_path: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Safely extract a bundle archive into ``dest``; return the bundle folder inside it.

    Every member is checked BEFORE anything is written: no absolute paths, no ``..``, nothing
    resolving outside ``dest``, no symlinks, hardlinks or devices — regular files and folders
    only. Extraction then also uses tarfile's ``filter="data"`` where Python has it.
    """
    tar_path = os.fspath(tar_path)
    if not os.path.isfile(tar_path):
        raise BundleError(f"bundle archive '{tar_path}' does not exist")
    os.makedirs(dest, exist_ok=True)
    dest_real = os.path.realpath(dest)
    max_files, max_bytes = extraction_budget()
    try:
        with tarfile.open(tar_path, "r:*") as tf:
            members: list[tarfile.TarInfo] = []
            total = 0
            for m in tf:  # headers only; stop at the first member over the budget
                members.append(m)
                total += max(0, m.size)
                if len(members) > max_files or total > max_bytes:
                    declared = (
                        f"more than {max_files:,} files ({ENV_MAX_FILES})"
                        if len(members) > max_files
                        else f"at least {total:,} bytes, over the budget of {max_bytes:,} ({ENV_MAX_BYTES})"
                    )
                    raise BundleError(
                        f"bundle archive '{tar_path}' refused; nothing was extracted: its headers declare "
                        f"{declared}. A bundle is a few files; if this one is genuine, raise the budget"
                    )
            problems = [p for p in (_member_problem(m, dest_real) for m in members) if p]
            if problems:
                raise BundleError(
                    f"unsafe bundle archive '{tar_path}' refused; nothing was extracted:\n  - "
                    + "\n  - ".join(problems)
                )
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest_real, members=members, filter="data")
            else:  # pragma: no cover - Python without PEP 706; our own checks above still hold
                tf.extractall(dest_real, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"cannot read bundle archive '{tar_path}': {exc}") from exc
    if os.path.isfile(os.path.join(dest_real, MANIFEST_NAME)):
        return dest_real
    tops = {m.name.replace("\\", "/").split("/")[0] for m in members if m.name}
    for top in sorted(tops):
        if os.path.isfile(os.path.join(dest_real, top, MANIFEST_NAME)):
            return os.path.join(dest_real, top)
    raise BundleError(f"archive '{tar_path}' holds no {MANIFEST_NAME}: not a fixres-deploy bundle")
