"""Labelled image lists for classification transfer: iNaturalist, Places and ImageNet-style folders.

Every reader returns a :class:`LabeledImageList`, which shares all sample handling with
:class:`~mae_transfer.data.folder.ImageFolderDataset` (per-sample seeded transforms, the shared
corrupt-file counter and skipping, RGB decoding): it is an ``ImageFolderDataset`` whose sample list
comes from an annotation file instead of a folder scan.

Label-index policy:

* iNaturalist: label = position of the category id in the sorted list of every category id listed
  in ``train{year}.json`` and ``val{year}.json`` together, names from ``categories[].name``.
* Places205: the labels of the official lists as they are; ``num_classes`` = largest label of both
  lists + 1 (205 on the real data).
* Places365: the labels of ``categories_places365.txt``.
* ImageNet-style folders: sorted train class-folder names; val uses the train mapping.

Files listed in an annotation but absent on disk are found once, at construction, with one
directory listing per folder; ``missing="error"`` stops with their count and the first name,
``missing="skip"`` leaves them out (``num_missing``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mae_transfer.classification.data_spec import TOY_DATA
from mae_transfer.data.errors import DataError
from mae_transfer.data.folder import ImageFolderDataset
from mae_transfer.data.index import PackedStrings, PathLabels, absent_files, cached_index, read_json
from mae_transfer.data.toy import ensure_toy_dataset

log = logging.getLogger(__name__)

DATASET_KINDS = tuple(TOY_DATA)
"""Dataset kinds :func:`build_dataset` reads (``imagefolder``, ``inat2017``... from the task specs)."""

SPLITS = ("train", "val")
"""Splits every reader provides."""

INAT_YEARS = (2017, 2018, 2019)

# Where the official archives put the images, relative to the dataset root (tried in this order).
PLACES205_IMAGE_DIRS = ("data/vision/torralba/deeplearning/images256", "images256")
# Places365: train_256_places365standard.tar / train_large_places365standard.tar extract to data_256/
# and data_large/ (only torchvision's downloader renames them *_standard); val_256.tar / val_large.tar
# to val_256/ and val_large/.
PLACES365_IMAGE_DIRS = {
    "train": ("data_256", "data_large", "data_256_standard", "data_large_standard"),
    "val": ("val_256", "val_large"),
}

_MISSING_POLICIES = ("error", "skip")
_EXAMPLES = 5  # file names quoted in a warning


# ---------------------------------------------------------------------------------------- the dataset


class LabeledImageList(ImageFolderDataset):
    """Images named by an annotation list, with labels; the classification datasets' common base.

    Args:
        root: folder the sample paths are relative to (absolute sample paths are used as given).
        samples: ``[(relative_path, label), ...]`` in the annotation's order.
        classes: class names; label ``k`` is ``classes[k]``.
        transform: applied to the RGB PIL image; without one the item's image is a ``uint8``
            ``(3, H, W)`` tensor.
        seed: per-sample seeding of the transform from ``(seed, epoch, index)``, see
            :class:`~mae_transfer.data.folder.ImageFolderDataset`.
        missing: what to do with listed files that are not on disk: ``"error"`` raises
            :class:`DataError`, ``"skip"`` leaves them out with one warning.
        max_corrupt_fraction: raise :class:`DataError` once more than this fraction of the files
            turned out undecodable (corrupt files are replaced by the next readable one).
        source: the annotation file the samples came from, for messages.
        check_files: look for missing files; False when the caller has just listed them on disk.

    Items are dicts ``{"image", "label", "index"}``.

    Attributes:
        classes, class_to_idx, targets, samples (``[(full_path, label), ...]``, present files only),
        num_classes, num_missing, missing_files (the relative paths left out), annotation_file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
        seed: int | None = None,
        missing: str = "error",
        max_corrupt_fraction: float = 0.1,
        source: str | os.PathLike | None = None,
        check_files: bool = True,
    ):
        if missing not in _MISSING_POLICIES:
            raise ValueError(f"missing must be one of {_MISSING_POLICIES} (got {missing!r})")
        # The base constructor calls _scan(), which reads these.
        self._listed = samples
        self._given_classes = [str(c) for c in classes]
        self.missing = missing
        self.check_files = check_files
        self.annotation_file = None if source is None else str(source)
        self.missing_files: list[str] = []
        super().__init__(root, split=None, transform=transform, max_corrupt_fraction=max_corrupt_fraction, seed=seed)
        del self._listed, self._given_classes

    @property
    def num_classes(self) -> int:
        """Outputs a classifier for this dataset needs: ``len(classes)``."""
        return len(self.classes)

    @property
    def num_missing(self) -> int:
        """How many listed files were not on disk and left out (``missing="skip"``)."""
        return len(self.missing_files)

    def _source_text(self) -> str:
        return f"listed in {self.annotation_file}" if self.annotation_file else "listed in the annotations"

    def _scan(self) -> tuple[Path, list[str], PathLabels]:
        # Replaces the folder scan of ImageFolderDataset: the samples come from the annotation.
        root, classes, listed = self.root, self._given_classes, self._listed
        if not root.is_dir():
            what = "does not exist" if not root.exists() else "is not a folder"
            raise DataError(
                f"image folder {root} (for the images {self._source_text()}) {what}; "
                "point --data at the dataset root that holds the images"
            )
        if not len(listed):
            raise DataError(f"no images are {self._source_text()}; check that the file is complete")
        if not isinstance(listed, PathLabels):
            bad = next(
                (lab for _, lab in listed if not isinstance(lab, (int, np.integer)) or isinstance(lab, bool)), None
            )
            if bad is not None:
                raise DataError(
                    f"label {bad!r} {self._source_text()} is not a class index in 0..{len(classes) - 1}; "
                    "the annotation and the class list do not match"
                )
            listed = PathLabels(
                PackedStrings.pack(rel for rel, _ in listed), np.array([lab for _, lab in listed], dtype=np.int64)
            )
        labels = np.asarray(listed.labels)
        out_of_range = np.flatnonzero((labels < 0) | (labels >= len(classes)))
        if len(out_of_range):
            raise DataError(
                f"label {int(labels[out_of_range[0]])!r} {self._source_text()} is not a class index in "
                f"0..{len(classes) - 1}; the annotation and the class list do not match"
            )
        samples = PathLabels(listed.paths, listed.labels, prefix=str(root))
        if self.check_files:
            absent = absent_files(listed.paths.decode_all(), root=root)
            if absent:
                self._report_missing([listed.paths[i] for i in absent], len(listed))
                keep = np.ones(len(listed), dtype=bool)
                keep[absent] = False
                samples.keep = np.flatnonzero(keep)
        return root, classes, samples

    def _report_missing(self, absent: list[str], total: int) -> None:
        first = os.path.join(str(self.root), absent[0])
        hint = ""
        rel = Path(absent[0])
        if not rel.is_absolute() and len(rel.parts) > 1 and not (self.root / rel.parts[0]).exists():
            # The usual cause: the image archive was extracted elsewhere or under another name.
            hint = f" ({self.root / rel.parts[0]} does not exist: were the images extracted somewhere else?)"
        if self.missing == "error" or len(absent) == total:
            advice = (
                (
                    "restore the files, point --data at the folder that holds them, or pass --missing skip "
                    "to leave the missing images out"
                )
                if len(absent) < total
                else "point --data at the folder that holds the images"
            )
            raise DataError(
                f"{len(absent)} of the {total} images {self._source_text()} are not on disk "
                f"(first: {first}){hint}; {advice}"
            )
        self.missing_files = absent
        log.warning(
            "%d of the %d images %s are not on disk and are left out (--missing skip): %s%s",
            len(absent),
            total,
            self._source_text(),
            ", ".join(absent[:_EXAMPLES]),
            ", ..." if len(absent) > _EXAMPLES else "",
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.folder}, {len(self.samples)} images, {self.num_classes} classes"
            + (f", {self.num_missing} missing" if self.num_missing else "")
            + ")"
        )


# ---------------------------------------------------------------------------------------- file helpers


def _require_root(root: str | os.PathLike, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{what} dataset root {path} does not exist; pass --data pointing at the extracted dataset")
    if not path.is_dir():
        raise DataError(f"{what} dataset root {path} is not a folder; pass --data pointing at the extracted dataset")
    return path


def _require_file(path: Path, advice: str) -> Path:
    if not path.is_file():
        state = "is not a file" if path.exists() else "not found"
        raise DataError(f"annotation file {path} {state}; {advice}")
    return path


def _read_text_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not a UTF-8 text file ({e}); the file is damaged: download it again") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}; check that it is readable") from e


def _read_label_list(path: Path, fmt: str = "<relative/path.jpg> <label>") -> list[tuple[str, int]]:
    """``[(path, label), ...]`` from a ``path label`` text list; blank lines are ignored."""
    out = []
    for n, line in enumerate(_read_text_lines(path), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        label = _parse_label(parts[1]) if len(parts) == 2 else None
        if label is None:
            raise DataError(
                f"{path}, line {n}: expected '{fmt}', got {line.strip()!r}; fix or delete that line "
                "(or download the file again)"
            )
        out.append((parts[0].strip(), label))
    return out


def _parse_label(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def _load_json(path: Path) -> Any:
    try:
        return read_json(path)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); the file is truncated or "
            "damaged: download it again"
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not a UTF-8 JSON file ({e}); download it again") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}; check that it is readable") from e


# ---------------------------------------------------------------------------------------- iNaturalist


def _inat_malformed(path: Path, year: int, problem: str) -> DataError:
    return DataError(
        f"{path} is not a valid iNaturalist {year} annotation file: {problem}; download the official file again"
    )


def _inat_entries(data: Any, key: str, path: Path, year: int) -> list:
    if not isinstance(data, dict):
        raise _inat_malformed(path, year, f"the top level is a {type(data).__name__}, not an object")
    value = data.get(key)
    if not isinstance(value, list):
        problem = f"it has no '{key}' list" if value is None else f"'{key}' is a {type(value).__name__}, not a list"
        raise _inat_malformed(path, year, problem)
    return value


def _inat_field(entry: Any, key: str, where: str, path: Path, year: int, id_like: bool = False) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise _inat_malformed(path, year, f"{where} has no '{key}' field")
    value = entry[key]
    if id_like and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise _inat_malformed(path, year, f"{where} has '{key}' {value!r}, which is not an id")
    return value


def _inat_categories(data: Any, path: Path, year: int) -> dict[Any, str]:
    """``{category id: name}`` of one annotation file."""
    cats: dict[Any, str] = {}
    for i, c in enumerate(_inat_entries(data, "categories", path, year)):
        cid = _inat_field(c, "id", f"categories[{i}]", path, year, id_like=True)
        name = str(_inat_field(c, "name", f"categories[{i}]", path, year))
        if cid in cats and cats[cid] != name:
            raise _inat_malformed(path, year, f"category id {cid!r} is listed twice ({cats[cid]!r} and {name!r})")
        cats[cid] = name
    return cats


# Category tables of files read before, so building val after train (or the reverse) does not parse
# the other, possibly 100 MB, json file again. Keyed by file identity, so an edited file is re-read.
_CATEGORY_CACHE: dict[tuple[str, int, int], dict[Any, str]] = {}


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def _cached_categories(path: Path, year: int, data: Any = None) -> dict[Any, str]:
    key = _file_key(path)
    if key not in _CATEGORY_CACHE:
        _CATEGORY_CACHE[key] = _inat_categories(_load_json(path) if data is None else data, path, year)
    return _CATEGORY_CACHE[key]


def _id_order(cid: Any) -> tuple[bool, Any]:
    # Official ids are ints; strings (hand-made files) sort after them instead of raising TypeError.
    return isinstance(cid, str), cid


def inaturalist(root: str | os.PathLike, year: int, split: str, **kw: Any) -> LabeledImageList:
    """iNaturalist 2017/2018/2019 from its official ``train{year}.json`` / ``val{year}.json``.

    ``file_name`` entries are relative to ``root`` (``train_val_images/...`` for 2017,
    ``train_val{year}/...`` for 2018 and 2019). ``kw`` goes to :class:`LabeledImageList`
    (``transform``, ``seed``, ``missing``, ``max_corrupt_fraction``).
    """
    if year not in INAT_YEARS:
        raise DataError(f"iNaturalist year must be one of {', '.join(map(str, INAT_YEARS))} (got {year})")
    _check_split(split)
    root = _require_root(root, f"iNaturalist {year}")
    archive = "train_val2017.zip" if year == 2017 else f"{split}{year}.json.tar.gz"
    path = _require_file(
        root / f"{split}{year}.json",
        f"download the official iNaturalist {year} annotations ({archive}) and extract them into {root}",
    )
    other_split = "val" if split == "train" else "train"
    other_path = root / f"{other_split}{year}.json"
    if not other_path.is_file():
        log.warning(
            "%s not found: class indices cover only the categories of %s and may differ from a run that has both files",
            other_path,
            path.name,
        )
    sources = [path] + ([other_path] if other_path.is_file() else [])
    cached = cached_index(f"inat{year}", sources, {"split": split}, lambda: _inat_index(path, other_path, year))
    meta = cached[1]
    if meta["conflicts"]:
        log.warning(
            "%s: %d images have several annotations with different categories; using the first of each",
            path,
            meta["conflicts"],
        )
    if meta["unlabelled"]:
        log.warning(
            "%s: %d of the %d images have no annotation and are left out (e.g. %s)",
            path,
            meta["unlabelled"],
            meta["images"],
            meta["unlabelled_example"],
        )
    return _listed_dataset(root, cached, source=path, **kw)


def _samples_index(samples: Sequence[tuple[str, int]], classes: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of a cached sample list: relative paths, labels and class names."""
    return {
        **PackedStrings.pack(rel for rel, _ in samples).arrays("path"),
        "label": np.array([lab for _, lab in samples], dtype=np.int64),
        **PackedStrings.pack(classes).arrays("class"),
    }


def _listed_dataset(images: Path, cached: tuple, source: Path, **kw: Any) -> LabeledImageList:
    arrays, _, info = cached
    samples = PathLabels(PackedStrings.from_arrays(arrays, "path"), arrays["label"])
    classes = list(PackedStrings.from_arrays(arrays, "class"))
    ds = LabeledImageList(images, samples, classes, source=source, **kw)
    ds.index_info = info
    return ds


def _inat_index(path: Path, other_path: Path, year: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse one iNaturalist split (and the other split's categories) into flat arrays."""
    data = _load_json(path)
    own = _cached_categories(path, year, data)
    # Labels index the sorted ids of BOTH files' categories, not only this split's: iNat categories
    # can be absent from one split (the official files list all of them, hand-made subsets may
    # not), and a class seen only in val must still get an index below num_classes, the same in
    # both splits, so the classifier has an output for it and val top-1 counts it as an error
    # instead of crashing or silently shifting every later label.
    categories = dict(own)
    if other_path.is_file():
        for cid, name in _cached_categories(other_path, year).items():
            categories.setdefault(cid, name)
    ids = sorted(categories, key=_id_order)
    index = {cid: k for k, cid in enumerate(ids)}

    images = _inat_entries(data, "images", path, year)
    file_of: dict[Any, str] = {}
    for i, im in enumerate(images):
        iid = _inat_field(im, "id", f"images[{i}]", path, year, id_like=True)
        name = _inat_field(im, "file_name", f"images[{i}]", path, year)
        if not isinstance(name, str) or not name:
            raise _inat_malformed(path, year, f"images[{i}] has file_name {name!r}, not a path")
        if iid in file_of:
            raise _inat_malformed(path, year, f"image id {iid!r} is listed twice (images[{i}])")
        file_of[iid] = name
    label_of: dict[Any, int] = {}
    conflicts = 0
    for i, ann in enumerate(_inat_entries(data, "annotations", path, year)):
        iid = _inat_field(ann, "image_id", f"annotations[{i}]", path, year, id_like=True)
        cid = _inat_field(ann, "category_id", f"annotations[{i}]", path, year, id_like=True)
        if iid not in file_of:
            raise _inat_malformed(path, year, f"annotations[{i}] refers to image id {iid!r}, which is not in 'images'")
        if cid not in own:
            raise _inat_malformed(
                path, year, f"annotations[{i}] refers to category id {cid!r}, which is not in 'categories'"
            )
        if iid in label_of and label_of[iid] != index[cid]:
            conflicts += 1
            continue  # keep the first label: iNat has one label an image
        label_of[iid] = index[cid]
    del data, images
    unlabelled = [iid for iid in file_of if iid not in label_of]
    samples = [(name.lstrip("/"), label_of[iid]) for iid, name in file_of.items() if iid in label_of]
    classes = [categories[cid] for cid in ids]
    meta = {
        "conflicts": conflicts,
        "unlabelled": len(unlabelled),
        "images": len(file_of),
        "unlabelled_example": file_of[unlabelled[0]] if unlabelled else None,
    }
    return _samples_index(samples, classes), meta


# ---------------------------------------------------------------------------------------- Places


def _find_image_dir(root: Path, candidates: Sequence[str], what: str) -> Path:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    tried = " or ".join(str(root / c) for c in candidates)
    raise DataError(f"no {what} image folder found (looked for {tried}); extract the image archive into {root}")


def _places205_class_name(rel: str) -> str | None:
    # "a/abbey/gsun_x.jpg" -> "/a/abbey": the Places365 spelling of the same scene category.
    folder = os.path.dirname(rel.strip("/"))
    return "/" + folder if folder else None


def places205(root: str | os.PathLike, split: str, **kw: Any) -> LabeledImageList:
    """Places205 from ``trainvalsplit_places205/{train,val}_places205.csv`` (``path label`` lines).

    Images are read from ``data/vision/torralba/deeplearning/images256/`` (or ``images256/``).
    ``num_classes`` is the largest label of both lists + 1; class names come from the images'
    category folders (``/a/abbey``), ``label_<k>`` where no image of a class is listed.
    """
    _check_split(split)
    root = _require_root(root, "Places205")
    lists = root / "trainvalsplit_places205"
    advice = f"download trainvalsplit_places205.tar.gz and extract it into {root}"
    path = _require_file(lists / f"{split}_places205.csv", advice)
    other = lists / f"{'val' if split == 'train' else 'train'}_places205.csv"
    if not other.is_file():
        log.warning("%s not found: the class count comes from %s alone", other, path.name)
    images = _find_image_dir(root, PLACES205_IMAGE_DIRS, "Places205")

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        samples = _read_label_list(path)
        everything = list(samples)
        if other.is_file():
            everything += _read_label_list(other)
        num_classes = max(label for _, label in everything) + 1
        names: dict[int, str] = {}
        for rel, label in everything:
            if label not in names:
                name = _places205_class_name(rel)
                if name is not None:
                    names[label] = name
        classes = [names.get(k, f"label_{k}") for k in range(num_classes)]
        return _samples_index([(rel.lstrip("/"), lab) for rel, lab in samples], classes), {}

    sources = [path] + ([other] if other.is_file() else [])
    return _listed_dataset(images, cached_index("places205", sources, {"split": split}, build), source=path, **kw)


def _places365_categories(path: Path) -> list[str]:
    entries = _read_label_list(path, fmt="/<letter>/<category> <index>")
    by_index: dict[int, str] = {}
    for name, idx in entries:
        if idx in by_index:
            raise DataError(f"{path}: index {idx} is given to both {by_index[idx]} and {name}; download the file again")
        by_index[idx] = name
    gaps = [k for k in range(len(by_index)) if k not in by_index]
    if gaps:
        raise DataError(
            f"{path}: no category has index {gaps[0]} (indices must be 0..{len(by_index) - 1}); download the file again"
        )
    return [by_index[k] for k in range(len(by_index))]


def places365(root: str | os.PathLike, split: str, **kw: Any) -> LabeledImageList:
    """Places365-Standard from ``categories_places365.txt``, ``places365_train_standard.txt`` and
    ``places365_val.txt``.

    Train paths are relative to ``data_256/`` or ``data_large/`` (the official archives' folders;
    torchvision's ``data_256_standard/`` / ``data_large_standard/`` too), val file names to
    ``val_256/`` or ``val_large/`` (the 256-pixel folder when both exist).
    """
    _check_split(split)
    root = _require_root(root, "Places365")
    advice = f"download filelist_places365-standard.tar and extract it into {root}"
    categories = _require_file(root / "categories_places365.txt", advice)
    name = "places365_train_standard.txt" if split == "train" else "places365_val.txt"
    path = _require_file(root / name, advice)
    images = _find_image_dir(root, PLACES365_IMAGE_DIRS[split], f"Places365 {split}")

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        classes = _places365_categories(categories)
        samples = [(rel.lstrip("/"), label) for rel, label in _read_label_list(path)]
        return _samples_index(samples, classes), {}

    return _listed_dataset(images, cached_index("places365", [categories, path], {}, build), source=path, **kw)


# ---------------------------------------------------------------------------------------- image folders


def _class_folders(folder: Path) -> list[str]:
    """Class names the way ImageFolderDataset derives them: sorted visible sub-folders."""
    try:
        return sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        raise DataError(f"cannot list {folder}: {e}; check that it is readable") from e


def image_folder(root: str | os.PathLike, split: str, missing: str = "error", **kw: Any) -> LabeledImageList:
    """An ImageNet-style ``root/{train,val}/<class>/<image>`` folder, read by ``ImageFolderDataset``.

    Labels follow the sorted train class folders in both splits, so a val folder that lacks a class
    keeps train's indices. A val-only class folder with images raises :class:`DataError` (the
    classifier has no output for it); an empty one is ignored. ``missing`` is accepted for a
    uniform interface; the files were just listed, so none can be missing.
    """
    _check_split(split)
    scanned = ImageFolderDataset(root, split)
    if not scanned.classes:
        raise DataError(
            f"{scanned.folder} holds images but no class folders; classification needs "
            f"{scanned.root}/{split}/<class>/<image>"
        )
    classes = scanned.classes
    train_dir = scanned.root / "train"
    if split != "train" and scanned.folder != scanned.root:
        if train_dir.is_dir():
            classes = _class_folders(train_dir)
        else:
            log.warning("%s does not exist: %s labels follow its own class folders", train_dir, split)
    elif split != "train":
        log.warning("%s has no %s folder: evaluating on the same images as training", scanned.root, split)
    index = {name: k for k, name in enumerate(classes)}
    extra = Counter(
        scanned.classes[label]
        for label in scanned.samples.label_array().tolist()
        if scanned.classes[label] not in index
    )
    if extra:
        name, count = sorted(extra.items())[0]
        raise DataError(
            f"{scanned.folder / name} is a class folder ({count} image{'s' if count > 1 else ''}) "
            f"that {train_dir} lacks"
            f"{f' ({len(extra)} such folders)' if len(extra) > 1 else ''}; the classifier has no output for it: "
            "add the class to train, or remove or rename the folder in val"
        )
    remap = np.array([index.get(name, -1) for name in scanned.classes], dtype=np.int64)  # -1: empty val-only folder
    samples = PathLabels(scanned.samples.paths, remap[np.asarray(scanned.samples.labels)])
    return LabeledImageList(scanned.folder, samples, classes, source=None, check_files=False, **kw)


# ---------------------------------------------------------------------------------------- entry point


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")


def build_dataset(
    kind: str,
    root: str | os.PathLike | None,
    split: str,
    transform: Callable[[Image.Image], Any] | None = None,
    seed: int | None = None,
    missing: str = "error",
) -> LabeledImageList:
    """The ``split`` ("train" or "val") of dataset ``kind`` (one of :data:`DATASET_KINDS`) at ``root``.

    ``root=None`` reads the built-in toy dataset of that kind, written in the real on-disk format
    (and cached) by :func:`~mae_transfer.data.toy.ensure_toy_dataset`.
    """
    if kind not in DATASET_KINDS:
        raise DataError(f"unknown classification dataset {kind!r}; choose one of {', '.join(DATASET_KINDS)}")
    _check_split(split)
    if root is None:
        root = ensure_toy_dataset(**TOY_DATA[kind].arguments())
        log.warning(
            "no --data given: using the built-in TOY %s dataset (synthetic shapes in the official layout) at %s; "
            "its numbers say nothing about the real dataset",
            kind,
            root,
        )
    kw: dict[str, Any] = {"transform": transform, "seed": seed, "missing": missing}
    if kind == "imagefolder":
        return image_folder(root, split, **kw)
    if kind.startswith("inat"):
        return inaturalist(root, int(kind[4:]), split, **kw)
    if kind == "places205":
        return places205(root, split, **kw)
    return places365(root, split, **kw)


def num_classes_of(dataset: Dataset) -> int:
    """Classifier outputs ``dataset`` needs: its ``num_classes``, ``len(classes)`` or max target + 1.

    Looks through ``torch.utils.data.Subset`` (and other wrappers with a ``dataset`` attribute).
    """
    for _ in range(16):  # wrappers nest only a few levels; this bounds a self-referencing one
        if isinstance(getattr(dataset, "num_classes", None), int):
            return int(dataset.num_classes)
        classes = getattr(dataset, "classes", None)
        if classes:
            return len(classes)
        inner = getattr(dataset, "dataset", None)
        if inner is None:
            break
        dataset = inner
    targets: Iterable[int] | None = getattr(dataset, "targets", None)
    if targets is not None:
        targets = [int(t) for t in targets]
        if targets:
            return max(targets) + 1
    raise TypeError(
        f"cannot tell the number of classes of {type(dataset).__name__}: it has no num_classes, classes or targets"
    )
