"""Dataset indexes at constant memory (mae_transfer.data.index) and the full-size rehearsal data."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_transfer.classification.datasets import build_dataset
from mae_transfer.data.index import PackedStrings, PathLabels, cached_index, index_key
from mae_transfer.data.toy import write_coco
from mae_transfer.detection.coco import CocoDetection, _clean_segmentation, _polygon_area
from mae_transfer.evaluation.data_speed import write_full_size


def test_packed_strings_and_path_labels_round_trip():
    names = ["a.jpg", "", "dir/ünïcode.png", "x" * 300]
    packed = PackedStrings.pack(names)
    assert list(packed) == names and packed[-1] == names[-1] and packed[1:3] == names[1:3] and len(packed) == 4
    with pytest.raises(IndexError):
        packed[4]
    pl = PathLabels(packed, np.array([3, 1, 2, 0]), prefix="/root", keep=np.array([0, 2]))
    assert len(pl) == 2 and pl[1] == ("/root/dir/ünïcode.png", 2) and pl.label_array().tolist() == [3, 2]
    assert pl == [("/root/a.jpg", 3), ("/root/dir/ünïcode.png", 2)]


def test_cached_index_builds_once_and_maps_the_cache(tmp_path, cache):
    src = tmp_path / "ann.json"
    src.write_text("[1, 2, 3]")
    calls = []

    def build():
        calls.append(1)
        return {"x": np.arange(5, dtype=np.int64), "empty": np.zeros(0, np.float64)}, {"n": 5}

    a, meta, info = cached_index("demo", [src], {"opt": 1}, build)
    assert info.source == "built" and meta == {"n": 5} and a["x"].tolist() == [0, 1, 2, 3, 4]
    b, _, info2 = cached_index("demo", [src], {"opt": 1}, build)
    assert info2.source == "cache" and len(calls) == 1 and isinstance(b["x"].base, np.memmap)
    # Another option or an edited source is another index.
    cached_index("demo", [src], {"opt": 2}, build)
    assert len(calls) == 2
    key = index_key("demo", [src], {"opt": 1})
    src.write_text("[1, 2, 4]")
    assert index_key("demo", [src], {"opt": 1}) != key


def _scalar_reference(data: dict, min_box: float = 1.0) -> dict[int, list[int]]:
    """Served annotation ids per image id by the per-annotation rules, written out one by one."""
    imgs = {im["id"]: im for im in data["images"]}
    cats = {c["id"] for c in data["categories"]}
    out: dict[int, list[int]] = {i: [] for i in imgs}
    for ann in data["annotations"]:
        if ann.get("category_id") not in cats or ann.get("image_id") not in imgs:
            continue
        im = imgs[ann["image_id"]]
        b = ann.get("bbox")
        if (
            not isinstance(b, list)
            or len(b) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in b)
        ):
            continue
        x1, y1 = max(0.0, b[0]), max(0.0, b[1])
        x2, y2 = min(float(im["width"]), b[0] + b[2]), min(float(im["height"]), b[1] + b[3])
        if x2 - x1 < min_box or y2 - y1 < min_box:
            continue
        seg, _ = _clean_segmentation(ann.get("segmentation"), im["height"], im["width"])
        if seg is None:
            continue
        out[ann["image_id"]].append(ann["id"])
    return out


def test_vectorised_cleaning_decides_like_the_per_annotation_rules(tmp_path, cache):
    """Messy annotations (non-numeric and infinite boxes, boxes outside the image, collinear and
    tiny polygons, short and odd parts, None/str/bool coordinates, broken segmentations, missing
    areas): the flat index serves exactly the annotations the scalar rules keep, with the same
    boxes, areas and polygons."""
    root = write_coco(tmp_path / "coco", num_categories=5, train_images=2, val_images=12, image_size=64, crowd_prob=0.2)
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    rng = random.Random(0)
    edits = [
        lambda a: a.update(bbox=[1, 2, "x", 4]),
        lambda a: a.update(bbox=[1e9, 2, 3, 4]),
        lambda a: a.update(bbox=[0.5, 0.5, 0.2, 100]),
        lambda a: a.update(bbox=[1, 2, 3]),
        lambda a: a.update(segmentation=[[1, 1, 5, 5, 9, 9]]),
        lambda a: a.update(segmentation=[[1, 1, 5, 5]] + a["segmentation"]),
        lambda a: a.update(segmentation=[[1, None, 5, 5, 3, 4]]),
        lambda a: a.update(segmentation=[[1, 1, 5, 5, 3]] + a["segmentation"]),
        lambda a: a.update(segmentation="bad"),
        lambda a: a.update(segmentation=[]),
        lambda a: a.update(segmentation=[[0.1, 0.1, 0.1000000001, 0.1, 0.1, 0.1000000001]]),
        lambda a: a.update(segmentation=[[True, 1, 9, 1, 9, 9]]),
        lambda a: a.pop("area"),
        lambda a: a.update(segmentation=[["1", 1, 9, 1, 9, 9]]),
    ]
    for ann in data["annotations"]:
        if not ann["iscrowd"] and rng.random() < 0.7:
            rng.choice(edits)(ann)
    bad = tmp_path / "messy.json"
    bad.write_text(json.dumps(data))
    ds = CocoDetection(images_dir=root / "val2017", annotation_file=bad)
    expected = _scalar_reference(data)
    assert ds.num_skipped_annotations == len(data["annotations"]) - sum(map(len, expected.values()))
    anns = {a["id"]: a for a in data["annotations"]}
    for i in range(len(ds)):
        _, t = ds[i]
        iid = int(t["image_id"])
        assert ds.annotation_ids(i) == expected[iid]
        for k, aid in enumerate(expected[iid]):
            a = anns[aid]
            if "area" in a:
                assert t["area"][k] == torch.tensor(float(a["area"]), dtype=torch.float32)
            if isinstance(a["segmentation"], list):
                kept = [
                    p
                    for p in a["segmentation"]
                    if isinstance(p, list)
                    and len(p) >= 6
                    and not len(p) % 2
                    and all(isinstance(v, (int, float)) for v in p)
                    and _polygon_area(p) > 0
                ]
                assert [x.tolist() for x in t["segments"][k]] == [[float(v) for v in p] for p in kept]


def test_cached_and_in_memory_indexes_serve_the_same_targets(tmp_path, cache, monkeypatch):
    root = write_full_size("coco", tmp_path / "full", scale=0.002)
    a = CocoDetection(root, "train2017")
    assert a.index_info.source == "built"
    b = CocoDetection(root, "train2017")
    assert b.index_info.source == "cache" and isinstance(b._a["coords"].base, np.memmap)
    monkeypatch.setenv("MAE_TRANSFER_INDEX_CACHE", "0")
    c = CocoDetection(root, "train2017")
    assert c.index_info.source == "memory"
    assert a.image_ids == b.image_ids == c.image_ids and len(a) == round(118_287 * 0.002)
    for i in range(0, len(a), 17):
        tb, tc = b.load_target(i), c.load_target(i)
        for key in ("boxes", "labels", "iscrowd", "area", "image_id", "orig_size"):
            assert torch.equal(tb[key], tc[key])
        for sb, sc in zip(tb["segments"], tc["segments"]):
            if torch.is_tensor(sb):
                assert torch.equal(sb, sc)
            else:
                assert all(np.array_equal(x, y) for x, y in zip(sb, sc))
    assert sum(int(b.load_target(i)["iscrowd"].sum()) for i in range(len(b))) > 0  # crowd RLEs decode
    # The ground truth for COCOeval is parsed only when asked for, and agrees with the index.
    assert b._coco is None and len(b.coco.getImgIds()) == len(b)


@pytest.mark.parametrize(
    "kind,task,counts", [("inat2018", "inat2018", (875, 49)), ("places365", "places365", (3607, 73))]
)
def test_full_size_lists_have_the_official_counts(tmp_path, cache, kind, task, counts):
    root = write_full_size(kind, tmp_path / kind, scale=0.002)
    train = build_dataset(task, root, "train")
    val = build_dataset(task, root, "val")
    assert (len(train), len(val)) == counts
    assert isinstance(train.samples, PathLabels) and Path(train.samples[5][0]).is_file()
    again = build_dataset(task, root, "train")
    assert again.samples == train.samples and again.targets == train.targets


def test_speed_data_only_full_size_reports_memory_and_build_time(tmp_path, cache, capsys):
    from mae_transfer.cli import main

    root = write_full_size("places365", tmp_path / "p", scale=0.001)
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "speed",
                "places",
                "--data-only",
                "--data",
                str(root),
                "--workers",
                "2",
                "--samples",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert r["train_images"] == 1803 and r["pass_samples"] == 1803 and len(r["worker_uss_end_mib"]) == 2
    assert r["build_seconds"] > 0 and r["samples_per_s"] > 0
    text = capsys.readouterr().out
    assert (
        "index pass over 1,803 samples with 2 workers" in text
        and len(r["worker_uss_start_mib"]) == 2
        and "samples/s per worker" in text
    )


def test_check_data_reports_missing_unreadable_and_memory(tmp_path, cache, capsys):
    """check-data on a COCO folder with one missing and one corrupt image: both named, the run's
    verdict is "stops" (exit 1); with skip_bad in the preset the same data is "ready" except for
    the undecodable file, which is reported either way."""
    from mae_transfer.cli import main

    root = write_coco(tmp_path / "coco", num_categories=4, train_images=6, val_images=5, image_size=48)
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    data["images"][0]["file_name"] = "gone.jpg"
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    corrupt = sorted((root / "train2017").glob("*.jpg"))[0]
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    out = tmp_path / "report.json"
    rc = main(
        [
            "check-data",
            "--task",
            "coco",
            "--data",
            str(root),
            "--full",
            "--gpus",
            "2",
            "--workers",
            "3",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 1 and "MISSING: 1 files" in text and corrupt.name in text and "STOPS" in text
    r = json.loads(out.read_text())
    val = next(s for s in r["splits"] if s["split"] == "val")
    train = next(s for s in r["splits"] if s["split"] == "train")
    assert val["missing_images"] == 1 and val["served"] == 4 and train["decode"]["unreadable"] == 1
    assert train["decode"]["checked"] == train["served"] and r["memory"]["gpus"] == 2 and r["memory"]["index_mib"] > 0


def test_a_cached_dataset_pickles_by_its_cache_folder(tmp_path, cache):
    """What a spawned (or forkserver) DataLoader worker receives is the cache folder's path, not a
    copy of the index: the pickle stays small however large the dataset, and the copy serves the
    same targets."""
    import pickle

    root = write_full_size("coco", tmp_path / "full", scale=0.002)
    CocoDetection(root, "train2017")
    ds = CocoDetection(root, "train2017")  # mapped from the cache
    blob = pickle.dumps(ds)
    index_bytes = sum(a.nbytes for a in ds._a.values())
    assert len(blob) < 20_000 < index_bytes
    copy = pickle.loads(blob)
    for i in (0, len(ds) // 2, len(ds) - 1):
        a, b = ds.load_target(i), copy.load_target(i)
        assert torch.equal(a["boxes"], b["boxes"]) and len(a["segments"]) == len(b["segments"])
