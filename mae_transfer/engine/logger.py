"""Logging with a rank filter, and metric files (CSV, JSON lines, TensorBoard) for every run."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mae_transfer.io import atomic_write, json_safe, link_refused, open_output

log = logging.getLogger(__name__)


def _read_rows(path: Path) -> tuple[list[dict], bool]:
    """The rows of a JSON-lines stream, and whether its last line was torn (a crash in the middle of
    an append); a torn last line is left out, any other bad line is an error naming the file."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return rows, True
            raise ValueError(f"{path}: line {i + 1} is not JSON; the file was edited or damaged") from None
    return rows, False


class RankFilter(logging.Filter):
    """Let every record through on rank 0; only warnings and errors on the other ranks."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank != 0:
            record.msg = f"[rank {self.rank}] {record.msg}"
        return self.rank == 0 or record.levelno >= logging.WARNING


def _live_bars() -> list:
    """The progress bars (tqdm) on screen now; none when tqdm was never imported."""
    std = sys.modules.get("tqdm.std")
    return [b for b in list(getattr(getattr(std, "tqdm", None), "_instances", ())) if not getattr(b, "disable", True)]


def close_progress_bars() -> None:
    """Finish every live progress bar (a kept bar ends its line, a transient one is cleared), so
    that what is printed next (an error message at the end of a command) starts on its own line."""
    for bar in _live_bars():
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar must never hide the message that follows
            pass


class _ConsoleHandler(logging.StreamHandler):
    """stderr logging that first clears the progress bars drawn on the same stream and draws them
    again below the line (tqdm's ``external_write_mode``), instead of writing after a bar's text."""

    def __init__(self, stream):
        super().__init__(stream)
        self._pid = os.getpid()

    def emit(self, record: logging.LogRecord) -> None:
        # Only in the process that draws the bars: a forked DataLoader worker holds copies of them
        # (and maybe of tqdm's lock, held at the fork), which it must neither draw nor wait for.
        if os.getpid() != self._pid or not _live_bars():
            return super().emit(record)
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


class _FileHandler(logging.FileHandler):
    """``log.txt``, never written through a symbolic link planted at its name (:func:`open_output`)."""

    def _open(self):
        return open_output(self.baseFilename, self.mode, encoding=self.encoding)


def setup_logging(rank: int = 0, log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Console (stderr) logging for the ``mae_transfer`` logger tree, plus a file on rank 0."""
    root = logging.getLogger("mae_transfer")
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_mae_transfer", False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S")
    console = _ConsoleHandler(sys.stderr)
    console.setFormatter(fmt)
    console.addFilter(RankFilter(rank))
    console._mae_transfer = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = _FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh._mae_transfer = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    root.propagate = False


class MetricWriter:
    """Append metric rows to ``<name>.csv`` and ``<name>.jsonl``, and scalars to TensorBoard.

    Only the main process writes. On resume, rows past the checkpoint's step are dropped first
    (``truncate_after``) so that a killed-and-resumed run leaves one clean curve.

    How each write survives a crash: a whole file (a new CSV header, a CSV rewritten for a new
    column, the streams cut back on resume) goes through ``io.atomic_write``, so it is the old file or
    the new one. A row is appended in place (``open_output`` with ``"a"``: one short write at the
    end of the file, rewriting the whole curve for every logged step would cost O(steps^2)); a crash
    can at worst leave the last line torn, which the next resume drops (``truncate_after`` reads a
    torn last line as absent and rewrites the stream).
    """

    STREAMS = ("train", "epochs", "eval", "reconstruction")  # the streams the tasks write

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in self.STREAMS:  # refused at the start of a run rather than at its first row
                for path in (self.out_dir / f"{name}.csv", self.out_dir / f"{name}.jsonl"):
                    if path.is_symlink():
                        raise link_refused(path)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
                except Exception as e:  # tensorboard is optional
                    log.info("TensorBoard logging off (%s)", e)

    def truncate_after(self, step: int, names: tuple[str, ...] = ("train", "epochs")) -> None:
        """Drop rows whose ``step`` is greater than ``step`` from the named streams."""
        if not self.enabled:
            return
        for name in names:
            jl = self.out_dir / f"{name}.jsonl"
            if not jl.exists():
                continue
            rows, torn = _read_rows(jl)
            keep = [r for r in rows if r.get("step", 0) <= step]
            if len(keep) == len(rows) and not torn:
                continue
            with atomic_write(jl, "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in keep))
            self._rewrite_csv(name, keep)

    def _rewrite_csv(self, name: str, rows: list[dict]) -> None:
        path = self.out_dir / f"{name}.csv"
        if not rows:
            path.unlink(missing_ok=True)
            return
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_write(path, "w") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, name: str, row: dict[str, Any]) -> None:
        """Append one row (a dict with at least ``step``) to the stream ``name``."""
        if not self.enabled:
            return
        row = json_safe(row, nonfinite_as_text=True)  # a diverged loss stays "nan" in the curves
        with open_output(self.out_dir / f"{name}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        path = self.out_dir / f"{name}.csv"
        if path.exists():
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if set(row) - set(header):
                # A new column appeared: rewrite the CSV from the JSON-lines record.
                self._rewrite_csv(name, _read_rows(self.out_dir / f"{name}.jsonl")[0])
                return
        else:
            header = list(row)
            with atomic_write(path, "w") as f:
                csv.DictWriter(f, fieldnames=header).writeheader()
        with open_output(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=header).writerow(row)
        if self._tb is not None:
            step = int(row.get("step", 0))
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{name}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
