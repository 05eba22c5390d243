"""The one training engine: loop, optimizer groups, schedules, distributed setup, logging."""

from mae_transfer.engine.distributed import DistInfo, init_distributed
from mae_transfer.engine.optim import Schedule, build_adamw, param_groups
from mae_transfer.engine.trainer import OptimConfig, TrainConfig, Trainer, TrainingInterrupted, TrainTask

__all__ = [
    "DistInfo",
    "init_distributed",
    "Schedule",
    "build_adamw",
    "param_groups",
    "OptimConfig",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "TrainTask",
]
