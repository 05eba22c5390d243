"""What the toolkit knows of a task, as plain records: :class:`TaskSpec` and its parts.

Each task package declares its own entries in a ``spec`` module beside its code (help texts,
presets, columns, how the demo runs it) that imports nothing but this module, so listing the tasks
imports no task code; ``mae_transfer.evaluation.registry`` collects them into ``TASKS``. Code is
referenced by ``"module:attribute"`` strings and imported only when the task runs.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

FAMILIES = ("pretrain", "classification", "dense", "frozen", "train")


@dataclass(frozen=True)
class Column:
    """One number a task reports: a table column and, with ``bar``, a headline metric (comparison
    bars, the demo's "MAE beats random" check, the runner's one-line summary).

    ``protocol`` is a regular expression the row's protocol must match in full. ``prefer="knn"``
    picks the k=20 protocol (else the smallest k) among the matching ``knnK`` protocols. ``keep``:
    ``always`` (shown even when empty), ``optional`` (dropped when nobody has it, unless the table
    is printed in full), ``present`` (only when a row exists)."""

    id: str  # the column id in paper.yaml
    label: str  # the table header
    metric: str
    protocol: str = ".*"
    keep: str = "optional"
    bar: str | None = None
    prefer: str = "latest"
    bar_fallback: bool = False  # the bars take any protocol when none matches (ADE20K: ms when no ss)

    def matches(self, protocol: str) -> bool:
        return re.fullmatch(self.protocol, protocol or "") is not None


@dataclass(frozen=True)
class TableSpec:
    """A paper table: its title and the keys of its reference rows in ``paper.yaml``."""

    title: str
    paper: tuple[str, ...] = ()


@dataclass(frozen=True)
class ToyData:
    """A task's built-in toy dataset (what it reads without ``--data``), written in the real on-disk
    format by ``mae_transfer.data.toy.ensure_toy_dataset``.

    ``name``: the dataset's name (``mae-transfer toy-data NAME``, its cache folder, the ``dataset``
    of result rows; tasks that share a dataset declare the same record). ``writer``:
    ``"module:attribute"`` of the data layer's writer of its format, ``(root, **options) -> root``;
    ``options``: the writer arguments this dataset fixes (``year=2018``); ``subdir``: the folder
    under the written root that ``--data`` takes (ADE20K's ``ADEChallengeData2016``).
    ``full_size``: ``"module:attribute"`` of the writer of its full-size rehearsal data
    (``toy-data --full-size``), None where there is none.

    A task's code reads its toy dataset too (without ``--data``) but cannot import its ``spec``,
    which names that code; so a package declares these records in a ``data_spec`` module that both
    import (``mae_transfer/detection/data_spec.py``)."""

    name: str
    writer: str
    options: dict[str, Any] = field(default_factory=dict)
    subdir: str | None = None
    full_size: str | None = None

    def arguments(self) -> dict[str, Any]:
        """The arguments of ``ensure_toy_dataset`` that write this dataset (imports the writer):
        ``ensure_toy_dataset(**toy.arguments(), root=..., **larger_split)``."""
        return {"kind": self.name, "writer": resolve(self.writer), "fixed": self.options, "subdir": self.subdir}


@dataclass(frozen=True)
class BadData:
    """What a task's run does with bad data items, for ``mae-transfer check-data``.

    ``skip``: the option (a name in ``evaluation.options.FLAGS``) and value with which a run leaves
    bad items out instead of stopping (check-data builds the data with it, to count every problem).
    ``unreadable``: what a run does with an image that cannot be decoded: ``replaced`` (another is
    read in its place, as the classification and pretraining readers do), ``stop``, or ``skip``
    (stop unless the ``skip`` option is given). ``label``: how the report heads such items."""

    skip: tuple[str, Any] = ("missing", "skip")
    unreadable: str = "replaced"
    label: str = "UNREADABLE"


@dataclass(frozen=True)
class TrainedWeights:
    """How ``--eval-only --weights`` reads and loads a trained model of a task."""

    read: str  # "module:attr": (path, trust=) -> (state dict, the config saved with it or None)
    load: str  # "module:attr": (model, state dict, path) -> None
    artifact: str  # the file a training run writes (``detector.pth``)
    sections: tuple[str, ...] = ("model",)  # sections of the saved config that rebuild the model
    foreign: str = "unknown"  # the format of another project's file (``detectron2``)


@dataclass(frozen=True)
class DenseRules:
    """What only the dense tasks have: pictures of predictions and how a backbone file sets sizes."""

    data: str  # the dataset's name in messages (``COCO``)
    pictures: str  # what one picture shows (``ground truth | prediction``)
    what: str = "pictures"  # what the pictures are of (``detections``)
    rename: dict[str, str] = field(default_factory=dict)  # size name of the file -> the task's model name
    pos_size_key: str | None = None  # model option that takes the file's position-table image size


@dataclass(frozen=True)
class DemoPlan:
    """How ``mae-transfer demo`` runs a task: config overrides of the full demo and of ``--quick``
    (``quick=None``: left out of ``--quick``), and a larger toy split than the default
    (``ensure_toy_dataset`` options)."""

    full: tuple[str, ...] = ()
    quick: tuple[str, ...] | None = None
    toy_data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpeedRun:
    """One row of ``mae-transfer speed all``: its label, its target (README "Speed") and the keyword
    arguments of the task's speed function (``SpeedPlan.run``) beside ``device``, ``precision``,
    ``steps`` and ``warmup``."""

    label: str
    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpeedPlan:
    """How ``mae-transfer speed`` measures a task's training step on synthetic data.

    ``run``: ``"module:attribute"`` of the function that measures and returns a dict of numbers
    (keyword arguments: the options below, ``json`` as ``json_path``). ``options``: the ``speed``
    options (argparse names) it takes; the others are refused. ``defaults`` / ``cpu_defaults``:
    keyword arguments where the command's defaults differ from the function's (``cpu_defaults``
    when it runs on the CPU). ``report``: ``"module:attribute"`` formatting the result for the
    terminal (None: the result is printed as JSON). ``writes_json``: ``run`` writes ``--json``
    itself (``json_path=``); otherwise the command writes the result. ``fp16``: what ``--precision
    fp16`` means for it (None: refused). ``order``: its place among the workloads (``speed``'s
    choices, ``speed all``'s rows). ``bench`` / ``tiny``: its rows of ``speed all`` (GPU sizes /
    micro models for CPUs and CI)."""

    run: str
    options: tuple[str, ...]
    order: int
    defaults: dict[str, Any] = field(default_factory=dict)
    cpu_defaults: dict[str, Any] = field(default_factory=dict)
    report: str | None = None
    writes_json: bool = False
    fp16: str | None = None
    bench: tuple[SpeedRun, ...] = ()
    tiny: tuple[SpeedRun, ...] = ()


@dataclass(frozen=True)
class TaskSpec:
    """What the toolkit needs to know of one task.

    ``command`` + ``fixed``: the ``mae-transfer`` command that runs it and the options that
    command fixes for this task (``inat --year 2018``); ``options``: the command-line options of
    this task beyond those of its family (names in ``evaluation.options.FLAGS``). ``family`` says which front runs it
    (``classification`` and ``dense`` train a ``TrainTask``, with the protocols and ``--eval-only``
    of those families; ``train`` is any other ``TrainTask`` with the common options; ``frozen``
    extracts features; ``pretrain`` is no benchmark task). ``config``/``task``/``report``: ``"module:attribute"`` of
    the config builder ``(preset, overrides) -> config``, the engine task class (for ``frozen``:
    the function that evaluates) and the function that formats its results for the terminal.
    ``data_group``: the ``--data`` key of a benchmark
    it shares with other tasks (``imagenet``). ``toy_data``: its built-in toy dataset
    (:class:`ToyData`). ``num_classes``: the class count of the benchmark's dataset (ImageNet-1k:
    1000); data read in its layout with another count is other data, and its result rows say so.
    ``bad_data``: what a run does with bad data items (:class:`BadData`, for ``check-data``).
    ``toy_preset``/``default_preset``: the preset on toy data and on real data.
    ``native_resolution``: random-init runs also take the reference checkpoint's image size.
    ``trains``: whether it has a config to override (k-NN has none). ``parallel``: may run under
    torchrun. ``weights``: how ``--eval-only --weights`` reads and loads a trained model
    (:class:`TrainedWeights`). ``dense``: what only the dense tasks have (:class:`DenseRules`).
    ``demo``: how ``mae-transfer demo`` runs it (:class:`DemoPlan`; None: not in the demo).
    ``speed``: how ``mae-transfer speed`` measures it (:class:`SpeedPlan`; None: no speed workload).
    ``help``/``description``/``epilog``: what ``mae-transfer --help`` and ``COMMAND --help`` say
    (the first task of a command speaks for it); ``option_help``: option texts of this command."""

    name: str
    title: str
    command: str
    family: str
    config: str | None = None
    task: str | None = None
    report: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    data_group: str | None = None
    toy_data: ToyData | None = None
    num_classes: int | None = None
    bad_data: BadData = field(default_factory=BadData)
    toy_preset: str | None = "toy"
    default_preset: str | None = None
    table: str | None = None
    columns: tuple[Column, ...] = ()
    benchmark: bool = True
    trains: bool = True
    parallel: bool = True
    native_resolution: bool = False
    weights: TrainedWeights | None = None
    dense: DenseRules | None = None
    demo: DemoPlan | None = None  # None: not in the demo
    speed: SpeedPlan | None = None  # None: no `mae-transfer speed` workload
    help: str = ""
    description: str = ""
    epilog: str = ""
    option_help: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"task {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")

    def load(self, what: str) -> Any:
        """Import the ``"module:attribute"`` named by field ``what`` (``config``, ``task``, ``report``)."""
        if what in ("config", "task", "report"):
            return resolve(getattr(self, what))
        if what in ("read", "load") and self.weights is not None:
            return resolve(getattr(self.weights, what))
        raise KeyError(f"task {self.name!r} has no {what!r} to load")

    @property
    def headline(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.bar)


def preferred_knn_protocol(protocols: Iterable[str | None]) -> str | None:
    """The k-NN protocol a ``prefer="knn"`` column reports among ``protocols``: ``knn20`` when k=20 was
    measured (the paper's choice), else the smallest k; None without any ``knnK`` protocol. The one
    rule of the tables and the runner's summary line."""
    ks = {int(p[3:]) for p in protocols if p and re.fullmatch(r"knn\d+", p)}
    return f"knn{20 if 20 in ks else min(ks)}" if ks else None


def resolve(ref: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (imported now)."""
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = [
    "FAMILIES",
    "BadData",
    "Column",
    "DemoPlan",
    "DenseRules",
    "SpeedPlan",
    "SpeedRun",
    "TableSpec",
    "TaskSpec",
    "ToyData",
    "TrainedWeights",
    "preferred_knn_protocol",
    "resolve",
]
