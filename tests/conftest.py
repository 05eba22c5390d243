"""Shared test helpers: where ../shared is, and small deterministic inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    """``../shared`` beside the checkout, or ``$MAE_TRANSFER_SHARED``."""
    return Path(os.environ.get("MAE_TRANSFER_SHARED", REPO.parent / "shared"))


@pytest.fixture
def shared() -> Path:
    root = shared_root()
    if not (root / "reference").is_dir():
        pytest.skip(f"shared reference material not found at {root} (set MAE_TRANSFER_SHARED)")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private toy-data cache for the test (``$MAE_TRANSFER_CACHE``)."""
    monkeypatch.setenv("MAE_TRANSFER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def result_rows(run_dir: Path) -> dict[str, float]:
    """``{metric: value}`` of a run directory's ``results.jsonl``."""
    return {r["metric"]: r["value"] for r in map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())}
