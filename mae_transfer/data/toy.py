"""Deterministic toy data in the real on-disk formats of the big datasets.

Every command of the toolkit must run without a dataset, and every reader must be exercised on the
exact layout it will meet in production. One scene generator (:func:`make_scene`) draws small
pictures of coloured shapes on a smooth background; the writers lay those scenes out as an
ImageNet-style ImageFolder, COCO 2017, ADE20K SceneParse150, iNaturalist 2017/2018/2019 and
Places205/Places365. :func:`ensure_toy_dataset` writes one of them once into a cache and reuses it.

Each category is a shape family with a category-tied hue, so a tiny classifier, detector or
segmenter can learn it and an MAE can learn to reconstruct it. Every image is drawn from its own
random generator seeded by ``(seed, dataset, split, index)``: output is byte-identical for a given
seed and does not change when another split or class is made larger.
"""

from __future__ import annotations

import colorsys
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mae_transfer.data.errors import DataError

log = logging.getLogger(__name__)

# Bump whenever the generator's output changes, so that cached toy datasets are rewritten.
GENERATOR_VERSION = 2

SHAPES = ("ellipse", "rectangle", "triangle", "star", "ring", "cross", "diamond", "hexagon", "arrow", "semicircle")
"""Shape family of category ``c`` is ``SHAPES[c % len(SHAPES)]``."""

BACKGROUND_CLASSES = ("wall", "sky", "floor", "grass", "road")
"""Background regions; in a scene's semantic map region ``k`` has the value ``num_categories + k``."""

UNLABELLED = 255
"""Semantic-map value of pixels that belong to no class (clutter)."""

_SUPERCATEGORY = {
    "ellipse": "round",
    "ring": "round",
    "semicircle": "round",
    "rectangle": "polygon",
    "triangle": "polygon",
    "diamond": "polygon",
    "hexagon": "polygon",
    "star": "pointed",
    "cross": "pointed",
    "arrow": "pointed",
}

_HUE_NAMES = (
    "red",
    "orange",
    "yellow",
    "chartreuse",
    "green",
    "spring",
    "cyan",
    "azure",
    "blue",
    "violet",
    "magenta",
    "rose",
)

_GOLDEN = 0.6180339887498949

# Dataset tags that keep the random streams of different writers apart.
_TAG_IMAGEFOLDER, _TAG_COCO, _TAG_ADE, _TAG_INAT, _TAG_PLACES = 11, 12, 13, 14, 15
_SPLITS = {"train": 0, "val": 1}


# ---------------------------------------------------------------------------------------- scenes


@dataclass
class ToyInstance:
    """One object of a scene.

    ``polygons`` are COCO-style flat ``[x0, y0, x1, y1, ...]`` lists in pixel coordinates (a ring is
    one keyhole polygon, as COCO polygons cannot hold holes); ``mask`` is exactly what
    ``pycocotools`` rasterises from them, ``area`` its pixel count and ``bbox`` its ``[x, y, w, h]``.
    """

    category: int
    polygons: list[list[float]]
    mask: np.ndarray
    bbox: list[float]
    area: int


class Scene(NamedTuple):
    """A toy picture: ``image`` (PIL RGB), ``instances`` (largest first) and ``semantic``.

    ``semantic`` is a ``uint8`` ``(H, W)`` map: object pixels hold their category index
    (``0 .. num_categories-1``), background pixels ``num_categories + k`` for region
    ``BACKGROUND_CLASSES[k]`` and clutter pixels :data:`UNLABELLED`.
    """

    image: Image.Image
    instances: list[ToyInstance]
    semantic: np.ndarray

    @property
    def label(self) -> int:
        """Category of the dominant (largest) object, -1 for a scene without objects."""
        return self.instances[0].category if self.instances else -1


def category_shape(category: int) -> str:
    """The shape family that category ``category`` is drawn as."""
    return SHAPES[category % len(SHAPES)]


def category_hue(category: int) -> float:
    """Mean hue (0-1) of category ``category``: golden-ratio steps keep neighbours far apart."""
    return (category * _GOLDEN) % 1.0


def category_names(num_categories: int) -> list[str]:
    """Unique human-readable names such as ``"red ellipse"``, one a category."""
    names: list[str] = []
    for c in range(num_categories):
        colour = _HUE_NAMES[int(round(category_hue(c) * len(_HUE_NAMES))) % len(_HUE_NAMES)]
        name = f"{colour} {category_shape(c)}"
        k = 2
        while name in names:
            name = f"{colour} {category_shape(c)} {k}"
            k += 1
        names.append(name)
    return names


def _unit_shape(family: str, rng: np.random.Generator) -> np.ndarray:
    """A closed outline (K, 2) of the family inside the unit disc, touching its edge."""
    if family == "ellipse":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), rng.uniform(0.6, 1.0) * np.sin(t)], 1)
    elif family == "rectangle":
        b = rng.uniform(0.45, 0.85)
        pts = np.array([[-1, -b], [1, -b], [1, b], [-1, b]])
    elif family == "triangle":
        t = np.deg2rad(90 + np.array([0, 120, 240]) + rng.uniform(-8, 8, 3))
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif family == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False) + np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif family == "ring":
        # Outer circle, a zero-width cut to the inner circle, the inner circle the other way
        # round and back: even-odd filling then leaves the hole empty.
        n = 24
        t = np.linspace(0, 2 * np.pi, n + 1)
        inner = rng.uniform(0.45, 0.6)
        outer_pts = np.stack([np.cos(t), np.sin(t)], 1)
        inner_pts = inner * np.stack([np.cos(-t), np.sin(-t)], 1)
        pts = np.concatenate([outer_pts, inner_pts])
    elif family == "cross":
        w = 0.3
        pts = np.array(
            [[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]]
        )
    elif family == "diamond":
        pts = np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]])
    elif family == "hexagon":
        t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif family == "arrow":
        pts = np.array([[-1, -0.22], [0.2, -0.22], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.22], [-1, 0.22]])
    elif family == "semicircle":
        t = np.linspace(-np.pi / 2, np.pi / 2, 17)
        pts = np.stack([np.cos(t) - 0.4, np.sin(t)], 1)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(family)
    pts = np.asarray(pts, dtype=np.float64)
    return pts / np.linalg.norm(pts, axis=1).max()


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), dtype=np.float32)


def _rasterise(polygons: list[list[float]], height: int, width: int) -> tuple[np.ndarray, dict]:
    """The mask pycocotools draws for ``polygons`` (so annToMask gives back exactly this mask)."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    with warnings.catch_warnings():
        # pycocotools' decode trips a numpy 2 "copy keyword" DeprecationWarning on every call.
        warnings.simplefilter("ignore", DeprecationWarning)
        mask = mask_utils.decode(rle)
    return mask.astype(bool), rle


def _background(
    rng: np.random.Generator, width: int, height: int, num_categories: int
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth two-region background (wall/floor indoors, sky/grass-or-road outdoors)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    yn, xn = ys / height, xs / width
    indoor = rng.random() < 0.5
    horizon = rng.uniform(0.35, 0.7) + rng.uniform(-0.15, 0.15) * (xn - 0.5)
    upper = yn < horizon
    if indoor:
        up_cls, up_col = 0, _hsv(rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.2), rng.uniform(0.7, 0.9))
        lo_cls, lo_col = 2, _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.3, 0.5), rng.uniform(0.4, 0.6))
    else:
        up_cls, up_col = 1, _hsv(rng.uniform(0.55, 0.62), rng.uniform(0.25, 0.45), rng.uniform(0.8, 0.95))
        if rng.random() < 0.5:
            lo_cls, lo_col = 3, _hsv(rng.uniform(0.22, 0.3), rng.uniform(0.3, 0.5), rng.uniform(0.35, 0.55))
        else:
            lo_cls, lo_col = 4, _hsv(rng.uniform(0, 1), rng.uniform(0, 0.08), rng.uniform(0.3, 0.45))
    # Vertical gradients (sky lighter towards the horizon, floor darker towards the camera).
    img = np.where(upper[..., None], up_col * (0.85 + 0.15 * yn[..., None] / 0.7), lo_col * (1.1 - 0.2 * yn[..., None]))
    # Low-frequency texture: something for an MAE to model, but smooth enough to predict.
    for _ in range(2):
        ang, freq, phase = rng.uniform(0, np.pi), rng.uniform(1, 3), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (xn * np.cos(ang) + yn * np.sin(ang)) + phase)
        img = img + 0.04 * wave[..., None]
    if lo_cls == 2:  # floor boards
        img = img + np.where(upper, 0, 0.04 * np.sign(np.sin(ys * 2 * np.pi / max(4.0, height / 8))))[..., None]
    semantic = np.where(upper, num_categories + up_cls, num_categories + lo_cls).astype(np.uint8)
    if rng.random() < 0.4:
        # A dull blob that belongs to no class: the "0 = other" pixels of ADE20K.
        s = min(width, height)
        r = rng.uniform(0.08, 0.15) * s
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        t = np.linspace(0, 2 * np.pi, 8, endpoint=False)
        rad = r * rng.uniform(0.5, 1.0, 8)
        poly = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1).round(2).ravel().tolist()
        blob, _ = _rasterise([poly], height, width)
        img[blob] = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.15), rng.uniform(0.3, 0.6))
        semantic[blob] = UNLABELLED
    return img.astype(np.float32), semantic


def make_scene(
    rng: np.random.Generator,
    size: int | tuple[int, int],
    num_categories: int,
    *,
    num_objects: int | None = None,
    dominant: int | None = None,
    max_objects: int = 5,
    noise: float = 0.015,
) -> Scene:
    """Draw one toy scene: a smooth background and up to ``max_objects`` non-overlapping shapes.

    Args:
        rng: the only source of randomness; the same generator state gives the same scene.
        size: ``S`` for an ``S x S`` image, or ``(width, height)``.
        num_categories: categories ``0 .. num_categories-1`` to draw objects from.
        num_objects: objects to try to place (default: 1 to ``max_objects`` at random). 0 gives a
            background-only scene. Objects that find no free space are left out.
        dominant: category of the first, largest object (default: random). Every other object is
            made smaller than it, so ``scene.label`` is the category of the largest object.
        max_objects: upper bound of the random object count.
        noise: standard deviation of the per-pixel noise, in 0-1 intensity units.

    Returns:
        A :class:`Scene` with the PIL RGB image, the instances (largest first) and the semantic map.
    """
    width, height = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if num_categories < 1:
        raise ValueError("num_categories must be at least 1")
    if num_categories + len(BACKGROUND_CLASSES) >= UNLABELLED:
        raise ValueError(f"at most {UNLABELLED - len(BACKGROUND_CLASSES) - 1} categories fit in a uint8 semantic map")
    if dominant is not None and not 0 <= dominant < num_categories:
        raise ValueError(f"dominant={dominant} is not a category of 0..{num_categories - 1}")
    img, semantic = _background(rng, width, height, num_categories)
    if num_objects is None:
        num_objects = int(rng.integers(1, max_objects + 1))
    if dominant is not None:
        num_objects = max(num_objects, 1)
    s = min(width, height)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    occupied = np.zeros((height, width), dtype=bool)
    instances: list[ToyInstance] = []
    for k in range(num_objects):
        first = k == 0
        cat = int(dominant) if (first and dominant is not None) else int(rng.integers(num_categories))
        family = category_shape(cat)
        for _attempt in range(12 if first else 8):
            r = rng.uniform(0.22, 0.34) * s if first else rng.uniform(0.09, 0.17) * s
            r = min(r, (s - 1) / 2)
            theta = rng.uniform(0, 2 * np.pi)
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            unit = _unit_shape(family, rng)
            rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
            pts = unit @ rot.T * r + np.array([cx, cy])
            pts[:, 0] = np.clip(pts[:, 0], 0, width)
            pts[:, 1] = np.clip(pts[:, 1], 0, height)
            poly = [float(v) for v in pts.round(2).ravel()]
            mask, rle = _rasterise([poly], height, width)
            area = int(mask_utils.area(rle))
            if area < 4 or (mask & occupied).any():
                continue
            if not first and area >= 0.8 * instances[0].area:
                continue
            break
        else:
            continue  # no room for this object: leave it out rather than overlap
        # Category-tied colour with per-object jitter and a linear shading across the object.
        hue = category_hue(cat) + rng.normal(0, 0.015)
        colour = _hsv(hue, 0.8 + rng.normal(0, 0.06), 0.85 + rng.normal(0, 0.06))
        phi = rng.uniform(0, 2 * np.pi)
        shade = 1 + 0.18 * ((xs - cx) * np.cos(phi) + (ys - cy) * np.sin(phi)) / max(r, 1.0)
        img[mask] = (colour[None, :] * shade[mask][:, None]).astype(np.float32)
        semantic[mask] = cat
        occupied |= mask
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        instances.append(ToyInstance(category=cat, polygons=[poly], mask=mask, bbox=bbox, area=area))
    if noise > 0:
        img = img + noise * rng.standard_normal(img.shape, dtype=np.float32)
    pixels = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Scene(Image.fromarray(pixels, "RGB"), instances, semantic)


# ---------------------------------------------------------------------------------------- helpers


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, *tags])


def _varied_size(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    """(width, height) with the longer side ``image_size`` and a photo-like aspect ratio."""
    aspect = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3)[int(rng.integers(5))]
    if aspect >= 1:
        return image_size, max(8, int(round(image_size / aspect)))
    return max(8, int(round(image_size * aspect))), image_size


def _save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")))


def _write_lines(lines: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if int(value) < 0:
            raise ValueError(f"{name} must not be negative (got {value})")


# ---------------------------------------------------------------------------------------- ImageFolder


def imagefolder_class_names(num_classes: int) -> list[str]:
    """Folder names of the toy ImageFolder classes, e.g. ``"00_red_ellipse"`` (sorted = index order)."""
    width = max(2, len(str(num_classes - 1)))
    return [f"{c:0{width}d}_{n.replace(' ', '_')}" for c, n in enumerate(category_names(num_classes))]


def write_imagefolder(
    root: str | os.PathLike,
    num_classes: int = 10,
    train_per_class: int = 40,
    val_per_class: int = 10,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write an ImageNet-style ImageFolder: ``root/{train,val}/<class>/*.jpg`` and ``classes.txt``.

    Each image's class is the category of its dominant (largest) object. ``classes.txt`` has one
    ``<folder>\\t<description>`` line a class, like Tiny-ImageNet's ``words`` file.
    """
    _check_counts(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class)
    root = Path(root)
    folders = imagefolder_class_names(num_classes)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, folder in enumerate(folders):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                scene = make_scene(
                    _rng(seed, _TAG_IMAGEFOLDER, _SPLITS[split], c, j), image_size, num_classes, dominant=c
                )
                _save_jpeg(scene.image, root / split / folder / f"{folder}_{j:05d}.jpg")
    names = category_names(num_classes)
    _write_lines([f"{f}\t{n}" for f, n in zip(folders, names)], root / "classes.txt")
    return root


# ---------------------------------------------------------------------------------------- COCO


def coco_category_ids(num_categories: int) -> list[int]:
    """COCO-like non-contiguous category ids: 1, 2, 4, 5, 6, 8, 9, 10, 12, ..."""
    return [1 + k + (k + 1) // 3 for k in range(num_categories)]


def write_coco(
    root: str | os.PathLike,
    num_categories: int = 10,
    train_images: int = 64,
    val_images: int = 16,
    image_size: int = 64,
    seed: int = 0,
    crowd_prob: float = 0.05,
) -> Path:
    """Write a COCO 2017 instances dataset: ``train2017/``, ``val2017/``, ``annotations/instances_*.json``.

    Image ids and category ids are non-contiguous like COCO's; ``file_name`` is the zero-padded id.
    Segmentations are polygon lists, except ``iscrowd=1`` objects (the last object of each split's
    first image, and others with probability ``crowd_prob``), which carry a compressed RLE
    ``{"counts": str, "size": [h, w]}`` made by ``pycocotools.mask.encode``. ``area`` and ``bbox``
    are those of the mask ``pycocotools`` rasterises from the segmentation. The last image of each
    split has no annotations.
    """
    _check_counts(num_categories=num_categories, train_images=train_images, val_images=val_images)
    root = Path(root)
    cat_ids = coco_category_ids(num_categories)
    names = category_names(num_categories)
    categories = [
        {"supercategory": _SUPERCATEGORY[category_shape(c)], "id": cat_ids[c], "name": names[c]}
        for c in range(num_categories)
    ]
    ann_id = 1
    for split, count in (("train", train_images), ("val", val_images)):
        s = _SPLITS[split]
        images, annotations = [], []
        for i in range(count):
            rng = _rng(seed, _TAG_COCO, s, i)
            width, height = _varied_size(rng, image_size)
            if i == count - 1 and count >= 3:
                n_obj = 0  # COCO has images without any annotation; readers must cope
            elif i == 0:
                n_obj = int(rng.integers(2, 6))
            else:
                n_obj = int(rng.integers(1, 6))
            scene = make_scene(rng, (width, height), num_categories, num_objects=n_obj)
            image_id = 100_000 * (s + 1) + 7 * i + 3
            file_name = f"{image_id:012d}.jpg"
            _save_jpeg(scene.image, root / f"{split}2017" / file_name)
            images.append({"license": 1, "file_name": file_name, "height": height, "width": width, "id": image_id})
            for k, inst in enumerate(scene.instances):
                crowd = (i == 0 and k == len(scene.instances) - 1) or bool(rng.random() < crowd_prob)
                if crowd:
                    rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
                    segmentation: Any = {"counts": rle["counts"].decode("ascii"), "size": [int(v) for v in rle["size"]]}
                else:
                    segmentation = inst.polygons
                annotations.append(
                    {
                        "segmentation": segmentation,
                        "area": float(inst.area),
                        "iscrowd": int(crowd),
                        "image_id": image_id,
                        "bbox": inst.bbox,
                        "category_id": cat_ids[inst.category],
                        "id": ann_id,
                    }
                )
                ann_id += 1
        _write_json(
            {
                "info": {
                    "description": "mae_transfer toy dataset in the COCO 2017 format",
                    "version": str(GENERATOR_VERSION),
                    "year": 2017,
                    "contributor": "mae_transfer.data.toy",
                    "date_created": "2017/09/01",
                },
                "licenses": [{"url": "https://creativecommons.org/licenses/by/4.0/", "id": 1, "name": "CC BY 4.0"}],
                "images": images,
                "annotations": annotations,
                "categories": categories,
            },
            root / "annotations" / f"instances_{split}2017.json",
        )
    return root


# ---------------------------------------------------------------------------------------- ADE20K

# The 150 SceneParse150 class names (ids 1..150), as in the devkit's objectInfo150.txt.
ADE20K_CLASSES = (
    "wall",
    "building, edifice",
    "sky",
    "floor, flooring",
    "tree",
    "ceiling",
    "road, route",
    "bed ",
    "windowpane, window ",
    "grass",
    "cabinet",
    "sidewalk, pavement",
    "person, individual, someone, somebody, mortal, soul",
    "earth, ground",
    "door, double door",
    "table",
    "mountain, mount",
    "plant, flora, plant life",
    "curtain, drape, drapery, mantle, pall",
    "chair",
    "car, auto, automobile, machine, motorcar",
    "water",
    "painting, picture",
    "sofa, couch, lounge",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug, carpet, carpeting",
    "field",
    "armchair",
    "seat",
    "fence, fencing",
    "desk",
    "rock, stone",
    "wardrobe, closet, press",
    "lamp",
    "bathtub, bathing tub, bath, tub",
    "railing, rail",
    "cushion",
    "base, pedestal, stand",
    "box",
    "column, pillar",
    "signboard, sign",
    "chest of drawers, chest, bureau, dresser",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace, hearth, open fireplace",
    "refrigerator, icebox",
    "grandstand, covered stand",
    "path",
    "stairs, steps",
    "runway",
    "case, display case, showcase, vitrine",
    "pool table, billiard table, snooker table",
    "pillow",
    "screen door, screen",
    "stairway, staircase",
    "river",
    "bridge, span",
    "bookcase",
    "blind, screen",
    "coffee table, cocktail table",
    "toilet, can, commode, crapper, pot, potty, stool, throne",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove, kitchen stove, range, kitchen range, cooking stove",
    "palm, palm tree",
    "kitchen island",
    "computer, computing machine, computing device, data processor, electronic computer, information processing system",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel, hut, hutch, shack, shanty",
    "bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, passenger vehicle",
    "towel",
    "light, light source",
    "truck, motortruck",
    "tower",
    "chandelier, pendant, pendent",
    "awning, sunshade, sunblind",
    "streetlight, street lamp",
    "booth, cubicle, stall, kiosk",
    "television, television receiver, television set, tv, tv set, idiot box, boob tube, telly, goggle box",
    "airplane, aeroplane, plane",
    "dirt track",
    "apparel, wearing apparel, dress, clothes",
    "pole",
    "land, ground, soil",
    "bannister, banister, balustrade, balusters, handrail",
    "escalator, moving staircase, moving stairway",
    "ottoman, pouf, pouffe, puff, hassock",
    "bottle",
    "buffet, counter, sideboard",
    "poster, posting, placard, notice, bill, card",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt, conveyor belt, conveyer, conveyor, transporter",
    "canopy",
    "washer, automatic washer, washing machine",
    "plaything, toy",
    "swimming pool, swimming bath, natatorium",
    "stool",
    "barrel, cask",
    "basket, handbasket",
    "waterfall, falls",
    "tent, collapsible shelter",
    "bag",
    "minibike, motorbike",
    "cradle",
    "oven",
    "ball",
    "food, solid food",
    "step, stair",
    "tank, storage tank",
    "trade name, brand name, brand, marque",
    "microwave, microwave oven",
    "pot, flowerpot",
    "animal, animate being, beast, brute, creature, fauna",
    "bicycle, bike, wheel, cycle ",
    "lake",
    "dishwasher, dish washer, dishwashing machine",
    "screen, silver screen, projection screen",
    "blanket, cover",
    "sculpture",
    "hood, exhaust hood",
    "sconce",
    "vase",
    "traffic light, traffic signal, stoplight",
    "tray",
    "ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin",
    "fan",
    "pier, wharf, wharfage, dock",
    "crt screen",
    "plate",
    "monitor, monitoring device",
    "bulletin board, notice board",
    "shower",
    "radiator",
    "glass, drinking glass",
    "clock",
    "flag",
)

# Background regions map onto these ids (wall, sky, floor, grass, road).
_ADE_BACKGROUND_IDS = (1, 3, 4, 10, 7)
# Toy categories map onto thing-like ids, shape-matched where one comes to mind
# (ball, painting, tent, flower, clock, chair, signboard, box, flag, awning), then others.
_ADE_OBJECT_IDS_FIRST = (
    120,
    23,
    115,
    67,
    149,
    20,
    44,
    42,
    150,
    87,
    13,
    16,
    21,
    24,
    37,
    58,
    99,
    113,
    116,
    126,
    136,
    143,
    148,
)


def ade20k_category_ids(num_categories: int) -> list[int]:
    """The SceneParse150 id (1..150) that each toy category is labelled with."""
    pool = list(_ADE_OBJECT_IDS_FIRST) + [
        i for i in range(1, 151) if i not in _ADE_OBJECT_IDS_FIRST and i not in _ADE_BACKGROUND_IDS
    ]
    if num_categories > len(pool):
        raise ValueError(f"the ADE20K toy data holds at most {len(pool)} categories (got {num_categories})")
    return pool[:num_categories]


def write_ade20k(
    root: str | os.PathLike,
    num_categories: int = 10,
    train_images: int = 64,
    val_images: int = 16,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write ADE20K SceneParse150: ``root/ADEChallengeData2016/{images,annotations}/{training,validation}``.

    Images are ``ADE_{train,val}_%08d.jpg``; label maps are ``uint8`` mode-``L`` PNGs of the same
    stem with 0 = other/unlabelled and 1..150 = classes: toy objects take thing ids
    (:func:`ade20k_category_ids`), the background wall/sky/floor/grass/road, clutter 0.
    ``objectInfo150.txt`` follows the devkit's format, with this toy data's own pixel ratios and
    per-split image counts. Returns ``root``.
    """
    _check_counts(num_categories=num_categories, train_images=train_images, val_images=val_images)
    root = Path(root)
    base = root / "ADEChallengeData2016"
    lut = np.zeros(256, dtype=np.uint8)
    lut[:num_categories] = ade20k_category_ids(num_categories)
    for k, ade_id in enumerate(_ADE_BACKGROUND_IDS):
        lut[num_categories + k] = ade_id
    lut[UNLABELLED] = 0
    pixels = np.zeros(151, dtype=np.int64)
    present = {"train": np.zeros(151, dtype=np.int64), "val": np.zeros(151, dtype=np.int64)}
    for split, folder, count in (("train", "training", train_images), ("val", "validation", val_images)):
        for i in range(count):
            rng = _rng(seed, _TAG_ADE, _SPLITS[split], i)
            scene = make_scene(rng, _varied_size(rng, image_size), num_categories)
            labels = lut[scene.semantic]
            stem = f"ADE_{split}_{i + 1:08d}"
            _save_jpeg(scene.image, base / "images" / folder / f"{stem}.jpg")
            out = base / "annotations" / folder / f"{stem}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(labels, "L").save(out, format="PNG")
            hist = np.bincount(labels.ravel(), minlength=151)
            present[split] += hist > 0
            if split == "train":
                pixels += hist
    total = max(int(pixels.sum()), 1)
    rows = ["Idx\tRatio\tTrain\tVal\tName"]
    for idx, name in enumerate(ADE20K_CLASSES, start=1):
        rows.append(f"{idx}\t{pixels[idx] / total:.4f}\t{present['train'][idx]}\t{present['val'][idx]}\t{name}")
    # The devkit's file has no newline after its last row.
    (base / "objectInfo150.txt").write_text("\n".join(rows))
    return root


# ---------------------------------------------------------------------------------------- iNaturalist

_INAT_GENUS = {
    "ellipse": "Ovalis",
    "rectangle": "Quadrata",
    "triangle": "Trigona",
    "star": "Stellaria",
    "ring": "Anulus",
    "cross": "Crux",
    "diamond": "Rhombus",
    "hexagon": "Hexagona",
    "arrow": "Sagitta",
    "semicircle": "Lunula",
}
_INAT_EPITHET = {
    "red": "rubra",
    "orange": "aurantia",
    "yellow": "flava",
    "chartreuse": "chlorina",
    "green": "viridis",
    "spring": "prasina",
    "cyan": "cyanea",
    "azure": "caerulea",
    "blue": "azurea",
    "violet": "violacea",
    "magenta": "purpurea",
    "rose": "rosea",
}
# supercategory: (kingdom, phylum, class, 2019 folder name)
_INAT_TAXA = {
    "Fungi": ("Fungi", "Basidiomycota", "Agaricomycetes", "Fungi"),
    "Mollusca": ("Animalia", "Mollusca", "Gastropoda", "Mollusks"),
    "Plantae": ("Plantae", "Tracheophyta", "Magnoliopsida", "Plants"),
    "Insecta": ("Animalia", "Arthropoda", "Insecta", "Insects"),
    "Aves": ("Animalia", "Chordata", "Aves", "Birds"),
}
_INAT_SUPER = {
    "ellipse": "Fungi",
    "ring": "Fungi",
    "semicircle": "Mollusca",
    "rectangle": "Plantae",
    "hexagon": "Plantae",
    "diamond": "Plantae",
    "triangle": "Insecta",
    "arrow": "Insecta",
    "star": "Aves",
    "cross": "Aves",
}


def _inat_categories(num_categories: int) -> list[dict]:
    out = []
    seen: set[str] = set()
    for c, name in enumerate(category_names(num_categories)):
        colour = name.split(" ")[0]
        shape = category_shape(c)
        genus = _INAT_GENUS[shape]
        species = f"{genus} {_INAT_EPITHET[colour]}"
        k = 2
        while species in seen:
            species = f"{genus} {_INAT_EPITHET[colour]} var. {k}"
            k += 1
        seen.add(species)
        sup = _INAT_SUPER[shape]
        kingdom, phylum, klass, folder2019 = _INAT_TAXA[sup]
        out.append(
            {
                "id": c,
                "name": species,
                "supercategory": sup,
                "kingdom": kingdom,
                "phylum": phylum,
                "class": klass,
                "order": f"{genus}ales",
                "family": f"{genus}aceae",
                "genus": genus,
                "_folder2019": folder2019,
            }
        )
    return out


def write_inat(
    root: str | os.PathLike,
    year: int = 2018,
    num_categories: int = 10,
    train_per_category: int = 20,
    val_per_category: int = 5,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write an iNaturalist 2017, 2018 or 2019 dataset in its official layout.

    ``train{year}.json`` / ``val{year}.json`` are COCO-like: ``images`` (id, width, height,
    file_name, license, rights_holder), ``annotations`` (id, image_id, category_id) and
    ``categories`` (id, name, then supercategory for 2017/2018 and kingdom .. genus for 2018/2019).
    Images live in ``train_val_images/<supercategory>/<name>/`` (2017),
    ``train_val2018/<supercategory>/<id>/`` (2018) or ``train_val2019/<group>/<id>/`` (2019);
    ``file_name`` is relative to ``root``. Category ids are ``0 .. num_categories``: the last one
    appears in the val split only, as iNat categories can be missing from a split.
    """
    if year not in (2017, 2018, 2019):
        raise ValueError(f"iNaturalist year must be 2017, 2018 or 2019 (got {year})")
    _check_counts(
        num_categories=num_categories, train_per_category=train_per_category, val_per_category=val_per_category
    )
    root = Path(root)
    total = num_categories + 1  # + the val-only category
    cats = _inat_categories(total)
    keys = {
        2017: ("id", "name", "supercategory"),
        2018: ("id", "name", "supercategory", "kingdom", "phylum", "class", "order", "family", "genus"),
        2019: ("id", "name", "kingdom", "phylum", "class", "order", "family", "genus"),
    }[year]
    categories = [{k: c[k] for k in keys} for c in cats]
    image_id = 0
    for split, per_cat, cat_range in (
        ("train", train_per_category, range(num_categories)),
        ("val", val_per_category, range(total)),
    ):
        images, annotations = [], []
        for c in cat_range:
            cat = cats[c]
            if year == 2017:
                folder = Path("train_val_images") / cat["supercategory"] / cat["name"]
            elif year == 2018:
                folder = Path("train_val2018") / cat["supercategory"] / str(c)
            else:
                folder = Path("train_val2019") / cat["_folder2019"] / str(c)
            for j in range(per_cat):
                rng = _rng(seed, _TAG_INAT, year, _SPLITS[split], c, j)
                width, height = _varied_size(rng, image_size)
                scene = make_scene(rng, (width, height), total, dominant=c)
                digest = hashlib.md5(f"{year}/{seed}/{split}/{c}/{j}".encode()).hexdigest()
                rel = (folder / f"{digest}.jpg").as_posix()
                _save_jpeg(scene.image, root / rel)
                images.append(
                    {
                        "id": image_id,
                        "width": width,
                        "height": height,
                        "file_name": rel,
                        "license": 1,
                        "rights_holder": f"toy photographer {j % 7}",
                    }
                )
                annotations.append({"id": image_id, "image_id": image_id, "category_id": c})
                image_id += 1
        _write_json(
            {
                "info": {
                    "year": year,
                    "version": str(GENERATOR_VERSION),
                    "description": f"mae_transfer toy dataset in the iNaturalist {year} format",
                    "contributor": "mae_transfer.data.toy",
                    "date_created": f"{year}-01-01",
                },
                "licenses": [
                    {
                        "id": 1,
                        "name": "Attribution-NonCommercial License",
                        "url": "http://creativecommons.org/licenses/by-nc/4.0/",
                    }
                ],
                "images": images,
                "annotations": annotations,
                "categories": categories,
            },
            root / f"{split}{year}.json",
        )
    return root


# ---------------------------------------------------------------------------------------- Places

# Real Places365 category names (also valid Places205-style paths without the leading slash).
_PLACES_NAMES = (
    "/a/airfield",
    "/b/beach",
    "/b/bedroom",
    "/c/campsite",
    "/f/field/wild",
    "/f/forest/broadleaf",
    "/k/kitchen",
    "/l/lighthouse",
    "/m/mountain",
    "/s/street",
    "/a/alley",
    "/b/bridge",
    "/c/canyon",
    "/d/desert/sand",
    "/h/harbor",
    "/l/library/indoor",
    "/o/office",
    "/p/pasture",
    "/r/river",
    "/s/ski_slope",
)


def places_category_names(num_categories: int) -> list[str]:
    """Sorted Places-style names (``/a/airfield`` ...); label ``k`` is ``names[k]`` and toy category ``k``."""
    names = list(_PLACES_NAMES[:num_categories])
    names += [f"/t/toy_scene_{k:03d}" for k in range(len(names), num_categories)]
    return sorted(names)


def write_places(
    root: str | os.PathLike,
    version: int = 365,
    num_categories: int = 10,
    train_per_category: int = 20,
    val_per_category: int = 5,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write Places205 or Places365-Standard in its official layout.

    Places205: ``trainvalsplit_places205/{train,val}_places205.csv`` with ``a/airfield/gsun_<md5>.jpg
    <label>`` lines, relative to ``data/vision/torralba/deeplearning/images256/``.
    Places365: ``categories_places365.txt`` (``/a/airfield 0``), ``places365_train_standard.txt``
    (``/a/airfield/00000001.jpg 0``, relative to ``data_256/``, the official archive's folder) and ``places365_val.txt``
    (``Places365_val_00000001.jpg 0``, images in ``val_256/``). The label of an image is the category
    of its dominant object.
    """
    if version not in (205, 365):
        raise ValueError(f"Places version must be 205 or 365 (got {version})")
    _check_counts(
        num_categories=num_categories, train_per_category=train_per_category, val_per_category=val_per_category
    )
    root = Path(root)
    names = places_category_names(num_categories)

    def scene_for(split: str, c: int, j: int) -> Image.Image:
        return make_scene(
            _rng(seed, _TAG_PLACES, version, _SPLITS[split], c, j), image_size, num_categories, dominant=c
        ).image

    if version == 205:
        images = root / "data" / "vision" / "torralba" / "deeplearning" / "images256"
        for split, per_cat in (("train", train_per_category), ("val", val_per_category)):
            lines = []
            # Interleave categories, as the official lists are not sorted by label.
            for j in range(per_cat):
                for c, name in enumerate(names):
                    rel = (
                        f"{name.lstrip('/')}/gsun_{hashlib.md5(f'205/{seed}/{split}/{c}/{j}'.encode()).hexdigest()}.jpg"
                    )
                    _save_jpeg(scene_for(split, c, j), images / rel)
                    lines.append(f"{rel} {c}")
            _write_lines(lines, root / "trainvalsplit_places205" / f"{split}_places205.csv")
        return root

    _write_lines([f"{name} {c}" for c, name in enumerate(names)], root / "categories_places365.txt")
    train_lines = []
    for c, name in enumerate(names):
        for j in range(train_per_category):
            rel = f"{name}/{j + 1:08d}.jpg"
            _save_jpeg(scene_for("train", c, j), root / "data_256" / rel.lstrip("/"))
            train_lines.append(f"{rel} {c}")
    _write_lines(train_lines, root / "places365_train_standard.txt")
    val_lines = []
    k = 0
    for j in range(val_per_category):
        for c in range(num_categories):
            k += 1
            fname = f"Places365_val_{k:08d}.jpg"
            _save_jpeg(scene_for("val", c, j), root / "val_256" / fname)
            val_lines.append(f"{fname} {c}")
    _write_lines(val_lines, root / "places365_val.txt")
    return root


# ---------------------------------------------------------------------------------------- cache

_MARKER = ".mae_transfer_toy.json"
_TMP_TAG = ".tmp-"


def is_toy_data(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (a split folder of) a toy dataset that :func:`ensure_toy_dataset` wrote
    (it holds the marker file): its results are the toy data's, not a user's dataset."""
    root = Path(path)
    return (root / _MARKER).exists() or (root.parent / _MARKER).exists()


def toy_cache_dir() -> Path:
    """Where toy datasets are cached: ``$MAE_TRANSFER_CACHE/toy``, else ``~/.cache/mae_transfer/toy``."""
    base = os.environ.get("MAE_TRANSFER_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "mae_transfer") / "toy"


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, digest: str) -> bool:
    marker = _read_marker(folder)
    return marker is not None and marker.get("hash") == digest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_temps(final: Path) -> None:
    """Delete temp folders that crashed writers of ``final`` left behind on this host."""
    host = socket.gethostname()
    prefix = f".{final.name}{_TMP_TAG}"
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        if not p.name.startswith(prefix):
            continue
        # Only this host's pids can be checked; a live writer's folder must never be removed.
        parts = p.name[len(prefix) :].split("-")
        if (
            len(parts) >= 3
            and parts[0] == host.replace("-", "_")
            and parts[1].isdigit()
            and not _pid_alive(int(parts[1]))
        ):
            log.info("removing %s, left behind by an interrupted toy-data writer", p)
            shutil.rmtree(p, ignore_errors=True)


def ensure_toy_dataset(
    kind: str,
    writer: Callable[..., Path],
    root: str | os.PathLike | None = None,
    *,
    fixed: Mapping[str, Any] | None = None,
    subdir: str | None = None,
    **kwargs: Any,
) -> Path:
    """Write the toy dataset ``kind`` with ``writer`` once and return the path to pass as ``--data``.

    The tasks declare their toy datasets (``TaskSpec.toy_data``: name, writer, fixed options,
    sub-folder); their callers pass them here.

    Args:
        kind: the dataset's name (``coco``, ``inat2018``...): its cache folder, its marker, the messages.
        writer: one of this module's writers, ``writer(root, **fixed, **kwargs)`` (``write_inat``).
        root: folder to hold the dataset. Default: ``toy_cache_dir() / f"{kind}-{hash}"``, the hash
            covering the writer's arguments (defaults included) and :data:`GENERATOR_VERSION`.
        fixed: the writer arguments the dataset fixes (``year=2018`` for ``inat2018``).
        subdir: the folder under ``root`` to return (ADE20K's ``ADEChallengeData2016``).
        **kwargs: other arguments of the writer (e.g. ``train_per_class=12`` for ``write_imagefolder``).

    Returns:
        The dataset root, or its ``subdir``.

    The dataset is written into a temporary sibling folder, marked complete, then renamed into
    place, so a crash never leaves a folder that looks usable. When several processes (e.g.
    torchrun ranks) call this at once, each writes its own copy and the losers of the rename race
    delete theirs and use the winner's. A folder already at ``root`` is reused only if it carries
    the completion marker of the same arguments.
    """
    fixed = dict(fixed or {})
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ValueError(f"toy dataset kind {kind!r} fixes {', '.join(clash)}")
    bound = inspect.signature(writer).bind(None, **fixed, **kwargs)
    bound.apply_defaults()
    params = {k: v for k, v in bound.arguments.items() if k != "root"}
    digest = hashlib.sha256(
        json.dumps({"kind": kind, "version": GENERATOR_VERSION, "params": params}, sort_keys=True, default=str).encode()
    ).hexdigest()[:12]
    user_root = root is not None
    final = (Path(root).expanduser() if user_root else toy_cache_dir() / f"{kind}-{digest}").absolute()

    def result(folder: Path) -> Path:
        return folder / subdir if subdir else folder

    if _is_complete(final, digest):
        log.debug("using the toy %s dataset in %s", kind, final)
        return result(final)
    if final.exists():
        marker = _read_marker(final)
        if user_root:
            if marker is not None:
                what = f"toy {marker.get('kind')} dataset"
                if marker.get("kind") == kind:
                    what += f" written with other settings ({marker.get('params')})"
                raise DataError(f"{final} already holds a {what}; remove it or choose another output folder")
            if not final.is_dir() or any(final.iterdir()):
                raise DataError(f"{final} exists and is not a toy dataset; choose a new or empty folder to write it to")
        else:
            # A cache entry without our marker (e.g. copied in by hand, half-deleted): replace it.
            trash = final.parent / f".{final.name}.stale-{uuid.uuid4().hex[:8]}"
            try:
                if _is_complete(final, digest):  # another process finished it meanwhile
                    return result(final)
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except FileNotFoundError:
                pass  # another process moved it first
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    host = socket.gethostname().replace("-", "_")
    tmp = final.parent / f".{final.name}{_TMP_TAG}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("writing the toy %s dataset to %s (once; later runs reuse it)", kind, final)
    try:
        tmp.mkdir(parents=True)
        writer(tmp, **fixed, **kwargs)
        # The marker is written last: a folder holding it is complete.
        (tmp / _MARKER).write_text(
            json.dumps(
                {"kind": kind, "hash": digest, "version": GENERATOR_VERSION, "params": params},
                sort_keys=True,
                default=str,
            )
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final, digest):
                raise
            log.info("another process wrote %s first; using its copy", final)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result(final)
