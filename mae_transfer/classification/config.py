"""Classification transfer configs: end-to-end fine-tuning, linear probing, partial fine-tuning,
attentive probing.

Defaults are the official MAE fine-tuning of the released ViT-B/16 (MAE-repo FINETUNE.md and
main_finetune.py; reference/paper_numbers.md section 2.2); the presets hold the other recipes.
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
    # The backbone (family, size name and/or explicit sizes, mlp_ratio, drop_path: ViT-B 0.1, ViT-L 0.2,
    # ViT-H 0.3 in the official scripts) is the shared BackboneConfig. Below: how classification uses it.
    img_size: int = 224
    global_pool: Literal["avg", "token"] = "avg"  # official fine-tuning: mean of patch tokens + fc_norm
    trainable_blocks: int | None = None  # partial fine-tuning: train only the last k blocks (Figure 9)
    # Attentive probe: heads of its cross-attention (None: the backbone's, as V-JEPA's num_heads=encoder.num_heads).
    attentive_heads: int | None = None
    # Attentive probe: a learning-rate sweep in one pass. The model holds one attentive head per factor,
    # all trained together on one backbone pass per batch; head i's peak lr is factor_i x the run's peak
    # lr (optim.lr, or optim.blr x batch / 256), so the sweep follows the batch size as the recipe's lr
    # does. The head with the best val top-1 is reported (chosen on val, as `knn --sweep` and DINO do).
    # None: one head at the run's lr.
    lr_sweep: tuple[float, ...] | None = None


@dataclass
class DataConfig:
    dataset: str = "imagefolder"  # imagefolder, inat2017/2018/2019, places205/365
    path: str | None = None  # None = the built-in toy data in that dataset's format
    missing: Literal["error", "skip"] = "error"  # images listed in the annotations but not on disk
    # Augmentation of the official fine-tuning (main_finetune.py defaults).
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    crop_pct: float | None = None  # eval resize = size / crop_pct; None = 224/256 up to 224 px, else 1
    min_scale: float = 0.08
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Low-label transfer: train on a stratified subset of the training split, drawn with train.seed
    # (classification.subsets): a fraction of every class's images (at least one), or K per class.
    label_fraction: float | None = None
    shots: int | None = None


@dataclass
class ClassificationConfig:
    protocol: Literal["finetune", "linprobe", "partial", "attentive"] = "finetune"
    backbone: str | None = None  # pretrained weights, any format mae_transfer.checkpoint reads
    # Read --backbone / --init / --weights files that need full unpickling (detectron2 .pkl, pickled
    # objects): that can run code stored in the file, so only for sources you trust.
    trust_checkpoint: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Official ViT-B/16 script: batch 1024 (32 x 32 GPUs), 100 epochs, 5 warmup epochs.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=100, batch_size=32, effective_batch_size=1024, log_every=50)
    )
    # AdamW (0.9, 0.999), blr 5e-4, layer decay 0.65, wd 0.05, min lr 1e-6, cosine (official ViT-B).
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            optimizer="adamw",
            blr=5e-4,
            weight_decay=0.05,
            betas=(0.9, 0.999),
            layer_decay=0.65,
            warmup_epochs=5,
            min_lr=1e-6,
        )
    )
    eval_every_epochs: int = 1
    eval_batch_size: int = 128
    # Attentive probe: clip each head's gradient norm to this on its own (V-JEPA: 1.0). Unlike
    # optim.clip_grad (one norm over everything trained) it keeps the heads of a sweep independent.
    head_clip_grad: float | None = None

    def validate(self) -> None:
        if self.protocol == "partial" and not self.model.trainable_blocks:
            raise ConfigError("protocol partial needs model.trainable_blocks (the last k blocks to train)")
        self._validate_attentive()
        f, k = self.data.label_fraction, self.data.shots
        if f is not None and k is not None:
            raise ConfigError("data.label_fraction and data.shots both set: give one (--label-fraction or --shots)")
        if f is not None and not 0 < f <= 1:
            raise ConfigError(f"data.label_fraction must be in (0, 1] (0.01 = 1 % of the labels), got {f}")
        if k is not None and k < 1:
            raise ConfigError(f"data.shots must be at least 1 (images per class), got {k}")

    def _validate_attentive(self) -> None:
        attentive = self.protocol == "attentive"
        for key, value in (
            ("model.lr_sweep", self.model.lr_sweep),
            ("head_clip_grad", self.head_clip_grad),
            ("model.attentive_heads", self.model.attentive_heads),
        ):
            if value is not None and not attentive:
                raise ConfigError(
                    f"{key} is an option of the attentive probe (--protocol attentive), not of protocol "
                    f"{self.protocol}; leave it out"
                    + (
                        " (the linear probe's lr sweep is `mae-transfer knn --sweep`)"
                        if key == "model.lr_sweep"
                        else ""
                    )
                )
        if not attentive:
            return
        if self.model.trainable_blocks:
            raise ConfigError(
                "--trainable-blocks is for partial fine-tuning; the attentive probe freezes the whole backbone: "
                "leave it out"
            )
        sweep = self.model.lr_sweep
        if sweep is not None:
            if not sweep or any(not f > 0 for f in sweep):
                raise ConfigError(
                    "model.lr_sweep must be positive lr factors (e.g. model.lr_sweep=[0.25,0.5,1,2,4]), "
                    f"got {list(sweep)}"
                )
            if len(set(sweep)) != len(sweep):
                raise ConfigError(f"model.lr_sweep has a factor twice: {list(sweep)}; give each once")
            if len(sweep) > 1 and self.optim.clip_grad is not None:
                raise ConfigError(
                    "optim.clip_grad clips the gradients of all the heads of model.lr_sweep together (one norm), "
                    "which ties them to each other: use head_clip_grad (each head on its own) and optim.clip_grad=null"
                )
        if self.head_clip_grad is not None and not self.head_clip_grad > 0:
            raise ConfigError(f"head_clip_grad must be positive (or null for no clipping), got {self.head_clip_grad}")
        if self.model.attentive_heads is not None and self.model.attentive_heads < 1:
            raise ConfigError(f"model.attentive_heads must be at least 1, got {self.model.attentive_heads}")


def available_presets() -> list[str]:
    return preset_names(PRESET_DIR)


def build_config(preset: str | None = None, overrides: dict | None = None) -> ClassificationConfig:
    """Defaults (official ViT-B fine-tuning) <- preset (name or YAML path) <- overrides."""
    return build_with_preset(ClassificationConfig(), PRESET_DIR, preset, overrides)
