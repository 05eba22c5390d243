"""ADE20K data layer: reading the layout, label encoding, bad-input errors, class names, palette and the
mmsegmentation-style training / evaluation transforms."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mae_transfer.data.errors import DataError
from mae_transfer.data.seeded import SeededTransformDataset
from mae_transfer.data.stats import IMAGENET_MEAN, IMAGENET_STD
from mae_transfer.data.toy import write_ade20k
from mae_transfer.segmentation.ade20k import (
    ADE_FOLDER,
    IGNORE_INDEX,
    NUM_CLASSES,
    EvalTransform,
    SegmentationFolder,
    TrainTransform,
    class_names_for,
    collate_eval,
    find_root,
    keep_ratio_size,
    palette,
    photometric_distortion,
    read_class_names,
    resize_image,
    resize_label,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalised(image: torch.Tensor) -> torch.Tensor:
    return (image.float() / 255 - MEAN) / STD


@pytest.fixture(scope="module")
def toy_parent(tmp_path_factory) -> Path:
    """Small toy ADE20K (4 training + 4 validation images, 48 px): ``<parent>/ADEChallengeData2016``."""
    root = tmp_path_factory.mktemp("ade_toy")
    write_ade20k(root, train_images=4, val_images=4, image_size=48)
    return root


@pytest.fixture
def toy(toy_parent, tmp_path) -> Path:
    """A private, writable copy of the toy ``ADEChallengeData2016`` folder."""
    dst = tmp_path / "copy" / ADE_FOLDER
    shutil.copytree(toy_parent / ADE_FOLDER, dst)
    return dst


@pytest.fixture
def sample(shared) -> Path:
    root = shared / "data" / "ade20k_sample"
    if not (root / "images").is_dir():
        pytest.skip(f"ADE20K sample not found at {root}")
    return root


def write_pair(root: Path, split: str, stem: str, image: np.ndarray, label: np.ndarray, ext: str = ".png") -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{stem}{ext}")
    Image.fromarray(label, "L").save(root / "annotations" / split / f"{stem}.png")


# ---------------------------------------------------------------------------------------- reading


def test_real_sample_gives_uint8_images_and_reduce_zero_label_labels(sample):
    ds = SegmentationFolder(sample)
    assert ds.root == sample and len(ds) == 3
    assert [Path(p).name for p, _ in ds.samples] == [
        "ADE_val_00000001.jpg",
        "ADE_val_00000002.jpg",
        "ADE_val_00000003.jpg",
    ]
    assert len(ds.class_names) == NUM_CLASSES and ds.class_names[:4] == ["wall", "building", "sky", "floor"]
    assert ds.class_names[-1] == "flag"
    for i, (image_path, label_path) in enumerate(ds.samples):
        image, target = ds[i]
        raw = np.asarray(Image.open(label_path)).astype(np.int64)
        label = target["label"]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *raw.shape)
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(Image.open(image_path).convert("RGB"))))
        assert label.dtype == torch.int64 and tuple(label.shape) == raw.shape
        label = label.numpy()
        assert set(np.unique(label).tolist()) <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}
        assert np.array_equal(label == IGNORE_INDEX, raw == 0)  # 0 ("other") and only 0 becomes 255
        assert np.array_equal(label[raw > 0], raw[raw > 0] - 1)  # k -> k - 1
        assert target["orig_size"].tolist() == list(raw.shape)
        assert target["index"] == i and target["path"] == image_path
    assert ds.num_missing == 0 and ds.num_bad_label_pixels == 0


def test_find_root_accepts_the_toy_wrapper_folder_and_its_parent(toy_parent, tmp_path):
    inner = toy_parent / ADE_FOLDER
    assert find_root(toy_parent) == inner
    assert find_root(inner) == inner
    assert len(SegmentationFolder(toy_parent)) == len(SegmentationFolder(inner)) == 4
    assert len(SegmentationFolder(toy_parent, "training")) == 4
    with pytest.raises(DataError, match="images/"):
        find_root(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        find_root(tmp_path / "nope")


def test_find_root_accepts_the_sample_without_wrapper(sample):
    assert find_root(sample) == sample
    assert not (sample / ADE_FOLDER).exists()


def test_missing_label_map_is_one_error_or_skipped_with_a_count(toy, caplog):
    (toy / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(DataError, match="ADE_val_00000002.png") as err:
        SegmentationFolder(toy)
    assert "1 of 4" in str(err.value) and "--missing skip" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="mae_transfer.segmentation.ade20k"):
        ds = SegmentationFolder(toy, missing="skip")
    assert len(ds) == 3 and ds.num_missing == 1
    assert all("ADE_val_00000002" not in p for p, _ in ds.samples)
    assert sum("no label map" in r.getMessage() for r in caplog.records) == 1
    ds[1]  # the remaining pairs read fine


def test_no_images_missing_split_and_missing_annotation_folder_are_data_errors(toy, tmp_path):
    with pytest.raises(DataError, match="testing") as err:
        SegmentationFolder(toy, "testing")
    assert "training, validation" in str(err.value)  # the splits that do exist
    empty = tmp_path / "empty"
    (empty / "images" / "validation").mkdir(parents=True)
    (empty / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        SegmentationFolder(empty)
    shutil.rmtree(toy / "annotations" / "training")
    with pytest.raises(DataError, match="does not exist") as err:
        SegmentationFolder(toy, "training")
    assert "4 of 4" in str(err.value)


def test_out_of_range_labels_raise_naming_the_file_or_are_ignored_and_counted(toy, caplog):
    path = toy / "annotations" / "validation" / "ADE_val_00000001.png"
    raw = np.asarray(Image.open(path)).copy()
    raw[:5, :7] = 200
    Image.fromarray(raw, "L").save(path)
    ds = SegmentationFolder(toy)  # labels are checked when read, not when the dataset is built
    with pytest.raises(DataError, match="ADE_val_00000001.png") as err:
        ds[0]
    message = str(err.value)
    assert "200" in message and "1..150" in message and "--bad-labels ignore" in message
    ds[1]  # other files are fine
    with caplog.at_level(logging.WARNING, logger="mae_transfer.segmentation.ade20k"):
        ds = SegmentationFolder(toy, bad_labels="ignore")
        _, target = ds[0]
        ds[0]  # read again (next epoch): neither counted nor warned twice
    label = target["label"].numpy()
    assert (label[:5, :7] == IGNORE_INDEX).all()
    rest = np.ones_like(raw, dtype=bool)
    rest[:5, :7] = False
    expected = np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int64) - 1)
    assert np.array_equal(label[rest], expected[rest])
    assert ds.num_bad_label_pixels == 35 and ds.bad_label_files == {str(path)}
    assert sum("outside" in r.getMessage() for r in caplog.records) == 1


def test_user_data_without_reduce_zero_label_keeps_labels_and_generic_names(tmp_path):
    root = tmp_path / "mine"
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (10, 12)).astype(np.uint8)
    label[0, :4] = 255
    write_pair(root, "training", "a", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), label)
    ds = SegmentationFolder(root, "training", num_classes=3, reduce_zero_label=False)
    assert ds.class_names == ["class_0", "class_1", "class_2"]
    assert np.array_equal(ds[0][1]["label"].numpy(), label.astype(np.int64))
    label[5, 5] = 3
    Image.fromarray(label, "L").save(root / "annotations" / "training" / "a.png")
    with pytest.raises(DataError, match=r"a\.png.*\b3\b.*0\.\.2"):
        ds[0]
    with pytest.raises(DataError, match="within 1..254"):
        SegmentationFolder(root, "training", num_classes=255)  # 255 is "ignore", so at most 254 classes 1..254
    assert len(SegmentationFolder(root, "training", num_classes=255, reduce_zero_label=False)) == 1


def test_grayscale_and_cmyk_jpegs_give_three_channels(toy):
    folder = toy / "images" / "validation"
    for name, mode in (("ADE_val_00000001.jpg", "L"), ("ADE_val_00000002.jpg", "CMYK")):
        rgb = Image.open(folder / name).convert("RGB")
        rgb.convert(mode).save(folder / name, quality=95)
    ds = SegmentationFolder(toy)
    gray, target = ds[0]
    assert gray.shape[0] == 3 and tuple(gray.shape[1:]) == tuple(target["label"].shape)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    cmyk, target = ds[1]
    assert cmyk.shape[0] == 3 and tuple(cmyk.shape[1:]) == tuple(target["label"].shape)


def test_label_map_of_another_size_is_a_data_error_naming_both_files(toy):
    path = toy / "annotations" / "validation" / "ADE_val_00000003.png"
    small = Image.open(path).resize((20, 10), Image.NEAREST)
    small.save(path)
    with pytest.raises(DataError, match="ADE_val_00000003.png.*20x10.*ADE_val_00000003.jpg"):
        SegmentationFolder(toy)[2]


def test_palette_label_maps_use_their_indices_and_rgb_label_maps_are_rejected(toy):
    folder = toy / "annotations" / "validation"
    expected = SegmentationFolder(toy)[0][1]["label"]
    as_l = Image.open(folder / "ADE_val_00000001.png")
    as_p = as_l.convert("P")
    as_p.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))  # colours unrelated to the indices
    as_p.frombytes(as_l.tobytes())
    as_p.save(folder / "ADE_val_00000001.png")
    assert Image.open(folder / "ADE_val_00000001.png").mode == "P"
    assert torch.equal(SegmentationFolder(toy)[0][1]["label"], expected)
    as_l.convert("RGB").save(folder / "ADE_val_00000001.png")
    with pytest.raises(DataError, match="ADE_val_00000001.png.*single-channel"):
        SegmentationFolder(toy)[0]


# ---------------------------------------------------------------------------------------- names, palette


def test_class_tables_txt_and_csv(sample):
    txt = read_class_names(sample / "objectInfo150.txt")
    csv = read_class_names(sample / "objectInfo150.csv")
    assert len(txt) == len(csv) == NUM_CLASSES
    assert txt[:4] == ["wall", "building", "sky", "floor"] and csv[:4] == txt[:4]
    assert txt[44] == "chest of drawers" and csv[44] == "chest"  # the csv writes spaces as ';' too
    assert all(c == t or c == t.split()[0] for c, t in zip(csv, txt))
    assert class_names_for(sample, NUM_CLASSES) == txt
    assert class_names_for(sample, 19) == [f"class_{k}" for k in range(19)]


def test_malformed_class_tables_are_data_errors_and_names_fall_back(tmp_path, toy):
    cases = {
        "no_header.txt": "1\t0.1\t1\t1\twall\n",
        "bad_index.txt": "Idx\tRatio\tTrain\tVal\tName\none\t0.1\t1\t1\twall\n",
        "gap.txt": "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n3\t0.1\t1\t1\tsky\n",
        "short.csv": "Idx,Ratio,Train,Val,Stuff,Name\n1,0.1,1,1\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=name):
            read_class_names(tmp_path / name)
    (tmp_path / "spaces.txt").write_text("Idx Ratio Train Val Name\n1 0.1 1 1 street lamp, lamp\n2 0.1 1 1 sky\n")
    assert read_class_names(tmp_path / "spaces.txt") == ["street lamp", "sky"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.5\t1\t1\troad, route\n2\t0.5\t1\t1\tcar\n"
    )
    assert class_names_for(user, 2) == ["road", "car"]
    assert class_names_for(user, 3) == ["class_0", "class_1", "class_2"]
    (user / "objectInfo150.txt").write_text("garbage")
    assert class_names_for(user, 2) == ["class_0", "class_1"]
    # The dataset looks beside images/ and in the folder above it.
    assert SegmentationFolder(toy).class_names[:2] == ["wall", "building"]
    shutil.move(str(toy / "objectInfo150.txt"), str(toy.parent / "objectInfo150.txt"))
    assert SegmentationFolder(toy).class_names[:2] == ["wall", "building"]
    (toy.parent / "objectInfo150.txt").unlink()
    assert SegmentationFolder(toy).class_names[:2] == ["class_0", "class_1"]


def test_palette_is_mmsegmentations_ade20k_table_and_generated_otherwise():
    colours = palette()
    assert colours.shape == (150, 3) and colours.dtype == np.uint8
    assert colours[0].tolist() == [120, 120, 120] and colours[1].tolist() == [180, 120, 120]
    assert colours[55].tolist() == [0, 0, 255] and colours[149].tolist() == [92, 0, 255]
    # Guards the table against accidental edits (sha256 of the 450 bytes as transcribed from mmseg).
    assert (
        hashlib.sha256(colours.tobytes()).hexdigest()
        == "ce475c9151035eff51f4cf27fd7d906959b1480f6d15b9423ae2417c1b23a0ed"
    )
    colours[0] = 0
    assert palette()[0].tolist() == [120, 120, 120]  # a fresh copy each call
    small = palette(19)
    assert small.shape == (19, 3) and small.dtype == np.uint8
    assert np.array_equal(small, palette(19))
    assert len({tuple(c) for c in small.tolist()}) == 19 and small.max(1).min() > 100  # distinct, none dark
    assert palette(0).shape == (0, 3)


# ---------------------------------------------------------------------------------------- transforms


def test_keep_ratio_size_follows_mmcv_rescale():
    # 683 x 512 (W x H): factor = min(2048 / 683, 512 / 512) = 1.0 -> unchanged.
    assert keep_ratio_size(512, 683, (2048, 512)) == (512, 683)
    # 300 x 200: factor = min(2048 / 300, 512 / 200) = 2.56 -> 768 x 512.
    assert keep_ratio_size(200, 300, (2048, 512)) == (512, 768)
    assert keep_ratio_size(200, 300, (512, 2048)) == (512, 768)  # edge order does not matter
    # 4000 x 500 panorama: the long side binds, factor = min(2048 / 4000, 512 / 500) = 0.512 -> 2048 x 256.
    assert keep_ratio_size(500, 4000, (2048, 512)) == (256, 2048)
    # ratio 0.25 of (2048, 512) = (512, 128): factor = min(512 / 683, 128 / 512) = 0.25 -> 171 x 128 (170.75 rounds up).
    assert keep_ratio_size(512, 683, (512, 128)) == (128, 171)


def test_resize_helpers_keep_dtypes_and_label_values():
    label = torch.tensor([[0, 1], [2, 255]])
    assert torch.equal(resize_label(label, (4, 4)), label.repeat_interleave(2, 0).repeat_interleave(2, 1))
    image = torch.full((3, 5, 7), 77, dtype=torch.uint8)
    out = resize_image(image, (11, 3))
    assert out.dtype == torch.uint8 and out.shape == (3, 11, 3) and bool((out == 77).all())


def test_train_transform_resize_rule_matches_mmcv():
    aug = TrainTransform(crop_size=1024, ratio_range=(1.0, 1.0), cat_max_ratio=1.0, flip_prob=0.0, photometric=False)
    for (h, w), expected in (((200, 300), (512, 768)), ((512, 683), (512, 683))):
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        _, target = aug(image, {"label": torch.ones(h, w, dtype=torch.int64)})
        labelled = (target["label"] != IGNORE_INDEX).nonzero()
        assert tuple((labelled.max(0).values + 1).tolist()) == expected
        assert bool((target["label"][: expected[0], : expected[1]] == 1).all())


def test_train_transform_on_the_real_sample_gives_512_crops(sample):
    ds = SegmentationFolder(sample, transform=TrainTransform())
    for seed in range(3):
        torch.manual_seed(seed)
        image, target = ds[seed]
        assert image.shape == (3, 512, 512) and image.dtype == torch.float32 and bool(torch.isfinite(image).all())
        assert target["label"].shape == (512, 512) and target["label"].dtype == torch.int64
        values = set(target["label"].unique().tolist())
        assert values <= set(range(NUM_CLASSES)) | {IGNORE_INDEX} and len(values - {IGNORE_INDEX}) >= 1


def test_train_transform_pads_label_with_ignore_and_image_with_zero(sample):
    image, target = SegmentationFolder(sample)[0]  # 683 x 512
    aug = TrainTransform(ratio_range=(0.25, 0.25), flip_prob=0.0, photometric=False)
    out, new = aug(image, target)
    h, w = 128, 171  # keep_ratio_size(512, 683, (512, 128)), smaller than the 512 crop: kept whole
    label = new["label"]
    assert label.shape == (512, 512) and out.shape == (3, 512, 512)
    assert bool((label[h:, :] == IGNORE_INDEX).all()) and bool((label[:, w:] == IGNORE_INDEX).all())
    assert bool((out[:, h:, :] == 0).all()) and bool((out[:, :, w:] == 0).all())
    assert torch.equal(label[:h, :w], resize_label(target["label"], (h, w)))
    assert torch.allclose(out[:, :h, :w], normalised(resize_image(image, (h, w))), atol=1e-6)
    assert torch.equal(new["orig_size"], target["orig_size"]) and new["path"] == target["path"]
    assert target["label"].shape == (512, 683)  # the input target is not modified


def test_flip_only_configuration_mirrors_image_and_label(toy):
    image, target = SegmentationFolder(toy)[0]
    _, h, w = image.shape
    aug = TrainTransform(
        crop_size=64, scale=(max(h, w), min(h, w)), ratio_range=(1.0, 1.0), flip_prob=1.0, photometric=False
    )
    out, new = aug(image, target)
    assert torch.equal(new["label"][:h, :w], target["label"].flip(-1))
    assert bool((new["label"][h:, :] == IGNORE_INDEX).all()) and bool((new["label"][:, w:] == IGNORE_INDEX).all())
    assert torch.allclose(out[:, :h, :w], normalised(image.flip(-1)), atol=1e-6)


def _ratio_rule_holds(label: torch.Tensor, cat_max_ratio: float) -> bool:
    counts = torch.bincount(label.flatten(), minlength=256)[:255]
    counts = counts[counts > 0]
    return counts.numel() > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio


def test_cat_max_ratio_retries_crops_dominated_by_one_class():
    # 64 x 256 label of class 0 with class 1 in the top half of the last 64 columns. 64-px crops slide along
    # x = 0..192; only x = 161..192 (32 of 193 windows) hold less than 75 % of class 0. One random window
    # passes with p = 0.166; with up to 10 checks and a final unchecked window, 1 - (1 - p)^11 = 0.86.
    label = torch.zeros(64, 256, dtype=torch.int64)
    label[:32, 192:] = 1
    image = torch.zeros(3, 64, 256, dtype=torch.uint8)

    def pass_rate(cat_max_ratio: float) -> float:
        aug = TrainTransform(
            crop_size=64,
            scale=(256, 64),
            ratio_range=(1.0, 1.0),
            cat_max_ratio=cat_max_ratio,
            flip_prob=0.0,
            photometric=False,
        )
        passed = 0
        for seed in range(200):
            torch.manual_seed(seed)
            _, target = aug(image, {"label": label})
            assert target["label"].shape == (64, 64) and bool((target["label"] != IGNORE_INDEX).all())
            passed += _ratio_rule_holds(target["label"], 0.75)
        return passed / 200

    assert pass_rate(0.75) > 0.75
    assert pass_rate(1.0) < 0.3  # without the rule: plain random windows
    # When no window can pass (one class everywhere), the last window is used.
    aug = TrainTransform(crop_size=64, scale=(256, 64), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    _, target = aug(image, {"label": torch.zeros(64, 256, dtype=torch.int64)})
    assert bool((target["label"] == 0).all())


def test_photometric_distortion_keeps_uint8_and_gray_stays_gray():
    torch.manual_seed(0)
    colour = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    gray = torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8).expand(3, -1, -1).contiguous()
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = photometric_distortion(colour)
        assert out.dtype == torch.uint8 and out.shape == colour.shape
        changed += not torch.equal(out, colour)
        g = photometric_distortion(gray)
        assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])  # saturation and hue leave gray alone
    assert changed >= 15  # all four steps skipped has probability 1/16 a draw


def test_seeded_train_transform_is_reproducible_and_changes_with_the_epoch(toy):
    base = SegmentationFolder(toy, "training")
    ds = SeededTransformDataset(base, TrainTransform(crop_size=64, scale=(128, 64)), seed=0)
    first, again = ds[1], ds[1]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["label"], again[1]["label"])
    ds.set_epoch(1)
    other = ds[1]
    assert not torch.equal(first[0], other[0])
    assert ds.class_names == base.class_names
    loader = DataLoader(ds, batch_size=2)  # default collate: equal crops stack
    images, targets = next(iter(loader))
    assert images.shape == (2, 3, 64, 64) and targets["label"].shape == (2, 64, 64)


def test_eval_transform_resizes_short_side_to_512_and_keeps_the_full_size_label(toy):
    ds = SegmentationFolder(toy, transform=EvalTransform())
    image, target = ds[0]
    h, w = target["orig_size"].tolist()
    expected = keep_ratio_size(h, w, (2048, 512))
    assert min(expected) == 512
    assert image.shape == (3, *expected) and image.dtype == torch.float32
    assert target["resized_size"].tolist() == list(expected)
    assert target["label"].shape == (h, w)  # metrics are computed at the original resolution
    raw, _ = SegmentationFolder(toy)[0]
    assert torch.allclose(image, normalised(resize_image(raw, expected)), atol=1e-6)
    panorama, t = EvalTransform()(torch.full((3, 500, 4000), 124, dtype=torch.uint8), {"label": torch.zeros(500, 4000)})
    assert panorama.shape == (3, 256, 2048) and t["resized_size"].tolist() == [256, 2048]
    assert abs(panorama[0].mean().item()) < 0.01  # 124 / 255 is about the red mean


def test_collate_eval_keeps_images_of_different_sizes_in_lists(toy):
    ds = SegmentationFolder(toy, transform=EvalTransform(scale=(96, 32)))
    images, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_eval)))
    assert len(images) == len(targets) == 4
    assert [t["index"] for t in targets] == [0, 1, 2, 3]
    assert all(tuple(img.shape[1:]) == tuple(t["resized_size"].tolist()) for img, t in zip(images, targets))


def test_class_names_come_from_a_classes_txt_or_an_object_info_table_beside_the_data(tmp_path):
    from mae_transfer.segmentation.ade20k import class_names_for

    (tmp_path / "classes.txt").write_text("road\n\nsky\ncar\n")
    assert class_names_for(tmp_path, 3) == ["road", "sky", "car"]
    assert class_names_for(tmp_path, 4) == ["class_0", "class_1", "class_2", "class_3"]  # a list of another length
    other = tmp_path / "other"
    other.mkdir()
    (other / "objectInfo19.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\tperson, human\n2\t0.2\t1\t1\tbicycle\n"
    )
    assert class_names_for(other, 2) == ["person", "bicycle"]


def test_photometric_distortion_is_mmsegs_arithmetic(monkeypatch):
    """Every step on, with fixed draws: brightness, contrast (mode 1), saturation and hue each through
    OpenCV's uint8 HSV, on the BGR image as mmcv's bgr2hsv does (ours converts the RGB image)."""
    import cv2
    import numpy as np

    from mae_transfer.segmentation import ade20k

    draws = iter([20.0, 1.3, 0.7])  # brightness delta, contrast factor, saturation factor
    monkeypatch.setattr(ade20k, "_coin", lambda: True)
    monkeypatch.setattr(ade20k, "_uniform", lambda lo, hi: next(draws))
    ints = iter([torch.tensor(1), torch.tensor(-7)])  # mode 1 (contrast first), hue shift -7
    monkeypatch.setattr(ade20k.torch, "randint", lambda *a, **k: next(ints))
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 17, 23), dtype=np.uint8)
    out = photometric_distortion(torch.from_numpy(rgb)).numpy()

    def convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    bgr = rgb.transpose(1, 2, 0)[:, :, ::-1].copy()
    bgr = convert(bgr, beta=20.0)
    bgr = convert(bgr, alpha=1.3)
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=0.7)
    bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) - 7) % 180
    bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    assert np.array_equal(out, bgr[:, :, ::-1].transpose(2, 0, 1))
