"""``mae-transfer check-data``: a pre-flight check of a real dataset before a long run.

It builds the task's datasets with the same code as a run (so the same index, cached for that run),
but leaves missing files and malformed annotations out instead of stopping, and reports:

* per split: images listed and served, annotations (COCO), classes, what the run would skip or
  stop on (missing image or label files, malformed annotations by reason);
* images that cannot be decoded (or, for COCO, whose size differs from the annotation), in a random
  sample of each split (``--sample N``) or in full (``--full``);
* the host memory the data side of the run will take: the index (memory-mapped, one copy per node),
  what each rank adds, and what each DataLoader worker adds, measured by a pass over index records
  in one forked worker, scaled to ``--gpus`` ranks x ``--workers`` workers.
"""

from __future__ import annotations

import random
import time
from typing import Any, Iterator

from mae_transfer.data.errors import DataError
from mae_transfer.evaluation.options import FLAGS, to_argv, to_overrides
from mae_transfer.spec import BadData


def data_tasks() -> dict[str, str]:
    """What ``check-data --task`` takes -> the task whose dataset class and presets check it: every
    benchmark task with data of its own, and each shared ``--data`` group (``imagenet``) by its first
    task (from the registry; importing it costs no torch)."""
    from mae_transfer.evaluation.registry import TASKS, benchmark_tasks

    out: dict[str, str] = {}
    for name in benchmark_tasks():
        spec = TASKS[name]
        if spec.family in ("frozen", "train"):
            continue
        out.setdefault(spec.data_group or name, name)
    return out


DATA_TASKS = tuple(data_tasks())


def _bad_data(task: str) -> BadData:
    """What a run of ``check-data --task`` ``task`` does with bad data items (its spec's)."""
    from mae_transfer.evaluation.registry import TASKS

    spec = TASKS.get(data_tasks().get(task, task))
    return spec.bad_data if spec is not None else BadData()


def _skip_flag(bad: BadData) -> str:
    """The command-line option that leaves bad items out (``--skip-bad``, ``--missing skip``)."""
    option, value = bad.skip
    return " ".join(to_argv("", {option: value}, [option], always=(option,))[1:])


def _config_value(cfg: Any, key: str) -> Any:
    """The value at a dotted config ``key`` (``data.skip_bad``), None where there is none."""
    for part in key.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def _files(ds: Any) -> Iterator[tuple[int, list[tuple[str, tuple[int, int] | None]]]]:
    """``(index, [(path, expected (H, W) or None), ...])`` for every sample of a split."""
    if hasattr(ds, "load_target"):  # COCO
        a = ds._a
        for i in range(len(ds)):
            pos = ds._position(i)
            yield i, [(str(ds.image_path(i)), (int(a["img_h"][pos]), int(a["img_w"][pos])))]
    elif isinstance(ds.samples[0][1], str):  # ADE20K: image and label map
        for i in range(len(ds)):
            img, lab = ds.samples[i]
            yield i, [(img, None), (lab, None)]
    else:
        for i in range(len(ds)):
            yield i, [(ds.samples[i][0], None)]


def _index_nbytes(ds: Any) -> int:
    arrays = getattr(ds, "_a", None)
    if arrays is not None:
        return int(sum(v.nbytes for v in arrays.values()))
    samples = getattr(ds, "samples", None)
    total = 0
    for part in ("paths", "first", "second"):
        obj = getattr(samples, part, None)
        if obj is not None:
            total += obj.nbytes()
    labels = getattr(samples, "labels", None)
    return total + (int(labels.nbytes) if labels is not None else 0)


def _split_report(name: str, ds: Any) -> dict[str, Any]:
    rep: dict[str, Any] = {"split": name, "served": len(ds)}
    if hasattr(ds, "load_target"):
        a = ds._a
        rep.update(
            {
                "listed_images": int(len(a["img_ids"])),
                "annotations": int(len(a["ann_id"])),
                "categories": len(ds.cat_ids),
                "missing_images": ds.num_missing_images,
                "skipped_annotations": dict(ds.skipped_reasons),
                "crowd_annotations": int(a["ann_crowd"].sum()),
            }
        )
    else:
        rep["classes"] = len(getattr(ds, "classes", None) or getattr(ds, "class_names", []) or [])
        rep["missing_files"] = int(getattr(ds, "num_missing", 0))
    return rep


def _decode_check(ds: Any, full: bool, sample: int, seed: int = 0) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from mae_transfer.data.folder import load_rgb

    n = len(ds)
    chosen = range(n) if full or sample >= n else sorted(random.Random(seed).sample(range(n), sample))
    chosen_set = None if isinstance(chosen, range) else set(chosen)
    bad: list[str] = []
    checked = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(chosen), desc="decoding", unit="image", mininterval=2.0, leave=False)
    for i, files in _files(ds):
        if chosen_set is not None and i not in chosen_set:
            continue
        if hasattr(ds, "check_sample"):  # ADE20K: what reading the item would stop on, label values included
            problem = ds.check_sample(i)
            if problem:
                bad.append(problem)
            files = []
        for path, size in files:
            try:
                if path.endswith(".png") and size is None and hasattr(ds, "read_label"):
                    ds.read_label(path)
                else:
                    im = load_rgb(path)
                    if size is not None and (im.height, im.width) != size:
                        bad.append(f"{path}: {im.width}x{im.height}, the annotation says {size[1]}x{size[0]}")
            except Exception as exc:  # noqa: BLE001 - any decoder failure is what we report
                bad.append(f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        checked += 1
        bar.update(1)
    bar.close()
    return {
        "checked": checked,
        "of": n,
        "full": isinstance(chosen, range),
        "unreadable": len(bad),
        "examples": bad[:10],
        "seconds": time.perf_counter() - t0,
    }


def _worker_memory(ds: Any, records: int) -> float | None:
    """Private memory (MiB) one forked DataLoader worker adds after reading ``records`` index records."""
    from torch.utils.data import DataLoader, Subset

    from mae_transfer.evaluation.data_speed import IndexPass, loader_worker_pids, process_memory

    data = IndexPass(ds)
    n = min(records, len(data))
    loader = DataLoader(
        Subset(data, list(range(n))), batch_size=256, num_workers=1, collate_fn=len, multiprocessing_context="fork"
    )
    first = last = None
    iterator = iter(loader)
    pids = loader_worker_pids(iterator)
    for _ in iterator:
        if pids:
            mem = process_memory(pids[0])
            if mem is not None:
                first = first or mem
                last = mem
    if first is None or last is None:
        return None
    return last["uss"]


def run_check_data(
    task: str,
    data: str | None,
    *,
    full: bool = False,
    sample: int = 200,
    gpus: int = 8,
    workers: int = 8,
    preset: str | None = None,
    records: int = 20000,
) -> dict[str, Any]:
    """See the module docstring; returns every number (JSON-serialisable)."""
    from mae_transfer.data.index import release_memory
    from mae_transfer.evaluation.data_speed import _status_kib
    from mae_transfer.evaluation.data_speed import unwrap_dataset as _unwrap
    from mae_transfer.evaluation.registry import TASKS

    known = data_tasks()
    if task not in known:
        raise DataError(f"check-data knows {', '.join(known)}, not {task}")
    spec = TASKS[known[task]]
    overrides: dict[str, Any] = {"data": {"path": data}} if data else {}
    if "dataset" in spec.fixed:
        overrides.setdefault("data", {})["dataset"] = spec.fixed["dataset"]
    preset = preset or spec.default_preset
    option, value = spec.bad_data.skip
    user = spec.load("config")(preset, overrides)
    skips = _config_value(user, FLAGS[option].key) == value
    # Built leniently, so that everything wrong is counted instead of stopping at the first problem.
    for section, values in to_overrides({option: value}, [option]).items():
        overrides.setdefault(section, {}).update(values)
    cfg = spec.load("config")(preset, overrides)
    release_memory()
    rss0 = _status_kib("VmRSS") or 0
    t0 = time.perf_counter()
    task_obj = spec.load("task")(cfg)
    build_s = time.perf_counter() - t0
    release_memory()
    rss1 = _status_kib("VmRSS") or 0
    splits = {"train": _unwrap(task_obj.train_set), "val": _unwrap(task_obj.val_set)}
    report: dict[str, Any] = {
        "task": task,
        "data": data or "toy",
        "build_seconds": build_s,
        "splits": [],
        "run_skips_bad_data": skips,
    }
    for name, ds in splits.items():
        rep = _split_report(name, ds)
        rep["decode"] = _decode_check(ds, full, sample)
        rep["index_mib"] = _index_nbytes(ds) / 2**20
        info = getattr(ds, "index_info", None)
        rep["index"] = info.describe() if info else "in memory (flat arrays)"
        report["splits"].append(rep)
    worker_uss = _worker_memory(splits["train"], records)
    index_mib = sum(s["index_mib"] for s in report["splits"])
    rank_mib = (rss1 - rss0) / 1024
    report["memory"] = {
        "index_mib": index_mib,
        "rank_datasets_mib": rank_mib,
        "worker_uss_mib": worker_uss,
        "gpus": gpus,
        "workers": workers,
        "node_data_mib": index_mib + gpus * rank_mib + gpus * workers * (worker_uss or 0.0),
    }
    return report


def format_check_data(r: dict[str, Any]) -> tuple[str, bool]:
    """The report as text, and whether a run with the user's settings would stop on this data."""
    bad = _bad_data(r["task"])
    skip_flag = _skip_flag(bad)
    lines = [f"check-data {r['task']} on {r['data']}: datasets built in {r['build_seconds']:.1f} s"]
    stops = False
    strict = {"skip": r["run_skips_bad_data"]}
    for s in r["splits"]:
        head = f"  {s['split']}: {s['served']:,} samples served"
        if "listed_images" in s:
            head += (
                f" of {s['listed_images']:,} images listed; {s['annotations']:,} annotations kept "
                f"({s['crowd_annotations']:,} crowd), {s['categories']} categories"
            )
        else:
            head += f", {s['classes']} classes"
        lines.append(head)
        lines.append(f"    index: {s['index']}, {s['index_mib']:.1f} MiB")
        missing = s.get("missing_images", s.get("missing_files", 0))
        if missing:
            lines.append(
                f"    MISSING: {missing:,} files listed but not on disk"
                + (" (a run stops on them unless told to skip them)" if not strict.get("skip") else " (skipped)")
            )
            stops = stops or not strict.get("skip")
        skipped = s.get("skipped_annotations") or {}
        if skipped:
            lines.append(
                f"    annotations the run skips: {sum(skipped.values()):,} "
                f"({', '.join(f'{k}: {v:,}' for k, v in skipped.items())})"
            )
            if any(k.startswith("unknown") for k in skipped) and not strict.get("skip"):
                stops = True
                lines.append(f"    (annotations with unknown category/image ids stop a run unless {skip_flag})")
        d = s["decode"]
        what = "every image" if d["full"] else f"{d['checked']:,} random images (--full: all {d['of']:,})"
        if d["unreadable"]:
            # What a run does with them is the task's (BadData.unreadable): the classification and
            # pretraining readers replace them (up to a share of the files), COCO and ADE20K stop
            # (COCO's --skip-bad leaves them out).
            skipped = bad.unreadable == "replaced" or (bad.unreadable == "skip" and strict.get("skip"))
            unless = f" unless {skip_flag}" if bad.unreadable == "skip" else ""
            then = "skipped" if skipped else "a run stops on them" + unless
            stops = stops or not skipped
            lines.append(f"    {bad.label}: {d['unreadable']} of {what} ({d['seconds']:.1f} s; {then}):")
            lines += [f"      {e}" for e in d["examples"]]
        else:
            lines.append(f"    decoded {what}: all readable ({d['seconds']:.1f} s)")
    m = r["memory"]
    worker = "n/a" if m["worker_uss_mib"] is None else f"{m['worker_uss_mib']:.0f} MiB"
    lines.append(
        f"  host memory for the data, {m['gpus']} GPUs x {m['workers']} workers per node: "
        f"index {m['index_mib']:.0f} MiB "
        f"(memory-mapped, shared by the node) + {m['gpus']} x {m['rank_datasets_mib']:.0f} MiB per rank + "
        f"{m['gpus'] * m['workers']} x {worker} per worker (private memory after a pass over index records) "
        f"= ~{m['node_data_mib'] / 1024:.1f} GiB, on top of what the model and CUDA take per rank"
    )
    lines.append("  verdict: " + ("a run with these settings STOPS on this data (see above)" if stops else "ready"))
    return "\n".join(lines), stops


__all__ = ["run_check_data", "format_check_data", "DATA_TASKS"]
