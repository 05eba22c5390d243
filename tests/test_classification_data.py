"""Classification datasets: iNaturalist, Places205/365 and ImageFolder readers on the official layouts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import shared_root
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from mae_transfer.classification.datasets import (
    DATASET_KINDS,
    LabeledImageList,
    build_dataset,
    image_folder,
    inaturalist,
    num_classes_of,
    places205,
    places365,
)
from mae_transfer.data import DataError, ImageFolderDataset
from mae_transfer.data.toy import (
    imagefolder_class_names,
    places_category_names,
    write_imagefolder,
    write_inat,
    write_places,
)

NUM_CATS = 3  # iNat writes one more, val-only, category
TRAIN_PER, VAL_PER = 2, 2
SIZE = 24
TF = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])


def shared_data() -> Path:
    """``../shared/data`` beside the checkout, or ``$MAE_TRANSFER_SHARED/data``."""
    return shared_root() / "data"


def write_kind(kind: str, root: Path) -> Path:
    """Write a tiny toy dataset of ``kind`` into ``root`` with the official writers."""
    sizes = dict(train_per_category=TRAIN_PER, val_per_category=VAL_PER, image_size=SIZE)
    if kind.startswith("inat"):
        return write_inat(root, int(kind[4:]), num_categories=NUM_CATS, **sizes)
    if kind.startswith("places"):
        return write_places(root, int(kind[6:]), num_categories=NUM_CATS, **sizes)
    return write_imagefolder(
        root, num_classes=NUM_CATS, train_per_class=TRAIN_PER, val_per_class=VAL_PER, image_size=SIZE
    )


def listed(kind: str, root: Path, split: str) -> list[tuple[str, int]]:
    """(relative path, label) as the annotation files give them, read independently of the readers."""
    if kind.startswith("inat"):
        data = json.loads((root / f"{split}{kind[4:]}.json").read_text())
        cat_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        return [(im["file_name"], cat_of[im["id"]]) for im in data["images"]]
    if kind == "places205":
        lines = (root / "trainvalsplit_places205" / f"{split}_places205.csv").read_text().split("\n")
    elif kind == "places365":
        name = "places365_train_standard.txt" if split == "train" else "places365_val.txt"
        lines = (root / name).read_text().split("\n")
    else:
        return [
            (p.relative_to(root / split).as_posix(), imagefolder_class_names(NUM_CATS).index(p.parent.name))
            for p in sorted((root / split).rglob("*.jpg"))
        ]
    return [(line.split()[0], int(line.split()[1])) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def toy_roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("classification_toy")
    return {kind: write_kind(kind, base / kind) for kind in DATASET_KINDS}


# ------------------------------------------------------------------------------------ every kind


@pytest.mark.parametrize("kind", DATASET_KINDS)
def test_every_kind_reads_train_and_val(kind, toy_roots):
    root = toy_roots[kind]
    train = build_dataset(kind, str(root), "train", transform=TF)
    val = build_dataset(kind, str(root), "val", transform=TF)
    for split, ds in (("train", train), ("val", val)):
        expected = listed(kind, root, split)
        assert isinstance(ds, LabeledImageList)
        assert len(ds) == len(expected) > 0
        assert ds.num_missing == 0 and ds.num_corrupt == 0
        assert num_classes_of(ds) == ds.num_classes == len(ds.classes)
        assert all(0 <= t < ds.num_classes for t in ds.targets)
        for i in range(len(ds)):
            item = ds[i]
            assert set(item) == {"image", "label", "index"}
            assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
            assert item["label"] == ds.targets[i] and item["index"] == i
        # Every file of the annotation, in its order, with the annotated class.
        for (path, label), (rel, raw) in zip(ds.samples, expected):
            assert Path(path).as_posix().endswith(rel.lstrip("/"))
            assert Path(path).is_file()
            # Toy iNat ids are 0..N, so the sorted-id position is the id itself.
            assert label == raw
    assert train.classes == val.classes
    if kind.startswith("inat"):
        data = json.loads((root / f"val{kind[4:]}.json").read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        assert train.classes == [names[i] for i in sorted(names)]
        assert train.num_classes == NUM_CATS + 1
    elif kind.startswith("places"):
        assert train.classes == places_category_names(NUM_CATS)
    else:
        assert train.classes == imagefolder_class_names(NUM_CATS)
    # Labels agree with class names through the folder names where the layout encodes the class.
    if kind in ("places205", "places365", "imagefolder"):
        for path, label in train.samples:
            folder = Path(path).parent.as_posix()
            assert folder.endswith(train.classes[label])


def test_untransformed_item_is_uint8_chw(toy_roots):
    ds = build_dataset("places365", toy_roots["places365"], "val")
    img = ds[0]["image"]
    assert img.dtype == torch.uint8 and img.shape == (3, SIZE, SIZE)


@pytest.mark.parametrize("year", [2017, 2018, 2019])
def test_inat_val_only_category_and_folder_layouts(year, toy_roots):
    root = toy_roots[f"inat{year}"]
    train = inaturalist(root, year, "train")
    val = inaturalist(root, year, "val")
    assert train.num_classes == val.num_classes == NUM_CATS + 1
    val_only = set(val.targets) - set(train.targets)
    assert len(val_only) == 1
    (k,) = val_only
    assert k < val.num_classes and k == NUM_CATS  # the largest toy category id sorts last
    assert val.targets.count(k) == VAL_PER
    # Label = position of the category id in the sorted union, so here the id itself.
    for ds, split in ((train, "train"), (val, "val")):
        data = json.loads((root / f"{split}{year}.json").read_text())
        assert ds.targets == [a["category_id"] for a in data["annotations"]]
    top = {2017: "train_val_images", 2018: "train_val2018", 2019: "train_val2019"}[year]
    for path, label in train.samples + val.samples:
        rel = Path(path).relative_to(root)
        assert rel.parts[0] == top
        if year == 2017:
            assert rel.parts[2] == val.classes[label]  # 2017 folders are category names
        else:
            assert rel.parts[2] == str(label)  # 2018/2019 folders are category ids


def test_inat_label_policy_sorts_non_contiguous_ids(tmp_path):
    # Remap the toy ids to large non-contiguous ones whose order differs from the json order.
    root = write_kind("inat2018", tmp_path)
    new_id = {0: 500, 1: 20, 2: 7, 3: 1000}  # 3 = the val-only category
    for split in ("train", "val"):
        p = root / f"{split}2018.json"
        data = json.loads(p.read_text())
        for c in data["categories"]:
            c["id"] = new_id[c["id"]]
        for a in data["annotations"]:
            a["category_id"] = new_id[a["category_id"]]
        if split == "train":  # a train file that does not list the val-only category at all
            data["categories"] = [c for c in data["categories"] if c["id"] != 1000]
        p.write_text(json.dumps(data))
    train = inaturalist(root, 2018, "train")
    val = inaturalist(root, 2018, "val")
    order = sorted(new_id.values())
    assert train.num_classes == val.num_classes == 4
    assert train.classes == val.classes
    data = json.loads((root / "val2018.json").read_text())
    assert val.targets == [order.index(a["category_id"]) for a in data["annotations"]]
    assert val.classes[order.index(1000)] == next(c["name"] for c in data["categories"] if c["id"] == 1000)


def test_inat_unannotated_images_are_skipped(tmp_path, caplog):
    root = write_kind("inat2019", tmp_path)
    p = root / "train2019.json"
    data = json.loads(p.read_text())
    data["annotations"] = data["annotations"][1:]
    p.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        ds = inaturalist(root, 2019, "train")
    assert len(ds) == len(data["images"]) - 1
    assert "1 of the" in caplog.text and "no annotation" in caplog.text


# ------------------------------------------------------------------------------------ missing files


def test_inat_missing_image_error_and_skip(tmp_path, caplog):
    root = write_kind("inat2018", tmp_path)
    data = json.loads((root / "val2018.json").read_text())
    gone = data["images"][3]["file_name"]
    (root / gone).unlink()
    with pytest.raises(DataError) as err:
        inaturalist(root, 2018, "val", missing="error")
    msg = str(err.value)
    assert gone in msg and "val2018.json" in msg and "--missing skip" in msg and "1 of the" in msg
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("inat2018", root, "val", missing="skip", transform=TF)
    assert ds.num_missing == 1 and ds.missing_files == [gone]
    assert len(ds) == len(data["images"]) - 1
    assert not any(p.endswith(gone) for p, _ in ds.samples)
    assert ds.num_classes == NUM_CATS + 1
    assert gone in caplog.text
    assert all(ds[i]["image"].shape == (3, 16, 16) for i in range(len(ds)))
    # The other split is untouched.
    assert inaturalist(root, 2018, "train").num_missing == 0


def test_images_folder_absent_is_reported(tmp_path):
    root = write_kind("inat2017", tmp_path)
    shutil.rmtree(root / "train_val_images")
    with pytest.raises(DataError, match="train_val_images does not exist"):
        inaturalist(root, 2017, "train", missing="skip")  # nothing left to skip to


def test_places_image_folder_missing(tmp_path):
    root = write_kind("places365", tmp_path)
    shutil.rmtree(root / "val_256")
    with pytest.raises(DataError, match="val_256"):
        places365(root, "val")
    assert len(places365(root, "train")) == NUM_CATS * TRAIN_PER


def test_places365_large_folders_are_detected(tmp_path):
    root = write_kind("places365", tmp_path)
    (root / "data_256").rename(root / "data_large")
    (root / "val_256").rename(root / "val_large")
    train, val = places365(root, "train"), places365(root, "val")
    assert train.root.name == "data_large" and val.root.name == "val_large"
    assert len(train) == NUM_CATS * TRAIN_PER and len(val) == NUM_CATS * VAL_PER


@pytest.mark.parametrize("folder", ["data_256", "data_256_standard", "data_large_standard"])
def test_places365_train_folder_of_the_official_archive_and_of_torchvision(tmp_path, folder):
    """train_256_places365standard.tar extracts to data_256/ (the toy data uses it too); only
    torchvision's downloader renames it data_256_standard/."""
    root = write_kind("places365", tmp_path)
    assert (root / "data_256").is_dir()
    if folder != "data_256":
        (root / "data_256").rename(root / folder)
    train = places365(root, "train")
    assert train.root.name == folder and len(train) == NUM_CATS * TRAIN_PER


# ------------------------------------------------------------------------------------ malformed input


def test_inat_annotation_with_unknown_image_id(tmp_path):
    root = write_kind("inat2017", tmp_path)
    p = root / "val2017.json"
    data = json.loads(p.read_text())
    data["annotations"][2]["image_id"] = 987654
    p.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        inaturalist(root, 2017, "val")
    msg = str(err.value)
    assert str(p) in msg and "annotations[2]" in msg and "987654" in msg


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: d.pop("categories"), "no 'categories' list"),
        (lambda d: d["annotations"][0].pop("category_id"), "annotations[0] has no 'category_id'"),
        (lambda d: d["annotations"][1].update(category_id=4242), "category id 4242"),
        (lambda d: d["images"][0].pop("file_name"), "images[0] has no 'file_name'"),
    ],
)
def test_inat_malformed_json(tmp_path, edit, problem):
    root = write_kind("inat2019", tmp_path)
    p = root / "train2019.json"
    data = json.loads(p.read_text())
    edit(data)
    p.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        inaturalist(root, 2019, "train")
    assert str(p) in str(err.value) and problem in str(err.value)


def test_inat_truncated_json_and_missing_files(tmp_path):
    root = write_kind("inat2018", tmp_path)
    p = root / "train2018.json"
    p.write_text(p.read_text()[:100])
    with pytest.raises(DataError, match=r"train2018\.json is not valid JSON \(line 1"):
        inaturalist(root, 2018, "train")
    p.unlink()
    with pytest.raises(DataError, match=r"train2018\.json not found.*train2018\.json\.tar\.gz"):
        inaturalist(root, 2018, "train")
    with pytest.raises(DataError, match="does not exist"):
        inaturalist(tmp_path / "nowhere", 2018, "train")


def test_places205_line_without_label(tmp_path):
    root = write_kind("places205", tmp_path)
    p = root / "trainvalsplit_places205" / "val_places205.csv"
    lines = p.read_text().splitlines()
    lines[3] = lines[3].split()[0]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        places205(root, "val")
    msg = str(err.value)
    assert str(p) in msg and "line 4" in msg
    # The train split needs val's labels only for the class count: the bad line still stops it.
    with pytest.raises(DataError, match="line 4"):
        places205(root, "train")


def test_places365_bad_lines_and_missing_lists(tmp_path):
    root = write_kind("places365", tmp_path)
    p = root / "places365_val.txt"
    lines = p.read_text().splitlines()
    lines[1] = lines[1].split()[0] + " seven"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"places365_val\.txt, line 2"):
        places365(root, "val")
    (root / "categories_places365.txt").unlink()
    with pytest.raises(DataError, match=r"categories_places365\.txt not found"):
        places365(root, "train")


def test_places365_label_out_of_range(tmp_path):
    root = write_kind("places365", tmp_path)
    p = root / "places365_train_standard.txt"
    p.write_text(p.read_text().replace(" 2\n", " 9\n", 1))
    with pytest.raises(DataError, match=r"label 9 .*places365_train_standard\.txt"):
        places365(root, "train")


def test_places205_class_count_covers_both_lists(tmp_path):
    root = write_kind("places205", tmp_path)
    lists = root / "trainvalsplit_places205"
    # Drop the last class from train: the val list still gives its index and name.
    train_lines = [
        ln for ln in (lists / "train_places205.csv").read_text().splitlines() if not ln.endswith(f" {NUM_CATS - 1}")
    ]
    (lists / "train_places205.csv").write_text("\n".join(train_lines) + "\n")
    train = places205(root, "train")
    assert train.num_classes == NUM_CATS and NUM_CATS - 1 not in train.targets
    assert train.classes == places_category_names(NUM_CATS)


# ------------------------------------------------------------------------------------ ImageFolder


def test_imagefolder_val_missing_class_keeps_train_mapping(tmp_path):
    root = write_kind("imagefolder", tmp_path)
    names = imagefolder_class_names(NUM_CATS)
    shutil.rmtree(root / "val" / names[0])
    train, val = image_folder(root, "train"), image_folder(root, "val")
    assert val.classes == train.classes == names
    assert val.num_classes == NUM_CATS
    assert sorted(set(val.targets)) == [1, 2]
    for path, label in val.samples:
        assert Path(path).parent.name == train.classes[label]
    # ImageFolderDataset alone would index val by its own folders, shifting every label.
    assert ImageFolderDataset(root, "val").targets != val.targets


def test_imagefolder_extra_val_class(tmp_path):
    root = write_kind("imagefolder", tmp_path)
    (root / "val" / "00_aaa_empty").mkdir()
    val = image_folder(root, "val")  # an empty extra folder is harmless
    assert val.classes == imagefolder_class_names(NUM_CATS) and len(val) == NUM_CATS * VAL_PER
    shutil.copy(next((root / "val" / val.classes[0]).iterdir()), root / "val" / "00_aaa_empty" / "x.jpg")
    with pytest.raises(DataError) as err:
        image_folder(root, "val")
    assert "00_aaa_empty" in str(err.value) and "train" in str(err.value)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("imagefolder", tmp_path / "absent", "train")
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    shutil.copy(next((write_kind("imagefolder", tmp_path / "src") / "train").rglob("*.jpg")), flat / "a.jpg")
    with pytest.raises(DataError, match="no class folders"):
        image_folder(tmp_path / "flat", "train")


# ------------------------------------------------------------------------------------ shared machinery


def test_seeded_transforms_and_epochs(toy_roots):
    tf = transforms.Compose([transforms.RandomResizedCrop(12), transforms.ToTensor()])
    a = build_dataset("inat2018", toy_roots["inat2018"], "train", transform=tf, seed=3)
    b = build_dataset("inat2018", toy_roots["inat2018"], "train", transform=tf, seed=3)
    assert torch.equal(a[1]["image"], b[1]["image"])
    first = a[1]["image"]
    a.set_epoch(1)
    assert not torch.equal(a[1]["image"], first)
    b.set_epoch(1)
    loaded = next(iter(DataLoader(b, batch_size=len(b), num_workers=0)))
    assert torch.equal(loaded["image"][1], a[1]["image"])
    assert loaded["label"].tolist() == a.targets


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    root = write_kind("places365", tmp_path)
    ds = places365(root, "val", transform=TF, max_corrupt_fraction=0.5)
    bad = Path(ds.samples[0][0])
    bad.write_bytes(b"not a jpeg")
    item = ds[0]
    assert item["index"] == 1 and item["label"] == ds.targets[1]
    assert ds.num_corrupt == 1 and ds.corrupt_files == [str(bad)]


def test_build_dataset_rejects_unknown_kind_and_split(toy_roots):
    with pytest.raises(DataError, match="inat2018"):
        build_dataset("inat2020", toy_roots["inat2018"], "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset("inat2018", toy_roots["inat2018"], "test")
    with pytest.raises(ValueError, match="missing"):
        build_dataset("inat2018", toy_roots["inat2018"], "train", missing="ignore")


def test_build_dataset_without_root_uses_toy_data(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MAE_TRANSFER_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("places365", None, "val")
    assert "TOY places365" in caplog.text
    assert str(tmp_path / "cache") in str(ds.root)
    assert len(ds) > 0 and ds.num_classes == len(ds.classes)


def test_num_classes_of_wrappers(toy_roots):
    ds = build_dataset("imagefolder", toy_roots["imagefolder"], "val")
    assert num_classes_of(Subset(ds, [0, 1])) == NUM_CATS
    assert num_classes_of(ImageFolderDataset(toy_roots["imagefolder"], "val")) == NUM_CATS

    class Plain(torch.utils.data.Dataset):
        targets = [0, 4, 2]

    assert num_classes_of(Plain()) == 5
    with pytest.raises(TypeError):
        num_classes_of(torch.utils.data.TensorDataset(torch.zeros(2)))


# ------------------------------------------------------------------------------------ real data


def test_real_tiny_imagenet10():
    root = shared_data() / "tiny_imagenet10"
    if not (root / "train").is_dir():
        pytest.skip(f"{root} not found (set MAE_TRANSFER_SHARED)")
    train = build_dataset("imagefolder", str(root), "train")
    val = build_dataset("imagefolder", str(root), "val", transform=TF)
    assert train.num_classes == val.num_classes == 10 and train.classes == val.classes
    assert len(train) == 1000 and len(val) == 500
    assert sorted(set(train.targets)) == list(range(10)) and sorted(set(val.targets)) == list(range(10))
    for path, label in val.samples[::50]:
        assert Path(path).parent.name == train.classes[label]
    assert train[0]["image"].shape == (3, 64, 64)
    assert val[499]["image"].shape == (3, 16, 16)
