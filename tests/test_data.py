"""Toy-data writers (real on-disk formats, determinism, cache) and the robust ImageFolder dataset."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_root
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from mae_transfer.data import DataError, ImageFolderDataset, toy
from mae_transfer.data.toy import (
    ensure_toy_dataset,
    make_scene,
    write_ade20k,
    write_coco,
    write_imagefolder,
    write_inat,
    write_places,
)


def shared_data() -> Path:
    """``../shared/data`` beside the checkout, or ``$MAE_TRANSFER_SHARED/data``."""
    return shared_root() / "data"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def digest_tree(root: Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in suffixes
    }


# ------------------------------------------------------------------------------------ scenes


def test_scene_is_deterministic_and_self_consistent():
    a = make_scene(np.random.default_rng(7), (80, 60), 10)
    b = make_scene(np.random.default_rng(7), (80, 60), 10)
    assert a.image.size == (80, 60) and a.image.mode == "RGB"
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.semantic, b.semantic)
    assert a.semantic.shape == (60, 80)

    for seed in range(30):
        scene = make_scene(np.random.default_rng(seed), 64, 10, dominant=seed % 10)
        assert 1 <= len(scene.instances) <= 5
        assert scene.label == seed % 10
        areas = [inst.area for inst in scene.instances]
        assert areas[0] == max(areas) and all(a < areas[0] for a in areas[1:])
        union = np.zeros((64, 64), dtype=int)
        for inst in scene.instances:
            assert inst.mask.sum() == inst.area > 0
            union += inst.mask
            # Each object is visible structure: its pixels hold its category in the semantic map.
            assert (scene.semantic[inst.mask] == inst.category).all()
            x, y, w, h = inst.bbox
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
        assert union.max() <= 1  # objects never overlap
        background = scene.semantic[union == 0]
        assert ((background >= 10) | (background == toy.UNLABELLED)).all()

    empty = make_scene(np.random.default_rng(0), 32, 3, num_objects=0)
    assert empty.instances == [] and empty.label == -1


def test_objects_are_visible_against_the_background():
    scene = make_scene(np.random.default_rng(3), 64, 10, dominant=0, num_objects=1)
    img = np.asarray(scene.image).astype(float)
    mask = scene.instances[0].mask
    inside, outside = img[mask].mean(0), img[~mask].mean(0)
    assert np.abs(inside - outside).max() > 40  # clear contrast, not noise


def test_writing_a_thousand_images_is_fast(tmp_path):
    # CPU time, not wall time: other jobs sharing the machine must not fail this test.
    start = time.process_time()
    write_imagefolder(tmp_path, num_classes=10, train_per_class=80, val_per_class=20, image_size=64)
    elapsed = time.process_time() - start
    assert len(list(tmp_path.rglob("*.jpg"))) == 1000
    assert elapsed < 15, f"writing 1000 toy images took {elapsed:.1f} s of CPU time"


# ------------------------------------------------------------------------------------ writers


def test_imagefolder_writer_layout_and_classes(tmp_path):
    root = write_imagefolder(tmp_path / "if", num_classes=4, train_per_class=5, val_per_class=2, image_size=32)
    assert root == tmp_path / "if"
    lines = (root / "classes.txt").read_text().splitlines()
    folders = [line.split("\t")[0] for line in lines]
    assert folders == sorted(folders) and len(folders) == 4
    for split, per_class in (("train", 5), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == folders
        counts = Counter(p.parent.name for p in (root / split).rglob("*.jpg"))
        assert counts == {f: per_class for f in folders}
    ds = ImageFolderDataset(root, split="train")
    assert ds.classes == folders and len(ds) == 20
    assert Counter(ds.targets) == {i: 5 for i in range(4)}
    assert tuple(ds[0]["image"].shape) == (3, 32, 32)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_coco_writer_matches_the_coco_format(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    root = write_coco(tmp_path / "coco", num_categories=8, train_images=12, val_images=6, image_size=64)
    for split, n in (("train", 12), ("val", 6)):
        path = root / "annotations" / f"instances_{split}2017.json"
        coco = COCO(str(path))
        raw = json.loads(path.read_text())
        assert set(raw) >= {"images", "annotations", "categories"}
        assert len(coco.getImgIds()) == n
        for img in raw["images"]:
            assert set(img) >= {"id", "width", "height", "file_name"}
            with Image.open(root / f"{split}2017" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
        cat_ids = sorted(c["id"] for c in raw["categories"])
        assert len(cat_ids) == 8 and cat_ids != list(range(cat_ids[0], cat_ids[0] + 8))  # gaps, like COCO
        assert all({"id", "name", "supercategory"} <= set(c) for c in raw["categories"])
        images = {img["id"]: img for img in raw["images"]}
        assert any(not coco.getAnnIds(imgIds=[i]) for i in images)  # an image without annotations
        crowds = 0
        for ann in raw["annotations"]:
            assert ann["image_id"] in images and ann["category_id"] in cat_ids
            img = images[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= img["width"] and y + h <= img["height"]
            mask = coco.annToMask(ann)
            assert mask.shape == (img["height"], img["width"])
            assert mask.sum() == ann["area"]
            if ann["iscrowd"]:
                crowds += 1
                seg = ann["segmentation"]
                assert isinstance(seg["counts"], str) and seg["size"] == [img["height"], img["width"]]
                decoded = mask_utils.decode({"counts": seg["counts"].encode(), "size": seg["size"]})
                assert decoded.sum() == ann["area"]
            else:
                assert isinstance(ann["segmentation"], list) and all(
                    len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"]
                )
        assert crowds >= 1


def test_ade20k_writer_matches_the_scene_parsing_format(tmp_path):
    root = write_ade20k(tmp_path / "ade", num_categories=6, train_images=8, val_images=4, image_size=64)
    base = root / "ADEChallengeData2016"
    seen: set[int] = set()
    for split, folder, n in (("train", "training", 8), ("val", "validation", 4)):
        images = sorted((base / "images" / folder).glob("*.jpg"))
        labels = sorted((base / "annotations" / folder).glob("*.png"))
        assert [p.stem for p in images] == [p.stem for p in labels] == [f"ADE_{split}_{i:08d}" for i in range(1, n + 1)]
        for img_path, label_path in zip(images, labels):
            with Image.open(label_path) as lab, Image.open(img_path) as img:
                assert lab.mode == "L" and lab.size == img.size
                arr = np.asarray(lab)
            assert arr.dtype == np.uint8 and arr.max() <= 150
            seen |= set(np.unique(arr).tolist())
    assert 0 in seen and set(toy.ade20k_category_ids(6)) & seen
    assert {1, 4} & seen and {3} & seen  # wall/floor indoors, sky outdoors

    rows = (base / "objectInfo150.txt").read_text().split("\n")
    assert rows[0] == "Idx\tRatio\tTrain\tVal\tName" and len(rows) == 151
    parsed = [r.split("\t") for r in rows[1:]]
    assert [int(r[0]) for r in parsed] == list(range(1, 151))
    assert abs(sum(float(r[1]) for r in parsed) - 1) < 0.02
    official = shared_data() / "ade20k_sample" / "objectInfo150.txt"
    if official.exists():
        names = [line.split("\t")[4] for line in official.read_text().split("\n")[1:] if line]
        assert [r[4] for r in parsed] == names


@pytest.mark.parametrize("year", [2017, 2018, 2019])
def test_inat_writer_matches_each_year(tmp_path, year):
    root = write_inat(
        tmp_path / "inat", year=year, num_categories=4, train_per_category=3, val_per_category=2, image_size=48
    )
    train = json.loads((root / f"train{year}.json").read_text())
    val = json.loads((root / f"val{year}.json").read_text())
    keys = {
        2017: {"id", "name", "supercategory"},
        2018: {"id", "name", "supercategory", "kingdom", "phylum", "class", "order", "family", "genus"},
        2019: {"id", "name", "kingdom", "phylum", "class", "order", "family", "genus"},
    }[year]
    folder = {2017: "train_val_images", 2018: "train_val2018", 2019: "train_val2019"}[year]
    for data in (train, val):
        assert all(set(c) == keys for c in data["categories"])
        assert len(data["categories"]) == 5
        ids = {img["id"] for img in data["images"]}
        for img in data["images"]:
            assert set(img) == {"id", "width", "height", "file_name", "license", "rights_holder"}
            parts = Path(img["file_name"]).parts
            assert parts[0] == folder and len(parts) == 4
            with Image.open(root / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
        for ann in data["annotations"]:
            assert set(ann) == {"id", "image_id", "category_id"} and ann["image_id"] in ids
    cats = {c["id"]: c for c in train["categories"]}
    for img, ann in zip(val["images"], val["annotations"]):
        parts = Path(img["file_name"]).parts
        if year == 2017:
            assert (
                parts[1] == cats[ann["category_id"]]["supercategory"] and parts[2] == cats[ann["category_id"]]["name"]
            )
        else:
            assert parts[2] == str(ann["category_id"])
            if year == 2018:
                assert parts[1] == cats[ann["category_id"]]["supercategory"]
    train_cats = {a["category_id"] for a in train["annotations"]}
    val_cats = {a["category_id"] for a in val["annotations"]}
    assert train_cats == {0, 1, 2, 3} and val_cats - train_cats == {4}
    assert Counter(a["category_id"] for a in train["annotations"]) == {c: 3 for c in range(4)}
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}


@pytest.mark.parametrize("version", [205, 365])
def test_places_writer_lists_parse_and_files_exist(tmp_path, version):
    root = write_places(
        tmp_path / "places", version=version, num_categories=5, train_per_category=3, val_per_category=2, image_size=32
    )
    if version == 205:
        image_root = root / "data/vision/torralba/deeplearning/images256"
        lists = {
            "train": root / "trainvalsplit_places205/train_places205.csv",
            "val": root / "trainvalsplit_places205/val_places205.csv",
        }
        bases = {"train": image_root, "val": image_root}
    else:
        cats = [line.rsplit(" ", 1) for line in (root / "categories_places365.txt").read_text().splitlines()]
        assert [int(i) for _, i in cats] == list(range(5)) and all(n.startswith("/") and n[2] == "/" for n, _ in cats)
        assert [n for n, _ in cats] == sorted(n for n, _ in cats)
        lists = {"train": root / "places365_train_standard.txt", "val": root / "places365_val.txt"}
        bases = {"train": root / "data_256", "val": root / "val_256"}
    for split, per_cat in (("train", 3), ("val", 2)):
        entries = [line.rsplit(" ", 1) for line in lists[split].read_text().splitlines()]
        assert Counter(int(label) for _, label in entries) == {c: per_cat for c in range(5)}
        for rel, label in entries:
            assert (bases[split] / rel.lstrip("/")).is_file(), rel
            if version == 205:
                assert rel[0] == rel.split("/")[1][0] and not rel.startswith("/")
            elif split == "train":
                assert rel.startswith("/") and rel.split("/")[2] == cats[int(label)][0].split("/")[2]
            else:
                assert rel.startswith("Places365_val_") and rel.endswith(".jpg")


def test_writers_are_deterministic(tmp_path):
    for name, writer, kwargs in (
        ("coco", write_coco, dict(train_images=5, val_images=3)),
        ("ade", write_ade20k, dict(train_images=4, val_images=3)),
        ("inat", write_inat, dict(year=2018, num_categories=3, train_per_category=2, val_per_category=1)),
        ("places", write_places, dict(version=365, num_categories=3, train_per_category=2, val_per_category=1)),
        ("if", write_imagefolder, dict(num_classes=3, train_per_class=2, val_per_class=1)),
    ):
        a = writer(tmp_path / f"{name}-a", seed=5, **kwargs)
        b = writer(tmp_path / f"{name}-b", seed=5, **kwargs)
        c = writer(tmp_path / f"{name}-c", seed=6, **kwargs)
        meta = (".json", ".png", ".txt", ".csv")
        assert digest_tree(a, meta) == digest_tree(b, meta), name
        jpgs_a = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
        assert jpgs_a == sorted(p.relative_to(b) for p in b.rglob("*.jpg")) and jpgs_a
        for rel in jpgs_a:
            assert np.array_equal(pixels(a / rel), pixels(b / rel)), rel
        if name != "inat":  # iNat file names hash the seed
            assert any(not np.array_equal(pixels(a / rel), pixels(c / rel)) for rel in jpgs_a)


# ------------------------------------------------------------------------------------ cache


def test_ensure_toy_dataset_writes_once_then_reuses(tmp_path, monkeypatch):
    calls = []

    @functools.wraps(write_imagefolder)  # the same signature, so the same arguments name the dataset
    def counting_writer(root, **kw):
        calls.append(root)
        return write_imagefolder(root, **kw)

    root = tmp_path / "ds"
    small = dict(num_classes=2, train_per_class=3, val_per_class=1, image_size=32)
    assert ensure_toy_dataset("imagefolder", counting_writer, root=root, **small) == root.absolute()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_toy_dataset("imagefolder", counting_writer, root=root, **small) == root.absolute()
    assert len(calls) == 1
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert len(list(root.rglob("*.jpg"))) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp folder left behind
    # The same folder with other settings, or a foreign non-empty folder, is refused.
    with pytest.raises(DataError, match="other settings"):
        ensure_toy_dataset("imagefolder", write_imagefolder, root=root, **{**small, "seed": 1})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a toy dataset"):
        ensure_toy_dataset("imagefolder", write_imagefolder, root=tmp_path / "mine", **small)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # An existing empty folder (e.g. made by the user for --output) is filled.
    (tmp_path / "empty").mkdir()
    empty = tmp_path / "empty"
    assert ensure_toy_dataset("imagefolder", write_imagefolder, root=empty, **small) == empty.absolute()
    assert len(list((tmp_path / "empty").rglob("*.jpg"))) == 8


def test_ensure_toy_dataset_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MAE_TRANSFER_CACHE", str(tmp_path / "cache"))
    small = dict(train_images=3, val_images=3, image_size=32)
    ade_args = dict(kind="ade20k", writer=write_ade20k, subdir="ADEChallengeData2016")
    ade = ensure_toy_dataset(**ade_args, **small)
    assert ade.name == "ADEChallengeData2016" and ade.parent.parent == tmp_path / "cache" / "toy"
    assert ade.parent.name.startswith("ade20k-") and (ade / "objectInfo150.txt").is_file()
    assert ensure_toy_dataset(**ade_args, **small) == ade
    other = ensure_toy_dataset(**ade_args, **{**small, "seed": 3})
    assert other != ade and other.is_dir()
    # Explicit defaults name the same dataset as omitted ones.
    assert ensure_toy_dataset(**ade_args, num_categories=10, **small) == ade
    # What the dataset fixes is not given again.
    with pytest.raises(ValueError, match="fixes year"):
        ensure_toy_dataset("inat2018", write_inat, fixed={"year": 2018}, year=2019)


def test_the_specs_name_the_toy_datasets_as_before(tmp_path, monkeypatch):
    """Every task's toy dataset (its spec's ToyData) keeps its name, writer, options and sub-folder,
    so the cached copies (named by a hash of these) and their bytes stay what they were."""
    from mae_transfer.evaluation.registry import TASKS, toy_datasets

    toys = toy_datasets()
    assert list(toys) == [
        "imagefolder",
        "coco",
        "ade20k",
        "inat2017",
        "inat2018",
        "inat2019",
        "places205",
        "places365",
    ]
    expected = {
        "imagefolder": (write_imagefolder, {}, None),
        "coco": (write_coco, {}, None),
        "ade20k": (write_ade20k, {}, "ADEChallengeData2016"),
        **{f"inat{y}": (write_inat, {"year": y}, None) for y in (2017, 2018, 2019)},
        **{f"places{v}": (write_places, {"version": v}, None) for v in (205, 365)},
    }
    for name, toy_data in toys.items():
        args = toy_data.arguments()
        assert (args["kind"], args["writer"], args["fixed"], args["subdir"]) == (name, *expected[name])
    assert [n for n, t in toys.items() if t.full_size] == ["coco", "ade20k", "inat2018", "places365"]
    assert {n: s.toy_data.name for n, s in TASKS.items()}["knn"] == "imagefolder"
    # The cache folder's hash is the one the name-keyed table gave (a fixed value: not rewritten).
    monkeypatch.setenv("MAE_TRANSFER_CACHE", str(tmp_path / "cache"))
    small = dict(num_categories=2, train_per_category=1, val_per_category=1, image_size=32)
    assert ensure_toy_dataset(**toys["inat2018"].arguments(), **small).name == "inat2018-abaaf2712d7d"


def test_incomplete_folders_are_never_used(tmp_path, monkeypatch):
    monkeypatch.setenv("MAE_TRANSFER_CACHE", str(tmp_path / "cache"))
    small = dict(num_classes=2, train_per_class=2, val_per_class=1, image_size=32)
    # A crashed writer on another host left a partial temp folder: ignored, not touched.
    root = tmp_path / "ds"
    foreign = tmp_path / ".ds.tmp-otherhost-1-deadbeef"
    (foreign / "train" / "x").mkdir(parents=True)
    (foreign / "train" / "x" / "half.jpg").write_bytes(b"\xff\xd8")
    # A crashed writer on this host, whose pid is gone: cleaned up.
    import socket

    dead_pid = 2**22 + 12345
    mine = tmp_path / f".ds.tmp-{socket.gethostname().replace('-', '_')}-{dead_pid}-cafebabe"
    (mine / "train").mkdir(parents=True)
    out = ensure_toy_dataset("imagefolder", write_imagefolder, root=root, **small)
    assert len(list(out.rglob("*.jpg"))) == 6 and not list(out.rglob("half.jpg"))
    assert foreign.is_dir() and not mine.exists()

    # A cache entry without the completion marker (e.g. a half-deleted copy) is rewritten.
    first = ensure_toy_dataset("imagefolder", write_imagefolder, **small)
    (first / ".mae_transfer_toy.json").unlink()
    for p in list(first.rglob("*.jpg"))[:3]:
        p.unlink()
    again = ensure_toy_dataset("imagefolder", write_imagefolder, **small)
    assert again == first and len(list(again.rglob("*.jpg"))) == 6
    assert (again / ".mae_transfer_toy.json").is_file()


def _ensure_in_child(root: str, queue) -> None:
    queue.put(
        str(
            ensure_toy_dataset(
                "imagefolder",
                write_imagefolder,
                root=Path(root),
                num_classes=3,
                train_per_class=8,
                val_per_class=2,
                image_size=32,
            )
        )
    )


def test_two_processes_writing_at_once_agree(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(str(tmp_path / "ds"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = {queue.get(timeout=5) for _ in procs}
    assert results == {str((tmp_path / "ds").absolute())}
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    assert len(list((tmp_path / "ds").rglob("*.jpg"))) == 30


# ------------------------------------------------------------------------------------ ImageFolderDataset


def test_tiny_imagenet10_layout():
    root = shared_data() / "tiny_imagenet10"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set MAE_TRANSFER_SHARED to the folder holding data/)")
    train = ImageFolderDataset(root, split="train")
    assert len(train.classes) == 10 and len(train) == 1000
    assert train.classes == sorted(line.split("\t")[0] for line in (root / "classes.txt").read_text().splitlines())
    assert Counter(train.targets) == {i: 100 for i in range(10)}
    item = train[123]
    assert tuple(item["image"].shape) == (3, 64, 64) and item["image"].dtype == torch.uint8
    assert item["label"] == train.targets[123] and item["index"] == 123
    val = ImageFolderDataset(root, split="val")
    assert val.classes == train.classes and len(val) == 500


def _small_folder(root: Path, classes: int = 2, per_class: int = 15) -> Path:
    return write_imagefolder(
        root, num_classes=classes, train_per_class=per_class, val_per_class=1, image_size=32, seed=1
    )


def test_corrupt_images_are_skipped_counted_and_named(tmp_path, caplog):
    root = _small_folder(tmp_path / "data")
    train = root / "train"
    first, second = sorted(p for p in train.iterdir())
    victim = sorted(first.glob("*.jpg"))[4]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    (first / "zz_empty.jpg").write_bytes(b"")
    (second / "notes.jpg").write_text("this is not an image\n")
    bad = {str(victim), str(first / "zz_empty.jpg"), str(second / "notes.jpg")}

    for workers in (0, 2):
        caplog.clear()
        ds = ImageFolderDataset(root, split="train", transform=transforms.ToTensor())
        assert len(ds) == 32
        with caplog.at_level(logging.WARNING, logger="mae_transfer.data.folder"):
            batches = list(DataLoader(ds, batch_size=4, num_workers=workers))
        assert sum(len(b["label"]) for b in batches) == 32
        assert ds.num_corrupt == 3 and set(ds.corrupt_files) == bad
        indices = torch.cat([b["index"] for b in batches]).tolist()
        assert not {ds.samples[i][0] for i in indices} & bad  # replacements are readable images
        if workers == 0:  # worker processes log to their own handlers, not to caplog
            for path in bad:
                assert sum(path in r.getMessage() for r in caplog.records) == 1
        # A second epoch neither warns again nor counts twice.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mae_transfer.data.folder"):
            list(DataLoader(ds, batch_size=4, num_workers=workers))
        assert ds.num_corrupt == 3 and not caplog.records

    # The replacement is deterministic: the next readable index.
    ds = ImageFolderDataset(root, split="train")
    j = ds.samples.index((str(victim), 0))
    assert ds[j]["index"] == j + 1 and torch.equal(ds[j]["image"], ds[j + 1]["image"])


def test_too_many_corrupt_images_is_a_data_error(tmp_path):
    root = _small_folder(tmp_path / "data", classes=1, per_class=6)
    for p in sorted((root / "train").rglob("*.jpg")):
        p.write_bytes(b"garbage")
    ds = ImageFolderDataset(root, split="train")
    with pytest.raises(DataError, match="corrupt or unreadable") as err:
        ds[0]
    assert str(root / "train") in str(err.value)
    ds = ImageFolderDataset(root, split="train", max_corrupt_fraction=1.0)
    with pytest.raises(DataError, match="none of the 6 images"):
        ds[0]

    # Raised in a worker, it still reaches the caller as a DataError with a clean message.
    def error_from_workers() -> tuple[str, str | None]:
        try:
            list(DataLoader(ImageFolderDataset(root, split="train"), batch_size=2, num_workers=2))
        except DataError as e:
            # The traceback holds the DataLoader iterator in a reference cycle; left to the garbage
            # collector, its worker shutdown stalls 5 s a worker in whichever test runs next.
            e.__traceback__ = None
            return str(e), e.worker_traceback
        raise AssertionError("no DataError")

    message, worker_traceback = error_from_workers()
    assert message.startswith(("1 of the 6 images", "2 of the 6 images")) and str(root / "train") in message
    assert "Traceback" not in message and "DataError" in worker_traceback


def test_missing_and_empty_folders_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        ImageFolderDataset(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "empty" / "train" / "some_class").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images found") as err:
        ImageFolderDataset(tmp_path / "empty")
    assert str(tmp_path / "empty" / "train") in str(err.value)
    (tmp_path / "only_val" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no 'train' folder"):
        ImageFolderDataset(tmp_path / "only_val")
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="not a folder"):
        ImageFolderDataset(tmp_path / "file.jpg")


def test_layouts_and_image_modes(tmp_path):
    rgb = np.asarray(make_scene(np.random.default_rng(0), 24, 3).image)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(rgb).convert("L").save(flat / "a_gray.JPG")
    Image.fromarray(rgb).convert("CMYK").save(flat / "b_cmyk.jpeg")
    Image.fromarray(rgb).convert("RGBA").save(flat / "c_alpha.PNG")
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    pal.save(flat / "d_palette.png", transparency=0)
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(flat / "e_16bit.png")
    Image.fromarray(rgb).save(flat / "f.webp")
    Image.fromarray(rgb).save(flat / "g.bmp")
    (flat / ".hidden.jpg").write_bytes(b"")
    (flat / "skip.gif").write_bytes(b"")
    ds = ImageFolderDataset(flat, split="train")  # no train/ folder and no classes: a flat folder
    assert ds.classes == [] and len(ds) == 7 and set(ds.targets) == {0}
    for i in range(len(ds)):
        img = ds[i]["image"]
        assert tuple(img.shape) == (3, 24, 24) and img.dtype == torch.uint8
    assert ds.num_corrupt == 0
    gray16 = ds[4]["image"]
    assert abs(gray16[0].float().mean().item() - rgb[..., 0].mean()) < 1.5

    # root/<class>/* when root/<split> is missing, nested folders included, sorted scan.
    classes = tmp_path / "classes"
    for name in ("b", "a"):
        (classes / name / "deep").mkdir(parents=True)
        Image.fromarray(rgb).save(classes / name / "deep" / "x.jpg")
        Image.fromarray(rgb).save(classes / name / "y.jpg")
    ds = ImageFolderDataset(classes, split="train")
    assert ds.classes == ["a", "b"] and ds.targets == [0, 0, 1, 1]
    assert [Path(p).relative_to(classes).as_posix() for p, _ in ds.samples] == [
        "a/deep/x.jpg",
        "a/y.jpg",
        "b/deep/x.jpg",
        "b/y.jpg",
    ]
    assert ImageFolderDataset(classes, split=None).samples == ds.samples


class _OtherRngs:
    """Draws from Python's and numpy's global RNGs too, as timm's augmentations do."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * (0.5 + random.random()) + float(np.random.rand())


def _random_pipeline():
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(16, scale=(0.2, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            _OtherRngs(),
        ]
    )


def test_per_sample_randomness_is_reproducible(tmp_path):
    root = _small_folder(tmp_path / "data", classes=2, per_class=6)

    def make():
        return ImageFolderDataset(
            root, split="train", transform=_random_pipeline(), seed=3, extra_noise=("noise", (10,))
        )

    ds = make()
    ds.set_epoch(2)
    alone = [ds[i] for i in range(len(ds))]
    torch.manual_seed(999)  # the global RNG states must not matter
    random.seed(999)
    np.random.seed(999)
    reordered = {i: ds[i] for i in reversed(range(len(ds)))}
    fresh = make()
    fresh.set_epoch(2)
    loader = DataLoader(fresh, batch_size=5, num_workers=2, shuffle=False)
    batched = [b for b in loader]
    images = torch.cat([b["image"] for b in batched])
    noise = torch.cat([b["noise"] for b in batched])
    for i, item in enumerate(alone):
        assert item["noise"].shape == (10,)
        assert torch.equal(item["image"], reordered[i]["image"]) and torch.equal(item["noise"], reordered[i]["noise"])
        assert torch.equal(item["image"], images[i]) and torch.equal(item["noise"], noise[i])
    # Different samples and different epochs draw differently; the global RNG is left alone.
    assert not torch.equal(alone[0]["noise"], alone[1]["noise"])
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    ds.set_epoch(3)
    later = [ds[i] for i in range(len(ds))]
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert all(not torch.equal(a["noise"], b["noise"]) for a, b in zip(alone, later))
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(alone, later))
    # Without a seed the global RNG drives the transform.
    unseeded = ImageFolderDataset(root, split="train", transform=_random_pipeline(), extra_noise=("noise", (10,)))
    torch.manual_seed(0)
    x = unseeded[0]
    torch.manual_seed(0)
    assert torch.equal(unseeded[0]["noise"], x["noise"])
