"""Instance masks of the detector: polygons through augmentation, per-box training targets, pasting.

An instance's segmentation travels through training as either

* a list of polygons, each a flat float64 array ``[x0, y0, x1, y1, ...]`` in image pixels (COCO's
  non-crowd annotations), or
* a uint8 bitmask tensor ``(H, W)`` (an RLE annotation of a non-crowd object, which COCO files
  rarely have; detectron2's polygon pipeline refuses them, here they work).

Mask targets are made per proposal box, as detectron2 does: polygons are shifted into the box,
scaled to ``size x size`` and rasterised by pycocotools; bitmasks are sampled with RoIAlign
(``aligned=True``) and thresholded at 0.5. At test time the ``28 x 28`` mask probabilities are
pasted into the image at the float box with bilinear sampling (``grid_sample``,
``align_corners=False``, zero outside) and thresholded with ``>= 0.5``.
"""

from __future__ import annotations

import warnings
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.ops import roi_align

Segment = Union[list, torch.Tensor]  # list of flat float64 polygons, or a (H, W) uint8 bitmask


def decode_rle(rle) -> np.ndarray:
    """pycocotools' decode of a compressed RLE to a uint8 (H, W) mask, without its numpy 2 warning."""
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def polygons_to_mask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Rasterise polygons (flat coordinate arrays) to a (height, width) bool mask with pycocotools."""
    if len(polygons) == 0:
        return np.zeros((height, width), dtype=bool)
    rles = mask_utils.frPyObjects([np.asarray(p, dtype=np.float64) for p in polygons], height, width)
    return decode_rle(mask_utils.merge(rles)).astype(bool)


def segments_to_masks(segments: Sequence[Segment], height: int, width: int) -> torch.Tensor:
    """uint8 masks (N, height, width) of a list of segments (for pictures and tests)."""
    out = torch.zeros(len(segments), height, width, dtype=torch.uint8)
    for k, seg in enumerate(segments):
        if torch.is_tensor(seg):
            out[k] = seg.to(torch.uint8)
        else:
            out[k] = torch.from_numpy(polygons_to_mask(seg, height, width).astype(np.uint8))
    return out


# ---------------------------------------------------------------------------- geometry


def clip_polygon(points: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """A polygon (K, 2) clipped to the rectangle [x0, x1] x [y0, y1] (Sutherland-Hodgman).

    Returns (K', 2), empty when nothing of the polygon is inside. A concave polygon that the
    rectangle cuts into pieces comes back as one outline whose pieces are joined along the
    rectangle's border by zero-width edges; it rasterises to the same pixels and has the same
    bounding box as the pieces.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    for axis, bound, lower in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if len(pts) == 0:
            break
        inside = pts[:, axis] >= bound if lower else pts[:, axis] <= bound
        if inside.all():
            continue
        out = []
        prev, prev_in = pts[-1], inside[-1]
        for cur, cur_in in zip(pts, inside):
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                cross = prev + t * (cur - prev)
                cross[axis] = bound
                out.append(cross)
            if cur_in:
                out.append(cur)
            prev, prev_in = cur, cur_in
        pts = np.asarray(out, dtype=np.float64).reshape(-1, 2)
    return pts


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def flip_segment(seg: Segment, width: int) -> Segment:
    """Mirror a segment horizontally in an image ``width`` pixels wide (x -> width - x)."""
    if torch.is_tensor(seg):
        return seg.flip(-1)
    out = []
    for p in seg:
        q = np.array(p, dtype=np.float64)
        q[0::2] = width - q[0::2]
        out.append(q)
    return out


def resize_segment(seg: Segment, size_hw: tuple[int, int], scale_xy: tuple[float, float]) -> Segment:
    """A segment in an image resized to ``size_hw``: polygon x * sx, y * sy; bitmasks nearest-neighbour."""
    if torch.is_tensor(seg):
        from PIL import Image

        pil = Image.fromarray(seg.numpy()).resize((size_hw[1], size_hw[0]), Image.NEAREST)
        return torch.from_numpy(np.asarray(pil).copy())
    sx, sy = scale_xy
    out = []
    for p in seg:
        q = np.array(p, dtype=np.float64)
        q[0::2] *= sx
        q[1::2] *= sy
        out.append(q)
    return out


def crop_segment(seg: Segment, x0: int, y0: int, w: int, h: int) -> Segment:
    """A segment in the crop window (x0, y0, w, h): polygons clipped to the window and shifted
    (pieces with no area dropped), bitmasks sliced."""
    if torch.is_tensor(seg):
        return seg[y0 : y0 + h, x0 : x0 + w]
    out = []
    for p in seg:
        clipped = clip_polygon(np.asarray(p).reshape(-1, 2), x0, y0, x0 + w, y0 + h)
        if len(clipped) < 3 or _polygon_area(clipped) <= 0.0:
            continue
        clipped = clipped - np.array([x0, y0], dtype=np.float64)
        out.append(clipped.reshape(-1))
    return out


def segment_box(seg: Segment) -> list[float]:
    """Tight box of a segment: polygon coordinate extremes, or the bitmask's pixel extent
    (``[x_min, y_min, x_max + 1, y_max + 1]``); ``[0, 0, 0, 0]`` when empty."""
    if torch.is_tensor(seg):
        cols = torch.nonzero(seg.any(dim=0), as_tuple=True)[0]
        rows = torch.nonzero(seg.any(dim=1), as_tuple=True)[0]
        if len(cols) == 0 or len(rows) == 0:
            return [0.0, 0.0, 0.0, 0.0]
        return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]
    if not seg:
        return [0.0, 0.0, 0.0, 0.0]
    pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in seg])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    # float32, as the boxes are kept.
    return [float(np.float32(v)) for v in (lo[0], lo[1], hi[0], hi[1])]


# ---------------------------------------------------------------------------- training targets


def polygons_in_box(polygons: Sequence[np.ndarray], box: Sequence[float], size: int) -> np.ndarray:
    """(size, size) bool mask of polygons seen through ``box``: shifted to the box corner, scaled by
    ``size / box side`` (sides below 0.1 px count as 0.1) and rasterised."""
    x0, y0, x1, y1 = (float(v) for v in box)
    rw = size / max(x1 - x0, 0.1)
    rh = size / max(y1 - y0, 0.1)
    shifted = []
    for p in polygons:
        q = np.array(p, dtype=np.float64)
        q[0::2] = (q[0::2] - x0) * rw
        q[1::2] = (q[1::2] - y0) * rh
        shifted.append(q)
    return polygons_to_mask(shifted, size, size)


def mask_targets(segments: Sequence[Segment], gt_index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Binary targets (R, size, size) float for RoIs ``boxes`` (R, 4) matched to ``segments[gt_index]``."""
    r = int(gt_index.numel())
    out = torch.zeros(r, size, size, dtype=torch.float32)
    if r == 0:
        return out
    boxes_cpu = boxes.detach().float().cpu()
    idx = gt_index.cpu().tolist()
    bit_rows = [k for k, g in enumerate(idx) if torch.is_tensor(segments[g])]
    for k, g in enumerate(idx):
        if not torch.is_tensor(segments[g]):
            out[k] = torch.from_numpy(polygons_in_box(segments[g], boxes_cpu[k].tolist(), size))
    if bit_rows:
        used = sorted({idx[k] for k in bit_rows})
        where = {g: i for i, g in enumerate(used)}
        stack = torch.stack([segments[g].float() for g in used])[:, None]
        rois = torch.cat([torch.tensor([[float(where[idx[k]])] for k in bit_rows]), boxes_cpu[bit_rows]], dim=1)
        sampled = roi_align(stack, rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)[:, 0]
        out[bit_rows] = (sampled >= 0.5).float()
    return out


# ---------------------------------------------------------------------------- pasting

# Samples one batched grid_sample may compute (64 Mi floats, 256 MiB).
_PASTE_SAMPLES = 1 << 26


def _paste_windows(probs: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int], threshold: float, to_cpu: bool):
    """Each mask pasted in its own pixel window, the box grown by one pixel and clipped to the image.

    Returns the windows ``(x0, y0, x1, y1)`` (N, 4) int64 on the CPU and the bool crops (list of
    ``(y1 - y0, x1 - x0)`` tensors, on the CPU with ``to_cpu``, else on ``probs``' device). Masks
    are sampled in batches of similar window size (one ``grid_sample`` each, windows padded to the
    batch's largest); each pixel's grid coordinate is computed elementwise from its own integer
    position and box, so a crop holds the same samples as one ``grid_sample`` over the whole image.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    n = probs.shape[0]
    dev = probs.device
    probs, boxes = probs.float(), boxes.float().to(dev)
    lo = (boxes[:, :2].floor() - 1).clamp(min=0)
    win = torch.stack(
        [
            lo[:, 0].clamp(max=w),
            lo[:, 1].clamp(max=h),
            (boxes[:, 2].ceil() + 1).clamp(max=w),
            (boxes[:, 3].ceil() + 1).clamp(max=h),
        ],
        dim=1,
    ).to(torch.int64)
    win[:, 2:] = torch.maximum(win[:, 2:], win[:, :2])
    win = win.cpu()
    size = (win[:, 2:] - win[:, :2]).tolist()  # (width, height) per mask
    order = sorted(range(n), key=lambda i: size[i][0] * size[i][1])
    crops: list[torch.Tensor | None] = [None] * n
    start = 0
    while start < n:
        # Grow the batch while padding to its largest window costs at most twice the real samples.
        stop, mw, mh, area = start, 0, 0, 0
        while stop < n:
            cw, ch = size[order[stop]]
            nw, nh, cost = max(mw, cw), max(mh, ch), (stop - start + 1)
            if stop > start and (cost * nw * nh > 2 * (area + cw * ch) + 4096 or cost * nw * nh > _PASTE_SAMPLES):
                break
            mw, mh, area, stop = nw, nh, area + cw * ch, stop + 1
        idx = order[start:stop]
        start = stop
        if mw == 0 or mh == 0:
            for i in idx:
                crops[i] = torch.zeros(size[i][1], size[i][0], dtype=torch.bool, device="cpu" if to_cpu else dev)
            continue
        sel = torch.tensor(idx, device=dev)
        wsel = win[idx].to(dev)
        ys = (wsel[:, 1:2] + torch.arange(mh, device=dev)).to(torch.float32) + 0.5  # (b, mh)
        xs = (wsel[:, 0:1] + torch.arange(mw, device=dev)).to(torch.float32) + 0.5  # (b, mw)
        bx0, by0, bx1, by1 = boxes[sel].split(1, dim=1)
        gy = (ys - by0) / (by1 - by0) * 2 - 1
        gx = (xs - bx0) / (bx1 - bx0) * 2 - 1
        b = len(idx)
        grid = torch.stack([gx[:, None, :].expand(b, mh, mw), gy[:, :, None].expand(b, mh, mw)], dim=3)
        on = F.grid_sample(probs[sel][:, None], grid, align_corners=False)[:, 0] >= threshold
        if to_cpu:
            on = on.cpu()
        for j, i in enumerate(idx):
            crops[i] = on[j, : size[i][1], : size[i][0]]
    return win, crops


def paste_masks(
    probs: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int], threshold: float = 0.5
) -> torch.Tensor:
    """Masks (N, M, M) of probabilities pasted into an image of ``image_hw`` at float boxes (N, 4).

    Pixel (x, y) takes the bilinear sample at its centre ``(x + 0.5, y + 0.5)`` relative to the
    box (zero outside the mask), and is on when that sample is ``>= threshold``. Returns bool
    (N, H, W) on ``probs``' device. Each mask is sampled only in its box grown by one pixel (in
    batches of similar size, on ``probs``' device): a sample whose centre lies outside the box
    takes less than half of the edge value, so it is below 0.5 and every other pixel is off.
    For evaluation, :func:`paste_masks_rle` gives the COCO encoding without the full masks.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    n = probs.shape[0]
    out = torch.zeros(n, h, w, dtype=torch.bool, device=probs.device)
    if n:
        win, crops = _paste_windows(probs, boxes, (h, w), threshold, to_cpu=False)
        for i, (x0, y0, x1, y1) in enumerate(win.tolist()):
            out[i, y0:y1, x0:x1] = crops[i]
    return out


def _rle_counts(crop: np.ndarray, x0: int, y0: int, h: int, w: int) -> np.ndarray:
    """COCO's uncompressed run lengths (column-major, starting with a run of zeros) of an (h, w)
    mask that is off outside the bool ``crop`` placed at (x0, y0)."""
    ch, cw = crop.shape
    if not crop.any():
        return np.array([h * w], dtype=np.int64)
    padded = np.zeros((ch + 2, cw), dtype=bool)  # an off pixel above and below every column
    padded[1:-1] = crop
    flat = padded.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # alternately first on and first off pixels
    col, row = np.divmod(change, ch + 2)
    edges = (x0 + col) * h + (y0 + row - 1)
    if ch == h:  # runs touching the bottom of one column and the top of the next are one run
        inner = edges[1:-1].reshape(-1, 2)  # (end of run k, start of run k + 1)
        joined = inner[:, 0] == inner[:, 1]
        if joined.any():
            keep = np.ones(len(edges), dtype=bool)
            keep[1:-1] = ~np.repeat(joined, 2)
            edges = edges[keep]
    counts = np.diff(np.concatenate([[0], edges, [h * w]]))
    return counts[:-1] if counts[-1] == 0 else counts  # no empty last run, as pycocotools encodes


def paste_masks_rle(
    probs: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int], threshold: float = 0.5
) -> list[dict]:
    """The masks of :func:`paste_masks` as COCO compressed RLEs (``{"size": [H, W], "counts": str}``),
    encoded from each mask's window: no full-image mask is made, only the windows leave the device."""
    h, w = int(image_hw[0]), int(image_hw[1])
    if probs.shape[0] == 0:
        return []
    win, crops = _paste_windows(probs, boxes, (h, w), threshold, to_cpu=True)
    runs = [
        {"size": [h, w], "counts": _rle_counts(c.numpy(), x0, y0, h, w)}
        for c, (x0, y0, _, _) in zip(crops, win.tolist())
    ]
    return [{"size": [h, w], "counts": r["counts"].decode("ascii")} for r in mask_utils.frPyObjects(runs, h, w)]


__all__ = [
    "Segment",
    "clip_polygon",
    "crop_segment",
    "decode_rle",
    "flip_segment",
    "mask_targets",
    "paste_masks",
    "paste_masks_rle",
    "polygons_in_box",
    "polygons_to_mask",
    "resize_segment",
    "segment_box",
    "segments_to_masks",
]
