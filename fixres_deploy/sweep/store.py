"""A content-addressed result store: every stage result keyed by everything that determines it.

A record's key is the hash of its stage name and its inputs — upstream file hashes, options,
library versions — so an interrupted sweep resumes where it stopped, a repeated sweep
measures nothing twice, and a changed input re-computes only the records whose key it is part
of. Records are JSON (no pickle); files a stage produces live in the record's artifact folder.
Writes are atomic: a crash leaves either the old record or none, never half of one.

What is reused is checked, so nothing corrupt is ever measured or shipped as if it were the
file that was measured:

* every file of a record's artifact folder is recorded with its size and sha256 when the
  stage finishes and verified on every reuse; a missing, truncated or altered file moves the
  record and its folder to ``quarantine/`` (a WARNING names the file and what differs) and the
  stage is computed again;
* paths inside a record are stored relative to the store root (``@store/artifacts/...``) and
  resolved against the store's current location on read, so a run folder can be copied, moved
  or mounted elsewhere and its records still point into it;
* a failure is recorded with its kind: a deterministic one (a model a backend cannot build) is
  remembered, an environmental one (disk full, out of memory, a killed process, an
  interruption) is never stored — the run stops with :class:`TransientStageError` and the next
  run computes the stage again;
* temporary folders ``artifacts/.<key>.<pid>.<random>`` of processes that died (SIGKILL) are
  removed when a store is opened and by ``fixres-deploy store gc``.

Cost: verification reads every reused artifact once per run (sha256 at roughly 1 GB/s), which
is small next to loading the same engine to measure it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fixres_deploy.core.errors import FixResError
from fixres_deploy.core.schema import SchemaVersionError, check_schema, stamp
from fixres_deploy.core.utils import current_umask, sha256_file, stable_hash, strip_ansi, write_json

log = logging.getLogger(__name__)

STORE_RECORD_FORMAT = "fixres-deploy/store-record"
STORE_SCHEMA_VERSION = 2  # 2: relative paths, file sizes and sha256, error_kind
SCHEMA = STORE_SCHEMA_VERSION  # part of every key: records of another schema are never looked up
ROOT_TOKEN = "@store"  # a path inside the store, as written in a record
ORPHAN_MAX_AGE_S = 24 * 3600.0  # a temp folder this old is an orphan even if its pid is alive (pid reuse)

DETERMINISTIC = "deterministic"
ENVIRONMENTAL = "environmental"
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EIO}
_ENV_MESSAGES = ("out of memory", "killed by signal", "no space left on device", "disk quota exceeded")


class TransientStageError(FixResError):
    """A stage failed for an environmental reason (disk full, out of memory, a killed process).

    Nothing is stored for it; the next run computes the stage again.
    """


def error_kind(exc: BaseException) -> str:
    """``"environmental"`` for faults of the machine, ``"deterministic"`` for faults of the input.

    Environmental: OSError ENOSPC/EDQUOT/ENOMEM/EMFILE/ENFILE/EIO, MemoryError, a subprocess
    killed by a signal, "out of memory" errors of torch/ONNX Runtime, anywhere in the chain
    of causes. Everything else (a graph a backend rejects, a shape error) would fail the same
    way again, so it is remembered.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError | KeyboardInterrupt):
            return ENVIRONMENTAL
        if isinstance(e, OSError) and e.errno in _ENV_ERRNOS:
            return ENVIRONMENTAL
        if isinstance(e, subprocess.CalledProcessError) and e.returncode is not None and e.returncode < 0:
            return ENVIRONMENTAL
        if any(m in str(e).lower() for m in _ENV_MESSAGES):
            return ENVIRONMENTAL
        e = e.__cause__ or e.__context__
    return DETERMINISTIC


def find_store(path: str | os.PathLike) -> Path:
    """The store at ``path``: the store folder itself or a run folder holding ``store/``."""
    from fixres_deploy.core.errors import UserInputError

    p = Path(path)
    for cand in (p, p / "store"):
        if (cand / "objects").is_dir():
            return cand
    raise UserInputError(
        f"'{path}' is not a fixres-deploy result store (no objects/ folder in it or in {p / 'store'}); "
        "pass the store folder of a sweep (OUT/store or the config's store = ...)"
    )


class StageFailed(Exception):
    """A stage failed (already recorded in the store): skip what depends on it."""


class ResultStore:
    """Records under ``root/objects/<k[:2]>/<key>.json``; stage files under ``root/artifacts/<key>/``."""

    def __init__(self, root: str | os.PathLike, *, clean_orphans: bool = True):
        self.root = Path(os.path.abspath(os.fspath(root)))
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.computed: dict[str, int] = {}  # stage -> records computed by this process
        if clean_orphans:
            removed = self.orphans(remove=True)
            if removed:
                log.info("removed %d temporary folder(s) of interrupted runs from %s", len(removed), self.root)

    # -- keys and paths ---------------------------------------------------------------------
    def key(self, stage: str, inputs: dict) -> str:
        return stable_hash({"schema": SCHEMA, "stage": stage, "inputs": inputs})

    def _record_path(self, key: str) -> Path:
        return self.root / "objects" / key[:2] / f"{key}.json"

    def artifact_dir(self, key: str) -> Path:
        return self.root / "artifacts" / key

    def to_stored(self, obj: Any) -> Any:
        """Paths under the store root → ``@store/...`` (what a record holds)."""
        prefix = str(self.root) + os.sep
        return _map_strings(
            obj, lambda s: ROOT_TOKEN + "/" + s[len(prefix) :].replace(os.sep, "/") if s.startswith(prefix) else s
        )

    def from_stored(self, obj: Any) -> Any:
        """``@store/...`` → absolute paths under this store's current location."""
        prefix = ROOT_TOKEN + "/"
        return _map_strings(
            obj, lambda s: str(self.root.joinpath(*s[len(prefix) :].split("/"))) if s.startswith(prefix) else s
        )

    # -- records ----------------------------------------------------------------------------
    def _read(self, path: Path) -> dict | None:
        """The record at ``path`` with its paths resolved; None (and why, logged) when unusable."""
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("corrupt store record %s: recomputing", path)
            return None
        try:
            check_schema(doc, STORE_RECORD_FORMAT, STORE_SCHEMA_VERSION, path, "the stage is computed again.")
        except SchemaVersionError as exc:
            log.warning("%s", exc)
            return None
        return self.from_stored(doc)

    def get(self, key: str) -> dict | None:
        return self._read(self._record_path(key))

    def put(self, key: str, record: dict) -> None:
        write_json(self._record_path(key), stamp(self.to_stored(record), STORE_RECORD_FORMAT, STORE_SCHEMA_VERSION))

    def record_files(self) -> list[Path]:
        return sorted((self.root / "objects").glob("*/*.json"))

    def records(self, stage: str | None = None) -> Iterator[dict]:
        for path in self.record_files():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(doc, dict) or doc.get("schema_version") != STORE_SCHEMA_VERSION:
                continue
            if stage is None or doc.get("stage") == stage:
                yield self.from_stored(doc)

    # -- verification -----------------------------------------------------------------------
    def verify(self, record: dict) -> list[str]:
        """Problems of a record's artifact files (missing, size, sha256); empty when intact."""
        folder = self.artifact_dir(record["key"])
        problems = []
        for rel, want in (record.get("files") or {}).items():
            path = folder.joinpath(*rel.split("/"))
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                problems.append(f"{path}: missing")
                continue
            if size != want["size_bytes"]:
                problems.append(f"{path}: {size} bytes, {want['size_bytes']} recorded (truncated or overwritten)")
            elif sha256_file(path) != want["sha256"]:
                problems.append(f"{path}: sha256 differs from the one recorded (contents altered)")
        return problems

    def quarantine(self, key: str, problems: list[str]) -> Path:
        """Move a record and its artifact folder to ``quarantine/<key>.<time>.<pid>.<random>/``; return that folder.

        The folder is new every time (mkdtemp): one key can be quarantined twice within a second.
        """
        (self.root / "quarantine").mkdir(parents=True, exist_ok=True)
        prefix = f"{key}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}."
        dest = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root / "quarantine"))
        os.chmod(dest, 0o777 & ~current_umask())  # mkdtemp makes 0700
        folder = self.artifact_dir(key)
        if folder.exists():
            os.replace(folder, dest / "artifacts")
        record = self._record_path(key)
        if record.exists():
            os.replace(record, dest / "record.json")
        (dest / "problems.txt").write_text("\n".join(problems) + "\n", encoding="utf-8")
        return dest

    def _reusable(self, rec: dict, stage: str, retry_failed: bool) -> bool:
        if rec.get("error") and (retry_failed or rec.get("error_kind") != DETERMINISTIC):
            return False
        problems = self.verify(rec)
        if problems:
            dest = self.quarantine(rec["key"], problems)
            log.warning(
                "stored %s result %s failed verification, moved to %s and computed again:\n  %s",
                stage,
                rec["key"][:12],
                dest,
                "\n  ".join(problems),
            )
            return False
        return True

    # -- computing --------------------------------------------------------------------------
    def run(
        self,
        stage: str,
        inputs: dict,
        fn: Callable[[Path], dict],
        *,
        retry_failed: bool = False,
    ) -> tuple[dict, bool]:
        """Return the stored record for (stage, inputs), computing it with ``fn`` when absent.

        ``fn(artifact_dir) -> dict`` writes any files into ``artifact_dir`` and returns the
        result (paths in it may point into the folder; a ``"files"`` list is accepted and
        ignored: every file of the folder is recorded and verified). A deterministic exception
        in ``fn`` is recorded (type, message) and returned as a failure record — the caller
        decides what to do; it is not recomputed on the next run unless ``retry_failed``.

        Returns:
            (record, from_store)

        Raises:
            TransientStageError: ``fn`` failed for an environmental reason (nothing stored).
            KeyboardInterrupt: interrupted (SIGINT, SIGTERM in the CLI); nothing stored.
        """
        key = self.key(stage, inputs)
        rec = self.get(key)
        if rec is not None and self._reusable(rec, stage, retry_failed):
            self.hits += 1
            return rec, True
        self.misses += 1
        self.computed[stage] = self.computed.get(stage, 0) + 1
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.{os.getpid()}.", dir=self.root / "artifacts"))
        try:
            return self._compute(key, stage, inputs, fn, tmp_dir), False
        finally:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir, ignore_errors=True)

    def _compute(self, key: str, stage: str, inputs: dict, fn, tmp_dir: Path) -> dict:
        t0 = time.perf_counter()
        error = kind = None
        try:
            result = fn(tmp_dir) or {}
        except Exception as exc:  # a failed stage is a result: record it and go on
            kind = error_kind(exc)
            if kind == ENVIRONMENTAL:
                raise _transient(stage, exc) from exc
            result = {}
            error = strip_ansi(f"{type(exc).__name__}: {exc}")
            log.debug("stage %s failed:\n%s", stage, traceback.format_exc())
        seconds = time.perf_counter() - t0
        final_dir = self.artifact_dir(key)
        if isinstance(result, dict):
            result.pop("files", None)
        result = _map_strings(
            result, lambda s: str(final_dir) + s[len(str(tmp_dir)) :] if s.startswith(str(tmp_dir)) else s
        )
        try:
            files = _file_table(tmp_dir)
            other = self._publish(key, stage, tmp_dir, final_dir)
            if other is not None:  # a concurrent writer (a sweep shard) stored the same stage first
                return other
            record = {
                "key": key,
                "stage": stage,
                "inputs": inputs,
                "result": result,
                "files": files,
                "error": error,
                "error_kind": kind,
                "seconds": seconds,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            self.put(key, record)
        except OSError as exc:
            if error_kind(exc) == ENVIRONMENTAL:
                shutil.rmtree(final_dir, ignore_errors=True)
                raise _transient(stage, exc) from exc
            raise
        return stamp(record, STORE_RECORD_FORMAT, STORE_SCHEMA_VERSION)

    def _publish(self, key: str, stage: str, tmp_dir: Path, final_dir: Path) -> dict | None:
        """Rename a stage's folder into place; the winner's record if another writer got there first.

        Shards of a sweep share one store (possibly on a network filesystem) and may race on a
        key: the race is benign — the first complete record wins and the other copy is
        discarded. Only renames are used (atomic on POSIX filesystems and on an NFS server).
        """
        other = self.get(key)
        if other is not None and not other.get("error") and not self.verify(other):
            return other
        if final_dir.exists():  # a stale folder: its record is missing, failed or lost files
            aside = final_dir.with_name(f".{key[:12]}.{os.getpid()}.stale{time.monotonic_ns()}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(final_dir, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(tmp_dir, final_dir)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            for _ in range(600):  # another writer renamed its folder in between: wait for its record
                other = self.get(key)
                if other is not None and not self.verify(other):
                    return other
                time.sleep(0.1)
            raise
        return None

    # -- maintenance ------------------------------------------------------------------------
    def orphans(self, *, remove: bool = False, max_age_s: float = ORPHAN_MAX_AGE_S) -> list[Path]:
        """Temp folders ``artifacts/.<key>.<pid>.<random>`` whose process is gone (or that are too old)."""
        found = []
        now = time.time()
        for entry in sorted((self.root / "artifacts").glob(".*")):
            if not entry.is_dir():
                continue
            parts = entry.name.split(".")  # ['', key12, pid, random]
            pid = int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() else None
            try:
                age = now - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > max_age_s or (pid is not None and not _pid_alive(pid)) or (pid is None and age > 600):
                found.append(entry)
                if remove:
                    shutil.rmtree(entry, ignore_errors=True)
        return found

    def check(self, *, quarantine: bool = True) -> dict:
        """Verify every record of the store: ``{"ok": n, "bad": [...], "stale": [...], "unreadable": [...]}``."""
        out: dict[str, Any] = {"ok": 0, "bad": [], "stale": [], "unreadable": []}
        for path in self.record_files():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                out["unreadable"].append({"record": str(path), "problem": f"{type(exc).__name__}: {exc}"})
                if quarantine:
                    self.quarantine(path.stem, [f"{path}: unreadable record"])
                continue
            if not isinstance(doc, dict) or doc.get("schema_version") != STORE_SCHEMA_VERSION:
                version = doc.get("schema_version") if isinstance(doc, dict) else None
                out["stale"].append({"record": str(path), "schema_version": version})
                continue
            problems = self.verify(doc)
            if problems:
                entry = {"record": str(path), "stage": doc.get("stage"), "problems": problems}
                if quarantine:
                    entry["quarantined_to"] = str(self.quarantine(doc["key"], problems))
                out["bad"].append(entry)
            else:
                out["ok"] += 1
        return out

    def gc(self, *, dry_run: bool = False) -> dict:
        """Remove orphan temp folders, records of other schema versions, unreferenced artifact folders, quarantine."""
        removed: dict[str, list[str]] = {"orphans": [], "stale_records": [], "unreferenced": [], "quarantine": []}
        removed["orphans"] = [str(p) for p in self.orphans(remove=not dry_run)]
        live = set()
        for path in self.record_files():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                current = isinstance(doc, dict) and doc.get("schema_version") == STORE_SCHEMA_VERSION
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                current = False
            if current:
                live.add(path.stem)
            else:
                removed["stale_records"].append(str(path))
                if not dry_run:
                    path.unlink(missing_ok=True)
        for entry in sorted((self.root / "artifacts").iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.name not in live:
                removed["unreferenced"].append(str(entry))
                if not dry_run:
                    _remove(entry)
        q = self.root / "quarantine"
        if q.is_dir():
            for entry in sorted(q.iterdir()):
                removed["quarantine"].append(str(entry))
                if not dry_run:
                    _remove(entry)
        return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return False
    return True


def _transient(stage: str, exc: BaseException) -> TransientStageError:
    return TransientStageError(
        f"stage {stage} failed for an environmental reason ({type(exc).__name__}: {exc}); nothing was "
        "stored for it. Free disk space or memory (or let the run finish uninterrupted) and run the "
        "same command again: finished stages are reused, this one is computed again."
    )


def _file_table(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``folder``, by path relative to it (``/`` separated)."""
    table = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            table[rel] = {"size_bytes": os.path.getsize(full), "sha256": sha256_file(full)}
    return table


def _map_strings(obj: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, Path):
        return fn(os.fspath(obj))
    if isinstance(obj, list | tuple):
        return [_map_strings(v, fn) for v in obj]
    if isinstance(obj, dict):
        return {k: _map_strings(v, fn) for k, v in obj.items()}
    return obj
