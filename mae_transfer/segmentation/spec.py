"""The ``ade20k`` task's entry in the registry: its command, help texts, presets, columns and demo plan."""

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


_SEG_WEIGHTS = TrainedWeights(
    read="mae_transfer.segmentation.task:read_segmenter_weights",
    load="mae_transfer.segmentation.task:load_segmenter_weights",
    artifact="segmenter.pth",
    sections=("model", "test", "data"),
    foreign="mmsegmentation",
)
_SEG = DenseRules(data="ADE20K", pictures="image | ground truth | prediction", what="segmentations")


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
        option_help={
            "data": "ADEChallengeData2016 folder (or the folder holding it); default: built-in toy ADE20K",
            "img_size": "training crop and sliding-window size (model.img_size; 512 in the recipes)",
            "weights": "trained model (segmenter.pth, checkpoint-last.pth, or an mmsegmentation checkpoint) "
            "for --eval-only",
            "missing": "images without a label map: stop (default) or skip them",
        },
        options=("num_classes", "bad_labels", "missing", "flip", "multi_scale"),
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
}
