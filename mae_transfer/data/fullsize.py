"""Full-size rehearsal data: annotation files with the real counts, pointing at a few real images.

What a cluster run meets first is not the model but the size of the annotation files: parsing them,
indexing them, and every DataLoader worker of every rank holding them. Those costs depend on the
number of entries and their shape, not on the pixels, so these writers produce annotation files
with the official counts and entry shapes and let every entry point at one of a few real image
files (symlinks for the per-image datasets, a handful of files per class for the list datasets).

Counts (the official releases):

* COCO 2017 (``instances_train2017.json`` 118,287 images / 860,001 annotations; ``val2017`` 5,000 /
  36,781; 80 categories with COCO's ids): polygons of ~25 points, 1 % crowd regions as uncompressed
  RLEs, as in the real file. Images are symlinks named ``%012d.jpg`` to the source images.
* iNaturalist 2018 (``train2018.json`` 437,513 images, ``val2018.json`` 24,426; 8,142 categories);
  one file per category on disk (``train_val2018/<supercategory>/<id>/<hash>.jpg``).
* Places365-Standard (``places365_train_standard.txt`` 1,803,460 lines, ``places365_val.txt``
  36,500; 365 categories); 4 files per category on disk.
* ADE20K (SceneParse150: 20,210 training and 2,000 validation image/label pairs), symlinks.

Each writer takes the dataset whose images it links (``images_from``, of the same format); a task's
registry entry names its writer (``ToyData.full_size``), and
:func:`mae_transfer.evaluation.data_speed.write_full_size` passes the task's toy dataset by default.
``mae-transfer toy-data --full-size KIND DIR`` writes them; ``mae-transfer speed KIND --data-only
--full-size`` measures index build time and memory on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from mae_transfer.io import atomic_write

# The official counts the writers reproduce (images, annotations or list lines per split).
COCO_2017 = {"train2017": (118_287, 860_001), "val2017": (5_000, 36_781)}  # (images, annotations)
INAT_2018 = {"train": 437_513, "val": 24_426, "classes": 8_142}
PLACES365 = {"train": 1_803_460, "val": 36_500, "classes": 365}
ADE20K = {"training": 20_210, "validation": 2_000}

_CROWD_FRACTION = 0.01  # COCO 2017 train: 9,085 of 860,001 annotations are crowd regions (~1 %)
_POLY_POINTS = 25  # mean polygon size of COCO's annotations (points)
_INAT_SUPER = (
    "Plantae",
    "Insecta",
    "Aves",
    "Reptilia",
    "Mammalia",
    "Fungi",
    "Amphibia",
    "Mollusca",
    "Animalia",
    "Arachnida",
    "Actinopterygii",
    "Chromista",
    "Protozoa",
    "Bacteria",
)


def _fresh(folder: Path) -> Path:
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; choose a new folder for the full-size data")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _link(target: Path, link: Path) -> None:
    os.symlink(os.path.abspath(target), link)


def _image_sizes(files: Sequence[Path]) -> list[tuple[int, int]]:
    sizes = []
    for f in files:
        with Image.open(f) as im:
            sizes.append((im.height, im.width))
    return sizes


def _check_scale(scale: float) -> None:
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")


def _jpegs(folder: Path, limit: int = 16) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())
    if not found:
        raise FileNotFoundError(f"no JPEG images under {folder}")
    return found[:limit]


# ------------------------------------------------------------------------------------------ COCO


def _coco_annotations(
    rng: np.random.Generator, num_images: int, num_anns: int, sizes: np.ndarray, cat_ids: Sequence[int], first_id: int
) -> Iterator[str]:
    """JSON text of ``num_anns`` annotations spread over ``num_images`` images (~Poisson counts)."""
    per_image = rng.multinomial(num_anns, np.full(num_images, 1.0 / num_images))
    image_of = np.repeat(np.arange(num_images), per_image)
    ann_id = first_id
    for start in range(0, num_anns, 20_000):
        idx = image_of[start : start + 20_000]
        k = len(idx)
        hw = sizes[idx]
        cx = rng.uniform(0.2, 0.8, k) * hw[:, 1]
        cy = rng.uniform(0.2, 0.8, k) * hw[:, 0]
        rad = rng.uniform(0.05, 0.2, k) * np.minimum(hw[:, 0], hw[:, 1])
        npts = np.clip(rng.poisson(_POLY_POINTS, k), 3, None)
        crowd = rng.random(k) < _CROWD_FRACTION
        cats = rng.integers(0, len(cat_ids), k)
        for j in range(k):
            h, w = int(hw[j, 0]), int(hw[j, 1])
            x0, y0 = max(0.0, cx[j] - rad[j]), max(0.0, cy[j] - rad[j])
            x1, y1 = min(w - 1.0, cx[j] + rad[j]), min(h - 1.0, cy[j] + rad[j])
            box = f"[{x0:.2f},{y0:.2f},{x1 - x0:.2f},{y1 - y0:.2f}]"
            if crowd[j]:
                # Uncompressed RLE (column-major runs) of the box, as COCO stores crowd regions.
                top, bottom, left, right = int(y0), int(y1) + 1, int(x0), int(x1) + 1
                runs = [left * h + top]
                for _ in range(left, right - 1):
                    runs += [bottom - top, h - (bottom - top)]
                runs += [bottom - top, h * w - sum(runs) - (bottom - top)]
                seg = f'{{"counts":[{",".join(map(str, runs))}],"size":[{h},{w}]}}'
                area = float((bottom - top) * (right - left))
            else:
                t = np.sort(rng.uniform(0, 2 * np.pi, npts[j]))
                r = rad[j] * rng.uniform(0.6, 1.0, npts[j])
                xs = np.clip(cx[j] + r * np.cos(t), 0, w - 1)
                ys = np.clip(cy[j] + r * np.sin(t), 0, h - 1)
                xy = np.round(np.stack([xs, ys], 1).reshape(-1), 2)
                seg = "[[" + ",".join(map(str, xy.tolist())) + "]]"
                area = float(0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))
            yield (
                f'{{"segmentation":{seg},"area":{area:.2f},"iscrowd":{int(crowd[j])},"image_id":{int(idx[j]) + 1},'
                f'"bbox":{box},"category_id":{cat_ids[cats[j]]},"id":{ann_id}}}'
            )
            ann_id += 1


def _write_json_stream(path: Path, head: str, sections: Sequence[tuple[str, Iterator[str]]]) -> None:
    with atomic_write(path, "w") as f:
        f.write("{" + head)
        for i, (key, items) in enumerate(sections):
            f.write(("," if head or i else "") + json.dumps(key) + ":[")
            first = True
            for item in items:
                f.write(item if first else "," + item)
                first = False
            f.write("]")
        f.write("}")


def write_coco_full_size(
    out: str | os.PathLike, images_from: str | os.PathLike, scale: float = 1.0, seed: int = 0
) -> Path:
    """COCO 2017 ``annotations/instances_{train,val}2017.json`` with the official counts (times
    ``scale``), and ``train2017/`` / ``val2017/`` of symlinks to a few real images."""
    from mae_transfer.data.toy import category_names, coco_category_ids

    root = _fresh(Path(out))
    _check_scale(scale)
    src = Path(images_from)
    files = _jpegs(src / "train2017" if (src / "train2017").is_dir() else src)
    file_sizes = _image_sizes(files)
    cat_ids = coco_category_ids(80)
    cats = ",".join(
        json.dumps({"supercategory": "object", "id": c, "name": n}) for c, n in zip(cat_ids, category_names(80))
    )
    (root / "annotations").mkdir()
    rng = np.random.default_rng(seed)
    for split, (n_img, n_ann) in COCO_2017.items():
        n_img, n_ann = max(1, round(n_img * scale)), max(1, round(n_ann * scale))
        (root / split).mkdir()
        which = np.arange(n_img) % len(files)
        sizes = np.array([file_sizes[i] for i in which], dtype=np.int64)
        images = []
        for i in range(n_img):
            name = f"{i + 1:012d}.jpg"
            _link(files[which[i]], root / split / name)
            h, w = file_sizes[which[i]]
            images.append(
                json.dumps(
                    {
                        "license": 1,
                        "file_name": name,
                        "coco_url": "",
                        "height": h,
                        "width": w,
                        "date_captured": "2013-11-14 17:02:52",
                        "flickr_url": "",
                        "id": i + 1,
                    }
                )
            )
        _write_json_stream(
            root / "annotations" / f"instances_{split}.json",
            '"info":{"description":"full-size rehearsal (real counts, few real images)"},"licenses":[]',
            [
                ("images", iter(images)),
                ("annotations", _coco_annotations(rng, n_img, n_ann, sizes, cat_ids, 1)),
                ("categories", iter([cats])),
            ],
        )
    return root


# ------------------------------------------------------------------------------------------ iNaturalist


def write_inat2018_full_size(
    out: str | os.PathLike, images_from: str | os.PathLike, scale: float = 1.0, seed: int = 0
) -> Path:
    """iNaturalist 2018 ``train2018.json`` / ``val2018.json`` with the official counts; one image
    file per category on disk, which every entry of that category names."""
    counts = INAT_2018
    root = _fresh(Path(out))
    _check_scale(scale)
    files = _jpegs(Path(images_from))
    sizes = _image_sizes(files)
    n_cls = max(2, round(counts["classes"] * min(1.0, scale)))
    rng = np.random.default_rng(seed)
    cat_files = []
    for c in range(n_cls):
        sup = _INAT_SUPER[c % len(_INAT_SUPER)]
        folder = root / "train_val2018" / sup / str(c)
        folder.mkdir(parents=True)
        name = hashlib.md5(str(c).encode()).hexdigest() + ".jpg"
        _link(files[c % len(files)], folder / name)
        cat_files.append((f"train_val2018/{sup}/{c}/{name}", sizes[c % len(files)]))
    cats = [
        json.dumps(
            {
                "id": c,
                "name": f"Species {c:05d}",
                "supercategory": _INAT_SUPER[c % len(_INAT_SUPER)],
                "kingdom": "Animalia",
                "phylum": "Chordata",
                "class": "Aves",
                "order": "Order",
                "family": "Family",
                "genus": "Genus",
            }
        )
        for c in range(n_cls)
    ]
    next_id = 1
    for split in ("train", "val"):
        n = max(1, round(counts[split] * scale))
        labels = rng.integers(0, n_cls, n)
        labels[:n_cls] = np.arange(min(n, n_cls))  # every class present
        images, anns = [], []
        for i, c in enumerate(labels.tolist()):
            name, (h, w) = cat_files[c]
            images.append(
                json.dumps(
                    {
                        "id": next_id + i,
                        "file_name": name,
                        "width": w,
                        "height": h,
                        "license": 3,
                        "rights_holder": "rehearsal",
                    }
                )
            )
            anns.append(f'{{"id":{next_id + i},"image_id":{next_id + i},"category_id":{c}}}')
        next_id += n
        _write_json_stream(
            root / f"{split}2018.json",
            '"info":{"year":2018},"licenses":[]',
            [("images", iter(images)), ("annotations", iter(anns)), ("categories", iter(cats))],
        )
    return root


# ------------------------------------------------------------------------------------------ Places365


def write_places365_full_size(
    out: str | os.PathLike, images_from: str | os.PathLike, scale: float = 1.0, seed: int = 0
) -> Path:
    """Places365-Standard file lists with the official line counts; 4 files per category in
    ``data_256/`` and 100 in ``val_256/``."""
    counts = PLACES365
    root = _fresh(Path(out))
    _check_scale(scale)
    files = _jpegs(Path(images_from))
    n_cls = counts["classes"]
    rng = np.random.default_rng(seed)
    names = [f"/{chr(ord('a') + c % 26)}/category_{c:03d}" for c in range(n_cls)]
    (root / "categories_places365.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    for c, n in enumerate(names):
        folder = root / "data_256" / n.strip("/")
        folder.mkdir(parents=True)
        for k in range(4):
            _link(files[(c + k) % len(files)], folder / f"{k + 1:08d}.jpg")
    (root / "val_256").mkdir()
    for k in range(100):
        _link(files[k % len(files)], root / "val_256" / f"Places365_val_{k + 1:08d}.jpg")
    n_train = max(1, round(counts["train"] * scale))
    labels = rng.integers(0, n_cls, n_train)
    with open(root / "places365_train_standard.txt", "w") as f:
        for i, c in enumerate(labels.tolist()):
            f.write(f"{names[c]}/{i % 4 + 1:08d}.jpg {c}\n")
    n_val = max(1, round(counts["val"] * scale))
    with open(root / "places365_val.txt", "w") as f:
        for i, c in enumerate(rng.integers(0, n_cls, n_val).tolist()):
            f.write(f"Places365_val_{i % 100 + 1:08d}.jpg {c}\n")
    return root


# ------------------------------------------------------------------------------------------ ADE20K


def write_ade20k_full_size(
    out: str | os.PathLike, images_from: str | os.PathLike, scale: float = 1.0, seed: int = 0
) -> Path:
    """ADE20K ``images/{training,validation}`` and ``annotations/...`` of symlinks (the official
    20,210 + 2,000 pairs) to a few real image/label pairs."""
    root = _fresh(Path(out))
    _check_scale(scale)
    src = Path(images_from)
    pairs = []
    for split in ("validation", "training"):
        for img in sorted((src / "images" / split).glob("*.jpg")):
            label = src / "annotations" / split / (img.stem + ".png")
            if label.is_file():
                pairs.append((img, label))
    if not pairs:
        raise FileNotFoundError(f"no image/label pairs under {src}/images and {src}/annotations")
    pairs = pairs[:16]
    for name in ("objectInfo150.txt", "objectInfo150.csv"):
        if (src / name).is_file():
            shutil.copy(src / name, root / name)
    for split, n in ADE20K.items():
        n = max(1, round(n * scale))
        tag = "train" if split == "training" else "val"
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            img, label = pairs[i % len(pairs)]
            stem = f"ADE_{tag}_{i + 1:08d}"
            _link(img, root / "images" / split / f"{stem}.jpg")
            _link(label, root / "annotations" / split / f"{stem}.png")
    return root


__all__ = [
    "ADE20K",
    "COCO_2017",
    "INAT_2018",
    "PLACES365",
    "write_ade20k_full_size",
    "write_coco_full_size",
    "write_inat2018_full_size",
    "write_places365_full_size",
]
