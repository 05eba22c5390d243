"""Frozen-feature extraction and weighted k-NN classification.

The k-NN protocol is the weighted vote of Wu et al. 2018 ("Unsupervised feature learning via
non-parametric instance discrimination") as used by DINO's ``eval_knn.py``: features are L2
normalised, the k training samples of highest cosine similarity to a query vote for their class
with weight ``exp(similarity / T)`` (T = 0.07), and the class scores are the summed weights.

Everything is chunked over both the query and the training set, so memory stays bounded (about
``batch_size x train_chunk_size`` similarities at a time) for 1M training x 100k query features.
"""

from __future__ import annotations

import logging
from typing import Callable, ContextManager, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, SequentialSampler

from mae_transfer.classification.metrics import ClassificationMeter, _autocast_context, _module_modes, _restore_modes
from mae_transfer.engine.distributed import all_gather_rows, all_gather_tensors, comm_device
from mae_transfer.engine.distributed import world as process_world
from mae_transfer.engine.evaluator import progress

log = logging.getLogger(__name__)

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def default_feature_fn(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logit features (B, D) of a :class:`~mae_transfer.models.vit.VisionTransformer`:
    the class token after the final norm ('token' pooling) or the fc_norm'd mean of the patch
    tokens ('avg' pooling), whichever the model was built with."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def default_device() -> torch.device:
    """This process's GPU when there is one (the one ``init_distributed`` selected), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------- feature extraction
def _deterministic_order(loader: Iterable) -> list[int] | None:
    """Dataset indices in the order the loader yields them, when the sampler makes that knowable.

    Only for samplers whose order is fixed (Sequential; Distributed, seeded by seed + epoch) and
    batched as is; a RandomSampler would give a different order on a second pass.
    """
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, (SequentialSampler, DistributedSampler)):
        return None
    if batch_sampler is not None and getattr(batch_sampler, "sampler", None) is not sampler:
        return None
    return [int(i) for i in sampler]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable[dict],
    device: torch.device | str,
    feature_fn: FeatureFn | None = None,
    autocast: Callable[[], ContextManager] | None = None,
    gather_chunk_bytes: int = 256 << 20,
    desc: str | None = "extracting features",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of every sample of a dataset, in dataset-index order.

    Args:
        model: the (frozen) network; it runs in eval mode and its modes are restored afterwards.
        loader: yields dicts with ``"image"`` (B, 3, H, W), ``"label"`` (B,) and, ideally,
            ``"index"`` (B,) dataset indices. Without ``"index"`` the indices are read from a
            Sequential/DistributedSampler, or are the loader positions in a single process.
        device: where the model runs.
        feature_fn: ``(model, images (B, 3, H, W)) -> (B, D)``; default :func:`default_feature_fn`.
        autocast: zero-argument callable returning the forward pass's autocast context.
        gather_chunk_bytes: device memory one all_gather step may use per rank (distributed only).
        desc: the label of the main process's progress bar (None: no bar).

    Returns:
        features (N, D) float32, labels (N,) int64, indices (N,) int64, all on the CPU and sorted by
        dataset index. Under torch.distributed the rows of every rank are gathered (ranks may hold
        different counts), so every rank returns the whole set; an index seen twice (the padding
        repeats of a DistributedSampler, or ranks that were not sharded at all) is kept once.
    """
    device = torch.device(device)
    feature_fn = feature_fn or default_feature_fn
    rank, world = process_world()
    order = None
    feats, labels, indices = [], [], []
    pos = 0
    modes = _module_modes(model)
    model.eval()
    try:
        for batch in progress(loader, desc, "batch", main=rank == 0):
            images = batch["image"]
            y = torch.as_tensor(batch["label"])
            b = images.shape[0]
            if "index" in batch:
                idx = torch.as_tensor(batch["index"], dtype=torch.int64).reshape(-1)
            else:
                if order is None:
                    order = _deterministic_order(loader)
                    if order is None and world > 1:
                        raise ValueError(
                            "extract_features under torch.distributed needs the dataset index of every "
                            "sample: let the dataset return an 'index' key or use a DistributedSampler"
                        )
                idx = torch.tensor(
                    order[pos : pos + b] if order is not None else list(range(pos, pos + b)), dtype=torch.int64
                )
            pos += b
            if y.dim() != 1:
                raise ValueError(f"labels must be class indices of shape (B,), got {tuple(y.shape)}")
            with _autocast_context(autocast):
                f = feature_fn(model, images.to(device, non_blocking=True))
            if f.dim() != 2 or f.shape[0] != b:
                raise ValueError(f"feature_fn must return (B, D) = ({b}, D) features, got {tuple(f.shape)}")
            # fp32 on the CPU: bf16 features lose k-NN ties/ranks, and the CPU holds datasets that
            # would not fit next to the model on the GPU.
            feats.append(f.float().cpu())
            labels.append(y.to(torch.int64).cpu())
            indices.append(idx)
    finally:
        _restore_modes(modes)

    dim = feats[0].shape[1] if feats else 0
    feats_t = torch.cat(feats) if feats else torch.zeros((0, dim))
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    indices_t = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)

    if world > 1:
        cdev = comm_device()
        metas = all_gather_tensors(torch.tensor([feats_t.shape[0], dim], dtype=torch.int64))
        counts = [int(m[0]) for m in metas]
        dims = {int(m[1]) for m, c in zip(metas, counts) if c > 0}
        if len(dims) > 1:
            raise ValueError(f"ranks extracted features of different widths: {sorted(dims)}")
        dim = dims.pop() if dims else 0
        if feats_t.shape[0] == 0:
            feats_t = torch.zeros((0, dim))
        chunk = max(1, gather_chunk_bytes // max(1, world * dim * 4))
        feats_t = all_gather_rows(feats_t.contiguous(), counts, chunk, cdev)
        meta_chunk = max(1, gather_chunk_bytes // (world * 16))  # rows of (label, index) int64 pairs
        meta_rows = all_gather_rows(torch.stack([labels_t, indices_t], dim=1), counts, meta_chunk, cdev)
        labels_t, indices_t = meta_rows[:, 0].contiguous(), meta_rows[:, 1].contiguous()

    # Dataset order, each index once: padding repeats of a DistributedSampler are the same images
    # under the same (deterministic) eval transform, so which copy is kept does not matter.
    order_t = torch.argsort(indices_t, stable=True)
    indices_t = indices_t[order_t]
    keep = torch.ones_like(indices_t, dtype=torch.bool)
    keep[1:] = indices_t[1:] != indices_t[:-1]
    dropped = int((~keep).sum())
    if dropped:
        log.info("dropped %d repeated samples (sampler padding or unsharded ranks)", dropped)
    sel = order_t[keep]
    feats_t, labels_t, indices_t = feats_t[sel], labels_t[sel], indices_t[keep]
    log.info("extracted %d features of dimension %d (rank %d of %d)", feats_t.shape[0], dim, rank, world)
    return feats_t, labels_t, indices_t


# ---------------------------------------------------------------------- k-NN
def _check_knn_inputs(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    temperature: float,
) -> None:
    if train_feats.dim() != 2 or test_feats.dim() != 2:
        raise ValueError(f"features must be (N, D); got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train features have D={train_feats.shape[1]}, test features D={test_feats.shape[1]}")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"train_labels must be ({train_feats.shape[0]},), got {tuple(train_labels.shape)}")
    if train_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one training feature")
    if train_labels.dtype.is_floating_point or train_labels.dtype == torch.bool:
        raise ValueError(f"train_labels must be integer class indices, got {train_labels.dtype}")
    lo, hi = int(train_labels.min()), int(train_labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"train labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class _KNNIndex:
    """L2-normalised training features (N, D) float32 and labels (N,) resident on ``device``.

    The training set is copied to the device once, because every query chunk is compared with all
    of it (1M x 768 fp32 = 3 GB, fine on a GPU); similarities are computed ``train_chunk_size``
    columns at a time so that the (b, N) similarity matrix never exists whole.
    """

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, device: torch.device, train_chunk_size: int):
        self.device = device
        self.feats = F.normalize(feats.to(device=device, dtype=torch.float32), dim=1)
        self.labels = labels.to(device=device, dtype=torch.int64)
        self.chunk = max(1, int(train_chunk_size))

    def neighbours(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most similar training samples of each query.

        Args:
            queries: (b, D) L2-normalised, on ``device``.
            k: <= N.

        Returns:
            similarities (b, k) float32 in descending order, and their labels (b, k) int64. Exactly
            tied similarities at the k-th place may be resolved differently for different chunk
            sizes (``torch.topk`` does not specify tie order).
        """
        best_s = best_l = None
        n = self.feats.shape[0]
        for start in range(0, n, self.chunk):
            bank = self.feats[start : start + self.chunk]
            sims = queries @ bank.T  # (b, t)
            s, i = sims.topk(min(k, bank.shape[0]), dim=1)
            lab = self.labels[start : start + self.chunk][i]
            if best_s is None:
                best_s, best_l = s, lab
            else:
                # Running top-k: the k best so far plus this chunk's k best hold the k best overall
                # (fewer than k while the chunks seen so far hold fewer than k samples).
                s = torch.cat([best_s, s], dim=1)
                lab = torch.cat([best_l, lab], dim=1)
                best_s, j = s.topk(min(k, s.shape[1]), dim=1)
                best_l = lab.gather(1, j)
        return best_s, best_l


def _vote_incremental(
    sims: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], num_classes: int, temperature: float
):
    """Yield (k, scores (b, C)) for increasing k in ``ks``, adding one neighbour rank at a time.

    Each step adds exactly one weight per row (column j of the neighbour list), so there are no
    colliding atomic adds: the sums are deterministic on CUDA and follow the naive order
    (nearest neighbour first) whatever the chunking. The yielded tensor is updated in place by the
    next step; consume it before advancing.
    """
    weights = (sims / temperature).exp()  # (b, kmax)
    scores = torch.zeros((sims.shape[0], num_classes), dtype=torch.float32, device=sims.device)
    wanted = sorted(set(ks))
    j = 0
    for k in wanted:
        while j < k:
            scores.scatter_add_(1, labels[:, j : j + 1], weights[:, j : j + 1])
            j += 1
        yield k, scores


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
    train_chunk_size: int = 65536,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Weighted k-NN class scores (Wu et al. 2018; DINO's protocol).

    Args:
        train_feats: (N, D) training features (any scale: they are L2-normalised here).
        train_labels: (N,) int class indices in ``[0, num_classes)``.
        test_feats: (M, D) query features (L2-normalised here).
        num_classes: C.
        k: neighbours per query (clamped to N).
        temperature: T in the vote weight ``exp(cos_sim / T)``.
        batch_size: queries per chunk.
        train_chunk_size: training features compared at once; with ``batch_size`` it bounds the
            similarity block to ``batch_size x train_chunk_size`` floats.
        device: where to compute (default: this process's GPU if any, else CPU).

    Returns:
        scores (M, C) float32 on the CPU: for each class, the summed weights of the query's k
        nearest training samples of that class (0 for classes with no neighbour).
    """
    _check_knn_inputs(train_feats, train_labels, test_feats, num_classes, temperature)
    device = torch.device(device) if device is not None else default_device()
    kk = min(int(k), train_feats.shape[0])
    if kk < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    index = _KNNIndex(train_feats, train_labels, device, train_chunk_size)
    out = torch.zeros((test_feats.shape[0], num_classes), dtype=torch.float32)
    for start in range(0, test_feats.shape[0], batch_size):
        q = F.normalize(test_feats[start : start + batch_size].to(device=device, dtype=torch.float32), dim=1)
        sims, labs = index.neighbours(q, kk)
        for _, scores in _vote_incremental(sims, labs, [kk], num_classes, temperature):
            out[start : start + q.shape[0]] = scores.cpu()
    return out


def knn_evaluate(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    batch_size: int = 1024,
    train_chunk_size: int = 65536,
    device: torch.device | str | None = None,
    shard: bool = True,
) -> dict[int, dict[str, float | int]]:
    """Weighted k-NN accuracy for several k at once.

    The neighbours are searched once for the largest k; each smaller k uses the first k of them
    (the vote of the k nearest), so the cost is that of the largest k alone. Scores are never held
    for the whole query set: each chunk is scored and counted into one
    :class:`~mae_transfer.classification.metrics.ClassificationMeter` per k.

    Args:
        train_feats, train_labels, test_feats, num_classes, temperature, batch_size,
        train_chunk_size, device: as in :func:`knn_classify`.
        test_labels: (M,) int class indices of the queries.
        ks: neighbour counts; a k larger than N is evaluated with all N training samples.
        shard: under torch.distributed (identical features on every rank, as
            :func:`extract_features` returns them) each rank scores a contiguous 1/world of the
            queries and the counts are summed, so the result is exact and identical on every rank.
            Every rank must call this function then.

    Returns:
        ``{k: {"top1", "top5", "mean_per_class", "num_samples", "num_classes_evaluated"}}`` in
        percent, keyed by the requested k, in the order of ``ks``.
    """
    _check_knn_inputs(train_feats, train_labels, test_feats, num_classes, temperature)
    if test_labels.shape != (test_feats.shape[0],):
        raise ValueError(f"test_labels must be ({test_feats.shape[0]},), got {tuple(test_labels.shape)}")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive neighbour counts, got {ks}")
    device = torch.device(device) if device is not None else default_device()
    n_train = train_feats.shape[0]
    effective = {k: min(k, n_train) for k in ks}
    for k, e in effective.items():
        if e < k:
            log.warning("k=%d is larger than the %d training samples: voting with all of them", k, n_train)
    kmax = max(effective.values())

    rank, world = process_world()
    lo, hi = 0, test_feats.shape[0]
    if shard and world > 1:
        m = test_feats.shape[0]
        lo, hi = m * rank // world, m * (rank + 1) // world

    index = _KNNIndex(train_feats, train_labels, device, train_chunk_size)
    meters = {e: ClassificationMeter(num_classes, device=device) for e in set(effective.values())}
    for start in range(lo, hi, batch_size):
        end = min(start + batch_size, hi)
        q = F.normalize(test_feats[start:end].to(device=device, dtype=torch.float32), dim=1)
        y = test_labels[start:end].to(device)
        sims, labs = index.neighbours(q, kmax)
        for e, scores in _vote_incremental(sims, labs, list(meters), num_classes, temperature):
            meters[e].update(scores, y)

    results: dict[int, dict[str, float | int]] = {}
    if shard and world > 1:
        for e in sorted(meters):  # same order on every rank: collectives must match up
            meters[e].all_reduce()
    for k in ks:
        results[k] = meters[effective[k]].compute()
        log.info(
            "k-NN k=%d T=%g: top-1 %.3f  top-5 %.3f  mean per class %.3f (%d queries)",
            k,
            temperature,
            results[k]["top1"],
            results[k]["top5"],
            results[k]["mean_per_class"],
            results[k]["num_samples"],
        )
    return results


__all__ = ["default_feature_fn", "extract_features", "knn_classify", "knn_evaluate"]
