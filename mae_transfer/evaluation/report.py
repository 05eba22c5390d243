"""A benchmark's report: the tables (Markdown, LaTeX, CSV) and the plots (PNG), written together."""

from __future__ import annotations

from pathlib import Path

from mae_transfer.evaluation.plots import plot_all
from mae_transfer.evaluation.tables import render, write_tables


def write_report(
    rows: list[dict], results: Path, baseline: str | None, pretrain_dir: Path | None = None
) -> tuple[str, dict, list]:
    """Write the tables and plots of ``rows`` into ``results``; return the Markdown tables and the
    paths written (tables by file name, plots)."""
    kw = {"baseline": baseline or "auto"}
    markdown = render(rows, "markdown", **kw)
    tables = write_tables(rows, results, **kw) if rows else {}
    plots = plot_all(rows, Path(results) / "plots", pretrain_dir=pretrain_dir) if rows else []
    return markdown, tables, plots


__all__ = ["write_report"]
