"""The task registry: one plain dict, ``TASKS``, naming everything the toolkit needs to know of a task.

The runner (``bench``), the demo, the CLI, the tables and the plots iterate over ``TASKS`` and
``TABLES``; none of them names a task. A task is a package (its model, data, evaluator, presets, an
engine ``TrainTask``) whose ``spec`` module declares its entries (:class:`~mae_transfer.spec.TaskSpec`:
command, help texts, presets, columns, demo plan) beside its code; this module collects them in the
paper's order. A ``spec`` module imports only :mod:`mae_transfer.spec`, and code is referenced by
``"module:attribute"`` strings imported only when the task runs, so listing the tasks imports no
task code (imports point down only).

Adding a task outside this package (see the README's "Adding a task"): write the package, then

    TASKS["cityscapes"] = TaskSpec(
        name="cityscapes", title="Cityscapes", command="cityscapes", family="dense",
        config="my_tasks.cityscapes.config:build_config", task="my_tasks.cityscapes.task:CityscapesTask",
        toy_data=ToyData("cityscapes", "my_tasks.cityscapes.toy:write_toy_cityscapes"),
        table="cityscapes", columns=(Column("mIoU", "mIoU", "mIoU", bar="mIoU"),))
    TABLES["cityscapes"] = TableSpec("Cityscapes semantic segmentation")

and it shows up in ``bench --tasks``, in the tables and in the plots.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from mae_transfer.classification.spec import SPECS as _CLASSIFICATION
from mae_transfer.detection.spec import SPECS as _DETECTION
from mae_transfer.pretrain.spec import SPECS as _PRETRAIN
from mae_transfer.segmentation.spec import SPECS as _SEGMENTATION
from mae_transfer.spec import (
    FAMILIES,
    BadData,
    Column,
    DemoPlan,
    DenseRules,
    TableSpec,
    TaskSpec,
    ToyData,
    TrainedWeights,
    resolve,
)

# ------------------------------------------------------------------------- tables (paper order)
TABLES: dict[str, TableSpec] = {
    "coco": TableSpec("Table 4: COCO object detection and instance segmentation (Mask R-CNN)", ("coco",)),
    "ade20k": TableSpec("Table 5: ADE20K semantic segmentation (UperNet)", ("ade20k",)),
    "transfer": TableSpec("Table 6: transfer classification, top-1", ("transfer",)),
    "imagenet": TableSpec("ImageNet-style classification, top-1", ("imagenet_finetune", "imagenet_linprobe")),
}


# Every task, in the paper's order (tables, bench --tasks all, the demo); each package declares its own.
TASKS: dict[str, TaskSpec] = {**_DETECTION, **_SEGMENTATION, **_CLASSIFICATION, **_PRETRAIN}


def benchmark_tasks() -> list[str]:
    """The tasks ``bench --tasks all`` runs, in the registry's (the paper's) order."""
    return [name for name, spec in TASKS.items() if spec.benchmark]


def toy_datasets() -> dict[str, ToyData]:
    """Every task's built-in toy dataset by name (``mae-transfer toy-data``'s choices): the
    pretraining data first, then the benchmarks' in the registry's order. Tasks that share a dataset
    must declare the same one."""
    out: dict[str, ToyData] = {}
    for spec in sorted(TASKS.values(), key=lambda s: s.benchmark):  # stable: registry order within each
        toy = spec.toy_data
        if toy is None:
            continue
        if out.setdefault(toy.name, toy) != toy:
            raise ValueError(f"task {spec.name!r} declares another toy dataset {toy.name!r} than {out[toy.name]}")
    return out


def data_keys() -> list[str]:
    """The keys ``bench --data KEY=DIR`` accepts: every benchmark task and every data group."""
    tasks = benchmark_tasks()
    return tasks + sorted({TASKS[t].data_group for t in tasks if TASKS[t].data_group} - set(tasks))


def table_columns(table: str) -> list[tuple[TaskSpec, Column]]:
    """The columns of ``table``: the columns of its tasks, in registry order."""
    return [(spec, col) for spec in TASKS.values() if spec.table == table for col in spec.columns]


def headline_columns() -> list[tuple[TaskSpec, Column]]:
    """Every task's headline metrics, in registry order (comparison bars, the demo's check)."""
    return [(spec, col) for spec in TASKS.values() if spec.benchmark for col in spec.headline]


def commands() -> dict[str, list[TaskSpec]]:
    """``mae-transfer`` command -> the tasks it runs (``inat`` -> inat2017, inat2018, inat2019)."""
    out: dict[str, list[TaskSpec]] = {}
    for spec in TASKS.values():
        out.setdefault(spec.command, []).append(spec)
    return out


def spec_for(command: str, options: dict[str, Any]) -> TaskSpec:
    """The task a command runs with these options (``inat`` with ``year=2019`` -> inat2019)."""
    specs = commands()[command]
    for spec in specs:
        if all(options.get(k) == v for k, v in spec.fixed.items() if k in _SELECTORS):
            return spec
    return specs[0]


# Options that select among the tasks of one command (the others in ``fixed`` are only set).
_SELECTORS = ("year", "version")


class PluginError(ImportError):
    """A module named in ``MAE_TRANSFER_TASKS`` cannot be imported (the message says what to do)."""


def _load_plugins() -> None:
    """Import the modules named in ``MAE_TRANSFER_TASKS`` (comma-separated): tasks outside this
    package register themselves there, and every process (``bench``'s child jobs too) sees them.

    A module is looked for on ``sys.path`` and then in the current folder: ``python -m
    mae_transfer`` puts the current folder on ``sys.path`` but the ``mae-transfer`` console script
    does not, and the README's example (``my_tasks.py`` beside the command) must work with both.
    A module found nowhere is one :class:`PluginError` naming it, the folder and ``PYTHONPATH``."""
    for name in filter(None, (m.strip() for m in os.environ.get("MAE_TRANSFER_TASKS", "").split(","))):
        try:
            importlib.import_module(name)
            continue
        except ModuleNotFoundError as e:
            if e.name not in (name, name.split(".")[0]):
                raise  # the module exists but imports something missing: its own traceback helps
        cwd = os.getcwd()
        top = name.split(".")[0]
        if os.path.isdir(os.path.join(cwd, top)) or os.path.isfile(os.path.join(cwd, top + ".py")):
            if cwd not in sys.path:
                sys.path.append(cwd)  # after the installed packages: a local file never shadows one
            importlib.import_module(name)
            continue
        raise PluginError(
            f"MAE_TRANSFER_TASKS names the module {name!r}, which is neither importable "
            f"nor a {name.split('.')[0]}.py / package in the current folder ({cwd}); "
            "run the command from the folder that holds it, or add that folder to "
            "PYTHONPATH (PYTHONPATH=/path/to/folder mae-transfer ...)"
        ) from None


_load_plugins()

__all__ = [
    "BadData",
    "Column",
    "DemoPlan",
    "DenseRules",
    "TrainedWeights",
    "TableSpec",
    "TaskSpec",
    "ToyData",
    "TASKS",
    "TABLES",
    "FAMILIES",
    "resolve",
    "benchmark_tasks",
    "data_keys",
    "toy_datasets",
    "table_columns",
    "headline_columns",
    "commands",
    "spec_for",
]
