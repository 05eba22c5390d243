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
from mae_transfer.data.folder import load_rgb
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
        skip_bad: count and skip annotations with unknown category ids and images whose file is
            missing (with a warning) instead of raising ``DataError``.

    Item: ``image`` uint8 RGB ``(3, H, W)`` and ``target`` with ``boxes`` float32 ``(N, 4)`` xyxy
    in pixels, ``labels`` int64 ``(N,)`` in ``0..K-1``, ``segments`` (N polygons lists of flat
    float64 arrays, or uint8 ``(H, W)`` bitmasks for RLE annotations; see
    :func:`mae_transfer.detection.masks.segments_to_masks`), ``image_id`` int64 scalar,
    ``iscrowd`` int64 ``(N,)``, ``area`` float32 ``(N,)`` (COCO's annotated area) and
    ``orig_size`` int64 ``(2,)`` = ``(H, W)``. Crowd annotations are kept with ``iscrowd = 1``;
    use ``drop_crowd`` for training.

    Attributes: ``cat_ids`` (sorted COCO ids, label ``i`` is ``cat_ids[i]``),
    ``label_to_cat_id``, ``cat_id_to_label``, ``class_names`` (index = label),
    ``coco`` (the pycocotools COCO object, the ground truth for
    ``evaluate_coco``), ``image_ids``, ``num_skipped_annotations``, ``skipped_reasons`` (Counter),
    ``num_missing_images``.
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
    ):
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

        self.coco = self._load_coco(self.annotation_file)
        if not self.images_dir.is_dir():
            raise DataError(f"{self.images_dir}: image folder not found (expected next to {self.annotation_file})")

        self.cat_ids: list[int] = sorted(int(c) for c in self.coco.cats)
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id: dict[int, int] = {i: c for i, c in enumerate(self.cat_ids)}
        self.class_names: list[str] = [str(self.coco.cats[c].get("name", c)) for c in self.cat_ids]

        self.skipped_reasons: Counter = Counter()
        self.num_skipped_annotations = 0
        self.num_missing_images = 0
        self._annotations: dict[int, list[dict]] = {}
        self._check_categories()
        self.image_ids: list[int] = self._index_images()

    # ------------------------------------------------------------------------------- loading

    @staticmethod
    def _load_coco(path: Path) -> COCO:
        if not path.is_file():
            raise DataError(f"{path}: annotation file not found")
        try:
            with open(path, "r", encoding="utf-8") as f:
                dataset = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a readable JSON file ({exc})") from exc
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(dataset, dict) or k not in dataset]
        if missing:
            raise DataError(f"{path}: not a COCO instances file (missing keys: {', '.join(missing)})")
        coco = COCO()
        coco.dataset = dataset
        # pycocotools prints progress to stdout; library code stays quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def _skip(self, reason: str, count: int = 1) -> None:
        self.skipped_reasons[reason] += count
        self.num_skipped_annotations += count

    def _check_categories(self) -> None:
        """Raise one DataError for annotations with unknown category or image ids (or skip them)."""
        known_imgs = set(self.coco.imgs)
        bad: list[tuple[int, str]] = []
        for ann in self.coco.dataset["annotations"]:
            if ann.get("category_id") not in self.cat_id_to_label:
                bad.append((ann.get("id"), f"unknown category id {ann.get('category_id')}"))
            elif ann.get("image_id") not in known_imgs:
                bad.append((ann.get("id"), f"unknown image id {ann.get('image_id')}"))
        if not bad:
            return
        if not self.skip_bad:
            named = "; ".join(f"annotation id {i}: {why}" for i, why in bad[:_MAX_NAMED])
            more = f" (and {len(bad) - _MAX_NAMED} more)" if len(bad) > _MAX_NAMED else ""
            raise DataError(
                f"{self.annotation_file}: {len(bad)} annotation(s) refer to categories or images the file "
                f"does not define: {named}{more}. Fix the file or pass skip_bad=True to skip them."
            )
        self._bad_ann_ids = {i for i, _ in bad}
        for _, why in bad:
            self._skip(why.split(" id ")[0] + " id")
        log.warning("%s: skipped %d annotation(s) with unknown category/image ids", self.annotation_file, len(bad))

    def _index_images(self) -> list[int]:
        """Check image files, clean every annotation once, and return the image ids to serve."""
        bad_ids = getattr(self, "_bad_ann_ids", set())
        missing: list[tuple[int, Path]] = []
        image_ids: list[int] = []
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            path = self.images_dir / str(info.get("file_name", ""))
            if not info.get("file_name") or not path.is_file():
                missing.append((image_id, path))
                continue
            height, width = int(info["height"]), int(info["width"])
            cleaned = []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if ann.get("id") in bad_ids:
                    continue
                kept = self._clean_annotation(ann, height, width)
                if kept is not None:
                    cleaned.append(kept)
            self._annotations[image_id] = cleaned
            if not self.keep_empty and not any(a["iscrowd"] == 0 for a in cleaned):
                continue  # nothing to learn from: no (non-crowd) object survives
            image_ids.append(image_id)
        if missing:
            self.num_missing_images = len(missing)
            named = ", ".join(str(p) for _, p in missing[:_MAX_NAMED])
            more = f" (and {len(missing) - _MAX_NAMED} more)" if len(missing) > _MAX_NAMED else ""
            if not self.skip_bad:
                raise DataError(
                    f"{self.annotation_file}: {len(missing)} image file(s) listed in the annotations are missing "
                    f"from {self.images_dir}: {named}{more}. Restore them or pass skip_bad=True to skip them."
                )
            log.warning("%s: skipped %d missing image file(s): %s%s", self.annotation_file, len(missing), named, more)
        if self.num_skipped_annotations:
            log.warning(
                "%s: dropped %d malformed annotation(s): %s",
                self.annotation_file,
                self.num_skipped_annotations,
                dict(self.skipped_reasons),
            )
        if not image_ids:
            raise DataError(f"{self.annotation_file}: no usable images in {self.images_dir}")
        return image_ids

    def _clean_annotation(self, ann: dict, height: int, width: int) -> dict | None:
        """Clip the box to the image and validate the segmentation; None (counted) if unusable."""
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        ):
            self._skip("malformed bbox")
            return None
        x, y, w, h = (float(v) for v in bbox)
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(width), x + w), min(float(height), y + h)
        if x2 - x1 < self.min_box_size or y2 - y1 < self.min_box_size:
            self._skip("degenerate box")
            return None
        seg, why = _clean_segmentation(ann.get("segmentation"), height, width)
        if seg is None:
            self._skip(why.split(" (")[0])
            return None
        return {
            "id": ann.get("id"),
            "box": [x1, y1, x2, y2],
            "label": self.cat_id_to_label[ann["category_id"]],
            "segmentation": seg,
            "iscrowd": int(bool(ann.get("iscrowd", 0))),
            "area": float(ann.get("area", (x2 - x1) * (y2 - y1))),
        }

    # ------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        """File of the ``index``-th served image."""
        return self.images_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        path = self.images_dir / info["file_name"]
        try:
            pil = load_rgb(path)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot decode image ({exc})") from exc
        if pil.size != (width, height):
            # Boxes and masks are in the annotated frame; a different size would misplace them.
            raise DataError(
                f"{path}: image is {pil.size[0]}x{pil.size[1]} but {self.annotation_file} says {width}x{height}"
            )
        image = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()

        anns = self._annotations[image_id]
        n = len(anns)
        target = {
            "boxes": torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(n, 4),
            "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
            "segments": [_segment(a["segmentation"], height, width) for a in anns],
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
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


def _cat_id(label_to_cat_id: Mapping[int, int] | Sequence[int], label: int) -> int:
    try:
        if label < 0:
            raise IndexError
        return int(label_to_cat_id[label])
    except (KeyError, IndexError):
        raise ValueError(f"predicted label {label} has no COCO category id") from None


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
    """
    results: list[dict[str, Any]] = []
    for pred in predictions:
        image_id = int(_to_numpy(pred["image_id"]).reshape(-1)[0])
        boxes = _to_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _to_numpy(pred["scores"]).astype(np.float64).reshape(-1)
        labels = _to_numpy(pred["labels"]).astype(np.int64).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {image_id}: boxes, scores and labels differ in length")
        rles = None
        if pred.get("rles") is not None:
            rles = list(pred["rles"])
            if len(rles) != len(boxes):
                raise ValueError(f"image {image_id}: {len(rles)} masks for {len(boxes)} boxes")
        elif pred.get("masks") is not None:
            masks = _to_numpy(pred["masks"])
            if masks.ndim == 4:
                masks = masks[:, 0]
            if masks.shape[0] != len(boxes):
                raise ValueError(f"image {image_id}: {masks.shape[0]} masks for {len(boxes)} boxes")
            binary = masks.astype(np.uint8) if masks.dtype == bool else (masks > 0.5).astype(np.uint8)
            binary = np.asfortranarray(binary.transpose(1, 2, 0))
            rles = mask_utils.encode(binary) if len(boxes) else []
        for k in range(len(boxes)):
            x1, y1, x2, y2 = boxes[k]
            res = {
                "image_id": image_id,
                "category_id": _cat_id(label_to_cat_id, int(labels[k])),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": float(scores[k]),
            }
            if rles is not None:
                rle = rles[k]
                counts = rle["counts"]
                res["segmentation"] = {"size": [int(v) for v in rle["size"]],
                                       "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
            results.append(res)
    return results


def evaluate_coco(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    iou_types: Sequence[str] = ("bbox", "segm"),
    image_ids: Sequence[int] | None = None,
    backend: str = "pycocotools",
) -> dict[str, dict[str, float]]:
    """COCOeval AP numbers (percent) per IoU type: ``{"bbox": {"AP": .., "AP50": .., ...}, ...}``.

    Metrics are ``AP, AP50, AP75, APs, APm, APl`` from ``COCOeval.stats[:6]`` times 100; a metric
    COCOeval cannot define (no ground truth in that size range) is NaN. Empty ``results`` give 0.
    ``image_ids`` restricts the evaluation to those images (default: every image of ``coco_gt``).
    COCOeval's printing is captured and logged at DEBUG.

    ``backend="faster"`` runs faster-coco-eval's ``COCOeval_faster`` (``pip install
    faster-coco-eval``), a maintained drop-in of the same computation: ``tests/test_coco.py`` checks
    that the 12 numbers agree with pycocotools' to 1e-4.
    """
    if backend not in ("pycocotools", "faster"):
        raise ValueError(f"unknown COCO evaluation backend {backend!r}: pycocotools or faster")
    make_eval = COCOeval
    if backend == "faster":
        coco_gt, make_eval = _faster_coco(coco_gt)
    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
        dets = [dict(d) for d in results]  # loadRes adds keys to the dicts it is given (and only that)
        if iou_type == "segm":
            if any("segmentation" not in d for d in dets):
                raise ValueError("segm evaluation needs a 'segmentation' in every result")
            # With a bbox present, loadRes sets each detection's area from the box, which would put
            # masks into the wrong small/medium/large range; without it, the mask area is used.
            for d in dets:
                d.pop("bbox", None)
        if not dets:
            log.info("COCO %s: no detections, every AP is 0", iou_type)
            out[iou_type] = {name: 0.0 for name in METRIC_NAMES}
            continue
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
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
    return out


def _faster_coco(coco_gt: COCO) -> tuple[Any, Callable]:
    """The ground truth as faster-coco-eval's COCO object, and its evaluator class."""
    try:
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        from mae_transfer.config import ConfigError

        raise ConfigError("eval_backend=faster needs faster-coco-eval: pip install faster-coco-eval "
                          "(or pip install 'mae-transfer[faster]')") from None
    gt = FasterCOCO()
    gt.dataset = copy.deepcopy(coco_gt.dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, lambda g, d, iouType: COCOeval_faster(g, d, iouType=iouType, print_function=log.debug)


class COCOEvaluator(DatasetEvaluator):
    """Box and mask AP of a split with pycocotools. ``process`` turns each image's detections
    (``inputs``: the loader's ``(images, targets)``; ``outputs``: one dict of ``boxes``, ``scores``,
    ``labels``, ``masks`` per image) into COCO results; the engine gathers every process's results;
    ``merge`` puts them in one order whatever the number of processes (by image, then score, as one
    process gives) and ``evaluate`` runs COCOeval once."""

    def __init__(self, dataset: "CocoDetection", backend: str = "pycocotools"):
        self.dataset = dataset
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        self.results: list[dict[str, Any]] = []

    def process(self, inputs, outputs) -> None:
        """``outputs``: ``MaskRCNN.inference(paste=False)`` per image (``boxes`` in the original image
        frame, ``mask_probs`` 28 x 28); the masks are pasted and RLE-encoded here in one go (each in
        its box window, on the model's device; no full-image mask is made)."""
        _, targets = inputs
        preds = [{"image_id": t["image_id"], "boxes": o["boxes"].float().cpu(), "scores": o["scores"].float().cpu(),
                  "labels": o["labels"].cpu(),
                  "rles": paste_masks_rle(o["mask_probs"], o["boxes"], tuple(int(v) for v in t["orig_size"]))}
                 for o, t in zip(outputs, targets)]
        self.results.extend(predictions_to_coco_results(preds, self.dataset.label_to_cat_id))

    def state(self) -> list[dict[str, Any]]:
        return self.results

    def merge(self, states: list[list[dict[str, Any]]]) -> None:
        order = {image_id: i for i, image_id in enumerate(self.dataset.image_ids)}
        self.results = sorted((r for part in states for r in part), key=lambda r: (order.get(r["image_id"], -1), -r["score"]))

    def evaluate(self) -> dict[str, dict[str, float]]:
        return evaluate_coco(self.dataset.coco, self.results, image_ids=self.dataset.image_ids, backend=self.backend)


def save_results_json(results: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``results`` (COCO results format) as JSON to ``path`` atomically."""
    return atomic_write_json(path, results, indent=None)
