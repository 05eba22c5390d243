"""Training augmentation for detection: large-scale jitter (LSJ) with ``torchvision.transforms.v2``.

LSJ (Ghiasi et al. 2021; the training input of both ViT transfer recipes, Benchmarking-ViT
section 3 and ViTDet A.2): resize the image so that it fits ``scale x size`` in both sides
(``scale`` uniform in [0.1, 2.0], aspect ratio kept), crop a random ``size x size`` window where the
image is larger, pad the bottom and right up to ``size x size``, flip horizontally with
probability 0.5. Boxes and instance masks follow the image; instances that leave the crop (or
shrink below a pixel) are removed together with their masks and labels.

Each sample's random draws come from a seed of ``(seed, epoch, index)``, so a resumed run, any
number of workers and any number of processes see exactly the same augmented images.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mae_transfer.data.seeded import SeededTransformDataset
from mae_transfer.data.stats import IMAGENET_MEAN


class LargeScaleJitter:
    """``(image, target) -> (image, target)`` with LSJ; image float ``(3, H, W)`` in [0, 1].

    ``target`` needs ``boxes`` (xyxy pixels), ``labels`` and optionally ``masks`` ``(N, H, W)``;
    other per-instance entries (``iscrowd``, ``area``) are dropped, since the model does not use them
    in training. The padding is the mean colour, which is zero after normalisation, like the
    padding the detector adds when it batches images.
    """

    def __init__(
        self,
        size: int,
        scale_range: tuple[float, float] = (0.1, 2.0),
        flip_prob: float = 0.5,
        fill: Sequence[float] = IMAGENET_MEAN,
    ):
        if size <= 0:
            raise ValueError(f"LSJ size must be positive, got {size}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"LSJ scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.size = int(size)
        self.scale_range = (float(lo), float(hi))
        self.flip_prob = float(flip_prob)
        self.fill = [float(v) for v in fill]
        self._jitter = v2.ScaleJitter((self.size, self.size), scale_range=self.scale_range, antialias=True)
        self._clamp = v2.ClampBoundingBoxes()
        self._sanitize = v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=lambda inputs: inputs[1]["labels"])

    def __call__(self, image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h, w = image.shape[-2:]
        img = tv_tensors.Image(image)
        out: dict[str, torch.Tensor] = {
            "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w)),
            "labels": target["labels"],
        }
        if "masks" in target:
            out["masks"] = tv_tensors.Mask(target["masks"])
        img, out = self._jitter(img, out)

        # Random crop where the scaled image is larger than the output (detectron2's FixedSizeCrop).
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - self.size + 1, ()).item()) if h > self.size else 0
        left = int(torch.randint(0, w - self.size + 1, ()).item()) if w > self.size else 0
        ch, cw = min(h, self.size), min(w, self.size)
        if (ch, cw) != (h, w):
            img = F.crop(img, top, left, ch, cw)
            out = {k: F.crop(v, top, left, ch, cw) if isinstance(v, (tv_tensors.BoundingBoxes, tv_tensors.Mask)) else v for k, v in out.items()}
        # Pad right and bottom to the square output.
        pad = [0, 0, self.size - cw, self.size - ch]  # left, top, right, bottom
        if pad[2] or pad[3]:
            img = F.pad(img, pad, fill=self.fill)
            out["boxes"] = F.pad(out["boxes"], pad)
            if "masks" in out:
                out["masks"] = F.pad(out["masks"], pad, fill=0)
        if self.flip_prob > 0 and torch.rand(()) < self.flip_prob:
            img = F.horizontal_flip(img)
            out = {k: F.horizontal_flip(v) if isinstance(v, (tv_tensors.BoundingBoxes, tv_tensors.Mask)) else v for k, v in out.items()}
        out["boxes"] = self._clamp(out["boxes"])
        img, out = self._sanitize(img, out)
        result = {"boxes": out["boxes"].as_subclass(torch.Tensor), "labels": out["labels"]}
        if "masks" in out:
            result["masks"] = out["masks"].as_subclass(torch.Tensor)
        return img.as_subclass(torch.Tensor), result


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches are lists: images differ in size and targets in instance count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


__all__ = ["LargeScaleJitter", "SeededTransformDataset", "collate_detection"]
