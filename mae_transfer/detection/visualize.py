"""Pictures of detections: ground truth next to predictions, boxes and masks drawn in class colours."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from mae_transfer.io import atomic_write


def class_color(label: int) -> tuple[int, int, int]:
    """A stable, well-separated colour for a class (golden-ratio hues)."""
    h = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    masks: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """``image`` uint8 (3, H, W) (or float in [0, 1]) -> uint8 (3, H, W) with masks (alpha 0.45) and boxes.

    ``masks``: (N, H, W) or (N, 1, H, W), binary or probabilities (thresholded at 0.5).
    """
    if image.dtype == torch.uint8:
        canvas = image.detach().cpu().clone()
    else:
        canvas = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    n = int(labels.numel())
    if n == 0:
        return canvas
    labels = labels.detach().cpu().long()
    colors = [class_color(int(c)) for c in labels]
    if masks is not None and masks.numel():
        m = masks.detach().cpu()
        if m.dim() == 4:
            m = m[:, 0]
        canvas = draw_segmentation_masks(
            canvas, m.bool() if m.dtype == torch.bool else m > 0.5, alpha=0.45, colors=colors
        )
    text = []
    for k in range(n):
        name = class_names[int(labels[k])] if 0 <= int(labels[k]) < len(class_names) else str(int(labels[k]))
        text.append(f"{name} {float(scores[k]):.2f}" if scores is not None else name)
    width = max(1, round(max(image.shape[-2:]) / 320))
    return draw_bounding_boxes(canvas, boxes.detach().cpu().float(), labels=text, colors=colors, width=width)


MIN_SIDE = 384


def _enlarge(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _enlarge_instances(inst: dict[str, torch.Tensor], factor: int) -> dict[str, torch.Tensor]:
    out = dict(inst)
    out["boxes"] = inst["boxes"].float() * factor
    if inst.get("masks") is not None:
        out["masks"] = _enlarge(inst["masks"], factor)
    return out


def _titled(panel: torch.Tensor, title: str) -> Image.Image:
    img = Image.fromarray(panel.permute(1, 2, 0).numpy())
    bar = 16
    out = Image.new("RGB", (img.width, img.height + bar), (255, 255, 255))
    out.paste(img, (0, bar))
    ImageDraw.Draw(out).text((4, 2), title, fill=(0, 0, 0))
    return out


def save_comparison(
    image: torch.Tensor,
    target: dict[str, torch.Tensor],
    prediction: dict[str, torch.Tensor],
    class_names: Sequence[str],
    path: str | Path,
    score_thresh: float = 0.5,
) -> Path:
    """Save ``ground truth | prediction`` for one image as a PNG; predictions below ``score_thresh``
    are not drawn. Crowd regions of the ground truth are drawn like other instances. Images smaller
    than ``MIN_SIDE`` pixels are enlarged (nearest neighbour) so that labels stay readable."""
    if "masks" not in target and "segments" in target:
        from mae_transfer.detection.masks import segments_to_masks

        target = {**target, "masks": segments_to_masks(target["segments"], int(image.shape[-2]), int(image.shape[-1]))}
    factor = max(1, math.ceil(MIN_SIDE / max(image.shape[-2:])))
    if factor > 1:
        image, target, prediction = (
            _enlarge(image, factor),
            _enlarge_instances(target, factor),
            _enlarge_instances(prediction, factor),
        )
    gt = draw_instances(image, target["boxes"], target["labels"], class_names, masks=target.get("masks"))
    keep = prediction["scores"] >= score_thresh
    pr = draw_instances(
        image,
        prediction["boxes"][keep],
        prediction["labels"][keep],
        class_names,
        masks=prediction["masks"][keep] if "masks" in prediction else None,
        scores=prediction["scores"][keep],
    )
    left = _titled(gt, f"ground truth ({int(target['labels'].numel())})")
    right = _titled(pr, f"prediction, score >= {score_thresh:g} ({int(keep.sum())})")
    sheet = Image.new("RGB", (left.width + right.width + 8, left.height), (255, 255, 255))
    sheet.paste(left, (0, 0))
    sheet.paste(right, (left.width + 8, 0))
    path = Path(path)
    with atomic_write(path, "wb") as f:
        sheet.save(f, format="PNG")
    return path


__all__ = ["class_color", "draw_instances", "save_comparison"]
