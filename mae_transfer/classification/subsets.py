"""Low-label transfer: train on a stratified subset of the labelled training images.

``--label-fraction F`` keeps ``round(F * n_c)`` images of every class ``c`` (at least one), ``--shots K``
keeps ``min(K, n_c)``; the images are drawn per class from a permutation seeded by ``train.seed``, so a
subset is the same on every machine, process and resume, and another seed draws another subset. The
run directory keeps the subset (``label_subset.json``: the rule, the seed, the counts and every image
of it), and the result rows name it in their protocol (``finetune@10%``, ``linprobe@5shot``), so a
low-label number never lands in a full-label column of the paper tables.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from mae_transfer.io import atomic_write_json


def subset_label(fraction: float | None = None, shots: int | None = None) -> str | None:
    """``10%`` / ``0.5%`` / ``5shot`` (the protocol suffix and the tables' name), None for all labels."""
    if shots is not None:
        return f"{int(shots)}shot"
    if fraction is not None and fraction < 1:
        return f"{100 * fraction:g}%"
    return None


def label_subset(
    labels: np.ndarray, fraction: float | None = None, shots: int | None = None, seed: int = 0
) -> np.ndarray:
    """Sorted indices of the stratified subset of samples with ``labels`` (see the module docstring).
    Every class with images keeps at least one; classes are visited in label order, each drawing
    its own permutation from one ``numpy`` generator seeded with ``seed``."""
    labels = np.asarray(labels, dtype=np.int64)
    if (fraction is None) == (shots is None):
        raise ValueError("give a label fraction or a number of shots (one of them)")
    order = np.argsort(labels, kind="stable")  # the samples of each class, in index order
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    rng = np.random.default_rng(int(seed))
    picked = []
    for start, n in zip(starts.tolist(), counts.tolist()):
        members = order[start : start + n]
        keep = min(int(shots), n) if shots is not None else max(1, math.floor(fraction * n + 0.5))
        picked.append(members[rng.permutation(n)[:keep]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


class LabelSubset(Dataset):
    """The samples ``indices`` of ``dataset``, which stays what callers see otherwise: its classes,
    class count and per-epoch seeded augmentation (``set_epoch``; each image keeps the draws of its
    index in the full split)."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, label: str):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.label = label

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def targets(self) -> list[int]:
        full = self.dataset.targets
        return [int(full[i]) for i in self.indices]

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def subset_of(dataset: Dataset, fraction: float | None, shots: int | None, seed: int) -> Dataset:
    """``dataset`` itself for all labels (no fraction below 1, no shots), else its :class:`LabelSubset`."""
    label = subset_label(fraction, shots)
    if label is None:
        return dataset
    return LabelSubset(dataset, label_subset(np.asarray(dataset.targets), fraction, shots, seed), label)


def write_subset(subset: Dataset, path: str | Path, fraction: float | None, shots: int | None, seed: int) -> None:
    """``label_subset.json``: the rule, the seed, the counts and every image of ``subset`` (relative
    to the dataset's root when it has ``samples`` paths)."""
    if not isinstance(subset, LabelSubset):
        return
    full = subset.dataset
    labels = np.asarray(full.targets)
    kept = labels[subset.indices]
    record: dict[str, Any] = {
        "labels": subset.label,
        "label_fraction": fraction,
        "shots": shots,
        "seed": seed,
        "images": int(len(subset.indices)),
        "of_images": int(len(labels)),
        "classes": int(len(np.unique(kept))),
        "of_classes": int(len(np.unique(labels))),
        "indices": subset.indices.tolist(),
    }
    samples, folder = getattr(full, "samples", None), getattr(full, "folder", None)
    if callable(getattr(samples, "path", None)):  # the readers' packed (path, label) index
        files = [samples.path(int(i)) for i in subset.indices]
        record["files"] = [os.path.relpath(f, folder) if folder else f for f in files]
    atomic_write_json(path, record)


__all__ = ["LabelSubset", "label_subset", "subset_label", "subset_of", "write_subset"]
