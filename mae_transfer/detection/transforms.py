"""Detection input pipelines: large-scale jitter for training and the test resize, as ViTDet's.

Training (detectron2 ``coco_loader_lsj.py``): horizontal flip with probability 0.5, then
``ResizeScale``: a scale ``s`` uniform in [0.1, 2.0] and the image resized (aspect kept) to fit
``s x size`` in both sides, the new size rounded half to even; then ``FixedSizeCrop`` without
padding: a ``size x size`` window at offset ``round(u * (side - size))`` for one ``u`` uniform in
[0, 1] shared by both axes (the whole image when smaller). The detector pads to ``size x size``.
Polygons follow every step (clipped to the crop window), and each object's box is recomputed
from its transformed polygons (``recompute_boxes``: the tight box of what is left after the crop);
objects with no area left are dropped. Images are resized with PIL's bilinear filter on uint8, as
detectron2's ``ResizeTransform`` does.

Test: ``ResizeShortestEdge(size, max_size=size)``: the longer side becomes ``size`` (sizes rounded
half up), PIL bilinear on uint8.

Each training sample's random draws come from a seed of ``(seed, epoch, index)``, so a resumed run,
any number of workers and any number of processes see exactly the same augmented images.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mae_transfer.data.seeded import SeededTransformDataset
from mae_transfer.detection.masks import crop_segment, flip_segment, resize_segment, segment_box


def resize_uint8(image: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, h, w) with PIL's bilinear filter (which widens when shrinking)."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if tuple(image.shape[-2:]) == (h, w):
        return image
    if image.dtype != torch.uint8:
        raise TypeError(f"detection images are uint8 RGB tensors (3, H, W), got {image.dtype}")
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    out = np.asarray(pil.resize((w, h), Image.BILINEAR))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).contiguous()


def shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
    """``ResizeShortestEdge(size, max_size=size)``: (h', w') with the longer side ``size``, the
    shorter scaled alike, each rounded half up (425 x 640 -> 213 x 320 at 320)."""
    scale = size / min(h, w)
    nh, nw = (float(size), scale * w) if h < w else (scale * h, float(size))
    if max(nh, nw) > size:
        f = size / max(nh, nw)
        nh, nw = nh * f, nw * f
    return int(nh + 0.5), int(nw + 0.5)


def resize_for_test(image: torch.Tensor, size: int) -> torch.Tensor:
    """The test input of a detector with input ``size``: uint8 (3, h', w'), longer side ``size``."""
    return resize_uint8(image, shortest_edge_size(int(image.shape[-2]), int(image.shape[-1]), size))


class ResizeForTest:
    """``(image, target) -> (resized image, target)``; the target keeps ``orig_size`` for the output frame."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        return resize_for_test(image, self.size), target


class LargeScaleJitter:
    """``(image, target) -> (image, target)`` with ViTDet's LSJ (see the module docstring).

    ``image`` uint8 (3, H, W); ``target`` needs ``labels`` and ``segments`` (one per object: a list
    of flat polygons or a (H, W) bitmask; see :mod:`mae_transfer.detection.masks`). Returns the
    jittered image, at most ``size x size``, and ``boxes`` (N, 4) recomputed from the segments,
    ``labels`` and ``segments`` of the objects that are still there.
    """

    def __init__(self, size: int, scale_range: tuple[float, float] = (0.1, 2.0), flip_prob: float = 0.5):
        if size <= 0:
            raise ValueError(f"LSJ size must be positive, got {size}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"LSJ scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.size = int(size)
        self.scale_range = (float(lo), float(hi))
        self.flip_prob = float(flip_prob)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        segments = list(target["segments"])
        labels = target["labels"]
        h, w = int(image.shape[-2]), int(image.shape[-1])
        if self.flip_prob > 0 and float(torch.rand(())) < self.flip_prob:
            image = image.flip(-1)
            segments = [flip_segment(s, w) for s in segments]
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * float(torch.rand((), dtype=torch.float64))
        factor = min(self.size * scale / h, self.size * scale / w)
        nh, nw = round(h * factor), round(w * factor)  # round half to even, as numpy's
        nh, nw = max(nh, 1), max(nw, 1)
        image = resize_uint8(image, (nh, nw))
        segments = [resize_segment(s, (nh, nw), (nw / w, nh / h)) for s in segments]
        u = float(torch.rand((), dtype=torch.float64))
        y0, x0 = round(max(nh - self.size, 0) * u), round(max(nw - self.size, 0) * u)
        if nh > self.size or nw > self.size:
            image = image[:, y0 : y0 + self.size, x0 : x0 + self.size]
        # The window is size x size even where the image is smaller (nothing is cut there).
        segments = [crop_segment(s, x0, y0, self.size, self.size) for s in segments]
        boxes = torch.tensor([segment_box(s) for s in segments], dtype=torch.float32).reshape(-1, 4)
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)
        idx = torch.nonzero(keep, as_tuple=True)[0].tolist()
        return image.contiguous(), {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "segments": [segments[i] for i in idx],
        }


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches are lists: images differ in size and targets in instance count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


__all__ = [
    "LargeScaleJitter",
    "SeededTransformDataset",
    "ResizeForTest",
    "collate_detection",
    "resize_for_test",
    "resize_uint8",
    "shortest_edge_size",
]
