"""COCO 2017 instances for the Mask R-CNN: dataset, results conversion, COCOeval wrapper.

* ``CocoDetection`` reads ``instances_<split>.json`` with pycocotools, maps COCO's non-contiguous
  category ids to contiguous labels ``0..K-1`` in sorted id order (detectron2's mapping, so class
  ``c`` of a detectron2 COCO model is label ``c``), cleans malformed annotations once in
  ``__init__`` and returns ``(image, target)`` pairs.
* ``predictions_to_coco_results`` turns per-image predictions into COCO result dicts.
* ``evaluate_coco`` runs COCOeval for ``bbox`` and ``segm`` and returns AP numbers in percent.
* ``save_results_json`` writes results atomically.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Dataset

from mae_transfer.data.errors import DataError
from mae_transfer.data.folder import find_problems, load_rgb
from mae_transfer.data.index import PackedStrings, absent_files, cached_index, read_json, release_memory
from mae_transfer.detection.masks import decode_rle, paste_masks_rle
from mae_transfer.engine.evaluator import DatasetEvaluator
from mae_transfer.io import atomic_write_json

log = logging.getLogger(__name__)

SPLITS = ("train2017", "val2017")
"""Split names accepted by ``CocoDetection(root, split)``."""

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""The first six COCOeval ``stats`` entries, in order."""

# At most this many offending ids/files are named in one error message; the rest are counted.
_MAX_NAMED = 5


def _polygon_area(coords: Sequence[float]) -> float:
    """Shoelace area of one polygon given as a flat ``[x0, y0, x1, y1, ...]`` list."""
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _clean_segmentation(seg: Any, height: int, width: int) -> tuple[Any, str | None]:
    """Validate one annotation's segmentation.

    Returns ``(segmentation, None)`` with degenerate polygon parts removed, or ``(None, reason)``
    when nothing usable is left. Polygons need >= 3 points and a non-zero area; RLEs a non-zero area.
    """
    if isinstance(seg, list):
        kept = []
        for part in seg:
            if not isinstance(part, (list, tuple)) or len(part) < 6 or len(part) % 2:
                continue  # fewer than 3 points (or an odd coordinate count): not a polygon
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in part):
                continue
            if _polygon_area(part) <= 0.0:
                continue
            kept.append(list(part))
        if not kept:
            return None, "polygon with fewer than 3 points or zero area"
        return kept, None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        try:
            # frPyObjects turns an uncompressed (list counts) RLE into a compressed one.
            rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
            area = float(mask_utils.area(rle))
        except Exception as exc:  # pycocotools raises bare Exceptions / TypeErrors on bad RLEs
            return None, f"unreadable RLE ({exc})"
        if [int(v) for v in seg["size"]] != [height, width]:
            return None, f"RLE size {list(seg['size'])} differs from the image size {[height, width]}"
        if area <= 0.0:
            return None, "RLE with zero area"
        return seg, None
    return None, "segmentation is neither a polygon list nor an RLE"


def _segment(seg: Any, height: int, width: int) -> list[np.ndarray] | torch.Tensor:
    """A (cleaned) segmentation as the detector's segment: polygons as flat float64 arrays, an RLE
    decoded to a uint8 ``(height, width)`` bitmask."""
    if isinstance(seg, list):
        return [np.asarray(p, dtype=np.float64) for p in seg]
    rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
    return torch.from_numpy(decode_rle(rle).astype(np.uint8))


# Reason codes of the annotations the index drops (a Counter of them is what users see).
_REASONS = (
    "malformed bbox",
    "degenerate box",
    "polygon with fewer than 3 points or zero area",
    "unreadable RLE",
    "RLE size differs from the image size",
    "RLE with zero area",
    "segmentation is neither a polygon list nor an RLE",
)
_REASON_CODE = {r: i for i, r in enumerate(_REASONS)}


def _reason_code(why: str) -> int:
    """The code of a ``_clean_segmentation`` reason (RLE reasons grouped without their details)."""
    if why.startswith("unreadable RLE"):
        return _REASON_CODE["unreadable RLE"]
    if why.startswith("RLE size"):
        return _REASON_CODE["RLE size differs from the image size"]
    return _REASON_CODE[why]


def _numeric(rows: list) -> np.ndarray | None:
    """``rows`` as a float64 array when every entry is an int, float or bool (None otherwise)."""
    try:
        arr = np.array(rows)
    except (ValueError, TypeError):
        return None
    if arr.dtype.kind not in "biuf":
        return None
    return arr.astype(np.float64, copy=False)


def _valid_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _build_coco_index(path: Path, min_box_size: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse ``instances_<split>.json`` once into flat arrays (see :class:`CocoDetection`).

    Cleaning is vectorised over all annotations (boxes, polygon point counts, finiteness and
    shoelace areas) and decides exactly as the per-annotation rules: a box must be 4 finite numbers
    and at least ``min_box_size`` on each side after clipping; a polygon part needs >= 3 points,
    finite coordinates and a non-zero area (parts whose area is near zero are re-checked with the
    scalar rule); an RLE must decode, match the image size and cover a pixel.
    """
    dataset = _read_instances(path)
    cats = dataset["categories"]
    cat_names: dict[int, str] = {}
    for c in cats:
        cid = int(c["id"])
        cat_names[cid] = str(c.get("name", cid))
    cat_ids = sorted(cat_names)
    cat_index = {c: i for i, c in enumerate(cat_ids)}

    infos: dict[Any, dict] = {}
    for im in dataset["images"]:
        infos[im["id"]] = im  # a repeated id keeps its last entry, as pycocotools' index does
    img_ids = sorted(infos)
    img_pos = {iid: i for i, iid in enumerate(img_ids)}
    heights = np.array([int(infos[i]["height"]) for i in img_ids], dtype=np.int64)
    widths = np.array([int(infos[i]["width"]) for i in img_ids], dtype=np.int64)
    files = PackedStrings.pack(str(infos[i].get("file_name") or "") for i in img_ids)
    del infos

    # Pass 1 (Python, one light step an annotation): ids, raw boxes and segmentations.
    bad: list[tuple[Any, str]] = []
    ann_img, ann_id, ann_label, ann_crowd, ann_area, raw_boxes, segs = [], [], [], [], [], [], []
    for ann in dataset["annotations"]:
        cid = ann.get("category_id")
        if cid not in cat_index:
            bad.append((ann.get("id"), f"unknown category id {cid}"))
            continue
        iid = ann.get("image_id")
        if iid not in img_pos:
            bad.append((ann.get("id"), f"unknown image id {iid}"))
            continue
        ann_img.append(img_pos[iid])
        aid = ann.get("id")
        ann_id.append(int(aid) if isinstance(aid, (int, float)) else -1)
        ann_label.append(cat_index[cid])
        ann_crowd.append(1 if ann.get("iscrowd", 0) else 0)
        area = ann.get("area")  # absent: the clipped box's area, filled in below
        ann_area.append(math.nan if area is None else float(area))
        raw_boxes.append(ann.get("bbox"))
        segs.append(ann.get("segmentation"))
    del dataset
    n = len(ann_img)
    ann_img_a = np.array(ann_img, dtype=np.int64)
    reason = np.full(n, -1, dtype=np.int8)

    # Boxes: 4 finite numbers, clipped to the image, at least min_box_size wide and high.
    shaped = [b if isinstance(b, (list, tuple)) and len(b) == 4 else [math.nan] * 4 for b in raw_boxes]
    boxes = _numeric(shaped)
    if boxes is None:  # some entry is not a number: check those rows one by one
        boxes = np.array(
            [[float(v) for v in b] if all(_valid_number(v) for v in b) else [math.nan] * 4 for b in shaped],
            dtype=np.float64,
        )
    boxes = boxes.reshape(n, 4)
    reason[~np.isfinite(boxes).all(axis=1)] = _REASON_CODE["malformed bbox"]
    h = heights[ann_img_a].astype(np.float64)
    w = widths[ann_img_a].astype(np.float64)
    with np.errstate(invalid="ignore"):
        x1 = np.maximum(0.0, boxes[:, 0])
        y1 = np.maximum(0.0, boxes[:, 1])
        x2 = np.minimum(w, boxes[:, 0] + boxes[:, 2])
        y2 = np.minimum(h, boxes[:, 1] + boxes[:, 3])
        degenerate = (x2 - x1 < min_box_size) | (y2 - y1 < min_box_size)
    reason[(reason < 0) & degenerate] = _REASON_CODE["degenerate box"]
    clipped = np.stack([x1, y1, x2, y2], axis=1)

    # Segmentations: polygon parts gathered into one coordinate array; RLEs checked one by one.
    kind = np.zeros(n, dtype=np.uint8)  # 0 polygon, 1 RLE
    rles = [""] * n
    coords: list = []
    part_len: list[int] = []
    part_ann: list[int] = []
    for k in np.flatnonzero(reason < 0).tolist():
        seg = segs[k]
        if isinstance(seg, list):
            for part in seg:
                if isinstance(part, (list, tuple)) and len(part) >= 6 and not len(part) % 2:
                    coords.extend(part)
                    part_len.append(len(part))
                    part_ann.append(k)
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            kind[k] = 1
            hh, ww = int(heights[ann_img[k]]), int(widths[ann_img[k]])
            kept, why = _clean_segmentation(seg, hh, ww)
            if kept is None:
                reason[k] = _reason_code(why)
            else:
                rles[k] = json.dumps(kept)
        else:
            reason[k] = _REASON_CODE["segmentation is neither a polygon list nor an RLE"]
    del segs, raw_boxes
    part_len_a = np.array(part_len, dtype=np.int64)
    part_ann_a = np.array(part_ann, dtype=np.int64)
    starts = np.zeros(len(part_len) + 1, dtype=np.int64)
    np.cumsum(part_len_a, out=starts[1:])
    flat = _numeric(coords) if coords else np.zeros(0, np.float64)
    if flat is None:  # a coordinate that is not a number: decide those parts with the scalar rule
        flat = np.array([float(v) if _valid_number(v) else math.nan for v in coords], dtype=np.float64)
    del coords
    num_parts = len(part_len)
    part_ok = np.zeros(num_parts, dtype=bool)
    if num_parts:
        finite = np.isfinite(flat)
        part_ok = np.logical_and.reduceat(finite, starts[:-1])
        # Shoelace area of every part at once: each point times the next point of its own part.
        x, y = flat[0::2], flat[1::2]
        pstart = starts[:-1] // 2
        plen = part_len_a // 2
        nxt = np.arange(len(x)) + 1
        nxt[pstart + plen - 1] = pstart
        with np.errstate(invalid="ignore", over="ignore"):
            cross = x * y[nxt] - y * x[nxt]
            area = 0.5 * np.abs(np.add.reduceat(cross, pstart))
        # Near-zero areas are decided by the scalar rule (its summation order can differ by ulps).
        area_ok = area > 1e-6
        for p in np.flatnonzero(part_ok & ~area_ok).tolist():
            area_ok[p] = _polygon_area(flat[starts[p] : starts[p + 1]]) > 0.0
        part_ok &= area_ok
    # A polygon annotation with no usable part is dropped.
    kept_parts = np.bincount(part_ann_a[part_ok], minlength=n) if num_parts else np.zeros(n, np.int64)
    poly_bad = (reason < 0) & (kind == 0) & (kept_parts == 0)
    reason[poly_bad] = _REASON_CODE["polygon with fewer than 3 points or zero area"]

    keep = reason < 0
    # Annotations ordered by image, file order within an image (pycocotools' imgToAnns order).
    order = np.flatnonzero(keep)
    order = order[np.argsort(ann_img_a[order], kind="stable")]
    new_pos = np.full(n, -1, dtype=np.int64)
    new_pos[order] = np.arange(len(order))
    ann_start = np.zeros(len(img_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(ann_img_a[order], minlength=len(img_ids)), out=ann_start[1:])

    # Polygon parts of the kept annotations, in the new annotation order.
    use_part = part_ok & keep[part_ann_a] if num_parts else part_ok
    sel = np.flatnonzero(use_part)
    sel = sel[np.argsort(new_pos[part_ann_a[sel]], kind="stable")]
    sel_len = part_len_a[sel]
    point_idx = (
        (
            np.repeat(starts[sel] - np.concatenate([[0], np.cumsum(sel_len)[:-1]]), sel_len)
            + np.arange(int(sel_len.sum()))
        )
        if len(sel)
        else np.zeros(0, np.int64)
    )
    poly_coords = flat[point_idx] if len(sel) else np.zeros(0, np.float64)
    poly_starts = np.zeros(len(sel) + 1, dtype=np.int64)
    np.cumsum(sel_len, out=poly_starts[1:])
    ann_part_start = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(np.bincount(new_pos[part_ann_a[sel]], minlength=len(order)), out=ann_part_start[1:])

    areas = np.array(ann_area, dtype=np.float64)[order]
    box_kept = clipped[order]
    missing_area = np.isnan(areas)
    areas[missing_area] = ((box_kept[:, 2] - box_kept[:, 0]) * (box_kept[:, 3] - box_kept[:, 1]))[missing_area]

    dropped = np.flatnonzero(~keep)
    arrays = {
        "cat_ids": np.array(cat_ids, dtype=np.int64),
        **PackedStrings.pack(cat_names[c] for c in cat_ids).arrays("cat_names"),
        "img_ids": np.array(img_ids, dtype=np.int64),
        "img_h": heights,
        "img_w": widths,
        **files.arrays("img_file"),
        "ann_start": ann_start,
        "ann_id": np.array(ann_id, dtype=np.int64)[order],
        "ann_box": box_kept,
        "ann_label": np.array(ann_label, dtype=np.int64)[order],
        "ann_crowd": np.array(ann_crowd, dtype=np.uint8)[order],
        "ann_area": areas,
        "ann_kind": kind[order],
        "ann_part_start": ann_part_start,
        "part_start": poly_starts,
        "coords": poly_coords,
        **PackedStrings.pack(rles[i] for i in order.tolist()).arrays("rle"),
        "skip_img": ann_img_a[dropped],
        "skip_code": reason[dropped].astype(np.int64),
    }
    meta = {
        "bad": [[i, why] for i, why in bad[:_MAX_NAMED]],
        "bad_count": len(bad),
        "bad_kinds": dict(Counter(why.split(" id ")[0] + " id" for _, why in bad)),
    }
    return arrays, meta


def _read_instances(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        dataset = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(dataset, dict):
        raise DataError(
            f"{path}: not a COCO instances file (the top level is a JSON {type(dataset).__name__}, not an object "
            "with images, annotations and categories)"
        )
    missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
    if missing:
        raise DataError(f"{path}: not a COCO instances file (missing keys: {', '.join(missing)})")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset[key], list) or not all(isinstance(e, dict) for e in dataset[key]):
            raise DataError(f"{path}: '{key}' must be a list of objects")
    try:
        for im in dataset["images"]:
            int(im["height"]), int(im["width"]), im["id"]
        for c in dataset["categories"]:
            int(c["id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: an image or category entry lacks a usable id/height/width ({exc!r})") from None
    return dataset


class CocoDetection(Dataset):
    """COCO instances as ``(image, target)`` pairs for the Mask R-CNN.

    Args:
        root: the COCO folder holding ``train2017/``, ``val2017/`` and ``annotations/``.
        split: ``"train2017"``, ``"val2017"`` or any ``<split>`` with ``<root>/<split>/`` and
            ``<root>/annotations/instances_<split>.json``; ignored when both ``images_dir`` and
            ``annotation_file`` are given.
        images_dir, annotation_file: explicit locations (override ``root``/``split``).
        transforms: ``callable(image, target) -> (image, target)``, applied to the float image
            tensor and the target dict (joint so flips move boxes and masks too).
        keep_empty: keep images without any usable non-crowd annotation (True for evaluation,
            where COCOeval needs every image; False for training, where they carry no signal).
        min_box_size: boxes narrower or lower than this (pixels, after clipping to the image)
            are dropped.
        skip_bad: count and skip annotations with unknown category ids, images whose file is
            missing and images that cannot be decoded or whose size differs from the annotation
            (with a warning) instead of raising ``DataError`` (the command line's ``--skip-bad``).
        check_files: look for image files that the annotations list but the folder lacks (one
            directory listing, no ``stat`` per image); False trusts the annotation file.
        unreadable: with ``skip_bad``, what an item whose image turns out unreadable when it is
            read becomes: ``"replace"`` (training): the next readable image (cyclically, the same
            for any process) with its own target; ``"drop"`` (evaluation): a black image of the
            annotated size whose target has ``unreadable = True``, which :class:`COCOEvaluator`
            leaves out of the evaluation. Either way the file is counted once
            (``num_unreadable_images``, shared by the DataLoader workers) and warned about once.
            Nothing is decoded in ``__init__``; :meth:`find_unreadable` and :meth:`leave_out` check
            a split up front.

    Memory: the annotations are parsed once into flat arrays (:mod:`mae_transfer.data.index`:
    boxes, labels, polygon coordinates, RLE strings, file names), cached on disk beside other
    indexes and memory-mapped, so every rank and DataLoader worker of a node shares one copy and a
    worker's private memory does not grow as it reads samples. The pycocotools ``COCO`` object (the
    ground truth of the evaluation) is made only when ``coco`` is first read.

    Item: ``image`` uint8 RGB ``(3, H, W)`` and ``target`` with ``boxes`` float32 ``(N, 4)`` xyxy
    in pixels, ``labels`` int64 ``(N,)`` in ``0..K-1``, ``segments`` (N polygons lists of flat
    float64 arrays, or uint8 ``(H, W)`` bitmasks for RLE annotations; see
    :func:`mae_transfer.detection.masks.segments_to_masks`), ``image_id`` int64 scalar,
    ``iscrowd`` int64 ``(N,)``, ``area`` float32 ``(N,)`` (COCO's annotated area) and
    ``orig_size`` int64 ``(2,)`` = ``(H, W)``. Crowd annotations are kept with ``iscrowd = 1``;
    use ``drop_crowd`` for training.

    Attributes: ``cat_ids`` (sorted COCO ids, label ``i`` is ``cat_ids[i]``),
    ``label_to_cat_id``, ``cat_id_to_label``, ``class_names`` (index = label),
    ``coco`` (the pycocotools COCO object, the ground truth for ``evaluate_coco``; built on first
    use), ``image_ids``, ``num_skipped_annotations``, ``skipped_reasons`` (Counter),
    ``num_missing_images``, ``num_unreadable_images`` and ``unreadable_files`` (so far, in any
    process), ``index_info`` (how the index was obtained, and how long it took).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "val2017",
        *,
        images_dir: str | os.PathLike | None = None,
        annotation_file: str | os.PathLike | None = None,
        transforms: Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]] | None = None,
        keep_empty: bool = True,
        min_box_size: float = 1.0,
        skip_bad: bool = False,
        check_files: bool = True,
        unreadable: str = "replace",
    ):
        if unreadable not in ("replace", "drop"):
            raise ValueError(f"unreadable must be 'replace' or 'drop' (got {unreadable!r})")
        if images_dir is None or annotation_file is None:
            if root is None:
                raise ValueError("give root (with split) or both images_dir and annotation_file")
            if not split or "/" in split:
                raise ValueError(f"split must be a folder name such as {' or '.join(SPLITS)}, got {split!r}")
            images_dir = images_dir if images_dir is not None else Path(root) / split
            if annotation_file is None:
                annotation_file = Path(root) / "annotations" / f"instances_{split}.json"
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        self.keep_empty = keep_empty
        self.min_box_size = float(min_box_size)
        self.skip_bad = skip_bad
        self.unreadable = unreadable
        self._coco: COCO | None = None

        if not self.annotation_file.is_file():
            raise DataError(f"{self.annotation_file}: annotation file not found")
        arrays, meta, self.index_info = cached_index(
            "coco",
            [self.annotation_file],
            {"min_box_size": self.min_box_size},
            lambda: _build_coco_index(self.annotation_file, self.min_box_size),
        )
        if self.index_info.source != "cache":
            release_memory()
        log.debug("%s: index %s", self.annotation_file, self.index_info.describe())
        self._a = arrays
        if not self.images_dir.is_dir():
            raise DataError(f"{self.images_dir}: image folder not found (expected next to {self.annotation_file})")

        self.cat_ids: list[int] = [int(c) for c in arrays["cat_ids"]]
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id: dict[int, int] = {i: c for i, c in enumerate(self.cat_ids)}
        self.class_names: list[str] = list(PackedStrings.from_arrays(arrays, "cat_names"))
        self._files = PackedStrings.from_arrays(arrays, "img_file")
        self._rles = PackedStrings.from_arrays(arrays, "rle")

        self.skipped_reasons: Counter = Counter()
        self.num_skipped_annotations = 0
        self.num_missing_images = 0
        self._check_categories(meta)
        self._positions = self._index_images(check_files)
        self._image_ids: list[int] | None = None
        # One flag an image, in shared memory: the DataLoader workers (forked or spawned) mark the
        # files they cannot read, so the main process counts each once (see data.folder).
        self._unreadable = torch.zeros(len(arrays["img_ids"]), dtype=torch.uint8).share_memory_()

    # ------------------------------------------------------------------------------- loading

    @property
    def coco(self) -> COCO:
        """The pycocotools ground truth (parsed from the annotation file on first use)."""
        if self._coco is None:
            self._coco = self._load_coco(self.annotation_file)
        return self._coco

    @staticmethod
    def _load_coco(path: Path) -> COCO:
        coco = COCO()
        coco.dataset = _read_instances(path)
        # pycocotools prints progress to stdout; library code stays quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def _skip(self, reason: str, count: int = 1) -> None:
        self.skipped_reasons[reason] += count
        self.num_skipped_annotations += count

    def _check_categories(self, meta: dict) -> None:
        """Raise one DataError for annotations with unknown category or image ids (or skip them)."""
        count = int(meta["bad_count"])
        if not count:
            return
        if not self.skip_bad:
            named = "; ".join(f"annotation id {i}: {why}" for i, why in meta["bad"])
            more = f" (and {count - _MAX_NAMED} more)" if count > _MAX_NAMED else ""
            raise DataError(
                f"{self.annotation_file}: {count} annotation(s) refer to categories or images the file "
                f"does not define: {named}{more}. Fix the file, or pass --skip-bad (data.skip_bad=true) to skip them."
            )
        for why, n in meta["bad_kinds"].items():
            self._skip(why, int(n))
        log.warning("%s: skipped %d annotation(s) with unknown category/image ids", self.annotation_file, count)

    def _index_images(self, check_files: bool) -> np.ndarray:
        """Find missing image files, count the dropped annotations, and return the positions (into
        the index's image arrays) of the images to serve."""
        a = self._a
        num_images = len(a["img_ids"])
        present = np.ones(num_images, dtype=bool)
        if check_files:
            absent = absent_files(self._files.decode_all(), root=self.images_dir)
            present[absent] = False
        if not present.all():
            missing = np.flatnonzero(~present)
            self.num_missing_images = len(missing)
            paths = [self.images_dir / self._files[int(i)] for i in missing[:_MAX_NAMED]]
            named = ", ".join(str(p) for p in paths)
            more = f" (and {len(missing) - _MAX_NAMED} more)" if len(missing) > _MAX_NAMED else ""
            if not self.skip_bad:
                raise DataError(
                    f"{self.annotation_file}: {len(missing)} image file(s) listed in the annotations are missing "
                    f"from {self.images_dir}: {named}{more}. "
                    "Restore them, or pass --skip-bad (data.skip_bad=true) to skip them."
                )
            log.warning("%s: skipped %d missing image file(s): %s%s", self.annotation_file, len(missing), named, more)
        # Malformed annotations of images that are served (those of missing images are not looked at).
        skip_img, skip_code = a["skip_img"], a["skip_code"]
        counted = skip_code[present[skip_img]] if len(skip_img) else skip_code
        for code, count in zip(*np.unique(counted, return_counts=True)):
            self._skip(_REASONS[int(code)], int(count))
        if len(counted):
            log.warning(
                "%s: dropped %d malformed annotation(s): %s",
                self.annotation_file,
                self.num_skipped_annotations,
                dict(self.skipped_reasons),
            )
        serve = present
        if not self.keep_empty:
            # Nothing to learn from an image where no (non-crowd) object survives.
            noncrowd = np.concatenate([[0], np.cumsum(np.asarray(a["ann_crowd"]) == 0)])
            start = np.asarray(a["ann_start"])
            serve = serve & (noncrowd[start[1:]] - noncrowd[start[:-1]] > 0)
        positions = np.flatnonzero(serve)
        if not len(positions):
            raise DataError(f"{self.annotation_file}: no usable images in {self.images_dir}")
        return positions

    # ------------------------------------------------------------------------------- access

    @property
    def image_ids(self) -> list[int]:
        """COCO ids of the served images, in serving order (sorted ids)."""
        if self._image_ids is None:
            self._image_ids = [int(i) for i in np.asarray(self._a["img_ids"])[self._positions]]
        return self._image_ids

    def __len__(self) -> int:
        return len(self._positions)

    def _position(self, index: int) -> int:
        return int(self._positions[range(len(self._positions))[index]])

    def image_path(self, index: int) -> Path:
        """File of the ``index``-th served image."""
        return self.images_dir / self._files[self._position(index)]

    def annotation_ids(self, index: int) -> list[int]:
        """COCO ids of the annotations served with the ``index``-th image (after cleaning)."""
        a, pos = self._a, self._position(index)
        return [int(v) for v in a["ann_id"][a["ann_start"][pos] : a["ann_start"][pos + 1]]]

    def load_target(self, index: int) -> dict[str, Any]:
        """The ``index``-th image's target (as in ``__getitem__``, before transforms) and its file."""
        a = self._a
        pos = self._position(index)
        height, width = int(a["img_h"][pos]), int(a["img_w"][pos])
        lo, hi = int(a["ann_start"][pos]), int(a["ann_start"][pos + 1])
        kinds = a["ann_kind"][lo:hi]
        segments: list = []
        for k in range(lo, hi):
            if kinds[k - lo]:
                segments.append(_segment(json.loads(self._rles[k]), height, width))
            else:
                p0, p1 = int(a["ann_part_start"][k]), int(a["ann_part_start"][k + 1])
                bounds = a["part_start"][p0 : p1 + 1]
                segments.append(
                    [np.array(a["coords"][bounds[j] : bounds[j + 1]], dtype=np.float64) for j in range(p1 - p0)]
                )
        n = hi - lo
        return {
            "boxes": torch.from_numpy(np.array(a["ann_box"][lo:hi], dtype=np.float32)).reshape(n, 4),
            "labels": torch.from_numpy(np.array(a["ann_label"][lo:hi], dtype=np.int64)),
            "segments": segments,
            "image_id": torch.tensor(int(a["img_ids"][pos]), dtype=torch.int64),
            "iscrowd": torch.from_numpy(np.array(a["ann_crowd"][lo:hi], dtype=np.int64)),
            "area": torch.from_numpy(np.array(a["ann_area"][lo:hi], dtype=np.float32)),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }

    # ------------------------------------------------------------------------------- unreadable images

    @property
    def num_unreadable_images(self) -> int:
        """How many distinct image files were found unreadable so far (up front or when read), in any process."""
        return int(self._unreadable.sum())

    num_corrupt = num_unreadable_images  # the name the training loop's epoch summary reads

    @property
    def unreadable_files(self) -> list[Path]:
        """The image files found unreadable so far, in any process."""
        return [self.images_dir / self._files[int(j)] for j in torch.nonzero(self._unreadable).flatten().tolist()]

    def _size_problem(self, pos: int, size: tuple[int, int]) -> str | None:
        # Boxes and masks are in the annotated frame; a different size would misplace them.
        width, height = int(self._a["img_w"][pos]), int(self._a["img_h"][pos])
        if tuple(size) != (width, height):
            return f"image is {size[0]}x{size[1]} but {self.annotation_file} says {width}x{height}"
        return None

    def _bad_image_error(self, problems: list[tuple[Path, str]], count: int) -> DataError:
        named = "; ".join(f"{path}: {why}" for path, why in problems[:_MAX_NAMED])
        more = f" (and {count - _MAX_NAMED} more)" if count > _MAX_NAMED else ""
        return DataError(
            f"{named}{more}. Replace the file{'s' if count > 1 else ''}, "
            "or pass --skip-bad (data.skip_bad=true) to leave unreadable images out; "
            f"`mae-transfer check-data --task coco --data {self.images_dir.parent} --full` lists every bad file"
        )

    def _mark_unreadable(self, pos: int, path: Path, why: str) -> None:
        if not self._unreadable[pos]:
            self._unreadable[pos] = 1
            log.warning("%s: %s; skipped (--skip-bad)", path, why)

    def find_unreadable(self, rank: int = 0, world_size: int = 1, threads: int = 1) -> list[tuple[int, str]]:
        """``[(position, problem), ...]`` of the served images ``rank::world_size`` that cannot be
        decoded (:func:`~mae_transfer.data.folder.decode_check`: every byte read, JPEGs at 1/8
        scale) or whose size differs from the annotation; nothing is changed (see :meth:`leave_out`).
        ``position`` indexes the index's image arrays. About 3 ms an image and thread."""
        from mae_transfer.data.folder import decode_check

        def check(pos: int) -> str | None:
            try:
                size = decode_check(self.images_dir / self._files[pos])
            except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable file"
                return f"cannot decode image ({type(exc).__name__}: {exc})"
            return self._size_problem(pos, size)

        positions = [int(p) for p in self._positions[rank::world_size]]
        return find_problems(check, positions, threads)

    def leave_out(self, problems: Sequence[tuple[int, str]]) -> None:
        """Act on :meth:`find_unreadable`'s ``problems``: one :class:`DataError` naming them, or with
        ``skip_bad`` stop serving those images (and evaluating them), counted and warned about."""
        if not problems:
            return
        named = [(self.images_dir / self._files[int(pos)], why) for pos, why in problems]
        if not self.skip_bad:
            raise self._bad_image_error(named, len(problems))
        for (pos, why), (path, _) in zip(problems, named):
            self._mark_unreadable(int(pos), path, why)
        self._positions = self._positions[~np.isin(self._positions, [int(pos) for pos, _ in problems])]
        self._image_ids = None
        if not len(self._positions):
            raise DataError(f"{self.annotation_file}: no usable images in {self.images_dir}")
        log.warning(
            "%s: left out %d unreadable image(s) of %s (--skip-bad)",
            self.annotation_file,
            len(problems),
            self.images_dir,
        )

    def _load_image(self, index: int) -> tuple[Any, int]:
        """The RGB image of item ``index``, or with ``skip_bad`` of the item that replaces it
        (``unreadable="replace"``) or None (``"drop"``); and the index of the item read."""
        n = len(self._positions)
        for step in range(n if self.skip_bad and self.unreadable == "replace" else 1):
            i = (index + step) % n
            pos = self._position(i)
            path = self.images_dir / self._files[pos]
            if not self._unreadable[pos]:
                try:
                    pil = load_rgb(path)
                    why = self._size_problem(pos, pil.size)
                except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable file"
                    why = f"cannot decode image ({type(exc).__name__}: {exc})"
                if why is None:
                    return pil, i
                if not self.skip_bad:
                    raise self._bad_image_error([(path, why)], 1) from None
                self._mark_unreadable(pos, path, why)
            if self.unreadable == "drop":
                return None, i
        raise DataError(f"none of the {n} images of {self.images_dir} can be read; re-copy the dataset")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = range(len(self._positions))[index]
        pil, index = self._load_image(index)
        target = self.load_target(index)
        if pil is None:  # unreadable="drop": a placeholder the evaluator leaves out
            height, width = (int(v) for v in target["orig_size"])
            image = torch.zeros(3, height, width, dtype=torch.uint8)
            target["unreadable"] = True
        else:
            image = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def drop_crowd(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``target`` without its ``iscrowd = 1`` instances.

    COCO practice: crowd regions are not trained on (they are ignored regions, handled by COCOeval
    at evaluation). Per-instance entries (first dim ``N``: boxes, labels, segments, masks, iscrowd,
    area) are filtered; other entries are passed through.
    """
    keep = target["iscrowd"] == 0
    n = int(keep.numel())
    idx = torch.nonzero(keep, as_tuple=True)[0].tolist()
    out = {}
    for key, value in target.items():
        if isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in idx]
        elif key in ("image_id", "orig_size") or not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != n:
            out[key] = value
        else:
            out[key] = value[keep]
    return out


# ----------------------------------------------------------------------------------- results


def _to_numpy(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _float_copy(x: Any) -> np.ndarray:
    """``x`` as a new float32 array when it is float32, else as float64. The result dicts are
    computed in float64 from either: float64 holds every float32 exactly, so keeping float32 loses
    nothing and halves the memory of the detector's (float32) boxes and scores."""
    a = _to_numpy(x)
    return np.array(a, dtype=np.float32 if a.dtype == np.float32 else np.float64, copy=True)


def _cat_id(label_to_cat_id: Mapping[int, int] | Sequence[int], label: int) -> int:
    try:
        if label < 0:
            raise IndexError
        return int(label_to_cat_id[label])
    except (KeyError, IndexError):
        raise ValueError(f"predicted label {label} has no COCO category id") from None


def _cat_ids(labels: np.ndarray, label_to_cat_id: Mapping[int, int] | Sequence[int]) -> np.ndarray:
    """COCO category id of every label (int64), each distinct label looked up once."""
    known: dict[int, int] = {}
    out = []
    for label in labels.tolist():
        cat = known.get(label)
        if cat is None:
            cat = known[label] = _cat_id(label_to_cat_id, label)
        out.append(cat)
    return np.array(out, dtype=np.int64)


class CocoResults:
    """Detections in the COCO results format as flat arrays, one row per detection.

    What :class:`COCOEvaluator` keeps, gathers and merges instead of one Python dict per detection
    (a val2017 evaluation has 500k of them, about 1 KB each as dicts); :meth:`to_dicts` makes the
    dicts of :func:`predictions_to_coco_results` from it, value for value.

    Attributes:
        image_ids: int64 ``(N,)``.
        category_ids: int64 ``(N,)`` COCO category ids.
        boxes: ``(N, 4)`` xyxy pixels, float32 or float64 (as predicted).
        scores: ``(N,)``, float32 or float64 (as predicted).
        mask_sizes: int64 ``(N, 2)`` each mask's ``(H, W)``; None when no detection has a mask.
        counts: every mask's compressed RLE string (COCO's ``counts``), concatenated (ASCII bytes).
        counts_start, counts_end: int64 ``(N,)`` each mask's slice of ``counts`` (-1: no mask).
    """

    __slots__ = ("image_ids", "category_ids", "boxes", "scores", "mask_sizes", "counts", "counts_start", "counts_end")

    def __init__(
        self, image_ids, category_ids, boxes, scores, mask_sizes=None, counts=b"", counts_start=None, counts_end=None
    ):
        self.image_ids, self.category_ids, self.boxes, self.scores = image_ids, category_ids, boxes, scores
        self.mask_sizes, self.counts = mask_sizes, counts
        n = len(image_ids)
        self.counts_start = counts_start if counts_start is not None else np.full(n, -1, dtype=np.int64)
        self.counts_end = counts_end if counts_end is not None else np.full(n, -1, dtype=np.int64)

    @classmethod
    def empty(cls) -> "CocoResults":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32))

    @classmethod
    def from_prediction(
        cls, pred: Mapping[str, Any], label_to_cat_id: Mapping[int, int] | Sequence[int]
    ) -> "CocoResults":
        """One image's prediction (see :func:`predictions_to_coco_results` for the keys)."""
        image_id = int(_to_numpy(pred["image_id"]).reshape(-1)[0])
        boxes = _float_copy(pred["boxes"]).reshape(-1, 4)
        scores = _float_copy(pred["scores"]).reshape(-1)
        labels = _to_numpy(pred["labels"]).astype(np.int64).reshape(-1)
        n = len(boxes)
        if not (n == len(scores) == len(labels)):
            raise ValueError(f"image {image_id}: boxes, scores and labels differ in length")
        rles = None
        if pred.get("rles") is not None:
            rles = list(pred["rles"])
            if len(rles) != n:
                raise ValueError(f"image {image_id}: {len(rles)} masks for {n} boxes")
        elif pred.get("masks") is not None:
            masks = _to_numpy(pred["masks"])
            if masks.ndim == 4:
                masks = masks[:, 0]
            if masks.shape[0] != n:
                raise ValueError(f"image {image_id}: {masks.shape[0]} masks for {n} boxes")
            binary = masks.astype(np.uint8) if masks.dtype == bool else (masks > 0.5).astype(np.uint8)
            binary = np.asfortranarray(binary.transpose(1, 2, 0))
            rles = mask_utils.encode(binary) if n else []
        out = cls(np.full(n, image_id, dtype=np.int64), _cat_ids(labels, label_to_cat_id), boxes, scores)
        if rles:
            strings = [r["counts"] if isinstance(r["counts"], bytes) else r["counts"].encode("utf-8") for r in rles]
            ends = np.cumsum([len(s) for s in strings], dtype=np.int64)
            out.counts, out.counts_end = b"".join(strings), ends
            out.counts_start = ends - np.array([len(s) for s in strings], dtype=np.int64)
            out.mask_sizes = np.array([[int(v) for v in r["size"]] for r in rles], dtype=np.int64).reshape(n, 2)
        return out

    @classmethod
    def concat(cls, parts: Sequence["CocoResults"]) -> "CocoResults":
        """The rows of ``parts``, one after the other (one copy of every array)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        out = cls(
            np.concatenate([p.image_ids for p in parts]),
            np.concatenate([p.category_ids for p in parts]),
            np.concatenate([p.boxes for p in parts]),  # float32 only if every part is float32
            np.concatenate([p.scores for p in parts]),
        )
        if any(p.mask_sizes is not None for p in parts):
            out.mask_sizes = np.concatenate(
                [p.mask_sizes if p.mask_sizes is not None else np.zeros((len(p), 2), np.int64) for p in parts]
            )
            shift, starts, ends = 0, [], []
            for p in parts:
                has = p.counts_start >= 0
                starts.append(np.where(has, p.counts_start + shift, -1))
                ends.append(np.where(has, p.counts_end + shift, -1))
                shift += len(p.counts)
            out.counts_start, out.counts_end = np.concatenate(starts), np.concatenate(ends)
            out.counts = b"".join(p.counts for p in parts)
        return out

    def take(self, index: np.ndarray) -> "CocoResults":
        """The rows ``index`` (the RLE strings are shared, only their slices are reordered)."""
        return CocoResults(
            self.image_ids[index],
            self.category_ids[index],
            self.boxes[index],
            self.scores[index],
            None if self.mask_sizes is None else self.mask_sizes[index],
            self.counts,
            self.counts_start[index],
            self.counts_end[index],
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def to_dicts(
        self, start: int = 0, stop: int | None = None, share_sizes: bool = False, with_bbox: bool = True
    ) -> list[dict[str, Any]]:
        """Rows ``start:stop`` as COCO result dicts: ``image_id``, ``category_id``, ``bbox``
        ``[x, y, w, h]`` (float64 arithmetic; left out without ``with_bbox``), ``score`` and, with a
        mask, ``segmentation`` (``{"size": [H, W], "counts": str}``). ``share_sizes``: detections
        with the same mask size share one ``size`` list (for read-only uses such as COCOeval)."""
        rows = slice(start, stop)
        ids, cats = self.image_ids[rows].tolist(), self.category_ids[rows].tolist()
        scores = self.scores[rows].astype(np.float64).tolist()
        if with_bbox:
            boxes = self.boxes[rows].astype(np.float64)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
            out = [
                {"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in zip(ids, cats, xywh, scores)
            ]
        else:
            out = [{"image_id": i, "category_id": c, "score": s} for i, c, s in zip(ids, cats, scores)]
        if self.mask_sizes is not None:
            counts, sizes = self.counts, {}
            for res, a, e, (h, w) in zip(
                out, self.counts_start[rows].tolist(), self.counts_end[rows].tolist(), self.mask_sizes[rows].tolist()
            ):
                if a >= 0:
                    size = sizes.setdefault((h, w), [h, w]) if share_sizes else [h, w]
                    res["segmentation"] = {"size": size, "counts": counts[a:e].decode("utf-8")}
        return out

    def iter_dicts(self, chunk: int = 8192):
        """The dicts of :meth:`to_dicts` one by one (a generator), made ``chunk`` rows at a time."""
        for start in range(0, len(self), chunk):
            yield from self.to_dicts(start, start + chunk)

    def __iter__(self):
        return self.iter_dicts()


def predictions_to_coco_results(
    predictions: list[dict[str, Any]],
    label_to_cat_id: Mapping[int, int] | Sequence[int],
) -> list[dict[str, Any]]:
    """Per-image predictions to COCO results (JSON-serialisable).

    Args:
        predictions: one dict per image with ``image_id`` (int or scalar tensor), ``boxes``
            ``(N, 4)`` xyxy pixels, ``scores`` ``(N,)``, ``labels`` ``(N,)`` contiguous labels and
            optionally ``masks``: ``(N, H, W)`` bool (pasted at the image size), or float
            probabilities ``(N, 1, H, W)`` / ``(N, H, W)`` (on at ``> 0.5``); or ``rles``: the
            masks already encoded (COCO compressed RLE dicts, ``counts`` bytes or str).
        label_to_cat_id: contiguous label -> COCO category id (a dict such as
            ``CocoDetection.label_to_cat_id``, or a sequence indexed by label).

    Returns:
        One dict per instance: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` floats,
        ``score`` and, with masks, ``segmentation`` (compressed RLE with ``counts`` a str).
        :class:`CocoResults` holds the same results as arrays.
    """
    return [r for pred in predictions for r in CocoResults.from_prediction(pred, label_to_cat_id).to_dicts()]


EVAL_BACKENDS = ("auto", "pycocotools", "faster")
"""``eval_backend`` values: ``auto`` is faster-coco-eval when it can be imported, else pycocotools."""


def resolve_eval_backend(backend: str) -> str:
    """``"pycocotools"`` or ``"faster"``: ``backend`` itself, or for ``"auto"`` faster-coco-eval
    when it is installed (and imports), pycocotools otherwise."""
    if backend not in EVAL_BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}: {', '.join(EVAL_BACKENDS)}")
    if backend != "auto":
        return backend
    try:
        from faster_coco_eval import COCO as _FasterCOCO  # noqa: F401
        from faster_coco_eval import COCOeval_faster  # noqa: F401
    except (ImportError, OSError) as exc:
        log.debug("eval_backend=auto: faster-coco-eval not usable (%s), using pycocotools", exc)
        return "pycocotools"
    return "faster"


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Python's cyclic garbage collector off for the block. An evaluation makes millions of acyclic
    objects (the result dicts, COCOeval's per-image tables), which the collector would walk again
    and again for nothing: a fifth of faster-coco-eval's time at val2017 size. Cycles the block
    leaves behind are collected later as usual."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def evaluate_coco(
    coco_gt: COCO,
    results: Sequence[dict[str, Any]] | CocoResults,
    iou_types: Sequence[str] = ("bbox", "segm"),
    image_ids: Sequence[int] | None = None,
    backend: str = "pycocotools",
) -> dict[str, dict[str, float]]:
    """COCOeval AP numbers (percent) per IoU type: ``{"bbox": {"AP": .., "AP50": .., ...}, ...}``.

    Metrics are ``AP, AP50, AP75, APs, APm, APl`` from ``COCOeval.stats[:6]`` times 100; a metric
    COCOeval cannot define (no ground truth in that size range) is NaN. Empty ``results`` give 0.
    ``results``: COCO result dicts (left as they are) or a :class:`CocoResults`. ``image_ids``
    restricts the evaluation to those images (default: every image of ``coco_gt``). COCOeval's
    printing is captured and logged at DEBUG.

    ``backend="faster"`` runs faster-coco-eval's ``COCOeval_faster`` (``pip install
    faster-coco-eval``), a maintained drop-in of the same computation: ``tests/test_coco.py`` checks
    that the 12 numbers agree with pycocotools' to 1e-4; ``"auto"``: that one when installed.

    ``loadRes`` adds keys to the dicts it is given, so each IoU type gets dicts of its own, made
    when its pass starts, after the previous pass's are gone: copies of ``results``, or made from
    the arrays of a :class:`CocoResults` (the segm pass's without ``bbox``), so one set of dicts
    exists at a time (at val2017 size: 500k dicts, about 0.5 GB).
    """
    backend = resolve_eval_backend(backend)
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    compact = isinstance(results, CocoResults)
    if "segm" in iou_types:
        unmasked = (
            (len(results) and (results.mask_sizes is None or bool((results.counts_start < 0).any())))
            if compact
            else any("segmentation" not in d for d in results)
        )
        if unmasked:
            raise ValueError("segm evaluation needs a 'segmentation' in every result")
    make_eval = COCOeval
    if backend == "faster":
        coco_gt, make_eval = _faster_coco(coco_gt)
    out: dict[str, dict[str, float]] = {}
    dets: list[dict[str, Any]] | None = None
    for iou_type in iou_types:
        dets = None  # the previous pass's dicts go before this pass makes its own
        if not len(results):
            log.info("COCO %s: no detections, every AP is 0", iou_type)
            out[iou_type] = {name: 0.0 for name in METRIC_NAMES}
            continue
        captured = io.StringIO()
        with _cyclic_gc_paused(), contextlib.redirect_stdout(captured):
            # With a bbox present, loadRes sets each detection's area from the box, which would put
            # masks into the wrong small/medium/large range; without it, the mask area is used.
            if compact:
                dets = results.to_dicts(share_sizes=True, with_bbox=iou_type == "bbox")
            else:
                dets = [dict(d) for d in results]
                if iou_type == "segm":
                    for d in dets:
                        d.pop("bbox", None)
            try:
                coco_dt = coco_gt.loadRes(dets)
            except AssertionError as exc:
                raise ValueError(f"results do not match the ground truth: {exc}") from exc
            evaluator = make_eval(coco_gt, coco_dt, iouType=iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(int(i) for i in image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        summary = "\n".join(line for line in captured.getvalue().splitlines() if line.lstrip().startswith("Average"))
        log.debug("COCO %s evaluation:\n%s", iou_type, summary)
        out[iou_type] = {
            name: (float(v) * 100.0 if v >= 0 else float("nan")) for name, v in zip(METRIC_NAMES, evaluator.stats[:6])
        }
        del coco_dt, evaluator  # this pass's per-image tables go before the next pass builds its own
    return out


def _faster_coco(coco_gt: COCO) -> tuple[Any, Callable]:
    """The ground truth as faster-coco-eval's COCO object, and its evaluator class."""
    try:
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        from mae_transfer.config import ConfigError

        raise ConfigError(
            "eval_backend=faster needs faster-coco-eval: pip install faster-coco-eval "
            "(or pip install 'mae-transfer[faster]')"
        ) from None
    gt = FasterCOCO()
    gt.dataset = copy.deepcopy(coco_gt.dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, lambda g, d, iouType: COCOeval_faster(g, d, iouType=iouType, print_function=log.debug)


def _merge_order(results: CocoResults, image_order: Sequence[int]) -> np.ndarray:
    """The row order of ``sorted(rows, key=lambda r: (position of r's image in image_order, or -1,
    -r["score"]))``: Python's sort is stable, and so are both argsorts here, so ties keep their
    given order exactly as there."""
    order = {image_id: i for i, image_id in enumerate(image_order)}
    ids, inverse = np.unique(results.image_ids, return_inverse=True)
    position = np.array([order.get(i, -1) for i in ids.tolist()], dtype=np.int64)[inverse.reshape(-1)]
    by_score = np.argsort(-results.scores.astype(np.float64), kind="stable")
    return by_score[np.argsort(position[by_score], kind="stable")]


class COCOEvaluator(DatasetEvaluator):
    """Box and mask AP of a split with COCOeval. ``process`` turns each image's detections
    (``inputs``: the loader's ``(images, targets)``; ``outputs``: one dict of ``boxes``, ``scores``,
    ``labels``, ``mask_probs`` per image) into COCO results, kept as arrays (:class:`CocoResults`);
    the engine gathers every process's results on the main process; ``merge`` puts them in one
    order whatever the number of processes (by image, then score, as one process gives) and
    ``evaluate`` runs COCOeval once. ``results``: the merged results (after ``merge``).

    ``backend``: ``"pycocotools"``, ``"faster"`` or ``"auto"`` (:func:`resolve_eval_backend`);
    ``backend_name`` is the one used.

    Images whose target says ``unreadable`` (``CocoDetection(skip_bad=True, unreadable="drop")``)
    are left out of the evaluation: their detections are not kept and COCOeval does not count
    their ground truth; ``dropped_image_ids`` lists them (all processes' after ``merge``)."""

    def __init__(self, dataset: "CocoDetection", backend: str = "pycocotools"):
        self.dataset = dataset
        self.backend = backend
        self.backend_name = resolve_eval_backend(backend)
        self.reset()

    def reset(self) -> None:
        self._parts: list[CocoResults] = []
        self._merged: CocoResults | None = None
        self.dropped_image_ids: list[int] = []

    def process(self, inputs, outputs) -> None:
        """``outputs``: ``MaskRCNN.inference(paste=False)`` per image (``boxes`` in the original image
        frame, ``mask_probs`` 28 x 28); the masks are pasted and RLE-encoded here in one go (each in
        its box window, on the model's device; no full-image mask is made)."""
        _, targets = inputs
        for o, t in zip(outputs, targets):
            if t.get("unreadable"):
                self.dropped_image_ids.append(int(t["image_id"]))
                continue
            pred = {
                "image_id": t["image_id"],
                "boxes": o["boxes"].float().cpu(),
                "scores": o["scores"].float().cpu(),
                "labels": o["labels"].cpu(),
                "rles": paste_masks_rle(o["mask_probs"], o["boxes"], tuple(int(v) for v in t["orig_size"])),
            }
            self._parts.append(CocoResults.from_prediction(pred, self.dataset.label_to_cat_id))

    def state(self) -> CocoResults | tuple[CocoResults, list[int]]:
        """This process's results in processing order, as one set of arrays; with the ids of the
        images it left out, when there are any: ``(results, dropped_image_ids)``."""
        self._parts = [CocoResults.concat(self._parts)]
        return (self._parts[0], list(self.dropped_image_ids)) if self.dropped_image_ids else self._parts[0]

    def merge(self, states: list[CocoResults | tuple[CocoResults, list[int]]]) -> None:
        dropped = [i for s in states if isinstance(s, tuple) for i in s[1]]
        merged = CocoResults.concat([s[0] if isinstance(s, tuple) else s for s in states])
        self._merged = merged.take(_merge_order(merged, self.dataset.image_ids))
        self.dropped_image_ids = sorted(set(dropped))

    @property
    def results(self) -> CocoResults:
        """The merged results (before ``merge``: this process's, in processing order)."""
        return self._merged if self._merged is not None else CocoResults.concat(self._parts)

    def evaluate(self) -> dict[str, dict[str, float]]:
        image_ids = self.dataset.image_ids
        if self.dropped_image_ids:
            left_out = set(self.dropped_image_ids)
            image_ids = [i for i in image_ids if i not in left_out]
            log.warning(
                "COCO evaluation: %d unreadable image(s) left out (--skip-bad), %d evaluated",
                len(left_out),
                len(image_ids),
            )
        return evaluate_coco(self.dataset.coco, self.results, image_ids=image_ids, backend=self.backend_name)


def save_results_json(results: Sequence[dict[str, Any]] | CocoResults, path: str | os.PathLike) -> Path:
    """Write ``results`` (COCO results format: dicts, or :class:`CocoResults`) as JSON to ``path``
    atomically. A :class:`CocoResults` is written a chunk of dicts at a time, as the same bytes."""
    if not isinstance(results, CocoResults):
        return atomic_write_json(path, results, indent=None)
    from mae_transfer.io import atomic_write_json_list

    finite = bool(np.isfinite(results.boxes).all() and np.isfinite(results.scores).all())
    return atomic_write_json_list(path, results.iter_dicts(), all_finite=finite)
