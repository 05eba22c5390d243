"""Per-sample seeded augmentation for any dataset whose items are transformed jointly (image + target)."""

from __future__ import annotations

from torch.utils.data import Dataset, get_worker_info

from mae_transfer.data.folder import sample_seeds, seeded_rngs


class SeededTransformDataset(Dataset):
    """Wraps a dataset of ``(image, target)`` items and applies ``transform(image, target)`` with
    per-sample seeded random draws (seed, epoch, index), so augmentation is the same whatever the
    workers, processes or resume point.

    ``prepare(target)`` runs first (e.g. dropping crowd regions). ``set_epoch`` selects the epoch's
    draws (the engine calls it before each epoch; the value is shared with the workers, since they
    are started per epoch).
    """

    def __init__(self, dataset: Dataset, transform, seed: int = 0, prepare=None):
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.prepare = prepare
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        if self.prepare is not None:
            target = self.prepare(target)
        seed, _ = sample_seeds(self.seed, self.epoch, index)
        with seeded_rngs(seed, restore=get_worker_info() is None):
            return self.transform(image, target)

    def __getattr__(self, name: str):
        # Dataset attributes (class_names, coco, ...) pass through to the wrapped dataset.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


__all__ = ["SeededTransformDataset"]
