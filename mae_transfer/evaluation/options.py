"""The one table of command-line options: flag, config key, argparse settings.

Every task command's options come from here (the CLI builds its parsers from ``FLAGS`` and the
family groups below, plus the task's own ``options``), and every consumer turns options into config
overrides (:func:`to_overrides`) or back into a command line (:func:`to_argv`, for the runner's child
processes) with the same table. An *options* dict maps option names (``epochs``, ``data``...) to
values; ``overrides`` holds the ``KEY=VALUE`` strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from mae_transfer.classification.spec import DATASETS, INAT_YEARS, PLACES_VERSIONS, PROTOCOLS
from mae_transfer.segmentation.spec import PROTOCOLS as SEG_PROTOCOLS

# mmsegmentation 1.x's ADE20K test-time scales (configs/_base_/datasets/ade20k.py, ``img_ratios``).
TTA_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


@dataclass(frozen=True)
class Flag:
    """One option: its ``flags``, the config ``key`` it sets (None: the front reads it), the argparse
    keyword arguments, ``convert`` (parsed value -> config value, e.g. ``--flip`` -> True) and
    ``check`` (given value -> what is wrong with it, or None; the front checks every given option
    before anything is read or built)."""

    name: str
    flags: tuple[str, ...]
    key: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    convert: Callable[[Any], Any] | None = None
    check: Callable[[Any], str | None] | None = None

    @property
    def switch(self) -> bool:
        return self.kwargs.get("action") == "store_true"


def _at_least(low: int, hint: str = "") -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low}{hint}"


def _rate(example: str) -> Callable[[Any], str | None]:
    return lambda v: None if math.isfinite(v) and v > 0 else f"must be a finite number greater than 0 (e.g. {example})"


def _neighbour_counts(text: Any) -> str | None:
    items = str(text).split(",")
    if all(i.strip().isdigit() and int(i) >= 1 for i in items):
        return None
    return "give neighbour counts as whole numbers of at least 1, comma-separated (e.g. 10,20,100,200)"


_COUNT = _at_least(1)
_DEVICE = ["auto", "cuda", "cpu"]

FLAGS: dict[str, Flag] = {
    f.name: f
    for f in [
        # where things are
        Flag(
            "data",
            ("--data",),
            "data.path",
            dict(metavar="DIR", help="dataset root in its official layout; default: built-in toy data in that layout"),
        ),
        Flag(
            "backbone",
            ("--backbone",),
            "backbone",
            dict(
                metavar="CKPT", help="pretrained weights (official MAE, timm, Hugging Face, ours); none = random init"
            ),
        ),
        Flag(
            "init",
            ("--init",),
            "init",
            dict(metavar="CKPT", help="start from these weights (official MAE, timm, Hugging Face, ours)"),
        ),
        Flag(
            "output",
            ("--output",),
            None,
            dict(metavar="DIR", help="run directory (default: runs/<command>-<preset or dataset>)"),
        ),
        Flag(
            "preset",
            ("--preset",),
            None,
            dict(
                metavar="NAME", help="recipe preset (see `mae-transfer presets`), a YAML file, or a run's config.yaml"
            ),
        ),
        Flag(
            "model",
            ("--model",),
            "model.name",
            dict(metavar="NAME", help="ViT size, e.g. vit_base_patch16 (default: from the backbone checkpoint)"),
        ),
        # schedule
        Flag("epochs", ("--epochs",), "train.epochs", dict(type=int, help="train.epochs"), check=_COUNT),
        Flag(
            "batch_size",
            ("--batch-size",),
            "train.batch_size",
            dict(type=int, help="images per process per step (train.batch_size)"),
            check=_COUNT,
        ),
        Flag(
            "effective_batch_size",
            ("--effective-batch-size",),
            "train.effective_batch_size",
            dict(type=int, help="global batch; gradient accumulation makes up the rest"),
            check=_COUNT,
        ),
        Flag(
            "blr",
            ("--blr",),
            "optim.blr",
            dict(type=float, help="base lr; lr = blr x effective batch / 256"),
            check=_rate("1.5e-4"),
        ),
        Flag(
            "lr",
            ("--lr",),
            "optim.lr",
            dict(type=float, help="peak learning rate (absolute, for the effective batch)"),
            check=_rate("1e-4"),
        ),
        Flag("device", ("--device",), "train.device", dict(choices=_DEVICE, help="default: cuda when available")),
        Flag(
            "max_steps",
            ("--max-steps",),
            "train.max_steps",
            dict(type=int, help="stop after this many optimizer steps (the schedule still spans all epochs)"),
            check=_at_least(1, "; leave --max-steps out for the whole schedule"),
        ),
        Flag(
            "resume",
            ("--resume",),
            None,
            dict(
                metavar="CKPT",
                help="resume from this training checkpoint (checkpoint-last.pth, or its run "
                "directory) instead of the --output directory's",
            ),
        ),
        Flag(
            "no_resume",
            ("--no-resume",),
            None,
            dict(action="store_true", help="refuse to continue a run already in --output"),
        ),
        Flag(
            "print_config",
            ("--print-config",),
            None,
            dict(action="store_true", help="print the resolved config and exit"),
        ),
        # classification
        Flag(
            "dataset",
            ("--dataset",),
            "data.dataset",
            dict(
                default="imagefolder",
                choices=DATASETS,
                help="dataset format of --data (default: imagefolder = ImageNet layout)",
            ),
        ),
        Flag(
            "year",
            ("--year",),
            None,
            dict(type=int, choices=INAT_YEARS, default=2018, help="iNaturalist edition (default 2018)"),
        ),
        Flag(
            "version",
            ("--version",),
            None,
            dict(type=int, choices=PLACES_VERSIONS, default=365, help="Places edition (default 365)"),
        ),
        Flag(
            "protocol",
            ("--protocol",),
            "protocol",
            dict(
                choices=PROTOCOLS,
                default=PROTOCOLS[0],
                help="end-to-end fine-tuning (default), linear probing, partial fine-tuning (with "
                "--trainable-blocks), or attentive probing (a learned-query cross-attention pool + linear head on "
                "the frozen ViT's tokens, V-JEPA's recipe)",
            ),
        ),
        Flag(
            "trainable_blocks",
            ("--trainable-blocks",),
            "model.trainable_blocks",
            dict(type=int, help="partial fine-tuning: train the last k blocks"),
            check=_at_least(1, " (and at most the ViT's depth)"),
        ),
        Flag(
            "knn_data",
            ("--knn-data",),
            "knn.data",
            dict(
                metavar="DIR",
                help="online k-NN while pretraining: an ImageFolder with train/ and val/ whose class-token "
                "features the encoder's k-NN top-1 is measured on (eval.csv, TensorBoard, the curves plot)",
            ),
        ),
        Flag(
            "knn_every",
            ("--knn-every",),
            "knn.every",
            dict(type=int, metavar="E", help="online k-NN every E epochs (default 1) and after the last one"),
            check=_at_least(1),
        ),
        Flag(
            "label_fraction",
            ("--label-fraction",),
            "data.label_fraction",
            dict(
                type=float,
                metavar="F",
                help="low-label transfer: train on this fraction of every class's training images (at least "
                "one each; 0.01 = 1 %%, 0.1 = 10 %%), a stratified subset drawn with train.seed and written to "
                "label_subset.json; the rows and tables name it (finetune@10%%)",
            ),
            check=lambda v: None if 0 < v <= 1 else "must be in (0, 1], e.g. 0.1 for 10 % of the labels",
        ),
        Flag(
            "shots",
            ("--shots",),
            "data.shots",
            dict(type=int, metavar="K", help="low-label transfer: train on K images per class (k-shot)"),
            check=_at_least(1, " image per class"),
        ),
        Flag(
            "missing",
            ("--missing",),
            "data.missing",
            dict(
                choices=["error", "skip"],
                help="images listed in the annotations but absent on disk: stop (default) or skip them",
            ),
        ),
        # dense tasks
        Flag(
            "img_size",
            ("--img-size",),
            "model.img_size",
            dict(type=int, help="input size (model.img_size: 1024 for COCO, 512 for ADE20K in the recipes)"),
            check=_COUNT,
        ),
        Flag(
            "eval_only", ("--eval-only",), None, dict(action="store_true", help="only evaluate --weights (no training)")
        ),
        Flag(
            "weights",
            ("--weights",),
            None,
            dict(
                metavar="PATH",
                help="trained model (classifier.pth / detector.pth / segmenter.pth, checkpoint-last.pth, "
                "or the reference project's checkpoint) for --eval-only",
            ),
        ),
        Flag(
            "trust_checkpoint",
            ("--trust-checkpoint",),
            "trust_checkpoint",
            dict(
                action="store_true",
                help="allow checkpoints that need full unpickling (detectron2 model-zoo .pkl, pickled Python objects); "
                "this can run code stored in the file, so only for files from a source you trust",
            ),
        ),
        Flag(
            "visualize",
            ("--visualize",),
            "visualize",
            dict(type=int, metavar="N", help="save N evaluation images with predictions next to the ground truth"),
            check=_at_least(0, " (0: none)"),
        ),
        Flag(
            "train_split",
            ("--train-split",),
            "data.train_split",
            dict(metavar="NAME", help="folder and annotations/instances_NAME.json to train on (default train2017)"),
        ),
        Flag(
            "eval_split",
            ("--eval-split",),
            "data.val_split",
            dict(metavar="NAME", help="split to evaluate on (default val2017)"),
        ),
        Flag(
            "skip_bad",
            ("--skip-bad",),
            "data.skip_bad",
            dict(
                action="store_true",
                help="skip unknown category ids, missing image files and unreadable images (counted) "
                "instead of stopping",
            ),
        ),
        Flag(
            "num_classes",
            ("--num-classes",),
            "data.num_classes",
            dict(type=int, help="classes of your own data in the same layout (data.num_classes; 150)"),
        ),
        Flag(
            "bad_labels",
            ("--bad-labels",),
            "data.bad_labels",
            dict(
                choices=["error", "ignore"],
                help="label values outside the classes: stop (default) or ignore those pixels",
            ),
        ),
        Flag("flip", ("--flip",), "test.flip", dict(action="store_true", help="test with horizontal flips too")),
        Flag(
            "multi_scale",
            ("--multi-scale",),
            "test.scales",
            dict(
                action="store_true",
                help="test at 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 x the original image "
                "(mmsegmentation 1.x TTA; with --flip: ms+flip)",
            ),
            convert=lambda on: list(TTA_SCALES),
        ),
        Flag(
            "seg_protocol",
            ("--protocol",),
            "protocol",
            dict(
                choices=SEG_PROTOCOLS,
                help="upernet (default): the MAE paper's fine-tuned UperNet; linear: DINOv2's frozen linear protocol "
                "(BatchNorm + 1x1 conv on the last block's patch tokens); linear_ms: DINOv2's +ms (the last 4 blocks, "
                "640 px, multi-scale test). The linear ones run the tasks ade20k_linear / ade20k_linear_ms",
            ),
        ),
        # frozen features
        Flag(
            "k",
            ("--k",),
            None,
            dict(default="10,20,100,200", help="comma-separated neighbour counts"),
            check=_neighbour_counts,
        ),
        Flag("sweep", ("--sweep",), None, dict(action="store_true", help="also run the linear-probe lr sweep")),
    ]
}

# The options of each family of task commands (a task adds its own in TaskSpec.options).
FAMILY_OPTIONS: dict[str, tuple[str, ...]] = {
    "pretrain": (
        "data",
        "output",
        "preset",
        "model",
        "epochs",
        "batch_size",
        "effective_batch_size",
        "blr",
        "device",
        "init",
        "knn_data",
        "knn_every",
        "max_steps",
        "resume",
        "no_resume",
        "trust_checkpoint",
        "print_config",
    ),
    "classification": (
        "data",
        "backbone",
        "trainable_blocks",
        "preset",
        "model",
        "output",
        "epochs",
        "batch_size",
        "effective_batch_size",
        "blr",
        "label_fraction",
        "shots",
        "missing",
        "device",
        "max_steps",
        "eval_only",
        "weights",
        "resume",
        "no_resume",
        "trust_checkpoint",
        "print_config",
    ),
    "dense": (
        "backbone",
        "data",
        "preset",
        "model",
        "img_size",
        "output",
        "epochs",
        "batch_size",
        "effective_batch_size",
        "lr",
        "device",
        "max_steps",
        "eval_only",
        "weights",
        "trust_checkpoint",
        "visualize",
        "resume",
        "no_resume",
        "print_config",
    ),
    "frozen": (
        "dataset",
        "data",
        "backbone",
        "model",
        "img_size",
        "k",
        "sweep",
        "label_fraction",
        "shots",
        "output",
        "device",
        "trust_checkpoint",
    ),
    "train": (
        "data",
        "backbone",
        "preset",
        "model",
        "output",
        "epochs",
        "batch_size",
        "effective_batch_size",
        "lr",
        "device",
        "max_steps",
        "resume",
        "no_resume",
        "print_config",
    ),
}
EXCLUSIVE = (("resume", "no_resume"),)  # options that cannot be given together


def defaults(names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The options dict a command starts from (argparse's defaults of these flags)."""
    return {n: FLAGS[n].kwargs.get("default", False if FLAGS[n].switch else None) for n in names}


def to_overrides(options: dict[str, Any], names: tuple[str, ...] | list[str]) -> dict:
    """The nested config overrides of the options that were given (switches only when on)."""
    out: dict = {}
    for name in names:
        flag, value = FLAGS[name], options.get(name)
        if flag.key is None or value is None or (flag.switch and not value):
            continue
        if flag.convert is not None:
            value = flag.convert(value)
        node = out
        *parents, leaf = flag.key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return out


def to_argv(
    command: str, options: dict[str, Any], names: tuple[str, ...] | list[str], always: tuple[str, ...] = ()
) -> list[str]:
    """The ``mae-transfer`` command line of ``options`` (``overrides`` last, as ``KEY=VALUE``);
    options at their default are left out unless named in ``always``."""
    argv = [command]
    for name in names:
        flag, value = FLAGS[name], options.get(name)
        if value is None or value is False or (value == flag.kwargs.get("default") and name not in always):
            continue
        argv += [flag.flags[0]] if flag.switch else [flag.flags[0], str(value)]
    return argv + list(options.get("overrides") or [])


__all__ = ["Flag", "FLAGS", "FAMILY_OPTIONS", "EXCLUSIVE", "TTA_SCALES", "defaults", "to_overrides", "to_argv"]
