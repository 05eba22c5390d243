"""RoI heads of Mask R-CNN: RoI pooling, the box head and predictor, the mask head, their losses
and the per-image post-processing of detections.

The computation is detectron2's ``StandardROIHeads`` as ViTDet configures it: RoIAlign with
``aligned=True`` (half-pixel offsets) at the fixed scales 1/4..1/32 with the FPN level rule
``floor(4 + log2(sqrt(area) / 224))``; a box head of four 3x3 conv + norm + ReLU and one fc + ReLU;
class-specific box regression (weights 10, 10, 5, 5) with the background as the LAST class;
a mask head of four 3x3 conv + norm + ReLU, a 2x2 deconvolution + ReLU and a 1x1 predictor (one
channel per class, no background). Training samples 512 RoIs an image (ground-truth boxes
appended to the proposals; at most 25 % with IoU >= 0.5), uses cross-entropy and an L1 box loss
divided by the number of sampled RoIs, and a per-pixel BCE mask loss on mask targets rasterised
inside each foreground RoI. At test time: softmax scores > 0.05, NMS 0.5 per class, the 100 best.
Module names are detectron2's (``box_head.conv1``, ``box_predictor.cls_score``,
``mask_head.mask_fcn1`` ...).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms, roi_align

from mae_transfer.detection.boxes import BoxCoder, Matcher, assign_levels, clip_boxes, pairwise_iou, subsample_labels
from mae_transfer.detection.masks import Segment, mask_targets
from mae_transfer.models.pyramid import ConvNormAct


def _msra_fill(m: nn.Module) -> None:
    """Kaiming-normal (fan out, ReLU) weights, zero bias (Caffe2's MSRAFill, detectron2's conv init)."""
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """Pooled (R, C, S, S) features in channels-last memory, the layout LayerNorm2d returns: the first
    convolution then takes oneDNN's channels-last path as the later ones do (faster than NCHW on
    the CPU), and its norm needs no transposing copy."""
    return x.contiguous(memory_format=torch.channels_last)


class ROIPooler(nn.Module):
    """RoIAlign (``aligned=True``) of boxes from the pyramid level their size selects."""

    def __init__(
        self,
        output_size: int,
        strides: Sequence[int],
        sampling_ratio: int = 0,
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
    ):
        super().__init__()
        self.output_size = output_size
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(round(math.log2(strides[0])))
        self.max_level = int(round(math.log2(strides[-1])))
        if self.max_level - self.min_level + 1 != len(strides):
            raise ValueError(f"pooler strides must be consecutive powers of two, got {list(strides)}")
        self.sampling_ratio = sampling_ratio
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def forward(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pooled (R, C, S, S) for the boxes of every image (lists of (n_i, 4)), in order."""
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
        size = (self.output_size, self.output_size)
        if len(features) == 1:
            return roi_align(features[0], rois, size, self.scales[0], self.sampling_ratio, aligned=True)
        levels = assign_levels(
            rois[:, 1:], self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        x0 = features[0]
        # Every RoI has a level (assign_levels clamps; proposals and detections are finite), so each
        # row is written below: no zero fill.
        out = x0.new_empty((len(rois), x0.shape[1], *size))
        for lvl, (x, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == lvl, as_tuple=True)[0]
            if len(idx):
                out[idx] = roi_align(x, rois[idx], size, scale, self.sampling_ratio, aligned=True).to(out.dtype)
        return out


class BoxHead(nn.Module):
    """``conv1..convN`` (3x3, norm, ReLU) then ``fc1..fcM`` (+ ReLU) on pooled (R, C, S, S) features."""

    def __init__(
        self, in_channels: int, pooler_size: int, conv_dims: Sequence[int], fc_dims: Sequence[int], norm: str = "ln"
    ):
        super().__init__()
        c = in_channels
        self.num_convs, self.num_fcs = len(conv_dims), len(fc_dims)
        for k, d in enumerate(conv_dims):
            conv = ConvNormAct(c, d, 3, padding=1, norm=norm, activation=nn.ReLU(inplace=True))
            _msra_fill(conv)
            self.add_module(f"conv{k + 1}", conv)
            c = d
        dim = c * pooler_size * pooler_size
        for k, d in enumerate(fc_dims):
            fc = nn.Linear(dim, d)
            nn.init.kaiming_uniform_(fc.weight, a=1)  # Caffe2's XavierFill
            nn.init.zeros_(fc.bias)
            self.add_module(f"fc{k + 1}", fc)
            dim = d
        self.output_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _channels_last(x) if self.num_convs else x
        for k in range(self.num_convs):
            x = getattr(self, f"conv{k + 1}")(x)
        if self.num_fcs:
            start = 0
            if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                # A channels-last map (LayerNorm2d's output) is flattened as it lies, (S, S, C), and fc1's
                # columns are permuted to match: a copy of the weight instead of one of the (R, C*S*S) map.
                fc1 = self.fc1
                n, c, h, w = x.shape
                weight = fc1.weight.view(-1, c, h, w).permute(0, 2, 3, 1).reshape(fc1.out_features, -1)
                x = F.relu(F.linear(x.permute(0, 2, 3, 1).reshape(n, -1), weight, fc1.bias))
                start = 1
            else:
                x = x.flatten(1)
            for k in range(start, self.num_fcs):
                x = F.relu(getattr(self, f"fc{k + 1}")(x))
        return x


class BoxPredictor(nn.Module):
    """Class scores (R, K + 1), background last, and class-specific deltas (R, 4K)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(in_dim, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Module):
    """``mask_fcn1..N`` (3x3, norm, ReLU), ``deconv`` (2x2, stride 2) + ReLU, ``predictor`` (1x1, K)."""

    def __init__(self, in_channels: int, conv_dims: Sequence[int], num_classes: int, norm: str = "ln"):
        super().__init__()
        if len(conv_dims) < 2:
            raise ValueError("the mask head needs convolution widths and the deconvolution's (at least 2 values)")
        c = in_channels
        self.num_convs = len(conv_dims) - 1
        for k, d in enumerate(conv_dims[:-1]):
            conv = ConvNormAct(c, d, 3, padding=1, norm=norm, activation=nn.ReLU(inplace=True))
            _msra_fill(conv)
            self.add_module(f"mask_fcn{k + 1}", conv)
            c = d
        self.deconv = nn.ConvTranspose2d(c, conv_dims[-1], kernel_size=2, stride=2)
        _msra_fill(self.deconv)
        self.predictor = nn.Conv2d(conv_dims[-1], num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _channels_last(x)
        for k in range(self.num_convs):
            x = getattr(self, f"mask_fcn{k + 1}")(x)
        return self.predictor(F.relu(self.deconv(x)))


class ROIHeads(nn.Module):
    """Box and mask heads on proposals: losses in training, detections at test time."""

    def __init__(
        self,
        box_pooler: ROIPooler,
        box_head: BoxHead,
        box_predictor: BoxPredictor,
        mask_pooler: ROIPooler,
        mask_head: MaskHead,
        in_features: Sequence[str],
        num_classes: int,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        iou_threshold: float = 0.5,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    ):
        super().__init__()
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.in_features = list(in_features)
        self.num_classes = num_classes
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.matcher = Matcher([iou_threshold], [0, 1], allow_low_quality_matches=False)
        self.box_coder = BoxCoder(box_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def sample(self, proposals: Sequence[torch.Tensor], targets: Sequence[dict]) -> list[dict[str, torch.Tensor]]:
        """Per image: the sampled RoIs (ground truth appended first) with their class (K = background),
        matched ground-truth box and index."""
        out = []
        for boxes, t in zip(proposals, targets):
            gt = t["boxes"]
            boxes = torch.cat([boxes, gt.to(boxes.dtype)])
            matched, labels = self.matcher(pairwise_iou(gt, boxes))
            if len(gt):
                classes = t["labels"][matched].clone()
                classes[labels == 0] = self.num_classes
                classes[labels == -1] = -1
            else:
                classes = torch.full_like(matched, self.num_classes)
            pos, neg = subsample_labels(classes, self.batch_size_per_image, self.positive_fraction, self.num_classes)
            idx = torch.cat([pos, neg])
            out.append(
                {
                    "boxes": boxes[idx],
                    "classes": classes[idx],
                    "gt_boxes": gt[matched[idx]] if len(gt) else boxes[idx],
                    "gt_index": matched[idx],
                }
            )
        return out

    def losses(
        self, features: list[torch.Tensor], samples: list[dict], targets: Sequence[dict]
    ) -> dict[str, torch.Tensor]:
        scores, deltas = self.box_predictor(self.box_head(self.box_pooler(features, [s["boxes"] for s in samples])))
        classes = torch.cat([s["classes"] for s in samples])
        loss_cls = F.cross_entropy(scores.float(), classes, reduction="mean") if classes.numel() else scores.sum() * 0
        fg = torch.nonzero((classes >= 0) & (classes < self.num_classes), as_tuple=True)[0]
        boxes = torch.cat([s["boxes"] for s in samples])
        gt_boxes = torch.cat([s["gt_boxes"] for s in samples])
        fg_deltas = deltas.view(len(deltas), self.num_classes, 4)[fg, classes[fg]]
        target = self.box_coder.encode(boxes[fg], gt_boxes[fg])
        loss_box = F.l1_loss(fg_deltas.float(), target, reduction="sum") / max(classes.numel(), 1)
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box, "loss_mask": self.mask_loss(features, samples, targets)}

    def mask_loss(self, features: list[torch.Tensor], samples: list[dict], targets: Sequence[dict]) -> torch.Tensor:
        """BCE of the ground-truth class's mask logits against targets rasterised inside each foreground RoI."""
        fg = [(s["classes"] >= 0) & (s["classes"] < self.num_classes) for s in samples]
        fg_boxes = [s["boxes"][f] for s, f in zip(samples, fg)]
        logits = self.mask_head(self.mask_pooler(features, fg_boxes))
        if len(logits) == 0:
            return logits.sum() * 0
        size = logits.shape[-1]
        segments: list[Sequence[Segment]] = [t["segments"] for t in targets]
        gt = torch.cat(
            [mask_targets(seg, s["gt_index"][f], b, size) for seg, s, f, b in zip(segments, samples, fg, fg_boxes)]
        )
        classes = torch.cat([s["classes"][f] for s, f in zip(samples, fg)])
        picked = logits[torch.arange(len(classes), device=logits.device), classes]
        return F.binary_cross_entropy_with_logits(picked.float(), gt.to(picked.device), reduction="mean")

    # ------------------------------------------------------------------ inference
    def detect(
        self, features: list[torch.Tensor], proposals: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[dict[str, torch.Tensor]]:
        """Per image: ``boxes`` (N, 4) in the input frame, ``scores``, ``classes`` (0..K-1) and
        ``mask_probs`` (N, M, M) of the predicted class."""
        scores, deltas = self.box_predictor(self.box_head(self.box_pooler(features, proposals)))
        probs = F.softmax(scores.float(), dim=-1)
        boxes = self.box_coder.decode(deltas, torch.cat(list(proposals)))
        out = []
        start = 0
        for props, hw in zip(proposals, image_sizes):
            n = len(props)
            out.append(self._detect_one(boxes[start : start + n], probs[start : start + n], hw))
            start += n
        mask_boxes = [d["boxes"] for d in out]
        if sum(len(b) for b in mask_boxes):
            logits = self.mask_head(self.mask_pooler(features, mask_boxes))
            classes = torch.cat([d["classes"] for d in out])
            probs_m = logits[torch.arange(len(classes), device=logits.device), classes].float().sigmoid()
        else:
            side = 2 * self.mask_pooler.output_size
            probs_m = features[0].new_zeros((0, side, side), dtype=torch.float32)
        start = 0
        for d in out:
            n = len(d["boxes"])
            d["mask_probs"] = probs_m[start : start + n]
            start += n
        return out

    def _detect_one(self, boxes: torch.Tensor, probs: torch.Tensor, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        if not bool(valid.all()):
            boxes, probs = boxes[valid], probs[valid]
        scores = probs[:, :-1]  # the background is the last column
        k = scores.shape[1]
        boxes = clip_boxes(boxes.reshape(-1, 4), hw).view(-1, k, 4)
        keep_mask = scores > self.score_thresh
        idx = torch.nonzero(keep_mask)
        boxes, scores = boxes[keep_mask], scores[keep_mask]
        keep = batched_nms(boxes.float(), scores, idx[:, 1], self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "classes": idx[keep, 1]}


__all__ = ["BoxHead", "BoxPredictor", "MaskHead", "ROIHeads", "ROIPooler"]
