"""MAE pretraining as an engine task, and the ``mae-transfer pretrain`` entry point."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torchvision import transforms

from mae_transfer.engine.optim import param_groups
from mae_transfer.engine.trainer import OptimConfig, Trainer, TrainTask
from mae_transfer.pretrain.config import PretrainConfig
from mae_transfer.pretrain.data_spec import TOY_DATA
from mae_transfer.pretrain.model import MaskedAutoencoderViT, create_mae

log = logging.getLogger(__name__)


def build_mae(cfg: PretrainConfig) -> MaskedAutoencoderViT:
    """The MAE described by ``cfg.model`` (preset name + overrides)."""
    m = cfg.model
    overrides: dict[str, Any] = dict(
        mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss, grad_checkpointing=m.grad_checkpointing
    )
    if m.img_size is not None:
        overrides["img_size"] = m.img_size
    if m.decoder_embed_dim is not None:
        overrides["decoder_embed_dim"] = m.decoder_embed_dim
    if m.decoder_depth is not None:
        overrides["decoder_depth"] = m.decoder_depth
    return create_mae(m.name, **overrides)


def pretrain_transform(cfg: PretrainConfig, img_size: int) -> transforms.Compose:
    """RandomResizedCrop(scale 0.2-1, bicubic) + flip + normalise: the official pipeline, no colour jitter."""
    d = cfg.data
    steps: list = [
        transforms.RandomResizedCrop(
            img_size, scale=(d.min_scale, d.max_scale), interpolation=transforms.InterpolationMode.BICUBIC
        )
    ]
    if d.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(d.mean, d.std)]
    return transforms.Compose(steps)


def resolve_data_root(cfg: PretrainConfig) -> tuple[Path, bool]:
    """The dataset folder and whether it is the built-in toy data."""
    if cfg.data.path:
        return Path(cfg.data.path).expanduser(), False
    from mae_transfer.data.toy import ensure_toy_dataset

    root = ensure_toy_dataset(**TOY_DATA.arguments(), train_per_class=cfg.data.toy_images_per_class)
    return Path(root), True


class PretrainTask(TrainTask):
    """MAE pretraining: the loss is the model's masked-patch MSE; masking noise comes per sample
    from the dataset, so a run is reproducible whatever the number of processes or resumes."""

    name = "pretrain"

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        with torch.device("meta"):  # shapes only, no memory or init time
            probe = build_mae(cfg)
        self.img_size = probe.img_size[0]
        self.num_patches = probe.grid_size[0] * probe.grid_size[1]
        self._signature = {
            "model": cfg.model.name,
            "img_size": self.img_size,
            "decoder_embed_dim": probe.decoder_embed.out_features,
            "decoder_depth": len(probe.decoder_blocks),
            "norm_pix_loss": cfg.model.norm_pix_loss,
        }
        self.data_root, self.is_toy = resolve_data_root(cfg)
        self._vis_batch: dict[str, torch.Tensor] | None = None
        # Online k-NN (--knn-data): ``(encoder, EvalContext) -> metrics``, set by the command's front
        # (the evaluation layer, which may use the classification package; this one may not).
        self.knn_monitor = None

    # The engine's evaluation hook, used only by the online k-NN monitor.
    @property
    def evaluates(self) -> bool:
        return self.knn_monitor is not None

    def eval_every(self) -> int:
        return self.cfg.knn.every

    def eval_precision(self) -> str | None:
        return "fp32"

    def evaluate(self, model: nn.Module, ctx) -> dict[str, Any]:
        return self.knn_monitor(model, ctx) if self.knn_monitor is not None else {}

    def signature(self) -> dict[str, Any]:
        return dict(self._signature)

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.cfg.train.seed)  # the same initial weights for any process layout
        model = build_mae(self.cfg)
        if self.cfg.init:
            from mae_transfer.checkpoint import load_backbone

            load_backbone(
                model, self.cfg.init, expected_missing=("mask_token", "decoder_*"), trust=self.cfg.trust_checkpoint
            )
        return model

    def build_train_dataset(self):
        from mae_transfer.data.folder import ImageFolderDataset

        split = self.cfg.data.split
        if self.is_toy:
            log.info("no --data given: pretraining on the built-in toy data in %s (ImageFolder layout)", self.data_root)
        return ImageFolderDataset(
            self.data_root,
            split=split,
            transform=pretrain_transform(self.cfg, self.img_size),
            seed=self.cfg.train.seed,
            extra_noise=("noise", (self.num_patches,)),
            max_corrupt_fraction=self.cfg.data.max_corrupt_fraction,
        )

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        # The official pretraining decays every >1-D weight (cls and mask tokens included) and
        # nothing 1-D (timm add_weight_decay without a skip list).
        return param_groups(model, optim.weight_decay, optim.layer_decay, no_weight_decay=())

    def training_step(self, model: nn.Module, batch: dict, device: torch.device):
        imgs = batch["image"].to(device, non_blocking=True)
        noise = batch["noise"].to(device, non_blocking=True)
        out = model(imgs, noise=noise)
        return out.loss, {}

    # ------------------------------------------------------------------ pictures and exports
    def _fixed_batch(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        """The same images and masks every epoch: the first N images of the split, centre-cropped."""
        if self._vis_batch is None:
            from mae_transfer.data.folder import ImageFolderDataset

            d = self.cfg.data
            tf = transforms.Compose(
                [
                    transforms.Resize(self.img_size, interpolation=transforms.InterpolationMode.BICUBIC),
                    transforms.CenterCrop(self.img_size),
                    transforms.ToTensor(),
                    transforms.Normalize(d.mean, d.std),
                ]
            )
            ds = ImageFolderDataset(
                self.data_root,
                split=self.cfg.data.split,
                transform=tf,
                seed=12345,
                extra_noise=("noise", (self.num_patches,)),
            )
            n = min(self.cfg.vis.num_images, len(ds))
            # Spread the picks over the classes rather than taking the first class only.
            picks = [int(i * len(ds) / n) for i in range(n)]
            items = [ds[i] for i in picks]
            self._vis_batch = {
                "image": torch.stack([it["image"] for it in items]),
                "noise": torch.stack([it["noise"] for it in items]),
            }
        return self._vis_batch

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        every = self.cfg.vis.every_epochs
        last = (epoch + 1) == self.cfg.train.epochs
        if not trainer.dist.is_main or every <= 0 or ((epoch + 1) % every and not last):
            return
        from mae_transfer.pretrain.visualize import reconstruction_error, save_reconstruction_grid

        batch = self._fixed_batch(trainer)
        model = trainer.unwrapped
        dev = next(model.parameters()).device
        imgs, noise = batch["image"].to(dev), batch["noise"].to(dev)
        path = trainer.output_dir / "reconstructions" / f"epoch{epoch + 1:04d}.png"
        save_reconstruction_grid(
            model,
            imgs,
            path,
            mean=self.cfg.data.mean,
            std=self.cfg.data.std,
            noise=noise,
            title=f"epoch {epoch + 1}  step {trainer.step}",
        )
        err = reconstruction_error(model, imgs, noise)
        trainer.metrics.write(
            "reconstruction", {"step": trainer.step, "epoch": epoch + 1, "masked_pixel_mse": float(err)}
        )
        log.info("epoch %d: reconstruction picture %s (masked-patch pixel MSE %.4f)", epoch + 1, path, err)

    def on_train_end(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        from mae_transfer.checkpoint import export_mae_encoder

        path = export_mae_encoder(trainer.unwrapped, trainer.output_dir / "encoder.pth")
        log.info("encoder exported in the official MAE format to %s (use it as --backbone)", path)
