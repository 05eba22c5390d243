"""What the ``coco`` task reads, as plain records: its built-in toy dataset and the class count of
the benchmark's data. The task's registry entry (``spec``) and its code both take them from here:
the code cannot import ``spec``, which names the code (no import circles inside a package), so this
module, like ``spec``, imports nothing but :mod:`mae_transfer.spec`."""

from __future__ import annotations

from mae_transfer.spec import ToyData

TOY_DATA = ToyData(
    "coco", "mae_transfer.data.toy:write_coco", full_size="mae_transfer.data.fullsize:write_coco_full_size"
)
NUM_CLASSES = 80  # COCO 2017's categories; data in COCO's layout with another count is other data

__all__ = ["NUM_CLASSES", "TOY_DATA"]
