"""Classification transfer as an engine task: fine-tuning, linear probing, partial fine-tuning, attentive
probing (:mod:`mae_transfer.classification.attentive`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torchvision import transforms

from mae_transfer.checkpoint import (
    class_count_hint,
    init_backbone,
    load_trained_model,
    read_trained_model,
    save_trained_model,
    weights_sha256,
)
from mae_transfer.classification.config import ClassificationConfig
from mae_transfer.classification.data_spec import NUM_CLASSES
from mae_transfer.classification.subsets import LabelSubset, subset_label, subset_of, write_subset
from mae_transfer.config import ConfigError, to_dict
from mae_transfer.engine.optim import param_groups
from mae_transfer.engine.results import ResultRow, dataset_name, row_identity, write_run_results
from mae_transfer.engine.trainer import EvalContext, OptimConfig, Trainer, TrainTask
from mae_transfer.models.backbone import create_backbone

log = logging.getLogger(__name__)


def eval_transform(cfg: ClassificationConfig) -> transforms.Compose:
    """Resize to size / crop_pct (bicubic) + centre crop: 224/256 up to 224 px, 1.0 above (official)."""
    size = cfg.model.img_size
    crop_pct = cfg.data.crop_pct or (224 / 256 if size <= 224 else 1.0)
    return transforms.Compose(
        [
            transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(cfg.data.mean, cfg.data.std),
        ]
    )


def _posterize_zero_bits_compatible() -> None:
    """timm's RandAugment asks for ``posterize(bits=0)`` at full magnitude ('inc1' policies); Pillow
    13 rejects 0 where older Pillow returned a black image. Keep the old meaning for those ops."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **_):
        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)  # every bit dropped: black, as Pillow < 13 did
        return ImageOps.posterize(img, bits_to_keep)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = posterize


def train_transform(cfg: ClassificationConfig):
    """Fine-tuning: timm's RandAugment + random erasing pipeline; linear probe: crop + flip only."""
    d, size = cfg.data, cfg.model.img_size
    if cfg.protocol == "linprobe":
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    size, scale=(d.min_scale, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(d.mean, d.std),
            ]
        )
    from timm.data import create_transform

    _posterize_zero_bits_compatible()
    return create_transform(
        input_size=size,
        is_training=True,
        scale=(d.min_scale, 1.0),
        color_jitter=None,
        auto_augment=d.auto_augment,
        interpolation="bicubic",
        re_prob=d.reprob,
        re_mode="pixel",
        re_count=1,
        mean=d.mean,
        std=d.std,
    )


def lr_factors(cfg: ClassificationConfig) -> tuple[float, ...]:
    """The lr factor of each attentive head: ``model.lr_sweep``, or one head at the run's lr."""
    return tuple(cfg.model.lr_sweep) if cfg.model.lr_sweep else (1.0,)


def build_classifier(cfg: ClassificationConfig, num_classes: int) -> nn.Module:
    """The backbone with its head for the protocol (random weights; the backbone is loaded separately):
    a VisionTransformer, or for the attentive probe an :class:`AttentiveProbe` around one."""
    m = cfg.model
    if cfg.protocol == "attentive":
        from mae_transfer.classification.attentive import AttentiveProbe

        # No pooling and no classifier in the ViT (its final norm kept): the probe reads every token.
        vit = create_backbone(m, img_size=m.img_size, num_classes=0, global_pool="", drop_path_rate=0.0)
        try:
            return AttentiveProbe(vit, num_classes, len(lr_factors(cfg)), m.attentive_heads)
        except ValueError as e:
            raise ConfigError(f"model.attentive_heads: {e}; give a divisor of the width") from None
    model = create_backbone(
        m,
        img_size=m.img_size,
        num_classes=num_classes,
        global_pool=m.global_pool,
        drop_path_rate=m.drop_path if cfg.protocol != "linprobe" else 0.0,
    )
    if cfg.protocol == "linprobe":
        # Official linear probe: BatchNorm without affine in front of the linear head, head init
        # trunc_normal(std 0.01) (MAE-repo main_linprobe.py).
        linear = nn.Linear(model.embed_dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        model.head = nn.Sequential(nn.BatchNorm1d(model.embed_dim, affine=False, eps=1e-6), linear)
    return model


def freeze_for_protocol(model: nn.Module, cfg: ClassificationConfig) -> list[str]:
    """Switch off gradients where the protocol freezes the backbone; returns the trainable names."""
    if cfg.protocol == "finetune":
        return [n for n, _ in model.named_parameters()]
    if cfg.protocol == "attentive":  # the whole backbone frozen, the attentive heads train
        names = []
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
            if p.requires_grad:
                names.append(name)
        return names
    k = cfg.model.trainable_blocks if cfg.protocol == "partial" else 0
    depth = len(model.blocks)
    if k is not None and not 0 <= k <= depth:
        raise ValueError(f"model.trainable_blocks must be in 0..{depth}, got {k}")
    trainable_blocks = {str(i) for i in range(depth - (k or 0), depth)}
    names = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        train = name.startswith(("head.", "fc_norm.")) or (
            cfg.protocol == "partial"
            and (name.startswith("norm.") or (parts[0] == "blocks" and parts[1] in trainable_blocks))
        )
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


class ClassificationTask(TrainTask):
    """A ViT classifier trained with one of the MAE paper's protocols and evaluated on val."""

    name = "classification"

    def __init__(self, cfg: ClassificationConfig, train: bool = True):
        from mae_transfer.classification.datasets import build_dataset, num_classes_of

        self.cfg = cfg
        d = cfg.data
        # Evaluation only (--eval-only) reads the validation split alone.
        self.train_set = (
            build_dataset(
                d.dataset, d.path, "train", transform=train_transform(cfg), seed=cfg.train.seed, missing=d.missing
            )
            if train
            else None
        )
        if self.train_set is not None:  # low-label transfer: a stratified subset, drawn with train.seed
            self.train_set = subset_of(self.train_set, d.label_fraction, d.shots, cfg.train.seed)
            if isinstance(self.train_set, LabelSubset):
                log.info(
                    "training on %s of the labels: %d of %d images (train.seed %d)",
                    self.train_set.label,
                    len(self.train_set),
                    len(self.train_set.dataset),
                    cfg.train.seed,
                )
        self.val_set = build_dataset(
            d.dataset, d.path, "val", transform=eval_transform(cfg), seed=None, missing=d.missing
        )
        self.num_classes = max(num_classes_of(self.train_set) if train else 0, num_classes_of(self.val_set))
        self.mixup = None
        if cfg.protocol != "linprobe" and (d.mixup > 0 or d.cutmix > 0):
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=d.mixup,
                cutmix_alpha=d.cutmix,
                prob=1.0,
                switch_prob=0.5,
                mode="batch",
                label_smoothing=d.smoothing,
                num_classes=self.num_classes,
            )
        self.backbone_sha256 = weights_sha256(cfg.backbone) if cfg.backbone else None
        self.last_eval: dict[str, float] = {}
        self.best_top1 = float("-inf")
        self.peak_lr: float | None = None  # the run's peak lr (the trainer's), for an lr sweep's report

    def signature(self) -> dict[str, Any]:
        sig = {
            "model": self.cfg.model.name,
            "img_size": self.cfg.model.img_size,
            "protocol": self.cfg.protocol,
            "num_classes": self.num_classes,
            "global_pool": self.cfg.model.global_pool,
        }
        if self.cfg.protocol == "attentive":
            sig.update(lr_factors=list(lr_factors(self.cfg)), attentive_heads=self.cfg.model.attentive_heads)
        return sig

    def build_model(self, load_backbone: bool = True) -> nn.Module:
        torch.manual_seed(self.cfg.train.seed)
        model = build_classifier(self.cfg, self.num_classes)
        if not load_backbone:  # --eval-only: the trained weights come next
            freeze_for_protocol(model, self.cfg)
            return model
        # Official main_finetune.py: only the head (and fc_norm when it replaces norm) may be missing.
        missing = ["head.*"] + (["fc_norm.*"] if self.cfg.model.global_pool == "avg" else [])
        unexpected = ["norm.*", "mask_token", "decoder_*", "fc_norm.*", "head.*"]
        if self.cfg.protocol == "attentive":  # the ViT alone (no head, final norm kept) takes the weights
            missing, unexpected = [], ["mask_token", "decoder_*", "fc_norm.*", "head.*"]
        init_backbone(
            model.backbone if self.cfg.protocol == "attentive" else model,
            self.cfg.backbone,
            expected_missing=missing,
            expected_unexpected=unexpected,
            trust=self.cfg.trust_checkpoint,
        )
        trainable = freeze_for_protocol(model, self.cfg)
        if self.cfg.protocol != "finetune":
            log.info(
                "%s: training %d of %d parameter tensors (%s)",
                self.cfg.protocol,
                len(trainable),
                len(list(model.parameters())),
                ", ".join(
                    sorted(
                        {
                            n.split(".")[0] + (("." + n.split(".")[1]) if n.startswith("blocks") else "")
                            for n in trainable
                        }
                    )
                ),
            )
        return model

    def build_train_dataset(self):
        return self.train_set

    def check_data(self, trainer) -> None:
        if self.cfg.protocol == "attentive":
            self.peak_lr = trainer.peak_lr
            if self.cfg.head_clip_grad is not None:  # each head's own gradient norm, before every step
                from mae_transfer.classification.attentive import clip_each_head

                trainer.optimizer.register_step_pre_hook(clip_each_head(trainer.unwrapped, self.cfg.head_clip_grad))
        if trainer.dist.is_main:  # the subset a low-label run trains on, before its first step
            d = self.cfg.data
            write_subset(
                self.train_set, trainer.output_dir / "label_subset.json", d.label_fraction, d.shots, self.cfg.train.seed
            )

    def on_train_end(self, trainer) -> None:
        self.peak_lr = trainer.peak_lr  # also when a finished run is resumed (no check_data then)

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        if self.cfg.protocol == "attentive":  # per head: its lr factor (an lr sweep in one pass)
            from mae_transfer.classification.attentive import head_param_groups

            return head_param_groups(model, lr_factors(self.cfg), optim.weight_decay)
        no_wd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        return param_groups(model, optim.weight_decay, optim.layer_decay, no_weight_decay=no_wd)

    def training_step(self, model: nn.Module, batch: dict, device: torch.device):
        if self.cfg.protocol == "linprobe":
            # The frozen encoder stays in eval mode (no drop path, as in the official probe); only
            # the head's BatchNorm runs in training mode.
            core = getattr(model, "module", model)
            core.eval()
            core.head.train()
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        if self.cfg.protocol == "attentive":
            return self._attentive_step(model, x, y, batch)
        if self.mixup is not None:
            x, soft = self._mix(x, y, batch)
            logits = model(x)
            loss = torch.sum(-soft * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=self.cfg.data.smoothing)
        return loss, {}

    def _mix(self, x: torch.Tensor, y: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup / cutmix of a batch (soft targets); the draw is seeded from the batch."""
        if x.shape[0] % 2:
            raise ValueError("mixup/cutmix needs an even batch size per process")
        # Mixup draws from numpy's global RNG: seed it from the batch so that a resumed run
        # mixes the same pairs with the same weights.
        import numpy as np

        np.random.seed((int(batch["index"].sum()) * 7919 + self.cfg.train.seed) % (2**32))
        return self.mixup(x, y)

    def _attentive_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: dict):
        """One backbone pass, every head on its tokens; each head's own loss (see ``sweep_objective``)."""
        from mae_transfer.classification.attentive import sweep_losses, sweep_objective

        if self.mixup is not None:
            x, y = self._mix(x, y, batch)
        logits = model(x, all_heads=True)  # (N, B, C)
        losses = sweep_losses(logits, y, self.cfg.data.smoothing)
        factors = lr_factors(self.cfg)
        extra = {f"loss_x{f:g}": losses[i].detach() for i, f in enumerate(factors)} if len(factors) > 1 else {}
        return sweep_objective(losses), extra

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        from mae_transfer.classification.metrics import evaluate_classifier

        if self.cfg.protocol == "attentive":
            return self._evaluate_heads(model, ctx)
        return evaluate_classifier(
            model,
            ctx.loader(self.val_set, self.cfg.eval_batch_size),
            ctx.device,
            self.num_classes,
            autocast=ctx.autocast,
        )

    def _evaluate_heads(self, model: nn.Module, ctx: EvalContext) -> dict[str, Any]:
        """Every attentive head on val (one backbone pass per batch); the metrics are the best head's
        (by top-1, chosen on val: a sweep), with each lr's in ``sweep``. ``forward`` then uses that head."""
        from mae_transfer.classification.attentive import evaluate_heads, pick_best

        results = evaluate_heads(
            model, ctx.loader(self.val_set, self.cfg.eval_batch_size), ctx.device, self.num_classes, ctx.autocast
        )
        best = pick_best(results)
        getattr(model, "module", model).selected = best
        factors = lr_factors(self.cfg)
        peak = self.peak_lr
        sweep = [{"lr_factor": f, "lr": peak * f if peak is not None else None, **r} for f, r in zip(factors, results)]
        return {**results[best], "lr_factor": factors[best], "lr": sweep[best]["lr"], "sweep": sweep}

    def publish(self, model: nn.Module, ctx: EvalContext, metrics: dict, step: int) -> None:
        # The best top-1 over the run's evaluations, this final one included (--eval-only: its top-1).
        self.best_top1 = max(self.best_top1, metrics["top1"])
        extra = top1_extra = None
        if self.cfg.protocol == "attentive":
            extra = {"lr": metrics["lr"], "lr_factor": metrics["lr_factor"]}
            if len(metrics["sweep"]) > 1:  # which lr won, on which split, and (top-1 row) every lr's numbers
                extra["selected_on"] = "val"
                top1_extra = {
                    "lr_sweep": [
                        {k: r[k] for k in ("lr_factor", "lr", "top1", "top5", "mean_per_class")}
                        for r in metrics["sweep"]
                    ]
                }
        write_result_rows(
            ctx.output_dir,
            self.cfg,
            metrics,
            self.best_top1,
            self.backbone_sha256,
            step,
            self.evaluated,
            num_classes=self.num_classes,
            extra=extra,
            top1_extra=top1_extra,
        )

    # The evaluation policy (every eval_every_epochs, the final evaluation, publishing) is the
    # engine's; these say what it means for classification.
    def eval_every(self) -> int:
        return self.cfg.eval_every_epochs

    def save_trained(self, model: nn.Module, out_dir: Path, step: int) -> None:
        save_classifier(model, self.cfg, out_dir / "classifier.pth", step)

    def eval_record(self, metrics: dict) -> dict:
        record = {k: v for k, v in metrics.items() if k not in ("sweep", "lr")}
        sweep = metrics.get("sweep") or ()
        if len(sweep) > 1:  # each lr of a sweep (eval.csv, the curves)
            record.update({f"top1_x{r['lr_factor']:g}": r["top1"] for r in sweep})
        return record

    def on_eval(self, trainer: Trainer, metrics: dict, epoch: int, final: bool) -> None:
        self.best_top1 = max(self.best_top1, metrics["top1"])
        log.info(
            "epoch %d val: top-1 %.2f  top-5 %.2f  mean per class %.2f",
            epoch,
            metrics["top1"],
            metrics["top5"],
            metrics["mean_per_class"],
        )
        sweep = metrics.get("sweep") or ()
        if len(sweep) > 1:
            log.info("epoch %d lr sweep (val top-1, best chosen on val): %s", epoch, _sweep_text(sweep))


def _sweep_text(sweep: list[dict]) -> str:
    return "  ".join(
        f"x{r['lr_factor']:g}" + (f" (lr {r['lr']:.3g})" if r.get("lr") is not None else "") + f" {r['top1']:.2f}"
        for r in sweep
    )


CLASSIFIER_FORMAT = "mae_transfer.classifier"


def save_classifier(model: nn.Module, cfg: ClassificationConfig, path: Path, step: int = 0) -> Path:
    """The trained classifier with the config that builds it (``--eval-only --weights``)."""
    return save_trained_model(model, cfg, path, CLASSIFIER_FORMAT, step=int(step))


def read_classifier_weights(path: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict and config of a ``classifier.pth`` or ``checkpoint-last.pth`` of a classification run."""
    return read_trained_model(
        path, "head.", "classifier.pth", "finetune / linprobe / attentive / inat / places", trust=trust
    )


def load_classifier_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    load_trained_model(
        model,
        state,
        path,
        explain=class_count_hint(
            "head.weight", "head.1.weight", "head.0.linear.weight", advice="evaluate on data with the same classes"
        ),
    )


def benchmark_task(dataset: str, protocol: str) -> str:
    """The benchmark task a classification run belongs to (the ``task`` of its result rows, the
    runner's and the tables' name for it): the dataset for iNaturalist / Places (``inat2018``), the
    protocol for ImageNet-style folders (``finetune``, ``linprobe``, ``attentive``; partial fine-tuning
    counts as fine-tuning)."""
    if dataset != "imagefolder":
        return dataset
    return protocol if protocol in ("linprobe", "attentive") else "finetune"


def row_protocol(cfg: ClassificationConfig) -> str:
    """The protocol of the run's result rows: ``finetune``, or with the labels of a low-label run
    (``finetune@10%``, ``linprobe@5shot``), which keeps it out of the full-label columns."""
    label = subset_label(cfg.data.label_fraction, cfg.data.shots)
    return cfg.protocol if label is None else f"{cfg.protocol}@{label}"


def write_result_rows(
    out_dir: Path,
    cfg: ClassificationConfig,
    metrics: dict,
    best_top1: float,
    backbone_sha: str | None,
    step: int,
    evaluated: dict | None = None,
    num_classes: int | None = None,
    extra: dict | None = None,
    top1_extra: dict | None = None,
) -> Path:
    """One row per metric in ``results.jsonl`` (rewritten whole, atomically) for the runner and the tables
    (``num_classes``: of the data evaluated, which names other data than the benchmark's, :func:`dataset_name`;
    ``extra``: keys every row carries, e.g. the lr an attentive probe's sweep chose; ``top1_extra``: keys of
    the top-1 row alone, e.g. every lr's numbers)."""
    identity = row_identity(cfg, backbone_sha, evaluated)
    if extra:
        identity["extra"] = {**identity.get("extra", {}), **extra}
    common = dict(
        task=benchmark_task(cfg.data.dataset, cfg.protocol),
        dataset=dataset_name(
            cfg.data.dataset, cfg.data.path, num_classes, benchmark_classes=NUM_CLASSES.get(cfg.data.dataset)
        ),
        split="val",
        protocol=row_protocol(cfg),
        step=step,
        **identity,
    )
    rows = [ResultRow(metric=metric, value=metrics[metric], **common) for metric in ("top1", "top5", "mean_per_class")]
    rows.append(ResultRow(metric="top1_best_epoch", value=best_top1, **common))
    if top1_extra:
        rows[0] = rows[0].replace(extra={**rows[0].extra, **top1_extra})
    return write_run_results(out_dir, rows, to_dict(cfg))


def report(task: "ClassificationTask", cfg: ClassificationConfig) -> str:
    """The terminal summary of a finished run (the task registry's ``report``)."""
    text = format_results(task.last_eval, task.best_top1, cfg)
    sweep = task.last_eval.get("sweep") or ()
    if len(sweep) > 1:
        text += f"\nlr sweep, val top-1 per lr (the best, chosen on val, is reported above): {_sweep_text(sweep)}"
    return text


def format_results(metrics: dict, best_top1: float, cfg: ClassificationConfig) -> str:
    name = cfg.data.dataset + ("" if cfg.data.path else " (toy data)")
    lines = [
        f"{'dataset':28s} {'protocol':14s} {'top-1':>7s} {'top-5':>7s} {'mean/cls':>9s} {'best top-1':>11s}",
        f"{name:28s} {row_protocol(cfg):14s} {metrics['top1']:7.2f} {metrics['top5']:7.2f} "
        f"{metrics['mean_per_class']:9.2f} {best_top1:11.2f}",
    ]
    return "\n".join(lines)
