"""Semantic segmentation metrics accumulated over a dataset (not averaged per image).

The definitions are those of the ADE20K devkit (``intersectionAndUnion`` and ``pixelAccuracy``,
summed over images) and of mmsegmentation's ``IoUMetric``, which agree:

* per class c: intersection = pixels labelled c and predicted c, union = labelled c + predicted c
  - intersection, counted only on labelled pixels (label != ignore);
* IoU_c = intersection / union; mIoU = mean over the classes with union > 0 (a class that is
  neither labelled nor predicted anywhere is left out, not counted as 0 or 1);
* Acc_c = intersection / labelled c; mAcc = mean over classes that occur in the labels;
* aAcc (pixel accuracy) = correctly predicted labelled pixels / labelled pixels. A prediction
  outside ``0..num_classes-1`` (e.g. the devkit's 0 = "unlabelled") is wrong and counts in no
  class's prediction area.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mae_transfer.engine.evaluator import DatasetEvaluator

IGNORE_INDEX = 255  # label value that is not evaluated (ADE20K: the "other" class 0 after reduce_zero_label)


class SegmentationMeter:
    """Accumulates a ``num_classes x num_classes`` confusion matrix (rows: label, cols: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        # Labelled pixels predicted outside 0..num_classes-1, by label: wrong, and in no prediction area.
        self.out_of_range = torch.zeros(self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one image (or a batch) of integer predictions and labels of the same shape."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        pred = pred.reshape(-1).long().cpu()
        label = label.reshape(-1).long().cpu()
        labelled = (label != self.ignore_index) & (label >= 0) & (label < self.num_classes)
        pred, label = pred[labelled], label[labelled]
        valid = (pred >= 0) & (pred < self.num_classes)
        self.out_of_range += torch.bincount(label[~valid], minlength=self.num_classes)
        idx = label[valid] * self.num_classes + pred[valid]
        self.confusion += torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def merge(self, other: "SegmentationMeter") -> None:
        self.confusion += other.confusion
        self.out_of_range += other.out_of_range

    def compute(self, class_names: Sequence[str] | None = None) -> dict:
        """``aAcc``, ``mIoU``, ``mAcc`` (fractions in [0, 1]) and per-class IoU / accuracy (NaN where
        undefined), plus ``num_classes_with_union``."""
        cm = self.confusion.double()
        intersection = cm.diag()
        area_label = cm.sum(1) + self.out_of_range.double()
        area_pred = cm.sum(0)
        union = area_label + area_pred - intersection
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, math.nan))
        acc = torch.where(area_label > 0, intersection / area_label.clamp(min=1), torch.full_like(union, math.nan))
        total_labelled = float(area_label.sum())
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        return {
            "aAcc": float(intersection.sum()) / total_labelled if total_labelled else math.nan,
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "num_classes_with_union": int((union > 0).sum()),
            "per_class": {names[c]: {"IoU": float(iou[c]), "Acc": float(acc[c])} for c in range(self.num_classes)},
            "per_class_iou": [float(v) for v in iou],
        }


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


class SegmentationEvaluator(DatasetEvaluator):
    """mIoU / mAcc / aAcc of predicted label maps: ``process(inputs, (prediction, label))`` with
    (H, W) integer maps; the confusion matrices of every process are summed by the engine."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.class_names, self.ignore_index = num_classes, class_names, ignore_index
        self.reset()

    def reset(self) -> None:
        self.meter = SegmentationMeter(self.num_classes, ignore_index=self.ignore_index)

    def process(self, inputs, outputs) -> None:
        prediction, label = outputs
        self.meter.update(prediction, label)

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.meter.confusion, self.meter.out_of_range

    def merge(self, states: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.meter.confusion = torch.stack([c for c, _ in states]).sum(0)
        self.meter.out_of_range = torch.stack([o for _, o in states]).sum(0)

    def evaluate(self) -> dict:
        return self.meter.compute(self.class_names)
