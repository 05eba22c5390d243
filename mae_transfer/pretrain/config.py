"""The pretraining config; its defaults are the MAE paper's recipe.

Sources (see ``reference/paper_numbers.md`` section 2.1): MAE paper Table 8 / appendix A.1 and the
official ``main_pretrain.py`` + PRETRAIN.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mae_transfer.config import ConfigError, build_with_preset, preset_names
from mae_transfer.data.stats import IMAGENET_MEAN, IMAGENET_STD
from mae_transfer.engine.trainer import OptimConfig, TrainConfig

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class ModelConfig:
    name: str = "mae_vit_base_patch16"
    img_size: int | None = None  # None = the preset model's size (224 for the paper's models)
    mask_ratio: float = 0.75  # MAE paper Table 1f / Figure 5: 75 % random masking
    norm_pix_loss: bool = True  # per-patch normalised pixel targets, Table 1d; the released models
    decoder_embed_dim: int | None = None  # None = preset (512, Table 1b)
    decoder_depth: int | None = None  # None = preset (8, Table 1a)
    grad_checkpointing: bool = False

    def validate(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio must be in [0, 1), got {self.mask_ratio}")


@dataclass
class DataConfig:
    path: str | None = None  # ImageFolder / ImageNet root; None = the built-in toy data
    split: str = "train"
    min_scale: float = 0.2  # RandomResizedCrop(scale=(0.2, 1.0)), official main_pretrain.py
    max_scale: float = 1.0
    hflip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_corrupt_fraction: float = 0.1
    toy_images_per_class: int = 100  # size of the built-in toy set (10 classes)

    def validate(self) -> None:
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ConfigError("data.min_scale and data.max_scale must satisfy 0 < min <= max <= 1")


@dataclass
class VisConfig:
    every_epochs: int = 1  # save a reconstruction PNG every N epochs (0 = never)
    num_images: int = 8


@dataclass
class KnnMonitorConfig:
    """Online k-NN during pretraining (``--knn-data``, ``--knn-every``): the encoder's class-token
    features of an ImageFolder's train and val splits, weighted k-NN top-1 (the ``knn`` task's
    protocol) every ``every`` epochs and after the last one, in the run's eval stream (eval.csv,
    TensorBoard, the training-curves plot)."""

    data: str | None = None  # ImageFolder root with train/ and val/ (None: no monitor)
    every: int = 1  # epochs
    k: int = 20
    batch_size: int = 128

    def validate(self) -> None:
        if self.every < 1 or self.k < 1 or self.batch_size < 1:
            raise ConfigError("knn.every, knn.k and knn.batch_size must be at least 1")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Paper: batch 4096, 800 epochs (ablations) / 1600 (released models), 40 warmup epochs.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=800, batch_size=64, effective_batch_size=4096)
    )
    # Paper Table 8: AdamW (0.9, 0.95), base lr 1.5e-4 (lr = blr x batch / 256), wd 0.05, cosine.
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=40, schedule="cosine"
        )
    )
    vis: VisConfig = field(default_factory=VisConfig)
    knn: KnnMonitorConfig = field(default_factory=KnnMonitorConfig)
    init: str | None = None  # start from these weights (any format mae_transfer.checkpoint reads)
    # Read --backbone / --init / --weights files that need full unpickling (detectron2 .pkl, pickled
    # objects): that can run code stored in the file, so only for sources you trust.
    trust_checkpoint: bool = False


def available_presets() -> list[str]:
    return preset_names(PRESET_DIR)


def build_config(preset: str | None = None, overrides: dict | None = None) -> PretrainConfig:
    """Defaults (the paper's recipe) <- preset (name or YAML path) <- overrides, each checked."""
    return build_with_preset(PretrainConfig(), PRESET_DIR, preset, overrides)
