"""The backbone seam: one config every task shares and one ``create_backbone`` behind a dict of builders.

Every task config's ``model`` section is a :class:`BackboneConfig` (the task's own model options are
added by a subclass), so the fields that say *which network* (family, size name or explicit sizes,
MLP ratio, stochastic depth, activation checkpointing) are spelled once. :func:`create_backbone`
builds it through :data:`BACKBONES`, a plain dict of builders keyed by family (the idea of SAM's
``sam_model_registry``); a task passes its own use of the network (input size, classifier or none,
pooling, and for the ViT the windowing and position options its recipe needs) as keyword arguments.

A builder takes ``(cfg, **use)`` and returns an ``nn.Module`` that offers what the tasks rely on:

* ``forward_intermediates(x, indices, norm=False, output_fmt="NCHW")``: feature maps of chosen
  stages/blocks (the pyramids and UperNet read these), and ``feature_info`` (channels and stride
  of each stage or block);
* ``layer_id(name)`` / ``num_layer_ids()`` (layer-wise lr decay), ``no_weight_decay()``,
  ``set_grad_checkpointing``; for classification ``forward_features`` / ``forward_head`` /
  ``reset_classifier`` and ``embed_dim``.

Keyword arguments a family has no use for (a ViT's window size for a convolutional network) are
ignored by that family's builder. Register a family by adding one entry::

    from mae_transfer.models.backbone import BACKBONES
    BACKBONES["my_net"] = build_my_net   # (cfg, **use) -> nn.Module

Checkpoint reading per family sits beside its builder: the ViT's is :mod:`mae_transfer.checkpoint`
(every format it knows); another family's model offers ``checkpoint_filter_fn(state_dict) -> (state
dict in its names, format)`` and ``describe_state_dict(state_dict) -> str``, which
:func:`mae_transfer.checkpoint.load_backbone` uses instead (the convnet's:
:func:`mae_transfer.models.convnet.convnet_checkpoint_filter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from mae_transfer.models.convnet import build_convnet
from mae_transfer.models.vit import SIZE_FIELDS, VisionTransformer, vit_size, vit_size_label


@dataclass
class BackboneConfig:
    """Which network a task builds. ``name`` is a size name of the family (``vit_base_patch16`` ...);
    explicit ``embed_dim`` / ``depth`` / ``num_heads`` / ``patch_size`` override it, and a network of
    no standard size (e.g. read from a checkpoint) has ``name`` None and all four."""

    family: str = "vit"
    name: str | None = "vit_base_patch16"
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    drop_path: float = 0.1  # stochastic depth of the last block (linear in depth)
    grad_checkpointing: bool = False  # activation checkpointing of the blocks (less memory)

    def explicit_size(self) -> dict[str, int | None]:
        return {k: getattr(self, k) for k in SIZE_FIELDS}

    def size(self) -> dict[str, int]:
        """The resolved ``embed_dim``, ``depth``, ``num_heads`` and ``patch_size`` (ValueError when a
        name is unknown or a size without a name is incomplete)."""
        return vit_size(self.name, **self.explicit_size())

    def vit_label(self) -> str:
        """The size name, or ``vit_<width>x<depth>_patch<p>`` for a network of any other size (other
        families: ``<family>:<label>``)."""
        label = vit_size_label(self.name, **self.explicit_size())
        return label if self.family == "vit" else f"{self.family}:{self.name or label}"

    def check_family(self) -> None:
        if self.family not in BACKBONES:
            raise ValueError(f"unknown backbone family {self.family!r}; known: {', '.join(sorted(BACKBONES))}")


def build_vit(cfg: BackboneConfig, **use: Any) -> VisionTransformer:
    """The plain ViT of :mod:`mae_transfer.models.vit` (timm's names and semantics). ``use`` holds the
    task's keyword arguments of :class:`VisionTransformer` (``img_size``, ``num_classes``,
    ``global_pool``, ``class_token``, ``window_size``, ``global_blocks``, ``use_rel_pos``,
    ``rel_pos_type``, ``layer_scale``, ``pos_embed_img_size`` ...); ``drop_path_rate`` there
    overrides ``cfg.drop_path`` (a linear probe trains without stochastic depth)."""
    params: dict[str, Any] = dict(
        mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path, grad_checkpointing=cfg.grad_checkpointing
    )
    params.update(cfg.size())
    params.update(use)
    return VisionTransformer(**params)


# family -> builder(cfg, **use). Other families register here (see the module docstring).
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "vit": build_vit,
    "convnet": build_convnet,  # ConvNeXt-style hierarchical network (mae_transfer.models.convnet)
}


def create_backbone(cfg: BackboneConfig, **use: Any) -> nn.Module:
    """Build the network ``cfg`` describes with the task's ``use`` (random weights; pretrained ones
    are loaded by :mod:`mae_transfer.checkpoint`). Raises ValueError for an unknown family or size."""
    cfg.check_family()
    return BACKBONES[cfg.family](cfg, **use)


__all__ = ["BACKBONES", "BackboneConfig", "build_vit", "create_backbone"]
