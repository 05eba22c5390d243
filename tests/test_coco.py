"""COCO detection data, results conversion and COCOeval wrapper (mae_transfer.detection.coco)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_root

from mae_transfer.data.errors import DataError
from mae_transfer.data.toy import coco_category_ids, write_coco
from mae_transfer.detection.coco import (
    CocoDetection,
    drop_crowd,
    evaluate_coco,
    predictions_to_coco_results,
    save_results_json,
)
from mae_transfer.detection.masks import segments_to_masks

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
    no_dets = [
        {
            "image_id": 1,
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 1, 5, 5),
        }
    ]
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
        assert sorted(ds.label_to_cat_id[int(label)] for label in t["labels"]) == expected
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
    served = {i for k in range(len(ds)) for i in ds.annotation_ids(k)}
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


def _erode(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of ``(..., H, W)`` bool masks by a (2 radius + 1)^2 square, pixels outside the
    image ignored: one pass per axis of shifted ANDs (a 5x5 max-pool of 80 full-size masks takes
    seconds on a CPU)."""
    out = masks.clone()
    for dim in (-2, -1):
        src, n = out.clone(), out.shape[dim]
        for d in range(1, radius + 1):
            out.narrow(dim, d, n - d).logical_and_(src.narrow(dim, 0, n - d))
            out.narrow(dim, 0, n - d).logical_and_(src.narrow(dim, d, n - d))
    return out


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
        masks = _erode(p["masks"] > 0.5, radius=2).float()
        preds.append(
            {
                **p,
                "boxes": boxes[keep],
                "scores": torch.rand(n, generator=g)[keep],
                "labels": labels[keep],
                "masks": masks[keep],
            }
        )
    results = predictions_to_coco_results(preds, tiny_val.label_to_cat_id)
    t0 = time.perf_counter()
    ref = evaluate_coco(tiny_val.coco, results)
    t1 = time.perf_counter()
    fast = evaluate_coco(tiny_val.coco, results, backend="faster")
    t2 = time.perf_counter()
    diffs = [abs(ref[t][k] - fast[t][k]) for t in ref for k in ref[t] if not math.isnan(ref[t][k])]
    print(
        f"pycocotools {t1 - t0:.3f} s, faster-coco-eval {t2 - t1:.3f} s, "
        f"max difference {max(diffs):.2e} over {len(diffs)} numbers"
    )
    assert 5 < ref["bbox"]["AP"] < 95 and 5 < ref["segm"]["AP"] < 95  # neither trivial nor perfect
    for iou_type in ("bbox", "segm"):
        for name, v in ref[iou_type].items():
            w = fast[iou_type][name]
            assert (math.isnan(v) and math.isnan(w)) or abs(v - w) <= 1e-4, (iou_type, name, v, w)


# ------------------------------------------------------- compact results (COCOEvaluator's state)
import pickle  # noqa: E402

from mae_transfer.detection.coco import COCOEvaluator, CocoResults, _merge_order  # noqa: E402
from mae_transfer.detection.masks import paste_masks_rle  # noqa: E402
from mae_transfer.io import atomic_write_json, atomic_write_json_list  # noqa: E402


def _fake_outputs(ds: CocoDetection, index: int) -> tuple[dict, dict]:
    """One image's ``(target, MaskRCNN.inference(paste=False) output)``: the ground-truth boxes
    jittered, some with a wrong label, plus random boxes; 28 x 28 ellipse-shaped mask
    probabilities; scores on a 0.1 grid, so many tie."""
    image_id = ds.image_ids[index]
    info = ds.coco.imgs[image_id]
    h, w = int(info["height"]), int(info["width"])
    g = torch.Generator().manual_seed(index)
    anns = [a for a in ds.coco.imgToAnns.get(image_id, []) if not a["iscrowd"]]
    gt = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes = torch.cat([gt[:, :2], gt[:, :2] + gt[:, 2:]], 1) + torch.randn(len(gt), 4, generator=g) * 3.0
    labels = torch.tensor([ds.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
    labels = torch.where(torch.rand(len(labels), generator=g) < 0.15, (labels + 1) % len(ds.cat_ids), labels)
    xy = torch.rand(5, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    extra = torch.cat([xy, xy + 10 + torch.rand(5, 2, generator=g) * 100], 1)
    boxes = torch.cat([boxes, extra]).clamp(min=0)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    labels = torch.cat([labels, torch.randint(0, len(ds.cat_ids), (5,), generator=g)])
    n = len(boxes)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    probs = torch.sigmoid(4 * (1 - xx**2 - yy**2))[None] + 0.3 * torch.randn(n, 28, 28, generator=g)
    scores = (torch.rand(n, generator=g) * 10).ceil() / 10
    target = {"image_id": torch.tensor(image_id), "orig_size": torch.tensor([h, w])}
    return target, {"boxes": boxes, "scores": scores, "labels": labels, "mask_probs": probs.clamp(0, 1)}


def _old_results(target: dict, output: dict, label_to_cat_id) -> list[dict]:
    """The dict-per-detection conversion COCOEvaluator did before it kept arrays."""
    rles = paste_masks_rle(output["mask_probs"], output["boxes"], tuple(int(v) for v in target["orig_size"]))
    boxes, scores = output["boxes"].numpy().astype(np.float64), output["scores"].numpy().astype(np.float64)
    out = []
    for k in range(len(boxes)):
        x1, y1, x2, y2 = boxes[k]
        out.append(
            {
                "image_id": int(target["image_id"]),
                "category_id": int(label_to_cat_id[int(output["labels"][k])]),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": float(scores[k]),
                "segmentation": {"size": [int(v) for v in rles[k]["size"]], "counts": rles[k]["counts"]},
            }
        )
    return out


def _old_evaluate(ds: CocoDetection, results: list[dict], backend: str) -> dict:
    """The evaluation before: fresh copies of the dicts for each IoU type (segm without bbox)."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    from mae_transfer.detection.coco import METRIC_NAMES, _faster_coco

    coco_gt, make_eval = _faster_coco(ds.coco) if backend == "faster" else (ds.coco, COCOeval)
    out = {}
    for iou_type in ("bbox", "segm"):
        dets = [dict(d) for d in results]
        if iou_type == "segm":
            for d in dets:
                d.pop("bbox")
        with contextlib.redirect_stdout(io.StringIO()):
            e = make_eval(coco_gt, coco_gt.loadRes(dets), iouType=iou_type)
            e.params.imgIds = sorted(ds.image_ids)
            e.evaluate()
            e.accumulate()
            e.summarize()
        out[iou_type] = {n: (float(v) * 100.0 if v >= 0 else float("nan")) for n, v in zip(METRIC_NAMES, e.stats[:6])}
    return out


@pytest.fixture(scope="module")
def tiny_val_subset(tmp_path_factory) -> CocoDetection:
    """28 coco_tiny val images (every fourth, and every one with a crowd region), for speed."""
    root = tmp_path_factory.mktemp("coco_subset")
    data = json.loads((_require_coco_tiny() / "annotations" / "instances_val2017.json").read_text())
    ids = sorted(im["id"] for im in data["images"])
    keep = set(ids[::4]) | {a["image_id"] for a in data["annotations"] if a["iscrowd"]}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    (root / "val2017").symlink_to(COCO_TINY / "val2017")
    return CocoDetection(root, "val2017")


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_compact_evaluator_gives_the_dict_path_numbers_and_file(tiny_val_subset, backend, tmp_path):
    """COCOEvaluator keeps arrays, the main process alone merges them: the same 12 numbers (bit for
    bit) and the same predictions file (byte for byte) as one dict per detection, sorted with
    Python's stable sort, evaluated on copies. Two processes as DistributedSampler shards them
    (the second repeats the first image as padding), batches of 3, scores with many ties."""
    if backend == "faster":
        pytest.importorskip("faster_coco_eval")
    tiny_val = tiny_val_subset
    assert any(a["iscrowd"] for a in tiny_val.coco.dataset["annotations"])
    shards = [list(range(0, len(tiny_val), 2)), list(range(1, len(tiny_val), 2)) + [0]]
    evaluators, old = [], []
    for shard in shards:
        ev = COCOEvaluator(tiny_val, backend=backend)
        for b in range(0, len(shard), 3):
            targets, outputs = zip(*(_fake_outputs(tiny_val, i) for i in shard[b : b + 3]))
            ev.process((None, list(targets)), list(outputs))
            old += [r for t, o in zip(targets, outputs) for r in _old_results(t, o, tiny_val.label_to_cat_id)]
        evaluators.append(ev)
    states = [pickle.loads(pickle.dumps(ev.state())) for ev in evaluators]  # as gathered
    assert all(isinstance(s, CocoResults) for s in states) and sum(map(len, states)) == len(old)
    main = COCOEvaluator(tiny_val, backend=backend)
    main.merge(states)
    ours = main.evaluate()
    order = {image_id: i for i, image_id in enumerate(tiny_val.image_ids)}
    old_sorted = sorted(old, key=lambda r: (order.get(r["image_id"], -1), -r["score"]))
    assert old_sorted != old  # the merge has work to do
    assert len({(r["image_id"], r["score"]) for r in old}) < len(old)  # and ties to keep in order
    reference = _old_evaluate(tiny_val, old_sorted, backend)
    assert 5 < reference["bbox"]["AP"] < 95 and 5 < reference["segm"]["AP"] < 95  # neither trivial nor perfect
    assert json.dumps(ours) == json.dumps(reference)  # every digit (NaN included)
    save_results_json(main.results, tmp_path / "ours.json")
    atomic_write_json(tmp_path / "old.json", old_sorted, indent=None)  # what save_results_json wrote
    assert (tmp_path / "ours.json").read_bytes() == (tmp_path / "old.json").read_bytes()
    # evaluate_coco on dicts: leaves them as they are, and bbox first whatever the order asked.
    given = json.loads(json.dumps(old_sorted))
    both = evaluate_coco(
        tiny_val.coco, given, iou_types=("segm", "bbox"), image_ids=tiny_val.image_ids, backend=backend
    )
    assert list(both) == ["segm", "bbox"] and json.dumps(both, sort_keys=True) == json.dumps(reference, sort_keys=True)
    assert given == old_sorted


def test_merge_order_is_pythons_stable_sort():
    rng = np.random.default_rng(0)
    n = 5000
    results = CocoResults(
        rng.integers(0, 60, n).astype(np.int64),
        np.ones(n, np.int64),
        np.zeros((n, 4), np.float32),
        (rng.integers(0, 8, n) / 8).astype(np.float32),
    )
    image_order = [int(i) for i in rng.permutation(50)]  # ids 50..59 are not in it: position -1, first
    position = {image_id: i for i, image_id in enumerate(image_order)}
    rows = [(int(i), float(s)) for i, s in zip(results.image_ids, results.scores)]
    expected = sorted(range(n), key=lambda k: (position.get(rows[k][0], -1), -rows[k][1]))
    assert _merge_order(results, image_order).tolist() == expected


def test_results_arrays_make_the_same_dicts_and_json(tmp_path):
    pred = {
        "image_id": torch.tensor(7),
        "boxes": torch.tensor([[1.0, 2.0, 5.0, 10.5], [0.1, 0.2, 0.3, 0.7]]),
        "scores": torch.tensor([0.5, 0.25]),
        "labels": torch.tensor([2, 1]),
        "rles": [{"size": [12, 9], "counts": "abc"}, {"size": [12, 9], "counts": b"de"}],
    }
    results = CocoResults.from_prediction(pred, {1: 1, 2: 3})
    assert results.boxes.dtype == np.float32 and len(results.counts) == 5
    two = CocoResults.concat([results, CocoResults.from_prediction({**pred, "rles": None, "image_id": 8}, [0, 1, 3])])
    dicts = two.to_dicts()
    assert dicts[0] == {
        "image_id": 7,
        "category_id": 3,
        "bbox": [1.0, 2.0, 4.0, 8.5],
        "score": 0.5,
        "segmentation": {"size": [12, 9], "counts": "abc"},
    }
    assert dicts[1]["bbox"] == [
        float(np.float32(0.1)),
        float(np.float32(0.2)),
        float(np.float64(np.float32(0.3)) - np.float64(np.float32(0.1))),
        float(np.float64(np.float32(0.7)) - np.float64(np.float32(0.2))),
    ]
    assert dicts[1]["segmentation"]["counts"] == "de" and "segmentation" not in dicts[2]
    assert list(two) == dicts and pickle.loads(pickle.dumps(two)).to_dicts() == dicts
    assert two.take(np.array([3, 0])).to_dicts() == [dicts[3], dicts[0]]
    # The streamed file is byte for byte json.dumps of the whole list, non-finite floats as null.
    rows = dicts + [{"score": float("nan"), "bbox": [float("inf"), 1.5]}] * 3
    for items in ([], rows[:1], rows):
        atomic_write_json(tmp_path / "a.json", items, indent=None)
        atomic_write_json_list(tmp_path / "b.json", iter(items), chunk=2)
        assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    atomic_write_json(tmp_path / "a.json", dicts, indent=None)
    save_results_json(two, tmp_path / "b.json")  # finite: written without the non-finite pass
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    with pytest.raises(ValueError):  # a NaN the caller did not announce is refused, not written
        atomic_write_json_list(tmp_path / "c.json", rows, all_finite=True)
    assert not (tmp_path / "c.json").exists()


def test_eval_backend_auto_is_faster_coco_eval_when_it_imports(monkeypatch):
    import builtins
    import importlib.util

    from mae_transfer.config import ConfigError
    from mae_transfer.detection.coco import resolve_eval_backend
    from mae_transfer.detection.config import build_config
    from mae_transfer.detection.task import format_metrics

    cfg = build_config()
    assert cfg.eval_backend == "auto"
    with pytest.raises(ConfigError, match="eval_backend must be one of 'auto', 'pycocotools', 'faster'"):
        build_config(None, {"eval_backend": "fast"})
    assert resolve_eval_backend("auto") == ("faster" if importlib.util.find_spec("faster_coco_eval") else "pycocotools")
    assert resolve_eval_backend("pycocotools") == "pycocotools" and resolve_eval_backend("faster") == "faster"
    with pytest.raises(ValueError, match="unknown COCO evaluation backend 'fast'"):
        resolve_eval_backend("fast")
    real_import = builtins.__import__

    def without_faster(name, *args, **kwargs):
        if name.split(".")[0] == "faster_coco_eval":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_faster)
    assert resolve_eval_backend("auto") == "pycocotools"
    # The evaluation line names the backend that scored, and that auto chose it.
    t = {"seconds": 2.0, "images": 4, "images_per_second": 2.0, "scoring_seconds": 0.5}
    line = format_metrics({"time": {**t, "backend": "faster", "backend_setting": "auto"}}, cfg).splitlines()[-1]
    assert line.endswith("scored in 0.5 s (faster-coco-eval, eval_backend=auto)")
    line = format_metrics(
        {"time": {**t, "backend": "pycocotools", "backend_setting": "pycocotools"}}, cfg
    ).splitlines()[-1]
    assert line.endswith("scored in 0.5 s (pycocotools)")
