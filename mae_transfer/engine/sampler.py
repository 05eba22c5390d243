"""A resumable, rank-aware sampler whose effective batches do not depend on the process layout."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[int]):
    """Yields this rank's sample indices for one epoch, starting at any micro-batch.

    The epoch's global order is a permutation seeded by ``(seed, epoch)``, cut into blocks of
    ``batch_size``. Block j goes to rank ``j % world_size``, so optimizer step s always sees the
    same samples (blocks ``s * world * accum`` ... ``(s + 1) * world * accum - 1``) whether it is
    computed by one process accumulating gradients or by several processes in parallel. The tail
    that does not fill a whole optimizer step is dropped. ``start_batch`` skips this rank's first
    micro-batches, for resuming mid-epoch exactly where a run stopped.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        accum_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.accum_steps = accum_steps
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch."""
        return (self.num_samples // self.batch_size) // (self.world_size * self.accum_steps)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank runs in one epoch."""
        return self.steps_per_epoch * self.accum_steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self):
        order = self._order()
        b = self.batch_size
        for k in range(self.start_batch, self.batches_per_epoch):
            block = k * self.world_size + self.rank
            yield from order[block * b : (block + 1) * b].tolist()

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch) * self.batch_size


class ShardSampler(Sampler[int]):
    """Every index exactly once over all ranks (no padding), so sharded evaluation is exact."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))
