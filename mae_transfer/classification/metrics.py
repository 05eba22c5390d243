"""Exact classification metrics that stay exact when evaluation is sharded over processes.

:class:`ClassificationMeter` keeps integer counts only (per-class top-1 hits, per-class totals,
top-k hits, sample count). Counts add up, so summing them over ranks (:meth:`ClassificationMeter.all_reduce`)
gives bit-for-bit the numbers of one process that saw every sample, which averaging per-rank
accuracies would not (ranks hold different numbers of samples).

Ties between scores are broken in favour of the lower class index, the rule ``torch.argmax``
uses: a sample is top-k correct when fewer than k classes rank ahead of its true class, where
class j ranks ahead of the target t if ``s_j > s_t``, or ``s_j == s_t`` and ``j < t``. This makes the
result independent of ``torch.topk``'s unspecified tie order (which differs between CPU and CUDA),
so one checkpoint gives the same numbers on any device and any number of ranks.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Iterable

import torch
import torch.nn as nn

from mae_transfer.engine.distributed import all_reduce_sum, world
from mae_transfer.engine.evaluator import DatasetEvaluator, run_evaluator

log = logging.getLogger(__name__)

TOPK = 5


def target_ranks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many classes rank ahead of each sample's true class.

    Args:
        logits: (B, C) scores (any real dtype).
        targets: (B,) int64 class indices in ``[0, C)``.

    Returns:
        (B,) int64: the number of classes j with ``s_j > s_t`` or (``s_j == s_t`` and ``j < t``);
        the sample is top-k correct iff this is < k. Rows with any NaN score get C (never correct):
        NaN compares false with everything, so without this a diverged model would score 100 %.
    """
    b, c = logits.shape
    s_t = logits.gather(1, targets[:, None])  # (B, 1)
    cls = torch.arange(c, device=logits.device)[None, :]  # (1, C)
    ahead = (logits > s_t) | ((logits == s_t) & (cls < targets[:, None]))  # (B, C)
    ranks = ahead.sum(dim=1)
    nan_rows = torch.isnan(logits).any(dim=1)
    return torch.where(nan_rows, torch.full_like(ranks, c), ranks)


class ClassificationMeter:
    """Accumulates top-1, top-5 and mean-per-class accuracy as exact integer counts.

    State (int64, on the device of the logits it is fed):
        ``correct_per_class`` (C,): top-1 hits per true class;
        ``total_per_class`` (C,): samples per true class;
        ``correct_topk`` (): samples whose class is among the k = min(5, C) highest scores;
        ``num_samples`` (): samples seen.

    :meth:`compute` returns percentages:
        ``top1``, ``top5`` (top-k with k = min(5, C)),
        ``mean_per_class``: the mean over classes that have at least one evaluated sample of the
        per-class top-1 recall (correct / total of that class). This is the long-tail metric
        reported for iNaturalist (and Places' "mean class accuracy"): every class weighs the same,
        however few validation images it has. Classes without validation samples are excluded,
        not counted as 0.
        ``num_samples``, ``num_classes_evaluated`` (classes with at least one sample).

    Args:
        num_classes: C.
        device: where the counts start; they follow the logits' device on :meth:`update`.
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.topk = min(TOPK, self.num_classes)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        c, dev = self.num_classes, self._device
        self.correct_per_class = torch.zeros(c, dtype=torch.int64, device=dev)
        self.total_per_class = torch.zeros(c, dtype=torch.int64, device=dev)
        self.correct_topk = torch.zeros((), dtype=torch.int64, device=dev)
        self.num_samples = torch.zeros((), dtype=torch.int64, device=dev)

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device | str) -> "ClassificationMeter":
        """Move the counts (C + C + 2 integers) to ``device``; returns self."""
        device = torch.device(device)
        if device != self._device:
            self._device = device
            self.correct_per_class = self.correct_per_class.to(device)
            self.total_per_class = self.total_per_class.to(device)
            self.correct_topk = self.correct_topk.to(device)
            self.num_samples = self.num_samples.to(device)
        return self

    def _packed(self) -> torch.Tensor:
        """All counts as one (2C + 2,) int64 vector, so a single collective moves them."""
        return torch.cat(
            [self.correct_per_class, self.total_per_class, self.correct_topk[None], self.num_samples[None]]
        )

    def _unpack(self, packed: torch.Tensor) -> None:
        c = self.num_classes
        packed = packed.to(self._device)
        self.correct_per_class = packed[:c].clone()
        self.total_per_class = packed[c : 2 * c].clone()
        self.correct_topk = packed[2 * c].clone()
        self.num_samples = packed[2 * c + 1].clone()

    # ------------------------------------------------------------------ accumulate
    def _check_targets(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        c = self.num_classes
        if logits.dim() != 2 or logits.shape[1] != c:
            raise ValueError(f"logits must have shape (B, {c}), got {tuple(logits.shape)}")
        if not torch.is_tensor(targets):
            targets = torch.as_tensor(targets)
        if targets.dim() == 2 and targets.shape[1] == c:
            raise ValueError(
                f"targets have shape {tuple(targets.shape)}: these look like soft (mixup/cutmix or "
                "label-smoothed) targets. Evaluation needs the hard class indices, shape (B,) int64; "
                "evaluate on batches that have not been through Mixup"
            )
        if targets.dim() != 1:
            raise ValueError(f"targets must be class indices of shape (B,), got shape {tuple(targets.shape)}")
        if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
            raise ValueError(
                f"targets must be integer class indices, got dtype {targets.dtype} "
                "(soft or probability targets cannot be scored for accuracy)"
            )
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} rows of logits but {targets.shape[0]} targets")
        targets = targets.to(device=logits.device, dtype=torch.int64)
        if targets.numel():
            # One host sync per batch: negligible next to a forward pass, and an out-of-range label
            # would otherwise be a device-side assert on CUDA (or silently wrong counts).
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= c:
                raise ValueError(f"target labels must lie in [0, {c}), got values in [{lo}, {hi}]")
        return targets

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch.

        Args:
            logits: (B, C) class scores (logits, probabilities or k-NN votes: only the order matters).
            targets: (B,) integer class indices. Soft (B, C) targets raise ValueError.
        """
        targets = self._check_targets(logits, targets)
        self.to(logits.device)
        if targets.numel() == 0:
            return
        ranks = target_ranks(logits, targets)
        hit1 = (ranks == 0).to(torch.int64)
        # index_add_ on int64 is exact and needs no host sync (bincount would sync on CUDA).
        self.correct_per_class.index_add_(0, targets, hit1)
        self.total_per_class.index_add_(0, targets, torch.ones_like(hit1))
        self.correct_topk += (ranks < self.topk).sum()
        self.num_samples += targets.numel()

    def merge(self, other: "ClassificationMeter") -> "ClassificationMeter":
        """Add another meter's counts to this one (what :meth:`all_reduce` does across processes)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge meters for {other.num_classes} and {self.num_classes} classes")
        self._unpack(self._packed() + other._packed().to(self._device))
        return self

    def all_reduce(self) -> "ClassificationMeter":
        """Sum the counts over all processes (the engine's ``all_reduce_sum``; no-op alone).

        Every rank must call it (it is a collective). Afterwards every rank holds the counts of
        the whole evaluation, equal to what one process evaluating every sample would have, as
        long as each sample was evaluated on exactly one rank.
        """
        self._unpack(all_reduce_sum(self._packed()))
        return self

    # ------------------------------------------------------------------ results
    def compute(self) -> dict[str, float | int]:
        """Metrics in percent (see the class docstring); NaN accuracies when no sample was seen."""
        n = int(self.num_samples)
        total = self.total_per_class.double()
        seen = total > 0
        n_cls = int(seen.sum())
        if n == 0:
            nan = float("nan")
            return {"top1": nan, "top5": nan, "mean_per_class": nan, "num_samples": 0, "num_classes_evaluated": 0}
        correct = self.correct_per_class.double()
        recall = correct[seen] / total[seen]
        return {
            "top1": 100.0 * float(correct.sum()) / n,
            "top5": 100.0 * int(self.correct_topk) / n,
            "mean_per_class": 100.0 * float(recall.mean()),
            "num_samples": n,
            "num_classes_evaluated": n_cls,
        }


# ---------------------------------------------------------------------- evaluation loop
def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule's train flag: partly frozen models mix modes, so one flag is not enough."""
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _autocast_context(autocast: Callable[[], ContextManager] | None) -> ContextManager:
    return autocast() if autocast is not None else contextlib.nullcontext()


def distributed_sampler_valid_count(loader: Iterable) -> int | None:
    """Samples of this rank that are not DistributedSampler padding, or None if that does not apply.

    ``DistributedSampler(drop_last=False)`` repeats samples so that every rank gets the same count:
    global position ``p`` of the padded list goes to rank ``p % world`` and is padding iff
    ``p >= len(dataset)``. Rank r's first ``len(range(r, N, world))`` samples are therefore real and
    the rest (at most one, or more for tiny datasets) repeat samples already counted elsewhere.
    This only holds when the loader batches the sampler's order as is (the default BatchSampler).
    """
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, torch.utils.data.DistributedSampler):
        return None
    if batch_sampler is not None and getattr(batch_sampler, "sampler", None) is not sampler:
        return None
    if sampler.drop_last:
        log.warning(
            "evaluation loader uses DistributedSampler(drop_last=True): %d samples are never evaluated",
            len(sampler.dataset) - sampler.total_size,
        )
        return None
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Iterable[dict],
    device: torch.device | str,
    num_classes: int,
    autocast: Callable[[], ContextManager] | None = None,
    desc: str | None = "evaluating",
) -> dict[str, float | int]:
    """Top-1 / top-5 / mean-per-class accuracy (percent) of ``model`` over ``loader``.

    Args:
        model: maps images (B, 3, H, W) to logits (B, num_classes); DDP-wrapped models work.
        loader: yields dicts with ``"image"`` (B, 3, H, W) and ``"label"`` (B,) int class indices.
            Under torch.distributed each rank must see a disjoint shard (every sample on exactly one
            rank); a ``DistributedSampler``'s padding repeats are recognised and not counted.
        device: where the model runs.
        num_classes: C.
        autocast: zero-argument callable returning a context manager for the forward pass (e.g.
            ``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``); logits are scored in fp32.
        desc: the label of the main process's progress bar (None: no bar).

    Returns:
        :meth:`ClassificationMeter.compute` after summing counts over all ranks (identical on every
        rank). The model's (and each submodule's) train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    evaluator = ClassificationEvaluator(num_classes, limit=distributed_sampler_valid_count(loader), device=device)
    return evaluate_in_eval_mode(model, model, evaluator, loader, device, autocast, desc)


def evaluate_in_eval_mode(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    evaluator: DatasetEvaluator,
    loader: Iterable[dict],
    device: torch.device,
    autocast: Callable[[], ContextManager] | None,
    desc: str | None,
):
    """``evaluator`` over ``loader`` with ``forward(images)``, ``model`` in eval mode meanwhile (each
    submodule's mode restored afterwards), autocast around the forward pass."""
    modes = _module_modes(model)
    model.eval()

    def predict(batch: dict) -> torch.Tensor:
        with _autocast_context(autocast):
            return forward(batch["image"].to(device, non_blocking=True))

    try:
        # Every rank evaluates the summed counts: the result is the same everywhere. The main
        # process shows a progress bar, as the dense tasks' evaluations do.
        return run_evaluator(evaluator, loader, predict, main=world()[0] == 0, everywhere=True, desc=desc)
    finally:
        _restore_modes(modes)


class ClassificationEvaluator(DatasetEvaluator):
    """Top-1 / top-5 / mean-per-class accuracy of (B, C) logits against the batches' ``"label"``;
    the counts of every process are summed by the engine (:func:`run_evaluator`). ``limit``: only
    the first ``limit`` samples of this process count (a ``DistributedSampler``'s padding)."""

    def __init__(self, num_classes: int, limit: int | None = None, device: torch.device | str = "cpu"):
        self.num_classes, self.limit, self.device = num_classes, limit, torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.meter = ClassificationMeter(self.num_classes, device=self.device)
        self.seen = 0

    def process(self, inputs: dict, outputs: torch.Tensor) -> None:
        labels = inputs["label"] if torch.is_tensor(inputs["label"]) else torch.as_tensor(inputs["label"])
        logits = outputs.float()
        if self.limit is not None:
            keep = max(0, min(labels.shape[0], self.limit - self.seen))
            self.seen += labels.shape[0]
            logits, labels = logits[:keep], labels[:keep]
        if labels.numel():
            self.meter.update(logits, labels.to(logits.device, non_blocking=True))

    def state(self) -> torch.Tensor:
        return self.meter._packed().cpu()

    def merge(self, states: list[torch.Tensor]) -> None:
        self.meter._unpack(torch.stack([s.cpu() for s in states]).sum(0).to(self.meter._device))

    def evaluate(self) -> dict[str, float | int]:
        result = self.meter.compute()
        log.info(
            "evaluated %d samples (%d classes): top-1 %.3f  top-5 %.3f  mean per class %.3f",
            result["num_samples"],
            result["num_classes_evaluated"],
            result["top1"],
            result["top5"],
            result["mean_per_class"],
        )
        if result["num_samples"] == 0:
            log.warning("the evaluation loader yielded no samples (on any rank): accuracies are NaN")
        return result


__all__ = [
    "ClassificationEvaluator",
    "ClassificationMeter",
    "distributed_sampler_valid_count",
    "evaluate_classifier",
    "target_ranks",
]
