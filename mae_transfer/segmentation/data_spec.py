"""What the ``ade20k`` task reads, as plain records: its built-in toy dataset and the class count of
the benchmark's data. The task's registry entry (``spec``) and its code both take them from here:
the code cannot import ``spec``, which names the code (no import circles inside a package), so this
module, like ``spec``, imports nothing but :mod:`mae_transfer.spec`."""

from __future__ import annotations

from mae_transfer.spec import ToyData

TOY_DATA = ToyData(
    "ade20k",
    "mae_transfer.data.toy:write_ade20k",
    subdir="ADEChallengeData2016",  # the folder the official archive unpacks to
    full_size="mae_transfer.data.fullsize:write_ade20k_full_size",
)
NUM_CLASSES = 150
"""SceneParse150 classes; the label maps hold 1..150, with 0 = other/unlabelled."""

__all__ = ["NUM_CLASSES", "TOY_DATA"]
