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
from typing import Any

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


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    """Device that collective tensors must live on: the current GPU for NCCL, the CPU otherwise
    (gloo and MPI always take CPU tensors)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over all processes, on ``t``'s device (``t`` itself alone).
    Exact for integer counts: what sharded metrics add up."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        summed = t.to(comm_device()).clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(t.device)
    return t


def all_gather_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``t`` (same shape everywhere), in rank order, on the collective device."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(comm_device())
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return parts
    return [t]


def all_gather_rows(local: torch.Tensor, counts: list[int], chunk_rows: int, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's rows, rank by rank.

    Args:
        local: (n_r, *S) this rank's rows (CPU); S is the same on every rank.
        counts: n_r of every rank (known to all ranks).
        chunk_rows: rows sent per collective, so device memory holds at most
            ``world x chunk_rows`` rows at a time whatever the dataset size.
        device: the collective's device (the GPU for NCCL).

    Returns:
        (sum n_r, *S) on the CPU. ``all_gather`` needs equal shapes, so each chunk is zero-padded to
        ``chunk_rows`` and the padding is cut off again with the known counts.
    """
    world = len(counts)
    n_max = max(counts)
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, n_max, chunk_rows):
        rows = min(chunk_rows, n_max - start)
        buf = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=device)
        piece = local[start : start + rows]
        buf[: piece.shape[0]] = piece.to(device)
        recv = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(recv, buf)
        for r in range(world):
            valid = max(0, min(rows, counts[r] - start))
            if valid:
                parts[r].append(recv[r][:valid].cpu())
    flat = [p for rank_parts in parts for p in rank_parts]
    if not flat:
        return local.new_zeros((0, *local.shape[1:]))
    return torch.cat(flat)


def convert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with SyncBatchNorm for its BatchNorms when several GPU processes train it (the
    Benchmarking-ViT and mmsegmentation recipes); unchanged otherwise."""
    if torch.cuda.is_available() and world()[1] > 1:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def gather_to_main(obj: Any) -> list:
    """Every process's ``obj`` (picklable), in rank order, on the main process (rank 0) only; ``[]``
    on the others (``[obj]`` alone). Only rank 0 receives and unpickles the N parts: an all-gather
    would give every rank a copy (COCO val2017's 500k detections: 130 MB pickled as dicts).

    With NCCL the objects travel as tensors on ``torch.cuda.current_device()``, which
    :func:`init_distributed` sets to this process's GPU; gloo sends them from the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        main = dist.get_rank() == 0
        parts: list | None = [None] * dist.get_world_size() if main else None
        dist.gather_object(obj, parts, dst=0)
        return parts if main else []
    return [obj]


def broadcast_from_main(obj: Any) -> Any:
    """The main process's (rank 0's) ``obj`` on every process; the others' ``obj`` is ignored
    (``obj`` itself alone). For small things such as a metrics dict."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_gather_list(items: list) -> list:
    """Every process's ``items`` (a short picklable list) concatenated in rank order, on every
    process; ``items`` itself alone."""
    parts = gather_to_main(list(items))
    return broadcast_from_main([x for part in parts for x in part])


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
