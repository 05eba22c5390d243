"""The one precision rule of the toolkit: what ``"auto"`` means, where fp16 is allowed, and the
autocast context of a resolved precision. Training, evaluation and the speed benchmarks all use it."""

from __future__ import annotations

import contextlib

import torch

from mae_transfer.config import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> bf16 on a GPU, fp32 on a CPU; fp16 only on a GPU (:class:`ConfigError`
    otherwise, as for a name that is not in :data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)} (fp16 on a GPU only), got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "precision fp16 needs a GPU (train.precision / the benchmark's precision); use bf16 or fp32 on a CPU"
        )
    return precision


def autocast_context(precision: str, device: torch.device):
    """The autocast context of a resolved precision (bf16/fp16) or a no-op (fp32)."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


__all__ = ["PRECISIONS", "resolve_precision", "autocast_context"]
