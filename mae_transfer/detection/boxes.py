"""Box arithmetic of the two-stage detector: deltas, IoU, matching, sampling, anchors, RoI levels.

Every function computes what detectron2's ViTDet Mask R-CNN computes (the reference that
``tests/test_vitdet_parity.py`` compares against), on plain tensors. Boxes are ``(N, 4)`` float
``(x0, y0, x1, y1)`` in pixels of the (resized, unpadded) input image.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# Largest log-scale change a predicted box may make (Detectron's log(1000 / 16)), so exp() stays finite.
SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Boxes <-> ``(dx, dy, dw, dh)`` deltas relative to reference boxes, scaled by ``weights``.

    ``dx = wx * (target_cx - cx) / w``, ``dw = ww * log(target_w / w)`` and likewise for y / h;
    decoding clamps ``dw, dh`` at :data:`SCALE_CLAMP`. RPN uses weights (1, 1, 1, 1), the box head
    (10, 10, 5, 5).
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), scale_clamp: float = SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Deltas (N, 4) that turn ``boxes`` (N, 4) into ``targets`` (N, 4)."""
        wx, wy, ww, wh = self.weights
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        cx = boxes[:, 0] + 0.5 * w
        cy = boxes[:, 1] + 0.5 * h
        tw = targets[:, 2] - targets[:, 0]
        th = targets[:, 3] - targets[:, 1]
        tcx = targets[:, 0] + 0.5 * tw
        tcy = targets[:, 1] + 0.5 * th
        return torch.stack(
            (wx * (tcx - cx) / w, wy * (tcy - cy) / h, ww * torch.log(tw / w), wh * torch.log(th / h)), dim=1
        )

    def decode(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes (N, 4k) from deltas (N, 4k) (k boxes per reference, e.g. one per class) and ``boxes`` (N, 4).

        Computed in float32 whatever the dtype of ``deltas`` (mixed precision).
        """
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        cx = boxes[:, 0] + 0.5 * w
        cy = boxes[:, 1] + 0.5 * h
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        pcx = dx * w[:, None] + cx[:, None]
        pcy = dy * h[:, None] + cy[:, None]
        pw = torch.exp(dw) * w[:, None]
        ph = torch.exp(dh) * h[:, None]
        out = torch.stack((pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph), dim=-1)
        return out.reshape(deltas.shape)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def clip_boxes(boxes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Boxes (N, 4) clamped into an image of size ``hw`` = (height, width)."""
    h, w = hw
    x0 = boxes[:, 0].clamp(min=0, max=w)
    y0 = boxes[:, 1].clamp(min=0, max=h)
    x1 = boxes[:, 2].clamp(min=0, max=w)
    y1 = boxes[:, 3].clamp(min=0, max=h)
    return torch.stack((x0, y0, x1, y1), dim=-1)


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """(N,) bool: width and height both above ``threshold``."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU (M, N) of boxes ``a`` (M, 4) and ``b`` (N, 4); 0 where they do not overlap."""
    area_a, area_b = box_area(a), box_area(b)
    wh = (torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])).clamp(min=0)
    inter = wh.prod(dim=2)
    return torch.where(
        inter > 0, inter / (area_a[:, None] + area_b - inter), torch.zeros(1, dtype=inter.dtype, device=inter.device)
    )


class Matcher:
    """Assigns each prediction (column) its best ground truth (row) and a label by IoU interval.

    ``thresholds`` [t1, ..., tk] split [-inf, t1), [t1, t2), ..., [tk, inf) and ``labels`` gives
    one label per interval (1 positive, 0 negative, -1 ignored). With
    ``allow_low_quality_matches`` every prediction whose IoU with some ground truth equals that
    ground truth's best IoU is positive too (RPN: no object goes without an anchor). With no ground
    truth every prediction gets ``labels[0]`` and index 0.
    """

    def __init__(self, thresholds: Sequence[float], labels: Sequence[int], allow_low_quality_matches: bool = False):
        if len(labels) != len(thresholds) + 1:
            raise ValueError(f"{len(thresholds)} thresholds need {len(thresholds) + 1} labels, got {list(labels)}")
        self.thresholds = [-math.inf, *thresholds, math.inf]
        self.labels = list(labels)
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """quality (G, P) -> matched ground-truth index (P,) int64 and label (P,) int8."""
        if quality.numel() == 0:
            n = quality.shape[1]
            return (quality.new_zeros(n, dtype=torch.int64), quality.new_full((n,), self.labels[0], dtype=torch.int8))
        values, matches = quality.max(dim=0)
        labels = matches.new_ones(matches.shape, dtype=torch.int8)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            labels[(values >= low) & (values < high)] = label
        if self.allow_low_quality_matches:
            best = quality.max(dim=1).values
            _, preds = torch.nonzero(quality == best[:, None], as_tuple=True)
            labels[preds] = 1
        return matches, labels


def subsample_labels(
    labels: torch.Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positives (label not -1 and not ``bg_label``) and negatives (``bg_label``).

    At most ``int(num_samples * positive_fraction)`` positives; negatives fill the rest of
    ``num_samples`` as far as there are any. Returns the two index vectors.
    """
    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
    neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
    return pos, neg


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """Anchors (len(sizes) * len(aspect_ratios), 4) centred at 0: for ratio r = h / w,
    ``w = sqrt(size**2 / r)``, ``h = r * w``, not rounded to whole pixels."""
    out = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out, dtype=torch.float32)


def grid_anchors(cell: torch.Tensor, stride: int, grid_hw: tuple[int, int], offset: float = 0.0) -> torch.Tensor:
    """Anchors (H * W * A, 4) of a feature map, laid out per position (row, column) then anchor."""
    h, w = grid_hw
    device = cell.device
    xs = torch.arange(offset * stride, w * stride, step=stride, dtype=torch.float32, device=device)
    ys = torch.arange(offset * stride, h * stride, step=stride, dtype=torch.float32, device=device)
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    sx, sy = sx.reshape(-1), sy.reshape(-1)
    shifts = torch.stack((sx, sy, sx, sy), dim=1)
    return (shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4)


def assign_levels(
    boxes: torch.Tensor, min_level: int, max_level: int, canonical_size: float = 224.0, canonical_level: int = 4
) -> torch.Tensor:
    """Pyramid level (0 = ``min_level``) of each RoI (N, 4): ``floor(canonical_level + log2(sqrt(area) /
    canonical_size + 1e-8))`` clamped to [min_level, max_level] (FPN paper eq. 1)."""
    sizes = torch.sqrt(box_area(boxes))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + 1e-8))
    return torch.clamp(levels, min=min_level, max=max_level).to(torch.int64) - min_level


__all__ = [
    "BoxCoder",
    "Matcher",
    "SCALE_CLAMP",
    "assign_levels",
    "box_area",
    "cell_anchors",
    "clip_boxes",
    "grid_anchors",
    "nonempty",
    "pairwise_iou",
    "subsample_labels",
]
