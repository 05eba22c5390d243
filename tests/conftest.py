"""Shared test helpers: where ../shared is, and small deterministic inputs."""

from __future__ import annotations

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
