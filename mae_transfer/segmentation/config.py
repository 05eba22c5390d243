"""ADE20K segmentation configs: UperNet on a ViT, the MAE paper's A.4 setup, and DINOv2's frozen
linear protocols.

Defaults are MAE ViT-B + UperNet as in mmsegmentation's MAE config (``configs/mae``: AdamW lr 1e-4,
wd 0.05, layer decay 0.65, drop path 0.1, 512 crops, batch 16, warmup 1500 iterations from 1e-6,
poly decay to 0) with the MAE paper's 100 epochs (A.4); reference/paper_numbers.md section 2.6.
``protocol: linear`` / ``linear_ms`` start from their own presets (``linear_dinov2``,
``linear_ms_dinov2``) and read the ``linear`` section.
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


@dataclass
class ModelConfig(BackboneConfig):
    # The backbone (family, size name and/or explicit sizes, mlp_ratio, drop_path 0.1 as MAE A.4,
    # grad_checkpointing) is the shared BackboneConfig; a ViT of no standard size, e.g. one read from
    # an mmsegmentation checkpoint, has name None and all four sizes. Below: how segmentation uses it.
    img_size: int = 512  # the training crop and sliding window; the position table is made for it
    # The pyramid from the ViT: "taps" = four blocks rescaled x4 x2 x1 x0.5 (BEiT / MAE / mmsegmentation,
    # the paper's A.4 setup); "simple" = ViTDet's simple feature pyramid from the last block alone
    # (deconvolutions + 1x1 and 3x3 convs with LayerNorm, pyramid_channels each), as detection does.
    pyramid: Literal["taps", "simple"] = "taps"
    pyramid_channels: int = 256
    tap_blocks: tuple[int, ...] | None = None  # None: ViT-B 3, 5, 7, 11 / ViT-L 7, 11, 15, 23 (0-based)
    use_rel_pos: bool = True  # relative position bias, zero-initialised from MAE weights (MAE A.4)
    # "table": BEiT's per-head bias table (mmsegmentation's MAE backbone); "decomposed": ViTDet's form.
    rel_pos_type: Literal["table", "decomposed"] = "table"
    layer_scale: float | None = 1.0  # gamma_1 / gamma_2 of each block (mmsegmentation's MAE: init_values 1.0)
    channels: int = 768  # UperNet channels (BEiT: 768 for ViT-B, 1024 for ViT-L)
    aux_channels: int = 256  # auxiliary FCN head on the stride-16 level (0 = none)
    aux_convs: int = 1
    aux_weight: float = 0.4
    # mmseg: the classifiers (conv_seg) start from N(0, 0.01). "default": PyTorch's layer default, which
    # learns much faster in runs of a few hundred steps (toy preset).
    predictor_init: Literal["mmseg", "default"] = "mmseg"


@dataclass
class DataConfig:
    path: str | None = None  # ADEChallengeData2016 root (or the folder above it); None = toy data
    num_classes: int = 150
    reduce_zero_label: bool = True  # ADE20K: 0 = "other" is ignored, classes 1..150 -> 0..149
    train_split: str = "training"
    val_split: str = "validation"
    scale: tuple[int, int] = (2048, 512)  # (long, short) resize target before the ratio jitter
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    bad_labels: Literal["error", "ignore"] = "error"  # label values outside the classes
    missing: Literal["error", "skip"] = "error"  # images without a label map
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class TestConfig:
    mode: Literal["slide", "whole"] = "slide"
    stride: int = 341  # windows of model.img_size every 341 px (BEiT / mmsegmentation)
    flip: bool = False  # also average the horizontally flipped image
    # (1.0,): the single-scale test (keep-ratio resize to data.scale). Several values: mmsegmentation
    # 1.x test-time augmentation, each a ratio of the ORIGINAL image, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75].
    scales: tuple[float, ...] = (1.0,)


# The frozen linear protocols of DINOv2 (Oquab et al., TMLR 2024, section 7.4): "linear" trains a
# BatchNorm + 1x1 convolution on the last block's patch tokens; "linear_ms" (the paper's "+ms") on the
# last 4 blocks' tokens concatenated, at 640 px with multi-scale testing. Their presets.
LINEAR_PROTOCOLS = {"linear": "linear_dinov2", "linear_ms": "linear_ms_dinov2"}


@dataclass
class LinearConfig:
    """The frozen linear protocols (``protocol: linear`` / ``linear_ms``): what the head reads, how it
    trains, and the feature cache."""

    # Blocks whose patch tokens are concatenated: None = 1 (the last) for "linear", 4 (the last four)
    # for "linear_ms" (DINOv2's BNHead with in_index [3] / [0, 1, 2, 3] of out_indices = the last 4).
    layers: int | None = None
    # The backbone's final LayerNorm on each block's tokens: DINOv2's get_intermediate_layers(norm=True).
    norm: bool = True
    # "augmented": DINOv2's recipe, the backbone runs on every randomly resized / cropped / flipped /
    # distorted crop. "fixed": the training images are cut once into the evaluation's sliding windows
    # (resize to data.scale, model.img_size windows every test.stride px, no augmentation); their
    # features are computed once and cached on disk, and every later run of a head on this backbone
    # trains without running it. NOT DINOv2's recipe (no augmentation): a fast sweep of heads.
    train_input: Literal["augmented", "fixed"] = "augmented"
    # Several heads trained at once on the same features, one per learning rate (absolute; the
    # schedule's warmup and decay apply to each); () = one head at optim.lr. Rows of the best head say
    # "linear_sweep": choosing on the evaluation split makes that number optimistic.
    lrs: tuple[float, ...] = ()
    # How cached features are stored (and, so that a run is the same with and without the cache, what
    # the head always sees): float32, or float16 for half the disk (ViT-B at 512 px: 3 MB a window in
    # float32, the 2000 ADE20K validation images about 12 GB).
    cache_dtype: Literal["float32", "float16"] = "float32"


@dataclass
class SegmentationConfig:
    backbone: str | None = None
    # Read --backbone / --init / --weights files that need full unpickling (detectron2 .pkl, pickled
    # objects): that can run code stored in the file, so only for sources you trust.
    trust_checkpoint: bool = False
    recipe: str = "upernet"
    # "upernet": the MAE paper's fine-tuned UperNet (Table 5). "linear" / "linear_ms": DINOv2's frozen
    # linear protocols (LINEAR_PROTOCOLS), whose settings are in ``linear``.
    protocol: Literal["upernet", "linear", "linear_ms"] = "upernet"
    linear: LinearConfig | None = None  # None: the linear protocols' defaults (LinearConfig())
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    test: TestConfig = field(default_factory=TestConfig)
    # 100 epochs at batch 16 (MAE A.4): 126,300 iterations of the 20,210 training images.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=100, batch_size=2, effective_batch_size=16, log_every=50)
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            optimizer="adamw",
            lr=1e-4,
            weight_decay=0.05,
            betas=(0.9, 0.999),
            layer_decay=0.65,
            schedule="poly",
            poly_power=1.0,
            min_lr=0.0,
            warmup_steps=1500,
            warmup_start_factor=1e-6,
        )
    )
    eval_every_epochs: int = 0  # 0 = once, at the end
    eval_batch_size: int = 1  # images differ in size: one at a time
    # mmsegmentation's test loop runs in fp32 (its AMP wrapper is for training only).
    eval_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    visualize: int = 0

    def validate(self) -> None:
        m = self.model
        if m.name is None and None in (m.embed_dim, m.depth, m.num_heads, m.patch_size):
            raise ConfigError(
                "model.name is null: give model.embed_dim, model.depth, model.num_heads and model.patch_size"
            )
        if self.optim.lr is None:
            raise ConfigError("segmentation recipes give an absolute learning rate: set optim.lr")
        if self.test.stride <= 0 or self.test.stride > self.model.img_size:
            raise ConfigError(
                f"test.stride must be in 1..model.img_size ({self.model.img_size}), got {self.test.stride}"
            )
        if self.data.num_classes < 1 or self.data.num_classes > 255:
            raise ConfigError(
                f"data.num_classes must be in 1..255 (255 marks ignored pixels), got {self.data.num_classes}"
            )
        if self.protocol == "upernet":
            if self.linear is not None:
                raise ConfigError(
                    "linear.* settings are for the frozen linear protocols: give --protocol linear (or linear_ms), "
                    "or leave the linear.* overrides out"
                )
            return
        lin = self.linear_settings()
        if lin.layers is not None and lin.layers < 1:
            raise ConfigError(f"linear.layers must be at least 1 (the last block), got {lin.layers}")
        bad = [lr for lr in lin.lrs if not lr > 0]
        if bad:
            raise ConfigError(f"linear.lrs must be positive learning rates, e.g. [1e-4, 1e-3, 1e-2]; got {bad[0]}")

    def linear_settings(self) -> LinearConfig:
        """The ``linear`` section with its defaults (a run of a linear protocol without one)."""
        return self.linear if self.linear is not None else LinearConfig()

    def linear_layers(self) -> int:
        """How many last blocks a linear protocol reads: ``linear.layers``, else 1 for ``linear`` and
        4 for ``linear_ms``."""
        layers = self.linear_settings().layers
        return layers if layers is not None else (4 if self.protocol == "linear_ms" else 1)


def available_presets() -> list[str]:
    return preset_names(PRESET_DIR)


def build_config(preset: str | None = None, overrides: dict | None = None) -> SegmentationConfig:
    """Defaults (MAE ViT-B UperNet) <- preset (name or YAML path) <- overrides. Without a preset, a
    linear protocol in ``overrides`` starts from its own recipe (:data:`LINEAR_PROTOCOLS`), not UperNet's."""
    protocol = (overrides or {}).get("protocol")
    if preset is None and protocol in LINEAR_PROTOCOLS:
        preset = LINEAR_PROTOCOLS[protocol]
    return build_with_preset(SegmentationConfig(), PRESET_DIR, preset, overrides)
