"""The classification datasets (``--dataset``), as plain records: each one's built-in toy dataset and
the class count of its official release. The tasks' registry entries (``spec``) and the dataset
code both take them from here: the code cannot import ``spec``, which names the code (no import
circles inside a package), so this module, like ``spec``, imports nothing but :mod:`mae_transfer.spec`."""

from __future__ import annotations

from mae_transfer.spec import ToyData

_INAT_CLASSES = {2017: 5089, 2018: 8142, 2019: 1010}
_PLACES_CLASSES = {205: 205, 365: 365}
# `toy-data --full-size` (the official counts, to rehearse index time and memory) has one release of each.
_FULL_SIZE = {
    "inat2018": "mae_transfer.data.fullsize:write_inat2018_full_size",
    "places365": "mae_transfer.data.fullsize:write_places365_full_size",
}

# Dataset kind -> its toy dataset (of the same name) and the class count of the real data; data in
# a benchmark's layout with another count is other data, and its result rows say so.
TOY_DATA: dict[str, ToyData] = {
    "imagefolder": ToyData("imagefolder", "mae_transfer.data.toy:write_imagefolder"),  # an ImageNet-style folder
    **{
        f"inat{y}": ToyData(
            f"inat{y}", "mae_transfer.data.toy:write_inat", {"year": y}, full_size=_FULL_SIZE.get(f"inat{y}")
        )
        for y in _INAT_CLASSES
    },
    **{
        f"places{v}": ToyData(
            f"places{v}", "mae_transfer.data.toy:write_places", {"version": v}, full_size=_FULL_SIZE.get(f"places{v}")
        )
        for v in _PLACES_CLASSES
    },
}
NUM_CLASSES: dict[str, int] = {
    "imagefolder": 1000,  # ImageNet-1k
    **{f"inat{y}": n for y, n in _INAT_CLASSES.items()},
    **{f"places{v}": n for v, n in _PLACES_CLASSES.items()},
}

__all__ = ["NUM_CLASSES", "TOY_DATA"]
