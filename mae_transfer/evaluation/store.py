"""The results store: one JSON line per metric, with provenance, in an append-only file.

Every row (a :class:`~mae_transfer.engine.results.ResultRow`) says what was measured (task, dataset, split,
protocol, metric, value), on what
(backbone name and sha256, config hash) and how (git commit, package versions, hardware, wall
time, date). The file is ``<results dir>/results.jsonl``; ``pandas.read_json(path, lines=True)``
reads it as a table.

Crash safety: one ``append`` writes all its rows with a single ``write`` on a file opened in append
mode, then flushes and fsyncs. A crash can leave at most one partial line at the end; readers skip
it (with a warning) and the next append starts on a fresh line, so earlier rows are never lost.

Several writers (two benchmarks into one store): an append holds the store's lock
(``<results dir>/.results.lock``, :class:`~mae_transfer.engine.locks.FileLock`) from its check of
the rows already there (``unless``) to its write, so the rows of one job are written once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from mae_transfer.engine.locks import FileLock
from mae_transfer.engine.results import COLUMNS, RESULTS_FILE, ResultRow, provenance
from mae_transfer.io import json_safe, open_output

log = logging.getLogger(__name__)


class ResultStore:
    """Append-only ``results.jsonl`` in ``root`` (created on the first append)."""

    LOCK_FILE = ".results.lock"
    LOCK_WAIT_S = 300.0  # an append holds the lock for a moment; on a slow network file system, longer

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.path = self.root / RESULTS_FILE

    def append(self, rows: Iterable[ResultRow], unless: Callable[[list[dict[str, Any]]], bool] | None = None) -> int:
        """Add ``rows``, their missing provenance fields filled in from this process. Returns the
        number of rows written. ``unless``: a test of the rows already stored, made under the
        store's lock; when it holds, nothing is written (another process recorded them)."""
        prov = provenance()
        lines = []
        for row in rows:
            if not isinstance(row, ResultRow):
                raise TypeError(f"the results store takes ResultRow objects, got {type(row).__name__}")
            full = {**row.to_dict()}
            for k, v in prov.items():
                if full.get(k) is None:
                    full[k] = v
            lines.append(json.dumps(json_safe(full), sort_keys=False, default=str))  # NaN -> null
        if not lines:
            return 0
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / self.LOCK_FILE, f"the results store {self.path}").acquire(self.LOCK_WAIT_S):
            if unless is not None and unless(self.read()):
                return 0
            self._write("\n".join(lines) + "\n")
        return len(lines)

    def _write(self, blob: str) -> None:
        with open_output(self.path, "a+b") as f:  # never through a link planted at its name
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    blob = "\n" + blob  # a crash left a partial line: start on a fresh one
            f.write(blob.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every complete row, oldest first; partial or corrupt lines are skipped with a warning."""
        if not self.path.exists():
            return []
        rows, bad = [], 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    bad += 1
        if bad:
            log.warning(
                "%s: skipped %d unreadable line(s) (an interrupted write); the other rows are intact", self.path, bad
            )
        return rows

    def find(self, **match: Any) -> list[dict[str, Any]]:
        """Rows whose fields equal every ``match`` value."""
        return [r for r in self.read() if all(r.get(k) == v for k, v in match.items())]

    def has(self, **match: Any) -> bool:
        """Whether any row matches (e.g. task, backbone_sha256 and config_hash of a planned job)."""
        return bool(self.find(**match))


__all__ = ["ResultStore", "RESULTS_FILE", "COLUMNS"]
