"""Crash-safe file writes shared by every module (results, configs, benchmark numbers)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary sibling, fsync, then rename over ``path``.

    Readers see the old file or the new one, never a half-written one. The temporary file is
    opened normally, so the result gets the usual umask permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN / inf are not JSON; null keeps strict parsers (jq, JavaScript) happy
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """``data`` as strict JSON (non-finite floats written as null), atomically."""
    return atomic_write_text(path, json.dumps(_finite_or_none(data), indent=indent, allow_nan=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """One JSON object per line, atomically."""
    return atomic_write_text(path, "".join(json.dumps(_finite_or_none(r), allow_nan=False) + "\n" for r in rows))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (the identity of a backbone checkpoint in result rows)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
