"""Attentive probing: a learned query cross-attends over a frozen backbone's tokens, then a linear head.

The recipe is V-JEPA's frozen-evaluation probe (Bardes et al. 2024; facebookresearch/jepa,
``src/models/attentive_pooler.py`` ``AttentivePooler`` / ``AttentiveClassifier`` with
``src/models/utils/modules.py`` ``CrossAttentionBlock``, built in
``evals/image_classification_frozen/eval.py`` with ``depth=1`` and ``num_heads=encoder.num_heads``;
AIM and I-JEPA evaluate with the same kind of pool). One block, one query token:

    q0 = learned query (1, 1, D), trunc-normal std 0.02
    x  = LayerNorm(tokens)                               (B, T, D): every output token of the backbone
    q  = q0 + proj(MultiHeadAttention(Wq q0, Wk x, Wv x))  (B, 1, D)
    q  = q + MLP(LayerNorm(q))                           (hidden 4 D, GELU)
    logits = Linear(q)                                   (B, C)

Initialisation as V-JEPA's: every linear layer of the pool trunc-normal std 0.02 with zero bias, the
two residual output projections (``proj``, ``mlp.fc2``) divided by sqrt(2), LayerNorms 1 / 0, the
classifier ``nn.Linear``'s default init. The tokens pooled are ALL the backbone's output tokens after
its final norm: the patch tokens and, for a ViT with one, the class token (and register tokens). V-JEPA's
encoder has no class token, so there the pool sees patch tokens only; here the query may also
attend to the class token, which gives the probe a superset of the linear probe's input.

The learning-rate sweep in one pass (``model.lr_sweep``): :class:`AttentiveProbe` holds N copies of the pool
+ head, all starting from the same weights, on one backbone. Each training step runs the backbone
once and every head on its tokens; each head's gradient is the gradient of its own loss, its
optimizer groups carry its own lr factor, and with ``head_clip_grad`` its gradient norm is clipped on
its own. So head i follows exactly the run a sweep of its factor alone would make (same init, same
batches), and N learning rates cost one backbone pass per batch.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from typing import Callable, ContextManager, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_transfer.classification.metrics import (
    ClassificationEvaluator,
    distributed_sampler_valid_count,
    evaluate_in_eval_mode,
)
from mae_transfer.engine.evaluator import DatasetEvaluator

log = logging.getLogger(__name__)

INIT_STD = 0.02  # V-JEPA AttentivePooler(init_std=0.02)
HEAD_DIM = 64  # heads of the pool for a backbone without num_heads (a convnet): width / 64, the ViT rule


class CrossAttentionPool(nn.Module):
    """One learned query cross-attending over tokens, then an MLP on the query (V-JEPA's
    ``CrossAttentionBlock`` with ``qkv_bias=True``): (B, T, D) tokens -> (B, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the pool's width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)  # on the tokens (keys and values), not on the query
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.query, std=INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # V-JEPA's _rescale_blocks: residual outputs / sqrt(2 * layer), layer 1
            self.proj.weight.div_(math.sqrt(2.0))
            self.mlp[2].weight.div_(math.sqrt(2.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D)."""
        b, t, d = tokens.shape
        h = self.num_heads
        kv = self.kv(self.norm1(tokens)).reshape(b, t, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (2, B, h, T, d/h)
        q = self.q(self.query).reshape(1, 1, h, d // h).transpose(1, 2).expand(b, -1, -1, -1)  # (B, h, 1, d/h)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, h, 1, d/h)
        x = self.query + self.proj(out.transpose(1, 2).reshape(b, 1, d))  # (B, 1, D)
        x = x + self.mlp(self.norm2(x))
        return x[:, 0]


class AttentiveHead(nn.Module):
    """:class:`CrossAttentionPool` + linear classifier: (B, T, D) tokens -> (B, C) logits."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.pool = CrossAttentionPool(dim, num_heads, mlp_ratio)
        self.linear = nn.Linear(dim, num_classes)  # nn.Linear's own init, as V-JEPA's AttentiveClassifier

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(tokens))


def attention_heads(backbone: nn.Module, requested: int | None) -> int:
    """The pool's head count: ``requested``, else the backbone's (V-JEPA: ``encoder.num_heads``), else
    width / 64 (a backbone without attention heads)."""
    if requested:
        return int(requested)
    heads = getattr(backbone, "num_heads", None)
    return int(heads) if heads else max(1, int(backbone.embed_dim) // HEAD_DIM)


class AttentiveProbe(nn.Module):
    """A frozen backbone and N attentive heads (one per lr of a sweep; N = 1 without one).

    ``backbone``: a ViT (or another family) whose ``forward_features`` gives (B, T, D) tokens or a
    (B, D, h, w) map (read as h*w tokens). ``forward(x)`` returns the logits (B, C) of the head
    ``selected`` (the best on val after an evaluation of a sweep, else head 0); ``forward(x,
    all_heads=True)`` returns every head's, (N, B, C), from ONE backbone pass. The backbone runs
    without autograd (no parameter of it trains, nothing of its graph is kept)."""

    def __init__(
        self, backbone: nn.Module, num_classes: int, num_probes: int = 1, num_heads: int | None = None, mlp_ratio=4.0
    ):
        super().__init__()
        if num_probes < 1:
            raise ValueError(f"num_probes must be at least 1, got {num_probes}")
        self.backbone = backbone
        dim = int(backbone.embed_dim)
        first = AttentiveHead(dim, num_classes, attention_heads(backbone, num_heads), mlp_ratio)
        # Every head starts from the same weights (a sweep differs in its lr alone).
        self.head = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(num_probes - 1)])
        self.selected = 0
        self.num_classes = num_classes

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the backbone's output tokens (B, T, D), without autograd."""
        with torch.no_grad():
            t = self.backbone.forward_features(x)
        if t.dim() == 4:  # a feature map (B, D, h, w): its positions are the tokens
            t = t.flatten(2).transpose(1, 2)
        return t

    def forward(self, x: torch.Tensor, all_heads: bool = False) -> torch.Tensor:
        t = self.tokens(x)
        if all_heads:
            return torch.stack([h(t) for h in self.head])  # (N, B, C)
        return self.head[self.selected](t)

    def train(self, mode: bool = True) -> "AttentiveProbe":
        super().train(mode)
        self.backbone.eval()  # frozen: no drop path, no dropout, BatchNorm statistics kept
        return self


# ---------------------------------------------------------------------------------- the sweep
def head_param_groups(model: AttentiveProbe, factors: Sequence[float], weight_decay: float) -> list[dict]:
    """Optimizer groups of the trainable heads: per head, weight-decayed tensors (> 1-D: weights and the
    query, as V-JEPA's ``init_opt``) and the rest (biases, LayerNorms) without; each group's
    ``lr_scale`` is its head's lr factor (the engine's schedule multiplies it in)."""
    if len(factors) != len(model.head):
        raise ValueError(f"{len(factors)} lr factors for {len(model.head)} heads")
    groups = []
    for i, (head, factor) in enumerate(zip(model.head, factors)):
        for decay in (True, False):
            named = [(n, p) for n, p in head.named_parameters() if p.requires_grad and (p.ndim > 1) == decay]
            if named:
                groups.append(
                    {
                        "params": [p for _, p in named],
                        "param_names": [f"head.{i}.{n}" for n, _ in named],
                        "weight_decay": weight_decay if decay else 0.0,
                        "lr_scale": float(factor),
                    }
                )
    return groups


def clip_each_head(model: AttentiveProbe, max_norm: float) -> Callable:
    """An optimizer step pre-hook that clips each head's gradient norm to ``max_norm`` on its own
    (V-JEPA clips its one classifier at 1.0); one norm over all heads would tie a sweep's heads together."""
    heads = [[p for p in h.parameters() if p.requires_grad] for h in model.head]

    def hook(optimizer, args, kwargs):
        for params in heads:
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    return hook


def sweep_losses(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """(N, B, C) logits of N heads, (B,) class indices or (B, C) soft targets -> (N,) losses."""
    n, b, c = logits.shape
    flat = logits.float().reshape(n * b, c)
    if target.dim() == 2:  # mixup / cutmix soft targets
        loss = torch.sum(-target.repeat(n, 1) * torch.log_softmax(flat, dim=-1), dim=-1)
    else:
        loss = F.cross_entropy(flat, target.repeat(n), label_smoothing=smoothing, reduction="none")
    return loss.reshape(n, b).mean(dim=1)


def sweep_objective(losses: torch.Tensor) -> torch.Tensor:
    """The loss the engine steps on: its value is the heads' mean loss (what is logged), its gradient the
    gradient of their SUM, so each head receives exactly the gradient of its own loss (a mean would
    scale every head's gradient by 1/N, and a solo run of that lr would differ)."""
    total = losses.sum()
    return total - (total - losses.mean()).detach()


class HeadsEvaluator(DatasetEvaluator):
    """Top-1 / top-5 / mean-per-class of every head from (N, B, C) logits: one
    :class:`ClassificationEvaluator` per head, gathered over processes like one."""

    def __init__(self, num_heads: int, num_classes: int, limit: int | None = None, device="cpu"):
        self.parts = [ClassificationEvaluator(num_classes, limit, device) for _ in range(num_heads)]

    def reset(self) -> None:
        for p in self.parts:
            p.reset()

    def process(self, inputs: dict, outputs: torch.Tensor) -> None:
        for p, logits in zip(self.parts, outputs):
            p.process(inputs, logits)

    def state(self) -> list:
        return [p.state() for p in self.parts]

    def merge(self, states: list) -> None:
        for i, p in enumerate(self.parts):
            p.merge([s[i] for s in states])

    def evaluate(self) -> dict:
        return {"heads": [p.meter.compute() for p in self.parts]}


@torch.no_grad()
def evaluate_heads(
    model: nn.Module,
    loader: Iterable[dict],
    device: torch.device | str,
    num_classes: int,
    autocast: Callable[[], ContextManager] | None = None,
    desc: str | None = "evaluating",
) -> list[dict]:
    """Every head's accuracies (the dicts of ``ClassificationMeter.compute``, in head order) from one
    backbone pass per batch; every process gets them (sharded loaders as ``evaluate_classifier``)."""
    device = torch.device(device)
    core = getattr(model, "module", model)
    evaluator = HeadsEvaluator(len(core.head), num_classes, distributed_sampler_valid_count(loader), device)
    forward = functools.partial(core, all_heads=True)
    return evaluate_in_eval_mode(model, forward, evaluator, loader, device, autocast, desc)["heads"]


def pick_best(results: Sequence[dict]) -> int:
    """The head with the highest val top-1 (the earliest on ties; NaN never wins). Choosing on the
    validation split is what the linear-probe sweep (``knn --sweep``) and DINO's linear evaluation
    do: the chosen number is optimistic, a sweep, not a held-out result."""
    best, value = 0, -math.inf
    for i, r in enumerate(results):
        top1 = r["top1"]
        if top1 == top1 and top1 > value:
            best, value = i, top1
    return best


__all__ = [
    "AttentiveHead",
    "AttentiveProbe",
    "CrossAttentionPool",
    "HeadsEvaluator",
    "attention_heads",
    "clip_each_head",
    "evaluate_heads",
    "head_param_groups",
    "pick_best",
    "sweep_losses",
    "sweep_objective",
]
