"""On-disk cache of a frozen backbone's features for deterministic inputs (the linear protocols).

A frozen backbone maps the same input to the same features every time, so a second head trained or
evaluated on the same inputs (another learning rate, a sweep, the evaluation after each epoch)
need not run it again. What is deterministic: the evaluation's sliding windows (every test scale
and flip), and the training windows of ``linear.train_input: fixed``; not DINOv2's augmented
training crops, which differ at every step.

One *pass* (the windows of one split, in the order the code asks for them) is a folder
``$MAE_TRANSFER_CACHE/features/<kind>-<key>`` (else ``~/.cache/mae_transfer/features``). The key
covers everything the features depend on: a digest of the backbone's tensors (a checkpoint or the
random weights of a seed alike), the feature settings (blocks, final norm, storage dtype, the model
config), the split's files (path, size, modification time) and every preprocessing setting (resize,
crop, stride, test scales and flips, normalisation). ``MAE_TRANSFER_FEATURE_CACHE=0`` turns the
cache off; then every pass runs the backbone and gives the same numbers (features are rounded to
the storage dtype either way).

Layout: each process of a pass writes ``part-<rank>.bin`` (the feature maps, raw, one after the
other) and then ``part-<rank>.json`` (each map's item, offset and shape); after all processes are
done, rank 0 writes ``complete.json``. Only a complete folder is read, memory-mapped; an incomplete
one (a run killed while writing) is removed and written again. A lock file lets one run write a pass
while others wait for it (training inputs) or go on without the cache (evaluation). The folder must
be visible to every process of a run (one machine, or a shared file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from mae_transfer.io import atomic_write_json, try_flock

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bumped whenever the layout or the meaning of the stored features changes."""

DTYPES = {"float32": np.float32, "float16": np.float16}


def feature_cache_root() -> Path:
    """``$MAE_TRANSFER_CACHE/features``, else ``~/.cache/mae_transfer/features``."""
    base = os.environ.get("MAE_TRANSFER_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "mae_transfer") / "features"


def feature_cache_enabled() -> bool:
    """False when ``MAE_TRANSFER_FEATURE_CACHE`` is 0 / false / no / off."""
    return os.environ.get("MAE_TRANSFER_FEATURE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def module_digest(module: torch.nn.Module) -> str:
    """A digest of every tensor of ``module`` (names, dtypes, shapes and values, in name order):
    the identity of a backbone's weights, whether read from a file or drawn at random."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def files_identity(paths: Sequence[str]) -> str:
    """A digest of the files' resolved paths, sizes and modification times (in order)."""
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_folder(kind: str, what: dict[str, Any]) -> Path:
    """The folder of the pass ``kind`` (``ade20k-validation-eval``) identified by ``what`` (JSON)."""
    blob = json.dumps({"version": CACHE_VERSION, **what}, sort_keys=True, default=str).encode()
    return feature_cache_root() / f"{kind}-{hashlib.blake2b(blob, digest_size=12).hexdigest()}"


class CachedFeatures:
    """A complete pass, memory-mapped: the feature maps of each item, in the order they were written.

    The index is four flat arrays (items, parts, offsets, shapes) sorted by item, so that forked
    DataLoader workers share it; the part files are mapped on first use in each process."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        done = json.loads((self.folder / "complete.json").read_text())
        self.dtype = np.dtype(DTYPES[done["dtype"]])
        self.part_files: list[str] = []
        items, parts, offsets, shapes, ndims = [], [], [], [], []
        for p in range(int(done["parts"])):
            index = json.loads((self.folder / f"part-{p}.json").read_text())
            self.part_files.append(str(self.folder / f"part-{p}.bin"))
            need = max((o + int(np.prod(s)) for o, s in zip(index["offsets"], index["shapes"])), default=0)
            if os.path.getsize(self.part_files[-1]) < need * self.dtype.itemsize:
                raise ValueError(f"{self.part_files[-1]} is shorter than its index says")
            items += index["items"]
            parts += [p] * len(index["items"])
            offsets += index["offsets"]
            ndims += [len(s) for s in index["shapes"]]
            shapes += [list(s) + [1] * (4 - len(s)) for s in index["shapes"]]  # (C, h, w) or (B, C, h, w)
        order = np.argsort(np.asarray(items, dtype=np.int64), kind="stable")  # keeps each item's order
        self.items = np.asarray(items, dtype=np.int64)[order]
        self.parts = np.asarray(parts, dtype=np.int32)[order]
        self.offsets = np.asarray(offsets, dtype=np.int64)[order]
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 4)[order]
        self.ndims = np.asarray(ndims, dtype=np.int8)[order]
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}  # each process maps the files itself
        return state

    def __len__(self) -> int:
        return len(self.items)

    def span(self, item: int) -> range:
        """Positions (in :meth:`entry` numbering) of ``item``'s maps."""
        lo, hi = np.searchsorted(self.items, [item, item + 1])
        return range(int(lo), int(hi))

    def entry(self, position: int) -> torch.Tensor:
        """The map at ``position`` (float32), with the shape it was written with."""
        part = int(self.parts[position])
        if part not in self._maps:
            self._maps[part] = np.memmap(self.part_files[part], dtype=self.dtype, mode="r")
        shape = [int(s) for s in self.shapes[position][: int(self.ndims[position])]]
        n = int(np.prod(shape))
        start = int(self.offsets[position])
        flat = np.array(self._maps[part][start : start + n], dtype=np.float32)  # a copy: torch wants writable
        return torch.from_numpy(flat).view(*shape)

    def maps(self, item: int) -> list[torch.Tensor]:
        return [self.entry(i) for i in self.span(item)]


class PartWriter:
    """Appends one process's feature maps to ``part-<rank>.bin``; :meth:`close` writes their index."""

    def __init__(self, folder: Path, rank: int, dtype: str):
        self.folder, self.rank, self.dtype = Path(folder), rank, np.dtype(DTYPES[dtype])
        self._file = open(self.folder / f"part-{rank}.bin", "wb")
        self.items: list[int] = []
        self.offsets: list[int] = []
        self.shapes: list[list[int]] = []
        self._at = 0

    def append(self, item: int, features: torch.Tensor) -> None:
        a = features.detach().to("cpu", torch.float32).contiguous().numpy().astype(self.dtype, copy=False)
        self._file.write(a.tobytes())
        self.items.append(int(item))
        self.offsets.append(self._at)
        self.shapes.append(list(a.shape))
        self._at += a.size

    def close(self) -> None:
        self._file.close()
        index = {"items": self.items, "offsets": self.offsets, "shapes": self.shapes}
        atomic_write_json(self.folder / f"part-{self.rank}.json", index, indent=None)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


class _Lock:
    """An exclusive flock on ``path`` held until :meth:`release` (or the end of the process)."""

    def __init__(self, path: Path, wait: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        got = try_flock(self.fd, blocking=wait)
        self.held = got is not False  # None: no locks on this file system (go on unlocked)

    def release(self) -> None:
        os.close(self.fd)  # closing releases the flock


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished pass that can be read (a damaged one is not)."""
    if not (folder / "complete.json").is_file():
        return False
    try:
        CachedFeatures(folder)
        return True
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("feature cache %s is damaged (%s); it is written again", folder, e)
        return False


@contextlib.contextmanager
def cache_pass(folder: Path, dtype: str, wait: bool, what: str) -> Iterator[tuple[str, Any]]:
    """One pass through the cache folder ``folder``, on every process of the run together.

    Yields ``("read", CachedFeatures)`` when the pass is complete on disk; ``("write", PartWriter)``
    when this run writes it (each process its part; on a clean exit the parts are closed and rank 0
    marks the pass complete); ``("off", None)`` when the cache is off, cannot be written, or (with
    ``wait=False``) another run is writing it now. ``wait``: wait for another run's writing instead.
    ``what`` names the pass in the log."""
    from mae_transfer.engine.distributed import barrier, broadcast_from_main, world

    rank, _ = world()
    lock: _Lock | None = None
    decision = "off"
    if rank == 0 and feature_cache_enabled():
        try:
            if _complete(folder):
                decision = "read"
            else:
                lock = _Lock(folder.parent / f".{folder.name}.lock", wait)
                if not lock.held:
                    log.info("feature cache: another run is writing %s now; this pass runs the backbone", what)
                    lock.release()
                    lock = None
                elif _complete(folder):  # written by the run we waited for
                    decision = "read"
                else:
                    shutil.rmtree(folder, ignore_errors=True)  # an incomplete pass of a killed run
                    folder.mkdir(parents=True)
                    decision = "write"
        except OSError as e:
            log.warning("feature cache %s cannot be used (%s); this pass runs the backbone", folder, e)
            decision = "off"
    decision = broadcast_from_main(decision)
    if decision == "read":
        log.info("feature cache: %s read from %s (the backbone does not run)", what, folder)
        if lock is not None:
            lock.release()
        yield "read", CachedFeatures(folder)
        return
    if decision == "off":
        yield "off", None
        return
    t0 = time.monotonic()
    writer = PartWriter(folder, rank, dtype)
    try:
        yield "write", writer
    except BaseException:
        writer.discard()
        if lock is not None:
            lock.release()
        raise
    writer.close()
    barrier()
    if rank == 0:
        atomic_write_json(folder / "complete.json", {"parts": world()[1], "dtype": dtype})
        if lock is not None:
            lock.release()
        log.info("feature cache: %s written to %s in %.1f s", what, folder, time.monotonic() - t0)
    barrier()


__all__ = [
    "CACHE_VERSION",
    "CachedFeatures",
    "PartWriter",
    "cache_folder",
    "cache_pass",
    "feature_cache_enabled",
    "feature_cache_root",
    "files_identity",
    "module_digest",
]
