"""Bundle archives: write a ``.tar.gz`` of a bundle folder, extract one safely.

Extraction checks every member BEFORE anything is written (no absolute paths, no ``..``,
nothing resolving outside the destination, no links or devices).
"""

from __future__ import annotations

import os
import re
import tarfile

from fixres_deploy.core.utils import atomic_path
from fixres_deploy.ship.manifest import MANIFEST_NAME, TAR_SUFFIX, BundleError


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
    try:
        with tarfile.open(tar_path, "r:*") as tf:
            members = tf.getmembers()
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
