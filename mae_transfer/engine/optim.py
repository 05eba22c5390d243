"""Optimizer parameter groups (weight decay split, layer-wise lr decay) and lr schedules."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def find_backbone(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(prefix, module)`` of the backbone inside ``model``: the first module (``model`` itself
    included) that has a ``layer_id`` method (the backbone contract, see ``VisionTransformer``);
    None when there is none."""
    for name, module in model.named_modules():
        if callable(getattr(module, "layer_id", None)) and hasattr(module, "num_layer_ids"):
            return (name + "." if name else ""), module
    return None


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    no_weight_decay: Iterable[str] = (),
    no_decay_modules: tuple[type, ...] | None = None,
) -> list[dict]:
    """Optimizer groups: no weight decay for 1-D parameters (biases, norms) and ``no_weight_decay``
    names; lr scaled by ``layer_decay ** (L - 1 - layer_id)``, where the backbone inside ``model``
    (:func:`find_backbone`) gives each of its parameters a ``layer_id`` of ``L = num_layer_ids``
    and every other parameter (pyramids, heads) is in the top layer (full lr). ``no_weight_decay``
    names are relative to the backbone or to ``model``. Each group carries ``lr_scale``, which the
    schedule multiplies into the lr.

    ``no_decay_modules`` replaces the 1-D rule: then exactly the parameters of modules of these
    types (and the ``no_weight_decay`` names) are not decayed, biases and other norms are.
    detectron2's ``get_default_optimizer_params(weight_decay_norm=0)`` is this rule with torch's
    norm layers (ViTDet: the ViT's LayerNorms; the heads' channel LayerNorms are decayed).
    """
    skip = set(no_weight_decay)
    exempt_ids: set[int] = set()
    if no_decay_modules is not None:
        for module in model.modules():
            if isinstance(module, no_decay_modules):
                exempt_ids.update(id(p) for p in module.parameters(recurse=False))
    found = find_backbone(model)
    prefix, backbone = found if found else ("", None)
    num_layers = backbone.num_layer_ids - 1 if backbone is not None else 0
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inside = backbone is not None and name.startswith(prefix)
        bare = name[len(prefix) :] if inside else name
        if no_decay_modules is None:
            no_decay = p.ndim == 1 or name.endswith(".bias") or bare in skip or name in skip
        else:
            no_decay = id(p) in exempt_ids or bare in skip or name in skip
        layer_id = backbone.layer_id(bare) if inside else num_layers
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - layer_id),
                "layer_id": layer_id,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["layer_id"], g["weight_decay"]))


def build_adamw(
    groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device, eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW, fused into one kernel on GPU (same maths, fewer launches)."""
    clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    fused = device.type == "cuda"
    return torch.optim.AdamW(clean, lr=lr, betas=betas, eps=eps, fused=fused)


LARS_TRUST = 0.001  # the official LARS trust coefficient (MAE repository, util/lars.py)


def lars_trust_ratio(param_norm: torch.Tensor, update_norm: torch.Tensor, trust: float = LARS_TRUST) -> torch.Tensor:
    """LARS's per-tensor factor ``trust * ||w|| / ||g + wd w||``, and 1 where either norm is 0 (the
    official rule). Elementwise, so one call serves one tensor or a stack of linear-sweep heads."""
    one = torch.ones_like(param_norm)
    ratio = torch.where(update_norm > 0, trust * param_norm / update_norm, one)
    return torch.where(param_norm > 0, ratio, one)


class LARS(torch.optim.Optimizer):
    """LARS as the official linear probe uses it (MAE repository's util/lars.py, MoCo v3's): for every
    tensor of more than one dimension the update is ``g + wd * w``, scaled by
    :func:`lars_trust_ratio`; tensors of one dimension (biases, norms) get neither weight decay nor
    the scaling. Then momentum (no dampening) and ``w -= lr * buffer``. The linear-probe sweep
    (:mod:`mae_transfer.classification.linear_sweep`) runs the same update on stacked heads."""

    def __init__(
        self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, trust: float = LARS_TRUST
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    dp = dp.mul(lars_trust_ratio(torch.norm(p), torch.norm(dp), g["trust"]))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def build_lars(groups: list[dict], lr: float, momentum: float = 0.9, trust: float = LARS_TRUST) -> LARS:
    """:class:`LARS` over ``groups`` (their ``weight_decay`` applies to the > 1-D tensors only)."""
    clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    return LARS(clean, lr=lr, momentum=momentum, trust=trust)


def build_optimizer(
    name: str, groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """``adamw`` (fused on GPU), ``lars`` (linear probing) or ``sgd`` (momentum)."""
    if name == "adamw":
        return build_adamw(groups, lr, betas, device)
    if name == "lars":
        return build_lars(groups, lr, momentum)
    if name == "sgd":
        clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
        return torch.optim.SGD(clean, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; use adamw, lars or sgd")


@dataclass(frozen=True)
class Schedule:
    """Per-step learning-rate factor in [0, 1] (times the peak lr) with linear warmup.

    kind: ``cosine`` (half-cycle to ``min_lr``, MAE pretraining and fine-tuning), ``step``
    (x0.1 at each of ``milestones``, ViTDet), ``poly`` (power ``power`` to ``min_lr``, BEiT /
    UperNet segmentation) or ``constant``.
    """

    total_steps: int
    warmup_steps: int = 0
    kind: Literal["cosine", "step", "poly", "constant"] = "cosine"
    peak_lr: float = 1.0
    min_lr: float = 0.0
    warmup_start_factor: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 1.0

    def lr(self, step: float) -> float:
        """Learning rate at (possibly fractional) optimizer step ``step`` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            f = self.warmup_start_factor + (1 - self.warmup_start_factor) * step / self.warmup_steps
            return self.peak_lr * f
        if self.kind == "constant":
            return self.peak_lr
        if self.kind == "step":
            drops = sum(1 for m in self.milestones if step >= m)
            return self.peak_lr * self.gamma**drops
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.kind == "poly":
            return self.min_lr + (self.peak_lr - self.min_lr) * (1.0 - t) ** self.power
        raise ValueError(f"unknown schedule {self.kind!r}")

    def apply(self, optimizer: torch.optim.Optimizer, step: float) -> float:
        """Set every group's lr to ``lr(step) * lr_scale``; return the unscaled lr."""
        lr = self.lr(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr
