"""What one measured number is: the result row every writer of the project uses.

A task run writes its rows to ``<run dir>/results.jsonl`` (:func:`write_run_results`, rewritten
whole and atomically at every evaluation); the benchmark's store (``mae_transfer.evaluation.store``)
appends the same rows, completed with the job that produced them and the provenance of the process.
The tables, the plots and ``pandas.read_json(path, lines=True)`` read them back.

The row lives in the engine, not in the evaluation layer above the task packages, because the task
packages write rows and imports only point down.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from mae_transfer.io import atomic_write_json, atomic_write_jsonl

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
FAILED = "job_failed"  # the metric of the row the runner writes for a job that failed


@dataclass
class ResultRow:
    """One metric of one evaluation.

    What: ``task`` (the benchmark task: ``coco``, ``ade20k``, ``inat2018``, ``finetune``, ``knn``...,
    the key of the task registry), ``dataset`` (``" (toy)"`` appended for the built-in toy data),
    ``split``, ``protocol`` (``mask_rcnn_vitdet``, ``upernet_ss``, ``finetune``, ``knn20``...),
    ``metric``, ``value`` (None for an undefined metric or a failed job).
    On what: ``backbone`` (a name or a path), ``backbone_sha256`` (None: random init),
    ``config_hash`` (the resolved config without paths), ``step`` (-1: evaluation only).
    Filled by the runner: ``job_key``, ``backbone_path``, ``model``, ``preset``, ``run_dir``, ``wall_time_s``.
    Provenance, filled by the store: ``git_commit``, ``versions``, ``hardware``, ``date``.
    ``extra``: anything else (``lr`` of a sweep, ``error``/``returncode``/``log`` of a failure); it
    is written as top-level keys.
    """

    task: str
    metric: str
    value: float | None
    dataset: str | None = None
    split: str | None = None
    protocol: str | None = None
    backbone: str | None = None
    backbone_sha256: str | None = None
    config_hash: str | None = None
    step: int | None = None
    job_key: str | None = None
    backbone_path: str | None = None
    model: str | None = None
    preset: str | None = None
    run_dir: str | None = None
    wall_time_s: float | None = None
    git_commit: str | None = None
    versions: dict[str, str | None] | None = None
    hardware: str | None = None
    date: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.task or not self.metric:
            raise ValueError(f"a result row needs a task and a metric: {self}")
        if self.value is not None:
            self.value = float(self.value)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the row (``extra`` flattened, in field order)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResultRow":
        """A row from its JSON object; keys that are no field go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def replace(self, **changes: Any) -> "ResultRow":
        return dataclasses.replace(self, **changes)


COLUMNS = tuple(f.name for f in dataclasses.fields(ResultRow) if f.name != "extra")


def row_identity(cfg: Any, backbone_sha256: str | None, evaluated: dict | None = None) -> dict[str, Any]:
    """The "on what" fields of a task's result rows (``cfg``: its config, with ``backbone``).

    A trained or fine-tuned run: the pretrained backbone it started from (``"random init"`` without
    one) and the hash of its config (``config.config_hash``: without paths and display options). An
    evaluation of trained weights (``evaluated``, from
    ``--eval-only --weights``: ``path``, ``sha256``, ``format`` and the ``config`` saved with them,
    None for another project's file): those weights, named by their path and sha256, their format
    (``weights_format``), and the hash of the config they were trained with, so that a run and the
    evaluation of its own weights share one config hash."""
    from mae_transfer.config import config_hash

    # The ViT: its size name, or vit_<width>x<depth>_patch<p> for another size (a detectron2 or
    # mmseg file of no standard size names no model).
    m = getattr(cfg, "model", None)
    model = m.vit_label() if hasattr(m, "vit_label") else getattr(m, "name", None)
    if evaluated:
        return dict(
            backbone=evaluated["path"],
            backbone_sha256=evaluated["sha256"],
            model=model,
            config_hash=config_hash(evaluated.get("config") or cfg),
            extra={"weights_format": evaluated["format"]},
        )
    return dict(
        backbone=getattr(cfg, "backbone", None) or "random init",
        backbone_sha256=backbone_sha256,
        model=model,
        config_hash=config_hash(cfg),
    )


def dataset_name(
    dataset: str,
    path: str | os.PathLike | None,
    num_classes: int | None,
    unit: str = "classes",
    *,
    benchmark_classes: int | None = None,
) -> str:
    """The ``dataset`` of a task's result rows: ``"ade20k (toy)"`` on the built-in toy data
    (``path`` None), the benchmark's name on its data (``"ade20k"``), and for other data read in a
    benchmark's layout (another class count than ``benchmark_classes``, the benchmark's:
    ``TaskSpec.num_classes``) ``"ade20k-layout:FOLDER (11 classes)"`` (``"imagefolder:FOLDER (100
    classes)"``), FOLDER being the name of ``path``. Such rows are not the benchmark's: the tables
    print them apart, without the paper's rows (:func:`is_custom_dataset`)."""
    from mae_transfer.data.toy import is_toy_data

    if not path or is_toy_data(path):  # the built-in toy data, also when passed as --data (the demo's larger splits)
        return f"{dataset} (toy)"
    expected = benchmark_classes
    if expected is None or num_classes is None or int(num_classes) == expected:
        return dataset
    layout = dataset if dataset == "imagefolder" else f"{dataset}-layout"
    folder = Path(path).name or str(path)
    return f"{layout}:{folder} ({int(num_classes)} {unit})"


def is_custom_dataset(name: Any) -> bool:
    """Whether a row's ``dataset`` is other data in a benchmark's layout (see :func:`dataset_name`)."""
    return isinstance(name, str) and ":" in name


def write_run_results(out_dir: str | os.PathLike, rows: Iterable[ResultRow], config: dict | None = None) -> Path:
    """A run's ``results.jsonl`` (rewritten whole, atomically) and, with ``config``, its
    ``config_resolved.json`` beside it (the runner reads the model name from there). Rows get the
    provenance of this process (git commit, versions, hardware, date) and the model name of
    ``config`` where they have none, so a run made without ``bench`` is as fully described."""
    out = Path(out_dir)
    prov = provenance()
    model = ((config or {}).get("model") or {}).get("name") if isinstance((config or {}).get("model"), dict) else None
    filled = [
        r.replace(**{k: v for k, v in {**prov, "model": model}.items() if getattr(r, k) is None and v is not None})
        for r in rows
    ]
    path = atomic_write_jsonl(out / RESULTS_FILE, [r.to_dict() for r in filled])
    if config is not None:
        atomic_write_json(out / "config_resolved.json", config)
    return path


def read_run_results(run_dir: str | os.PathLike) -> list[ResultRow]:
    """The rows of a run directory's ``results.jsonl`` ([] when there is none); unreadable lines are skipped."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            data = json.loads(line)
            rows.append(ResultRow.from_dict(data))
        except (ValueError, TypeError):
            log.warning("%s: skipped an unreadable line", path)
    return rows


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout this package runs from (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
    )
    return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that decide the numbers."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("mae-transfer", "torch", "torchvision", "timm", "pycocotools", "numpy", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> str:
    """``"<n> x <GPU name>"`` or the CPU with its core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - provenance must never break a run
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu {platform.machine()} ({cores} cores)"


def provenance() -> dict[str, Any]:
    """The provenance fields of a row written now by this process."""
    return {
        "git_commit": git_commit(),
        "versions": package_versions(),
        "hardware": hardware(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


__all__ = [
    "ResultRow",
    "COLUMNS",
    "RESULTS_FILE",
    "FAILED",
    "dataset_name",
    "is_custom_dataset",
    "row_identity",
    "write_run_results",
    "read_run_results",
    "provenance",
    "git_commit",
    "package_versions",
    "hardware",
]
