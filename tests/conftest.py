"""Shared test helpers: where ../shared is, and small deterministic inputs."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
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


def _session_root(tmp_path_factory) -> Path:
    """A folder all test workers of this pytest run share (xdist gives each worker its own
    basetemp, inside one folder of the run)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``build`` filled, built by the first test worker that asks and read by the others.

    Under ``-n auto --dist worksteal`` the tests of one module run on several workers, so a
    module-scoped fixture would be computed once per worker (the detectron2 evaluation of all val
    images, a reference training run: a minute of CPU each time). A build that fails leaves no
    folder behind, and the next worker that asks builds it again (and fails the same way)."""
    root = _session_root(tmp_path_factory) / "built_once"
    root.mkdir(exist_ok=True)
    out = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            try:
                build(out)
            except BaseException:
                shutil.rmtree(out, ignore_errors=True)
                raise
            (root / f"{name}.done").touch()
    return out


@pytest.fixture(scope="session")
def _worker_cache(tmp_path_factory):
    # One cache for all workers: the writers are deterministic and locked per dataset.
    path = _session_root(tmp_path_factory) / "toy-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def cache(_worker_cache, monkeypatch):
    """The toy-data and index cache (``$MAE_TRANSFER_CACHE``) of this pytest run, shared by its
    tests and workers: each toy dataset is written once instead of once per test (the writers
    are deterministic, keyed by their settings and locked; index caches are keyed by their sources),
    and never in the user's own cache. Tests of the cache itself set their own folder."""
    monkeypatch.setenv("MAE_TRANSFER_CACHE", str(_worker_cache))
    return _worker_cache


def result_rows(run_dir: Path) -> dict[str, float]:
    """``{metric: value}`` of a run directory's ``results.jsonl``."""
    return {r["metric"]: r["value"] for r in map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())}
