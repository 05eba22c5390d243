"""Process-group setup for one process, ``torchrun`` (single or multi node) and SLURM ``srun``.

The same command works everywhere: under torchrun the usual RANK/WORLD_SIZE/LOCAL_RANK variables
are set; under ``srun`` without torchrun the SLURM variables are read instead (MASTER_ADDR and
MASTER_PORT must be exported by the batch script). With neither, the run is a single process.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return None


def init_distributed(device: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by the environment; pick this process's device.

    ``device``: "cuda", "cpu" or None (cuda when available). NCCL is used on GPUs, gloo on CPU.
    """
    rank = _env_int("RANK")
    world = _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    if rank is None and _env_int("SLURM_NTASKS") and _env_int("SLURM_NTASKS") > 1:
        rank, world, local_rank = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "running under srun with several tasks but MASTER_ADDR is not set: export MASTER_ADDR "
                "(first node's host name) and MASTER_PORT in the batch script, or launch with torchrun"
            )
    rank, world, local_rank = rank or 0, world or 1, local_rank or 0

    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no GPU is visible; use --device cpu")
    if want_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")

    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if dev.type == "cuda" else None,
        )
        log.info("joined process group: rank %d of %d (%s, %s)", rank, world, backend, dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all processes (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def any_process(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is True on any process (used to stop every rank together)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)
    return flag


def gather_lists(items: list) -> list:
    """Concatenate every process's ``items`` (picklable objects) on every process, rank order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]
    return list(items)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
