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
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from mae_transfer.checkpoint import (
    CheckpointError,
    class_count_hint,
    init_backbone,
    load_trained_model,
    save_trained_model,
    weights_sha256,
)
from mae_transfer.config import ConfigError, to_dict
from mae_transfer.data.errors import DataError
from mae_transfer.data.seeded import SeededTransformDataset
from mae_transfer.detection.coco import CocoDetection, COCOEvaluator, drop_crowd, save_results_json
from mae_transfer.detection.config import DetectionConfig
from mae_transfer.detection.data_spec import NUM_CLASSES, TOY_DATA
from mae_transfer.detection.model import MaskRCNN, build_mask_rcnn, build_pyramid, detection_backbone, pixel_stats
from mae_transfer.detection.transforms import LargeScaleJitter, ResizeForTest, collate_detection
from mae_transfer.engine.distributed import convert_sync_batchnorm
from mae_transfer.engine.evaluator import run_evaluator
from mae_transfer.engine.optim import param_groups
from mae_transfer.engine.results import ResultRow, dataset_name, row_identity, write_run_results
from mae_transfer.engine.trainer import EvalContext, OptimConfig, Trainer, TrainTask
from mae_transfer.io import atomic_write_json

log = logging.getLogger(__name__)

DETECTOR_FORMAT = "mae_transfer.detector"
# Modules whose parameters get no weight decay: detectron2's norm types (ViTDet decays the heads'
# and the pyramid's channel LayerNorms, which are not torch.nn.LayerNorm, and all biases).
NO_DECAY_MODULES = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)


def build_detector(cfg: DetectionConfig, num_classes: int) -> MaskRCNN:
    """Mask R-CNN for ``num_classes`` object classes as ``cfg.model`` describes (random weights)."""
    m = cfg.model
    try:
        vit = detection_backbone(
            m,
            m.img_size,
            window_size=m.window_size,
            global_blocks=m.global_blocks,
            use_rel_pos=m.use_rel_pos,
            pretrain_img_size=m.pretrain_img_size,
        )
        backbone = build_pyramid(vit, m.pyramid, m.channels, fpn_norm=m.head_norm if m.head_norm == "bn" else "none")
    except ValueError as e:
        raise ConfigError(f"cannot build the {m.pyramid} backbone of {m.vit_label()}: {e}") from None
    mean, std = pixel_stats(cfg.data.mean, cfg.data.std)
    model = build_mask_rcnn(
        backbone,
        num_classes,
        img_size=m.img_size,
        head_norm=m.head_norm,
        head_channels=m.channels,
        fc_dim=m.fc_dim,
        rpn_convs=m.rpn_convs,
        box_head_convs=m.box_head_convs,
        mask_head_convs=m.mask_head_convs,
        box_batch_size_per_image=m.box_batch_size_per_image,
        rpn_pre_nms_topk=tuple(m.rpn_pre_nms_topk),
        rpn_post_nms_topk=tuple(m.rpn_post_nms_topk),
        score_thresh=m.score_thresh,
        nms_thresh=m.nms_thresh,
        detections_per_img=m.detections_per_img,
        pixel_mean=mean,
        pixel_std=std,
    )
    if m.predictor_init == "default":
        for layer in (
            model.roi_heads.box_predictor.cls_score,
            model.roi_heads.box_predictor.bbox_pred,
            model.roi_heads.mask_head.predictor,
        ):
            layer.reset_parameters()
    return model


def detection_param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """ViTDet's optimizer groups (detectron2 ``get_default_optimizer_params(weight_decay_norm=0,
    overrides={"pos_embed": {"weight_decay": 0}})`` with ``get_vit_lr_decay_rate``): weight decay
    on everything but torch's norm layers and ``pos_embed``; lr x ``layer_decay ** (depth + 1 -
    layer)`` with the embeddings at layer 0, block i at i + 1 and everything else (pyramid, heads)
    at full lr."""
    return param_groups(
        model, optim.weight_decay, optim.layer_decay, no_weight_decay=("pos_embed",), no_decay_modules=NO_DECAY_MODULES
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

    return ensure_toy_dataset(**TOY_DATA.arguments())


class DetectionTask(TrainTask):
    """Mask R-CNN on a ViT backbone, trained on one COCO split and evaluated on another."""

    name = "detection"
    collate_fn = staticmethod(collate_detection)

    def __init__(self, cfg: DetectionConfig, train: bool = True):
        self.cfg = cfg
        d = cfg.data
        self.root = _resolve_root(cfg)
        # With --skip-bad, an evaluation image found unreadable while evaluating is left out of it.
        self.val_set = CocoDetection(self.root, d.val_split, keep_empty=True, skip_bad=d.skip_bad, unreadable="drop")
        self.class_names = self.val_set.class_names
        self.num_classes = len(self.class_names)
        self.train_set = None
        if train:
            base = CocoDetection(self.root, d.train_split, keep_empty=d.train_empty, skip_bad=d.skip_bad)
            if base.cat_ids != self.val_set.cat_ids:
                raise DataError(
                    f"{base.annotation_file} and {self.val_set.annotation_file} define different categories "
                    f"({len(base.cat_ids)} vs {len(self.val_set.cat_ids)} ids); both splits need the same category list"
                )
            lsj = LargeScaleJitter(cfg.model.img_size, tuple(d.scale_range), d.flip_prob)
            self.train_set = SeededTransformDataset(base, lsj, seed=cfg.train.seed, prepare=drop_crowd)
        self.backbone_sha256 = weights_sha256(cfg.backbone) if cfg.backbone else None
        self.last_eval: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ engine interface
    def signature(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "model": m.vit_label(),
            "pyramid": m.pyramid,
            "img_size": m.img_size,
            "window_size": m.window_size,
            "use_rel_pos": m.use_rel_pos,
            "head_norm": m.head_norm,
            "channels": m.channels,
            "fc_dim": m.fc_dim,
            "num_classes": self.num_classes,
        }

    def build_model(self, load_backbone: bool = True) -> nn.Module:
        torch.manual_seed(self.cfg.train.seed)
        model = build_detector(self.cfg, self.num_classes)
        if load_backbone:
            # New in a detection backbone: relative position tables (zero-init), pyramid and heads
            # (outside the ViT); unused: class token, final norm, any classifier or MAE decoder.
            init_backbone(
                model.vit,
                self.cfg.backbone,
                expected_missing="dense",
                expected_unexpected="dense",
                trust=self.cfg.trust_checkpoint,
            )
        return convert_sync_batchnorm(model) if self.cfg.model.head_norm == "bn" else model  # Benchmarking-ViT: SyncBN

    def build_train_dataset(self):
        if self.train_set is None:
            raise RuntimeError("this DetectionTask was built for evaluation only")
        return self.train_set

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        return detection_param_groups(model, optim)

    def compile_targets(self, model: nn.Module) -> list[nn.Module]:
        """``--compile`` compiles the backbone (ViT and pyramid: one graph, most of the FLOPs); the
        RPN and RoI heads have data-dependent shapes (NMS, sampling) that would split them into
        dozens of graphs and recompile as the box counts change."""
        return [model.backbone]

    def training_step(self, model: nn.Module, batch, device: torch.device):
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        losses = model(images, targets)  # the model moves boxes and labels; polygons stay on the CPU
        loss = sum(v.float() for v in losses.values())
        return loss, {k: v.detach().float() for k, v in losses.items()}

    def eval_precision(self) -> str:
        """``eval_precision`` (fp32 by default, as detectron2 evaluates)."""
        return self.cfg.eval_precision

    def check_data(self, trainer: Trainer) -> None:
        """Before training: decode every image of the evaluation split (when it has at most
        ``UP_FRONT_CHECK_MAX`` images; each process its share, the findings gathered), so that an
        unreadable one stops the run now, not at the evaluation after training; with --skip-bad it
        is left out of the evaluation instead. Training images are checked as they are read."""
        ds = self.val_set
        problems = trainer.check_split(
            ds.find_unreadable,
            len(ds),
            self.cfg.data.val_split,
            "images (decoded)",
            "mae-transfer check-data --task coco --data DIR --full",
        )
        if problems is not None:
            ds.leave_out(problems)

    # The evaluation policy (every eval_every_epochs, the final evaluation, publishing) is the
    # engine's; these say what it means for detection.
    def eval_every(self) -> int:
        return self.cfg.eval_every_epochs

    def save_trained(self, model: nn.Module, out_dir: Path, step: int) -> None:
        save_detector(model, self.cfg, self.class_names, out_dir / "detector.pth", step=step)

    def eval_record(self, metrics: dict) -> dict:
        return flat_metrics(metrics)

    def publish(self, model: nn.Module, ctx: EvalContext, metrics: dict, step: int) -> None:
        self.write_results(ctx.output_dir, metrics, step)
        if self.cfg.visualize:
            self.visualize(model, ctx.device, ctx.autocast, ctx.output_dir / "visualize")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, dict[str, float]]:
        """Detect on the evaluation split (this process's shard; test resize in the loader workers)
        and score with COCOeval on the main process; the main process also writes
        ``predictions_<split>.json`` and ``metrics.json`` when the context has a run directory."""
        ds, split = self.val_set, self.cfg.data.val_split
        if ctx.dist.is_main:
            log.info("evaluating %d images of %s in %s", len(ds), split, ctx.precision)
        loader = ctx.loader(
            SeededTransformDataset(ds, ResizeForTest(self.cfg.model.img_size)),
            self.cfg.eval_batch_size,
            collate_fn=collate_detection,
        )

        def predict(batch) -> list[dict]:
            images, targets = batch
            sizes = [tuple(int(v) for v in t["orig_size"]) for t in targets]
            with ctx.autocast():
                # Masks stay 28 x 28 here: the evaluator pastes and encodes them in their boxes.
                return model.inference([im.to(ctx.device, non_blocking=True) for im in images], sizes, paste=False)

        evaluator = COCOEvaluator(ds, backend=self.cfg.eval_backend)
        start = time.monotonic()
        metrics = run_evaluator(evaluator, loader, predict, main=ctx.dist.is_main, desc=f"evaluating {split}")
        if not ctx.dist.is_main:
            return {}  # COCOeval runs once, on the main process
        seconds = evaluator.seconds  # detection, pasting and encoding (this process's shard)
        if evaluator.dropped_image_ids:  # --skip-bad: images found unreadable while evaluating
            metrics["unreadable_images_left_out"] = len(evaluator.dropped_image_ids)
        evaluated = len(ds) - len(evaluator.dropped_image_ids)
        metrics["time"] = {
            "seconds": seconds,
            "images": evaluated,
            "images_per_second": evaluated / max(seconds, 1e-9),
            "scoring_seconds": time.monotonic() - start - seconds,
            "backend": evaluator.backend_name,
            "backend_setting": self.cfg.eval_backend,
        }
        metrics["precision"] = ctx.precision
        log.info("%s", format_metrics(metrics, self.cfg))
        if ctx.output_dir is not None:
            save_results_json(evaluator.results, Path(ctx.output_dir) / f"predictions_{split}.json")
            atomic_write_json(Path(ctx.output_dir) / "metrics.json", metrics)
        return metrics

    def write_results(self, out_dir: Path, metrics: dict, step: int) -> Path:
        """One row per metric in ``results.jsonl`` (rewritten whole, atomically) for the runner."""
        cfg = self.cfg
        common = dict(
            task=self.name,  # the registry entry that runs it (front sets it)
            dataset=dataset_name(
                TOY_DATA.name, cfg.data.path, self.num_classes, "categories", benchmark_classes=NUM_CLASSES
            ),
            split=cfg.data.val_split,
            protocol=f"mask_rcnn_{cfg.recipe}",
            step=step,
            **row_identity(cfg, self.backbone_sha256, self.evaluated),
        )
        rows = [
            ResultRow(metric=f"{kind}_{name}", value=v, **common)
            for kind in ("bbox", "segm")
            for name, v in metrics[kind].items()
        ]
        return write_run_results(out_dir, rows, to_dict(cfg))

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
                    pred = model.predict(image.to(device))
                pred = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in pred.items()}
                name = f"{int(target['image_id']):012d}.png"
                paths.append(
                    save_comparison(image, target, pred, self.class_names, out_dir / name, self.cfg.visualize_score)
                )
        model.train(was_training)
        log.info("saved %d pictures (ground truth | prediction) to %s", len(paths), out_dir)
        return paths


def flat_metrics(metrics: dict) -> dict[str, float]:
    return {f"{kind}_{name}": v for kind in ("bbox", "segm") for name, v in metrics.get(kind, {}).items()}


def report(task, cfg: DetectionConfig) -> str:
    """The terminal summary of a finished run or evaluation (the task registry's ``report``)."""
    return format_metrics(task.last_eval, cfg)


def format_metrics(metrics: dict, cfg: DetectionConfig) -> str:
    """A small table: AP, AP50, AP75, APs, APm, APl for boxes and masks."""
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    where = f"{'COCO' if cfg.data.path else 'toy COCO'} {cfg.data.val_split}"
    lines = [f"{where:24s} " + " ".join(f"{n:>6s}" for n in names)]
    for kind in ("bbox", "segm"):
        vals = metrics.get(kind, {})
        lines.append(f"{kind:24s} " + " ".join(f"{vals.get(n, float('nan')):6.3f}" for n in names))
    t = metrics.get("time")
    if t:
        backend = {"faster": "faster-coco-eval"}.get(t.get("backend"), t.get("backend", "pycocotools"))
        if t.get("backend_setting") == "auto":
            backend += ", eval_backend=auto"
        scoring = f", scored in {t['scoring_seconds']:.1f} s ({backend})" if "scoring_seconds" in t else ""
        lines.append(
            f"evaluated {t['images']} images in {t['seconds']:.1f} s ({t['images_per_second']:.2f} img/s, "
            f"{metrics.get('precision', 'fp32')}){scoring}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- trained weights
def save_detector(model: nn.Module, cfg, class_names: list[str], path: Path, step: int = 0) -> Path:
    """The trained model's weights with its config and class names (atomic). The state dict has
    detectron2's names; ``mae-transfer export --to detectron2`` writes detectron2's file layout."""
    return save_trained_model(model, cfg, path, DETECTOR_FORMAT, class_names=class_names, step=int(step))


def read_detector_weights(path: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict and config overrides of a trained detector for ``--eval-only --weights``.

    Reads this toolkit's ``detector.pth`` and training checkpoints (their saved config), and
    detectron2 ViTDet checkpoints (``model_final.pth``; model-zoo ``.pkl`` with ``trust``), whose
    architecture is inferred from the tensor shapes. Loading is ``weights_only`` unless ``trust``.
    Weights that are not floating point and incomplete detectron2 detectors are refused, naming the
    tensors (:mod:`mae_transfer.checkpoint.checks`).
    """
    from mae_transfer.checkpoint import check_dtypes, load_file, load_safely
    from mae_transfer.checkpoint.detectron2 import (
        describe_vitdet,
        is_vitdet_state_dict,
        read_vitdet,
        unmapped_keys,
    )
    from mae_transfer.checkpoint.trained import trained_model_file

    # A run directory reads its checkpoint-last.pth (the file the result rows then name).
    path = trained_model_file(
        path, "detector.pth or checkpoint-last.pth of a coco run, or a detectron2 ViTDet model_final.pth"
    )
    if path.suffix.lower() == ".pkl":
        sd, meta = read_vitdet(path, trust=trust)
        saved = None
    else:
        state = load_file(path) if trust else load_safely(path, "--weights")
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CheckpointError(
                f"--weights {path}: not a trained model (expected detector.pth, checkpoint-last.pth of a coco run, "
                "or a detectron2 ViTDet model_final.pth)"
            )
        sd = {k: v for k, v in state["model"].items()}
        saved = (
            state.get("config") if state.get("format") in (DETECTOR_FORMAT, "mae_transfer.train_checkpoint") else None
        )
        if not any(k.startswith("roi_heads.") for k in sd):
            raise CheckpointError(
                f"--weights {path} holds no roi_heads.* weights: it looks like a backbone; "
                "pass it as --backbone to train a model"
            )
        meta = {"format": "mae-transfer" if saved is not None else "detectron2 (DetectionCheckpointer)"}
    check_dtypes(sd, f"--weights {path}")
    if saved is None:
        if not is_vitdet_state_dict(sd):
            raise CheckpointError(
                f"--weights {path}: neither a detector of this toolkit nor a detectron2 ViTDet checkpoint"
            )
        bad = unmapped_keys(sd)
        if bad:
            raise CheckpointError(
                f"--weights {path}: {len(bad)} tensors have no place in a ViTDet Mask R-CNN "
                f"(e.g. {', '.join(bad[:5])}); "
                "only the simple-feature-pyramid Mask R-CNN of ViTDet is supported"
            )
        try:
            arch = describe_vitdet(sd)
        except CheckpointError as e:
            raise CheckpointError(f"--weights {path}: {e}") from None
        for note in arch.pop("notes"):
            log.warning("%s: %s", path, note)
        if arch.pop("pyramid_norm") != "ln" or arch["num_anchors"] != 3:
            raise CheckpointError(
                f"--weights {path}: only LayerNorm pyramids with 3 anchors per position are supported"
            )
        arch.pop("num_anchors")
        arch.pop("pos_embed_class_row", None)
        num_classes = arch.pop("num_classes")
        from mae_transfer.models.vit import named_size

        named = named_size(arch["embed_dim"], arch["depth"], arch["num_heads"], arch["patch_size"])
        model = {**arch, "name": named, "pyramid": "simple"}
        if named:
            for k in ("embed_dim", "depth", "num_heads", "patch_size"):
                model.pop(k)
        model["global_blocks"] = list(model["global_blocks"]) if "global_blocks" in model else None
        saved = {"model": model, "num_classes": num_classes}
        log.info(
            "%s: %s checkpoint, %s, %d classes, %d px input",
            path,
            meta["format"],
            ", ".join(
                f"{k}={v}"
                for k, v in model.items()
                if k in ("name", "embed_dim", "depth", "num_heads", "patch_size", "window_size", "global_blocks")
            ),
            num_classes,
            model.get("img_size", 0),
        )
    for key in [k for k in sd if k in ("pixel_mean", "pixel_std")]:
        sd.pop(key)  # the input normalisation is the config's (data.mean / data.std)
    return sd, saved


def load_detector_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load a detector state dict, naming every tensor that does not fit (and a class-count mismatch)."""
    load_trained_model(
        model,
        state,
        path,
        explain=class_count_hint(
            "roi_heads.box_predictor.cls_score.weight", offset=1, advice="evaluate on data with the same categories"
        ),
    )


__all__ = [
    "DetectionTask",
    "build_detector",
    "detection_param_groups",
    "format_metrics",
    "load_detector_weights",
    "read_detector_weights",
    "save_detector",
]
