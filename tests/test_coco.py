"""COCO detection data, results conversion and COCOeval wrapper (mae_transfer.detection.coco)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_transfer.data.errors import DataError
from mae_transfer.data.toy import coco_category_ids, write_coco
from mae_transfer.detection.masks import segments_to_masks
from mae_transfer.detection.coco import (
    CocoDetection,
    drop_crowd,
    evaluate_coco,
    predictions_to_coco_results,
    save_results_json,
)
from conftest import shared_root

SHARED = shared_root()
COCO_TINY = SHARED / "data" / "coco_tiny"


def _require_coco_tiny() -> Path:
    if not (COCO_TINY / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"real COCO sample not found at {COCO_TINY} (set MAE_TRANSFER_SHARED)")
    return COCO_TINY


@pytest.fixture(scope="module")
def tiny_val() -> CocoDetection:
    return CocoDetection(_require_coco_tiny(), "val2017")


@pytest.fixture(scope="module")
def gt_predictions(tiny_val) -> list[dict]:
    """Every non-crowd ground-truth instance as a score-1.0 prediction (masks as (N,1,H,W) probabilities)."""
    preds = []
    for i in range(len(tiny_val)):
        image, target = tiny_val[i]
        target = drop_crowd(target)
        n = len(target["labels"])
        masks = segments_to_masks(target["segments"], *image.shape[-2:])
        preds.append(
            {
                "image_id": target["image_id"],
                "boxes": target["boxes"],
                "scores": torch.ones(n),
                "labels": target["labels"],
                "masks": masks[:, None].float(),
            }
        )
    return preds


# ------------------------------------------------------------------------------- evaluation


def test_ground_truth_as_predictions_scores_100(tiny_val, gt_predictions):
    results = predictions_to_coco_results(gt_predictions, tiny_val.label_to_cat_id)
    assert len(results) == sum(len(p["labels"]) for p in gt_predictions) > 0
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    json.dumps(results)  # JSON-serialisable as is
    metrics = evaluate_coco(tiny_val.coco, results)
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            assert metrics[iou_type][name] >= 99.99, (iou_type, name, metrics[iou_type])


def test_shuffled_labels_score_much_lower(tiny_val, gt_predictions):
    g = torch.Generator().manual_seed(0)
    shuffled = []
    for p in gt_predictions:
        # A random wrong label for every instance: boxes and masks stay perfect, classes do not.
        offset = torch.randint(1, len(tiny_val.cat_ids), p["labels"].shape, generator=g)
        labels = (p["labels"] + offset) % len(tiny_val.cat_ids)
        shuffled.append({**p, "labels": labels})
    results = predictions_to_coco_results(shuffled, tiny_val.label_to_cat_id)
    metrics = evaluate_coco(tiny_val.coco, results)
    assert metrics["bbox"]["AP"] < 10.0
    assert metrics["segm"]["AP"] < 10.0


def test_empty_predictions_score_zero(tiny_val):
    metrics = evaluate_coco(tiny_val.coco, [])
    assert metrics == {t: {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")} for t in ("bbox", "segm")}
    no_dets = [{"image_id": 1, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 1, 5, 5)}]
    assert predictions_to_coco_results(no_dets, tiny_val.label_to_cat_id) == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode vs numpy 2
def test_results_conversion_and_atomic_save(tmp_path):
    pred = {
        "image_id": torch.tensor(7),
        "boxes": torch.tensor([[1.0, 2.0, 5.0, 10.0]]),
        "scores": torch.tensor([0.5]),
        "labels": torch.tensor([2]),
        "masks": torch.tensor([[[0.9, 0.4], [0.6, 0.1]]]),  # (N, H, W)
    }
    (res,) = predictions_to_coco_results([pred], {1: 1, 2: 3})
    # Pasted boolean masks (the detector's output) encode the same way.
    (res_bool,) = predictions_to_coco_results([{**pred, "masks": pred["masks"] > 0.5}], {1: 1, 2: 3})
    assert res_bool["segmentation"] == res["segmentation"]
    assert res["image_id"] == 7 and res["category_id"] == 3
    assert res["bbox"] == [1.0, 2.0, 4.0, 8.0]
    from pycocotools import mask as mask_utils

    decoded = mask_utils.decode({"size": res["segmentation"]["size"], "counts": res["segmentation"]["counts"].encode()})
    np.testing.assert_array_equal(decoded, [[1, 0], [1, 0]])
    with pytest.raises(ValueError, match="label 5 has no COCO category"):
        predictions_to_coco_results([{**pred, "labels": torch.tensor([5])}], [1, 2, 3])
    out = save_results_json([res], tmp_path / "sub" / "results.json")
    assert json.loads(out.read_text()) == [res]
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temp file left


# ---------------------------------------------------------------------------------- dataset


def test_coco_tiny_train_targets():
    ds = CocoDetection(_require_coco_tiny(), "train2017")
    assert len(ds) == 80 and ds.num_skipped_annotations == 0 and ds.num_missing_images == 0
    assert len(ds.cat_ids) == 80 and ds.class_names[0] == "person" and len(ds.class_names) == 80
    labels_seen, crowd_seen = set(), 0
    for i in range(0, len(ds), 4):
        image, t = ds[i]
        _, h, w = image.shape
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert t["orig_size"].tolist() == [h, w]
        n = len(t["labels"])
        assert t["boxes"].shape == (n, 4) and len(t["segments"]) == n
        for seg, crowd, box in zip(t["segments"], t["iscrowd"].tolist(), t["boxes"]):
            if crowd:  # crowd regions are RLEs, decoded to bitmasks
                assert torch.is_tensor(seg) and seg.shape == (h, w) and seg.dtype == torch.uint8
            else:  # polygons, inside the annotated box
                pts = np.concatenate(seg).reshape(-1, 2)
                assert pts[:, 0].min() >= box[0] - 1 and pts[:, 0].max() <= box[2] + 1
        assert t["labels"].dtype == torch.int64 and bool(((t["labels"] >= 0) & (t["labels"] < 80)).all())
        b = t["boxes"]
        assert bool((b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all())
        assert bool((b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all())
        labels_seen |= set(t["labels"].tolist())
        if t["iscrowd"].any():
            crowd_seen += 1
            dropped = drop_crowd(t)
            assert int(dropped["iscrowd"].sum()) == 0
            assert len(dropped["labels"]) == n - int(t["iscrowd"].sum()) == len(dropped["segments"])
    assert labels_seen <= set(range(80)) and len(labels_seen) > 20
    # Crowd annotations exist in the file: find one served with iscrowd=1 even if the stride missed it.
    crowd_images = {a["image_id"] for a in ds.coco.dataset["annotations"] if a["iscrowd"]}
    assert crowd_images
    if not crowd_seen:
        _, t = ds[ds.image_ids.index(sorted(crowd_images)[0])]
        assert int(t["iscrowd"].sum()) >= 1 and int(drop_crowd(t)["iscrowd"].sum()) == 0


def test_toy_category_mapping_and_keep_empty(tmp_path):
    root = write_coco(tmp_path / "coco", num_categories=6, train_images=5, val_images=4, image_size=48)
    ds = CocoDetection(root, "val2017")
    assert ds.cat_ids == coco_category_ids(6) and ds.cat_ids != list(range(1, 7))  # non-contiguous ids
    assert ds.label_to_cat_id == {i: c for i, c in enumerate(ds.cat_ids)}
    anns = ds.coco.dataset["annotations"]
    for i in range(len(ds)):
        _, t = ds[i]
        image_id = int(t["image_id"])
        expected = sorted(a["category_id"] for a in anns if a["image_id"] == image_id)
        assert sorted(ds.label_to_cat_id[int(l)] for l in t["labels"]) == expected
    empty = [img["id"] for img in ds.coco.dataset["images"] if not any(a["image_id"] == img["id"] for a in anns)]
    assert len(empty) == 1
    assert empty[0] in ds.image_ids and len(ds) == 4
    _, t = ds[ds.image_ids.index(empty[0])]
    assert t["boxes"].shape == (0, 4) and t["segments"] == []
    train_like = CocoDetection(root, "val2017", keep_empty=False)
    assert empty[0] not in train_like.image_ids and len(train_like) == 3


# -------------------------------------------------------------------------------- malformed


def _malformed(tmp_path: Path, *, unknown_cat: bool = False, missing_image: bool = False) -> tuple[Path, Path, dict]:
    """A toy val split whose json has (a) a box outside the image and (b) a zero-area polygon."""
    root = write_coco(tmp_path / "coco", num_categories=4, train_images=3, val_images=4, image_size=48, crowd_prob=0.0)
    src = root / "annotations" / "instances_val2017.json"
    data = json.loads(src.read_text())
    imgs = {im["id"]: im for im in data["images"]}
    plain = [a for a in data["annotations"] if not a["iscrowd"]]
    info = {}
    a = plain[0]
    w = imgs[a["image_id"]]["width"]
    a["bbox"] = [w + 5.0, 0.0, 10.0, 10.0]  # entirely right of the image: degenerate after clipping
    info["outside"] = a["id"]
    b = plain[1]
    b["segmentation"] = [[1.0, 1.0, 5.0, 5.0, 9.0, 9.0]]  # collinear: zero area
    info["zero_area"] = b["id"]
    if unknown_cat:
        plain[2]["category_id"] = 9999
        info["unknown"] = plain[2]["id"]
    if missing_image:
        data["images"][1]["file_name"] = "does_not_exist.jpg"
    bad = root / "annotations" / "bad.json"
    bad.write_text(json.dumps(data))
    return root / "val2017", bad, info


def test_malformed_geometry_dropped_and_counted(tmp_path):
    images, ann_file, info = _malformed(tmp_path)
    ds = CocoDetection(images_dir=images, annotation_file=ann_file)
    assert ds.num_skipped_annotations == 2
    assert ds.skipped_reasons["degenerate box"] == 1 and sum(ds.skipped_reasons.values()) == 2
    served = {ann["id"] for anns in ds._annotations.values() for ann in anns}
    assert info["outside"] not in served and info["zero_area"] not in served
    for i in range(len(ds)):
        _, t = ds[i]
        assert len(t["segments"]) == len(t["boxes"])


def test_unknown_category_raises_one_error(tmp_path):
    images, ann_file, info = _malformed(tmp_path, unknown_cat=True)
    with pytest.raises(DataError) as err:
        CocoDetection(images_dir=images, annotation_file=ann_file)
    msg = str(err.value)
    assert str(ann_file) in msg and f"annotation id {info['unknown']}" in msg and "9999" in msg
    ds = CocoDetection(images_dir=images, annotation_file=ann_file, skip_bad=True)
    assert ds.num_skipped_annotations == 3 and ds.skipped_reasons["unknown category id"] == 1


def test_missing_image_raises_or_is_skipped(tmp_path):
    images, ann_file, _ = _malformed(tmp_path, missing_image=True)
    with pytest.raises(DataError) as err:
        CocoDetection(images_dir=images, annotation_file=ann_file)
    assert "does_not_exist.jpg" in str(err.value) and str(ann_file) in str(err.value)
    ds = CocoDetection(images_dir=images, annotation_file=ann_file, skip_bad=True)
    assert ds.num_missing_images == 1 and len(ds) == 3
    assert all(ds.image_path(i).is_file() for i in range(len(ds)))


def test_missing_annotation_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="instances_val2017.json"):
        CocoDetection(tmp_path, "val2017")


def test_faster_coco_eval_gives_pycocotools_numbers(tiny_val, gt_predictions):
    """eval_backend=faster: faster-coco-eval's COCOeval_faster agrees with pycocotools on all 12
    numbers (to 1e-4) for perturbed predictions of the real coco_tiny images (jittered boxes, eroded
    masks, random scores, some wrong labels and some dropped instances)."""
    pytest.importorskip("faster_coco_eval")
    import time

    g = torch.Generator().manual_seed(3)
    preds = []
    for p in gt_predictions:
        n = len(p["labels"])
        keep = torch.rand(n, generator=g) > 0.15
        boxes = p["boxes"] + torch.randn(n, 4, generator=g) * 4.0
        labels = torch.where(torch.rand(n, generator=g) < 0.1, (p["labels"] + 1) % len(tiny_val.cat_ids), p["labels"])
        masks = torch.nn.functional.max_pool2d(-p["masks"], 5, stride=1, padding=2).neg()  # eroded
        preds.append({**p, "boxes": boxes[keep], "scores": torch.rand(n, generator=g)[keep], "labels": labels[keep],
                      "masks": masks[keep]})
    results = predictions_to_coco_results(preds, tiny_val.label_to_cat_id)
    t0 = time.perf_counter()
    ref = evaluate_coco(tiny_val.coco, results)
    t1 = time.perf_counter()
    fast = evaluate_coco(tiny_val.coco, results, backend="faster")
    t2 = time.perf_counter()
    diffs = [abs(ref[t][k] - fast[t][k]) for t in ref for k in ref[t] if not math.isnan(ref[t][k])]
    print(f"pycocotools {t1 - t0:.3f} s, faster-coco-eval {t2 - t1:.3f} s, max difference {max(diffs):.2e} over {len(diffs)} numbers")
    assert 5 < ref["bbox"]["AP"] < 95 and 5 < ref["segm"]["AP"] < 95  # neither trivial nor perfect
    for iou_type in ("bbox", "segm"):
        for name, v in ref[iou_type].items():
            w = fast[iou_type][name]
            assert (math.isnan(v) and math.isnan(w)) or abs(v - w) <= 1e-4, (iou_type, name, v, w)
