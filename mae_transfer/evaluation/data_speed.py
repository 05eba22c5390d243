"""Data pipelines at the size users run them: index build time, memory per process, samples/s.

``mae-transfer speed coco|ade20k|inat|places --data-only`` runs :func:`run_data_speed`:

1. builds the task's datasets the way a training run does (train and val), timing it and reading
   this process's resident memory before and after (``/proc/self/status``);
2. makes one pass over every training sample's index record in ``workers`` forked DataLoader
   workers (everything ``__getitem__`` reads from the index: file name, label, boxes, polygons, RLE
   strings; not the image itself) and reads each worker's private (USS) and proportional (PSS)
   memory from ``/proc/<pid>/smaps_rollup`` after the first batch and at the end of the pass: the
   growth is what the index costs each worker as an epoch goes by;
3. times ``samples`` items of the full training pipeline (decode + training transforms) in this
   process, i.e. per worker.

``--full-size`` runs it on annotation files with the official counts
(:mod:`mae_transfer.data.fullsize`), written once into the toolkit's cache.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from mae_transfer.evaluation.speed import data_aliases, data_workloads
from mae_transfer.spec import resolve

ALIASES = data_aliases()
"""Short names ``speed`` accepts for the classification datasets (a command -> its default task)."""

DATA_TASKS = data_workloads()


def _status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def process_memory(pid: int | str = "self") -> dict[str, float] | None:
    """RSS, PSS, USS (private clean + dirty) and private dirty memory of a process in MiB, from
    ``/proc/<pid>/smaps_rollup`` (None where it cannot be read, e.g. not Linux).

    USS counts the pages of the memory-mapped index that only this process has read so far as
    private (clean, file-backed: the kernel can drop them and they become shared as soon as another
    process reads them); private dirty is the memory that is this process's alone for good."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    fields[parts[0][:-1]] = int(parts[1])
    except OSError:
        return None
    return {
        "rss": fields.get("Rss", 0) / 1024,
        "pss": fields.get("Pss", 0) / 1024,
        "uss": (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024,
        "dirty": fields.get("Private_Dirty", 0) / 1024,
    }


def loader_worker_pids(iterator: Any) -> list[int]:
    """PIDs of a DataLoader iterator's worker processes (its ``_workers``; empty without workers).
    Not the process's children in general: other children (a test runner's leftovers, a
    forkserver) are not workers."""
    return [w.pid for w in getattr(iterator, "_workers", []) if w.pid is not None]


def unwrap_dataset(ds: Any) -> Any:
    """The dataset holding the index below task wrappers (``.dataset`` chains)."""
    for _ in range(8):
        if hasattr(ds, "load_target") or hasattr(ds, "samples"):
            return ds
        inner = getattr(ds, "dataset", None)
        if inner is None:
            break
        ds = inner
    return ds


class IndexPass(Dataset):
    """Item ``i``: read sample ``i``'s index record as ``__getitem__`` does (no image decode)."""

    def __init__(self, dataset: Any):
        self.dataset = unwrap_dataset(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> int:
        ds = self.dataset
        if hasattr(ds, "load_target"):  # COCO: boxes, labels, polygons / decoded RLEs, file name
            target = ds.load_target(index)
            ds.image_path(index)
            return len(target["labels"])
        path, label = ds.samples[index]
        return len(path) + (label if isinstance(label, int) else 0)


def _count(batch: list[int]) -> int:
    return len(batch)


def full_size_kinds() -> list[str]:
    """The toy datasets that have full-size rehearsal data (a ``ToyData.full_size`` writer), in
    ``toy-data``'s order."""
    from mae_transfer.evaluation.registry import toy_datasets

    return [name for name, toy in toy_datasets().items() if toy.full_size]


def write_full_size(
    kind: str, out: str | os.PathLike, images_from: str | os.PathLike | None = None, scale: float = 1.0, seed: int = 0
) -> Path:
    """Write the full-size rehearsal data of the toy dataset ``kind`` (a task's ``ToyData`` with a
    ``full_size`` writer) into ``out``, its annotations pointing at the images of ``images_from``
    (default: that toy dataset itself). ``scale`` < 1 shrinks every count (for tests)."""
    from mae_transfer.data.toy import ensure_toy_dataset
    from mae_transfer.evaluation.registry import toy_datasets

    if kind not in full_size_kinds():
        raise ValueError(f"--full-size writes {', '.join(full_size_kinds())}, not {kind}")
    toy = toy_datasets()[kind]
    if images_from is None:
        images_from = ensure_toy_dataset(**toy.arguments())
    return resolve(toy.full_size)(out, images_from=images_from, scale=scale, seed=seed)


def full_size_root(kind: str) -> Path:
    """The full-size rehearsal data of ``kind`` in the toolkit's cache, written on first use."""
    from mae_transfer.data.toy import toy_cache_dir

    have = full_size_kinds()
    if kind not in have:
        named = [next((f"{a} ({k.removeprefix(a)})" for a, k in ALIASES.items() if k == n), n) for n in have]
        raise ValueError(f"--full-size has data for {', '.join(named[:-1])} and {named[-1]}, not {kind}")
    root = toy_cache_dir().parent / "fullsize" / kind
    marker = root / ".complete"
    if not marker.exists():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        print(f"writing the full-size {kind} rehearsal data (official counts) to {root} ...", flush=True)
        write_full_size(kind, root)
        marker.write_text("ok\n")
    return root


def run_data_speed(
    what: str,
    data: str | None = None,
    *,
    workers: int = 4,
    samples: int = 16,
    preset: str | None = None,
    split: str | None = None,
    full_size: bool = False,
    index_pass: bool = True,
) -> dict[str, Any]:
    """See the module docstring. Returns a JSON-serialisable dict of every number."""
    from mae_transfer.data.index import release_memory
    from mae_transfer.evaluation.registry import TASKS

    task = ALIASES.get(what, what)
    if task not in DATA_TASKS:
        raise ValueError(
            f"--data-only measures the data of {', '.join(DATA_TASKS)} (or {', '.join(ALIASES)}), not {what}"
        )
    spec = TASKS[task]
    if full_size and data is None:
        data = str(full_size_root(task))
    overrides: dict[str, Any] = {"data": {"path": data}} if data else {}
    if split:
        overrides.setdefault("data", {})["train_split"] = split
    if "dataset" in spec.fixed:  # the classification tasks read their dataset kind from the config
        overrides.setdefault("data", {})["dataset"] = spec.fixed["dataset"]
    preset = preset or spec.default_preset
    cfg = spec.load("config")(preset, overrides)

    release_memory()
    rss0 = _status_kib("VmRSS") or 0
    t0 = time.perf_counter()
    task_obj = spec.load("task")(cfg)
    train = task_obj.build_train_dataset()
    build_s = time.perf_counter() - t0
    release_memory()
    rss1 = _status_kib("VmRSS") or 0
    inner = unwrap_dataset(train)
    index_info = getattr(inner, "index_info", None)
    out: dict[str, Any] = {
        "task": task,
        "data": data or "toy",
        "preset": preset,
        "train_images": len(train),
        "build_seconds": build_s,
        "index": index_info.source if index_info else "n/a",
        "main_rss_before_mib": rss0 / 1024,
        "main_rss_after_mib": rss1 / 1024,
        "main_rss_growth_mib": (rss1 - rss0) / 1024,
        "main_peak_rss_mib": (_status_kib("VmHWM") or 0) / 1024,
    }
    if index_pass:
        out.update(_index_pass(train, workers))
    n = samples
    train[0]  # first decode, caches
    t1 = time.perf_counter()
    for i in range(n):
        train[i % len(train)]
    seconds = time.perf_counter() - t1
    out.update(
        {
            "samples": n,
            "pipeline_seconds": seconds,
            "samples_per_s": n / seconds,
            "img_size": getattr(getattr(cfg, "model", None), "img_size", None),
        }
    )
    return out


def _index_pass(train: Any, workers: int) -> dict[str, Any]:
    from mae_transfer.data.index import freeze_heap_for_workers

    data = IndexPass(train)
    batch = 512
    if workers:
        freeze_heap_for_workers()  # what the trainer does before its workers fork
    loader = DataLoader(
        data,
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        collate_fn=_count,
        multiprocessing_context="fork" if workers else None,
    )
    first: dict[int, dict] = {}
    last: dict[int, dict] = {}
    seen = 0
    t0 = time.perf_counter()
    next_probe = 0.0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(data), desc="index pass", unit="sample", mininterval=2.0, leave=False)
    iterator = iter(loader)
    pids = loader_worker_pids(iterator)
    for count in iterator:
        seen += count
        bar.update(count)
        now = time.perf_counter()
        if now >= next_probe or seen >= len(data) - batch * max(1, workers):
            next_probe = now + 0.5
            for pid in pids:
                mem = process_memory(pid)
                if mem is None:
                    continue
                first.setdefault(pid, mem)
                last[pid] = mem
    bar.close()
    seconds = time.perf_counter() - t0
    main = process_memory() or {}
    growth = [last[p]["uss"] - first[p]["uss"] for p in last]
    return {
        "workers": workers,
        "pass_samples": seen,
        "pass_seconds": seconds,
        "records_per_s": seen / max(seconds, 1e-9),
        "main_pss_mib": main.get("pss"),
        "main_uss_mib": main.get("uss"),
        "worker_uss_start_mib": [first[p]["uss"] for p in last],
        "worker_uss_end_mib": [last[p]["uss"] for p in last],
        "worker_pss_end_mib": [last[p]["pss"] for p in last],
        "worker_uss_growth_mib": growth,
        "worker_dirty_start_mib": [first[p]["dirty"] for p in last],
        "worker_dirty_end_mib": [last[p]["dirty"] for p in last],
        "total_pss_end_mib": (main.get("pss") or 0) + sum(last[p]["pss"] for p in last),
    }


def format_data_speed(r: dict[str, Any]) -> str:
    lines = [
        f"{r['task']} data on {r['data']} ({r['preset']}): {r['train_images']:,} training images",
        f"  datasets built in {r['build_seconds']:.1f} s (index: {r['index']}); main RSS "
        f"{r['main_rss_before_mib']:.0f} -> {r['main_rss_after_mib']:.0f} MiB (+{r['main_rss_growth_mib']:.0f}), "
        f"peak {r['main_peak_rss_mib']:.0f} MiB",
    ]
    if "workers" in r:
        if r["workers"]:
            growth = r["worker_uss_growth_mib"]
            uss = ", ".join(f"{a:.0f}->{b:.0f}" for a, b in zip(r["worker_uss_start_mib"], r["worker_uss_end_mib"]))
            dirty = ", ".join(
                f"{a:.0f}->{b:.0f}" for a, b in zip(r["worker_dirty_start_mib"], r["worker_dirty_end_mib"])
            )
            lines.append(
                f"  index pass over {r['pass_samples']:,} samples with {r['workers']} workers "
                f"in {r['pass_seconds']:.1f} s: "
                f"worker USS {uss} MiB "
                f"(growth max {max(growth) if growth else 0:.0f} MiB), private dirty "
                f"{dirty} MiB; "
                f"main PSS {r['main_pss_mib']:.0f} MiB, total PSS {r['total_pss_end_mib']:.0f} MiB"
            )
        else:
            lines.append(
                f"  index pass over {r['pass_samples']:,} samples in the main process in {r['pass_seconds']:.1f} s"
            )
    lines.append(
        f"  training pipeline (decode + transforms, {r['img_size']} px): {r['samples_per_s']:.2f} samples/s per worker "
        f"({r['samples']} samples in {r['pipeline_seconds']:.2f} s)"
    )
    return "\n".join(lines)


__all__ = [
    "run_data_speed",
    "format_data_speed",
    "process_memory",
    "full_size_kinds",
    "full_size_root",
    "write_full_size",
    "IndexPass",
    "ALIASES",
    "DATA_TASKS",
]
