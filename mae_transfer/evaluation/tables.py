"""The MAE paper's transfer tables built from the results store, rendered as Markdown, LaTeX and CSV.

``build_tables`` turns result rows (``results.jsonl``, oldest first) into ``Table`` objects: one block
with our backbones (one row each, with optional deltas to a baseline backbone) and one block with
the paper's reference numbers (``paper.yaml``). ``to_markdown`` / ``to_latex`` / ``to_csv`` render
one table; ``render``, ``latex_document`` and ``write_tables`` produce whole reports.

The tables and their columns come from the task registry (``TABLES``, each task's ``columns``).
Row semantics: for each (backbone, task, protocol, metric) the last row wins; a ``job_failed`` row
newer than every result of its (backbone, task) turns that task's cells into ``failed``; a task that
never ran shows ``–``.

Seeds (``bench --seeds N``): rows that carry a ``seed_group`` (the key of a job's first seed) are runs
of one job with other seeds. When the last row of a cell is one of them, the cell is the mean and
sample standard deviation (n - 1) over the group's seeds, the last row of each seed
(``mean ± std (n)``; the CSV lists every run with its seed). A group with one seed, and a store
without seeds, reads as a single run, exactly as before. A seed that failed leaves the numbers of
the other seeds in place (n tells how many ran); without them, the rule above holds.

Partial fine-tuning (``bench --trainable-blocks``, the paper's Figure 9): rows of protocol
``partial`` stay out of the paper's tables (a fine-tuning of the last k blocks is not the fine-tune
column) and make the table "Figure 9: partial fine-tuning": one row per backbone that has them, one
column per number k of last blocks fine-tuned, k = 0 the linear probe's top-1 and k = depth the
full fine-tuning's (the ``linprobe`` and ``finetune`` rows of the same backbone and data), beside the
paper's ViT-L numbers at the same k (:func:`figure9_points`).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from mae_transfer.engine.results import FAILED, is_custom_dataset
from mae_transfer.evaluation.registry import TABLES, Column, TaskSpec, table_columns
from mae_transfer.io import atomic_write_text
from mae_transfer.spec import preferred_knn_protocol

MISSING = "–"
NO_RESULTS = "no results yet: the results store holds no rows for the paper's tables"
TOY_NOTE = (
    "Our rows ran on the built-in toy data: they check the pipeline and are not comparable with the paper's rows."
)
CUSTOM_NOTE = (
    "{dataset} is not the benchmark's dataset (another class count in its layout): these rows are "
    "not comparable with the paper's, which are left out."
)
LABELS_NOTE = (
    "Low-label transfer ({labels}): a stratified subset of the training labels, drawn per class with "
    "train.seed (label_subset.json in each run); not comparable with the paper's full-label rows, which "
    "are left out."
)
SEEDS_NOTE = "mean ± std (n): mean and sample standard deviation over n training seeds (bench --seeds)."
FIGURE9_TITLE = "Figure 9: partial fine-tuning, top-1 by the number of last blocks fine-tuned"
FIGURE9_NOTE = (
    "Columns: how many of the last blocks were fine-tuned (bench --trainable-blocks); 0 is the linear probe "
    "(the linprobe job), {full} full fine-tuning (the finetune job), the others fine-tune only the last k "
    "blocks and the head (protocol partial)."
)
# The MAE paper's Figure 9 (ViT-L/16, 24 blocks, Table-1 defaults; point labels of the CVPR figure,
# reference/paper_numbers.md section 1.11): blocks fine-tuned -> ImageNet-1K top-1. 0 is linear
# probing, 24 full fine-tuning; partial fine-tuning trains the last k blocks with the settings of the
# paper's Table 9 and 50, 100 or 200 epochs, the best per k.
FIGURE9_PAPER: dict[str, dict[int, float]] = {
    "MAE": {0: 73.5, 1: 81.0, 2: 83.1, 4: 84.2, 6: 84.4, 12: 84.6, 18: 84.7, 24: 84.9},
    "MoCo v3": {0: 77.6, 1: 79.9, 2: 80.8, 4: 81.6, 6: 81.9, 12: 83.2, 18: 83.8, 24: 84.1},
}
FIGURE9_SOURCE = "MAE paper Figure 9 (ViT-L/16, 24 blocks: there 24 is full fine-tuning)"
FORMATS = ("markdown", "latex", "csv")


@dataclass
class Cell:
    """One number: ``value`` (None: show ``status``), bold flag and delta to the baseline."""

    value: float | None = None  # over several seeds: their mean
    status: str = MISSING
    bold: bool = False
    delta: float | None = None
    std: float | None = None  # sample standard deviation over the seeds (n > 1 only)
    runs: list[tuple[int | None, float]] = field(default_factory=list)  # (seed, value) of each seeded run

    @property
    def n(self) -> int:
        """How many runs (seeds) the number is the mean of; 1 for a single run."""
        return max(1, len(self.runs))


@dataclass
class Row:
    """A table row: label cells (method or backbone, ViT size, data) and one ``Cell`` per column."""

    label: str
    size: str | None
    data: str
    cells: list[Cell]


@dataclass
class Table:
    """A built table: ``blocks`` maps the block name (``ours``, ``paper``) to its rows."""

    key: str
    title: str
    caption: str
    columns: list[str]
    blocks: dict[str, list[Row]]
    notes: list[str] = field(default_factory=list)


def load_paper() -> dict:
    """The MAE paper's reference numbers (``paper.yaml`` shipped with the package)."""
    text = resources.files(__package__).joinpath("paper.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


_SIZES = {"base": "B", "large": "L", "huge": "H", "b": "B", "l": "L", "h": "H"}


def size_of(model: str | None) -> str | None:
    """The ViT size letter of a model name: ``vit_base_patch16`` -> ``"B"``, ``vit_large_*`` -> ``"L"``,
    ``vit_huge_*`` -> ``"H"`` (also ``mae_vit_*``); other ViTs give their size word (``"micro"``)."""
    if not model:
        return None
    m = re.search(r"(?:^|_)vit_([a-z]+)", str(model).lower())
    if not m:
        return str(model)
    return _SIZES.get(m.group(1), m.group(1))


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _is_toy(dataset: Any) -> bool:
    return isinstance(dataset, str) and dataset.strip().endswith("(toy)")


def _key(r: dict) -> tuple[str, str, str, str]:
    return str(r["backbone"]), str(r.get("task") or ""), str(r.get("protocol") or ""), str(r.get("metric"))


class RowIndex:
    """Result rows indexed for lookup: the last row per (backbone, task, protocol, metric), and which
    (backbone, task) failed after its last result; the seeded runs of each (``seed_group``, see the
    module's doc). Shared by the tables and the plots."""

    def __init__(self, rows: Iterable[dict]):
        rows = list(rows)
        self.latest: dict[tuple[str, str, str, str], tuple[int, dict]] = {}
        self.ok: dict[tuple[str, str], int] = {}
        self.fail: dict[tuple[str, str], int] = {}
        self.models: dict[str, str] = {}
        self.backbones: list[str] = []
        # seed_group -> the first seed; the first seed's job may have run in a benchmark without
        # seeds (same job key, rows without seed fields): its rows count as that seed.
        self.groups: dict[str, Any] = {str(r["seed_group"]): r.get("seed_base") for r in rows if r.get("seed_group")}
        self.seeded: dict[tuple[str, str, str, str, str], dict[Any, tuple[int, dict]]] = {}
        ok_seeds: dict[tuple[str, str, str], set] = {}
        seed_fails = []
        for i, r in enumerate(rows):
            if r.get("backbone") is None:
                continue
            bb, task = str(r["backbone"]), str(r.get("task") or "")
            if bb not in self.backbones:
                self.backbones.append(bb)
            if r.get("model") and bb not in self.models:
                self.models[bb] = r["model"]
            group, seed = self.seed_of(r)
            if r.get("metric") == FAILED:
                if group is None:
                    self.fail[(bb, task)] = i
                else:
                    seed_fails.append((i, bb, task, group, seed))
            else:
                self.ok[(bb, task)] = i
                self.latest[_key(r)] = (i, r)
                if group is not None:
                    ok_seeds.setdefault((bb, task, group), set()).add(seed)
                    self.seeded.setdefault((*_key(r), group), {})[seed] = (i, r)
        for i, bb, task, group, seed in seed_fails:  # a failed seed leaves the results of the others
            if not ok_seeds.get((bb, task, group), set()) - {seed}:
                self.fail[(bb, task)] = max(i, self.fail.get((bb, task), -1))

    def seed_of(self, r: dict) -> tuple[str | None, Any]:
        """The seed group and seed of a row; (None, None) for a run of no seeded benchmark."""
        if r.get("seed_group"):
            return str(r["seed_group"]), r.get("seed")
        if r.get("job_key") and str(r["job_key"]) in self.groups:
            return str(r["job_key"]), self.groups[str(r["job_key"])]
        return None, None

    def summary(self, row: dict) -> tuple[float | None, float | None, list[tuple[Any, float]]]:
        """The number of a cell whose last row is ``row``: its value, or over the seeds of its group
        the mean, the sample standard deviation (None below two seeds) and ``[(seed, value)]`` (by
        seed; empty for a row of no seeded benchmark)."""
        group, _ = self.seed_of(row)
        if group is None:
            return _num(row.get("value")), None, []
        runs = self.seeded.get((*_key(row), group), {})
        vals = [(s, v) for s, (_, r) in runs.items() if (v := _num(r.get("value"))) is not None]
        vals.sort(key=lambda sv: (sv[0] is None, sv[0] if isinstance(sv[0], (int, float)) else str(sv[0])))
        if len(vals) < 2:
            return (vals[0][1] if vals else _num(row.get("value"))), None, vals
        mean = math.fsum(v for _, v in vals) / len(vals)
        std = math.sqrt(math.fsum((v - mean) ** 2 for _, v in vals) / (len(vals) - 1))
        return mean, std, vals

    def failed(self, bb: str, task: str) -> bool:
        return self.fail.get((bb, task), -1) > self.ok.get((bb, task), -1)

    def hit(self, bb: str, spec: TaskSpec, col: Column, fallback: bool = False) -> dict | None:
        """The newest row of ``bb`` for the column (any matching protocol; for k-NN columns the
        k of :meth:`knn_protocol`); with ``fallback`` and ``col.bar_fallback``, any protocol when
        none matches."""
        hits = [
            v
            for (b, t, p, m), v in self.latest.items()
            if b == bb
            and t == spec.name
            and m == col.metric
            and col.matches(p)
            and (col.prefer != "knn" or p == self.knn_protocol(spec.name))
        ]
        if not hits and fallback and col.bar_fallback:
            hits = [v for (b, t, p, m), v in self.latest.items() if b == bb and t == spec.name and m == col.metric]
        return max(hits, key=lambda h: h[0])[1] if hits else None

    def knn_protocol(self, task: str) -> str:
        """The k-NN protocol of ``task``'s column over every backbone (``spec.preferred_knn_protocol``)."""
        measured = (p for (_, t, p, m) in self.latest if t == task and m == "top1")
        return preferred_knn_protocol(measured) or "knn20"


def _resolve_baseline(baseline: str | None, backbones: list[str]) -> str | None:
    if baseline is None:
        return None
    if baseline == "auto":
        return next((b for b in backbones if re.search("random|scratch", b, re.IGNORECASE)), None)
    if baseline not in backbones:
        raise ValueError(
            f"baseline {baseline!r} is not a backbone of the results; backbones: "
            f"{', '.join(map(repr, backbones)) or 'none'}"
        )
    return baseline


def _deltas_to(rows: list[Row], base: str) -> None:
    """Every other row's cells get their difference to the cells of row ``base`` (both measured)."""
    ref_cells = next(r for r in rows if r.label == base).cells
    for r in rows:
        if r.label != base:
            for c, bc in zip(r.cells, ref_cells):
                if c.value is not None and bc.value is not None:
                    c.delta = c.value - bc.value


def _mark_best(rows: list[Row]) -> None:
    """Bold the highest value of each column among ``rows`` (as displayed, one decimal); ties are all
    bold. Called on our rows only: the paper's rows are reference numbers, never bold, and take no
    part in the comparison (README "bold: the best of your backbones in each column")."""
    for j in range(len(rows[0].cells) if rows else 0):
        vals = [round(r.cells[j].value, 1) for r in rows if r.cells[j].value is not None]
        for r in rows:
            c = r.cells[j]
            c.bold = bool(vals) and c.value is not None and round(c.value, 1) == max(vals)


def _paper_block(
    paper: dict, keys: tuple[str, ...], cols: list[Column], sizes: list[str]
) -> tuple[list[Row], list[str], list[str]]:
    """The paper's rows for ``sizes`` (merged across the paper tables ``keys``), their sources and notes."""
    merged: dict[tuple[str, str], tuple[str, dict]] = {}
    sources, notes = [], []
    ids = [c.id for c in cols]
    for key in keys:
        t = paper["tables"][key]
        used = False
        for r in t["rows"]:
            vals = {s: v for s, v in r["values"].items() if s == "-" or s in sizes}
            if not any(_num(v.get(i)) is not None for v in vals.values() for i in ids):
                continue
            used = True
            for s, v in vals.items():
                merged.setdefault((r["method"], s), (r["pretrain"], {}))[1].update(v)
            if r.get("note"):
                notes.append(r["note"] + ".")
            if r.get("by"):
                label = {c.id: c.label for c in cols}
                by = [f"{label[i]} {r['by'][i]}" for i in ids if i in r["by"]]
                notes.append(f"{r['method']} (paper): " + "; ".join(by) + ".")
        if used:
            sources.append(t["source"])
    rows = [
        Row(f"{m} (paper)", None if s == "-" else s, pre, [Cell(_num(v.get(i))) for i in ids])
        for (m, s), (pre, v) in merged.items()
        if any(_num(v.get(i)) is not None for i in ids)
    ]
    return rows, sources, notes


def build_tables(
    rows: Iterable[dict],
    baseline: str | None = "auto",
    paper: bool = True,
    paper_sizes: list[str] | None = None,
    full: bool = False,
) -> list[Table]:
    """The paper's tables (COCO, ADE20K, transfer, ImageNet) that our ``rows`` have results for.

    ``baseline``: the backbone that deltas are taken to ("auto": the first backbone whose name holds
    "random" or "scratch"; None: no deltas). ``paper``: add the paper's rows, for ``paper_sizes``
    (default: our ViT sizes among B/L/H, else B). ``full``: keep the columns nobody has results for.

    Rows on other data in a benchmark's layout (``dataset`` ``"ade20k-layout:FOLDER (11 classes)"``,
    :func:`~mae_transfer.engine.results.is_custom_dataset`) are not the benchmark's: each such
    dataset gets tables of its own after the paper's, titled with it, without the paper's rows.
    """
    rows = list(rows)
    _resolve_baseline(None if baseline == "auto" else baseline, RowIndex(rows).backbones)  # an unknown name: ValueError
    # Groups: (other data, the labels of a low-label run); (None, None) holds the paper's tables. A
    # low-label row (protocol "finetune@10%") fills the columns of its protocol in tables of its own.
    groups: dict[tuple[str | None, str | None], list[dict]] = {}
    for r in rows:
        ds, protocol = r.get("dataset"), r.get("protocol")
        labels = protocol.split("@", 1)[1] if isinstance(protocol, str) and "@" in protocol else None
        if labels is not None:
            r = {**r, "protocol": protocol.split("@", 1)[0]}
        groups.setdefault((ds if is_custom_dataset(ds) else None, labels), []).append(r)

    def base(grp: list[dict]) -> str | None:  # the baseline, where this group has it
        return baseline if baseline in (None, "auto") or baseline in RowIndex(grp).backbones else None

    main = groups.pop((None, None), [])
    tables = _build_tables(main, base(main), paper, paper_sizes, full)
    for (ds, labels), grp in sorted(groups.items(), key=lambda kv: (kv[0][0] or "", _labels_order(kv[0][1]))):
        for t in _build_tables(grp, base(grp), False, None, full):
            where = [re.sub(r"^(?:Table|Figure) [0-9]+: ", "", t.title)]
            if ds is not None:
                t.key = f"{t.key}_{re.sub(r'[^A-Za-z0-9]+', '_', ds).strip('_').lower()}"
                where.append(f"on {ds}")
                t.notes.insert(0, CUSTOM_NOTE.format(dataset=ds))
            if labels is not None:
                t.key = f"{t.key}_{re.sub(r'[^A-Za-z0-9]+', '_', labels).strip('_').lower()}"
                per_class = labels.endswith("shot")
                where.append(
                    f"{labels.removesuffix('shot')} labelled images per class"
                    if per_class
                    else f"{labels} of the labels"
                )
                t.notes.insert(0, LABELS_NOTE.format(labels=labels))
            t.title = ", ".join(where)
            tables.append(t)
    return tables


def _labels_order(labels: str | None) -> tuple[int, float]:
    """All labels first, then fractions from the smallest, then k-shot from the fewest."""
    if labels is None:
        return (0, 0.0)
    if labels.endswith("shot"):
        return (2, float(labels[:-4] or 0))
    return (1, float(labels.rstrip("%") or 0))


def _cell(idx: RowIndex, hit: dict | None) -> Cell:
    if not hit:
        return Cell(None)
    value, std, runs = idx.summary(hit)
    return Cell(value, std=std, runs=runs)


def _build_tables(
    rows: Iterable[dict], baseline: str | None, paper: bool, paper_sizes: list[str] | None, full: bool
) -> list[Table]:
    rows = list(rows)
    idx = RowIndex(r for r in rows if not is_partial(r))  # partial fine-tuning: Figure 9's table only
    bbs = idx.backbones
    base = _resolve_baseline(baseline if baseline in (None, "auto") or baseline in bbs else None, bbs)
    ref = load_paper() if paper else None
    tables = []
    for key, table_spec in TABLES.items():
        title, paper_keys = table_spec.title, table_spec.paper
        pairs = table_columns(key)
        hits = {(b, c.id): idx.hit(b, t, c) for b in bbs for t, c in pairs}
        has = {
            c.id: any(
                idx.failed(b, t.name) or (hits[b, c.id] and _num(hits[b, c.id].get("value")) is not None) for b in bbs
            )
            for t, c in pairs
        }
        if not any(has.values()):
            continue
        keep = {
            "always": lambda c: True,
            "optional": lambda c: full or has[c.id],
            "present": lambda c: any(hits[b, c.id] for b in bbs),
        }
        pairs = [(t, c) for t, c in pairs if keep[c.keep](c)]
        cols = [c for _, c in pairs]
        ours, toy, protocols = [], False, []
        for b in bbs:
            found = [hits[b, c.id] for c in cols]
            cells = [
                Cell(status="failed") if idx.failed(b, t.name) else _cell(idx, h) for (t, c), h in zip(pairs, found)
            ]
            model = next((h["model"] for h in found if h and h.get("model")), idx.models.get(b))
            data = []
            for h in found:
                if h and h.get("dataset"):
                    toy |= _is_toy(h["dataset"])
                    data.append("toy" if _is_toy(h["dataset"]) else str(h["dataset"]))
                if h and h.get("protocol") and h["protocol"] not in protocols:
                    protocols.append(h["protocol"])
            ours.append(Row(b, size_of(model), ", ".join(dict.fromkeys(data)) or MISSING, cells))
        caption, notes = [], []
        if base is not None:
            _deltas_to(ours, base)
        _mark_best(ours)
        blocks = {"ours": ours}
        if ref is not None:
            sizes = paper_sizes or [s for s in ("B", "L", "H") if s in {r.size for r in ours}] or ["B"]
            prow, sources, pnotes = _paper_block(ref, paper_keys, cols, sizes)
            if prow:
                blocks["paper"] = prow
                caption.append("Paper rows: " + "; ".join(sources) + ".")
                notes += pnotes
        if base is not None:
            caption.append(f"(±x.x): difference to {base}.")
        for t, c in pairs:
            if c.prefer == "knn":
                notes.append(f"{c.label}: top-1 of the weighted k-NN classifier, k={idx.knn_protocol(t.name)[3:]}.")
        if protocols:
            notes.append("Our protocols: " + ", ".join(map(str, protocols)) + ".")
        if any(c.n > 1 for r in ours for c in r.cells):
            notes.append(SEEDS_NOTE)
        if toy:
            notes.append(TOY_NOTE)
        tables.append(Table(key, title, " ".join(caption), [c.label for c in cols], blocks, notes))
    figure9 = _figure9_table(rows, baseline, paper)
    if figure9 is not None:
        tables.append(figure9)
    return tables


def is_partial(row: dict) -> bool:
    """A row of a partial fine-tuning job (protocol ``partial``, also ``partial@10%``)."""
    return str(row.get("protocol") or "").split("@", 1)[0] == "partial"


def _depth_of_model(model: Any) -> int | None:
    """The blocks of a ViT named in a row's ``model`` (a size name or ``vit_<width>x<depth>_patch<p>``)."""
    m = re.fullmatch(r"vit_\d+x(\d+)_patch\d+", str(model or ""))
    if m:
        return int(m.group(1))
    if not model:
        return None
    from mae_transfer.models.vit import VIT_SIZES  # only for rows of a grid run before rows carried depth

    size = VIT_SIZES.get(str(model))
    return size.depth if size else None


def figure9_points(rows: Iterable[dict]) -> tuple[list[dict], dict[str, int]]:
    """The rows of Figure 9 and each backbone's depth. A point is a ``top1`` (or ``job_failed``) row
    of a linear probe (k = 0), a partial fine-tuning (its ``trainable_blocks``) or a full fine-tuning
    (k = the depth) of a backbone of a grid (rows of partial fine-tuning or of a ``bench
    --trainable-blocks`` job) with at least two values of k;
    it is returned with ``task`` ``k<K>``, ``protocol`` empty and ``blocks`` K, so that
    :class:`RowIndex` keeps one cell (last row wins, seeds, failures) per backbone and k."""
    rows = [r for r in rows if r.get("backbone") is not None]
    # Backbones of a grid: with partial fine-tuning rows, or rows of a grid's job (their k in trainable_blocks).
    partial = {str(r["backbone"]) for r in rows if is_partial(r) or r.get("trainable_blocks") is not None}
    depth: dict[str, int] = {}
    for r in rows:  # the grid's rows carry the depth; a full fine-tuning run before the grid does not
        bb = str(r["backbone"])
        if bb in partial and bb not in depth and isinstance(r.get("model_depth"), int):
            depth[bb] = r["model_depth"]
    for r in rows:
        bb = str(r["backbone"])
        if bb in partial and bb not in depth and r.get("task") == "finetune" and not is_partial(r):
            d = _depth_of_model(r.get("model"))
            if d:
                depth[bb] = d
    points: list[dict] = []
    for r in rows:
        bb, task, protocol = str(r["backbone"]), r.get("task"), str(r.get("protocol") or "")
        if bb not in partial or r.get("metric") not in ("top1", FAILED):
            continue
        if task == "linprobe" and protocol in ("", "linprobe"):
            k = 0
        elif task == "finetune" and protocol == "partial":
            k = r.get("trainable_blocks")
        elif task == "finetune" and protocol in ("", "finetune"):
            k = r.get("trainable_blocks", depth.get(bb))
        else:
            continue
        if isinstance(k, int):
            points.append({**r, "task": f"k{k}", "protocol": "", "blocks": k})
    ks: dict[str, set[int]] = {}
    for p in points:
        if p.get("metric") != FAILED:
            ks.setdefault(str(p["backbone"]), set()).add(p["blocks"])
    shown = {bb for bb, k in ks.items() if len(k) >= 2}
    return [p for p in points if str(p["backbone"]) in shown], {bb: d for bb, d in depth.items() if bb in shown}


def _figure9_table(rows: list[dict], baseline: str | None, paper: bool) -> Table | None:
    """The table "Figure 9: partial fine-tuning" of ``rows`` (one group of the tables), or None."""
    points, depth = figure9_points(rows)
    if not points:
        return None
    idx = RowIndex(points)
    bbs = idx.backbones
    base = _resolve_baseline(baseline if baseline in (None, "auto") or baseline in bbs else None, bbs)
    ks = sorted({p["blocks"] for p in points})
    full = {d for bb, d in depth.items()}
    labels = [
        "0 (linear)" if k == 0 else f"{k} (full)" if full == {k} else str(k)  # full: the depth of every backbone
        for k in ks
    ]
    ours, toy = [], False
    for bb in bbs:
        cells, data = [], []
        for k in ks:
            if idx.failed(bb, f"k{k}"):
                cells.append(Cell(status="failed"))
                continue
            hit = idx.latest.get((bb, f"k{k}", "", "top1"))
            cells.append(_cell(idx, hit[1] if hit else None))
            if hit and hit[1].get("dataset"):
                toy |= _is_toy(hit[1]["dataset"])
                data.append("toy" if _is_toy(hit[1]["dataset"]) else str(hit[1]["dataset"]))
        ours.append(Row(bb, size_of(idx.models.get(bb)), ", ".join(dict.fromkeys(data)) or MISSING, cells))
    if base is not None:
        _deltas_to(ours, base)
    _mark_best(ours)
    blocks, caption = {"ours": ours}, []
    if paper:
        blocks["paper"] = [
            Row(f"{method} (paper)", "L", "IN1K", [Cell(values.get(k)) for k in ks])
            for method, values in FIGURE9_PAPER.items()
        ]
        caption.append(f"Paper rows: {FIGURE9_SOURCE}, at the same k.")
    if base is not None:
        caption.append(f"(±x.x): difference to {base}.")
    fulls = (
        " / ".join(f"{d} ({bb})" for bb, d in depth.items()) if len(full) > 1 else str(next(iter(full), "the depth"))
    )
    notes = [FIGURE9_NOTE.format(full=fulls)]
    if any(c.n > 1 for r in ours for c in r.cells):
        notes.append(SEEDS_NOTE)
    if toy:
        notes.append(TOY_NOTE)
    return Table("figure9", FIGURE9_TITLE, " ".join(caption), labels, blocks, notes)


# ---------------------------------------------------------------- rendering


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def _fmt_delta(d: float) -> str:
    s = f"{d:+.1f}"
    return "+0.0" if s == "-0.0" else s


def _md_escape(s: str) -> str:
    return re.sub(r"([\\|*_`])", r"\\\1", s)


def _md_cell(c: Cell) -> str:
    if c.value is None:
        return c.status
    s = _fmt(c.value) + (f" ± {_fmt(c.std)}" if c.std is not None else "")
    s = f"**{s}**" if c.bold else s
    s += f" ({c.n})" if c.n > 1 else ""
    return s + (f" ({_fmt_delta(c.delta)})" if c.delta is not None else "")


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table: title line, our rows then the paper's, caption and notes below."""
    line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    out = [
        f"**{_md_escape(table.title)}**",
        "",
        line(["method", "ViT", "data", *map(_md_escape, table.columns)]),
        "|" + "|".join([":---"] * 3 + ["---:"] * len(table.columns)) + "|",
    ]
    for rows in table.blocks.values():
        out += [
            line([_md_escape(r.label), _md_escape(r.size or MISSING), _md_escape(r.data), *map(_md_cell, r.cells)])
            for r in rows
        ]
    text = " ".join([table.caption, *table.notes]).strip()
    return "\n".join(out + (["", _md_escape(text)] if text else []))


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "–": "--",
    "−": "$-$",
    "±": r"$\pm$",
}


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _tex_cell(c: Cell) -> str:
    if c.value is None:
        return _tex(c.status)
    s = _fmt(c.value) + (rf" $\pm$ {_fmt(c.std)}" if c.std is not None else "")
    s = rf"\textbf{{{s}}}" if c.bold else s
    s += f" ({c.n})" if c.n > 1 else ""
    if c.delta is not None:
        s += r"\,{\scriptsize(" + _fmt_delta(c.delta).replace("-", "$-$") + ")}"
    return s


def to_latex(table: Table) -> str:
    """A booktabs ``table`` environment (caption, our block, paper block, notes)."""
    title = re.sub(r"^(Table|Figure) (\d+): (.*)$", r"\3, as in \1 \2 of the MAE paper", table.title)
    caption = _tex(f"{title}. {table.caption}".strip())
    out = [
        r"\begin{table}[htbp]",
        r"\centering",
        r"\small",
        rf"\caption{{{caption}}}",
        rf"\label{{tab:{table.key}}}",
        r"\begin{tabular}{lll" + "r" * len(table.columns) + "}",
        r"\toprule",
        " & ".join(["method", "ViT", "data", *map(_tex, table.columns)]) + r" \\",
    ]
    for rows in table.blocks.values():
        if rows:
            out.append(r"\midrule")
            out += [
                " & ".join([_tex(r.label), _tex(r.size or MISSING), _tex(r.data), *map(_tex_cell, r.cells)]) + r" \\"
                for r in rows
            ]
    out += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        out.append(r"\par\footnotesize " + _tex(" ".join(table.notes)))
    return "\n".join(out + [r"\end{table}"])


def _plain(v: float | None) -> str:
    return "" if v is None else str(round(v, 4))


def _csv_value(c: Cell) -> str:
    return _plain(c.value) if c.value is not None else ("" if c.status == MISSING else c.status)


def to_csv(table: Table) -> str:
    """CSV: ``block,method,size,data,<col>,<col>_delta,...``; plain numbers, ``failed`` as text, empty for none.

    A table with numbers over several seeds adds a ``seed`` column and ``<col>_std``, ``<col>_n`` after
    each ``<col>_delta``: each row is the mean (``seed`` ``mean``; a single run: empty), followed
    by one line per seed with the number of every run (its seed in ``seed``)."""
    seeded = any(c.n > 1 for rows in table.blocks.values() for r in rows for c in r.cells)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    stats = ("_delta", "_std", "_n") if seeded else ("_delta",)
    w.writerow(
        [
            "block",
            "method",
            "size",
            "data",
            *(["seed"] if seeded else []),
            *[c + x for c in table.columns for x in ("", *stats)],
        ]
    )
    for block, rows in table.blocks.items():
        for r in rows:
            head = [block, r.label, r.size or "", "" if r.data == MISSING else r.data]
            if not seeded:
                w.writerow([*head, *[x for c in r.cells for x in (_csv_value(c), _plain(c.delta))]])
                continue
            many = [c for c in r.cells if c.n > 1]
            vals = [
                x for c in r.cells for x in (_csv_value(c), _plain(c.delta), _plain(c.std), str(c.n) if c.n > 1 else "")
            ]
            w.writerow([*head, "mean" if many else "", *vals])
            seeds = list(dict.fromkeys(s for c in many for s, _ in c.runs))
            for seed in seeds:
                runs = [dict(c.runs) if c.n > 1 else {} for c in r.cells]
                w.writerow([*head, seed, *[x for v in runs for x in (_plain(v.get(seed)), "", "", "")]])
    return buf.getvalue()


def render(rows: Iterable[dict], fmt: str = "markdown", **build_kwargs: Any) -> str:
    """All tables in one format (``markdown``, ``latex`` or ``csv``); a one-line message when there are none."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tables = build_tables(rows, **build_kwargs)
    if not tables:
        return NO_RESULTS
    if fmt == "csv":
        return "\n".join(f"# {t.title}\n{to_csv(t)}" for t in tables)
    return "\n\n".join(map(to_markdown if fmt == "markdown" else to_latex, tables)) + "\n"


def latex_document(tables: list[Table]) -> str:
    """A standalone LaTeX document (article, booktabs) with ``tables``; compiles with pdflatex."""
    body = "\n\n".join(map(to_latex, tables)) if tables else _tex(NO_RESULTS) + "."
    return "\n".join(
        [
            r"\documentclass{article}",
            r"\usepackage{booktabs}",
            r"\usepackage[margin=2cm]{geometry}",
            r"\begin{document}",
            body,
            r"\end{document}",
            "",
        ]
    )


def write_tables(rows: Iterable[dict], out_dir: str | os.PathLike, **build_kwargs: Any) -> dict[str, Path]:
    """Write ``tables.md``, ``tables.tex`` (standalone document) and ``table_<key>.csv`` per table into
    ``out_dir`` (each atomically: temp file + ``os.replace``). Returns file name -> path."""
    tables = build_tables(rows, **build_kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = "\n\n".join(map(to_markdown, tables)) if tables else NO_RESULTS
    files = {"tables.md": md + "\n", "tables.tex": latex_document(tables)}
    files.update({f"table_{t.key}.csv": to_csv(t) for t in tables})
    return {name: atomic_write_text(out / name, text) for name, text in files.items()}


__all__ = [
    "Cell",
    "Row",
    "Table",
    "RowIndex",
    "load_paper",
    "size_of",
    "build_tables",
    "to_markdown",
    "to_latex",
    "to_csv",
    "render",
    "latex_document",
    "write_tables",
    "NO_RESULTS",
    "TOY_NOTE",
    "SEEDS_NOTE",
    "FIGURE9_TITLE",
    "FIGURE9_PAPER",
    "figure9_points",
    "is_partial",
]
