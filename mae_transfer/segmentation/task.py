"""ADE20K semantic segmentation as an engine task: UperNet on a ViT, trained and evaluated.

Outputs in the run directory: ``metrics.json`` (mIoU, mAcc, aAcc and per-class IoU / accuracy
with class names), ``results.jsonl`` (one row per metric, for the evaluation runner),
``segmenter.pth`` (weights + config, for ``--eval-only --weights``) and with ``visualize`` N
pictures ``image | ground truth | prediction`` in the ADE20K palette.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mae_transfer.checkpoint import load_trained_model, read_trained_model, save_trained_model
from mae_transfer.config import ConfigError, config_hash, to_dict
from mae_transfer.data.errors import DataError
from mae_transfer.data.seeded import SeededTransformDataset
from mae_transfer.engine.distributed import DistInfo
from mae_transfer.engine.optim import param_groups
from mae_transfer.engine.sampler import ShardSampler
from mae_transfer.engine.trainer import OptimConfig, Trainer, TrainTask
from mae_transfer.io import atomic_write_json, atomic_write_jsonl, file_sha256
from mae_transfer.segmentation.ade20k import IGNORE_INDEX, EvalTransform, SegmentationFolder, TrainTransform, collate_eval, palette
from mae_transfer.segmentation.config import SegmentationConfig
from mae_transfer.segmentation.metrics import SegmentationMeter
from mae_transfer.segmentation.model import build_upernet, slide_inference

log = logging.getLogger(__name__)

VIT_PREFIX = "backbone.vit."
SEGMENTER_FORMAT = "mae_transfer.segmenter"


def build_segmenter(cfg: SegmentationConfig) -> nn.Module:
    m = cfg.model
    try:
        return build_upernet(
            m.name, cfg.data.num_classes, img_size=m.img_size, tap_blocks=m.tap_blocks, use_rel_pos=m.use_rel_pos,
            drop_path=m.drop_path, channels=m.channels, aux_channels=m.aux_channels, grad_checkpointing=m.grad_checkpointing,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _resolve_root(cfg: SegmentationConfig) -> Path:
    if cfg.data.path:
        root = Path(cfg.data.path).expanduser()
        if not root.is_dir():
            raise DataError(
                f"--data {root} does not exist; pass the ADEChallengeData2016 folder (images/ and annotations/ "
                "with training/ and validation/ inside) or the folder that holds it"
            )
        return root
    from mae_transfer.data.toy import ensure_toy_dataset

    return ensure_toy_dataset("ade20k")


class SegmentationTask(TrainTask):
    """UperNet on a ViT backbone, trained on random crops and evaluated with sliding windows."""

    name = "segmentation"

    def __init__(self, cfg: SegmentationConfig, train: bool = True):
        self.cfg = cfg
        d = cfg.data
        self.root = _resolve_root(cfg)
        common = dict(num_classes=d.num_classes, reduce_zero_label=d.reduce_zero_label, bad_labels=d.bad_labels, missing=d.missing)
        self.val_set = SegmentationFolder(self.root, d.val_split, transform=EvalTransform(tuple(d.scale), d.mean, d.std), **common)
        self.class_names = list(self.val_set.class_names)
        self.train_set = None
        if train:
            base = SegmentationFolder(self.root, d.train_split, **common)
            aug = TrainTransform(
                crop_size=cfg.model.img_size, scale=tuple(d.scale), ratio_range=tuple(d.ratio_range), cat_max_ratio=d.cat_max_ratio,
                flip_prob=d.flip_prob, photometric=d.photometric, mean=d.mean, std=d.std,
            )
            self.train_set = SeededTransformDataset(base, aug, seed=cfg.train.seed)
        self.backbone_sha256 = file_sha256(cfg.backbone) if cfg.backbone else None
        self.last_eval: dict[str, Any] = {}

    # ------------------------------------------------------------------ engine interface
    def signature(self) -> dict[str, Any]:
        m = self.cfg.model
        return {"model": m.name, "img_size": m.img_size, "tap_blocks": m.tap_blocks, "use_rel_pos": m.use_rel_pos,
                "channels": m.channels, "aux_channels": m.aux_channels, "num_classes": self.cfg.data.num_classes}

    def build_model(self, load_backbone: bool = True) -> nn.Module:
        torch.manual_seed(self.cfg.train.seed)
        model = build_segmenter(self.cfg)
        if load_backbone and self.cfg.backbone:
            from mae_transfer.checkpoint import load_backbone as load

            # New: the zero-initialised relative position tables (MAE A.4), pyramid and heads.
            load(model.backbone.vit, self.cfg.backbone, expected_missing="dense", expected_unexpected="dense")
        elif load_backbone:
            log.warning(
                "NO --backbone: the ViT starts from RANDOM weights (the from-scratch baseline); pass "
                "--backbone ckpt.pth to evaluate pretrained weights"
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            if torch.cuda.is_available():
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BEiT / mmsegmentation: SyncBN
        return model

    def build_train_dataset(self):
        if self.train_set is None:
            raise RuntimeError("this SegmentationTask was built for evaluation only")
        return self.train_set

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        # Layer decay over the ViT (BEiT's LayerDecayOptimizerConstructor: 0.65); no weight decay
        # for norms, biases, position embedding and class token.
        return param_groups(model, optim.weight_decay, optim.layer_decay, no_weight_decay=("pos_embed", "cls_token"), vit_prefix=VIT_PREFIX)

    def training_step(self, model: nn.Module, batch, device: torch.device):
        images, targets = batch
        x = images.to(device, non_blocking=True)
        y = targets["label"].to(device, non_blocking=True)
        out = model(x)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        loss_main = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
        extra = {"loss_decode": loss_main.detach()}
        loss = loss_main
        if aux is not None:
            loss_aux = F.cross_entropy(aux.float(), y, ignore_index=IGNORE_INDEX)
            loss = loss + self.cfg.model.aux_weight * loss_aux
            extra["loss_aux"] = loss_aux.detach()
        if not torch.isfinite(loss) and bool((y == IGNORE_INDEX).all()):
            loss = logits.sum() * 0.0  # a batch of crops without any labelled pixel teaches nothing
        return loss, extra

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        every = self.cfg.eval_every_epochs
        if every <= 0 or (epoch + 1) % every or epoch + 1 == self.cfg.train.epochs:
            return
        self.last_eval = self.run_eval(trainer.unwrapped, trainer.device, trainer.autocast, trainer.dist, trainer.num_workers(), trainer.output_dir)
        if trainer.dist.is_main:
            trainer.metrics.write("eval", {"step": trainer.step, "epoch": epoch + 1, **summary(self.last_eval)})

    def on_train_end(self, trainer: Trainer) -> None:
        out = trainer.output_dir
        if trainer.dist.is_main:
            save_segmenter(trainer.unwrapped, self.cfg, self.class_names, out / "segmenter.pth")
        self.last_eval = self.run_eval(trainer.unwrapped, trainer.device, trainer.autocast, trainer.dist, trainer.num_workers(), out)
        if trainer.dist.is_main:
            epoch = math.ceil(trainer.step / trainer.steps_per_epoch)
            trainer.metrics.write("eval", {"step": trainer.step, "epoch": epoch, **summary(self.last_eval)})
            self.write_results(out, self.last_eval, trainer.step)
            if self.cfg.visualize:
                self.visualize(trainer.unwrapped, trainer.device, trainer.autocast, out / "visualize")

    # ------------------------------------------------------------------ evaluation
    def predict_logits(self, model: nn.Module, image: torch.Tensor, out_size, autocast: Callable) -> torch.Tensor:
        """Class probabilities (C, H, W) at ``out_size`` for one resized, normalised image, averaged
        over the test scales and flips; each pass is sliding-window (or whole-image) inference."""
        t = self.cfg.test
        crop, c = self.cfg.model.img_size, self.cfg.data.num_classes
        x = image.unsqueeze(0)
        probs = None
        for s in t.scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            for flip in ([False, True] if t.flip else [False]):
                xi = xs.flip(-1) if flip else xs
                with autocast():
                    logits = slide_inference(model, xi, c, crop, t.stride) if t.mode == "slide" else model(xi)
                logits = logits.float().flip(-1) if flip else logits.float()
                p = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False).softmax(1)
                probs = p if probs is None else probs + p
        return probs[0]

    def run_eval(self, model: nn.Module, device: torch.device, autocast: Callable, dist: DistInfo, num_workers: int,
                 out_dir: Path | None) -> dict[str, Any]:
        """mIoU / mAcc / aAcc over the evaluation split, accumulated over every image and process."""
        from tqdm.auto import tqdm

        ds = self.val_set
        loader = DataLoader(ds, batch_size=1, sampler=ShardSampler(len(ds), dist.rank, dist.world_size),
                            num_workers=num_workers, collate_fn=collate_eval)
        meter = SegmentationMeter(self.cfg.data.num_classes)
        was_training = model.training
        model.eval()
        t0 = time.monotonic()
        with torch.no_grad():
            for images, targets in tqdm(loader, desc=f"evaluating {self.cfg.data.val_split}", unit="img",
                                        disable=not dist.is_main, leave=False, mininterval=5.0):
                label = targets[0]["label"]
                probs = self.predict_logits(model, images[0].to(device), label.shape[-2:], autocast)
                meter.update(probs.argmax(0).cpu(), label)
        model.train(was_training)
        seconds = time.monotonic() - t0
        meter.all_reduce()
        if not dist.is_main:
            return {}
        metrics = meter.compute(self.class_names)
        metrics["time"] = {"seconds": seconds, "images": len(ds), "images_per_second": len(ds) / max(seconds, 1e-9)}
        log.info("%s", format_metrics(metrics, self.cfg))
        if out_dir is not None:
            atomic_write_json(Path(out_dir) / "metrics.json", metrics)
        return metrics

    def write_results(self, out_dir: Path, metrics: dict, step: int) -> Path:
        cfg = self.cfg
        test = "ms" if len(cfg.test.scales) > 1 else "ss"
        common = {
            "task": "ade20k",
            "dataset": "ade20k" if cfg.data.path else "ade20k (toy)",
            "split": cfg.data.val_split,
            "protocol": f"{cfg.recipe}_{test}{'+flip' if cfg.test.flip else ''}",
            "backbone": cfg.backbone or "random init",
            "backbone_sha256": self.backbone_sha256,
            "config_hash": config_hash(cfg, exclude=("data", "backbone", "visualize")),
            "step": step,
        }
        rows = [{**common, "metric": k, "value": v} for k, v in summary(metrics).items()]
        path = atomic_write_jsonl(Path(out_dir) / "results.jsonl", rows)
        atomic_write_json(Path(out_dir) / "config_resolved.json", to_dict(cfg))
        return path

    def visualize(self, model: nn.Module, device: torch.device, autocast: Callable, out_dir: Path) -> list[Path]:
        """Save ``image | ground truth | prediction`` pictures (palette colours, ignored pixels black)."""
        from PIL import Image

        from mae_transfer.data.folder import load_rgb

        colors = palette(self.cfg.data.num_classes)
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: len(colors)] = colors
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for i in range(min(self.cfg.visualize, len(self.val_set))):
                image, target = self.val_set[i]
                label = target["label"]
                pred = self.predict_logits(model, image.to(device), label.shape[-2:], autocast).argmax(0).cpu()
                original = np.asarray(load_rgb(self.val_set.samples[i][0]))
                panels = [original, lut[label.numpy().clip(0, 255)], lut[pred.numpy()]]
                k = max(1, math.ceil(256 / max(original.shape[:2])))  # enlarge small images to be seen
                panels = [p.repeat(k, axis=0).repeat(k, axis=1) for p in panels]
                sheet = np.concatenate([np.pad(p, ((0, 0), (0, 6), (0, 0)), constant_values=255) for p in panels], axis=1)
                path = out_dir / f"{Path(self.val_set.samples[i][0]).stem}.png"
                Image.fromarray(sheet).save(path)
                paths.append(path)
        model.train(was_training)
        log.info("saved %d pictures (image | ground truth | prediction) to %s", len(paths), out_dir)
        return paths


def summary(metrics: dict) -> dict[str, float]:
    """The headline numbers in percent: mIoU, mAcc, aAcc."""
    return {k: 100.0 * float(metrics[k]) for k in ("mIoU", "mAcc", "aAcc") if k in metrics}


def format_metrics(metrics: dict, cfg: SegmentationConfig) -> str:
    s = summary(metrics)
    where = f"{'ADE20K' if cfg.data.path else 'toy ADE20K'} {cfg.data.val_split}"
    lines = [f"{where:28s} {'mIoU':>7s} {'mAcc':>7s} {'aAcc':>7s}",
             f"{'':28s} {s.get('mIoU', math.nan):7.2f} {s.get('mAcc', math.nan):7.2f} {s.get('aAcc', math.nan):7.2f}"]
    t = metrics.get("time")
    if t:
        lines.append(f"evaluated {t['images']} images in {t['seconds']:.1f} s ({t['images_per_second']:.2f} img/s)")
    return "\n".join(lines)


def save_segmenter(model: nn.Module, cfg, class_names: list[str], path: Path) -> Path:
    """The trained model's weights with its config and class names (atomic)."""
    return save_trained_model(model, cfg, path, SEGMENTER_FORMAT, class_names=class_names)


def read_segmenter_weights(path: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict and saved config from ``segmenter.pth`` or a training checkpoint of a ade20k run."""
    return read_trained_model(path, "decode_head.", "segmenter.pth", "ade20k", trust=trust)


load_segmenter_weights = load_trained_model


__all__ = ["SegmentationTask", "build_segmenter", "format_metrics", "read_segmenter_weights", "load_segmenter_weights", "summary"]
