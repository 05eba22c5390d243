"""DINOv2's frozen linear segmentation protocol on data in the ADE20K layout (``ade20k --protocol linear``).

DINOv2 (Oquab et al., TMLR 2024, section 7.4 and Table 10) measures how much of a segmentation a
frozen backbone already holds: "linear" trains a linear layer on the patch tokens of the last block
and upsamples its low-resolution logits to the image; "+ms" ("linear_ms" here) concatenates the
patch tokens of the last 4 blocks, trains at 640 px and tests at several scales. Their released
configs (``dinov2_vitb14_ade20k_linear_config.py``) run it in mmsegmentation: the backbone's
``get_intermediate_layers(n=[8, 9, 10, 11], reshape=True)`` (final norm applied) and a ``BNHead``
(SyncBN, then a 1x1 ``conv_seg``, no dropout) with ``in_index [3]`` ("linear") or ``[0, 1, 2, 3]``
and ``resize_concat`` ("+ms"); the recipe is in ``presets/linear_dinov2.yaml``.

:class:`LinearSegmenter` is that model on this toolkit's ViT: the backbone frozen (no gradients,
always in eval mode, run under ``torch.no_grad``), the chosen blocks' patch tokens through the final
LayerNorm as maps (B, D x blocks, h, w), one or several :class:`BNHead` (a learning-rate sweep trains
several at once on the same features), logits resized bilinearly to the input.
:class:`LinearSegmentationTask` trains it with the engine and evaluates it exactly as UperNet is
evaluated (the same resize, sliding windows, test-time scales and flips, confusion-matrix metrics),
with every head scored on the same pass.

Feature cache (:mod:`~mae_transfer.segmentation.feature_cache`): the evaluation's windows are
deterministic, so their features are written on the first evaluation and read by every later one
of the same backbone (the next epoch's, another run's head); with ``linear.train_input: fixed`` the
training windows are too, and a second run trains and evaluates without running the backbone.
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
from torch.utils.data import DataLoader, Dataset

from mae_transfer.checkpoint import CheckpointError, init_backbone
from mae_transfer.config import ConfigError, to_dict
from mae_transfer.engine.distributed import convert_sync_batchnorm
from mae_transfer.engine.evaluator import DatasetEvaluator, progress
from mae_transfer.engine.results import ResultRow, write_run_results
from mae_transfer.engine.trainer import EvalContext, OptimConfig
from mae_transfer.segmentation.ade20k import (
    IGNORE_INDEX,
    EvalTransform,
    SegmentationFolder,
    keep_ratio_size,
    rescale_size,
    resize_label,
)
from mae_transfer.segmentation.config import SegmentationConfig
from mae_transfer.segmentation.feature_cache import (
    CachedFeatures,
    cache_folder,
    cache_pass,
    files_identity,
    module_digest,
)
from mae_transfer.segmentation.metrics import SegmentationEvaluator
from mae_transfer.segmentation.model import slide_windows
from mae_transfer.segmentation.task import (
    SegmentationTask,
    dense_backbone,
    eval_protocol,
    format_metrics,
    load_segmenter_weights,
    read_segmenter_file,
    row_fields,
    save_segmenter,
    segmentation_loss,
    summary,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class BNHead(nn.Module):
    """DINOv2's linear head (its ``BNHead``, an mmsegmentation decode head): BatchNorm over the
    token maps (SyncBN under DDP), then the 1x1 convolution ``conv_seg`` to the classes, no dropout.
    ``init="mmseg"``: ``conv_seg`` from N(0, 0.01) and a zero bias (mmsegmentation's
    ``BaseDecodeHead.init_weights``); ``"default"``: PyTorch's layer default."""

    def __init__(self, channels: int, num_classes: int, init: str = "mmseg"):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        if init == "mmseg":
            nn.init.normal_(self.conv_seg.weight, std=0.01)
            nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.bn(x))


class LinearSegmenter(nn.Module):
    """A frozen ViT (``backbone``) and ``heads`` linear heads (``decode_heads``) on its last ``layers``
    blocks' patch tokens (each through the final norm when ``norm``), concatenated.

    ``forward(images)`` returns logits (B, heads x C, H, W) at the input size (each head's C classes
    side by side); an input that is not a multiple of the patch size is padded at the bottom and right
    for the backbone and the padding cut from the logits. ``forward(features, size=(H, W))`` classifies
    maps that :meth:`backbone_features` made before (cached training windows). The features are
    rounded to ``feature_dtype`` (what a feature cache stores), cached or not. ``feature_source``: a
    callable ``(images, compute) -> features`` put in front of the backbone by the feature cache."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        layers: int = 1,
        norm: bool = True,
        heads: int = 1,
        feature_dtype: torch.dtype = torch.float32,
        init: str = "mmseg",
    ):
        super().__init__()
        depth = len(backbone.blocks)
        if not 1 <= layers <= depth:
            raise ValueError(
                f"this ViT has {depth} blocks; the head cannot read its last {layers}: set linear.layers "
                f"to 1..{depth} (--protocol linear_ms reads 4 unless told otherwise)"
            )
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.blocks = tuple(range(depth - layers, depth))
        self.norm = norm
        self.num_classes = num_classes
        self.feature_dtype = feature_dtype
        self.patch = int(backbone.patch_size)
        self.channels = backbone.embed_dim * layers
        self.decode_heads = nn.ModuleList([BNHead(self.channels, num_classes, init) for _ in range(heads)])
        self.feature_source: Callable | None = None
        self.backbone.eval()

    def train(self, mode: bool = True) -> "LinearSegmenter":
        super().train(mode)
        self.backbone.eval()  # frozen: no drop path, whatever the engine asks of the heads
        return self

    @torch.no_grad()
    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D x layers, ceil(H / p), ceil(W / p)) maps of images (B, 3, H, W)."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.patch, (-w) % self.patch
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        maps = self.backbone.forward_intermediates(x, indices=list(self.blocks), output_fmt="NCHW", norm=self.norm)
        return torch.cat(maps, 1).float().to(self.feature_dtype).float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        source = self.feature_source
        return source(x, self.backbone_features) if source is not None else self.backbone_features(x)

    def classify(self, feats: torch.Tensor, size) -> torch.Tensor:
        """Logits (B, heads x C, H, W) of feature maps (B, D', h, w) of an input of ``size`` (H, W)."""
        logits = torch.cat([head(feats) for head in self.decode_heads], 1)
        padded = (feats.shape[-2] * self.patch, feats.shape[-1] * self.patch)
        out = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        return out[..., : int(size[0]), : int(size[1])]

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        if size is None:
            return self.classify(self.features(x), x.shape[-2:])
        return self.classify(x, size)


# ----------------------------------------------------------------------------------- datasets


def cut_windows(x: torch.Tensor, crop: int, stride: int, fill: float) -> torch.Tensor:
    """The :func:`slide_windows` of ``x`` (..., H, W), each padded at the bottom and right with
    ``fill`` to ``crop x crop`` (as the training crops are): (n, ..., crop, crop)."""
    h, w = x.shape[-2:]
    out = []
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        win = x[..., y1:y2, x1:x2]
        ph, pw = crop - (y2 - y1), crop - (x2 - x1)
        out.append(F.pad(win, (0, pw, 0, ph), value=fill) if ph or pw else win)
    return torch.stack(out)


def window_index(folder: SegmentationFolder, scale, crop: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(item, window) of every fixed training window: each image resized to ``scale`` (keep-ratio) and
    cut into ``crop`` windows every ``stride`` px; the sizes come from the image headers (no decoding)."""
    from PIL import Image

    items, windows = [], []
    for i in range(len(folder)):
        with Image.open(folder.samples[i][0]) as im:
            width, height = im.size
        n = len(slide_windows(*keep_ratio_size(height, width, scale), crop, stride))
        items += [i] * n
        windows += list(range(n))
    return np.asarray(items, dtype=np.int64), np.asarray(windows, dtype=np.int64)


def _first(batch: list):
    return batch[0]


class _WindowStacks(Dataset):
    """Every window of one training image (n, 3, crop, crop), normalised, unaugmented, and its index
    (the extraction pass of ``linear.train_input: fixed``)."""

    def __init__(self, folder: SegmentationFolder, transform: EvalTransform, crop: int, stride: int):
        self.folder, self.transform, self.crop, self.stride = folder, transform, crop, stride

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        image, target = self.folder[i]
        image, _ = self.transform(image, target)
        return cut_windows(image, self.crop, self.stride, 0.0), i


class FixedWindows(Dataset):
    """The fixed training windows (``linear.train_input: fixed``): item ``j`` is window
    ``windows[j]`` of image ``items[j]``, as cached features (C, g, g) when ``cached`` is given, else
    as the normalised image window (3, crop, crop); with its label window (crop, crop), padded with
    the ignore index."""

    def __init__(
        self,
        folder: SegmentationFolder,
        transform: EvalTransform,
        crop: int,
        stride: int,
        items: np.ndarray,
        windows: np.ndarray,
        cached: CachedFeatures | None,
    ):
        self.folder, self.transform, self.crop, self.stride = folder, transform, crop, stride
        self.items, self.windows, self.cached = items, windows, cached

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int):
        item, w = int(self.items[j]), int(self.windows[j])
        label = self.folder.label(item)
        size = keep_ratio_size(*label.shape, self.transform.scale)
        label = cut_windows(resize_label(label, size), self.crop, self.stride, IGNORE_INDEX)[w]
        if self.cached is not None:
            span = self.cached.span(item)
            x = self.cached.entry(span.start + w)
        else:
            image, target = self.folder[item]
            x = cut_windows(self.transform(image, target)[0], self.crop, self.stride, 0.0)[w]
        return x, {"label": label}


class _LabelsOnly(Dataset):
    """Evaluation items whose features come from the cache: zero images of the evaluation's resized
    size(s) (only their shapes are used) and the original label map; the images are not read."""

    def __init__(self, folder: SegmentationFolder, transform: EvalTransform):
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        label = self.folder.label(i)
        h, w = label.shape
        t = self.transform
        target = {"label": label, "orig_size": torch.tensor([h, w]), "index": i, "path": self.folder.samples[i][0]}
        if t.ratios:
            return [torch.zeros(3, *rescale_size(h, w, r)) for r in t.ratios], target
        return torch.zeros(3, *keep_ratio_size(h, w, t.scale)), target


# ----------------------------------------------------------------------------------- the cache in front of the backbone


class _Record:
    """Computes the features and appends them to the pass being written, under the current item."""

    def __init__(self, writer):
        self.writer, self.item = writer, -1

    def begin(self, item: int) -> None:
        self.item = item

    def __call__(self, x: torch.Tensor, compute: Callable) -> torch.Tensor:
        feats = compute(x)
        self.writer.append(self.item, feats)
        return feats


class _Replay:
    """Gives the current item's cached features back in the order they were written."""

    def __init__(self, cached: CachedFeatures, patch: int):
        self.cached, self.patch, self.queue, self.item = cached, patch, [], -1

    def begin(self, item: int) -> None:
        self.item, self.queue = item, list(self.cached.span(item))

    def __call__(self, x: torch.Tensor, compute: Callable) -> torch.Tensor:
        want = (math.ceil(x.shape[-2] / self.patch), math.ceil(x.shape[-1] / self.patch))
        feats = self.cached.entry(self.queue.pop(0)).to(x.device) if self.queue else None
        if feats is None or tuple(feats.shape[-2:]) != want or feats.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"the feature cache {self.cached.folder} does not hold what item {self.item} needs now; "
                "remove that folder (it is written again by the next run)"
            )
        return feats


# ----------------------------------------------------------------------------------- evaluation of several heads


class HeadsEvaluator(DatasetEvaluator):
    """One :class:`SegmentationEvaluator` per head, fed the (heads, H, W) predictions of each image.
    The metrics are the best head's (by mIoU), with ``best_head``, its ``lr`` and every head's
    mIoU / mAcc / aAcc under ``heads``."""

    def __init__(self, num_classes: int, class_names, lrs: tuple[float, ...]):
        self.lrs = tuple(lrs)
        self.heads = [SegmentationEvaluator(num_classes, class_names) for _ in self.lrs]

    def reset(self) -> None:
        for h in self.heads:
            h.reset()

    def process(self, inputs, outputs) -> None:
        predictions, label = outputs
        for h, pred in zip(self.heads, predictions):
            h.process(inputs, (pred, label))

    def state(self):
        return [h.state() for h in self.heads]

    def merge(self, states) -> None:
        for k, h in enumerate(self.heads):
            h.merge([s[k] for s in states])

    def evaluate(self) -> dict:
        each = [h.evaluate() for h in self.heads]
        scores = [m["mIoU"] if math.isfinite(m["mIoU"]) else -1.0 for m in each]
        best = int(np.argmax(scores))
        heads = [{"lr": lr, **{k: m[k] for k in ("mIoU", "mAcc", "aAcc")}} for lr, m in zip(self.lrs, each)]
        return {**each[best], "best_head": best, "lr": self.lrs[best], "heads": heads}


# ----------------------------------------------------------------------------------- the task


class LinearSegmentationTask(SegmentationTask):
    """Linear heads on a frozen ViT, trained on DINOv2's augmented crops (or on fixed cached windows)
    and evaluated with UperNet's evaluation."""

    name = "segmentation_linear"
    protocols = ("linear", "linear_ms")

    def __init__(self, cfg: SegmentationConfig, train: bool = True):
        super().__init__(cfg, train)
        lin = cfg.linear_settings()
        self.lin = lin
        self.layers = cfg.linear_layers()
        self.lrs = tuple(float(lr) for lr in lin.lrs) or (float(cfg.optim.lr),)
        self.fixed = lin.train_input == "fixed"
        self.best_head = 0
        self._model: LinearSegmenter | None = None
        self._digest: tuple[int, str] | None = None
        self._source: _Record | _Replay | None = None
        self._labels_only = False
        self._train_from_features = False

    # ------------------------------------------------------------------ model
    def signature(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "model": m.vit_label(),
            "img_size": m.img_size,
            "protocol": self.cfg.protocol,
            "layers": self.layers,
            "norm": self.lin.norm,
            "heads": len(self.lrs),
            "num_classes": self.cfg.data.num_classes,
        }

    def build_model(self, load_backbone: bool = True) -> nn.Module:
        cfg, m, lin = self.cfg, self.cfg.model, self.lin
        torch.manual_seed(cfg.train.seed)
        try:
            vit = dense_backbone(m, drop_path_rate=0.0)  # frozen: evaluated as it is
        except ValueError as e:
            raise ConfigError(f"cannot build a linear segmenter on {m.vit_label()}: {e}") from None
        if not hasattr(vit, "forward_intermediates") or not hasattr(vit, "blocks"):
            raise ConfigError(f"the linear protocols read the blocks of a plain ViT; {m.vit_label()} has none")
        if load_backbone:
            # The final norm comes from the checkpoint (DINOv2 applies it); without linear.norm it may lack one.
            missing = ["blocks.*.attn.rel_pos_*", "blocks.*.attn.relative_position_bias_table", "blocks.*.gamma_*"]
            missing += ["head.*", "fc_norm.*"] + ([] if lin.norm else ["norm.*"])
            unexpected = ["fc_norm.*", "head.*", "mask_token", "decoder_*", "blocks.*.attn.relative_position_index"]
            init_backbone(
                vit,
                cfg.backbone,
                expected_missing=missing,
                expected_unexpected=unexpected + ([] if lin.norm else ["norm.*"]),
                trust=cfg.trust_checkpoint,
            )
        try:
            model = LinearSegmenter(
                vit,
                cfg.data.num_classes,
                layers=self.layers,
                norm=lin.norm,
                heads=len(self.lrs),
                feature_dtype=_DTYPES[lin.cache_dtype],
                init=m.predictor_init,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._model = convert_sync_batchnorm(model)  # DINOv2's BNHead: SyncBN
        return self._model

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        """One group per head at its learning rate (``lr_scale`` = its lr / ``optim.lr``). Weight decay
        on every head parameter, BatchNorm and bias included: mmcv's default optimizer constructor,
        which DINOv2's linear configs use (no ``paramwise_cfg``)."""
        core = getattr(model, "module", model)
        peak = float(optim.lr)
        return [
            {
                "params": list(head.parameters()),
                "param_names": [f"decode_heads.{k}.{n}" for n, _ in head.named_parameters()],
                "weight_decay": optim.weight_decay,
                "lr_scale": lr / peak,
            }
            for k, (lr, head) in enumerate(zip(self.lrs, core.decode_heads))
        ]

    def training_step(self, model: nn.Module, batch, device: torch.device):
        x, targets = batch
        x = x.to(device, non_blocking=True)
        y = targets["label"].to(device, non_blocking=True)
        out = model(x, size=y.shape[-2:]) if self._train_from_features else model(x)
        c = self.cfg.data.num_classes
        losses = [segmentation_loss(out[:, k * c : (k + 1) * c], y) for k in range(len(self.lrs))]
        extra = {f"loss_head{k}": v.detach() for k, v in enumerate(losses)} if len(losses) > 1 else {}
        return torch.stack(losses).sum(), extra

    # ------------------------------------------------------------------ training data
    def build_train_dataset(self):
        """DINOv2's augmented crops; with ``linear.train_input: fixed`` the fixed windows (their
        features are attached from the cache by :meth:`check_data`, before the first step)."""
        if not self.fixed:
            return super().build_train_dataset()
        if self.train_set is None:
            raise RuntimeError("this LinearSegmentationTask was built for evaluation only")
        d, crop, stride = self.cfg.data, self.cfg.model.img_size, self.cfg.test.stride
        items, windows = window_index(self.train_base, tuple(d.scale), crop, stride)
        transform = EvalTransform(tuple(d.scale), d.mean, d.std)
        self._fixed_set = FixedWindows(self.train_base, transform, crop, stride, items, windows, None)
        return self._fixed_set

    def check_data(self, trainer) -> None:
        super().check_data(trainer)
        if self.fixed:
            self._attach_cached_features(trainer)

    def _attach_cached_features(self, trainer) -> None:
        """The fixed training windows' features from the cache, computed and written first when no
        run of this backbone did (every process its share of the images); without the cache the
        windows stay images and the backbone runs at every step (the same numbers)."""
        ds, d = self._fixed_set, self.cfg.data
        model: LinearSegmenter = trainer.unwrapped
        folder = cache_folder(
            f"{self.dataset_tag(d.train_split)}-train",
            {
                **self._feature_identity(model),
                "files": files_identity([self.train_base.samples[i][0] for i in range(len(self.train_base))]),
                "windows": {"scale": list(d.scale), "crop": ds.crop, "stride": ds.stride, "mean": d.mean, "std": d.std},
                "precision": trainer.precision,
            },
        )
        what = f"features of the {len(ds)} fixed training windows of {d.train_split}"
        with cache_pass(folder, self.lin.cache_dtype, wait=True, what=what) as (mode, store):
            if mode == "write":
                self._extract(model, store, trainer)
        cached = CachedFeatures(folder) if mode != "off" else None
        if cached is not None and len(cached) != len(ds):
            raise RuntimeError(f"the feature cache {folder} holds {len(cached)} windows, not {len(ds)}: remove it")
        ds.cached = cached
        self._train_from_features = cached is not None
        log.info(
            "linear.train_input fixed: %d windows of %d images (no augmentation), %s",
            len(ds),
            len(self.train_base),
            "from cached features: the backbone does not run while training"
            if cached is not None
            else "the backbone runs on every window (feature cache off)",
        )

    def _extract(self, model: LinearSegmenter, store, trainer) -> None:
        """This process's share of the training images through the frozen backbone, into ``store``."""
        from mae_transfer.engine.sampler import ShardSampler

        rank, size = trainer.dist.rank, trainer.dist.world_size
        ds = self._fixed_set
        stacks = _WindowStacks(self.train_base, ds.transform, ds.crop, ds.stride)
        loader = DataLoader(
            stacks,
            batch_size=1,
            sampler=ShardSampler(len(stacks), rank, size),
            num_workers=trainer.num_workers(),
            collate_fn=_first,
        )
        was = model.training
        model.eval()
        try:
            for stack, item in progress(loader, "features of the training windows", unit="img", main=rank == 0):
                with trainer.autocast():
                    feats = model.backbone_features(stack.to(trainer.device))
                for f in feats:
                    store.append(item, f)
        finally:
            model.train(was)

    # ------------------------------------------------------------------ evaluation
    def dataset_tag(self, split: str) -> str:
        return f"ade20k-{split}" if not self.cfg.data.path else f"{Path(self.root).name}-{split}"

    def _feature_identity(self, model: LinearSegmenter) -> dict[str, Any]:
        """What the features depend on besides the inputs: the backbone's tensors, the blocks read,
        the final norm, the storage dtype and the model config (drop path and checkpointing aside)."""
        if self._digest is None or self._digest[0] != id(model.backbone):
            self._digest = (id(model.backbone), module_digest(model.backbone))
        m = {k: v for k, v in to_dict(self.cfg.model).items() if k not in ("drop_path", "grad_checkpointing")}
        return {
            "backbone": self._digest[1],
            "blocks": list(model.blocks),
            "norm": model.norm,
            "dtype": self.lin.cache_dtype,
            "model": m,
        }

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, Any]:
        """UperNet's evaluation of every head at once; the backbone's features of the evaluation
        windows come from the feature cache when a run of this backbone wrote them before."""
        core: LinearSegmenter = getattr(model, "module", model)
        cfg = self.cfg
        d, t = cfg.data, cfg.test
        folder = cache_folder(
            f"{self.dataset_tag(d.val_split)}-eval",
            {
                **self._feature_identity(core),
                "files": self._val_identity(),
                "test": {
                    "scale": list(d.scale),
                    "mean": d.mean,
                    "std": d.std,
                    "mode": t.mode,
                    "crop": cfg.model.img_size,
                    "stride": t.stride,
                    "scales": list(t.scales),
                    "flip": t.flip,
                },
                "precision": ctx.precision,
            },
        )
        what = f"features of the evaluation windows of {d.val_split}"
        with cache_pass(folder, self.lin.cache_dtype, wait=False, what=what) as (mode, store):
            self._source = _Replay(store, core.patch) if mode == "read" else _Record(store) if mode == "write" else None
            self._labels_only = mode == "read"
            core.feature_source = self._source
            try:
                metrics = super().evaluate(model, ctx)
            finally:
                core.feature_source = None
                self._source = None
                self._labels_only = False
        if metrics:
            self.best_head = int(metrics.get("best_head", 0))
        return metrics

    def _val_identity(self) -> str:
        if getattr(self, "_val_files", None) is None:
            self._val_files = files_identity([self.val_set.samples[i][0] for i in range(len(self.val_set))])
        return self._val_files

    def eval_dataset(self):
        return _LabelsOnly(self.val_set, self.val_set.transform) if self._labels_only else self.val_set

    def predict_batch(self, model: nn.Module, batch, ctx: EvalContext):
        if self._source is not None:
            self._source.begin(int(batch[1][0]["index"]))
        return super().predict_batch(model, batch, ctx)

    def output_channels(self) -> int:
        return self.cfg.data.num_classes * len(self.lrs)

    def _per_head(self, x: torch.Tensor) -> torch.Tensor:
        """(..., heads x C, H, W) -> (..., heads, C, H, W)."""
        return x.unflatten(-3, (len(self.lrs), self.cfg.data.num_classes))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return self._per_head(logits).softmax(-3).flatten(-4, -3)

    def prediction(self, scores: torch.Tensor) -> torch.Tensor:
        return self._per_head(scores).argmax(-3)  # (heads, H, W)

    def picture_prediction(self, scores: torch.Tensor) -> torch.Tensor:
        return self._per_head(scores)[self.best_head].argmax(0)

    def build_evaluator(self):
        return HeadsEvaluator(self.cfg.data.num_classes, self.class_names, self.lrs)

    # ------------------------------------------------------------------ results
    def protocol_name(self) -> str:
        """``linear`` (one block) or ``linear<N>`` (the last N blocks): DINOv2's "+ms" is ``linear4_ms``."""
        return "linear" if self.layers == 1 else f"linear{self.layers}"

    def write_results(self, out_dir: Path, metrics: dict, step: int) -> Path:
        """One head: rows of protocol ``linear_ss`` (``linear4_ms``, ...) with its ``lr``. A sweep:
        each head's rows (``linear_ss@lr=0.001``) and the best head's as ``linear_sweep_ss`` (chosen
        on the evaluation split, so optimistic)."""
        fields = row_fields(self, step)
        extra = fields.pop("extra", None) or {}
        base, test = self.protocol_name(), eval_protocol(self.cfg)
        rows = []
        if len(self.lrs) == 1:
            for k, v in summary(metrics).items():
                rows.append(
                    ResultRow(
                        metric=k, value=v, protocol=f"{base}_{test}", extra={**extra, "lr": self.lrs[0]}, **fields
                    )
                )
        else:
            for head in metrics.get("heads", []):
                for k in ("mIoU", "mAcc", "aAcc"):
                    rows.append(
                        ResultRow(
                            metric=k,
                            value=100.0 * float(head[k]),
                            protocol=f"{base}_{test}@lr={head['lr']:g}",
                            extra={**extra, "lr": head["lr"]},
                            **fields,
                        )
                    )
            for k, v in summary(metrics).items():
                rows.append(
                    ResultRow(
                        metric=k,
                        value=v,
                        protocol=f"{base}_sweep_{test}",
                        extra={**extra, "lr": metrics.get("lr"), "lrs": list(self.lrs)},
                        **fields,
                    )
                )
        return write_run_results(out_dir, rows, to_dict(self.cfg))

    def save_trained(self, model: nn.Module, out_dir: Path, step: int) -> None:
        save_segmenter(model, self.cfg, self.class_names, out_dir / "segmenter.pth")


def report(task: LinearSegmentationTask, cfg: SegmentationConfig) -> str:
    """The terminal summary: the (best) head's metrics, and with a sweep every head's mIoU."""
    metrics = task.last_eval
    text = format_metrics(metrics, cfg)
    heads = metrics.get("heads") or []
    if len(heads) > 1:
        each = ", ".join(f"lr {h['lr']:g}: {100 * h['mIoU']:.2f}" for h in heads)
        text += f"\nlinear heads (mIoU): {each}; best lr {metrics.get('lr'):g} (chosen on {cfg.data.val_split})"
    return text


def read_linear_weights(path: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict and saved config of a linear segmenter (``segmenter.pth`` or ``checkpoint-last.pth``
    of an ``ade20k --protocol linear`` run) for ``--eval-only --weights``."""
    from mae_transfer.checkpoint import check_dtypes

    state = read_segmenter_file(path, trust)
    sd = state.get("model") if isinstance(state.get("model"), dict) else None
    if sd is None or not any(k.startswith("decode_heads.") for k in sd):
        what = (
            "an UperNet segmenter: evaluate it with `mae-transfer ade20k --eval-only` (no --protocol)"
            if sd is not None and any(k.startswith("decode_head.") for k in sd)
            else "no linear segmenter of this toolkit (decode_heads.*): a backbone goes to --backbone"
        )
        raise CheckpointError(f"--weights {path}: {what}")
    check_dtypes(sd, f"--weights {path}")
    return sd, state.get("config")


def load_linear_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load a linear segmenter's state dict; a head that reads another number of blocks says so."""
    have = state.get("decode_heads.0.bn.weight")
    core = getattr(model, "module", model)
    if have is not None and have.shape[0] != core.channels and have.shape[0] % core.backbone.embed_dim == 0:
        blocks = have.shape[0] // core.backbone.embed_dim
        raise CheckpointError(
            f"--weights {path}: its heads read the last {blocks} blocks, this run {len(core.blocks)}; "
            f"give linear.layers={blocks} (--protocol linear_ms reads 4)"
        )
    load_segmenter_weights(model, state, path, classifier="decode_heads.0.conv_seg.weight")


__all__ = [
    "BNHead",
    "FixedWindows",
    "HeadsEvaluator",
    "LinearSegmentationTask",
    "LinearSegmenter",
    "cut_windows",
    "load_linear_weights",
    "read_linear_weights",
    "report",
    "window_index",
]
