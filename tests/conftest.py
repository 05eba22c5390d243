"""Shared test helpers: where ../shared is, and small deterministic inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`-n auto`, the README's test command) each worker process gets its share of
# the cores for torch's compute threads, and so do the processes the tests start (torchrun,
# submitit, the CLI): N workers of all-core thread pools on N cores would fight over them.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, _CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker more than the cores. Many tests spend seconds waiting for the processes
    they start (torchrun, bench jobs, the CLI) to import torch; a spare worker keeps the cores busy
    meanwhile (2 cores: 516 s with 2 workers, 491 s with 3)."""
    return _CORES + 1


def shared_root() -> Path:
    """``../shared`` beside the checkout, or ``$MAE_TRANSFER_SHARED``."""
    return Path(os.environ.get("MAE_TRANSFER_SHARED", REPO.parent / "shared"))


@pytest.fixture
def shared() -> Path:
    root = shared_root()
    if not (root / "reference").is_dir():
        pytest.skip(f"shared reference material not found at {root} (set MAE_TRANSFER_SHARED)")
    return root


@pytest.fixture(scope="session")
def _worker_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cache(_worker_cache, monkeypatch):
    """The toy-data and index cache (``$MAE_TRANSFER_CACHE``) of this test process, shared by its
    tests: each toy dataset is written once per test worker instead of once per test (the writers
    are deterministic, keyed by their settings and locked; index caches are keyed by their sources),
    and never in the user's own cache. Tests of the cache itself set their own folder."""
    monkeypatch.setenv("MAE_TRANSFER_CACHE", str(_worker_cache))
    return _worker_cache


def result_rows(run_dir: Path) -> dict[str, float]:
    """``{metric: value}`` of a run directory's ``results.jsonl``."""
    return {r["metric"]: r["value"] for r in map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())}
