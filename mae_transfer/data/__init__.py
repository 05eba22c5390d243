"""Datasets: a robust ImageFolder reader and deterministic toy data in the real on-disk formats.

The names below are imported lazily so that ``mae_transfer.data.toy`` (numpy, PIL, pycocotools)
can be used without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "mae_transfer.data.errors",
    "ImageFolderDataset": "mae_transfer.data.folder",
    "IMG_EXTENSIONS": "mae_transfer.data.folder",
    "load_rgb": "mae_transfer.data.folder",
    "Scene": "mae_transfer.data.toy",
    "ToyInstance": "mae_transfer.data.toy",
    "make_scene": "mae_transfer.data.toy",
    "category_names": "mae_transfer.data.toy",
    "write_imagefolder": "mae_transfer.data.toy",
    "write_coco": "mae_transfer.data.toy",
    "write_ade20k": "mae_transfer.data.toy",
    "write_inat": "mae_transfer.data.toy",
    "write_places": "mae_transfer.data.toy",
    "ensure_toy_dataset": "mae_transfer.data.toy",
    "toy_cache_dir": "mae_transfer.data.toy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
