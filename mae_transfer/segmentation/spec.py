"""The ``ade20k`` command's entries in the registry: UperNet (``ade20k``) and the frozen linear
protocols (``ade20k_linear``, ``ade20k_linear_ms``), with their help texts, presets, columns and demo plans."""

from __future__ import annotations

from mae_transfer.segmentation.data_spec import NUM_CLASSES, TOY_DATA
from mae_transfer.spec import (
    BadData,
    Column,
    DemoPlan,
    DenseRules,
    SpeedPlan,
    SpeedRun,
    TaskSpec,
    TrainedWeights,
)

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

--protocol linear / linear_ms: DINOv2's frozen linear protocols (Oquab et al. 2024, section 7.4) instead:
the ViT frozen, a BatchNorm + 1x1 convolution on the patch tokens of its last block (linear) or of its
last 4 blocks concatenated at 640 px with multi-scale testing (linear_ms, DINOv2's "+ms"), logits
upsampled bilinearly; DINOv2's recipe (AdamW lr 1e-3, wd 1e-4, 40k iterations at batch 16, 512 crops,
presets linear_dinov2 / linear_ms_dinov2), UperNet's evaluation. linear.lrs=[...] trains one head per
lr on the same features. The features of the (deterministic) evaluation windows are cached on disk
($MAE_TRANSFER_CACHE/features) and read by every later evaluation of the same backbone; with
linear.train_input=fixed the training images are cut once into unaugmented windows whose features are
cached too (NOT DINOv2's augmented training: a fast sweep), so a second head never runs the backbone.
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
  mae-transfer ade20k --protocol linear --backbone ckpt.pth --data DIR               # frozen, DINOv2's linear
  mae-transfer ade20k --protocol linear --backbone ckpt.pth --data DIR linear.lrs=[1e-4,1e-3,1e-2]
  mae-transfer ade20k --protocol linear --backbone ckpt.pth --data DIR linear.train_input=fixed   # cached
Layout: DIR/images/{training,validation}/*.jpg and DIR/annotations/{training,validation}/*.png
(0 = unlabelled and ignored, 1..150 = classes), objectInfo150.txt for the class names.
"""


_SEG_WEIGHTS = TrainedWeights(
    read="mae_transfer.segmentation.task:read_segmenter_weights",
    load="mae_transfer.segmentation.task:load_segmenter_weights",
    artifact="segmenter.pth",
    sections=("model", "test", "data"),
    foreign="mmsegmentation",
)
_SEG = DenseRules(data="ADE20K", pictures="image | ground truth | prediction", what="segmentations")

# --protocol of the ade20k command: each selects its task (the linear ones fix it).
PROTOCOLS = ["upernet", "linear", "linear_ms"]
_ADE20K_OPTIONS = ("num_classes", "bad_labels", "missing", "flip", "multi_scale", "seg_protocol")
_ADE20K_OPTION_HELP = {
    "data": "ADEChallengeData2016 folder (or the folder holding it); default: built-in toy ADE20K",
    "img_size": "training crop and sliding-window size (model.img_size; 512 in the recipes)",
    "weights": "trained model (segmenter.pth, checkpoint-last.pth, or an mmsegmentation checkpoint) for --eval-only",
    "missing": "images without a label map: stop (default) or skip them",
}
_LINEAR_WEIGHTS = TrainedWeights(
    read="mae_transfer.segmentation.linear:read_linear_weights",
    load="mae_transfer.segmentation.linear:load_linear_weights",
    artifact="segmenter.pth",
    sections=("model", "test", "data", "linear"),
)


def _linear(name: str, protocol: str, title: str, preset: str, columns: tuple[Column, ...], demo) -> TaskSpec:
    """A frozen linear protocol of the ade20k command (``ade20k --protocol <protocol>``)."""
    return TaskSpec(
        name=name,
        title=f"ADE20K ({title})",
        command="ade20k",
        family="dense",
        config="mae_transfer.segmentation.config:build_config",
        task="mae_transfer.segmentation.linear:LinearSegmentationTask",
        report="mae_transfer.segmentation.linear:report",
        fixed={"seg_protocol": protocol},
        options=_ADE20K_OPTIONS,
        data_group="ade20k",  # bench --data ade20k=DIR serves it too
        toy_data=TOY_DATA,
        num_classes=NUM_CLASSES,
        bad_data=BadData(unreadable="stop", label="UNREADABLE OR INVALID"),
        toy_preset="toy_linear",
        default_preset=preset,
        table="ade20k",
        dense=_SEG,
        weights=_LINEAR_WEIGHTS,
        help=f"ADE20K segmentation with a frozen backbone: {title} (DINOv2's protocol)",
        description=ADE20K_HELP,
        epilog=ADE20K_EPILOG,
        option_help=_ADE20K_OPTION_HELP,
        demo=demo,
        columns=columns,
    )


SPECS: dict[str, TaskSpec] = {
    "ade20k": TaskSpec(
        name="ade20k",
        title="ADE20K",
        command="ade20k",
        family="dense",
        config="mae_transfer.segmentation.config:build_config",
        task="mae_transfer.segmentation.task:SegmentationTask",
        report="mae_transfer.segmentation.task:report",
        toy_data=TOY_DATA,
        num_classes=NUM_CLASSES,
        # A run stops on an undecodable image or label map, and on label values beyond the classes.
        bad_data=BadData(unreadable="stop", label="UNREADABLE OR INVALID"),
        default_preset="upernet_vit_b",
        table="ade20k",
        dense=_SEG,
        weights=_SEG_WEIGHTS,
        help="ADE20K segmentation transfer: UperNet on a ViT (MAE Table 5)",
        description=ADE20K_HELP,
        epilog=ADE20K_EPILOG,
        option_help=_ADE20K_OPTION_HELP,
        options=_ADE20K_OPTIONS,
        demo=DemoPlan(full=("train.epochs=12",), quick=()),
        speed=SpeedPlan(
            run="mae_transfer.segmentation.speed:run_segmentation_speed",
            options=("preset", "batch_size", "steps", "warmup", "precision", "device", "json"),
            order=3,
            bench=(SpeedRun("UperNet ViT-B", ">= 40 img/s", {"preset": "upernet_vit_b", "batch_size": 8}),),
            tiny=(SpeedRun("UperNet micro", "-", {"preset": "toy", "batch_size": 2}),),
        ),
        columns=(
            Column("mIoU", "mIoU", "mIoU", r".*_ss", keep="always", bar="mIoU", bar_fallback=True),
            Column("mIoU_msflip", "mIoU (ms+flip)", "mIoU", r".*_ms\+flip", keep="present"),
        ),
    ),
    # DINOv2's "lin." (single-scale test); rows of a sweep's best head in a column of their own.
    "ade20k_linear": _linear(
        "ade20k_linear",
        "linear",
        "linear, frozen",
        "linear_dinov2",
        (
            Column("linear", "linear, frozen", "mIoU", r"linear\d*_ss", keep="optional", bar="mIoU", bar_fallback=True),
            Column(
                "linear_sweep", "linear, frozen (best lr of a sweep)", "mIoU", r"linear\d*_sweep_.*", keep="present"
            ),
        ),
        DemoPlan(full=("train.epochs=20",), quick=()),
    ),
    # DINOv2's "+ms": the last 4 blocks, 640 px, multi-scale test.
    "ade20k_linear_ms": _linear(
        "ade20k_linear_ms",
        "linear_ms",
        "linear +ms, frozen",
        "linear_ms_dinov2",
        (
            Column(
                "linear_ms",
                "linear +ms, frozen",
                "mIoU",
                r"linear\d*_(ss|ms)(\+flip)?",
                keep="present",
                bar="mIoU",
                bar_fallback=True,
            ),
            Column(
                "linear_ms_sweep",
                "linear +ms, frozen (best lr of a sweep)",
                "mIoU",
                r"linear\d*_sweep_ms.*",
                keep="present",
            ),
        ),
        None,
    ),
}
