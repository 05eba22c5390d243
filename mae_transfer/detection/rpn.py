"""Region proposal network: anchors, the shared conv head, proposal selection and its losses.

The computation is detectron2's ``RPN`` with ``StandardRPNHead`` as ViTDet configures it
(``mask_rcnn_vitdet_b_100ep.py``): one anchor size per level (32..512 on p2..p6), aspect ratios
0.5 / 1 / 2 not rounded to pixels, two 3x3 convolutions with ReLU, the 1000 (test) or 2000
(training) best anchors of each level by objectness logit, boxes clipped to the unpadded image,
empty boxes dropped, NMS 0.7 per level, and the best 1000 overall. Training samples 256 anchors
an image (at most half positive; IoU >= 0.7 positive, < 0.3 negative, each object's best anchors
positive) and normalises both losses by 256 x images; the box loss is L1 on the deltas.
Module names are detectron2's (``rpn_head.conv.conv0``, ``objectness_logits``, ``anchor_deltas``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms

from mae_transfer.detection.boxes import (
    BoxCoder,
    Matcher,
    cell_anchors,
    clip_boxes,
    grid_anchors,
    nonempty,
    pairwise_iou,
    subsample_labels,
)
from mae_transfer.models.pyramid import ConvNormAct


class RPNHead(nn.Module):
    """``num_convs`` 3x3 convolutions with ReLU shared by all levels, then objectness (A) and deltas (4A)."""

    def __init__(self, channels: int, num_anchors: int, num_convs: int = 2):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"the RPN head needs at least one convolution, got {num_convs}")
        convs = [
            ConvNormAct(channels, channels, 3, padding=1, activation=nn.ReLU(inplace=True)) for _ in range(num_convs)
        ]
        # One convolution is stored as ``conv``, several as ``conv.conv0``, ``conv.conv1`` (detectron2).
        self.conv = convs[0] if num_convs == 1 else nn.Sequential()
        if num_convs > 1:
            for k, c in enumerate(convs):
                self.conv.add_module(f"conv{k}", c)
        self.objectness_logits = nn.Conv2d(channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # detectron2 StandardRPNHead: N(0, 0.01), zero bias
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: logits (B, A, H, W) and deltas (B, 4A, H, W)."""
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


class AnchorGenerator:
    """Anchors of every level, cached per feature-map size and device (no parameters)."""

    def __init__(
        self, sizes: Sequence[float], aspect_ratios: Sequence[float], strides: Sequence[int], offset: float = 0.0
    ):
        if len(sizes) != len(strides):
            raise ValueError(f"one anchor size per level: {len(sizes)} sizes for {len(strides)} strides")
        self.cells = [cell_anchors([s], aspect_ratios) for s in sizes]
        self.strides = list(strides)
        self.offset = offset
        self.num_anchors = len(aspect_ratios)
        self._cache: dict = {}

    def __call__(self, grid_sizes: Sequence[tuple[int, int]], device: torch.device) -> list[torch.Tensor]:
        key = (tuple(tuple(g) for g in grid_sizes), str(device))
        if key not in self._cache:
            self._cache = {
                key: [
                    grid_anchors(c.to(device), s, g, self.offset)
                    for c, s, g in zip(self.cells, self.strides, grid_sizes)
                ]
            }
        return self._cache[key]


class RPN(nn.Module):
    """Proposals (and in training the RPN losses) from pyramid levels ``in_features``."""

    def __init__(
        self,
        head: RPNHead,
        anchors: AnchorGenerator,
        in_features: Sequence[str],
        pre_nms_topk: tuple[int, int] = (2000, 1000),
        post_nms_topk: tuple[int, int] = (1000, 1000),
        nms_thresh: float = 0.7,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        iou_thresholds: tuple[float, float] = (0.3, 0.7),
    ):
        super().__init__()
        self.rpn_head = head
        self.anchor_generator = anchors
        self.in_features = list(in_features)
        self.pre_nms_topk = tuple(pre_nms_topk)  # (training, test)
        self.post_nms_topk = tuple(post_nms_topk)
        self.nms_thresh = nms_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.matcher = Matcher(list(iou_thresholds), [0, -1, 1], allow_low_quality_matches=True)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def forward(
        self,
        features: dict[str, torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        gt_boxes: Sequence[torch.Tensor] | None = None,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """Proposals per image as ``(boxes (P, 4), logits (P,))`` ordered by logit, and the losses
        (empty unless training with ``gt_boxes``)."""
        maps = [features[f] for f in self.in_features]
        anchors = self.anchor_generator([m.shape[-2:] for m in maps], maps[0].device)
        logits, deltas = self.rpn_head(maps)
        b = maps[0].shape[0]
        # (B, A, H, W) -> (B, H*W*A): per position, then anchor (the anchors' layout).
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [x.view(b, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in deltas]
        losses: dict[str, torch.Tensor] = {}
        if self.training and gt_boxes is not None:
            losses = self.losses(anchors, logits, deltas, gt_boxes)
        with torch.no_grad():
            proposals = self.select(anchors, [x.detach() for x in logits], [x.detach() for x in deltas], image_sizes)
        return proposals, losses

    def select(
        self,
        anchors: Sequence[torch.Tensor],
        logits: Sequence[torch.Tensor],
        deltas: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: top-k anchors per level by logit, decoded, clipped, empty boxes dropped, NMS
        within each level, the best ``post_nms_topk`` overall (ordered by logit)."""
        mode = 0 if self.training else 1
        pre, post = self.pre_nms_topk[mode], self.post_nms_topk[mode]
        b = logits[0].shape[0]
        top_boxes, top_logits, levels = [], [], []
        for lvl, (anc, lg, dl) in enumerate(zip(anchors, logits, deltas)):
            k = min(lg.shape[1], pre)
            vals, idx = lg.topk(k, dim=1)
            picked = torch.gather(dl, 1, idx[..., None].expand(-1, -1, 4)).reshape(-1, 4)
            # Decoding is per row, so decoding only the chosen anchors gives the same boxes.
            top_boxes.append(self.box_coder.decode(picked, anc[idx.reshape(-1)]).view(b, k, 4))
            top_logits.append(vals)
            levels.append(torch.full((k,), lvl, dtype=torch.int64, device=lg.device))
        all_boxes, all_logits, all_levels = torch.cat(top_boxes, 1), torch.cat(top_logits, 1), torch.cat(levels)
        out = []
        for i, hw in enumerate(image_sizes):
            bx, lg, lv = all_boxes[i], all_logits[i], all_levels
            valid = torch.isfinite(bx).all(dim=1) & torch.isfinite(lg)
            if not bool(valid.all()):
                if self.training:
                    raise FloatingPointError("the RPN predicted non-finite boxes or scores: training has diverged")
                bx, lg, lv = bx[valid], lg[valid], lv[valid]
            bx = clip_boxes(bx, hw)
            keep = nonempty(bx)
            bx, lg, lv = bx[keep], lg[keep], lv[keep]
            keep = batched_nms(bx.float(), lg, lv, self.nms_thresh)[:post]
            out.append((bx[keep], lg[keep]))
        return out

    def losses(
        self,
        anchors: Sequence[torch.Tensor],
        logits: Sequence[torch.Tensor],
        deltas: Sequence[torch.Tensor],
        gt_boxes: Sequence[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Objectness BCE and L1 box loss on 256 sampled anchors per image, both / (256 x images)."""
        all_anchors = torch.cat(list(anchors))
        logits_t = torch.cat(list(logits), dim=1)
        deltas_t = torch.cat(list(deltas), dim=1)
        cls = logits_t.new_zeros((), dtype=torch.float32)
        loc = logits_t.new_zeros((), dtype=torch.float32)
        for i, gt in enumerate(gt_boxes):
            matched, lab = self.matcher(pairwise_iou(gt, all_anchors))
            pos, neg = subsample_labels(lab.to(torch.int64), self.batch_size_per_image, self.positive_fraction, 0)
            if len(pos) and len(gt):
                target = self.box_coder.encode(all_anchors[pos], gt[matched[pos]])
                loc = loc + F.l1_loss(deltas_t[i, pos].float(), target, reduction="sum")
            sampled = torch.cat([pos, neg])
            labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).float()
            cls = cls + F.binary_cross_entropy_with_logits(logits_t[i, sampled].float(), labels, reduction="sum")
        norm = self.batch_size_per_image * len(gt_boxes)
        return {"loss_rpn_cls": cls / norm, "loss_rpn_loc": loc / norm}


__all__ = ["AnchorGenerator", "RPN", "RPNHead"]
