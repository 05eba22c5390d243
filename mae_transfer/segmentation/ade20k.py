"""ADE20K (SceneParse150) data: the dataset reader, the training and evaluation transforms, class names and palette.

Layout (the official ``ADEChallengeData2016.zip``, the toy data of :mod:`mae_transfer.data.toy` and a
user's own data alike)::

    <root>/images/<split>/<stem>.jpg          RGB (grayscale / CMYK JPEGs are converted)
    <root>/annotations/<split>/<stem>.png     uint8 class indices: 0 = other/unlabelled, 1..150 = classes
    <root>/objectInfo150.txt                  optional: the devkit's class table (names for reports)

``<root>`` may also be the folder that holds ``ADEChallengeData2016/``.

Training recipe numbers and their sources (MAE paper A.4 uses BEiT's semantic-segmentation code, which
is mmsegmentation 0.x; mmsegmentation 1.x keeps the same ADE20K pipeline):

* mmsegmentation ``configs/_base_/datasets/ade20k.py`` and BEiT ``semantic_segmentation/configs/_base_/
  datasets/ade20k.py``: ``reduce_zero_label=True``; training ``RandomResize(scale=(2048, 512),
  ratio_range=(0.5, 2.0), keep_ratio=True)`` -> ``RandomCrop(512, cat_max_ratio=0.75)`` ->
  ``RandomFlip(prob=0.5)`` -> ``PhotoMetricDistortion`` -> normalise -> pad to 512 x 512 with image 0 and
  label 255 (BEiT: ``Pad(size=crop_size, pad_val=0, seg_pad_val=255)`` after ``Normalize``; mmseg 1.x:
  ``SegDataPreProcessor(size=crop_size, pad_val=0, seg_pad_val=255)``); test ``Resize(scale=(2048, 512),
  keep_ratio=True)`` with the metrics at the original label resolution.
* mmcv ``rescale_size``: factor = min(long / long side, short / short side), new size
  ``int(side * factor + 0.5)``; ``RandomResize._random_sample_ratio``: ``int(scale * ratio)`` per edge.
* mmseg ``RandomCrop.crop_bbox``: up to 10 checks of "more than one class and the largest covers less
  than ``cat_max_ratio`` of the non-ignored pixels", drawing a new window after each failed check.
* mmseg ``PhotoMetricDistortion``: brightness delta 32, contrast (0.5, 1.5), saturation (0.5, 1.5), hue
  delta 18 on OpenCV's 0-180 hue scale, each with probability 0.5, contrast first or last at random.
* Palette: mmsegmentation ``mmseg/datasets/ade.py`` (``ADE20KDataset.METAINFO['palette']``; the same
  table is ``PALETTE`` in mmseg 0.x), from the ADE20K devkit's ``color150``.
* Pixels are resized and colour-converted with OpenCV, as mmcv does (``cv2.resize`` with
  ``INTER_LINEAR`` / ``INTER_NEAREST`` on uint8, ``cv2.cvtColor`` to and from HSV), so the inputs are
  the same bytes mmsegmentation computes.

Random draws come only from torch's global generator, so :class:`~mae_transfer.data.seeded.SeededTransformDataset`
makes every sample's augmentation reproducible.
"""

from __future__ import annotations

import colorsys
import csv
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from mae_transfer.data.errors import DataError
from mae_transfer.data.folder import load_rgb
from mae_transfer.data.index import StringPairs
from mae_transfer.data.stats import IMAGENET_MEAN, IMAGENET_STD
from mae_transfer.segmentation.data_spec import NUM_CLASSES  # SceneParse150: label maps hold 1..150, 0 = unlabelled

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
"""Label value of pixels that are neither trained on nor evaluated."""

ADE_FOLDER = "ADEChallengeData2016"
"""The folder the official archive unpacks to."""

CLASS_FILES = ("objectInfo150.txt", "objectInfo150.csv")
"""Class tables looked for beside ``images/``: the devkit's text file first (its names are exact)."""

_LABEL_MODES = ("L", "P", "1", "I", "I;16", "I;16L", "I;16B", "I;16N")  # single-channel integer PIL modes

# The 150 ADE20K colours (RGB, class 0..149 after reduce_zero_label), written as hex triples. Source:
# mmsegmentation mmseg/datasets/ade.py, ADE20KDataset.METAINFO["palette"] (mmseg 0.x: ADE20KDataset.PALETTE),
# checked against a second copy of that table (SETR's mmseg fork); it is the devkit's color150 table.
_ADE_PALETTE_HEX = """
787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07
e005ff ebff07 96053d 787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603
0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff
08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 ffc207
ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff 8c8c8c fa0a0f
14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff
0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00
008fff 33ff00 0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff
ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2
00ff52 000aff 0070ff 3300ff 00c2ff 007aff 00ffa3 ff9900 00ff0a ff7000
8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff ff001f 00b8ff
00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3
ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00
00ccff 1400ff ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff
4700ff 7a00ff 00ffb8 005cff b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff
"""


# ---------------------------------------------------------------------------------------- layout and metadata


def _layout(root: Path) -> str:
    return (
        f"{root}/images/<split>/<name>.jpg with label maps {root}/annotations/<split>/<name>.png "
        f"(or the same inside {root}/{ADE_FOLDER}), <split> being training or validation"
    )


def find_root(root: str | os.PathLike) -> Path:
    """The folder that holds ``images/`` and ``annotations/``: ``root`` itself or ``root/ADEChallengeData2016``.

    The official archive and the toy data have the ``ADEChallengeData2016`` wrapper; a bare copy of its
    contents (or a user's own data) has not. Anything else raises :class:`DataError` describing the layout.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{root} does not exist or is not a folder; pass the ADEChallengeData2016 folder: {_layout(root)}"
        )
    for folder in (root, root / ADE_FOLDER):
        if (folder / "images").is_dir() and (folder / "annotations").is_dir():
            return folder
    raise DataError(
        f"{root} is not an ADE20K-style dataset (no images/ and annotations/ folders); expected {_layout(root)}"
    )


def _first_synonym(name: str, separator: str) -> str:
    return name.split(separator)[0].strip()


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from the devkit's ``objectInfo150.txt`` or ``objectInfo150.csv``, in index order 1..N.

    The text file is tab separated with the header ``Idx Ratio Train Val Name``; a name lists synonyms
    separated by ``", "`` and is shortened to the first (``"building, edifice"`` -> ``"building"``). The csv
    (``Idx,Ratio,Train,Val,Stuff,Name``) separates synonyms by ``";"``. Note that the csv also writes the
    spaces inside a name as ``";"`` (``chest;of;drawers;chest;...``), so its multi-word names come out as
    their first word; prefer the text file where both exist.

    Returns ``N`` names for indices ``1..N`` (which must all be present once). A file that cannot be read
    or parsed raises one :class:`DataError` naming it.
    """
    path = Path(path)
    is_csv = path.suffix.lower() == ".csv"
    fix = "fix it or remove it (class names then default to class_0, class_1, ...)"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the class table {path} ({e}); {fix}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if is_csv:
        rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO("\n".join(lines)))]
    else:
        rows = [[cell.strip() for cell in line.split("\t")] for line in lines]
        if rows and len(rows[0]) == 1:  # a copy whose tabs became spaces: header words have no spaces
            rows[0] = lines[0].split()
    if not rows:
        raise DataError(f"the class table {path} is empty; {fix}")
    header = [h.lower() for h in rows[0]]
    if "idx" not in header or "name" not in header:
        expected = "Idx,Ratio,Train,Val,Stuff,Name" if is_csv else "Idx<TAB>Ratio<TAB>Train<TAB>Val<TAB>Name"
        raise DataError(f"{path}: the first line should be the header {expected!r}, found {lines[0]!r}; {fix}")
    i_idx, i_name = header.index("idx"), header.index("name")
    names: dict[int, str] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not is_csv and len(row) == 1:
            # A copy whose tabs became runs of spaces: Idx Ratio Train Val, then the name (which has spaces).
            row = [cell.strip() for cell in row[0].split(None, len(header) - 1)]
        if len(row) != len(header):
            raise DataError(f"{path}: line {line_no} has {len(row)} fields where the header has {len(header)}; {fix}")
        try:
            idx = int(row[i_idx])
        except ValueError:
            raise DataError(f"{path}: line {line_no}: the index {row[i_idx]!r} is not a whole number; {fix}") from None
        name = _first_synonym(row[i_name], ";" if is_csv else ",")
        if not name:
            raise DataError(f"{path}: line {line_no}: class {idx} has no name; {fix}")
        if idx in names:
            raise DataError(f"{path}: line {line_no}: class index {idx} appears twice; {fix}")
        names[idx] = name
    if not names:
        raise DataError(f"the class table {path} has a header but no classes; {fix}")
    if sorted(names) != list(range(1, len(names) + 1)):
        gaps = sorted(set(range(1, max(names) + 1)) - set(names))[:5]
        raise DataError(
            f"{path}: class indices must run 1..N without gaps "
            f"(missing e.g. {gaps}, found {min(names)}..{max(names)}); {fix}"
        )
    return [names[i] for i in range(1, len(names) + 1)]


def class_tables(root: str | os.PathLike) -> list[Path]:
    """Class tables beside the data, in the order they are tried: ``classes.txt`` (one name per line,
    class 0 first), the devkit's ``objectInfo150.txt``, any other ``objectInfo*.txt``, then the csv."""
    root = Path(root)
    found = [root / "classes.txt"] + [root / n for n in CLASS_FILES if n.endswith(".txt")]
    found += sorted(p for p in root.glob("objectInfo*.txt") if p not in found)
    found += [root / n for n in CLASS_FILES if n.endswith(".csv")]
    return [p for p in found if p.is_file()]


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Names from a plain list, one per line in class order (blank lines skipped)."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"cannot read the class list {path} ({e}); fix it or remove it (class names then default to class_0, ...)"
        ) from None
    if not names:
        raise DataError(
            f"the class list {path} is empty; fix it or remove it (class names then default to class_0, ...)"
        )
    return names


def class_names_for(root: str | os.PathLike, num_classes: int) -> list[str]:
    """Names of classes ``0..num_classes-1`` from the first table of :func:`class_tables` that parses and
    lists exactly ``num_classes`` classes; otherwise ``["class_0", "class_1", ...]``.

    A table that is unusable (malformed, or of another length, e.g. an ADE20K table beside a 19-class
    dataset) only costs the names: it is logged as a warning, never an error.
    """
    for path in class_tables(root):
        try:
            names = read_class_list(path) if path.name == "classes.txt" else read_class_names(path)
        except DataError as e:
            log.warning("%s", e)
            continue
        if len(names) == num_classes:
            return names
        log.warning(
            "%s lists %d classes but num_classes is %d: using the names class_0, class_1, ...",
            path,
            len(names),
            num_classes,
        )
    return [f"class_{k}" for k in range(num_classes)]


def palette(num_classes: int = NUM_CLASSES) -> np.ndarray:
    """RGB colours ``(num_classes, 3)`` uint8 for drawing label maps.

    For 150 classes: the standard ADE20K palette (mmsegmentation's ``ADE20KDataset`` palette, the devkit's
    ``color150``), colour ``k`` for class ``k`` after ``reduce_zero_label``. For any other count: generated
    deterministically, hues in golden-ratio steps with three brightness and two saturation levels, so
    neighbouring classes differ clearly; no colour is black (which pictures use for ignored pixels).
    Returns a fresh array the caller may modify.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (got {num_classes})")
    if num_classes == NUM_CLASSES:
        return np.frombuffer(bytes.fromhex("".join(_ADE_PALETTE_HEX.split())), dtype=np.uint8).reshape(-1, 3).copy()
    golden = 0.6180339887498949
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        hue = (0.08 + k * golden) % 1.0
        value = (0.95, 0.72, 0.52)[k % 3]
        saturation = (0.9, 0.55)[(k // 3) % 2]
        rgb = colorsys.hsv_to_rgb(hue, saturation, value)
        colours[k] = [int(round(c * 255)) for c in rgb]
    return colours


# ---------------------------------------------------------------------------------------- dataset


class SegmentationFolder(torch.utils.data.Dataset):
    """Images with per-pixel label maps in the ADE20K layout, with ``num_classes`` classes.

    Reads ``images/<split>/<stem>.<ext>`` paired with ``annotations/<split>/<stem>.png`` below
    :func:`find_root` of ``root`` (non-recursively), sorted by stem. Used for ADE20K and for users' own data.

    Args:
        root: the ``ADEChallengeData2016`` folder (or the folder holding it).
        split: the folder name under ``images/`` and ``annotations/`` (``training`` / ``validation``).
        num_classes: classes ``0..num_classes-1`` after the label encoding below.
        reduce_zero_label: ADE20K's encoding: 0 ("other") becomes :data:`IGNORE_INDEX` and ``k`` in
            ``1..num_classes`` becomes ``k-1``. Without it labels are used as they are (``0..num_classes-1``).
            In both cases a stored 255 means "ignore" (as in mmsegmentation).
        transform: ``transform(image, target)`` applied to every item (e.g. :class:`EvalTransform`).
        bad_labels: what to do with label values outside the valid range (``151..254`` for ADE20K):
            ``"error"`` raises :class:`DataError` when the file is read; ``"ignore"`` turns those pixels into
            :data:`IGNORE_INDEX`, adds their number to ``num_bad_label_pixels`` and warns, once per file (a
            file read again, e.g. in the next epoch, is not counted again).
        missing: what to do with an image without its label map: ``"error"`` raises :class:`DataError`
            listing them; ``"skip"`` leaves them out (one warning; their count is ``num_missing``).
        image_exts: image file endings to read, case-insensitive.

    Items are ``(image, target)``: ``image`` a ``uint8`` ``(3, H, W)`` tensor (RGB), ``target`` a dict with
    ``"label"`` (int64 ``(H, W)``), ``"orig_size"`` (int64 tensor ``[H, W]``), ``"index"`` and ``"path"``
    (the image file); then ``transform(image, target)`` when a transform is set. Label values are checked
    when an item is read, not in ``__init__``, so building the dataset decodes nothing.

    ``num_bad_label_pixels`` and ``bad_label_files`` are kept by the process that reads the item: with
    DataLoader workers each worker keeps its own counts (and warns on its own) and the main process's stay
    empty. Read the items in the main process (``num_workers=0``) for dataset-wide counts.

    Attributes:
        root: the folder holding ``images/`` and ``annotations/``.
        samples: ``[(image_path, label_path), ...]``.
        class_names: from ``objectInfo150.txt`` / ``.csv`` in ``root`` or its parent (see
            :func:`class_names_for`), else ``class_0 ...``.
        num_classes, num_missing: images left out for lack of a label map (``missing="skip"``),
        num_bad_label_pixels, bad_label_files: out-of-range pixels ignored so far, and their files.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "validation",
        num_classes: int = NUM_CLASSES,
        reduce_zero_label: bool = True,
        transform: Callable[[torch.Tensor, dict], Any] | None = None,
        bad_labels: str = "error",
        missing: str = "error",
        image_exts: Sequence[str] = (".jpg", ".jpeg", ".png"),
    ):
        if bad_labels not in ("error", "ignore"):
            raise ValueError(f"bad_labels must be 'error' or 'ignore' (got {bad_labels!r})")
        if missing not in ("error", "skip"):
            raise ValueError(f"missing must be 'error' or 'skip' (got {missing!r})")
        top = 254 if reduce_zero_label else 255  # the stored value 255 must stay free for "ignore"
        if not 1 <= int(num_classes) <= top:
            raise DataError(
                f"num_classes={num_classes} does not fit label maps of {root}: "
                f"with reduce_zero_label={bool(reduce_zero_label)} the classes are stored as "
                f"{'1..num_classes' if reduce_zero_label else '0..num_classes-1'} in uint8 with 255 meaning ignore, "
                f"so num_classes must be within 1..{top}; change data.num_classes or data.reduce_zero_label"
            )
        self.root = find_root(root)
        self.split = str(split)
        self.num_classes = int(num_classes)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.transform = transform
        self.bad_labels = bad_labels
        self.missing = missing
        self.image_exts = tuple((e if e.startswith(".") else "." + e).lower() for e in image_exts)
        self.num_missing = 0
        self.num_bad_label_pixels = 0
        self.bad_label_files: set[str] = set()
        self._lut = self._label_table()
        # Two packed string arrays, not a list of tuples: forked workers share them for good.
        self.samples = StringPairs(self._scan())
        self.class_names = self._class_names()

    # ------------------------------------------------------------------ setup
    def _label_table(self) -> np.ndarray:
        """Stored value (0..255) -> training label, -1 for a value outside the valid range."""
        lut = np.full(256, -1, dtype=np.int16)
        if self.reduce_zero_label:
            lut[0] = IGNORE_INDEX
            lut[1 : self.num_classes + 1] = np.arange(self.num_classes)
        else:
            lut[: self.num_classes] = np.arange(self.num_classes)
        lut[IGNORE_INDEX] = IGNORE_INDEX
        return lut

    def valid_range(self) -> str:
        """The stored label values this dataset accepts, in words."""
        if self.reduce_zero_label:
            return f"0 (unlabelled, ignored), 1..{self.num_classes} (the classes) and 255 (ignored)"
        return f"0..{self.num_classes - 1} (the classes) and 255 (ignored)"

    def _scan(self) -> list[tuple[str, str]]:
        image_dir = self.root / "images" / self.split
        label_dir = self.root / "annotations" / self.split
        if not image_dir.is_dir():
            found = sorted(p.name for p in (self.root / "images").iterdir() if p.is_dir())
            raise DataError(
                f"{image_dir} does not exist (splits found in {self.root / 'images'}: {', '.join(found) or 'none'}); "
                f"expected {_layout(self.root)}"
            )
        by_stem: dict[str, list[str]] = {}
        for name in os.listdir(image_dir):
            if name.startswith(".") or not name.lower().endswith(self.image_exts):
                continue
            by_stem.setdefault(os.path.splitext(name)[0], []).append(name)
        if not by_stem:
            raise DataError(f"no images ({', '.join(self.image_exts)}) in {image_dir}; expected {_layout(self.root)}")
        clashes = sorted(stem for stem, names in by_stem.items() if len(names) > 1)
        if clashes:
            examples = "; ".join(", ".join(sorted(by_stem[s])) for s in clashes[:5])
            raise DataError(
                f"{len(clashes)} names in {image_dir} exist with several extensions ({examples}): "
                f"each image needs its own <name>.png label map, so keep one file per name"
            )
        labels = set(os.listdir(label_dir)) if label_dir.is_dir() else set()
        samples, absent = [], []
        for stem in sorted(by_stem):
            label_name = stem + ".png"
            if label_name in labels:
                samples.append((str(image_dir / by_stem[stem][0]), str(label_dir / label_name)))
            else:
                absent.append(str(label_dir / label_name))
        if absent:
            self.num_missing = len(absent)
            if self.missing == "error":
                where = "" if label_dir.is_dir() else f" ({label_dir} does not exist)"
                raise DataError(
                    f"{len(absent)} of {len(by_stem)} images in {image_dir} have no label map{where}: missing "
                    f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}; add them, or pass --missing skip "
                    "(data.missing=skip) to leave those images out"
                )
            log.warning(
                "%d of %d images in %s have no label map in %s: left out (--missing skip)",
                len(absent),
                len(by_stem),
                image_dir,
                label_dir,
            )
        if not samples:
            raise DataError(
                f"none of the {len(by_stem)} images in {image_dir} has a label map in {label_dir}; "
                f"expected {_layout(self.root)}"
            )
        return samples

    def _class_names(self) -> list[str]:
        for folder in (self.root, self.root.parent):
            if class_tables(folder):
                return class_names_for(folder, self.num_classes)
        return [f"class_{k}" for k in range(self.num_classes)]

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, path: str) -> np.ndarray:
        """The class indices of one label map, or one DataError naming the file (not a 1-channel PNG, undecodable)."""
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode not in _LABEL_MODES:
                    raise DataError(
                        f"{path} is a {im.mode} image with {len(im.getbands())} channels; a label map must be a "
                        "single-channel PNG (mode L, or P whose palette indices are the labels) holding class indices, "
                        "not colours: convert it to class indices"
                    )
                # For mode P this gives the palette indices, which are the labels.
                raw = np.array(im)
        except DataError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(
                f"cannot decode the label map {path} ({e}); replace it, or remove it together with its image"
            ) from None
        return raw.astype(np.uint8) if raw.dtype == bool else raw

    def _codes(self, raw: np.ndarray) -> np.ndarray:
        """Stored values -> training labels (int16), -1 for a value outside the valid range."""
        if raw.dtype == np.uint8:
            return self._lut[raw]
        # 16/32-bit label maps: anything beyond 0..255 is out of range
        wide = raw.astype(np.int64)
        inside = (wide >= 0) & (wide <= 255)
        codes = np.full(raw.shape, -1, dtype=np.int16)
        codes[inside] = self._lut[wide[inside]]
        return codes

    @staticmethod
    def _shown_values(raw: np.ndarray, bad: np.ndarray) -> str:
        values = np.unique(raw[bad])
        shown = ", ".join(str(int(v)) for v in values[:5])
        if len(values) > 5:
            shown += f" ... ({len(values)} distinct values)"
        return shown

    def _bad_values_message(self, path: str, shown: str, count: int) -> str:
        return (
            f"{path}: label values {shown} ({count} pixels) are outside the valid range {self.valid_range()} for "
            f"num_classes={self.num_classes}, reduce_zero_label={self.reduce_zero_label}; "
            "check those settings (--num-classes, data.reduce_zero_label), "
            "or pass --bad-labels ignore (data.bad_labels=ignore) to ignore such pixels"
        )

    @staticmethod
    def _image_message(image_path: str, error: BaseException) -> str:
        return f"cannot decode the image {image_path} ({error}); replace it, or remove it together with its label map"

    @staticmethod
    def _size_message(label_path: str, label_shape: tuple[int, ...], image_path: str, width: int, height: int) -> str:
        return (
            f"the label map {label_path} is {label_shape[1]}x{label_shape[0]} (W x H) but its image {image_path} is "
            f"{width}x{height}; a label map must have its image's size: fix or remove the pair"
        )

    def check_sample(self, index: int) -> str | None:
        """What reading item ``index`` would stop on (that ``DataError``'s message), or None. The image
        is decoded without being kept (:func:`~mae_transfer.data.folder.decode_check`), the label map
        is read, their sizes compared and, with ``bad_labels="error"``, its values checked; nothing is
        counted or warned about. Thread-safe."""
        from mae_transfer.data.folder import decode_check

        image_path, label_path = self.samples[index]
        try:
            width, height = decode_check(image_path)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable file"
            return self._image_message(image_path, e)
        try:
            raw = self.read_label(label_path)
        except DataError as e:
            return str(e)
        if raw.shape != (height, width):
            return self._size_message(label_path, raw.shape, image_path, width, height)
        if self.bad_labels == "error":
            bad = self._codes(raw) < 0
            if bad.any():
                return self._bad_values_message(label_path, self._shown_values(raw, bad), int(bad.sum()))
        return None

    def find_bad_samples(self, rank: int = 0, world_size: int = 1, threads: int = 1) -> list[tuple[int, str]]:
        """``[(index, problem), ...]`` of :meth:`check_sample` over the items ``rank::world_size``
        (about 5 ms an ADE20K item and thread: its JPEG at 1/8 scale and its PNG label map)."""
        from mae_transfer.data.folder import find_problems

        return find_problems(self.check_sample, list(range(rank, len(self), world_size)), threads)

    def _encode(self, raw: np.ndarray, path: str) -> np.ndarray:
        """Stored values -> training labels (int64), handling values outside the valid range."""
        codes = self._codes(raw)
        bad = codes < 0
        if bad.any():
            shown = self._shown_values(raw, bad)
            count = int(bad.sum())
            if self.bad_labels == "error":
                raise DataError(self._bad_values_message(path, shown, count))
            codes[bad] = IGNORE_INDEX
            if path not in self.bad_label_files:  # count and warn once per file, however often it is read
                self.bad_label_files.add(path)
                self.num_bad_label_pixels += count
                log.warning(
                    "%s: %d pixels with label values %s outside %s are ignored", path, count, shown, self.valid_range()
                )
        return codes.astype(np.int64)

    def label(self, index: int) -> torch.Tensor:
        """The training labels (int64 ``(H, W)``) of item ``index`` alone, its image left unread (the
        linear protocol's cached features need the label maps only)."""
        label_path = self.samples[range(len(self.samples))[index]][1]
        return torch.from_numpy(self._encode(self.read_label(label_path), label_path))

    def __getitem__(self, index: int):
        index = range(len(self.samples))[index]  # IndexError for out-of-range, support for negative indices
        image_path, label_path = self.samples[index]
        try:
            image = load_rgb(image_path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(self._image_message(image_path, e)) from None
        raw = self.read_label(label_path)
        width, height = image.size
        if raw.shape != (height, width):
            raise DataError(self._size_message(label_path, raw.shape, image_path, width, height))
        label = torch.from_numpy(self._encode(raw, label_path))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        target: dict[str, Any] = {
            "label": label,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "index": index,
            "path": image_path,
        }
        if self.transform is not None:
            return self.transform(pixels, target)
        return pixels, target


# ---------------------------------------------------------------------------------------- transforms


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """``(new_height, new_width)`` of mmcv's keep-ratio ``rescale_size``: the largest size inside ``scale``.

    ``scale`` is a pair of edge lengths in either order; factor = min(long / long side, short / short side)
    and each side becomes ``int(side * factor + 0.5)`` (at least 1). E.g. (2048, 512): a 512 x 683 (H x W)
    image stays as it is, a 200 x 300 image becomes 512 x 768, a 500 x 4000 panorama 256 x 2048.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _cv2():
    import cv2

    if not getattr(_cv2, "configured", False):
        cv2.setNumThreads(0)  # DataLoader workers do the parallel work (mmengine's opencv_num_threads=0)
        _cv2.configured = True
    return cv2


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a uint8 ``(3, H, W)`` image to ``size`` (h, w): OpenCV's ``INTER_LINEAR`` on
    uint8 (fixed-point weights, half-pixel centres, no antialiasing), exactly what mmcv's
    ``imresize`` computes."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = _cv2().resize(
        image.permute(1, 2, 0).contiguous().numpy(), (int(size[1]), int(size[0])), interpolation=_cv2().INTER_LINEAR
    )
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an ``(H, W)`` label map with OpenCV's ``INTER_NEAREST`` (output pixel
    ``i`` takes source ``floor(i * H / h)``), as mmcv resizes label maps; no label value is invented."""
    height, width = label.shape[-2:]
    h, w = size
    if (height, width) == (h, w):
        return label
    if label.numel() and (int(label.min()) < 0 or int(label.max()) > 255):
        raise ValueError("label maps hold values 0..255 (255 = ignored)")
    out = _cv2().resize(label.numpy().astype(np.uint8), (int(w), int(h)), interpolation=_cv2().INTER_NEAREST)
    return torch.from_numpy(out.astype(np.int64))


def rescale_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    """Size of mmcv's ``Resize(scale_factor=ratio, keep_ratio=True)`` (mmseg 1.x test-time
    augmentation): the target ``(int(w r + 0.5), int(h r + 0.5))``, then :func:`keep_ratio_size` to it."""
    target = (int(width * float(ratio) + 0.5), int(height * float(ratio) + 0.5))
    return keep_ratio_size(height, width, target)


def _uniform(low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand(()).item())


def _coin() -> bool:
    return bool(torch.randint(2, ()).item())


def photometric_distortion(
    image: torch.Tensor,
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> torch.Tensor:
    """mmsegmentation's ``PhotoMetricDistortion`` on a uint8 RGB ``(3, H, W)`` image.

    In order, each step with probability 0.5: brightness (add a delta uniform in +-``brightness_delta``),
    contrast (multiply by a factor in ``contrast_range``) here in "mode 1", saturation (scale the HSV
    saturation plane by a factor in ``saturation_range``), hue (add an integer drawn like
    ``numpy.random.randint(-18, 18)`` to OpenCV's 0-180 hue plane, modulo 180), contrast here in "mode 0";
    the mode is drawn at random. Every step clips to 0..255 and truncates to uint8, and saturation and hue
    each go through OpenCV's uint8 HSV and back, exactly as mmseg's arithmetic (``cv2.cvtColor`` of the RGB
    image to HSV equals mmcv's ``bgr2hsv`` of the BGR one).
    """
    cv2 = _cv2()

    def affine(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(img: np.ndarray) -> np.ndarray:
        return affine(img, alpha=_uniform(*contrast_range)) if _coin() else img

    img = image.permute(1, 2, 0).contiguous().numpy()
    if _coin():
        img = affine(img, beta=_uniform(-brightness_delta, brightness_delta))
    mode = int(torch.randint(2, ()).item())
    if mode == 1:
        img = contrast(img)
    if _coin():
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = affine(hsv[:, :, 1], alpha=_uniform(*saturation_range))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if _coin():
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        shift = int(torch.randint(-hue_delta, hue_delta, ()).item())
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + shift) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0:
        img = contrast(img)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


class _Normalise:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3 or min(float(s) for s in std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std positive (got mean={mean}, std={std})")
        # In 0-255 units (123.675, 116.28, 103.53 / 58.395, 57.12, 57.375 for ImageNet), as mmseg's
        # SegDataPreProcessor subtracts and divides, so the floats are the same.
        self.mean = torch.tensor([round(float(m) * 255, 6) for m in mean], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor([round(float(s) * 255, 6) for s in std], dtype=torch.float32).view(3, 1, 1)

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> float32: (pixel - mean) / std (mean and std of 0..1 images, scaled to 0..255)."""
        return (image.float() - self.mean) / self.std


class TrainTransform(_Normalise):
    """ADE20K training augmentation, mmsegmentation's pipeline (see the module docstring for sources).

    ``transform(image, target)`` with a uint8 ``(3, H, W)`` image and ``target["label"]`` int64 ``(H, W)``:

    1. random resize: ``ratio`` uniform in ``ratio_range``, target scale ``int(scale * ratio)`` per edge,
       keep-ratio size of :func:`keep_ratio_size`; image bilinear, label nearest;
    2. random crop of ``crop_size``: a window is drawn and checked up to 10 times, a new one after each
       failed check; it passes when the crop holds more than one non-ignored class and the most frequent
       covers less than ``cat_max_ratio`` of the non-ignored pixels; if none passes, the window drawn after
       the 10th check is used (mmseg ``RandomCrop``; ``cat_max_ratio >= 1`` skips the checks). A side
       shorter than the crop is kept whole;
    3. horizontal flip with probability ``flip_prob``;
    4. :func:`photometric_distortion` when ``photometric``;
    5. normalise with ``mean`` / ``std`` (0-1 scale), then pad bottom / right to ``crop_size``: image with
       0 (the mean), label with :data:`IGNORE_INDEX`.

    Returns ``(image float32 (3, crop_h, crop_w), target)`` with ``target["label"]`` int64
    ``(crop_h, crop_w)``; the other target keys are kept. Draws only from torch's global RNG.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int] = 512,
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__(mean, std)
        self.crop_size = _pair(crop_size)
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        if min(self.crop_size) < 1 or min(self.scale) < 1:
            raise ValueError(f"crop_size and scale must be positive (got {crop_size}, {scale})")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high (got {ratio_range})")
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip_prob must be within 0..1 (got {flip_prob})")
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = bool(photometric)

    def _window(self, height: int, width: int) -> tuple[int, int]:
        top = int(torch.randint(0, max(height - self.crop_size[0], 0) + 1, ()).item())
        left = int(torch.randint(0, max(width - self.crop_size[1], 0) + 1, ()).item())
        return top, left

    def _acceptable(self, window: torch.Tensor) -> bool:
        counts = torch.bincount(window.reshape(-1), minlength=IGNORE_INDEX + 1)
        counts[IGNORE_INDEX] = 0
        counts = counts[counts > 0]
        return counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def crop_box(self, label: torch.Tensor) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` of the random crop of ``label`` (see step 2 of the class docstring)."""
        height, width = label.shape[-2:]
        ch, cw = self.crop_size
        top, left = self._window(height, width)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                if self._acceptable(label[top : top + ch, left : left + cw]):
                    break
                top, left = self._window(height, width)
        return top, left, min(top + ch, height), min(left + cw, width)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        label = target["label"]
        _, height, width = image.shape
        ratio = _uniform(*self.ratio_range)
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = keep_ratio_size(height, width, scale)
        image, label = resize_image(image, size), resize_label(label, size)

        top, left, bottom, right = self.crop_box(label)
        image, label = image[:, top:bottom, left:right], label[top:bottom, left:right]

        if float(torch.rand(()).item()) < self.flip_prob:
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric:
            image = photometric_distortion(image)

        ch, cw = self.crop_size
        h, w = label.shape
        out = torch.zeros(3, ch, cw, dtype=torch.float32)
        out[:, :h, :w] = self.normalise(image)
        padded = torch.full((ch, cw), IGNORE_INDEX, dtype=torch.int64)
        padded[:h, :w] = label
        target = dict(target)
        target["label"] = padded
        return out, target


class EvalTransform(_Normalise):
    """ADE20K test-time resize: keep-ratio to ``scale`` (short side 512 unless the long side would pass
    2048), bilinear, then normalise.

    With ``ratios`` (multi-scale test, mmsegmentation 1.x ``TestTimeAug``), the image is instead a
    list: the ORIGINAL image rescaled by each ratio (:func:`rescale_size`), normalised.

    The target keeps the ORIGINAL full-size label (metrics are computed at the original resolution, so
    predictions are resized back to ``target["label"].shape``) and gains ``"resized_size"`` (int64 ``[h, w]``).
    """

    def __init__(
        self,
        scale: Sequence[int] = (2048, 512),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ratios: Sequence[float] | None = None,
    ):
        super().__init__(mean, std)
        self.scale = (int(scale[0]), int(scale[1]))
        if min(self.scale) < 1:
            raise ValueError(f"scale must be positive (got {scale})")
        self.ratios = tuple(float(r) for r in ratios) if ratios else None
        if self.ratios and min(self.ratios) <= 0:
            raise ValueError(f"test ratios must be positive (got {ratios})")

    def __call__(self, image: torch.Tensor, target: dict):
        _, height, width = image.shape
        target = dict(target)
        if self.ratios:
            sizes = [rescale_size(height, width, r) for r in self.ratios]
            target["resized_size"] = torch.tensor(sizes, dtype=torch.int64)
            return [self.normalise(resize_image(image, size)) for size in sizes], target
        size = keep_ratio_size(height, width, self.scale)
        target["resized_size"] = torch.tensor(size, dtype=torch.int64)
        return self.normalise(resize_image(image, size)), target


def collate_eval(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """``(images, targets)`` as two lists: evaluation images differ in size, so they are not stacked."""
    return [item[0] for item in batch], [item[1] for item in batch]


__all__ = [
    "ADE_FOLDER",
    "CLASS_FILES",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "EvalTransform",
    "SegmentationFolder",
    "TrainTransform",
    "class_names_for",
    "class_tables",
    "read_class_list",
    "collate_eval",
    "find_root",
    "keep_ratio_size",
    "palette",
    "photometric_distortion",
    "read_class_names",
    "rescale_size",
    "resize_image",
    "resize_label",
]
