"""Versioned project files: every file fixres-deploy writes names its format and schema version.

Each format has one writer and one reader (listed in docs/formats.md). The writer puts
``format`` and ``schema_version`` first; the reader calls :func:`check_schema`, which refuses a
file of another format or version with a message naming both versions and what to do, instead
of reading it half-right.
"""

from __future__ import annotations

import os
from typing import Any

from fixres_deploy.core.errors import UserInputError


class SchemaVersionError(UserInputError):
    """A project file of another format or schema version."""


def stamp(doc: dict, fmt: str, version: int) -> dict:
    """``{"format": fmt, "schema_version": version, **doc}`` (the header first, for readers of the file)."""
    return {
        "format": fmt,
        "schema_version": version,
        **{k: v for k, v in doc.items() if k not in ("format", "schema_version")},
    }


def check_schema(doc: Any, fmt: str, version: int, source: str | os.PathLike, fix: str) -> dict:
    """Return ``doc`` when it is a ``fmt`` file of ``version``; else raise SchemaVersionError.

    Args:
        doc: the parsed file.
        fmt: the expected ``format`` value (e.g. ``"fixres-deploy/build-index"``).
        version: the ``schema_version`` this code reads.
        source: the file, for the message.
        fix: what the user should do with a file of another version (e.g. the command that rewrites it).
    """
    source = os.fspath(source)
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise SchemaVersionError(f"'{source}' is not a {fmt} file (format: {got!r}); {fix}")
    got_version = doc.get("schema_version")
    if got_version != version:
        raise SchemaVersionError(
            f"'{source}' is a {fmt} file of schema_version {got_version!r}; this fixres-deploy reads "
            f"schema_version {version}. {fix}"
        )
    return doc
