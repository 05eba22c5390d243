"""The results store: one JSON line per metric, with provenance, in an append-only file.

Every row says what was measured (task, dataset, split, protocol, metric, value), on what
(backbone name and sha256, config hash) and how (git commit, package versions, hardware, wall
time, date). The file is ``<results dir>/results.jsonl``; ``pandas.read_json(path, lines=True)``
reads it as a table.

Crash safety: one ``append`` writes all its rows with a single ``write`` on a file opened in append
mode, then flushes and fsyncs. A crash can leave at most one partial line at the end; readers skip
it (with a warning) and the next append starts on a fresh line, so earlier rows are never lost.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
# The columns every row carries (extra keys are kept too).
COLUMNS = (
    "task", "dataset", "split", "protocol", "metric", "value", "backbone", "backbone_sha256", "config_hash",
    "git_commit", "versions", "hardware", "wall_time_s", "date",
)


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
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
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
            n = torch.cuda.device_count()
            return f"{n} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - provenance must never break a run
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu {platform.machine()} ({cores} cores)"


def provenance() -> dict[str, Any]:
    return {"git_commit": git_commit(), "versions": package_versions(), "hardware": hardware(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _clean(value: Any) -> Any:
    # JSON has no NaN: an undefined metric (e.g. APl without large objects) is stored as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ResultStore:
    """Append-only ``results.jsonl`` in ``root`` (created on the first append)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.path = self.root / RESULTS_FILE

    def append(self, rows: Iterable[dict[str, Any]], **common: Any) -> int:
        """Add ``rows`` (each with at least ``metric`` and ``value``), completed by ``common`` and the
        provenance of this process. Returns the number of rows written."""
        prov = provenance()
        lines = []
        for row in rows:
            full = {**prov, **common, **row}
            if "metric" not in full or "value" not in full:
                raise ValueError(f"a result row needs 'metric' and 'value': {row}")
            lines.append(json.dumps({k: _clean(v) for k, v in full.items()}, sort_keys=False, default=str))
        if not lines:
            return 0
        self.root.mkdir(parents=True, exist_ok=True)
        blob = "\n".join(lines) + "\n"
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    blob = "\n" + blob  # a crash left a partial line: start on a fresh one
            f.write(blob.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        return len(lines)

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
            log.warning("%s: skipped %d unreadable line(s) (an interrupted write); the other rows are intact", self.path, bad)
        return rows

    def find(self, **match: Any) -> list[dict[str, Any]]:
        """Rows whose fields equal every ``match`` value."""
        return [r for r in self.read() if all(r.get(k) == v for k, v in match.items())]

    def has(self, **match: Any) -> bool:
        """Whether any row matches (e.g. task, backbone_sha256 and config_hash of a planned job)."""
        return bool(self.find(**match))


__all__ = ["ResultStore", "RESULTS_FILE", "COLUMNS", "provenance", "git_commit", "package_versions", "hardware"]
