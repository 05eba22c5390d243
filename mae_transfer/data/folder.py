"""An ImageFolder-style dataset that survives bad files and gives reproducible augmentation.

Layouts accepted, tried in this order for ``root`` and ``split``:

* ``root/<split>/<class>/**/<image>`` (ImageNet),
* ``root/<class>/**/<image>`` when ``root/<split>`` does not exist,
* a flat folder of images (``root/<split>/<image>`` or ``root/<image>``): unlabelled data for
  pretraining, every label 0.

Corrupt-file accounting: a ``uint8`` flag a sample, kept in a shared-memory tensor created in
``__init__``. DataLoader workers (forked or spawned: torch pickles shared tensors by handle) set the
flag of every file they fail to decode, so ``num_corrupt`` and ``corrupt_files`` read in the main
process count each bad file once, however many workers, epochs or replacement searches met it.
The flag also makes the warning appear once a file and lets later epochs skip the file without
trying to decode it again. The current epoch lives in a shared tensor too, so ``set_epoch`` reaches
persistent workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from mae_transfer.data.errors import DataError
from mae_transfer.data.index import PackedStrings, PathLabels

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""Image file extensions read by default (matched case-insensitively)."""

# Folder names that mean "a split", used to tell a missing split from a class folder.
_SPLIT_NAMES = ("train", "val", "validation", "test")
_RESERVED_KEYS = ("image", "label", "index")
_SEED_MASK = (1 << 63) - 1
_U64 = (1 << 64) - 1


def _layout_help(root: Path, split: str | None) -> str:
    if split:
        return f"{root}/{split}/<class>/<image>, {root}/<class>/<image> or a flat folder of images"
    return f"{root}/<class>/<image> or a flat folder of images"


def _is_hidden(name: str) -> bool:
    # Dot-files include macOS "._x.jpg" resource forks, which are never images.
    return name.startswith(".")


def _images_under(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """Every image file below ``folder``, recursively, in sorted (deterministic) order."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if not _is_hidden(name) and name.lower().endswith(extensions):
                found.append(os.path.join(dirpath, name))
    # One total order (not os.walk's files-before-subfolders order) so any scan agrees.
    return sorted(found)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        if arr.size and arr.max() > 255:  # 16-bit data stored as 32-bit
            arr = arr / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in image.info):
        # Converting via RGBA avoids PIL's warning about palette transparency; the alpha is then
        # dropped like torchvision's default loader does, to match the reference pipelines.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode the image at ``path`` fully (so truncation is detected now) and return it as RGB."""
    with Image.open(path) as image:
        image.load()
        return _to_rgb(image)


UP_FRONT_CHECK_MAX = 10_000
"""Evaluation splits of at most this many samples are decode-checked before training starts (COCO
val2017: 5,000 images, ADE20K validation: 2,000), so that a bad file stops a run before its training
rather than at its final evaluation; larger ones are read as they are evaluated (``mae-transfer
check-data --task TASK --full`` checks them beforehand)."""


def decode_check(path: str | os.PathLike) -> tuple[int, int]:
    """Read the image at ``path`` through to its last byte without keeping it, and return its
    ``(width, height)``; raises what a full decode raises for a truncated or undecodable file.

    JPEGs are decoded at 1/8 scale (``Image.draft``): libjpeg still reads every entropy-coded block,
    so a broken file fails here as in :func:`load_rgb`, in about half the time (about 3 ms for a
    640 x 480 COCO image on one core, against 6 ms); other formats are decoded fully. A header
    check alone (``Image.verify``) misses a JPEG cut off in the middle."""
    with Image.open(path) as image:
        size = image.size
        if image.format == "JPEG":
            image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
        return size


def find_problems(
    check: Callable[[int], str | None], indices: Sequence[int], threads: int = 1
) -> list[tuple[int, str]]:
    """``[(index, problem), ...]`` of the ``indices`` whose ``check(index)`` names a problem, in
    ``indices`` order; ``threads`` run the checks side by side (image decoding releases the GIL)."""
    if threads <= 1 or len(indices) < 2:
        found = ((i, check(i)) for i in indices)
        return [(i, why) for i, why in found if why]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [(i, why) for i, why in zip(indices, pool.map(check, indices)) if why]


def _seed_all(seed: int) -> None:
    # Only the CPU generator: torch.manual_seed would also reseed CUDA generators, which
    # fork_rng(devices=[]) does not restore, and so disturb the training loop's GPU RNG.
    torch.default_generator.manual_seed(seed)
    # timm's augmentations draw from Python's (RandomErasing, RandAugment ops) and numpy's
    # (RandAugment op choice) global RNGs as well.
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)


def sample_seeds(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """Two independent 63-bit seeds for sample ``index`` of ``epoch`` in a run seeded ``seed``.

    Both come from a BLAKE2b hash of ``(seed, epoch, index)``: well mixed, so neighbouring samples
    and epochs get unrelated streams, and cheap enough to compute per sample. Seeding each sample's
    augmentation this way makes it independent of workers, processes and where a run resumed.
    """
    key = struct.pack("<3Q", int(seed) & _U64, int(epoch) & _U64, int(index) & _U64)
    a, b = struct.unpack("<2Q", hashlib.blake2b(key, digest_size=16).digest())
    return a & _SEED_MASK, b & _SEED_MASK


@contextlib.contextmanager
def seeded_rngs(seed: int, restore: bool = True) -> Iterator[None]:
    """Run the block with torch's CPU generator, ``random`` and numpy's global RNG seeded from ``seed``.

    With ``restore`` the three states are put back afterwards. A DataLoader worker passes False:
    nothing else in a worker draws from them, and saving and restoring numpy's state alone costs
    about 0.3 ms a sample.
    """
    if not restore:
        _seed_all(seed)
        yield
        return
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        _seed_all(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def pack_samples(samples: Sequence[tuple[str, int]]) -> PathLabels:
    """``[(path, label), ...]`` as a :class:`~mae_transfer.data.index.PathLabels`."""
    return PathLabels(PackedStrings.pack(p for p, _ in samples), np.array([lab for _, lab in samples], dtype=np.int64))


class ImageFolderDataset(Dataset):
    """Images in class folders (or one flat folder) with corrupt-file skipping and per-sample seeding.

    Args:
        root: the dataset folder (``--data``).
        split: subfolder to read (``"train"``, ``"val"`` ...); if ``root/<split>`` does not exist,
            ``root`` itself is read. ``None`` reads ``root``.
        transform: applied to the RGB PIL image; without one the item's image is a ``uint8``
            ``(3, H, W)`` tensor.
        extensions: file name endings to read, case-insensitive.
        max_corrupt_fraction: raise :class:`DataError` once more than this fraction of the files
            turned out unreadable.
        seed: when not ``None``, the transform of sample ``i`` in epoch ``e`` (see
            :meth:`set_epoch`) runs with torch's CPU RNG, ``random`` and numpy's global RNG seeded
            from ``(seed, e, i)``, so augmentation does not depend on worker count, rank layout
            or resume point. In the main process the three RNG states are restored afterwards
            (``torch.random.fork_rng(devices=[])``); DataLoader workers only reseed them.
        extra_noise: ``(key, shape)``: each item also carries ``item[key] = torch.rand(shape)``,
            drawn from a generator seeded from ``(seed, e, i)`` (independent of the transform's
            draws), e.g. MAE masking noise; from the global RNG when ``seed`` is ``None``.

    Items are dicts ``{"image", "label", "index"}`` (plus the ``extra_noise`` key). A file that
    cannot be decoded is replaced by the next readable one (cyclically), the same for any process;
    ``index`` and ``label`` are then those of the file actually used, while the random draws stay
    those of the requested index.

    Attributes:
        classes: class folder names (sorted; index = label); empty for a flat folder.
        class_to_idx: ``{name: label}``.
        samples: ``[(path, label), ...]`` as a :class:`~mae_transfer.data.index.PathLabels` (flat
            arrays, shared by forked workers); targets: the labels (a list made on request).
        folder: the folder actually read.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        max_corrupt_fraction: float = 0.1,
        seed: int | None = None,
        extra_noise: tuple[str, tuple[int, ...]] | None = None,
    ):
        self.root = Path(root).expanduser()
        self.split = split
        self.transform = transform
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not 0 <= max_corrupt_fraction <= 1:
            raise ValueError(f"max_corrupt_fraction must be within 0..1 (got {max_corrupt_fraction})")
        self.max_corrupt_fraction = float(max_corrupt_fraction)
        self.seed = None if seed is None else int(seed) & _U64
        if extra_noise is not None:
            key, shape = extra_noise
            if key in _RESERVED_KEYS:
                raise ValueError(f"extra_noise key {key!r} clashes with the item's own keys {_RESERVED_KEYS}")
            extra_noise = (str(key), tuple(int(s) for s in shape))
        self.extra_noise = extra_noise

        self.folder, self.classes, samples = self._scan()
        # Flat arrays, not a list of tuples: forked workers then share the sample list for good.
        self.samples: PathLabels = samples if isinstance(samples, PathLabels) else pack_samples(samples)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        # Shared memory: see the module docstring.
        self._corrupt = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        log.debug("%s: %d images, %d classes", self.folder, len(self.samples), len(self.classes))

    # ------------------------------------------------------------------ scanning
    def _scan(self) -> tuple[Path, list[str], list[tuple[str, int]]]:
        root, split = self.root, self.split
        if not root.exists():
            raise DataError(f"--data path {root} does not exist; pass a folder laid out as {_layout_help(root, split)}")
        if not root.is_dir():
            raise DataError(
                f"--data path {root} is not a folder; pass a folder laid out as {_layout_help(root, split)}"
            )
        folder = root
        if split:
            if (root / split).is_dir():
                folder = root / split
            else:
                others = [s for s in _SPLIT_NAMES if (root / s).is_dir()]
                if others:
                    raise DataError(
                        f"{root} has no '{split}' folder (it has {', '.join(others)}); "
                        f"choose one of those splits or add {root / split}"
                    )
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot list {folder}: {e}; check that it is readable") from e
        subdirs = [e.name for e in entries if not _is_hidden(e.name) and e.is_dir()]
        loose = [
            e.path
            for e in entries
            if not _is_hidden(e.name) and e.is_file() and e.name.lower().endswith(self.extensions)
        ]
        per_class = {d: _images_under(folder / d, self.extensions) for d in subdirs}
        if any(per_class.values()):
            # Empty class folders keep their index so that labels agree between splits.
            empty = [d for d, files in per_class.items() if not files]
            if empty:
                log.warning("%s: %d class folders hold no images (%s)", folder, len(empty), ", ".join(empty[:5]))
            if loose:
                log.warning("%s: ignoring %d images outside the class folders (e.g. %s)", folder, len(loose), loose[0])
            samples = [(path, label) for label, d in enumerate(subdirs) for path in per_class[d]]
            return folder, subdirs, samples
        if loose:
            return folder, [], [(path, 0) for path in loose]
        raise DataError(
            f"no images found in {folder} (looked for {', '.join(self.extensions)} files, also in subfolders); "
            f"expected {_layout_help(root, split)}"
        )

    @property
    def targets(self) -> list[int]:
        """The label of every sample (a new list: for one-off use in the main process)."""
        return self.samples.label_array().tolist()

    # ------------------------------------------------------------------ epochs and seeds
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose per-sample random draws ``__getitem__`` makes (all workers see it)."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        """The epoch set by :meth:`set_epoch` (0 initially)."""
        return int(self._epoch[0])

    def sample_seeds(self, index: int, epoch: int | None = None) -> tuple[int, int]:
        """The (transform, noise) seeds of sample ``index`` in ``epoch`` (default: the current one).

        Both come from a BLAKE2b hash of ``(seed, epoch, index)``: well mixed, so neighbouring
        samples and epochs get unrelated streams, and cheap enough to compute per sample.
        """
        if self.seed is None:
            raise ValueError("this dataset has no seed")
        return sample_seeds(self.seed, self.epoch if epoch is None else int(epoch), index)

    # ------------------------------------------------------------------ corrupt files
    @property
    def num_corrupt(self) -> int:
        """How many distinct files were found unreadable so far, in any process."""
        return int(self._corrupt.sum())

    @property
    def corrupt_files(self) -> list[str]:
        """The paths of the files found unreadable so far, in any process."""
        return [self.samples[j][0] for j in torch.nonzero(self._corrupt).flatten().tolist()]

    def _mark_corrupt(self, j: int, error: BaseException) -> None:
        path = self.samples[j][0]
        if not self._corrupt[j]:
            self._corrupt[j] = 1
            log.warning(
                "skipping unreadable image %s (%s: %s); using the next readable image instead",
                path,
                type(error).__name__,
                error,
            )
        n = len(self.samples)
        count = self.num_corrupt
        if count > self.max_corrupt_fraction * n:
            examples = ", ".join(self.corrupt_files[:3])
            raise DataError(
                f"{count} of the {n} images in {self.folder} are corrupt or unreadable, more than the allowed "
                f"{self.max_corrupt_fraction:.0%} (e.g. {examples}); re-copy or remove the bad files "
                f"(`mae-transfer check-data --task TASK --data DIR --full` lists them), "
                f"or for pretraining allow more with data.max_corrupt_fraction=<fraction>"
            )

    def _load_readable(self, index: int) -> tuple[Image.Image, int]:
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            if self._corrupt[j]:
                continue
            try:
                return load_rgb(self.samples[j][0]), j
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable file"
                self._mark_corrupt(j, e)
        raise DataError(f"none of the {n} images in {self.folder} can be read; re-copy the dataset")

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.samples)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        image, j = self._load_readable(index)
        if self.seed is None:
            out = self._apply(image)
            noise = torch.rand(self.extra_noise[1]) if self.extra_noise else None
        else:
            tf_seed, noise_seed = self.sample_seeds(index)
            with seeded_rngs(tf_seed, restore=get_worker_info() is None):
                out = self._apply(image)
            noise = None
            if self.extra_noise:
                g = torch.Generator().manual_seed(noise_seed)
                noise = torch.rand(self.extra_noise[1], generator=g)
        item = {"image": out, "label": self.samples[j][1], "index": j}
        if self.extra_noise:
            item[self.extra_noise[0]] = noise
        return item

    def _apply(self, image: Image.Image) -> Any:
        if self.transform is not None:
            return self.transform(image)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder}, {len(self.samples)} images, {len(self.classes)} classes)"
