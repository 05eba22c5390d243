"""Evaluations of frozen features: weighted k-NN and a linear-probe learning-rate sweep."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from mae_transfer.checkpoint.hub import weights_sha256
from mae_transfer.classification.config import ClassificationConfig, ModelConfig, build_config
from mae_transfer.classification.data_spec import NUM_CLASSES
from mae_transfer.classification.task import eval_transform
from mae_transfer.config import ConfigError
from mae_transfer.engine.bench import resolve_device
from mae_transfer.engine.distributed import DistInfo
from mae_transfer.engine.results import ResultRow, dataset_name, write_run_results
from mae_transfer.engine.trainer import EvalContext
from mae_transfer.models.backbone import create_backbone

log = logging.getLogger(__name__)


def _cls_features(model, x):
    """Class token after the final norm: the feature of the official linear probe."""
    return model.forward_features(x)[:, 0]


def split_features(model, ctx: EvalContext, train, val, batch_size: int, what: str = "features") -> tuple:
    """``((train features, labels), (val features, labels))``: the class-token features of both splits,
    extracted in ``ctx`` (its device, workers and autocast; each process its shard, gathered), with
    the main process's progress bars."""
    from mae_transfer.classification.knn import extract_features

    out = []
    for split, ds in (("train", train), ("val", val)):
        feats, labels, _ = extract_features(
            model,
            ctx.loader(ds, batch_size),
            ctx.device,
            feature_fn=_cls_features,
            autocast=ctx.autocast,
            desc=f"{what} of {split}" if ctx.dist.is_main else None,
        )
        out.append((feats, labels))
    return tuple(out)


def frozen_model(inferred: dict, model: str | None, img_size: int | None, toy: bool) -> tuple[str, int]:
    """The ViT (name, image size) whose features are evaluated: ``model`` / ``img_size`` when
    given, else what the backbone checkpoint holds (``inferred``); without either, the paper's
    ViT-B/16 at 224 px on real data, and on the toy data the micro ViT at 64 px of every other toy
    run (the toy classification presets), not a ViT-B (minutes per split on a CPU)."""
    if toy and not inferred and not model:
        preset = build_config("toy_linprobe").model
        return preset.name, img_size or preset.img_size
    return model or inferred.get("name") or "vit_base_patch16", img_size or inferred.get("img_size") or 224


def run_frozen_eval(
    dataset: str = "imagefolder",
    data: str | None = None,
    backbone: str | None = None,
    model: str | None = None,
    img_size: int | None = None,
    ks: tuple[int, ...] = (10, 20, 100, 200),
    sweep: bool = False,
    output: Path = Path("runs/knn"),
    device: str | None = None,
    batch_size: int = 128,
    trust: bool = False,
    label_fraction: float | None = None,
    shots: int | None = None,
    *,
    task: str,
    dist: DistInfo | None = None,
) -> str:
    """Extract class-token features of train and val (no augmentation), run k-NN (and the sweep),
    write ``results.jsonl`` rows into ``output`` and return a small table (empty on processes other
    than the main one).

    Runs on the engine's :class:`EvalContext` like every evaluation: the device and DataLoader
    workers of the engine's rules, each process of a torchrun group (``dist``) extracting its shard
    of each split (the features are gathered, every process holds them all), the backbone from the
    one ``init_backbone`` (its random-weights warning included). ``task``: the registry entry that runs
    it, the ``task`` of the result rows.

    ``label_fraction`` / ``shots``: low-label k-NN (and sweep): only the stratified subset of the
    training images is extracted and searched, the subset a fine-tuning run with the default seed
    (0) trains on; it is written to ``label_subset.json`` and named in the protocols (``knn20@10%``,
    ``linprobe_sweep@10%``), which keeps the rows out of the full-label columns."""
    from mae_transfer.checkpoint import describe_checkpoint, init_backbone
    from mae_transfer.classification.datasets import build_dataset, num_classes_of
    from mae_transfer.classification.knn import knn_evaluate
    from mae_transfer.classification.subsets import subset_label, subset_of, write_subset

    if label_fraction is not None and shots is not None:
        raise ConfigError("--label-fraction and --shots both given: give one")
    if dist is None:
        dist = DistInfo(device=resolve_device(device))
    dev = dist.device
    ctx = EvalContext.for_process(dist, "fp32", Path(output))
    inferred = {}
    if backbone:
        inferred = describe_checkpoint(backbone, trust=trust)
    name, size = frozen_model(inferred, model, img_size, toy=not data)
    cfg = ClassificationConfig(model=ModelConfig(name=name, img_size=size, global_pool="token"))
    cfg.data.dataset, cfg.data.path = dataset, data
    tf = eval_transform(cfg)
    train = build_dataset(dataset, data, "train", transform=tf)
    val = build_dataset(dataset, data, "val", transform=tf)
    num_classes = max(num_classes_of(train), num_classes_of(val))
    # Low-label: the subset of the classification tasks' rule with their default seed (k-NN has none).
    labels = subset_label(label_fraction, shots)
    train = subset_of(train, label_fraction, shots, seed=0)
    if labels is not None and dist.is_main:
        Path(output).mkdir(parents=True, exist_ok=True)
        write_subset(train, Path(output) / "label_subset.json", label_fraction, shots, seed=0)
        log.info("low-label k-NN: %d of %d training images (%s)", len(train), len(train.dataset), labels)
    at = f"@{labels}" if labels else ""
    # Seeded like the training tasks' default train.seed: without --backbone the random-init
    # baseline is the same network on every run (torch seeds its generator from the OS otherwise).
    torch.manual_seed(0)
    vit = create_backbone(cfg.model, img_size=size, num_classes=0, global_pool="token", drop_path_rate=0.0)
    init_backbone(
        vit,
        backbone,
        expected_missing=(),
        expected_unexpected=["fc_norm.*", "head.*", "mask_token", "decoder_*"],
        trust=trust,
    )
    vit.to(dev).eval()
    main = dist.is_main
    (tr_f, tr_y), (va_f, va_y) = split_features(vit, ctx, train, val, batch_size)
    results = knn_evaluate(tr_f, tr_y, va_f, va_y, num_classes, ks=ks)  # every process scores its share of queries
    if not main:  # the main process runs the sweep and writes the results
        return ""
    rows, lines = [], [f"{'evaluation':22s} {'top-1':>7s} {'top-5':>7s} {'mean/cls':>9s}"]
    common = dict(
        task=task,
        dataset=dataset_name(dataset, data, num_classes, benchmark_classes=NUM_CLASSES.get(dataset)),
        split="val",
        model=name,
        backbone=backbone or "random init",
        backbone_sha256=weights_sha256(backbone) if backbone else None,
    )
    for k, m in results.items():
        lines.append(f"{'k-NN k=' + str(k):22s} {m['top1']:7.2f} {m['top5']:7.2f} {m['mean_per_class']:9.2f}")
        rows += [
            ResultRow(protocol=f"knn{k}{at}", metric=key, value=m[key], **common)
            for key in ("top1", "top5", "mean_per_class")
        ]
    if sweep:
        from mae_transfer.classification.linear_sweep import linear_probe_sweep

        s = linear_probe_sweep(tr_f, tr_y, va_f, va_y, num_classes, device=dev)
        best = s["best"]
        if best is None:
            raise FloatingPointError(
                "every learning rate of the linear-probe sweep diverged; the features hold inf/NaN values"
            )
        lines.append(
            f"{'linear sweep lr=' + format(best['lr'], '.3g'):22s} "
            f"{best['top1']:7.2f} {best['top5']:7.2f} {best['mean_per_class']:9.2f}"
        )
        rows += [
            ResultRow(protocol=f"linprobe_sweep{at}", metric=key, value=best[key], extra={"lr": best["lr"]}, **common)
            for key in ("top1", "top5", "mean_per_class")
        ]
    path = write_run_results(output, rows)
    return "\n".join(lines + [f"results: {path}"])


class KnnMonitor:
    """Online k-NN during pretraining (``pretrain --knn-data DIR``): called by the engine's
    evaluation hook with the model being pretrained (an MAE, whose encoder is the ViT) and the
    evaluation's :class:`EvalContext`; extracts the class-token features of ``DIR``'s train and val
    splits at the model's input size (the ``knn`` task's transform and features, each process its
    shard under torchrun) and returns the weighted k-NN top-1 / top-5 of val (``knn_top1``,
    ``knn_top5``), logging what it cost."""

    def __init__(self, data: str, k: int = 20, batch_size: int = 128, img_size: int = 224):
        from mae_transfer.classification.datasets import build_dataset, num_classes_of

        cfg = ClassificationConfig(model=ModelConfig(img_size=img_size, global_pool="token"))
        cfg.data.path = data
        tf = eval_transform(cfg)
        self.train = build_dataset("imagefolder", data, "train", transform=tf)
        self.val = build_dataset("imagefolder", data, "val", transform=tf)
        self.num_classes = max(num_classes_of(self.train), num_classes_of(self.val))
        self.k, self.batch_size = int(k), int(batch_size)

    def __call__(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        from mae_transfer.classification.knn import knn_evaluate

        t0 = time.perf_counter()
        main = ctx.dist.is_main
        (tr_f, tr_y), (va_f, va_y) = split_features(model, ctx, self.train, self.val, self.batch_size, "k-NN features")
        m = knn_evaluate(tr_f, tr_y, va_f, va_y, self.num_classes, ks=(self.k,))[self.k]
        if main:
            log.info(
                "online k-NN (k=%d): top-1 %.2f top-5 %.2f on %d val / %d train images, %.1f s",
                self.k,
                m["top1"],
                m["top5"],
                len(self.val),
                len(self.train),
                time.perf_counter() - t0,
            )
        return {"knn_top1": float(m["top1"]), "knn_top5": float(m["top5"])}
