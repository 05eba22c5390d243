"""The task registry: one plain dict, ``TASKS``, naming everything the toolkit needs to know of a task.

The runner (``bench``), the demo, the CLI, the tables and the plots iterate over ``TASKS`` and
``TABLES``; none of them names a task. A task is a package (its model, data, evaluator, presets and
an engine ``TrainTask``) plus one entry here. Code is referenced by ``"module:attribute"`` strings
and imported only when the task runs, so listing the tasks costs nothing and the registry does not
import the task packages (imports point down only).

Adding a task (see the README's "Adding a task"): write the package, then

    TASKS["cityscapes"] = TaskSpec(
        name="cityscapes", title="Cityscapes", command="cityscapes", family="dense",
        config="my_tasks.cityscapes.config:build_config", task="my_tasks.cityscapes.task:CityscapesTask",
        toy_kind="cityscapes", table="cityscapes", columns=(Column("mIoU", "mIoU", "mIoU", bar="mIoU"),))
    TABLES["cityscapes"] = TableSpec("Cityscapes semantic segmentation")

and it shows up in ``bench --tasks``, in the tables and in the plots.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("pretrain", "classification", "dense", "frozen", "train")


@dataclass(frozen=True)
class Column:
    """One number a task reports: a table column and, with ``bar``, a headline metric (comparison
    bars, the demo's "MAE beats random" check, the runner's one-line summary).

    ``protocol`` is a regular expression the row's protocol must match in full. ``prefer="knn"``
    picks the k=20 protocol (else the smallest k) among the matching ``knnK`` protocols. ``keep``:
    ``always`` (shown even when empty), ``optional`` (dropped when nobody has it, unless the table
    is printed in full), ``present`` (only when a row exists)."""

    id: str  # the column id in paper.yaml
    label: str  # the table header
    metric: str
    protocol: str = ".*"
    keep: str = "optional"
    bar: str | None = None
    prefer: str = "latest"
    bar_fallback: bool = False  # the bars take any protocol when none matches (ADE20K: ms when no ss)

    def matches(self, protocol: str) -> bool:
        return re.fullmatch(self.protocol, protocol or "") is not None


@dataclass(frozen=True)
class TableSpec:
    """A paper table: its title and the keys of its reference rows in ``paper.yaml``."""

    title: str
    paper: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainedWeights:
    """How ``--eval-only --weights`` reads and loads a trained model of a task."""

    read: str  # "module:attr": (path, trust=) -> (state dict, the config saved with it or None)
    load: str  # "module:attr": (model, state dict, path) -> None
    artifact: str  # the file a training run writes (``detector.pth``)
    sections: tuple[str, ...] = ("model",)  # sections of the saved config that rebuild the model
    foreign: str = "unknown"  # the format of another project's file (``detectron2``)


@dataclass(frozen=True)
class DenseRules:
    """What only the dense tasks have: pictures of predictions and how a backbone file sets sizes."""

    data: str  # the dataset's name in messages (``COCO``)
    pictures: str  # what one picture shows (``ground truth | prediction``)
    what: str = "pictures"  # what the pictures are of (``detections``)
    rename: dict[str, str] = field(default_factory=dict)  # size name of the file -> the task's model name
    pos_size_key: str | None = None  # model option that takes the file's position-table image size


@dataclass(frozen=True)
class DemoPlan:
    """How ``mae-transfer demo`` runs a task: config overrides of the full demo and of ``--quick``
    (``quick=None``: left out of ``--quick``), and a larger toy split than the default
    (``ensure_toy_dataset`` options)."""

    full: tuple[str, ...] = ()
    quick: tuple[str, ...] | None = None
    toy_data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """What the toolkit needs to know of one task.

    ``command`` + ``fixed``: the ``mae-transfer`` command that runs it and the options that
    command fixes for this task (``inat --year 2018``); ``options``: the command-line options of
    this task beyond those of its family (names in ``evaluation.options.FLAGS``). ``family`` says which front runs it
    (``classification`` and ``dense`` train a ``TrainTask``, with the protocols and ``--eval-only``
    of those families; ``train`` is any other ``TrainTask`` with the common options; ``frozen``
    extracts features; ``pretrain`` is no benchmark task). ``config``/``task``/``report``: ``"module:attribute"`` of
    the config builder ``(preset, overrides) -> config``, the engine task class (for ``frozen``:
    the function that evaluates) and the function that formats its results for the terminal.
    ``data_group``: the ``--data`` key of a benchmark
    it shares with other tasks (``imagenet``). ``toy_kind``: its built-in toy dataset.
    ``toy_preset``/``default_preset``: the preset on toy data and on real data.
    ``native_resolution``: random-init runs also take the reference checkpoint's image size.
    ``trains``: whether it has a config to override (k-NN has none). ``parallel``: may run under
    torchrun. ``weights``: how ``--eval-only --weights`` reads and loads a trained model
    (:class:`TrainedWeights`). ``dense``: what only the dense tasks have (:class:`DenseRules`).
    ``demo``: how ``mae-transfer demo`` runs it (:class:`DemoPlan`; None: not in the demo).
    ``help``/``description``/``epilog``: what ``mae-transfer --help`` and ``COMMAND --help`` say
    (the first task of a command speaks for it); ``option_help``: option texts of this command."""

    name: str
    title: str
    command: str
    family: str
    config: str | None = None
    task: str | None = None
    report: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    data_group: str | None = None
    toy_kind: str | None = None
    toy_preset: str | None = "toy"
    default_preset: str | None = None
    table: str | None = None
    columns: tuple[Column, ...] = ()
    benchmark: bool = True
    trains: bool = True
    parallel: bool = True
    native_resolution: bool = False
    weights: TrainedWeights | None = None
    dense: DenseRules | None = None
    demo: DemoPlan | None = None  # None: not in the demo
    help: str = ""
    description: str = ""
    epilog: str = ""
    option_help: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"task {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")

    def load(self, what: str) -> Any:
        """Import the ``"module:attribute"`` named by field ``what`` (``config``, ``task``, ``report``)."""
        if what in ("config", "task", "report"):
            return resolve(getattr(self, what))
        if what in ("read", "load") and self.weights is not None:
            return resolve(getattr(self.weights, what))
        raise KeyError(f"task {self.name!r} has no {what!r} to load")

    @property
    def headline(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.bar)


def resolve(ref: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (imported now)."""
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------------- what the commands say
PRETRAIN_HELP = """\
Pretrain a Masked Autoencoder (MAE) ViT.

The defaults are the MAE paper's recipe: ViT-B/16 encoder, 8 x 512 decoder, 75 % random masking,
normalised-pixel loss, AdamW (0.9, 0.95), lr = 1.5e-4 x batch / 256, weight decay 0.05, cosine
schedule with 40 warmup epochs out of 800, effective batch 4096, RandomResizedCrop(0.2-1) + flip.

With no --data it runs the `toy` preset on the built-in toy data (a tiny ViT on 64 px images,
a few minutes on a laptop CPU) and says so. Any config field can be overridden as KEY=VALUE.

The run directory (--output) holds config.yaml, train.csv / train.jsonl, TensorBoard logs,
reconstructions/epochNNNN.png (original | masked | prediction | prediction + visible, a fixed
batch every epoch), checkpoint-last.pth (written atomically) and, at the end, encoder.pth in the
official MAE format. Running the same command again resumes where it stopped (also after a kill).
"""

PRETRAIN_EPILOG = """\
examples:
  mae-transfer pretrain                                  # toy run on CPU, about 5 minutes
  mae-transfer pretrain --data /datasets/imagenet        # the paper's ViT-B recipe
  mae-transfer pretrain --data /datasets/imagenet --preset mae_vit_large_800ep
  torchrun --nproc_per_node 8 -m mae_transfer pretrain --data /datasets/imagenet --batch-size 128
  mae-transfer pretrain --data DIR optim.blr=1e-4 model.mask_ratio=0.9 train.epochs=400
  mae-transfer pretrain --print-config                   # show the resolved config and exit

multi-node (SLURM): one task per GPU, `srun mae-transfer pretrain ...` with MASTER_ADDR and
MASTER_PORT exported, or `srun torchrun --nnodes $SLURM_NNODES --nproc_per_node 8
--rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 -m mae_transfer pretrain ...`.
"""

CLASSIFY_EPILOG = """\
protocols (MAE paper section 4 and appendix A):
  finetune   end-to-end, global average pool + fc_norm, layer-wise lr decay, RandAugment, mixup,
             cutmix, label smoothing, random erasing, AdamW, cosine with warmup (official scripts)
  linprobe   frozen encoder, class token, BatchNorm (no affine) + linear head, LARS
  partial    fine-tune only the last k blocks (paper Figure 9): --protocol partial --trainable-blocks k

examples:
  mae-transfer finetune --data /datasets/imagenet --backbone mae_pretrain_vit_base.pth
  mae-transfer linprobe --data /datasets/imagenet --backbone runs/pretrain-toy/encoder.pth
  mae-transfer inat --year 2018 --data /datasets/inat2018 --backbone ckpt.pth --preset finetune_paper_table9
  mae-transfer places --version 365 --data /datasets/places365 --backbone ckpt.pth
  mae-transfer finetune --backbone runs/pretrain-toy/encoder.pth      # toy data, a few minutes on CPU
With no --backbone the ViT starts from random weights (the from-scratch baseline), and says so.
Results: <output>/results.jsonl (one row per metric), eval.csv per evaluated epoch, and a table.
"""

COCO_HELP = """\
COCO instance detection and segmentation with Mask R-CNN on a ViT backbone (MAE paper Table 4,
ViTDet): the same function as detectron2's ViTDet Mask R-CNN (no detectron2 needed), checked
against detectron2's own outputs, and it reads and writes detectron2 checkpoints.

The default recipe is ViTDet's Mask R-CNN ViT-B from MAE weights: simple feature pyramid from the
last block, 14x14 window attention with 4 global blocks, relative position bias, LayerNorm heads,
1024 px large-scale jitter, AdamW lr 1e-4, weight decay 0.1, layer decay 0.7, drop path 0.1,
fp16 with a loss scaler, 100 epochs at batch 64 with step decay (COCO val2017: 51.6 box AP /
45.9 mask AP in ViTDet). `--preset benchmarking_mask_rcnn_b` is the Benchmarking-ViT protocol of
the MAE paper's Table 4 (four taps + FPN, BatchNorm, lr 8e-5, cosine). See `mae-transfer presets`.

Training ends with an evaluation on --eval-split (pycocotools: bbox and segm AP, AP50, AP75,
APs/m/l), in fp32 unless eval_precision=bf16. The run directory holds metrics.json, results.jsonl
(one row per metric), predictions_<split>.json (COCO results format), detector.pth (detectron2
parameter names), checkpoint-last.pth and with --visualize N, visualize/*.png (ground truth |
prediction). Running the same command again resumes.

--eval-only --weights also takes a detectron2 ViTDet checkpoint (model_final.pth; a model-zoo
.pkl with --trust-checkpoint): the architecture, input size and classes are read from the file.
`mae-transfer export --to detectron2` writes a trained detector back in detectron2's layout.
"""

COCO_EPILOG = """\
examples:
  mae-transfer coco                                          # toy data, tiny ViT, a few minutes on CPU
  mae-transfer coco --backbone mae_pretrain_vit_base.pth --data /datasets/coco
  torchrun --nproc_per_node 8 -m mae_transfer coco --backbone ckpt.pth --data /datasets/coco --batch-size 8
  mae-transfer coco --backbone ckpt.pth --data /datasets/coco --preset vitdet_mask_rcnn_b_1gpu   # one 24 GB GPU
  mae-transfer coco --backbone ckpt.pth --data /datasets/coco --preset benchmarking_mask_rcnn_l
  mae-transfer coco --eval-only --weights runs/coco/detector.pth --data /datasets/coco --visualize 8
  mae-transfer coco --eval-only --weights model_final.pth --data /datasets/coco    # a detectron2 ViTDet model
  mae-transfer export runs/coco/detector.pth --to detectron2 --output model_final.pth
  mae-transfer coco --data /datasets/coco --print-config     # the resolved recipe
Category ids may be any (COCO's are non-contiguous); both splits need the same category list.
Crowd regions are ignored in training and handled by COCOeval in evaluation.
"""

ADE20K_HELP = """\
ADE20K semantic segmentation with UperNet on a ViT (MAE paper Table 5): the same function as
mmsegmentation's MAE + UperNet (configs/mae), checked against mmsegmentation's own outputs, natively
in PyTorch (no mmsegmentation / mmcv); it reads and writes mmsegmentation checkpoints.

The default recipe is the MAE paper's A.4 setup with mmsegmentation's MAE hyper-parameters: ViT-B
with BEiT's relative position bias table (zero-initialised) and layer scale 1.0, four taps (blocks 4,
6, 8, 12) rescaled x4 x2 x1 x0.5, UperNet (768 channels) + auxiliary FCN head (weight 0.4), 512
crops of images resized by 0.5-2.0 x (2048, 512) with at most 75 % of a crop one class, flip and
photometric distortion, AdamW lr 1e-4, weight decay 0.05, layer decay 0.65, drop path 0.1, 1500
warmup iterations, poly decay, fp16 with a loss scaler, 100 epochs at batch 16. Evaluation (fp32)
resizes the short side to 512 (long side at most 2048) with OpenCV as mmcv does, runs 512 px sliding
windows with stride 341 and scores at the original size: mIoU, mean class accuracy, pixel accuracy
and per-class IoU, accumulated over the whole split.

--eval-only --weights also takes an mmsegmentation MAE/BEiT UperNet checkpoint ({"meta",
"state_dict"}): the architecture and classes are read from the file, the crop from its position
table (test resize and stride follow mmsegmentation's ADE20K rule for that crop; override with
data.scale / test.stride). `mae-transfer export --to mmseg` writes a trained segmenter back.
"""

ADE20K_EPILOG = """\
examples:
  mae-transfer ade20k                                        # toy data, tiny ViT, a few minutes on CPU
  mae-transfer ade20k --backbone mae_pretrain_vit_base.pth --data /datasets/ADEChallengeData2016
  torchrun --nproc_per_node 8 -m mae_transfer ade20k --backbone ckpt.pth --data DIR --batch-size 2
  mae-transfer ade20k --backbone ckpt.pth --data DIR --preset upernet_vit_b_1gpu    # one 24 GB GPU
  mae-transfer ade20k --eval-only --weights runs/ade20k-upernet_vit_b/segmenter.pth --data DIR --flip --multi-scale
  mae-transfer ade20k --eval-only --weights mmseg_upernet_mae.pth --data DIR       # an mmsegmentation model
  mae-transfer export runs/ade20k-upernet_vit_b/segmenter.pth --to mmseg --output mmseg.pth
  mae-transfer ade20k --data MY_DATA --num-classes 19 data.reduce_zero_label=false  # your own data, same layout
Layout: DIR/images/{training,validation}/*.jpg and DIR/annotations/{training,validation}/*.png
(0 = unlabelled and ignored, 1..150 = classes), objectInfo150.txt for the class names.
"""


# ------------------------------------------------------------------------- tables (paper order)
TABLES: dict[str, TableSpec] = {
    "coco": TableSpec("Table 4: COCO object detection and instance segmentation (Mask R-CNN)", ("coco",)),
    "ade20k": TableSpec("Table 5: ADE20K semantic segmentation (UperNet)", ("ade20k",)),
    "transfer": TableSpec("Table 6: transfer classification, top-1", ("transfer",)),
    "imagenet": TableSpec("ImageNet-style classification, top-1", ("imagenet_finetune", "imagenet_linprobe")),
}

_FT = "finetune|"  # fine-tuning rows (partial fine-tuning reports protocol "partial": not this column)
_CLS = dict(
    epilog=CLASSIFY_EPILOG,
    family="classification",
    weights=TrainedWeights(
        read="mae_transfer.classification.task:read_classifier_weights",
        load="mae_transfer.classification.task:load_classifier_weights",
        artifact="classifier.pth",
        sections=("model",),
    ),
    config="mae_transfer.classification.config:build_config",
    task="mae_transfer.classification.task:ClassificationTask",
    report="mae_transfer.classification.task:report",
    toy_preset="toy_finetune",
)
_DET_WEIGHTS = TrainedWeights(
    read="mae_transfer.detection.task:read_detector_weights",
    load="mae_transfer.detection.task:load_detector_weights",
    artifact="detector.pth",
    sections=("model", "test", "data"),
    foreign="detectron2",
)
_SEG_WEIGHTS = TrainedWeights(
    read="mae_transfer.segmentation.task:read_segmenter_weights",
    load="mae_transfer.segmentation.task:load_segmenter_weights",
    artifact="segmenter.pth",
    sections=("model", "test", "data"),
    foreign="mmsegmentation",
)
_DET = DenseRules(
    data="COCO",
    pictures="ground truth | prediction",
    what="detections",
    # ViTDet runs ViT-H with 16 px patches (the 14 px kernel is resized on load, ViTDet A.2).
    rename={"vit_huge_patch14": "vit_huge_patch16"},
    pos_size_key="pretrain_img_size",
)
_SEG = DenseRules(data="ADE20K", pictures="image | ground truth | prediction", what="segmentations")


_TRANSFER_HELP = {
    "inat": "iNaturalist 2017/2018/2019 transfer (MAE paper Table 6)",
    "places": "Places205/365 transfer (MAE paper Table 6)",
}


def _transfer(name: str, title: str, command: str, fixed: dict, quick: bool) -> TaskSpec:
    # iNaturalist and Places follow the paper's Table 9 setting (appendix A.5). The demo uses toy
    # splits with 20 validation images per class instead of 5, so that the comparison with random
    # weights is not decided by one or two images.
    demo = DemoPlan(full=("train.epochs=25",), quick=() if quick else None, toy_data={"val_per_category": 20})
    return TaskSpec(
        name=name,
        title=title,
        command=command,
        fixed={**fixed, "dataset": name},
        options=(*fixed, "protocol"),
        toy_kind=name,
        default_preset="finetune_paper_table9",
        table="transfer",
        demo=demo,
        help=_TRANSFER_HELP[command],
        description=_TRANSFER_HELP[command] + ".",
        columns=(Column(name, title, "top1", _FT, bar="top-1"),),
        **_CLS,
    )


TASKS: dict[str, TaskSpec] = {
    "coco": TaskSpec(
        name="coco",
        title="COCO",
        command="coco",
        family="dense",
        config="mae_transfer.detection.config:build_config",
        task="mae_transfer.detection.task:DetectionTask",
        report="mae_transfer.detection.task:report",
        toy_kind="coco",
        default_preset="vitdet_mask_rcnn_b",
        table="coco",
        dense=_DET,
        weights=_DET_WEIGHTS,
        help="COCO detection transfer: Mask R-CNN on a ViT (ViTDet / MAE Table 4)",
        description=COCO_HELP,
        epilog=COCO_EPILOG,
        option_help={
            "data": "COCO root with train2017/, val2017/, annotations/; default: built-in toy COCO",
            "img_size": "training and test size (model.img_size; 1024 in the recipes)",
            "weights": "trained model (detector.pth, checkpoint-last.pth, or a detectron2 ViTDet checkpoint) "
            "for --eval-only",
        },
        options=("train_split", "eval_split", "skip_bad"),
        # The demo: 64 px, the pretraining size, with windows as large as the pretraining grid
        # (ViTDet's rule: window = the global attention size of pretraining), and 64 toy validation
        # scenes instead of 16 (AP on 16 scenes moves by points between runs).
        demo=DemoPlan(
            full=("model.img_size=64", "model.window_size=8"),
            quick=("model.img_size=64", "model.window_size=8"),
            toy_data={"val_images": 64},
        ),
        columns=(
            Column("APbox", "APbox", "bbox_AP", keep="always", bar="APbox"),
            Column("APmask", "APmask", "segm_AP", keep="always", bar="APmask"),
        ),
    ),
    "ade20k": TaskSpec(
        name="ade20k",
        title="ADE20K",
        command="ade20k",
        family="dense",
        config="mae_transfer.segmentation.config:build_config",
        task="mae_transfer.segmentation.task:SegmentationTask",
        report="mae_transfer.segmentation.task:report",
        toy_kind="ade20k",
        default_preset="upernet_vit_b",
        table="ade20k",
        dense=_SEG,
        weights=_SEG_WEIGHTS,
        help="ADE20K segmentation transfer: UperNet on a ViT (MAE Table 5)",
        description=ADE20K_HELP,
        epilog=ADE20K_EPILOG,
        option_help={
            "data": "ADEChallengeData2016 folder (or the folder holding it); default: built-in toy ADE20K",
            "img_size": "training crop and sliding-window size (model.img_size; 512 in the recipes)",
            "weights": "trained model (segmenter.pth, checkpoint-last.pth, or an mmsegmentation checkpoint) "
            "for --eval-only",
            "missing": "images without a label map: stop (default) or skip them",
        },
        options=("num_classes", "bad_labels", "missing", "flip", "multi_scale"),
        demo=DemoPlan(full=("train.epochs=12",), quick=()),
        columns=(
            Column("mIoU", "mIoU", "mIoU", r".*_ss", keep="always", bar="mIoU", bar_fallback=True),
            Column("mIoU_msflip", "mIoU (ms+flip)", "mIoU", r".*_ms\+flip", keep="present"),
        ),
    ),
    **{
        f"inat{y}": _transfer(f"inat{y}", f"iNat {y}", "inat", {"year": y}, quick=y == 2018) for y in (2017, 2018, 2019)
    },
    **{
        f"places{v}": _transfer(f"places{v}", f"Places{v}", "places", {"version": v}, quick=v == 365)
        for v in (205, 365)
    },
    "finetune": TaskSpec(
        help="fine-tune a ViT end to end on an image-classification dataset",
        description="Fine-tune a ViT end to end on an image-classification dataset.",
        name="finetune",
        title="ImageNet fine-tune",
        command="finetune",
        fixed={"protocol": "finetune"},
        options=("dataset",),
        data_group="imagenet",
        toy_kind="imagefolder",
        default_preset="finetune_vit_base",
        table="imagenet",
        demo=DemoPlan(full=("train.epochs=15",), quick=()),
        columns=(Column("finetune", "fine-tune", "top1", _FT, bar="top-1"),),
        **_CLS,
    ),
    "linprobe": TaskSpec(
        help="linear probing of a frozen ViT (the official MAE protocol)",
        description="Linear probing of a frozen ViT (the official MAE protocol).",
        name="linprobe",
        title="linear probe",
        command="linprobe",
        fixed={"protocol": "linprobe"},
        options=("dataset",),
        data_group="imagenet",
        toy_kind="imagefolder",
        default_preset="linprobe",
        table="imagenet",
        demo=DemoPlan(full=("train.epochs=15",), quick=()),
        columns=(Column("linprobe", "linear probe", "top1", "linprobe|", bar="top-1"),),
        **{**_CLS, "toy_preset": "toy_linprobe"},
    ),
    "knn": TaskSpec(
        help="k-NN and linear-probe-sweep evaluation of frozen features",
        description="Evaluate frozen features: weighted k-NN (cosine, T=0.07) and, with --sweep, "
        "a linear probe that trains several learning rates at once on the extracted features.",
        name="knn",
        title="k-NN",
        command="knn",
        family="frozen",
        task="mae_transfer.classification.frozen:run_frozen_eval",
        fixed={"sweep": True},
        data_group="imagenet",
        toy_kind="imagefolder",
        toy_preset=None,
        table="imagenet",
        trains=False,
        native_resolution=True,
        demo=DemoPlan(full=(), quick=()),
        columns=(Column("knn", "k-NN", "top1", r"knn\d+", bar="top-1", prefer="knn"),),
    ),
    "pretrain": TaskSpec(
        help="pretrain an MAE (paper recipe; toy data when no --data)",
        description=PRETRAIN_HELP,
        epilog=PRETRAIN_EPILOG,
        option_help={
            "data": "ImageFolder/ImageNet root (train/<class>/*.JPEG or <class>/*); default: built-in toy data",
            "model": "MAE model, e.g. mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14",
        },
        name="pretrain",
        title="MAE pretraining",
        command="pretrain",
        family="pretrain",
        config="mae_transfer.pretrain.config:build_config",
        task="mae_transfer.pretrain.task:PretrainTask",
        toy_kind="imagefolder",
        benchmark=False,
        demo=DemoPlan(full=("train.epochs=30",), quick=("train.epochs=3",)),
    ),
}


def benchmark_tasks() -> list[str]:
    """The tasks ``bench --tasks all`` runs, in the registry's (the paper's) order."""
    return [name for name, spec in TASKS.items() if spec.benchmark]


def data_keys() -> list[str]:
    """The keys ``bench --data KEY=DIR`` accepts: every benchmark task and every data group."""
    tasks = benchmark_tasks()
    return tasks + sorted({TASKS[t].data_group for t in tasks if TASKS[t].data_group} - set(tasks))


def table_columns(table: str) -> list[tuple[TaskSpec, Column]]:
    """The columns of ``table``: the columns of its tasks, in registry order."""
    return [(spec, col) for spec in TASKS.values() if spec.table == table for col in spec.columns]


def headline_columns() -> list[tuple[TaskSpec, Column]]:
    """Every task's headline metrics, in registry order (comparison bars, the demo's check)."""
    return [(spec, col) for spec in TASKS.values() if spec.benchmark for col in spec.headline]


def commands() -> dict[str, list[TaskSpec]]:
    """``mae-transfer`` command -> the tasks it runs (``inat`` -> inat2017, inat2018, inat2019)."""
    out: dict[str, list[TaskSpec]] = {}
    for spec in TASKS.values():
        out.setdefault(spec.command, []).append(spec)
    return out


def spec_for(command: str, options: dict[str, Any]) -> TaskSpec:
    """The task a command runs with these options (``inat`` with ``year=2019`` -> inat2019)."""
    specs = commands()[command]
    for spec in specs:
        if all(options.get(k) == v for k, v in spec.fixed.items() if k in _SELECTORS):
            return spec
    return specs[0]


# Options that select among the tasks of one command (the others in ``fixed`` are only set).
_SELECTORS = ("year", "version")


class PluginError(ImportError):
    """A module named in ``MAE_TRANSFER_TASKS`` cannot be imported (the message says what to do)."""


def _load_plugins() -> None:
    """Import the modules named in ``MAE_TRANSFER_TASKS`` (comma-separated): tasks outside this
    package register themselves there, and every process (``bench``'s child jobs too) sees them.

    A module is looked for on ``sys.path`` and then in the current folder: ``python -m
    mae_transfer`` puts the current folder on ``sys.path`` but the ``mae-transfer`` console script
    does not, and the README's example (``my_tasks.py`` beside the command) must work with both.
    A module found nowhere is one :class:`PluginError` naming it, the folder and ``PYTHONPATH``."""
    for name in filter(None, (m.strip() for m in os.environ.get("MAE_TRANSFER_TASKS", "").split(","))):
        try:
            importlib.import_module(name)
            continue
        except ModuleNotFoundError as e:
            if e.name not in (name, name.split(".")[0]):
                raise  # the module exists but imports something missing: its own traceback helps
        cwd = os.getcwd()
        top = name.split(".")[0]
        if os.path.isdir(os.path.join(cwd, top)) or os.path.isfile(os.path.join(cwd, top + ".py")):
            if cwd not in sys.path:
                sys.path.append(cwd)  # after the installed packages: a local file never shadows one
            importlib.import_module(name)
            continue
        raise PluginError(
            f"MAE_TRANSFER_TASKS names the module {name!r}, which is neither importable "
            f"nor a {name.split('.')[0]}.py / package in the current folder ({cwd}); "
            "run the command from the folder that holds it, or add that folder to "
            "PYTHONPATH (PYTHONPATH=/path/to/folder mae-transfer ...)"
        ) from None


_load_plugins()

__all__ = [
    "Column",
    "TableSpec",
    "TaskSpec",
    "TASKS",
    "TABLES",
    "FAMILIES",
    "resolve",
    "benchmark_tasks",
    "data_keys",
    "table_columns",
    "headline_columns",
    "commands",
    "spec_for",
]
