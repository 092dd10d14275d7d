"""Verify a bundle folder or archive before trusting it: format, digest, every file, the content, this machine.

A tampered, truncated or incompatible bundle is refused with the reason instead of giving
silently wrong answers.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field

from fixres_deploy.core.errors import UserInputError
from fixres_deploy.core.utils import sha256_file
from fixres_deploy.ship.archive import extract_bundle
from fixres_deploy.ship.compat import engine_runtime_problems
from fixres_deploy.ship.manifest import (
    MANIFEST_NAME,
    TAR_SUFFIX,
    BundleError,
    BundleManifest,
    batch_range,
    read_manifest,
)


@dataclass
class VerifyReport:
    """Result of :func:`verify_bundle`: ``ok`` is False when anything in ``problems``.

    ``notes`` hold what does not stop the chosen engine from running (another engine of the
    bundle that cannot run here, for example).
    """

    path: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    engine: str | None = None
    backend: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise BundleError(f"bundle '{self.path}' refused:\n  - " + "\n  - ".join(self.problems))


def _safe_rel(rel: str) -> bool:
    return bool(rel) and not rel.startswith("/") and ".." not in rel.split("/") and "\\" not in rel


def _check_files(root: str, manifest: BundleManifest) -> list[str]:
    problems = []
    for rel, info in sorted(manifest.files.items()):
        if not _safe_rel(rel):
            problems.append(f"manifest lists an unsafe path {rel!r}")
            continue
        full = os.path.join(root, rel)
        if os.path.islink(full):
            problems.append(f"{rel}: is a symlink (bundles hold regular files only)")
        elif not os.path.isfile(full):
            problems.append(f"{rel}: listed in the manifest but missing")
        elif os.path.getsize(full) != info.get("size_bytes"):
            problems.append(f"{rel}: size {os.path.getsize(full)} bytes, manifest says {info.get('size_bytes')}")
        elif sha256_file(full) != info.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch (the file was modified after bundling)")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full):
                if rel not in manifest.files:
                    problems.append(f"{rel}: symlink inside the bundle")
                continue
            if name in filenames and rel != MANIFEST_NAME and rel not in manifest.files:
                problems.append(f"{rel}: file not listed in the manifest (added after bundling)")
    return problems


def _check_content(root: str, manifest: BundleManifest) -> list[str]:
    problems = []
    try:
        cfg = manifest.preprocess_config()
    except UserInputError as exc:
        return [f"manifest preprocessing is invalid: {exc}"]
    if cfg.test_input_size != manifest.resolution:
        problems.append(
            f"manifest resolution {manifest.resolution} differs from the preprocessing's "
            f"test_input_size {cfg.test_input_size}"
        )
    if manifest.num_classes != len(manifest.class_names):
        problems.append(f"manifest num_classes {manifest.num_classes} but {len(manifest.class_names)} class names")
    labels = os.path.join(root, manifest.labels_file)
    if os.path.isfile(labels):
        with open(labels, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if lines != list(manifest.class_names):
            problems.append(f"{manifest.labels_file} does not match the manifest's class names")
    for e in manifest.engines:
        for rel in [e.file, *e.external_data] + ([e.source_onnx] if e.source_onnx else []):
            if rel not in manifest.files:
                problems.append(f"engine file {rel!r} is not in the manifest's file list")
        if batch_range(e.shapes, cfg.test_input_size) is None:
            problems.append(f"engine {e.file} does not accept the preprocessing's {cfg.test_input_size}px input")
    return problems


def verify_bundle(
    path: str | os.PathLike,
    *,
    backend: str | None = None,
    check_runtime: bool = True,
    check_load: bool = True,
) -> VerifyReport:
    """Check a bundle folder or ``.tar.gz`` before trusting it.

    Args:
        path: the bundle folder or archive.
        backend: the backend that will run it (None: the primary engine's).
        check_runtime: also check that the engine can run on this machine (library version,
            GPU); off for tools that only copy files (the Triton export).
        check_load: ONNX Runtime engines: actually load the model (catches unsupported opsets).

    Returns:
        A :class:`VerifyReport`; ``ok`` is False with the reasons in ``problems``.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and (path.endswith((TAR_SUFFIX, ".tgz", ".tar"))):
        with tempfile.TemporaryDirectory(prefix="fixres-bundle-") as tmp:
            try:
                root = extract_bundle(path, tmp)
            except BundleError as exc:
                return VerifyReport(path=path, ok=False, problems=[str(exc)])
            report = verify_bundle(root, backend=backend, check_runtime=check_runtime, check_load=check_load)
            report.path = path
            return report
    if not os.path.isdir(path):
        return VerifyReport(path=path, ok=False, problems=[f"'{path}' is neither a bundle folder nor a .tar.gz"])
    mpath = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(mpath):
        return VerifyReport(
            path=path, ok=False, problems=[f"no {MANIFEST_NAME} in '{path}': not a fixres-deploy bundle"]
        )
    try:
        manifest = read_manifest(mpath)
    except (UserInputError, KeyError, TypeError, ValueError) as exc:
        return VerifyReport(path=path, ok=False, problems=[f"{MANIFEST_NAME}: {exc}"])
    problems: list[str] = []
    notes: list[str] = []
    if manifest.digest != manifest.compute_digest():
        problems.append(f"{MANIFEST_NAME} was edited after bundling (its digest does not match its content)")
    problems += _check_files(path, manifest)
    problems += _check_content(path, manifest)
    try:
        engine = manifest.engine_for(backend)
    except BundleError as exc:
        return VerifyReport(path=path, ok=False, problems=problems + [str(exc)], notes=notes)
    if check_runtime:
        intact = not problems
        problems += engine_runtime_problems(path, engine, check_load=check_load and intact)
        for other in manifest.engines:
            if other.file != engine.file:
                notes += [f"(other engine) {p}" for p in engine_runtime_problems(path, other, check_load=False)]
    return VerifyReport(
        path=path, ok=not problems, problems=problems, notes=notes, engine=engine.file, backend=engine.backend
    )
