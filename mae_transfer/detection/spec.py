"""The ``coco`` task's entry in the registry: its command, help texts, presets, columns and demo plan."""

from __future__ import annotations

from mae_transfer.detection.data_spec import NUM_CLASSES, TOY_DATA
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


_DET_WEIGHTS = TrainedWeights(
    read="mae_transfer.detection.task:read_detector_weights",
    load="mae_transfer.detection.task:load_detector_weights",
    artifact="detector.pth",
    sections=("model", "test", "data"),
    foreign="detectron2",
)
_DET = DenseRules(
    data="COCO",
    pictures="ground truth | prediction",
    what="detections",
    # ViTDet runs ViT-H with 16 px patches (the 14 px kernel is resized on load, ViTDet A.2).
    rename={"vit_huge_patch14": "vit_huge_patch16"},
    pos_size_key="pretrain_img_size",
)

SPECS: dict[str, TaskSpec] = {
    "coco": TaskSpec(
        name="coco",
        title="COCO",
        command="coco",
        family="dense",
        config="mae_transfer.detection.config:build_config",
        task="mae_transfer.detection.task:DetectionTask",
        report="mae_transfer.detection.task:report",
        toy_data=TOY_DATA,
        num_classes=NUM_CLASSES,
        # --skip-bad leaves out missing and unreadable images and annotations of unknown ids.
        bad_data=BadData(skip=("skip_bad", True), unreadable="skip"),
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
        speed=SpeedPlan(
            run="mae_transfer.detection.speed:run_detection_speed",
            options=(
                "preset",
                "batch_size",
                "steps",
                "warmup",
                "precision",
                "device",
                "grad_checkpointing",
                "img_size",
                "json",
            ),
            order=2,
            defaults={"steps": 20, "warmup": 5},
            cpu_defaults={"batch_size": 1},
            report="mae_transfer.detection.speed:format_detection_speed",
            writes_json=True,
            fp16="ViTDet's AMP with loss scaling",
            bench=(SpeedRun("ViTDet-B Mask R-CNN", ">= 6.4 img/s", {"preset": "vitdet_mask_rcnn_b", "batch_size": 4}),),
            tiny=(SpeedRun("Mask R-CNN micro", "-", {"preset": "toy", "batch_size": 2}),),
        ),
        columns=(
            Column("APbox", "APbox", "bbox_AP", keep="always", bar="APbox"),
            Column("APmask", "APmask", "segm_AP", keep="always", bar="APmask"),
        ),
    ),
}
