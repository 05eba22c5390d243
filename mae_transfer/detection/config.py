"""COCO detection configs: Mask R-CNN on a ViT with the ViTDet or the Benchmarking-ViT recipe.

Defaults are ViTDet's Mask R-CNN ViT-B from MAE weights (ViTDet A.2 Table 11 and the detectron2
config ``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py``; reference/paper_numbers.md
section 3.2). The presets hold the other sizes, the Benchmarking-ViT protocol of the MAE paper's
Table 4, a one-GPU setting and the toy run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mae_transfer.config import ConfigError, build_with_preset, preset_names
from mae_transfer.data.stats import IMAGENET_MEAN, IMAGENET_STD
from mae_transfer.engine.trainer import OptimConfig, TrainConfig
from mae_transfer.models.backbone import BackboneConfig

PRESET_DIR = Path(__file__).parent / "presets"

# ViTDet's step decay: x0.1 at iterations 163,889 and 177,546 of 184,375 (100 epochs at batch 64),
# i.e. at 88.9 % and 96.3 % of training; the 75-epoch ViT-H schedule scales all three by 3/4.
VITDET_MILESTONES = (163889 / 184375, 177546 / 184375)


@dataclass
class ModelConfig(BackboneConfig):
    # The backbone (family, size name and/or explicit sizes, mlp_ratio, drop_path 0.1 as ViTDet,
    # grad_checkpointing) is the shared BackboneConfig; a ViT of no standard size, e.g. one read from
    # a detectron2 checkpoint, has name None and all four sizes. Below: how detection uses it.
    pyramid: Literal["simple", "fpn4"] = "simple"  # ViTDet simple pyramid / Benchmarking-ViT taps + FPN
    img_size: int = 1024  # LSJ crop, test resize (longer side) and the square every batch is padded to
    pretrain_img_size: int = 224  # the pos_embed table's grid (ViTDet keeps it and resizes it at every forward)
    window_size: int = 14  # the pre-training token grid (224 / 16); global blocks see everything
    global_blocks: tuple[int, ...] | None = None  # None = ViTDet's (the last block of each quarter)
    use_rel_pos: bool = True  # zero-initialised decomposed relative position bias
    head_norm: Literal["ln", "bn"] = "ln"  # ViTDet LayerNorm, Benchmarking-ViT BatchNorm
    channels: int = 256  # pyramid / FPN and head convolution channels
    fc_dim: int = 1024  # the box head's fully connected layer
    rpn_convs: int = 2  # ViTDet: 2 convolutions in the RPN head
    box_head_convs: int = 4  # 4conv1fc box head
    mask_head_convs: int = 4  # 4 convolutions before the mask head's deconvolution
    box_batch_size_per_image: int = 512  # sampled RoIs per image for the box and mask heads
    rpn_pre_nms_topk: tuple[int, int] = (2000, 1000)  # per level (training, test)
    rpn_post_nms_topk: tuple[int, int] = (1000, 1000)  # per image (training, test)
    # detectron2: class scores N(0, 0.01), box deltas and mask logits N(0, 0.001) (ViTDet). "default":
    # PyTorch's layer defaults, which learn much faster in runs of a few hundred steps (toy preset).
    predictor_init: Literal["detectron2", "default"] = "detectron2"
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


@dataclass
class DataConfig:
    path: str | None = None  # COCO root (train2017/, val2017/, annotations/); None = toy data
    train_split: str = "train2017"
    val_split: str = "val2017"
    scale_range: tuple[float, float] = (0.1, 2.0)  # large-scale jitter
    flip_prob: float = 0.5
    train_empty: bool = False  # also train on images without any (non-crowd) object
    skip_bad: bool = False  # skip (and count) unknown category ids, missing image files and unreadable images
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class DetectionConfig:
    backbone: str | None = None  # pretrained ViT weights, any format mae_transfer.checkpoint reads
    # Read --backbone / --init / --weights files that need full unpickling (detectron2 .pkl, pickled
    # objects): that can run code stored in the file, so only for sources you trust.
    trust_checkpoint: bool = False
    recipe: str = "vitdet"  # a label for result rows: vitdet, benchmarking, toy, ...
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # 100 epochs at batch 64 (one image per GPU on 64 GPUs in ViTDet).
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=100, batch_size=1, effective_batch_size=64, log_every=20)
    )
    # AdamW (0.9, 0.999), lr 1e-4, wd 0.1, layer decay 0.7, step decay, 250 warmup iterations from
    # 0.001 x lr (ViTDet A.2; detectron2 common/optim.py and the ViTDet COCO configs).
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            optimizer="adamw",
            lr=1e-4,
            weight_decay=0.1,
            betas=(0.9, 0.999),
            layer_decay=0.7,
            schedule="step",
            milestones=VITDET_MILESTONES,
            warmup_steps=250,
            warmup_start_factor=0.001,
        )
    )
    eval_every_epochs: int = 0  # 0 = evaluate once, at the end
    eval_batch_size: int = 2
    # detectron2 evaluates in fp32; bf16 autocast changes most low-scoring detections.
    eval_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # COCO AP with pycocotools (the reference) or faster-coco-eval (pip install faster-coco-eval: the
    # same numbers to 1e-4, tests/test_coco.py; at val2017 size 5x faster with 30% less memory,
    # benchmarks/coco_eval_full_size.py); auto = faster-coco-eval when installed, else pycocotools.
    eval_backend: Literal["auto", "pycocotools", "faster"] = "auto"
    visualize: int = 0  # after evaluation, save this many images with predictions next to the truth
    visualize_score: float = 0.5  # draw predictions above this score

    def validate(self) -> None:
        m = self.model
        if m.name is None and None in (m.embed_dim, m.depth, m.num_heads, m.patch_size):
            raise ConfigError(
                "model.name is null: give model.embed_dim, model.depth, model.num_heads and model.patch_size"
            )
        if self.model.img_size % 32:
            raise ConfigError(
                f"model.img_size must be a multiple of 32 (the coarsest stride), got {self.model.img_size}"
            )
        if self.optim.lr is None:
            raise ConfigError("detection recipes give an absolute learning rate: set optim.lr")


def available_presets() -> list[str]:
    return preset_names(PRESET_DIR)


def build_config(preset: str | None = None, overrides: dict | None = None) -> DetectionConfig:
    """Defaults (ViTDet Mask R-CNN ViT-B) <- preset (name or YAML path) <- overrides."""
    return build_with_preset(DetectionConfig(), PRESET_DIR, preset, overrides)
