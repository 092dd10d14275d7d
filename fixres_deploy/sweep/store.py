"""A content-addressed result store: every stage result keyed by everything that determines it.

A record's key is the hash of its stage name and its inputs — upstream file hashes, options,
library versions — so an interrupted sweep resumes where it stopped, a repeated sweep
measures nothing twice, and a changed input re-computes only the records whose key it is part
of. Records are JSON (no pickle); files a stage produces live in the record's artifact folder.
Writes are atomic: a crash leaves either the old record or none, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fixres_deploy.core.utils import stable_hash, write_json

log = logging.getLogger(__name__)

SCHEMA = 1


class ResultStore:
    """Records under ``root/objects/<k[:2]>/<key>.json``; stage files under ``root/artifacts/<key>/``."""

    def __init__(self, root: str | os.PathLike):
        # absolute: stages return absolute paths, which are rebased from the temp folder by prefix
        self.root = Path(os.path.abspath(root))
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def key(self, stage: str, inputs: dict) -> str:
        return stable_hash({"schema": SCHEMA, "stage": stage, "inputs": inputs})

    def _record_path(self, key: str) -> Path:
        return self.root / "objects" / key[:2] / f"{key}.json"

    def artifact_dir(self, key: str) -> Path:
        return self.root / "artifacts" / key

    def get(self, key: str) -> dict | None:
        path = self._record_path(key)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            log.warning("corrupt store record %s: recomputing", path)
            return None

    def put(self, key: str, record: dict) -> None:
        write_json(self._record_path(key), record)

    def records(self, stage: str | None = None) -> Iterator[dict]:
        for path in sorted((self.root / "objects").glob("*/*.json")):
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if stage is None or rec.get("stage") == stage:
                yield rec

    def _files_present(self, record: dict) -> bool:
        return all(os.path.exists(p) for p in record.get("files", []))

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
        result; list produced file paths under ``"files"`` (absolute, inside the folder) so a
        record whose files vanished is recomputed. An exception in ``fn`` is recorded (type,
        message) and returned as a failure record — the caller decides what to do; it is
        not recomputed on the next run unless ``retry_failed``.

        Returns:
            (record, from_store)
        """
        key = self.key(stage, inputs)
        rec = self.get(key)
        if rec is not None and self._files_present(rec) and (rec.get("error") is None or not retry_failed):
            self.hits += 1
            return rec, True
        self.misses += 1
        final_dir = self.artifact_dir(key)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=self.root / "artifacts"))
        t0 = time.perf_counter()
        error = None
        try:
            result = fn(tmp_dir) or {}
        except KeyboardInterrupt:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        except Exception as exc:  # a failed stage is a result: record it and go on
            result = {}
            error = f"{type(exc).__name__}: {exc}"
            log.debug("stage %s failed:\n%s", stage, traceback.format_exc())
        seconds = time.perf_counter() - t0
        # move produced files into place, rewriting their paths
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        result = _rebase_paths(result, str(tmp_dir), str(final_dir))
        record = {
            "key": key,
            "stage": stage,
            "inputs": inputs,
            "result": result,
            "files": [f.replace(str(tmp_dir), str(final_dir)) for f in result.pop("files", [])]
            if isinstance(result, dict)
            else [],
            "error": error,
            "seconds": seconds,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.put(key, record)
        return record, False


def _rebase_paths(obj: Any, old: str, new: str) -> Any:
    if isinstance(obj, str):
        return obj.replace(old, new) if obj.startswith(old) else obj
    if isinstance(obj, list):
        return [_rebase_paths(v, old, new) for v in obj]
    if isinstance(obj, dict):
        return {k: _rebase_paths(v, old, new) for k, v in obj.items()}
    return obj
