"""Crash-safe file writes shared by every module (results, configs, benchmark numbers)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing (``"w"`` text, ``"wb"`` bytes); when the block
    ends, flush, fsync and rename it over ``path`` (and fsync the folder, so the rename survives a
    crash). Readers see the old file or the new one, never a half-written one; if the block raises,
    the temporary file is removed and ``path`` is untouched. The file gets the usual umask
    permissions. Every writer of the project goes through here (configs, results, tables, pictures,
    checkpoints)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing: 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # "x": a new file only (O_EXCL), never through a link planted at the temporary name. The
        # rename below replaces a link at ``path`` itself; the file it pointed to is untouched.
        with open(tmp, mode.replace("w", "x"), **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` to ``path`` through :func:`atomic_write`."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def json_safe(value: Any, nonfinite_as_text: bool = False) -> Any:
    """``value`` with every NaN / inf float (nested in dicts, lists, tuples; 0-d tensors and numpy
    scalars taken as Python numbers) replaced: by None (JSON null) for results and metrics, where an
    undefined number (APl without large objects) must not break strict parsers (jq, JavaScript); by
    its text (``"nan"``, ``"inf"``) with ``nonfinite_as_text``, for the training curves, where a
    diverged loss must stay visible as such. The one NaN rule of every JSON writer of the toolkit."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes, dict, list, tuple)):
        try:
            value = value.item()  # a one-element tensor or numpy value
        except (ValueError, RuntimeError):
            pass  # more than one element: left as it is
    if isinstance(value, float) and not math.isfinite(value):
        return str(value) if nonfinite_as_text else None
    if isinstance(value, dict):
        return {k: json_safe(v, nonfinite_as_text) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, nonfinite_as_text) for v in value]
    return value


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """``data`` as strict JSON (non-finite floats written as null), atomically."""
    return atomic_write_text(path, json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")


def atomic_write_json_list(
    path: str | os.PathLike, items: Iterable[Any], chunk: int = 8192, all_finite: bool = False
) -> Path:
    """The bytes of ``atomic_write_json(path, list(items), indent=None)``, atomically, encoded
    ``chunk`` items at a time: a long list (COCO's 500k detection results) is never held whole as
    JSON text, nor needs to be a list (any iterable, a generator included). ``all_finite``: the
    caller knows there is no NaN or infinity to write as null (skips that pass; one left would
    raise ValueError, not be written)."""

    def encode(block: list) -> str:
        return json.dumps(block if all_finite else json_safe(block), allow_nan=False)[1:-1]

    with atomic_write(path, "w") as f:
        f.write("[")
        sep = ""
        block: list = []
        for item in items:
            block.append(item)
            if len(block) == chunk:
                f.write(sep + encode(block))
                sep, block = ", ", []
        if block:
            f.write(sep + encode(block))
        f.write("]\n")
    return Path(path)


def atomic_write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """One JSON object per line, atomically."""
    return atomic_write_text(path, "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in rows))


def try_flock(fd: int, blocking: bool = False) -> bool | None:
    """An exclusive ``flock`` on the open file ``fd``: True when it holds the lock now, False when
    another open file holds it (never when ``blocking``: that waits), None where the system or the
    file system has no such locks. The lock belongs to the open file: closing it, or the end of the
    process (kill -9 included), releases it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError:  # e.g. some network file systems
        return None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Wait for an exclusive ``flock`` on ``path`` (created if needed) and hold it for the block; a
    no-op where locks are unsupported. (Run directories and result stores use the engine's
    ``locks.FileLock``, which also says who holds them.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try_flock(f.fileno(), blocking=True)
        yield  # closing the file releases the lock


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (the identity of a backbone checkpoint in result rows)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class OutputPathError(ValueError):
    """An output path a command cannot write (a file where a folder goes, a folder where a file goes,
    a path inside a file, a place that takes no new entries); the message names the option."""


def check_output_path(path: str | os.PathLike, option: str = "--output", folder: bool = True) -> Path:
    """Raise :class:`OutputPathError` unless ``path`` can be written as a folder (``folder``) or as a
    file, before any work is done: it is not already the other kind of thing, nothing above it is a
    file, and the deepest existing folder takes new entries (probed by making and removing a
    temporary folder there, which also catches read-only file systems and /proc, where running as
    root would pass a permission check). Nothing is left behind; returns ``Path(path)``."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputPathError(
            f"{option} {path}: is a file, not a folder; give a folder (a new one or an existing folder)"
        )
    if not folder and path.is_dir():
        raise OutputPathError(
            f"{option} {path}: is a folder; give the path of the file to write (a new name, or a file to replace)"
        )
    here = path if path.is_dir() else path.parent
    while not here.exists() and here != here.parent:  # exists() is also False inside a file
        here = here.parent
    if here.exists() and not here.is_dir():
        raise OutputPathError(
            f"{option} {path}: {here} is a file, so nothing can be written inside it; give a path outside it"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mae-transfer-write-test-", dir=here))
    except OSError as e:
        raise OutputPathError(
            f"{option} {path}: cannot write in {here} ({e.strerror or e}); give a writable location"
        ) from None
    return path


_OPEN_FLAGS = {
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
}


def link_refused(path: str | os.PathLike) -> OutputPathError:
    """The error for a symbolic link found where the toolkit writes a file of its own."""
    return OutputPathError(
        f"{path} is a symbolic link (to {os.readlink(path)}); the toolkit does not write through links "
        "in its output folders: remove the link (or choose another output folder)"
    )


def open_output(
    path: str | os.PathLike, mode: str = "a", encoding: str | None = "utf-8", newline: str | None = None
) -> IO:
    """``open(path, mode)`` for the files written in place in a run or results folder (``log.txt``,
    ``train.csv``/``.jsonl``, ``bench.log``, a store's ``results.jsonl``): ``"w"``, ``"a"``, ``"a+"``,
    with ``"b"`` for bytes. It never writes through a symbolic link at ``path`` (``O_NOFOLLOW``):
    a link planted there (``log.txt -> /some/outside/file``) would make the run overwrite or grow a
    file outside the folder, so it is refused with :class:`OutputPathError` naming the link. (Files
    written whole go through :func:`atomic_write`, whose rename replaces such a link itself.)"""
    binary = "b" in mode
    base = mode.replace("b", "")
    if base not in _OPEN_FLAGS:
        raise ValueError(f"open_output opens files for writing: 'w', 'a' or 'a+' (with 'b'), got {mode!r}")
    flags = _OPEN_FLAGS[base] | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError:
        if os.path.islink(path):  # ELOOP on Linux and macOS (EMLINK on FreeBSD)
            raise link_refused(path) from None
        raise
    try:
        return os.fdopen(fd, mode, **({} if binary else {"encoding": encoding, "newline": newline}))
    except BaseException:
        os.close(fd)
        raise
