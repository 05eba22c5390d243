"""The one training loop every task uses.

A task supplies its model, its training data and the loss of a batch (:class:`TrainTask`); the
engine does everything else: devices and DDP under torchrun, mixed precision, gradient
accumulation to a target effective batch, clipping, the per-step lr schedule, AdamW with
layer-wise lr decay groups, atomic checkpoints and automatic resume (also after SIGKILL), graceful
stop on SIGTERM/SIGINT and on the preemption notices of SLURM (SIGUSR1/SIGUSR2, optionally followed
by ``scontrol requeue``), a progress bar with throughput and ETA, and metric files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from mae_transfer.checkpoint import CheckpointError, atomic_save, load_safely
from mae_transfer.config import ConfigError, save_config, to_dict
from mae_transfer.data.index import freeze_heap_for_workers
from mae_transfer.engine.distributed import DistInfo, all_reduce_mean, any_process
from mae_transfer.engine.logger import MetricWriter
from mae_transfer.engine.optim import Schedule, build_optimizer, param_groups
from mae_transfer.engine.precision import autocast_context, resolve_precision
from mae_transfer.engine.sampler import EpochBatchSampler

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint-last.pth"

# Signals that stop a run cleanly (save checkpoint-last.pth at the next step, then stop). SIGUSR1 and
# SIGUSR2 are what SLURM sends ahead of a time limit or preemption (``#SBATCH --signal=USR1@90``;
# submitit's default is USR2): a notice that the job will be killed soon, not a request from a user.
PREEMPTION_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None)) if s is not None
)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, *PREEMPTION_SIGNALS)
# ``MAE_TRANSFER_REQUEUE=1`` in a hand-written SLURM batch script: after a preemption notice
# (SIGUSR1/SIGUSR2) the main process saves and then runs ``scontrol requeue $SLURM_JOB_ID``, so the
# job comes back and resumes from the checkpoint. (Jobs of ``bench --launcher slurm`` are requeued
# by submitit instead.)
REQUEUE_ENV = "MAE_TRANSFER_REQUEUE"


@dataclass
class OptimConfig:
    """Optimizer and lr schedule. The peak lr is ``lr`` if given, else ``blr * batch / 256``."""

    optimizer: Literal["adamw", "lars", "sgd"] = "adamw"
    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9  # lars / sgd
    layer_decay: float = 1.0
    clip_grad: float | None = None
    schedule: Literal["cosine", "step", "poly", "constant"] = "cosine"
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    warmup_start_factor: float = 0.0  # warmup starts at this fraction of the lr (ViTDet: 0.001)
    milestones: tuple[float, ...] = ()  # fractions of training for the "step" schedule
    poly_power: float = 1.0

    def validate(self) -> None:
        if self.blr <= 0 and self.lr is None:
            raise ConfigError("optim.blr must be positive")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError("optim.lr must be positive")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError("optim.clip_grad must be positive (or null for no clipping)")


@dataclass
class TrainConfig:
    """What the engine needs to run a task; per-process ``batch_size``, global ``effective_batch_size``."""

    epochs: int = 800
    batch_size: int = 64
    effective_batch_size: int | None = None  # None = batch_size x processes (no accumulation)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"
    num_workers: int | None = None  # None: a share of the cores (default_num_workers)
    seed: int = 0
    log_every: int = 20
    ckpt_every_minutes: float = 10.0
    save_every_epochs: int = 0  # also keep checkpoint-epochN.pth every N epochs (0 = never)
    max_steps: int | None = None  # stop early (demos, tests); the schedule still spans all epochs
    compile: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.epochs <= 0:
            raise ConfigError("train.epochs must be positive")
        if self.batch_size <= 0:
            raise ConfigError("train.batch_size must be positive")
        if self.effective_batch_size is not None and self.effective_batch_size <= 0:
            raise ConfigError("train.effective_batch_size must be positive")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError("train.num_workers must be 0 (load in the main process) or more, or null for the default")
        if self.max_steps is not None and self.max_steps < 1:  # 0 or less would record an untrained model
            raise ConfigError(
                f"train.max_steps must be at least 1, got {self.max_steps}; leave it out (null) for the whole schedule"
            )


class TrainTask:
    """The interface between a task package and the engine. Subclass and fill in the first four."""

    name = "task"
    # How the DataLoader batches samples (None: torch's default_collate); detection returns lists.
    collate_fn = None
    # --eval-only --weights: the weights evaluated (path, sha256, format, saved config), which the
    # result rows name instead of a backbone (``engine.results.row_identity``).
    evaluated: dict | None = None

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_train_dataset(self) -> Dataset:
        raise NotImplementedError

    def training_step(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch (scalar) and extra scalar metrics to log."""
        raise NotImplementedError

    def signature(self) -> dict[str, Any]:
        """What identifies the model architecture; resuming from a checkpoint with another fails."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        return param_groups(model, optim.weight_decay, optim.layer_decay)

    def compile_targets(self, model: nn.Module) -> list[nn.Module] | None:
        """What ``train.compile`` compiles: None (default) for the whole model; or submodules to
        compile in place (``nn.Module.compile``, parameter names unchanged), for models whose other
        parts have data-dependent shapes that would break the graph (Mask R-CNN's heads)."""
        return None

    def check_data(self, trainer: "Trainer") -> None:
        """Called on every process once the model and the training data are built, before the
        first training step (not when the run is already complete): find what would otherwise stop
        the run late, e.g. unreadable files of the evaluation split (each process may check its
        share and gather the findings). Raise a ``DataError`` to stop before training."""

    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None:
        """Called on every process after each full epoch (pictures), before the epoch's evaluation."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """Called on every process after the last step (exports), before the final evaluation."""

    # Evaluation (tasks that evaluate). The policy is the engine's (Trainer's evaluation hook): every
    # ``eval_every()`` epochs an evaluation whose metrics go to the "eval" stream, and after the last
    # step the trained model saved (``save_trained``) and the final evaluation published
    # (``publish``). A task supplies ``evaluate`` (and ``publish``); the rest is optional.
    def eval_every(self) -> int:
        """Evaluate after every this many epochs during training (0: only after the last step)."""
        return 0

    def save_trained(self, model: nn.Module, out_dir: Path, step: int) -> None:
        """Main process, after the last step and before the final evaluation: the trained model
        (e.g. ``detector.pth``, which ``--eval-only --weights`` reads back)."""

    def eval_record(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The scalars of ``metrics`` that go to the "eval" stream (train-curve plots, TensorBoard)."""
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def on_eval(self, trainer: "Trainer", metrics: dict[str, Any], epoch: int, final: bool) -> None:
        """Every process, after each evaluation during training (metrics complete on the main one)."""

    def eval_precision(self) -> str | None:
        """The precision evaluation runs in (None: the training precision). Detection and
        segmentation evaluate in fp32 unless told otherwise, as their reference code does."""
        return None

    def evaluate(self, model: nn.Module, ctx: "EvalContext") -> dict[str, Any]:
        """Metrics of ``model`` on the evaluation split, computed on every process (each evaluates
        its shard: ``ctx.loader``, then ``ctx.all_sum`` or a gather); the returned metrics are
        complete on the main process."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate")

    def publish(self, model: nn.Module, ctx: "EvalContext", metrics: dict[str, Any], step: int) -> None:
        """Main process, after a final evaluation: the run's ``results.jsonl`` and pictures."""


@dataclass
class EvalContext:
    """What an evaluation runs with, set up once by :meth:`Trainer.evaluate`: the device, the
    autocast of the evaluation precision, the processes, DataLoader workers and the run directory."""

    device: torch.device
    precision: str
    dist: DistInfo
    num_workers: int
    output_dir: Path | None

    @classmethod
    def for_process(cls, dist: DistInfo, precision: str = "fp32", output_dir: Path | None = None) -> "EvalContext":
        """The context of an evaluation outside training (frozen features): this process's device,
        the precision resolved for it and the engine's DataLoader workers."""
        dev = dist.device
        return cls(dev, resolve_precision(precision, dev), dist, default_num_workers(None, dev), output_dir)

    def autocast(self):
        return autocast_context(self.precision, self.device)

    def all_sum(self, *values: float) -> list[float]:
        """``values`` summed over all processes (counts of a sharded evaluation: hits, totals ...);
        the values themselves on one process."""
        if self.dist.world_size <= 1:
            return [float(v) for v in values]
        import torch.distributed as tdist

        dev = self.device if tdist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
        tdist.all_reduce(t)
        return t.tolist()

    def loader(self, dataset: Dataset, batch_size: int, collate_fn: Any = None) -> DataLoader:
        """This process's shard of ``dataset`` (contiguous, no padding: every sample once over all
        processes), in order, with this machine's workers."""
        from mae_transfer.engine.sampler import ShardSampler

        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=ShardSampler(len(dataset), self.dist.rank, self.dist.world_size),
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
        )


class TrainingInterrupted(Exception):
    """Raised after a stop signal (SIGTERM/SIGINT/SIGUSR1/SIGUSR2) once the state has been saved; the
    run can be resumed (the CLI exits with 143)."""


def default_num_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader workers: ``requested`` if set, else a share of this machine's cores.

    On a GPU the model runs on the device, so each GPU's share of the cores, less one for its
    process, decodes and augments (at most 10). On a CPU the model's own threads
    (``torch.get_num_threads()``) already use the cores; workers get only the cores left over (at
    most 2), because a worker that competes with the compute threads slows both: on 2 cores, the toy
    fine-tuning and Mask R-CNN runs took 1.4-1.5x longer with one worker than with none, with the
    same results (per-sample seeded augmentation does not depend on the workers).
    """
    if requested is not None:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        per_gpu = max(1, cpus // max(1, torch.cuda.device_count()))
        return min(10, per_gpu - 1 if per_gpu > 1 else 1)
    return min(2, max(0, cpus - torch.get_num_threads()))


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave the stop signals (SIGTERM/SIGINT/SIGUSR1/SIGUSR2) to the main
    process, which stops cleanly and saves.

    Schedulers (SLURM, Kubernetes, ``kill -- -PGID``, Ctrl-C) signal every process of the job; a
    worker that died of it (SIGUSR1/2 kill by default too) would make the main process fail with
    "DataLoader worker killed" before it could save. Workers still exit when the main process does
    (they watch their parent).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class _StopSignals:
    """Turns the stop signals into a flag checked between optimizer steps.

    A second SIGTERM/SIGINT kills, unless it comes within ``DUPLICATE_S`` of the first: a signal to a
    whole process group or job reaches a worker twice at once (directly, and forwarded by
    torchrun's agent), and only a later one is a user who insists. Preemption notices (SIGUSR1/2)
    never kill: the scheduler sends SIGKILL itself when its grace time is over.
    """

    DUPLICATE_S = 1.0

    def __init__(self):
        self.requested: str | None = None
        self._at = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def preempted(self) -> bool:
        """The stop is a scheduler's preemption / time-limit notice (SIGUSR1 or SIGUSR2)."""
        return self.requested in {s.name for s in PREEMPTION_SIGNALS}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested, self._at = name, time.monotonic()
            return
        user_stop = ("SIGTERM", "SIGINT")
        if name in user_stop and self.requested in user_stop and time.monotonic() - self._at > self.DUPLICATE_S:
            # A second stop from the user: give up on the graceful path.
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def requeue_slurm_job() -> str | None:
    """``scontrol requeue`` this SLURM job if ``MAE_TRANSFER_REQUEUE=1`` asks for it (hand-written
    batch scripts; call after the checkpoint is saved, on the main process). Returns the job id
    when it was requeued; otherwise None, with one log line saying why when it was asked for."""
    if os.environ.get(REQUEUE_ENV, "").strip().lower() not in ("1", "true", "yes"):
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("%s=1 but this is not a SLURM job (no SLURM_JOB_ID): nothing to requeue", REQUEUE_ENV)
        return None
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning(
            "%s=1 but scontrol is not on PATH: SLURM job %s is not requeued (resubmit it to resume)", REQUEUE_ENV, job
        )
        return None
    try:
        r = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("scontrol requeue %s failed: %s (resubmit the job to resume)", job, e)
        return None
    if r.returncode != 0:
        log.warning(
            "scontrol requeue %s failed (exit %d): %s (resubmit the job to resume)",
            job,
            r.returncode,
            (r.stderr or r.stdout).strip()[-300:],
        )
        return None
    log.info("requeued SLURM job %s (scontrol requeue)", job)
    return job


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def batch_layout(batch_size: int, effective_batch_size: int | None, world: int) -> tuple[int, int]:
    """(samples per process per forward, gradient accumulation steps) for an effective batch.

    ``train.batch_size`` is the most one process holds at once; ``effective_batch_size`` (the batch
    of an optimizer step, which sets the lr) is kept whenever the processes can share it evenly:
    each takes the largest share that divides it and accumulates gradients over the rest. So a
    toy or 1-GPU recipe keeps its batch and lr on 4 or 8 processes (each process holds less), and a
    batch of 96 per GPU under an effective 4096 on 8 GPUs runs 64 x 8 accumulation steps. When no
    such share exists (the effective batch is not a multiple of the processes, or only shares under
    half of ``batch_size`` divide it while ``batch_size x processes`` fits in it) the nearest
    multiple of ``batch_size x processes`` is used, and the trainer says so."""
    target = effective_batch_size or batch_size * world
    if target % world == 0:
        must_shrink = batch_size * world > target
        for share in range(min(batch_size, target // world), 0, -1):
            if (target // world) % share == 0:
                if must_shrink or 2 * share >= batch_size:
                    return share, target // (share * world)
                break
    return batch_size, max(1, round(target / (batch_size * world)))


def schedule_changes(state: dict, schedule: Schedule, effective_batch_size: int, steps_per_epoch: int) -> str:
    """What a resumed run changes of the lr schedule a checkpoint was trained with (epochs, warmup,
    peak and final lr, kind, effective batch), as ``"what old -> new"`` items; "" when nothing.

    Resuming with another ``train.epochs`` (to train longer, say) is allowed: the run goes on under
    the new schedule from the checkpoint's step, which the trainer says in one warning line."""
    old = state.get("schedule") if isinstance(state.get("schedule"), dict) else {}
    new = dataclasses.asdict(schedule)
    old_spe = state.get("steps_per_epoch") or steps_per_epoch
    items = []
    if old.get("total_steps") not in (None, new["total_steps"]):
        items.append(
            f"train.epochs {old['total_steps'] / old_spe:g} -> {new['total_steps'] / steps_per_epoch:g} "
            f"({old['total_steps']} -> {new['total_steps']} steps)"
        )
    for key, name in (
        ("warmup_steps", "warmup steps"),
        ("peak_lr", "peak lr"),
        ("min_lr", "min lr"),
        ("kind", "schedule"),
    ):
        a, b = old.get(key), new[key]
        if a is not None and (
            a != b if not isinstance(b, float) else not math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
        ):
            items.append(f"{name} {a:.4g} -> {b:.4g}" if isinstance(b, float) else f"{name} {a} -> {b}")
    if state.get("effective_batch_size") not in (None, effective_batch_size):
        items.append(f"effective batch {state['effective_batch_size']} -> {effective_batch_size}")
    if not items:
        return ""
    step = int(state.get("step", 0))
    known = {f.name for f in dataclasses.fields(Schedule)}
    try:
        was = f" instead of {Schedule(**{k: v for k, v in old.items() if k in known}).lr(step):.3g}"
    except (TypeError, ValueError):  # a checkpoint that kept no (or an older) schedule record
        was = ""
    return (
        ", ".join(items) + f"; from step {step} on the lr follows the new schedule ({schedule.lr(step):.3g} there{was})"
    )


class Trainer:
    """Runs ``task`` with ``train``/``optim`` settings in ``output_dir`` (resuming if it holds a run).

    ``config`` is the task's full resolved config; it is saved as ``config.yaml`` and inside every
    checkpoint. ``resume``: "auto" (continue the run in ``output_dir`` if any), "never" (refuse to
    start over a finished or partial run) or a checkpoint path.
    """

    def __init__(
        self,
        task: TrainTask,
        train: TrainConfig,
        optim: OptimConfig,
        output_dir: str | Path,
        dist_info: DistInfo,
        config: Any = None,
        resume: str = "auto",
    ):
        self.task = task
        self.train_cfg = train
        self.optim_cfg = optim
        self.output_dir = Path(output_dir)
        self.dist = dist_info
        self.config = config
        self.resume = resume
        self.device = dist_info.device
        self.precision = resolve_precision(train.precision, self.device)
        self.step = 0
        self.model: nn.Module | None = None
        self.metrics = MetricWriter(self.output_dir, enabled=dist_info.is_main)
        self._last_ckpt_time = time.monotonic()

    # ------------------------------------------------------------------ helpers
    @property
    def unwrapped(self) -> nn.Module:
        m = self.model
        m = getattr(m, "_orig_mod", m)  # torch.compile
        return m.module if isinstance(m, DistributedDataParallel) else m

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    def autocast(self):
        return autocast_context(self.precision, self.device)

    def num_workers(self) -> int:
        """DataLoader workers: ``train.num_workers`` or a share of this machine's cores."""
        return default_num_workers(self.train_cfg.num_workers, self.device)

    def check_split(self, find, size: int, split: str, what: str, full_check: str) -> list[tuple[int, str]] | None:
        """For :meth:`TrainTask.check_data`: run ``find(rank, world_size, threads)`` (a dataset's
        ``[(index, problem), ...]`` over its items ``rank::world_size``) on every process and gather
        the findings, sorted, on every process; None (nothing checked, said in the log) when the
        split has more than ``UP_FRONT_CHECK_MAX`` items, which are then checked as they are read.
        ``what`` names what is checked in the log line, ``full_check`` the command that checks all."""
        from mae_transfer.data.folder import UP_FRONT_CHECK_MAX
        from mae_transfer.engine.distributed import all_gather_list

        if size > UP_FRONT_CHECK_MAX:
            log.info(
                "%s has %d items, more than the %d checked before training: they are checked as they are read "
                "(%s checks them all now)",
                split,
                size,
                UP_FRONT_CHECK_MAX,
                full_check,
            )
            return None
        start = time.monotonic()
        problems = sorted(all_gather_list(find(self.dist.rank, self.dist.world_size, max(1, self.num_workers()))))
        log.info(
            "checked the %d %s of %s in %.1f s: %d with problems",
            size,
            what,
            split,
            time.monotonic() - start,
            len(problems),
        )
        return problems

    def evaluate(self, model: nn.Module | None = None, final: bool = False) -> dict[str, Any]:
        """Evaluate ``model`` (default: the model being trained) with the task's evaluation, on
        every process: in the task's evaluation precision, with this machine's workers, each
        process on its shard of the split. The metrics (complete on the main process) become the
        task's ``last_eval``; with ``final``, the main process also writes the run's results and
        pictures (``task.publish``). The one entry for training-time and ``--eval-only`` evaluation."""
        model = self.unwrapped if model is None else model.to(self.device)
        precision = resolve_precision(self.task.eval_precision() or self.train_cfg.precision, self.device)
        ctx = EvalContext(self.device, precision, self.dist, self.num_workers(), self.output_dir)
        was_training = model.training
        model.eval()
        try:
            metrics = self.task.evaluate(model, ctx)
        finally:
            model.train(was_training)
        self.task.last_eval = metrics
        if final and self.dist.is_main:
            self.task.publish(model, ctx, metrics, self.step if self.model is not None else -1)
        return metrics

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "format": "mae_transfer.train_checkpoint",
            "version": 1,
            "task": self.task.name,
            "signature": self.task.signature(),
            "model": self.unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            # The schedule is a pure function of the step; its parameters are kept for the record.
            "schedule": dataclasses.asdict(self.schedule),
            "step": self.step,
            "epoch": epoch,
            # The loss of train.csv is the mean over log_every steps: the part of that window done at
            # this step, so that a resumed run logs the same means as an uninterrupted one.
            "loss_window": self._loss_window() if hasattr(self, "_loss_window") else None,
            "effective_batch_size": self.effective_batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "config": to_dict(self.config) if self.config is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        }

    def epoch_position(self) -> str:
        """Where the current step is, in the 1-based epochs the progress bar and the logs show
        (``"end of epoch 3"``, ``"epoch 4, step 10 of 72"``); checkpoints keep 0-based fields."""
        if self.step == 0:
            return "before the first step"
        done, into = divmod(self.step, self.steps_per_epoch)
        return f"end of epoch {done}" if into == 0 else f"epoch {done + 1}, step {into} of {self.steps_per_epoch}"

    def save_checkpoint(self, epoch: int, extra_name: str | None = None) -> None:
        """Write ``checkpoint-last.pth`` atomically (main process only). Weights that hold NaN or
        inf are never saved over the last good checkpoint: :class:`FloatingPointError` instead."""
        self._check_finite_weights()
        if self.dist.is_main:
            state = self._state(epoch)
            atomic_save(state, self.checkpoint_path)
            if extra_name:
                atomic_save(state, self.output_dir / extra_name)
            log.info("saved checkpoint at step %d (%s) to %s", self.step, self.epoch_position(), self.checkpoint_path)
        self._saved_step = self.step
        self._last_ckpt_time = time.monotonic()

    def _check_finite_weights(self) -> None:
        """Raise :class:`FloatingPointError` when a parameter holds NaN or inf (one device sync). The
        loss is only checked at logging steps, so an update after the last one (or a learning rate
        that is itself inf) can leave diverged weights that would otherwise be saved and exported.
        Once per step: the epoch end and the checkpoint saved right after it share one check."""
        if getattr(self, "_finite_at_step", None) == self.step:
            return
        params = [p for p in self.unwrapped.parameters() if p.is_floating_point()]
        if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            self._finite_at_step = self.step
            return
        bad = [
            n
            for n, p in self.unwrapped.named_parameters()
            if p.is_floating_point() and not bool(torch.isfinite(p).all())
        ]
        raise FloatingPointError(
            f"the weights became NaN or inf at step {self.step} ({len(bad)} tensors, e.g. {bad[0]}); "
            f"{self._divergence_advice()}"
        )

    def _divergence_advice(self) -> str:
        """What a diverged run leaves and what to change: the checkpoint only if there is one, and
        only the remedies that apply to this run (lr, fp32 under mixed precision, gradient clipping)."""
        ocfg = self.optim_cfg
        peak = getattr(self, "peak_lr", None)
        saved = getattr(self, "_saved_step", None)
        if self.checkpoint_path.is_file():
            at = f" (step {saved})" if saved is not None else ""
            kept = (
                f"the last good checkpoint {self.checkpoint_path}{at} is kept as it was; "
                "after a change below, the same command resumes from it"
            )
        else:
            kept = f"no checkpoint was saved yet in {self.output_dir}"
        if peak is not None and not math.isfinite(peak):
            return f"{kept}. The peak learning rate is {peak}: give a finite --lr (or --blr)"
        if ocfg.lr is not None:
            flag = f"--lr, now {ocfg.lr:.3g}"
        elif ocfg.blr is not None and peak is not None:
            flag = f"--blr, now {ocfg.blr:.3g}, i.e. peak lr {peak:.3g}"
        else:
            flag = "--lr or --blr"
        fixes = [f"lower the learning rate ({flag})"]
        if self.precision in ("fp16", "bf16"):
            fixes.append(f"train in fp32 (train.precision=fp32; this run is {self.precision})")
        if ocfg.clip_grad is None:
            fixes.append("clip gradients (optim.clip_grad=1.0)")
        return f"{kept}. Try: {'; or '.join(fixes)}"

    def _load_resume(self) -> dict[str, Any] | None:
        if self.resume not in ("auto", "never"):  # --resume PATH: a checkpoint file or a run directory
            path = Path(self.resume)
            if path.is_dir():
                path = path / CHECKPOINT_NAME
            if not path.is_file():
                raise CheckpointError(
                    f"--resume {self.resume}: no training checkpoint there "
                    f"(give a {CHECKPOINT_NAME} or its run directory)"
                )
        else:
            path = self.checkpoint_path
            if not path.exists():
                return None
            if self.resume == "never":
                raise CheckpointError(
                    f"{self.output_dir} already holds a run ({path.name}); choose another --output, "
                    "or leave out --no-resume to continue it"
                )
        state = load_safely(path, "checkpoint")  # ours hold tensors, numbers, strings and containers only
        self._resume_path = path
        if not isinstance(state, dict) or state.get("format") != "mae_transfer.train_checkpoint":
            raise CheckpointError(
                f"{path} is not a training checkpoint of this toolkit (to start from pretrained weights "
                "use the task's --backbone/--init option instead)"
            )
        want = self.task.signature()
        have = state.get("signature")
        if state.get("task") != self.task.name or have != want:
            diff = [k for k in sorted(set(want) | set(have or {})) if (have or {}).get(k) != want.get(k)]
            details = ", ".join(
                f"{k}: checkpoint {(have or {}).get(k)!r} vs. this run {want.get(k)!r}" for k in diff[:4]
            )
            raise CheckpointError(
                f"{path} was written by a different model ({state.get('task')}; {details}); "
                "use another --output for this run, or the same model settings to resume that one"
            )
        return state

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to the end (or to ``max_steps``); returns a summary dict."""
        cfg, ocfg, dist = self.train_cfg, self.optim_cfg, self.dist
        torch.manual_seed(cfg.seed + dist.rank)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        if dist.is_main:
            # Temporary files of a write that was killed (SIGKILL) are never a checkpoint.
            for stale in self.output_dir.glob(".checkpoint-*.tmp"):
                stale.unlink(missing_ok=True)
        resume_state = self._load_resume()
        model = self.task.build_model().to(self.device)
        dataset = self.task.build_train_dataset()

        world = dist.world_size
        self.batch_size, self.accum_steps = batch_layout(cfg.batch_size, cfg.effective_batch_size, world)
        target = cfg.effective_batch_size or cfg.batch_size * world
        self.effective_batch_size = self.batch_size * world * self.accum_steps
        if self.batch_size != cfg.batch_size and self.effective_batch_size == target:
            log.info(
                "effective batch %d over %d processes: %d samples per process (train.batch_size %d would make %d)",
                target,
                world,
                self.batch_size,
                cfg.batch_size,
                cfg.batch_size * world,
            )
        elif self.effective_batch_size != target:
            log.warning(
                "effective batch %d is not a multiple of batch_size %d x %d processes; using %d "
                "(gradient accumulation %d)",
                target,
                self.batch_size,
                world,
                self.effective_batch_size,
                self.accum_steps,
            )
        sampler = EpochBatchSampler(len(dataset), self.batch_size, world, dist.rank, self.accum_steps, cfg.seed)
        self.steps_per_epoch = sampler.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set has {len(dataset)} samples, fewer than one effective batch of "
                f"{self.effective_batch_size}: lower train.batch_size / train.effective_batch_size"
            )
        total_steps = cfg.epochs * self.steps_per_epoch
        last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
        self.peak_lr = ocfg.lr if ocfg.lr is not None else ocfg.blr * self.effective_batch_size / 256
        warmup = (
            ocfg.warmup_steps if ocfg.warmup_steps is not None else round(ocfg.warmup_epochs * self.steps_per_epoch)
        )
        schedule = Schedule(
            total_steps=total_steps,
            warmup_steps=min(warmup, total_steps),
            warmup_start_factor=ocfg.warmup_start_factor,
            kind=ocfg.schedule,
            peak_lr=self.peak_lr,
            min_lr=ocfg.min_lr,
            milestones=tuple(int(m * total_steps) for m in ocfg.milestones),
            power=ocfg.poly_power,
        )
        self.schedule = schedule
        if warmup > 0 and warmup >= total_steps:
            log.warning(
                "the warmup (%d steps, optim.warmup_%s %g) is not shorter than the run (%d steps, train.epochs %d): "
                "the lr rises the whole run, never reaches its peak %.3g and never decays; "
                "lower the warmup or raise train.epochs",
                warmup,
                *(("steps", ocfg.warmup_steps) if ocfg.warmup_steps is not None else ("epochs", ocfg.warmup_epochs)),
                total_steps,
                cfg.epochs,
                self.peak_lr,
            )
        self.optimizer = build_optimizer(
            ocfg.optimizer,
            self.task.param_groups(model, ocfg),
            self.peak_lr,
            tuple(ocfg.betas),
            self.device,
            ocfg.momentum,
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

        if resume_state is not None:
            try:
                model.load_state_dict(resume_state["model"])
                self.optimizer.load_state_dict(resume_state["optimizer"])
            except (RuntimeError, ValueError) as e:
                raise CheckpointError(f"cannot resume from {self.checkpoint_path}: {e}") from None
            if self.scaler is not None and resume_state.get("scaler"):
                self.scaler.load_state_dict(resume_state["scaler"])
            self.step = int(resume_state["step"])
            self._saved_step = self.step if self._resume_path == self.checkpoint_path else None
            self._resume_rng = resume_state.get("rng")
            changed = schedule_changes(resume_state, schedule, self.effective_batch_size, self.steps_per_epoch)
            if changed:
                log.warning("resuming with another schedule than the checkpoint's: %s", changed)
            self._resume_window = resume_state.get("loss_window")
            log.info("resuming from %s at step %d of %d", self._resume_path, self.step, total_steps)
            self.metrics.truncate_after(self.step)
        del resume_state

        self.model = model
        parts = self.task.compile_targets(model) if cfg.compile else None
        for part in parts or ():
            part.compile()
        if world > 1:
            self.model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.compile and parts is None:
            self.model = torch.compile(self.model)
        self.dataset = dataset

        derived = {
            "peak_lr": self.peak_lr,
            "effective_batch_size": self.effective_batch_size,
            "batch_size_per_process": self.batch_size,
            "accum_steps": self.accum_steps,
            "world_size": world,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": total_steps,
            "warmup_steps": schedule.warmup_steps,
            "precision": self.precision,
            "device": str(self.device),
            "train_samples": len(dataset),
        }
        if dist.is_main:
            save_config(self.config if self.config is not None else {}, self.output_dir / "config.yaml", derived)
        log.info(
            "%s: %d samples, %d steps/epoch x %d epochs, effective batch %d (%d x %d processes x %d accumulation), "
            "peak lr %.3g, %s on %s",
            self.task.name,
            len(dataset),
            self.steps_per_epoch,
            cfg.epochs,
            self.effective_batch_size,
            self.batch_size,
            world,
            self.accum_steps,
            self.peak_lr,
            self.precision,
            self.device,
        )
        if self.step >= last_step:
            log.info("nothing to do: the run in %s is at step %d of %d", self.output_dir, self.step, last_step)
            self._end_training()
            return {"step": self.step, "total_steps": total_steps, "finished": True}

        self.task.check_data(self)
        if (getattr(self, "_resume_window", None) or {}).get("count"):
            # The checkpoint's step ended a loss window early (max_steps, a stop): that window goes
            # on, so its provisional row is replaced by the full one at the next logging step.
            self.metrics.truncate_after(self.step - 1, names=("train",))
        self._restore_rng(getattr(self, "_resume_rng", None))
        try:
            summary = self._loop(sampler, schedule, total_steps, last_step)
        finally:
            if getattr(self, "_progress", None) is not None:
                self._progress.close()  # an error message printed next starts on its own line
        self.metrics.close()
        return summary

    def _loop(self, sampler: EpochBatchSampler, schedule: Schedule, total_steps: int, last_step: int) -> dict[str, Any]:
        cfg, dist = self.train_cfg, self.dist
        model = self.model
        ddp = isinstance(getattr(model, "_orig_mod", model), DistributedDataParallel)
        progress = None
        if dist.is_main and cfg.progress:
            from tqdm.auto import tqdm

            progress = self._progress = tqdm(
                total=last_step,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
                leave=True,
            )
        t_start = time.monotonic()
        start_step = self.step
        window_t, window_steps = time.monotonic(), 0
        restored = getattr(self, "_resume_window", None) or {}
        sums: dict[str, torch.Tensor] = {k: torch.tensor(float(v)) for k, v in (restored.get("sums") or {}).items()}
        count = int(restored.get("count") or 0)
        # What a checkpoint saves of the window: the loop's current ``sums`` and ``count`` (read through
        # the closure, so every save sees the values of that moment). Only the main process's
        # window is saved; after a resume every process continues from it.
        self._loss_window = lambda: {"sums": {k: float(v) for k, v in sums.items()}, "count": count}
        lr = schedule.lr(self.step)
        epoch = self.step // self.steps_per_epoch

        with _StopSignals() as stop:
            while self.step < last_step:
                epoch = self.step // self.steps_per_epoch
                start_batch = (self.step % self.steps_per_epoch) * self.accum_steps
                sampler.set_epoch(epoch, start_batch)
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(epoch)
                if self.num_workers():
                    freeze_heap_for_workers()  # workers fork next: keep their GC off our objects
                loader = DataLoader(
                    self.dataset,
                    batch_size=self.batch_size,
                    sampler=sampler,
                    num_workers=self.num_workers(),
                    collate_fn=self.task.collate_fn,
                    worker_init_fn=_ignore_stop_signals,
                    pin_memory=self.device.type == "cuda",
                    drop_last=True,
                    persistent_workers=False,
                    # Worker seeds come from this generator, not the global stream, so a run
                    # resumed mid-epoch draws the same drop-path masks as an uninterrupted one.
                    generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch),
                )
                if progress is not None:
                    progress.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
                model.train()
                micro = 0
                interrupted = False
                for batch in loader:
                    micro += 1
                    sync = micro % self.accum_steps == 0
                    ctx = model.no_sync() if (ddp and not sync) else contextlib.nullcontext()
                    with ctx:
                        with self.autocast():
                            loss, extra = self.task.training_step(model, batch, self.device)
                        scaled = loss / self.accum_steps
                        if self.scaler is not None:
                            self.scaler.scale(scaled).backward()
                        else:
                            scaled.backward()
                    for k, v in {"loss": loss, **extra}.items():
                        v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                        sums[k] = sums.get(k, 0) + v
                    count += 1
                    if not sync:
                        continue

                    lr = schedule.apply(self.optimizer, self.step)
                    if self.scaler is not None:
                        self.scaler.unscale_(self.optimizer)
                    grad_norm = None
                    if self.optim_cfg.clip_grad is not None:
                        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.optim_cfg.clip_grad)
                    if self.scaler is not None:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    window_steps += 1
                    if progress is not None:
                        progress.update(1)

                    at_log = self.step % cfg.log_every == 0 or self.step == last_step
                    if at_log:
                        self._log_window(
                            sums,
                            count,
                            lr,
                            grad_norm,
                            epoch,
                            window_t,
                            window_steps,
                            progress,
                            t_start,
                            start_step,
                            last_step,
                        )
                        if (
                            self.step % cfg.log_every == 0
                        ):  # a window cut short by the end (max_steps) goes on after a resume
                            sums, count = {}, 0
                        window_t, window_steps = time.monotonic(), 0
                    # A local flag needs no communication; with several processes agree every few steps.
                    check = dist.world_size == 1 or at_log or self.step % 10 == 0
                    if check and any_process(stop.requested is not None, self.device):
                        interrupted = True
                        break
                    if dist.is_main and time.monotonic() - self._last_ckpt_time > cfg.ckpt_every_minutes * 60:
                        self.save_checkpoint(epoch)
                    if self.step >= last_step:
                        break
                del loader
                gc.unfreeze()  # the workers are gone: let the collector see the frozen objects again
                if interrupted:
                    self.save_checkpoint(epoch)
                    if progress is not None:
                        progress.close()
                    requeued = requeue_slurm_job() if (stop.preempted and dist.is_main) else None
                    then = (
                        f"SLURM job {requeued} is requeued and resumes from it"
                        if requeued
                        else "run the same command again to resume"
                    )
                    raise TrainingInterrupted(
                        f"stopped by {stop.requested or 'a signal on another process'} at step {self.step}; "
                        f"the state is saved in {self.checkpoint_path}: {then}"
                    )
                epoch_done = self.step % self.steps_per_epoch == 0
                if epoch_done:
                    self._end_epoch(epoch)
                elif self.step >= last_step:
                    self.save_checkpoint(epoch)

        if progress is not None:
            progress.close()
        self._end_training()
        elapsed = time.monotonic() - t_start
        return {
            "step": self.step,
            "total_steps": total_steps,
            "finished": self.step >= total_steps,
            "seconds": elapsed,
            "images_per_second": (self.step - start_step) * self.effective_batch_size / max(elapsed, 1e-9),
        }

    def _restore_rng(self, rng: dict | None) -> None:
        """Continue the random streams (drop path, mixup) where the checkpoint left them.

        Only the main process's state is saved; other ranks get a fresh stream of their own.
        """
        if rng is None:
            return
        if self.dist.is_main:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        else:
            torch.manual_seed(self.train_cfg.seed + 7919 * self.dist.rank + 1_000_003 * self.step)

    def _end_epoch(self, epoch: int) -> None:
        self._check_finite_weights()  # before the epoch's evaluation of a model that diverged
        corrupt = getattr(self.dataset, "num_corrupt", 0)
        if corrupt:
            log.warning(
                "epoch %d: %d corrupt or unreadable images were skipped (see warnings above)", epoch + 1, corrupt
            )
        self.task.on_epoch_end(self, epoch)
        self._evaluate_after_epoch(epoch)
        keep = self.train_cfg.save_every_epochs
        extra = f"checkpoint-epoch{epoch + 1}.pth" if keep and (epoch + 1) % keep == 0 else None
        self.save_checkpoint(epoch + 1, extra)
        self.metrics.write("epochs", {"step": self.step, "epoch": epoch + 1, "corrupt_images": int(corrupt)})

    # ------------------------------------------------------------------ the evaluation hook
    # A task need not subclass TrainTask: what it leaves out means "no evaluation during training",
    # "nothing to save", "every scalar of the metrics" and "nothing to do" (TrainTask's defaults).
    def _task_evaluates(self) -> bool:
        """Whether the task has an evaluation of its own (and, where it says so with ``evaluates``,
        one switched on for this run: pretraining's online k-NN)."""
        evaluate = getattr(type(self.task), "evaluate", None)
        return evaluate is not None and evaluate is not TrainTask.evaluate and getattr(self.task, "evaluates", True)

    def _task_hook(self, name: str):
        return getattr(self.task, name, None) or getattr(TrainTask(), name)

    def _evaluate_after_epoch(self, epoch: int) -> None:
        """Every ``task.eval_every()`` epochs, except after the last one (the final evaluation
        follows in :meth:`_end_training`)."""
        every = self._task_hook("eval_every")() if self._task_evaluates() else 0
        if every <= 0 or (epoch + 1) % every or epoch + 1 == self.train_cfg.epochs:
            return
        self._record_eval(self.evaluate(), epoch + 1, final=False)

    def _end_training(self) -> None:
        """After the last step (also when a resumed run finds nothing to do): the task's exports,
        then the trained model saved and the final evaluation, published on the main process."""
        self.task.on_train_end(self)
        if not self._task_evaluates():
            return
        if self.dist.is_main:
            self._task_hook("save_trained")(self.unwrapped, self.output_dir, self.step)
        metrics = self.evaluate(final=True)
        self._record_eval(metrics, math.ceil(self.step / max(self.steps_per_epoch, 1)), final=True)

    def _record_eval(self, metrics: dict[str, Any], epoch: int, final: bool) -> None:
        if self.dist.is_main:
            self.metrics.write("eval", {"step": self.step, "epoch": epoch, **self._task_hook("eval_record")(metrics)})
        self._task_hook("on_eval")(self, metrics, epoch, final)

    def _log_window(
        self, sums, count, lr, grad_norm, epoch, window_t, window_steps, progress, t_start, start_step, last_step
    ) -> None:
        means = {k: all_reduce_mean(v / max(count, 1)).item() for k, v in sums.items()}
        loss = means.get("loss", float("nan"))
        if not math.isfinite(loss):
            self.metrics.write("train", {"step": self.step, "loss": loss})
            raise FloatingPointError(f"the loss became {loss} at step {self.step}; {self._divergence_advice()}")
        now = time.monotonic()
        ips = window_steps * self.effective_batch_size / max(now - window_t, 1e-9)
        done = self.step - start_step
        eta = (last_step - self.step) * (now - t_start) / max(done, 1)
        row = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "lr": lr,
            **means,
            "images_per_second": round(ips, 2),
        }
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if self.device.type == "cuda":
            row["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self.metrics.write("train", row)
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
        log.info(
            "step %d/%d  epoch %d  loss %.4f  lr %.3e  %.1f img/s  eta %s",
            self.step,
            last_step,
            epoch + 1,
            loss,
            lr,
            ips,
            _format_duration(eta),
        )
