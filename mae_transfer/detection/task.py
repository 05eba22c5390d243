"""COCO instance detection as an engine task: Mask R-CNN on a ViT pyramid, trained and evaluated.

Training runs in the shared engine (DDP, accumulation, layer decay, exact resume); evaluation runs
the detector over the evaluation split (sharded over processes), converts the detections to COCO
results and scores them with pycocotools. Outputs in the run directory:

* ``metrics.json`` (bbox and segm AP, AP50, AP75, APs/m/l) and ``results.jsonl`` (one row per
  metric, for the evaluation runner),
* ``predictions_<split>.json`` in the COCO results format (for the COCO server or other tools),
* ``detector.pth``: the trained weights with their config and class names (``--weights``),
* ``visualize/*.png`` with ``--visualize N``: ground truth next to predictions.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from mae_transfer.checkpoint import load_trained_model, read_trained_model, save_trained_model
from mae_transfer.config import ConfigError, config_hash, to_dict
from mae_transfer.data.errors import DataError
from mae_transfer.detection.coco import CocoDetection, drop_crowd, evaluate_coco, predictions_to_coco_results, save_results_json
from mae_transfer.detection.config import DetectionConfig
from mae_transfer.detection.model import build_mask_rcnn, build_vit_backbone
from mae_transfer.detection.transforms import LargeScaleJitter, SeededTransformDataset, collate_detection
from mae_transfer.engine.distributed import DistInfo, gather_lists
from mae_transfer.engine.optim import param_groups
from mae_transfer.engine.sampler import ShardSampler
from mae_transfer.engine.trainer import OptimConfig, Trainer, TrainTask
from mae_transfer.io import atomic_write_json, atomic_write_jsonl, file_sha256

log = logging.getLogger(__name__)

VIT_PREFIX = "backbone.body.vit."  # where the ViT sits inside torchvision's MaskRCNN
DETECTOR_FORMAT = "mae_transfer.detector"


def build_detector(cfg: DetectionConfig, num_classes: int) -> nn.Module:
    """Mask R-CNN for ``num_classes`` (with background) as ``cfg.model`` describes (random weights)."""
    m = cfg.model
    try:
        backbone = build_vit_backbone(
            m.name, pyramid=m.pyramid, img_size=m.img_size, window_size=m.window_size, global_blocks=m.global_blocks,
            use_rel_pos=m.use_rel_pos, drop_path=m.drop_path, grad_checkpointing=m.grad_checkpointing,
            fpn_norm=m.head_norm if m.head_norm == "bn" else "none", channels=m.channels,
        )
    except ValueError as e:
        raise ConfigError(f"cannot build the {m.pyramid} backbone of {m.name}: {e}") from None
    return build_mask_rcnn(
        backbone, num_classes, img_size=m.img_size, head_norm=m.head_norm, head_channels=m.channels, fc_dim=m.fc_dim,
        box_batch_size_per_image=m.box_batch_size_per_image, score_thresh=m.score_thresh,
        detections_per_img=m.detections_per_img, image_mean=tuple(cfg.data.mean), image_std=tuple(cfg.data.std),
    )


def _resolve_root(cfg: DetectionConfig) -> Path:
    if cfg.data.path:
        root = Path(cfg.data.path).expanduser()
        if not root.is_dir():
            raise DataError(
                f"--data {root} does not exist; pass a COCO folder holding train2017/, val2017/ and "
                "annotations/instances_{train,val}2017.json"
            )
        return root
    from mae_transfer.data.toy import ensure_toy_dataset

    return ensure_toy_dataset("coco")


class DetectionTask(TrainTask):
    """Mask R-CNN on a ViT backbone, trained on one COCO split and evaluated on another."""

    name = "detection"
    collate_fn = staticmethod(collate_detection)

    def __init__(self, cfg: DetectionConfig, train: bool = True):
        self.cfg = cfg
        d = cfg.data
        self.root = _resolve_root(cfg)
        self.val_set = CocoDetection(self.root, d.val_split, keep_empty=True, skip_bad=d.skip_bad)
        self.class_names = self.val_set.class_names
        self.num_classes = len(self.class_names)  # with the background
        self.train_set = None
        if train:
            base = CocoDetection(self.root, d.train_split, keep_empty=d.train_empty, skip_bad=d.skip_bad)
            if base.cat_ids != self.val_set.cat_ids:
                raise DataError(
                    f"{base.annotation_file} and {self.val_set.annotation_file} define different categories "
                    f"({len(base.cat_ids)} vs {len(self.val_set.cat_ids)} ids); both splits need the same category list"
                )
            lsj = LargeScaleJitter(cfg.model.img_size, tuple(d.scale_range), d.flip_prob, fill=d.mean)
            self.train_set = SeededTransformDataset(base, lsj, seed=cfg.train.seed, prepare=drop_crowd)
        self.backbone_sha256 = file_sha256(cfg.backbone) if cfg.backbone else None
        self.last_eval: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ engine interface
    def signature(self) -> dict[str, Any]:
        m = self.cfg.model
        return {"model": m.name, "pyramid": m.pyramid, "img_size": m.img_size, "window_size": m.window_size,
                "use_rel_pos": m.use_rel_pos, "head_norm": m.head_norm, "channels": m.channels, "fc_dim": m.fc_dim,
                "num_classes": self.num_classes}

    def build_model(self, load_backbone: bool = True) -> nn.Module:
        torch.manual_seed(self.cfg.train.seed)
        model = build_detector(self.cfg, self.num_classes)
        if load_backbone and self.cfg.backbone:
            from mae_transfer.checkpoint import load_backbone as load

            # New in a detection backbone: relative position tables (zero-init), pyramid and heads
            # (outside the ViT); unused: class token, final norm, any classifier or MAE decoder.
            load(model.backbone.body.vit, self.cfg.backbone, expected_missing="dense", expected_unexpected="dense")
        elif load_backbone:
            log.warning(
                "NO --backbone: the ViT starts from RANDOM weights (the from-scratch baseline); pass "
                "--backbone ckpt.pth to evaluate pretrained weights"
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            if torch.cuda.is_available() and self.cfg.model.head_norm == "bn":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # Benchmarking-ViT: SyncBN
        return model

    def build_train_dataset(self):
        if self.train_set is None:
            raise RuntimeError("this DetectionTask was built for evaluation only")
        return self.train_set

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        # Layer decay over the ViT blocks; the pyramid and heads get the full lr. No weight decay
        # for norms, biases and the position embedding (detectron2 ViTDet optimizer settings).
        return param_groups(model, optim.weight_decay, optim.layer_decay, no_weight_decay=("pos_embed",), vit_prefix=VIT_PREFIX)

    def training_step(self, model: nn.Module, batch, device: torch.device):
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(v.float() for v in losses.values())
        return loss, {k: v.detach().float() for k, v in losses.items()}

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        every = self.cfg.eval_every_epochs
        if every <= 0 or (epoch + 1) % every or epoch + 1 == self.cfg.train.epochs:
            return  # the last epoch is evaluated by on_train_end
        self.last_eval = self.run_eval(trainer.unwrapped, trainer.device, trainer.autocast, trainer.dist, trainer.num_workers(), trainer.output_dir)
        trainer.metrics.write("eval", {"step": trainer.step, "epoch": epoch + 1, **flat_metrics(self.last_eval)})

    def on_train_end(self, trainer: Trainer) -> None:
        out = trainer.output_dir
        if trainer.dist.is_main:
            save_detector(trainer.unwrapped, self.cfg, self.class_names, out / "detector.pth")
        self.last_eval = self.run_eval(trainer.unwrapped, trainer.device, trainer.autocast, trainer.dist, trainer.num_workers(), out)
        if trainer.dist.is_main:
            trainer.metrics.write("eval", {"step": trainer.step, "epoch": math.ceil(trainer.step / trainer.steps_per_epoch), **flat_metrics(self.last_eval)})
            self.write_results(out, self.last_eval, trainer.step)
            if self.cfg.visualize:
                self.visualize(trainer.unwrapped, trainer.device, trainer.autocast, out / "visualize")

    # ------------------------------------------------------------------ evaluation
    def run_eval(
        self,
        model: nn.Module,
        device: torch.device,
        autocast: Callable,
        dist: DistInfo,
        num_workers: int,
        out_dir: Path | None,
    ) -> dict[str, dict[str, float]]:
        """Detect on the evaluation split (sharded over processes) and score with COCOeval."""
        from tqdm.auto import tqdm

        ds = self.val_set
        loader = DataLoader(
            ds, batch_size=self.cfg.eval_batch_size, sampler=ShardSampler(len(ds), dist.rank, dist.world_size),
            num_workers=num_workers, collate_fn=collate_detection, pin_memory=device.type == "cuda",
        )
        was_training = model.training
        model.eval()
        results: list[dict] = []
        t0 = time.monotonic()
        with torch.no_grad():
            for images, targets in tqdm(loader, desc=f"evaluating {self.cfg.data.val_split}", unit="batch",
                                        disable=not dist.is_main, leave=False, mininterval=5.0):
                with autocast():
                    outputs = model([im.to(device, non_blocking=True) for im in images])
                preds = [
                    {**{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()}, "image_id": t["image_id"]}
                    for o, t in zip(outputs, targets)
                ]
                results.extend(predictions_to_coco_results(preds, ds.label_to_cat_id))
        seconds = time.monotonic() - t0
        model.train(was_training)
        results = gather_lists(results)
        if not dist.is_main:
            return {}  # COCOeval runs once, on the main process
        metrics = evaluate_coco(ds.coco, results, image_ids=ds.image_ids)
        metrics["time"] = {"seconds": seconds, "images": len(ds), "images_per_second": len(ds) / max(seconds, 1e-9)}
        log.info("%s", format_metrics(metrics, self.cfg))
        if out_dir is not None:
            save_results_json(results, Path(out_dir) / f"predictions_{self.cfg.data.val_split}.json")
            atomic_write_json(Path(out_dir) / "metrics.json", metrics)
        return metrics

    def write_results(self, out_dir: Path, metrics: dict, step: int) -> Path:
        """One row per metric in ``results.jsonl`` (rewritten whole, atomically) for the runner."""
        cfg = self.cfg
        common = {
            "task": "coco",
            "dataset": "coco" if cfg.data.path else "coco (toy)",
            "split": cfg.data.val_split,
            "protocol": f"mask_rcnn_{cfg.recipe}",
            "backbone": cfg.backbone or "random init",
            "backbone_sha256": self.backbone_sha256,
            "config_hash": config_hash(cfg, exclude=("data", "backbone", "visualize", "visualize_score")),
            "step": step,
        }
        rows = [{**common, "metric": f"{kind}_{name}", "value": float(v)}
                for kind in ("bbox", "segm") for name, v in metrics[kind].items()]
        path = atomic_write_jsonl(Path(out_dir) / "results.jsonl", rows)
        atomic_write_json(Path(out_dir) / "config_resolved.json", to_dict(cfg))
        return path

    def visualize(self, model: nn.Module, device: torch.device, autocast: Callable, out_dir: Path) -> list[Path]:
        """Save ``cfg.visualize`` evaluation images with predictions next to the ground truth."""
        from mae_transfer.detection.visualize import save_comparison

        n = min(self.cfg.visualize, len(self.val_set))
        was_training = model.training
        model.eval()
        paths = []
        with torch.no_grad():
            for i in range(n):
                image, target = self.val_set[i]
                with autocast():
                    pred = model([image.to(device)])[0]
                pred = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in pred.items()}
                name = f"{int(target['image_id']):012d}.png"
                paths.append(save_comparison(image, target, pred, self.class_names, out_dir / name, self.cfg.visualize_score))
        model.train(was_training)
        log.info("saved %d pictures (ground truth | prediction) to %s", len(paths), out_dir)
        return paths


def flat_metrics(metrics: dict) -> dict[str, float]:
    return {f"{kind}_{name}": v for kind in ("bbox", "segm") for name, v in metrics.get(kind, {}).items()}


def format_metrics(metrics: dict, cfg: DetectionConfig) -> str:
    """A small table: AP, AP50, AP75, APs, APm, APl for boxes and masks."""
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    where = f"{'COCO' if cfg.data.path else 'toy COCO'} {cfg.data.val_split}"
    lines = [f"{where:24s} " + " ".join(f"{n:>6s}" for n in names)]
    for kind in ("bbox", "segm"):
        vals = metrics.get(kind, {})
        lines.append(f"{kind:24s} " + " ".join(f"{vals.get(n, float('nan')):6.2f}" for n in names))
    t = metrics.get("time")
    if t:
        lines.append(f"evaluated {t['images']} images in {t['seconds']:.1f} s ({t['images_per_second']:.2f} img/s)")
    return "\n".join(lines)


def save_detector(model: nn.Module, cfg, class_names: list[str], path: Path) -> Path:
    """The trained model's weights with its config and class names (atomic)."""
    return save_trained_model(model, cfg, path, DETECTOR_FORMAT, class_names=class_names)


def read_detector_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict and saved config from ``detector.pth`` or a training checkpoint of a coco run."""
    return read_trained_model(path, "roi_heads.", "detector.pth", "coco")


load_detector_weights = load_trained_model


__all__ = ["DetectionTask", "build_detector", "format_metrics", "read_detector_weights", "load_detector_weights", "save_detector"]
