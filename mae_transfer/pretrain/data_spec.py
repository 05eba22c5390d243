"""What pretraining reads without ``--data``, as a plain record: its built-in toy dataset. The
registry entry (``spec``) and the task code both take it from here: the code cannot import
``spec``, which names the code (no import circles inside a package), so this module, like
``spec``, imports nothing but :mod:`mae_transfer.spec`."""

from __future__ import annotations

from mae_transfer.spec import ToyData

TOY_DATA = ToyData("imagefolder", "mae_transfer.data.toy:write_imagefolder")  # an ImageNet-style folder

__all__ = ["TOY_DATA"]
