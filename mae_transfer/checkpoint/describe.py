"""What a pretrained backbone file holds, read once per process.

Planning a benchmark asks the same questions of one file for every task (its size name, the image
size of its position table, whether it can be read at all); so does a command that checks its
``--backbone`` before anything is written and later infers the ViT. :func:`describe_checkpoint`
reads the file once and keeps the small answer (never the tensors), keyed by the file's resolved
path, size and modification time: a file rewritten in place is read again.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from mae_transfer.checkpoint.formats import infer_vit_config
from mae_transfer.checkpoint.hub import is_named, weights_file
from mae_transfer.checkpoint.reading import read_checkpoint

_CACHE: dict[tuple, dict[str, Any]] = {}
_LOCK = threading.Lock()


def _key(path: str | os.PathLike, trust: bool) -> tuple | None:
    """The file's identity (resolved path, size, mtime), or None for a source that is not one file
    on disk yet (a hub name not downloaded, a missing path): such sources are never cached."""
    try:
        if is_named(path):
            return None
        f = weights_file(path)
        st = Path(f).resolve().stat()
    except Exception:
        return None
    return (str(Path(f).resolve()), st.st_size, st.st_mtime_ns, bool(trust))


def describe_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """The architecture a backbone file's tensors describe (:func:`infer_vit_config`'s dict: size name,
    widths, patch and image size ...), read at most once per process and file version. Raises
    :class:`~mae_transfer.checkpoint.errors.CheckpointError` exactly as :func:`read_checkpoint` does
    (errors are not cached: the next call reads again and says the same)."""
    key = _key(path, trust)
    if key is not None:
        with _LOCK:
            hit = _CACHE.get(key)
        if hit is not None:
            return dict(hit)
    # The file as read: its format is named from its own layout (infer_vit_config converts it).
    info = infer_vit_config(read_checkpoint(path, trust=trust))
    if key is not None:
        with _LOCK:
            _CACHE[key] = dict(info)
    return info


def clear_cache() -> None:
    """Forget every description (tests; a long-lived process that rewrites files in place within the
    file system's timestamp resolution)."""
    with _LOCK:
        _CACHE.clear()


__all__ = ["clear_cache", "describe_checkpoint"]
