"""ADE20K semantic segmentation as an engine task: UperNet on a ViT, trained and evaluated.

Outputs in the run directory: ``metrics.json`` (mIoU, mAcc, aAcc and per-class IoU / accuracy
with class names), ``results.jsonl`` (one row per metric, for the evaluation runner),
``segmenter.pth`` (weights + config, for ``--eval-only --weights``) and with ``visualize`` N
pictures ``image | ground truth | prediction`` in the ADE20K palette.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
from mae_transfer.engine.distributed import convert_sync_batchnorm
from mae_transfer.engine.evaluator import run_evaluator
from mae_transfer.engine.optim import param_groups
from mae_transfer.engine.results import ResultRow, dataset_name, row_identity, write_run_results
from mae_transfer.engine.trainer import EvalContext, OptimConfig, Trainer, TrainTask
from mae_transfer.io import atomic_write, atomic_write_json
from mae_transfer.models.backbone import create_backbone
from mae_transfer.models.vit import named_size
from mae_transfer.segmentation.ade20k import (
    IGNORE_INDEX,
    EvalTransform,
    SegmentationFolder,
    TrainTransform,
    collate_eval,
    palette,
)
from mae_transfer.segmentation.config import SegmentationConfig
from mae_transfer.segmentation.data_spec import NUM_CLASSES, TOY_DATA
from mae_transfer.segmentation.metrics import SegmentationEvaluator
from mae_transfer.segmentation.model import build_upernet, slide_inference

log = logging.getLogger(__name__)

SEGMENTER_FORMAT = "mae_transfer.segmenter"


def dense_backbone(m, **extra) -> nn.Module:
    """The ViT a segmentation head reads (random weights): ``m``'s size, no pooling or classifier,
    its relative positions and layer scale; ``extra`` for ``create_backbone`` (e.g. drop path).
    Raises ``ValueError`` for a size it cannot build."""
    return create_backbone(
        m,
        img_size=m.img_size,
        num_classes=0,
        global_pool="",
        use_rel_pos=m.use_rel_pos,
        rel_pos_type=m.rel_pos_type,
        layer_scale=m.layer_scale,
        **extra,
    )


def build_segmenter(cfg: SegmentationConfig) -> nn.Module:
    """UperNet on the ViT ``cfg.model`` describes (random weights): mmsegmentation's MAE backbone
    (class token, BEiT relative position table, layer scale, no final norm) by default."""
    m = cfg.model
    try:
        vit = dense_backbone(m)
        model = build_upernet(
            vit,
            cfg.data.num_classes,
            tap_blocks=m.tap_blocks,
            channels=m.channels,
            aux_channels=m.aux_channels,
            aux_convs=m.aux_convs,
            pyramid=m.pyramid,
            pyramid_channels=m.pyramid_channels,
        )
    except ValueError as e:
        raise ConfigError(f"cannot build UperNet on {m.vit_label()}: {e}") from None
    if m.predictor_init == "default":
        for head in (model.decode_head, model.auxiliary_head):
            if head is not None:
                head.conv_seg.reset_parameters()
    return model


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

    return ensure_toy_dataset(**TOY_DATA.arguments())


class SegmentationTask(TrainTask):
    """UperNet on a ViT backbone, trained on random crops and evaluated with sliding windows."""

    name = "segmentation"
    protocols: tuple[str, ...] = ("upernet",)  # the values of cfg.protocol this task runs

    def __init__(self, cfg: SegmentationConfig, train: bool = True):
        if cfg.protocol not in self.protocols:
            raise ConfigError(
                f"protocol {cfg.protocol!r} is not {self.name}'s ({', '.join(self.protocols)}): give "
                f"`mae-transfer ade20k --protocol {cfg.protocol}`, which runs the task of that protocol"
            )
        self.cfg = cfg
        d = cfg.data
        self.root = _resolve_root(cfg)
        common = dict(
            num_classes=d.num_classes, reduce_zero_label=d.reduce_zero_label, bad_labels=d.bad_labels, missing=d.missing
        )
        t = cfg.test
        ratios = (
            tuple(t.scales) if tuple(t.scales) != (1.0,) else None
        )  # several scales: mmseg 1.x test-time augmentation
        self.val_set = SegmentationFolder(
            self.root, d.val_split, transform=EvalTransform(tuple(d.scale), d.mean, d.std, ratios), **common
        )
        self.class_names = list(self.val_set.class_names)
        self.train_set = self.train_base = None
        if train:
            base = self.train_base = SegmentationFolder(self.root, d.train_split, **common)
            aug = TrainTransform(
                crop_size=cfg.model.img_size,
                scale=tuple(d.scale),
                ratio_range=tuple(d.ratio_range),
                cat_max_ratio=d.cat_max_ratio,
                flip_prob=d.flip_prob,
                photometric=d.photometric,
                mean=d.mean,
                std=d.std,
            )
            self.train_set = SeededTransformDataset(base, aug, seed=cfg.train.seed)
        self.backbone_sha256 = weights_sha256(cfg.backbone) if cfg.backbone else None
        self.last_eval: dict[str, Any] = {}

    # ------------------------------------------------------------------ engine interface
    def signature(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "model": m.vit_label(),
            "img_size": m.img_size,
            "tap_blocks": m.tap_blocks,
            "use_rel_pos": m.use_rel_pos,
            "rel_pos_type": m.rel_pos_type,
            "layer_scale": m.layer_scale is not None,
            "channels": m.channels,
            "aux_channels": m.aux_channels,
            "num_classes": self.cfg.data.num_classes,
            **({"pyramid": m.pyramid, "pyramid_channels": m.pyramid_channels} if m.pyramid != "taps" else {}),
        }

    def build_model(self, load_backbone: bool = True) -> nn.Module:
        torch.manual_seed(self.cfg.train.seed)
        model = build_segmenter(self.cfg)
        if load_backbone:
            # New: the zero-initialised relative position tables (MAE A.4), layer scales at 1.0, the
            # neck and the heads; the 224 px position grid is resized to the crop once, as mmseg does.
            init_backbone(
                model.backbone,
                self.cfg.backbone,
                expected_missing="dense",
                expected_unexpected="dense",
                trust=self.cfg.trust_checkpoint,
            )
        return convert_sync_batchnorm(model)  # BEiT / mmsegmentation: SyncBN

    def build_train_dataset(self):
        if self.train_set is None:
            raise RuntimeError("this SegmentationTask was built for evaluation only")
        return self.train_set

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        # mmsegmentation's LearningRateDecayOptimizerConstructor for MAE / BEiT: lr x decay ** (depth
        # + 1 - layer) with the embeddings at layer 0, block i at i + 1, neck and heads at full lr; no
        # weight decay for 1-D parameters and biases. Its exemption of 'pos_embed' and 'cls_token'
        # compares unprefixed names with 'backbone.pos_embed', so both ARE decayed there, and here.
        return param_groups(model, optim.weight_decay, optim.layer_decay)

    def training_step(self, model: nn.Module, batch, device: torch.device):
        images, targets = batch
        x = images.to(device, non_blocking=True)
        y = targets["label"].to(device, non_blocking=True)
        out = model(x)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        loss_main = segmentation_loss(logits, y)
        extra = {"loss_decode": loss_main.detach()}
        loss = loss_main
        if aux is not None:
            loss_aux = segmentation_loss(aux, y)
            loss = loss + self.cfg.model.aux_weight * loss_aux
            extra["loss_aux"] = loss_aux.detach()
        return loss, extra

    def eval_precision(self) -> str:
        """``eval_precision`` (fp32 by default, as mmsegmentation's test loop)."""
        return self.cfg.eval_precision

    def check_data(self, trainer: Trainer) -> None:
        """Before training: read every image and label map of the evaluation split (when it has at
        most ``UP_FRONT_CHECK_MAX`` items; each process its share, the findings gathered), so that an
        unreadable file, a size mismatch or (without --bad-labels ignore) an out-of-range label value
        stops the run now, in one message, not at the evaluation after training. Training items
        are checked as they are read (ADE20K's 20,210 would take minutes up front; `mae-transfer
        check-data --task ade20k --data DIR --full` checks them all)."""
        if trainer.batch_size * trainer.dist.world_size < 2:  # else a traceback from torch at the first step
            raise ConfigError(
                "train.batch_size 1 on 1 process: the decode head's BatchNorm needs at least 2 images per step (SyncBN "
                "counts every process's); give --batch-size 2 or more "
                "(gradient accumulation keeps --effective-batch-size)"
            )
        ds, split = self.val_set, self.cfg.data.val_split
        problems = trainer.check_split(
            ds.find_bad_samples,
            len(ds),
            split,
            "images and label maps",
            "mae-transfer check-data --task ade20k --data DIR --full",
        )
        if problems:
            others = ", ".join(Path(ds.samples[i][0]).name for i, _ in problems[1:4]) + (
                " ..." if len(problems) > 4 else ""
            )
            more = (
                f" (and {len(problems) - 1} more item(s) of {split} with problems: {others})"
                if len(problems) > 1
                else ""
            )
            raise DataError(f"{problems[0][1]}{more}")

    # The evaluation policy (every eval_every_epochs, the final evaluation, publishing) is the
    # engine's; these say what it means for segmentation.
    def eval_every(self) -> int:
        return self.cfg.eval_every_epochs

    def save_trained(self, model: nn.Module, out_dir: Path, step: int) -> None:
        save_segmenter(model, self.cfg, self.class_names, out_dir / "segmenter.pth")

    def eval_record(self, metrics: dict) -> dict:
        return summary(metrics)

    def publish(self, model: nn.Module, ctx: EvalContext, metrics: dict, step: int) -> None:
        self.write_results(ctx.output_dir, metrics, step)
        if self.cfg.visualize:
            self.visualize(model, ctx.device, ctx.autocast, ctx.output_dir / "visualize")

    # ------------------------------------------------------------------ evaluation
    def logits(
        self, model: nn.Module, image: torch.Tensor, out_size, autocast: Callable, flip: bool = False
    ) -> torch.Tensor:
        """Logits (1, C, H, W) at ``out_size`` of one normalised image (3, h, w): sliding-window (or
        whole-image) inference, flipped back when ``flip``, resized bilinearly to ``out_size``."""
        t = self.cfg.test
        x = image.unsqueeze(0)
        x = x.flip(-1) if flip else x
        with autocast():
            out = (
                slide_inference(model, x, self.output_channels(), self.cfg.model.img_size, t.stride)
                if t.mode == "slide"
                else model(x)
            )
        out = out.float().flip(-1) if flip else out.float()
        return F.interpolate(out, size=tuple(out_size), mode="bilinear", align_corners=False)

    def predict_logits(self, model: nn.Module, image, out_size, autocast: Callable) -> torch.Tensor:
        """Class scores (C, H, W) at ``out_size`` whose argmax is the prediction, for one normalised
        image or for each image of a list (the test-time scales of :class:`EvalTransform`), with and
        without flips when ``test.flip``. One pass: its :meth:`logits` (mmsegmentation takes the
        argmax of the logits; a softmax over every class at full resolution would change nothing but
        the time, and could only tie two nearly equal classes). Several passes: their soft-maxed
        logits, summed (mmsegmentation's ``SegTTAModel`` averages them; the argmax is the same)."""
        images = image if isinstance(image, (list, tuple)) else [image]
        flips = [False, True] if self.cfg.test.flip else [False]
        if len(images) == 1 and len(flips) == 1:
            return self.logits(model, images[0], out_size, autocast, False)[0]
        probs = None
        for x in images:
            for flip in flips:
                p = self.probabilities(self.logits(model, x, out_size, autocast, flip))
                probs = p if probs is None else probs + p
        return probs[0]

    def output_channels(self) -> int:
        """Channels of the model's output: one per class (a model of several heads: theirs side by side)."""
        return self.cfg.data.num_classes

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft-maxed logits (1, C, H, W) of one test-time pass, summed over the passes."""
        return logits.softmax(1)

    def prediction(self, scores: torch.Tensor) -> torch.Tensor:
        """The label map (H, W) of :meth:`predict_logits`'s scores (C, H, W): what the evaluator takes."""
        return scores.argmax(0)

    def picture_prediction(self, scores: torch.Tensor) -> torch.Tensor:
        """The label map (H, W) the pictures show."""
        return scores.argmax(0)

    def eval_dataset(self):
        """The items :meth:`evaluate` goes through: (image(s), target) pairs of the evaluation split."""
        return self.val_set

    def build_evaluator(self):
        return SegmentationEvaluator(self.cfg.data.num_classes, self.class_names)

    def predict_batch(self, model: nn.Module, batch, ctx: EvalContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, label) of one evaluation item (a batch of one from :func:`collate_eval`)."""
        images, targets = batch
        label = targets[0]["label"]
        image = [im.to(ctx.device) for im in images[0]] if isinstance(images[0], list) else images[0].to(ctx.device)
        return self.prediction(self.predict_logits(model, image, label.shape[-2:], ctx.autocast)).cpu(), label

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, Any]:
        """mIoU / mAcc / aAcc over the evaluation split, accumulated over every image and process;
        the main process also writes ``metrics.json`` when the context has a run directory."""
        ds = self.eval_dataset()
        loader = ctx.loader(ds, 1, collate_fn=collate_eval)
        evaluator = self.build_evaluator()
        metrics = run_evaluator(
            evaluator,
            loader,
            lambda batch: self.predict_batch(model, batch, ctx),
            main=ctx.dist.is_main,
            desc=f"evaluating {self.cfg.data.val_split}",
            unit="img",
        )
        if not ctx.dist.is_main:
            return {}
        seconds = evaluator.seconds
        metrics["time"] = {"seconds": seconds, "images": len(ds), "images_per_second": len(ds) / max(seconds, 1e-9)}
        log.info("%s", format_metrics(metrics, self.cfg))
        if ctx.output_dir is not None:
            atomic_write_json(Path(ctx.output_dir) / "metrics.json", metrics)
        return metrics

    def write_results(self, out_dir: Path, metrics: dict, step: int) -> Path:
        """One row per metric in ``results.jsonl`` (rewritten whole, atomically) for the runner."""
        common = dict(row_fields(self, step), protocol=f"{self.cfg.recipe}_{eval_protocol(self.cfg)}")
        rows = [ResultRow(metric=k, value=v, **common) for k, v in summary(metrics).items()]
        return write_run_results(out_dir, rows, to_dict(self.cfg))

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
                image = [im.to(device) for im in image] if isinstance(image, list) else image.to(device)
                pred = self.picture_prediction(self.predict_logits(model, image, label.shape[-2:], autocast)).cpu()
                original = np.asarray(load_rgb(self.val_set.samples[i][0]))
                panels = [original, lut[label.numpy().clip(0, 255)], lut[pred.numpy()]]
                k = max(1, math.ceil(256 / max(original.shape[:2])))  # enlarge small images to be seen
                panels = [p.repeat(k, axis=0).repeat(k, axis=1) for p in panels]
                sheet = np.concatenate(
                    [np.pad(p, ((0, 0), (0, 6), (0, 0)), constant_values=255) for p in panels], axis=1
                )
                path = out_dir / f"{Path(self.val_set.samples[i][0]).stem}.png"
                with atomic_write(path, "wb") as f:
                    Image.fromarray(sheet).save(f, format="PNG")
                paths.append(path)
        model.train(was_training)
        log.info("saved %d pictures (image | ground truth | prediction) to %s", len(paths), out_dir)
        return paths


def eval_protocol(cfg: SegmentationConfig) -> str:
    """How an evaluation tests: ``ss`` / ``ms`` (single- or multi-scale), ``+flip`` with flips."""
    return f"{'ms' if len(cfg.test.scales) > 1 else 'ss'}{'+flip' if cfg.test.flip else ''}"


def row_fields(task, step: int) -> dict[str, Any]:
    """What every result row of a run of ``task`` (its ``name``, ``cfg``, ``backbone_sha256`` and
    ``evaluated``) shares but its protocol and metric."""
    cfg = task.cfg
    return dict(
        task=task.name,  # the registry entry that runs it (front sets it)
        dataset=dataset_name(TOY_DATA.name, cfg.data.path, cfg.data.num_classes, benchmark_classes=NUM_CLASSES),
        split=cfg.data.val_split,
        step=step,
        **row_identity(cfg, task.backbone_sha256, task.evaluated),
    )


def summary(metrics: dict) -> dict[str, float]:
    """The headline numbers in percent: mIoU, mAcc, aAcc."""
    return {k: 100.0 * float(metrics[k]) for k in ("mIoU", "mAcc", "aAcc") if k in metrics}


def report(task, cfg: SegmentationConfig) -> str:
    """The terminal summary of a finished run or evaluation (the task registry's ``report``)."""
    return format_metrics(task.last_eval, cfg)


def format_metrics(metrics: dict, cfg: SegmentationConfig) -> str:
    s = summary(metrics)
    where = f"{'ADE20K' if cfg.data.path else 'toy ADE20K'} {cfg.data.val_split}"
    lines = [
        f"{where:28s} {'mIoU':>7s} {'mAcc':>7s} {'aAcc':>7s}",
        f"{'':28s} {s.get('mIoU', math.nan):7.2f} {s.get('mAcc', math.nan):7.2f} {s.get('aAcc', math.nan):7.2f}",
    ]
    t = metrics.get("time")
    if t:
        lines.append(f"evaluated {t['images']} images in {t['seconds']:.1f} s ({t['images_per_second']:.2f} img/s)")
    return "\n".join(lines)


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy summed over labelled pixels and divided by ALL pixels, ignored ones
    included: mmsegmentation's ``CrossEntropyLoss`` with ``avg_non_ignore=False`` (its default, and
    the MAE config's). A crop without labelled pixels gives 0."""
    return F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, reduction="sum") / max(label.numel(), 1)


def save_segmenter(model: nn.Module, cfg, class_names: list[str], path: Path) -> Path:
    """The trained model's weights with its config and class names (atomic)."""
    return save_trained_model(model, cfg, path, SEGMENTER_FORMAT, class_names=class_names)


def read_segmenter_weights(path: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict and config overrides of a trained segmenter for ``--eval-only --weights``.

    Reads this toolkit's ``segmenter.pth`` and training checkpoints (their saved config), and
    mmsegmentation MAE / BEiT + UperNet checkpoints (``{"meta", "state_dict"}``), whose architecture
    is inferred from the tensor shapes: sizes, heads, classes; the taps are mmseg's relative
    positions and the test resize / window stride follow mmseg's ADE20K rule for the crop
    (``(4 x crop, crop)``, ``2/3 x crop``). Loading is ``weights_only`` unless ``trust``.
    """
    return segmenter_weights(read_segmenter_file(path, trust), path)


def read_segmenter_file(path: str | Path, trust: bool = False) -> dict:
    """The contents of a trained segmenter's file, ``weights_only`` unless ``trust``."""
    from mae_transfer.checkpoint import load_file, load_safely
    from mae_transfer.checkpoint.trained import trained_model_file

    # A run directory reads its checkpoint-last.pth (the file the result rows then name).
    path = trained_model_file(
        path, "segmenter.pth or checkpoint-last.pth of an ade20k run, or an mmsegmentation segmentor .pth"
    )
    state = load_file(path) if trust else load_safely(path, "--weights")
    if not isinstance(state, dict):
        raise CheckpointError(
            f"--weights {path}: not a trained model (expected segmenter.pth, checkpoint-last.pth of an ade20k run, "
            "or an mmsegmentation segmentor)"
        )
    return state


def segmenter_weights(state: dict, path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict and config overrides from a file read by :func:`read_segmenter_file` (see
    :func:`read_segmenter_weights`)."""
    from mae_transfer.checkpoint import check_dtypes
    from mae_transfer.checkpoint.mmseg import (
        describe_segmentor,
        is_mmseg_segmentor,
        to_segmenter_state_dict,
    )

    ours = state.get("format") in (SEGMENTER_FORMAT, "mae_transfer.train_checkpoint") and isinstance(
        state.get("model"), dict
    )
    if ours:
        sd = state["model"]
        if any(k.startswith("decode_heads.") for k in sd):
            raise CheckpointError(
                f"--weights {path} is a linear segmenter (a frozen backbone with linear heads, from `ade20k "
                "--protocol linear`), not an UperNet: evaluate it with `mae-transfer ade20k --protocol linear "
                "--eval-only --weights ...` (linear_ms for a 4-block one); it has no mmsegmentation form"
            )
        if not any(k.startswith("decode_head.") for k in sd):
            raise CheckpointError(
                f"--weights {path} holds no decode_head.* weights: it looks like a backbone; pass it as --backbone"
            )
        check_dtypes(sd, f"--weights {path}")
        return sd, state.get("config")
    raw = state.get("state_dict", state.get("model", state))
    if not isinstance(raw, dict) or not is_mmseg_segmentor(raw):
        if isinstance(raw, dict) and not any(k.startswith("decode_head.") for k in raw):
            raise CheckpointError(
                f"--weights {path} holds no decode_head.* weights: it looks like a backbone; pass it as --backbone"
            )
        raise CheckpointError(
            f"--weights {path}: neither a segmenter of this toolkit nor an mmsegmentation MAE/BEiT UperNet checkpoint"
        )
    check_dtypes(raw, f"--weights {path}")
    try:
        sd = to_segmenter_state_dict({k: v for k, v in raw.items() if torch.is_tensor(v)})
        arch = describe_segmentor(sd)
    except CheckpointError as e:
        raise CheckpointError(f"--weights {path}: {e}") from None
    num_classes = arch.pop("num_classes")
    named = named_size(arch["embed_dim"], arch["depth"], arch["num_heads"], arch["patch_size"])
    model = {**arch, "name": named}
    if named:
        for k in ("embed_dim", "depth", "num_heads", "patch_size"):
            model.pop(k)
    crop = int(arch["img_size"])
    saved = {
        "model": model,
        "data": {"num_classes": num_classes, "scale": [4 * crop, crop]},
        "test": {"stride": int(crop * 2 / 3)},
    }
    log.info(
        "%s: mmsegmentation segmentor, %s, %d classes, %d px windows every %d px, test resize %s",
        path,
        model.get("name") or f"ViT {arch['embed_dim']}x{arch['depth']}, {arch['num_heads']} heads",
        num_classes,
        crop,
        saved["test"]["stride"],
        saved["data"]["scale"],
    )
    return sd, saved


def segmenter_class_names(state: dict) -> tuple[list[str] | None, list | None]:
    """Class names (and palette) stored with a segmenter (a file read by :func:`read_segmenter_file`):
    ours (``class_names``) or mmsegmentation's ``meta["dataset_meta"]`` (a dict, or its printed form,
    read as a literal)."""
    import ast

    if isinstance(state.get("class_names"), (list, tuple)):
        names = [str(n) for n in state["class_names"]]
        return names, palette(len(names)).tolist()
    meta = (state.get("meta") or {}).get("dataset_meta") if isinstance(state.get("meta"), dict) else None
    if isinstance(meta, str):
        try:
            meta = ast.literal_eval(meta)
        except (ValueError, SyntaxError):
            meta = None
    if isinstance(meta, dict) and meta.get("classes"):
        return [str(n) for n in meta["classes"]], [list(c) for c in meta["palette"]] if meta.get("palette") else None
    return None, None


def load_segmenter_weights(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    path: str | Path,
    classifier: str = "decode_head.conv_seg.weight",
) -> None:
    """Load a segmenter state dict, naming every tensor that does not fit (and a class-count mismatch
    of the ``classifier`` weight)."""
    load_trained_model(model, state, path, explain=class_count_hint(classifier, advice="set --num-classes"))


__all__ = [
    "SegmentationTask",
    "build_segmenter",
    "dense_backbone",
    "format_metrics",
    "load_segmenter_weights",
    "read_segmenter_file",
    "read_segmenter_weights",
    "eval_protocol",
    "row_fields",
    "segmenter_class_names",
    "segmenter_weights",
    "segmentation_loss",
    "summary",
]
