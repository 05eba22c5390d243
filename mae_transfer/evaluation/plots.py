"""PNG plots of benchmark runs: fine-tuning loss curves, MAE pretraining loss, headline-metric bars
(the mean over the seeds of a ``bench --seeds`` benchmark, with the standard deviation as error bars),
and top-1 against the number of blocks fine-tuned in the form of the MAE paper's Figure 9
(``bench --trainable-blocks``).

Figures are ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot global state); PNGs are written atomically."""

from __future__ import annotations

import csv
import logging
import math
import textwrap
from pathlib import Path
from typing import Any, Iterable

from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from mae_transfer.engine.results import FAILED, is_custom_dataset
from mae_transfer.evaluation.registry import TASKS, headline_columns
from mae_transfer.evaluation.tables import RowIndex, figure9_points, is_partial
from mae_transfer.io import atomic_write

log = logging.getLogger(__name__)

DPI = 120
TOY_NOTE = "toy data: pipeline check, not comparable with the paper"


def backbone_colors(names: Iterable[str]) -> dict[str, str]:
    """A colour per backbone name, in the given order, from the tab10 palette (cycled)."""
    palette = [f"tab:{c}" for c in "blue orange green red purple brown pink gray olive cyan".split()]
    return {n: palette[i % len(palette)] for i, n in enumerate(dict.fromkeys(names))}


def read_curve(path: str | Path) -> dict[str, list[float]]:
    """Read a CSV of numbers into ``{column: values}``.

    Non-numeric or empty cells become NaN. Lines with the wrong number of fields, and a last line
    without a line terminator (a write cut short by a crash), are skipped. An empty file gives ``{}``.
    A missing file raises ``FileNotFoundError``.
    """
    text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
    lines = text.splitlines(keepends=True)
    if len(lines) > 1 and not lines[-1].endswith(("\n", "\r")):
        lines = lines[:-1]  # an unterminated last line: a write cut short
    records = [r for r in csv.reader(lines) if r and any(c.strip() for c in r)]
    if not records:
        return {}
    header = [h.strip() for h in records[0]]
    cols: dict[str, list[float]] = {h: [] for h in header}
    for rec in records[1:]:
        if len(rec) != len(header):
            log.debug("%s: skipping a line with %d fields (header has %d)", path, len(rec), len(header))
            continue
        for h, cell in zip(header, rec):
            try:
                cols[h].append(float(cell))
            except ValueError:
                cols[h].append(math.nan)
    return cols


def _ema(values: list[float], alpha: float = 0.3) -> list[float]:
    out = values[:1]
    for v in values[1:]:
        out.append(alpha * v + (1 - alpha) * out[-1])
    return out


def _xy(cols: dict[str, list[float]], key: str) -> tuple[list[float], list[float]]:
    """(step, key) pairs where both are finite; step defaults to the row index."""
    ys = cols.get(key, [])
    xs = cols.get("step") or [float(i) for i in range(len(ys))]
    pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _train_log(run_dir: Path) -> dict[str, list[float]] | None:
    """``train.csv`` of a run directory if it has finite loss values, else None (with a warning)."""
    cols, why = {}, "no finite loss values in train.csv"
    try:
        cols = read_curve(Path(run_dir) / "train.csv")
    except (OSError, csv.Error) as e:
        why = str(e)
    if _xy(cols, "loss")[0]:
        return cols
    log.warning("no training curve for %s: %s", run_dir, why)
    return None


def _draw_loss(ax: Any, x: list[float], y: list[float], color: str, label: str | None) -> None:
    if len(y) < 100:  # a short log: an average would only lag behind it
        ax.plot(x, y, color=color, linewidth=1.6, label=label, marker="." if len(y) < 15 else None)
        return
    ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(x, _ema(y), color=color, linewidth=1.6, label=label)


class _PlainLog(LogFormatter):
    """Log-axis labels as plain numbers ("0.3", not "3e-01"), on the ticks matplotlib would label."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _log_if_wide(ax: Any, values: list[float]) -> None:
    if values and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PlainLog())
        ax.yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _save(fig: Figure, out: Path) -> Path:
    """Save ``fig`` as a PNG at ``out`` atomically and release it."""
    try:
        with atomic_write(out, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
    finally:
        fig.clear()
    return Path(out)


def _task_order(tasks: Iterable[str]) -> list[str]:
    """Tasks in the registry's (the paper's) order, unknown ones last."""
    order = list(TASKS)
    return sorted(dict.fromkeys(tasks), key=lambda t: (order.index(t) if t in order else len(order), t))


def plot_training_curves(
    runs: dict[str, dict[str, Path]], out: Path, title: str | None = None, colors: dict[str, str] | None = None
) -> Path | None:
    """Training loss vs step: one subplot per job, one line (EMA, raw faint behind) per backbone.

    ``runs`` maps a task to ``{backbone: run dir}``. Returns None and writes nothing if no curve
    could be read. ``colors`` (from :func:`backbone_colors`) keeps colours in step with other plots.
    """
    curves = {
        job: {bb: _xy(c, "loss") for bb, d in runs[job].items() if (c := _train_log(d))} for job in _task_order(runs)
    }
    curves = {job: c for job, c in curves.items() if c}
    if not curves:
        return None
    names = [bb for c in curves.values() for bb in c]
    colors = {**backbone_colors([*(colors or {}), *names]), **(colors or {})}  # new names after the given ones
    nrows, ncols = math.ceil(len(curves) / 4), min(4, len(curves))
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.8), layout="constrained")
    for i, (job, by_bb) in enumerate(curves.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for bb, (x, y) in by_bb.items():
            _draw_loss(ax, x, y, colors[bb], bb)
        _log_if_wide(ax, [v for _, y in by_bb.values() for v in y])
        ax.set(title=TASKS[job].title if job in TASKS else job, xlabel="step", ylabel="training loss")
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in fig.axes for h in ax.get_lines() if not h.get_label().startswith("_")}
    order = [bb for bb in colors if bb in handles]
    fig.legend([handles[b] for b in order], order, loc="outside lower center", ncol=min(len(order), 6), frameon=False)
    fig.suptitle(title or "Training loss (long logs smoothed, raw faint)")
    return _save(fig, out)


def plot_pretraining(run_dir: Path, out: Path) -> Path | None:
    """MAE pretraining loss vs step, with the learning rate on a twin axis when logged, and beside it
    the online k-NN top-1 (``pretrain --knn-data``, eval.csv) when the run measured it."""
    cols = _train_log(run_dir)
    if cols is None:
        return None
    curve = _xy(cols, "loss")
    knn: tuple[list[float], list[float]] = ([], [])
    if (Path(run_dir) / "eval.csv").exists():
        try:
            knn = _xy(read_curve(Path(run_dir) / "eval.csv"), "knn_top1")
        except (OSError, csv.Error) as e:
            log.warning("no k-NN curve for %s: %s", run_dir, e)
    fig = Figure(figsize=(11.5 if knn[0] else 7, 4.2), layout="constrained")
    if knn[0]:
        grid = fig.add_gridspec(1, 2, width_ratios=(1.6, 1))
        ax, kax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
        kax.plot(*knn, color="tab:green", marker="o", linewidth=1.6)
        kax.set(xlabel="step", ylabel="k-NN top-1 (%)", title="online k-NN (val)")
        kax.grid(alpha=0.3)
    else:
        ax = fig.add_subplot()
    _draw_loss(ax, *curve, "tab:blue", "loss" if len(curve[1]) < 100 else "loss (EMA)")
    _log_if_wide(ax, curve[1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    lx, ly = _xy(cols, "lr")
    if lx:
        ax2 = ax.twinx()
        ax2.plot(lx, ly, color="tab:orange", linewidth=1.2, linestyle="--", label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:orange")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    handles = [h for a in fig.axes for h in a.get_lines() if not h.get_label().startswith("_")]
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncol=2, frameon=False)
    fig.suptitle(f"MAE pretraining ({Path(run_dir).name})")
    return _save(fig, out)


Bars = dict[str, list[float | None]]


def _comparison(rows: list[dict]) -> tuple[list[str], Bars, dict[str, list[bool]], Bars]:
    """One bar group per headline column of the registry (``"<task title> <bar label>"``) with a
    result; per backbone (first-seen order) its value (the mean over seeds), or None, whether the
    task failed, and the standard deviation over seeds (None for a single run). Partial fine-tuning
    rows are not the fine-tune bar (they have a plot of their own, :func:`plot_partial_finetuning`)."""
    idx = RowIndex(r for r in rows if not is_partial(r))
    labels: list[str] = []
    values: Bars = {bb: [] for bb in idx.backbones}
    fails: dict[str, list[bool]] = {bb: [] for bb in idx.backbones}
    errors: Bars = {bb: [] for bb in idx.backbones}
    for spec, col in headline_columns():
        col_values = {}
        for bb in idx.backbones:
            hit = idx.hit(bb, spec, col, fallback=True)
            col_values[bb] = idx.summary(hit)[:2] if hit else (None, None)
        if all(v is None for v, _ in col_values.values()):
            continue
        labels.append(f"{spec.title} {col.bar}")
        for bb in idx.backbones:
            v, err = col_values[bb]
            values[bb].append(v)
            errors[bb].append(err if v is not None else None)
            fails[bb].append(v is None and idx.failed(bb, spec.name))
    return labels, values, fails, errors


def comparison_data(rows: list[dict]) -> tuple[list[str], Bars]:
    """The bars of :func:`plot_comparison`: group labels, ``{backbone (first-seen order): value or None per group}``
    (over several seeds, their mean)."""
    labels, values, _, _ = _comparison(rows)
    return labels, values


def plot_comparison(
    rows: list[dict], out: Path, title: str | None = None, colors: dict[str, str] | None = None
) -> Path | None:
    """Grouped bars of each job's headline metric, one bar per backbone (over several seeds: the mean,
    the standard deviation as an error bar); None if nothing to draw."""
    labels, values, fails, errors = _comparison(rows)
    if not labels:
        return None
    colors = {**backbone_colors([*(colors or {}), *values]), **(colors or {})}
    n, width = len(values), 0.8 / len(values)
    finite = [v for vs in values.values() for v in vs if v is not None]
    spread = any(e is not None for es in errors.values() for e in es)
    top = max(
        finite + [v + (e or 0.0) for bb in values for v, e in zip(values[bb], errors[bb]) if v is not None] + [1.0]
    )
    rotate = n * len(labels) > 16
    fig = Figure(figsize=(min(18.0, max(6.0, 1.0 + len(labels) * (0.4 + 0.35 * n))), 4.8), layout="constrained")
    ax = fig.add_subplot()
    for i, (bb, vs) in enumerate(values.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(labels))]
        errs = [math.nan if e is None else e for v, e in zip(vs, errors[bb]) if v is not None]
        bars = ax.bar(
            [x for x, v in zip(xs, vs) if v is not None],
            [v for v in vs if v is not None],
            width * 0.92,
            color=colors[bb],
            label=bb,
            **({"yerr": errs, "capsize": 3, "error_kw": {"elinewidth": 1}} if any(e == e for e in errs) else {}),
        )
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8, rotation=90 if rotate else 0)
        for x, f in zip(xs, fails[bb]):
            if f:
                ax.text(x, top * 0.02, "failed", rotation=90, ha="center", va="bottom", fontsize=8, color="firebrick")
    ax.set_xticks(range(len(labels)), [textwrap.fill(lab, 16, break_on_hyphens=False) for lab in labels], fontsize=9)
    ax.set(
        ylabel="score (%)" + (", mean ± std over seeds" if spread else ""),
        ylim=(min(0.0, min(finite, default=0.0)), top * (1.2 if rotate else 1.1)),
    )
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside lower center", ncol=min(n, 6), frameon=False)
    fig.suptitle(title or "Transfer benchmark: headline metrics")
    if any(str(r.get("dataset") or "").endswith(" (toy)") for r in rows):
        ax.set_title(TOY_NOTE, fontsize=9, style="italic", color="dimgray")
    return _save(fig, out)


Series = dict[str, list[tuple[float | None, float | None, bool]]]


def partial_finetuning_data(rows: list[dict]) -> tuple[list[int], Series, dict[str, int]]:
    """The points of :func:`plot_partial_finetuning`: the block counts k (ascending), per backbone
    (first-seen order) its ``(top-1 or mean over seeds, std or None, failed)`` at each k, and each
    backbone's depth where known. Only the benchmark's own data with all labels (rows on other data
    or with a fraction of the labels have tables of their own)."""
    main = [
        r
        for r in rows
        if not is_custom_dataset(r.get("dataset"))
        and "@" not in str(r.get("protocol") or "")
        and r.get("task") in TASKS
    ]
    points, depth = figure9_points(main)
    idx = RowIndex(points)
    ks = sorted({p["blocks"] for p in points})
    series: Series = {}
    for bb in idx.backbones:
        series[bb] = []
        for k in ks:
            hit = idx.latest.get((bb, f"k{k}", "", "top1"))
            value, std, _ = idx.summary(hit[1]) if hit and not idx.failed(bb, f"k{k}") else (None, None, [])
            series[bb].append((value, std, value is None and idx.failed(bb, f"k{k}")))
    return ks, series, depth


def plot_partial_finetuning(rows: list[dict], out: Path, colors: dict[str, str] | None = None) -> Path | None:
    """Top-1 against the number of last blocks fine-tuned, in the form of the MAE paper's Figure 9:
    the counts as evenly spaced categories (0 = linear probe, ..., the depth = full fine-tuning), one
    line with markers per backbone, each point labelled with its value, error bars (std over seeds)
    when several seeds ran. None (nothing written) unless a backbone has partial fine-tuning rows for
    at least two counts."""
    ks, series, depth = partial_finetuning_data(rows)
    if not series:
        return None
    colors = {**backbone_colors([*(colors or {}), *series]), **(colors or {})}
    full = set(depth.values())
    ticks = [("0\n(linear)" if k == 0 else f"{k}\n(full)" if full == {k} else str(k)) for k in ks]
    fig = Figure(figsize=(max(5.5, 1.0 + 0.9 * len(ks)), 4.6), layout="constrained")
    ax = fig.add_subplot()
    spread, finite = False, []
    for bb, pts in series.items():
        xs = [x for x, (v, _, _) in enumerate(pts) if v is not None]
        ys = [v for v, _, _ in pts if v is not None]
        errs = [math.nan if e is None else e for v, e, _ in pts if v is not None]
        spread |= any(e == e for e in errs)
        finite += [v + (0.0 if e != e else e) for v, e in zip(ys, errs)] + ys
        ax.errorbar(
            xs,
            ys,
            yerr=errs if any(e == e for e in errs) else None,
            color=colors[bb],
            marker="o",
            markersize=5,
            linewidth=1.6,
            capsize=3,
            label=bb,
        )
        for x, y in zip(xs, ys):
            ax.annotate(
                f"{y:.1f}",
                (x, y),
                textcoords="offset points",
                xytext=(-4, 4),
                ha="right",
                va="bottom",
                fontsize=8,
                color=colors[bb],
            )
        for x, (v, _, failed) in enumerate(pts):
            if failed:
                ax.annotate(  # named, in the backbone's colour, one line up per backbone
                    f"{bb}: failed",
                    (x, 0),
                    textcoords="offset points",
                    xytext=(0, 4 + 11 * list(series).index(bb)),
                    ha="center",
                    fontsize=8,
                    color=colors[bb],
                )
    low, high = min(finite, default=0.0), max(finite, default=1.0)
    pad = max(2.0, 0.12 * (high - low))
    ax.set_xticks(range(len(ks)), ticks)
    ax.set_xlim(-0.4, len(ks) - 0.6)
    ax.set_ylim(max(0.0, low - pad) if not any(f for pts in series.values() for _, _, f in pts) else 0.0, high + pad)
    ax.set(
        xlabel="# blocks fine-tuned",
        ylabel="top-1 (%)" + (", mean ± std over seeds" if spread else ""),
    )
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="best", frameon=False)
    fig.suptitle("Partial fine-tuning (MAE paper, Figure 9)")
    if any(str(r.get("dataset") or "").endswith(" (toy)") for r in rows if r.get("backbone") in series):
        ax.set_title(TOY_NOTE, fontsize=9, style="italic", color="dimgray")
    return _save(fig, out)


def plot_all(rows: list[dict], out_dir: Path, pretrain_dir: Path | None = None) -> list[Path]:
    """Write ``training_curves.png``, ``comparison.png``, ``partial_finetuning.png`` (when a
    backbone has partial fine-tuning results: Figure 9) and (with ``pretrain_dir``) ``pretraining.png``.

    Run directories come from the rows' ``run_dir`` field (the latest per job and backbone; relative
    paths are taken from the working directory; missing ones are skipped). Returns the written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = backbone_colors(str(r.get("backbone") or "unknown") for r in rows if r.get("task") in TASKS)
    found: dict[tuple[str, str], Path] = {}
    for r in rows:
        spec = TASKS.get(str(r.get("task")))
        if spec is not None and spec.trains and r.get("run_dir") and r.get("metric") != FAILED and not is_partial(r):
            found[(spec.name, str(r.get("backbone") or "unknown"))] = Path(r["run_dir"])
    runs: dict[str, dict[str, Path]] = {}
    for (job, bb), d in found.items():
        if d.is_dir():
            runs.setdefault(job, {})[bb] = d
        else:
            log.warning("run directory of %s / %s not found: %s", job, bb, d)
    written = [
        plot_training_curves(runs, out_dir / "training_curves.png", colors=colors),
        plot_comparison(rows, out_dir / "comparison.png", colors=colors),
        plot_partial_finetuning(rows, out_dir / "partial_finetuning.png", colors=colors),
    ]
    if pretrain_dir is not None:
        written.append(plot_pretraining(Path(pretrain_dir), out_dir / "pretraining.png"))
    return [p for p in written if p is not None]


__all__ = [
    "backbone_colors",
    "comparison_data",
    "plot_all",
    "plot_comparison",
    "plot_partial_finetuning",
    "partial_finetuning_data",
    "plot_pretraining",
    "plot_training_curves",
    "read_curve",
]
