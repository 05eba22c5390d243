"""Linear-probe learning-rate sweep on precomputed frozen features, all learning rates at once.

The official MAE linear probe (MAE-repo ``main_linprobe.py``) puts ``BatchNorm1d(affine=False,
eps=1e-6)`` in front of a linear head and trains only that head. On frozen, precomputed features
the backbone never changes, so the BatchNorm reduces to a fixed standardisation; here its mean and
variance are computed once over the whole training set (population variance, the statistics a
BatchNorm converges to) and applied to train and val features alike.

The L heads of the sweep are stacked as one weight tensor (L, D, C) and bias (L, C). Each step draws
one mini-batch (the same for every head), computes all L x B x C logits with one batched matmul and
updates all heads with their own learning rate. Heads never interact: each head's gradient is the
gradient of its own cross-entropy, so the result for one learning rate is the same as a sweep of
that learning rate alone (same seed -> same initial weights, same batch order).

Optimizers: ``"sgd"`` (default; momentum 0.9, weight decay on the weight only) or ``"lars"``, the
official linear probe's optimizer, done batched: the trust ratio ``0.001 * ||w|| / ||g + wd w||`` is
computed per head (norm over that head's whole (D, C) weight, as the official LARS does per
parameter tensor); the bias gets plain momentum SGD without weight decay, as in the official LARS
(which exempts 1-d parameters). Learning rates are absolute (not scaled by the batch size) and
follow a cosine schedule to 0 after an optional linear warm-up, stepped every iteration.

A head whose learning rate is too large can diverge to inf/NaN. Divergence is detected per head
without host synchronisation; the head is frozen at zero from then on (so it cannot produce NaNs
that would leak into shared reductions), reported with ``failed=True`` and NaN metrics, and is
never chosen as the best. Note that choosing the best learning rate on the validation set makes
the best number optimistic; it is a sweep, not a held-out result.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from mae_transfer.classification.metrics import ClassificationMeter
from mae_transfer.engine.optim import LARS_TRUST, Schedule, lars_trust_ratio

log = logging.getLogger(__name__)

BN_EPS = 1e-6  # official linear probe: BatchNorm1d(affine=False, eps=1e-6)
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def feature_stats(
    feats: torch.Tensor, device: torch.device | str | None = None, chunk_rows: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and population variance of (N, D) features, accumulated in float64.

    Two chunked passes (mean, then squared deviations), so neither a float64 copy of the whole
    matrix nor the cancellation of ``E[x^2] - E[x]^2`` is needed. Chunks are moved to ``device``
    (default: where ``feats`` are) to do the float64 work there. Returns (D,), (D,) float64.
    """
    device = torch.device(device) if device is not None else feats.device
    n = feats.shape[0]
    total = torch.zeros(feats.shape[1], dtype=torch.float64, device=device)
    for s in range(0, n, chunk_rows):
        total += feats[s : s + chunk_rows].to(device=device, dtype=torch.float64).sum(0)
    mean = total / n
    sq = torch.zeros_like(mean)
    for s in range(0, n, chunk_rows):
        sq += (feats[s : s + chunk_rows].to(device=device, dtype=torch.float64) - mean).pow(2).sum(0)
    return mean, sq / n


def _normalise(
    feats: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor, device: torch.device, chunk_rows: int = 65536
) -> torch.Tensor:
    """(N, D) -> standardised (N, D) float32 on ``device``, chunk by chunk (no float64 copy)."""
    out = torch.empty(feats.shape, dtype=torch.float32, device=device)
    for s in range(0, feats.shape[0], chunk_rows):
        x = feats[s : s + chunk_rows].to(device=device, dtype=torch.float32)
        out[s : s + chunk_rows] = (x - mean) * inv_std
    return out


def _check_inputs(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, what: str) -> None:
    if feats.dim() != 2:
        raise ValueError(f"{what} features must be (N, D), got {tuple(feats.shape)}")
    if labels.shape != (feats.shape[0],):
        raise ValueError(f"{what} labels must be ({feats.shape[0]},) class indices, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{what} labels must be integer class indices, got {labels.dtype}")
    if feats.shape[0] == 0:
        raise ValueError(f"no {what} features")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{what} labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def linear_probe_sweep(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 90,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    device: torch.device | str | None = None,
    seed: int = 0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    warmup_epochs: float = 0.0,
    init_std: float = 0.01,
    eval_batch_size: int = 8192,
    return_weights: bool = False,
) -> dict:
    """Train one linear classifier per learning rate, simultaneously, on frozen features.

    Args:
        train_feats: (N, D) training features (any float dtype; CPU or device).
        train_labels: (N,) int class indices.
        val_feats: (M, D) validation features.
        val_labels: (M,) int class indices.
        num_classes: C.
        lrs: absolute learning rates, one head each (L = len(lrs)).
        epochs: passes over the training features; every pass is one seeded permutation, cut into
            ``N // batch_size`` full batches (the tail is dropped, as the official probe's loader
            does; with N < batch_size the single batch is the whole set).
        batch_size: B.
        weight_decay: on the weights (not the bias); the official probe uses 0.
        device: where to train (default: this process's GPU if any, else CPU). The standardised
            training features live there whole (N x D fp32).
        seed: fixes the head initialisation (shared by all heads) and the batch order.
        optimizer: ``"sgd"`` or ``"lars"`` (see the module docstring).
        momentum: heavy-ball momentum of both optimizers.
        warmup_epochs: linear warm-up before the cosine decay (the official probe: 10 of 90).
        init_std: std of the truncated-normal weight init (official: 0.01); biases start at 0.
        eval_batch_size: validation rows scored at once.
        return_weights: also return the trained heads and the standardisation.

    Returns:
        dict with
            ``results``: one dict per lr, in the order of ``lrs``: ``lr``, ``top1``, ``top5``,
            ``mean_per_class`` (percent on val; NaN when failed), ``num_samples``,
            ``num_classes_evaluated``, ``train_loss`` (mean over the last epoch), ``failed``;
            ``best_lr`` and ``best`` (that lr's entry of ``results``, highest val top-1 among heads
            that did not fail, earliest lr on ties), both None if every head failed;
            ``optimizer``, ``epochs``, ``batch_size``, ``weight_decay``, ``seed``;
            with ``return_weights``: ``weight`` (L, D, C), ``bias`` (L, C), ``mean`` (D,),
            ``std`` (D,) on the CPU (failed heads are zero); logits of head l for raw features x are
            ``((x - mean) / std) @ weight[l] + bias[l]``.

    Under torch.distributed every rank may call this with the same (gathered) features; the
    computation is deterministic, so all ranks get the same result without communicating.
    """
    from mae_transfer.classification.knn import default_device

    _check_inputs(train_feats, train_labels, num_classes, "train")
    _check_inputs(val_feats, val_labels, num_classes, "val")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"train features have D={train_feats.shape[1]}, val features D={val_feats.shape[1]}")
    lrs = [float(lr) for lr in lrs]
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"lrs must be positive learning rates, got {lrs}")
    if optimizer not in ("sgd", "lars"):
        raise ValueError(f"optimizer must be 'sgd' or 'lars', got {optimizer!r}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = torch.device(device) if device is not None else default_device()
    n, d = train_feats.shape
    c, L = int(num_classes), len(lrs)

    # Fixed BatchNorm(affine=False): statistics of the whole training set, applied everywhere.
    mean64, var64 = feature_stats(train_feats, device)
    mean = mean64.float().to(device)
    std = (var64 + BN_EPS).sqrt().float().to(device)
    inv_std = 1.0 / std
    x_train = _normalise(train_feats, mean, inv_std, device)
    y_train = train_labels.to(device=device, dtype=torch.int64)

    # One init for all heads (seeded on the CPU so it is the same on any device and for any L).
    gen = torch.Generator().manual_seed(int(seed))
    w0 = torch.empty(d, c)
    torch.nn.init.trunc_normal_(w0, std=init_std, generator=gen)
    weight = w0.to(device).unsqueeze(0).repeat(L, 1, 1)  # (L, D, C)
    bias = torch.zeros(L, c, device=device)  # (L, C)
    buf_w = torch.zeros_like(weight)
    buf_b = torch.zeros_like(bias)
    base_lr = torch.tensor(lrs, device=device)  # (L,)
    alive = torch.ones(L, dtype=torch.bool, device=device)
    failed_at: list[int | None] = [None] * L

    steps_per_epoch = max(1, n // batch_size)
    bsz = min(batch_size, n)
    rows = torch.arange(bsz, device=device)
    epoch_loss = torch.zeros(L, dtype=torch.float64, device=device)
    step = 0
    # MAE's per-iteration schedule (util/lr_sched.py): linear warm-up from 0, then half-cosine to 0.
    schedule = Schedule(total_steps=epochs * steps_per_epoch, warmup_steps=warmup_epochs * steps_per_epoch)
    log.info(
        "linear sweep: %d lrs x %d epochs x %d steps (batch %d, %s, wd %g) on %d x %d features, %d classes",
        L,
        epochs,
        steps_per_epoch,
        bsz,
        optimizer,
        weight_decay,
        n,
        d,
        c,
    )
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        epoch_loss.zero_()
        for it in range(steps_per_epoch):
            idx = perm[it * bsz : (it + 1) * bsz]
            x, y = x_train[idx], y_train[idx]  # (B, D), (B,)
            logits = torch.matmul(x, weight) + bias[:, None, :]  # (L, B, C): one batched matmul
            logp = torch.log_softmax(logits, dim=-1)
            loss = -logp[:, rows, y].mean(dim=1)  # (L,) each head's own cross-entropy
            # Gradients by hand (softmax - one-hot): no autograd graph over L x B x C, and each
            # head's gradient depends on nothing but its own logits.
            g_logits = logp.exp()
            g_logits[:, rows, y] -= 1.0
            g_logits /= bsz
            g_w = torch.matmul(x.T, g_logits)  # (D, B) @ (L, B, C) -> (L, D, C)
            g_b = g_logits.sum(dim=1)  # (L, C)
            if weight_decay:
                g_w = g_w + weight_decay * weight
            if optimizer == "lars":
                q = lars_trust_ratio(weight.flatten(1).norm(dim=1), g_w.flatten(1).norm(dim=1), LARS_TRUST)
                g_w = g_w * q[:, None, None]
            buf_w.mul_(momentum).add_(g_w)
            buf_b.mul_(momentum).add_(g_b)
            lr = base_lr * schedule.lr(step)  # (L,)
            weight -= lr[:, None, None] * buf_w
            bias -= lr[:, None] * buf_b
            # Divergence check on the device (no sync): a head with a non-finite loss or weight is
            # dead from now on and held at zero so it cannot poison anything downstream.
            ok = torch.isfinite(loss) & torch.isfinite(weight).flatten(1).all(dim=1) & torch.isfinite(bias).all(dim=1)
            alive &= ok
            keep = alive[:, None, None]
            weight = torch.where(keep, weight, torch.zeros_like(weight))
            buf_w = torch.where(keep, buf_w, torch.zeros_like(buf_w))
            bias = torch.where(alive[:, None], bias, torch.zeros_like(bias))
            buf_b = torch.where(alive[:, None], buf_b, torch.zeros_like(buf_b))
            epoch_loss += torch.where(alive, loss.double(), torch.zeros_like(loss, dtype=torch.float64))
            step += 1
        # One host sync per epoch: report heads that died during this epoch.
        alive_now = alive.tolist()
        for l_, a in enumerate(alive_now):
            if not a and failed_at[l_] is None:
                failed_at[l_] = epoch
                log.warning("linear sweep: lr %g diverged (inf/NaN) in epoch %d; head dropped", lrs[l_], epoch)
    train_loss = (epoch_loss / steps_per_epoch).tolist()

    # Validation: every head on the same standardised features.
    meters = [ClassificationMeter(c, device=device) for _ in range(L)]
    alive_list = alive.tolist()
    for s in range(0, val_feats.shape[0], eval_batch_size):
        xv = _normalise(val_feats[s : s + eval_batch_size], mean, inv_std, device)
        yv = val_labels[s : s + eval_batch_size].to(device=device, dtype=torch.int64)
        logits = torch.matmul(xv, weight) + bias[:, None, :]  # (L, b, C)
        for l_ in range(L):
            if alive_list[l_]:
                meters[l_].update(logits[l_], yv)

    nan = float("nan")
    results = []
    for l_, lr in enumerate(lrs):
        if alive_list[l_]:
            m = meters[l_].compute()
            results.append({"lr": lr, **m, "train_loss": train_loss[l_], "failed": False})
        else:
            results.append(
                {
                    "lr": lr,
                    "top1": nan,
                    "top5": nan,
                    "mean_per_class": nan,
                    "num_samples": int(val_feats.shape[0]),
                    "num_classes_evaluated": 0,
                    "train_loss": nan,
                    "failed": True,
                }
            )
    ok = [r for r in results if not r["failed"]]
    best = max(ok, key=lambda r: r["top1"]) if ok else None  # max keeps the first of equal values
    for r in results:
        log.info(
            "linear sweep lr %-8g %s",
            r["lr"],
            "FAILED (diverged)"
            if r["failed"]
            else f"top-1 {r['top1']:.3f}  top-5 {r['top5']:.3f}  mean/cls {r['mean_per_class']:.3f}  "
            f"loss {r['train_loss']:.4f}",
        )
    if best is None:
        log.error("linear sweep: every learning rate diverged; no best head")
    else:
        log.info("linear sweep best lr %g: top-1 %.3f", best["lr"], best["top1"])
    out = {
        "results": results,
        "best_lr": best["lr"] if best else None,
        "best": dict(best) if best else None,
        "optimizer": optimizer,
        "epochs": epochs,
        "batch_size": bsz,
        "weight_decay": weight_decay,
        "seed": seed,
    }
    if return_weights:
        out.update(weight=weight.cpu(), bias=bias.cpu(), mean=mean.cpu(), std=std.cpu())
    return out


__all__ = ["DEFAULT_LRS", "feature_stats", "linear_probe_sweep"]
