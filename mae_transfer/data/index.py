"""Dataset indexes at constant memory: flat arrays, built once per node and shared by every process.

A full-size annotation file parsed into Python objects costs gigabytes per process (COCO train2017:
7.7 million objects, +3.5 GB), and every forked DataLoader worker slowly copies those pages, because
reading a Python object writes its reference count. The readers here keep their per-image records in
a few flat numpy arrays instead (detectron2's ``DatasetFromList(serialize=True)`` idea, without the
pickling): numbers in typed arrays, strings in one byte buffer with offsets (:class:`PackedStrings`).
Reading a record touches no Python object of the index, so workers share its pages for good.

The arrays are written once to a cache folder (:func:`cached_index`) keyed by the annotation files'
identity (path, size, modification time and a hash of their first and last MiB) and by the reader's
options, and read back memory-mapped: every rank and every worker of a node maps the same file pages,
and a resumed or repeated run skips the parsing. A file lock makes the first process build while the
others wait and then map its result.

Cache folder: ``$MAE_TRANSFER_CACHE/index`` (else ``~/.cache/mae_transfer/index``);
``MAE_TRANSFER_INDEX_CACHE=0`` turns the cache off (indexes are then built in memory, still flat).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mae_transfer.io import file_lock

log = logging.getLogger(__name__)

INDEX_VERSION = 1
"""Bumped whenever a reader's array layout changes, so stale caches are rebuilt, not misread."""

_HASHED_BYTES = 1 << 20  # head and tail of each source file hashed into the key


# ------------------------------------------------------------------------------------- packed strings


def _position(index, n: int, what: str) -> int:
    """``index`` as a position in ``range(n)`` (negative counts from the end), or IndexError."""
    index = int(index)
    position = index + n if index < 0 else index
    if not 0 <= position < n:
        raise IndexError(f"index {index} out of range for {n} {what}")
    return position


class PackedStrings(Sequence[str]):
    """A read-only list of strings stored as one UTF-8 byte buffer and ``n + 1`` offsets.

    ``strings[i]`` decodes one entry; nothing but two numpy arrays is kept, so a million paths cost
    their bytes plus 8 bytes each instead of ~100 bytes of Python objects each.
    """

    def __init__(self, data: np.ndarray, offsets: np.ndarray, source: tuple | None = None):
        self.data = data
        self.offsets = offsets
        self._source = source  # (MappedArrays, prefix) when the arrays come from a cache folder

    def __reduce__(self):
        # Sent to a spawned worker (or forkserver, Python 3.14's default) by its cache folder, so
        # the worker maps the same file pages instead of receiving a private copy.
        if self._source is not None:
            return PackedStrings.from_arrays, self._source
        return PackedStrings, (self.data, self.offsets)

    @classmethod
    def pack(cls, strings: Iterable[str]) -> "PackedStrings":
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        if encoded:
            np.cumsum([len(b) for b in encoded], out=offsets[1:])
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        return cls(data, offsets)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_data": self.data, f"{prefix}_offsets": self.offsets}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> "PackedStrings":
        mapped = isinstance(arrays, MappedArrays) and arrays.folder is not None
        return cls(arrays[f"{prefix}_data"], arrays[f"{prefix}_offsets"], (arrays, prefix) if mapped else None)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = _position(index, len(self), "strings")
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        return bytes(self.data[a:b]).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        data, offsets = self.data, self.offsets
        for i in range(len(self)):
            yield bytes(data[offsets[i] : offsets[i + 1]]).decode("utf-8")

    def decode_all(self) -> list[str]:
        """Every string, decoded in one go (a Python list: for one-off passes in the main process)."""
        blob = self.data.tobytes()
        offsets = self.offsets.tolist()
        return [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]

    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)


class MappedArrays(dict):
    """The arrays of an index by name; when they are mapped from a cache folder, a pickled copy
    (what a spawned DataLoader worker receives) is just that folder's path, mapped again on arrival."""

    def __init__(self, arrays: Mapping[str, np.ndarray], folder: Path | None = None):
        super().__init__(arrays)
        self.folder = folder

    def __reduce__(self):
        if self.folder is not None:
            return _remap, (str(self.folder),)
        return MappedArrays, (dict(self), None)


def _remap(folder: str) -> "MappedArrays":
    loaded = _load(Path(folder))
    if loaded is None:
        raise OSError(f"the dataset index {folder} is gone or unreadable; run again to rebuild it")
    return loaded[0]


class PathLabels(Sequence[tuple[str, int]]):
    """``[(path, label), ...]`` kept as a :class:`PackedStrings` of paths (joined to ``prefix``) and an
    int32 label array: the ``samples`` of the classification readers at constant memory."""

    def __init__(self, paths: PackedStrings, labels: np.ndarray, prefix: str = "", keep: np.ndarray | None = None):
        self.paths = paths
        self.labels = labels
        self.prefix = prefix
        self.keep = keep  # indices into paths/labels that are served (None: all)

    def __len__(self) -> int:
        return len(self.paths) if self.keep is None else len(self.keep)

    def _raw(self, index: int) -> int:
        index = _position(index, len(self), "samples")
        return index if self.keep is None else int(self.keep[index])

    def path(self, index: int) -> str:
        rel = self.paths[self._raw(index)]
        return os.path.join(self.prefix, rel) if self.prefix else rel

    def label(self, index: int) -> int:
        return int(self.labels[self._raw(index)])

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        raw = self._raw(index)
        rel = self.paths[raw]
        return (os.path.join(self.prefix, rel) if self.prefix else rel), int(self.labels[raw])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def label_array(self) -> np.ndarray:
        """The served labels as one int64 array."""
        labels = self.labels if self.keep is None else self.labels[self.keep]
        return np.asarray(labels, dtype=np.int64)

    def __add__(self, other):
        return list(self) + list(other)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (PathLabels, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == tuple(b) for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def all_paths(self) -> list[str]:
        """Every served path (a Python list: for one-off checks, not for keeping)."""
        return [self.path(i) for i in range(len(self))]


class StringPairs(Sequence[tuple[str, str]]):
    """``[(a, b), ...]`` of strings as two :class:`PackedStrings` (e.g. image and label paths)."""

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        self.first = PackedStrings.pack(a for a, _ in pairs)
        self.second = PackedStrings.pack(b for _, b in pairs)

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.first[index], self.second[index]

    def __eq__(self, other) -> bool:
        if not isinstance(other, (StringPairs, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == tuple(b) for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------------- the cache


def index_cache_dir() -> Path:
    """``$MAE_TRANSFER_CACHE/index``, else ``~/.cache/mae_transfer/index``."""
    base = os.environ.get("MAE_TRANSFER_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "mae_transfer") / "index"


def cache_enabled() -> bool:
    return os.environ.get("MAE_TRANSFER_INDEX_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a source file's content for the cache: resolved path, size, mtime (ns) and a
    BLAKE2b of its first and last MiB (an edited file of the same size and time still changes it)."""
    path = Path(path)
    st = path.stat()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(_HASHED_BYTES))
        if st.st_size > _HASHED_BYTES:
            f.seek(max(_HASHED_BYTES, st.st_size - _HASHED_BYTES))
            h.update(f.read(_HASHED_BYTES))
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail": h.hexdigest()}


def index_key(kind: str, sources: Sequence[str | os.PathLike], options: Mapping[str, Any] | None = None) -> str:
    """The cache key of ``kind``'s index of ``sources`` built with ``options``."""
    what = {
        "version": INDEX_VERSION,
        "kind": kind,
        "sources": [file_identity(s) for s in sources],
        "options": dict(options or {}),
    }
    return hashlib.blake2b(json.dumps(what, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


@dataclass
class IndexInfo:
    """How an index was obtained: ``source`` is "built", "cache" or "memory" (cache off or not
    writable), ``seconds`` the time it took, ``path`` the cache folder (None in memory)."""

    source: str
    seconds: float
    path: Path | None = None

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return {"cache": "loaded from the index cache", "built": "built and cached", "memory": "built in memory"}[
            self.source
        ] + f" in {self.seconds:.1f} s{where}"


def _save(folder: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True)
    for name, value in arrays.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(value), allow_pickle=False)
    (folder / "meta.json").write_text(json.dumps({"arrays": sorted(arrays), "meta": meta}, default=str))


def _load(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    try:
        head = json.loads((folder / "meta.json").read_text())
        arrays = {}
        for name in head["arrays"]:
            try:
                # A plain ndarray view of the mapping: np.memmap's subclass hooks cost ~3 us a slice.
                arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False).view(np.ndarray)
            except ValueError:  # numpy cannot memory-map an empty array: read it (nothing to share)
                arrays[name] = np.load(folder / f"{name}.npy", allow_pickle=False)
        return MappedArrays(arrays, folder), head["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_index(
    kind: str,
    sources: Sequence[str | os.PathLike],
    options: Mapping[str, Any] | None,
    build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
) -> tuple[dict[str, np.ndarray], dict[str, Any], IndexInfo]:
    """The arrays and metadata of ``kind``'s index of ``sources``: memory-mapped from the cache when
    present, else made by ``build()`` (under a lock, so one process per node builds while the others
    wait), saved atomically, and mapped back. ``meta`` must be JSON-serialisable."""
    t0 = time.monotonic()
    if not cache_enabled():
        arrays, meta = build()
        return arrays, meta, IndexInfo("memory", time.monotonic() - t0)
    key = index_key(kind, sources, options)
    root = index_cache_dir()
    folder = root / f"{kind}-{key}"
    loaded = _load(folder)
    if loaded is not None:
        return loaded[0], loaded[1], IndexInfo("cache", time.monotonic() - t0, folder)
    try:
        lock_ctx = file_lock(root / f".{kind}-{key}.lock")
        lock_ctx.__enter__()
    except OSError as exc:  # the cache folder cannot be created: build in memory
        log.warning("index cache %s is not writable (%s); building the %s index in memory", root, exc, kind)
        arrays, meta = build()
        return arrays, meta, IndexInfo("memory", time.monotonic() - t0)
    try:
        loaded = _load(folder)  # another process may have built it while we waited for the lock
        if loaded is not None:
            return loaded[0], loaded[1], IndexInfo("cache", time.monotonic() - t0, folder)
        arrays, meta = build()
        tmp = root / f".{kind}-{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            _save(tmp, arrays, meta)
            os.replace(tmp, folder)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("could not write the %s index cache to %s (%s); using it from memory", kind, folder, exc)
            return arrays, meta, IndexInfo("memory", time.monotonic() - t0)
        del arrays
        loaded = _load(folder)
        if loaded is None:  # pragma: no cover - just written
            raise OSError(f"the index cache {folder} was written but cannot be read back")
        return loaded[0], loaded[1], IndexInfo("built", time.monotonic() - t0, folder)
    finally:
        lock_ctx.__exit__(None, None, None)


def freeze_heap_for_workers() -> None:
    """Call before DataLoader workers fork: moves every object the parent holds into the collector's
    permanent generation (``gc.freeze``), so the workers' garbage collections do not write to those
    objects' headers and copy the parent's whole Python heap page by page as an epoch goes by."""
    import gc

    gc.collect()
    gc.freeze()


def release_memory() -> None:
    """Give freed heap pages back to the OS after a big parse (glibc ``malloc_trim``), so a process
    that built an index does not keep the parse's peak as its resident size."""
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ------------------------------------------------------------------------------------- parsing


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file with orjson when installed (3-4x faster on a 450 MB COCO file, the same
    values: floats correctly rounded either way), else with the standard library. A file orjson
    refuses (NaN/Infinity literals, integers beyond 64 bits) is read again by the standard library,
    which also gives the error message when the file is damaged."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        import orjson
    except ImportError:
        return json.loads(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


# ------------------------------------------------------------------------------------- files on disk


def _list_dir(folder: str) -> set[str] | None:
    """Entry names of ``folder``; None when it cannot be listed (absent, not a folder, no access)."""
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it}
    except OSError:
        return None


def absent_files(paths: Iterable[str], root: str | os.PathLike | None = None) -> list[int]:
    """Indices of ``paths`` (relative to ``root`` when given) that do not exist, with one directory
    listing per folder.

    A listing per folder instead of a ``stat`` per file keeps this fast on network file systems
    (ImageNet-sized lists have ~1000 folders but over a million files). A name the listing lacks
    is confirmed with ``os.path.exists``, which also accepts what a listing misses (different case
    on case-insensitive file systems, a folder we may enter but not list).
    """
    base = "" if root is None else str(root)
    listings: dict[str, set[str] | None] = {}
    absent = []
    for i, path in enumerate(paths):
        sub, _, name = path.rpartition("/")
        if sub not in listings:
            if path.startswith("/"):  # absolute: root does not apply (as in os.path.join)
                folder = sub or "/"
            else:
                folder = os.path.join(base, sub) if base else (sub or ".")
            listings[sub] = _list_dir(folder)
        names = listings[sub]
        if names is not None and name in names:
            continue
        full = os.path.join(base, path) if base else path
        if names is None and not os.path.isdir(os.path.dirname(full) or "."):
            absent.append(i)  # a whole folder missing: no need to stat every file in it
        elif not name or not os.path.exists(full):
            absent.append(i)
    return absent


__all__ = [
    "PackedStrings",
    "PathLabels",
    "StringPairs",
    "MappedArrays",
    "IndexInfo",
    "cached_index",
    "index_key",
    "index_cache_dir",
    "file_identity",
    "cache_enabled",
    "release_memory",
    "freeze_heap_for_workers",
    "absent_files",
    "read_json",
    "INDEX_VERSION",
]
