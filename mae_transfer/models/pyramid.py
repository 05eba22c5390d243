"""Adapters that turn a plain ViT into a multi-scale feature pyramid for dense tasks.

- :class:`SimpleFeaturePyramid` (ViTDet, Li et al. ECCV 2022, section 3): every level comes from
  the LAST block's stride-16 map: x4 (two 2x2 deconvolutions with LayerNorm + GELU between),
  x2 (one deconvolution), x1 (identity), x0.5 (2x2 max-pool), each followed by a 1x1 and a 3x3
  convolution with LayerNorm to ``out_channels``, plus a stride-64 level (max-pool of stride 32).
- :class:`FourTapPyramid` (Benchmarking-ViT detection / BEiT and MAE segmentation): four blocks
  at equal intervals are tapped and rescaled x4 (deconv, norm, GELU, deconv), x2 (deconv), x1,
  x0.5 (max-pool); optionally followed by a standard FPN.

Both return ``OrderedDict[str, Tensor]`` of (B, C, H / stride, W / stride) maps, finest first,
and expose ``out_channels`` and ``strides``, which is what torchvision's detection models take.

Both also take a hierarchical backbone (stages at several strides, e.g. ``mae_transfer.models.convnet``):
they read its ``feature_info`` (:func:`is_hierarchical`), the simple pyramid rescales its stride-16
stage exactly as the ViT's map, and the four-tap pyramid takes its four stages as they are (their
strides are already 4 .. 32), each with its own width, into the FPN. For a ViT nothing differs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def is_hierarchical(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is hierarchical: its ``feature_info`` (one entry per output
    ``forward_intermediates`` can return) lists several strides (a ConvNeXt's stages), where a
    plain ViT's blocks all share the patch stride."""
    return len({int(f["reduction"]) for f in backbone.feature_info}) > 1


def simple_source(backbone: nn.Module) -> tuple[int, int, int]:
    """``(index, channels, stride)`` of the map the simple pyramid rescales: a plain ViT's last block,
    a hierarchical backbone's (last) stride-16 stage (ViTDet's pyramid is made for stride 16)."""
    info = backbone.feature_info
    if is_hierarchical(backbone):
        found = [i for i, f in enumerate(info) if int(f["reduction"]) == 16]
        if not found:
            strides = sorted({int(f["reduction"]) for f in info})
            raise ValueError(f"the simple pyramid rescales a stride-16 map; the backbone's strides are {strides}")
        index = found[-1]
    else:
        index = len(info) - 1
    return index, int(info[index]["num_chs"]), int(info[index]["reduction"])


def drop_unused_stages(backbone: nn.Module, indices: Sequence[int]) -> None:
    """Remove what a dense model never runs: the stages of a hierarchical backbone after the last
    of ``indices``, and its classifier (``prune_intermediate_layers``, timm's method, where the
    backbone has one). DDP needs a gradient for every parameter. A ViT (no such method) is kept."""
    prune = getattr(backbone, "prune_intermediate_layers", None)
    if callable(prune) and is_hierarchical(backbone):
        prune(list(indices), prune_head=True)


def make_norm(kind: str, channels: int) -> nn.Module:
    """``ln`` (ViTDet), ``bn`` (BEiT segmentation; SyncBatchNorm under DDP via convert_sync_batchnorm),
    ``gn`` (32 groups, Benchmarking-ViT) or ``none``."""
    if kind == "ln":
        return LayerNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; use ln, bn, gn or none")


def _rescale(dim: int, scale: float, norm: str) -> list[nn.Module]:
    """ViTDet's layers that rescale a stride-16 map by ``scale``, each deconvolution halving the
    channels (the output has ``dim / scale`` channels for scale >= 1, ``dim`` for 0.5)."""
    if scale == 4.0:
        return [
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
            make_norm(norm, dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
        ]
    if scale == 2.0:
        return [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)]
    if scale == 1.0:
        return []
    if scale == 0.5:
        return [nn.MaxPool2d(2, stride=2)]
    raise ValueError(f"unsupported pyramid scale {scale}; use 4, 2, 1 or 0.5")


class ConvNormAct(nn.Conv2d):
    """A convolution followed by an optional norm and activation, the norm kept as ``.norm``.

    Parameter names are therefore ``weight`` (+ ``bias`` without a norm) and ``norm.weight`` /
    ``norm.bias``, the names detectron2 checkpoints use for the pyramid and the detection heads.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        norm: str = "none",
        activation: nn.Module | None = None,
        bias: bool | None = None,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, padding=padding, bias=(norm == "none") if bias is None else bias
        )
        self.norm = None if norm == "none" else make_norm(norm, out_channels)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return x if self.activation is None else self.activation(x)


def simple_level(
    dim: int, patch_size: int, scale: float, out_channels: int, norm: str
) -> tuple[str, int, nn.Sequential]:
    """One level of ViTDet's simple pyramid: ``(name, stride, layers)``; the layers rescale the
    ViT's map by ``scale`` (:func:`_rescale`) and apply a 1x1 and a 3x3 convolution with ``norm``."""
    ch = int(dim / scale) if scale >= 1 else dim
    layers = _rescale(dim, scale, norm) + [
        ConvNormAct(ch, out_channels, 1, norm=norm),
        ConvNormAct(out_channels, out_channels, 3, padding=1, norm=norm),
    ]
    stride = int(patch_size / scale)
    return f"simfp_{int(math.log2(stride))}", stride, nn.Sequential(*layers)


class SimpleNeck(nn.Module):
    """ViTDet's simple pyramid as a neck: the last block's map (B, D, h, w) -> four levels (strides
    patch/4 .. patch*2) of ``out_channels`` each; the levels of :class:`SimpleFeaturePyramid`
    without the ViT inside (for models that own their backbone, e.g. UperNet)."""

    def __init__(
        self,
        dim: int,
        patch_size: int,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        norm: str = "ln",
    ):
        super().__init__()
        self.level_names = []
        for scale in scales:
            name, _, level = simple_level(dim, patch_size, scale, out_channels, norm)
            self.add_module(name, level)
            self.level_names.append(name)
        self.out_channels = out_channels

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[last block map]`` -> one map per level, finest first."""
        if len(feats) != 1:
            raise ValueError(f"the simple neck takes the last block's map alone, got {len(feats)} maps")
        return [getattr(self, name)(feats[0]) for name in self.level_names]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on the last block of ``vit`` (window attention allowed).

    Output: ``p2``..``p5`` (strides 4..32) and ``p6`` (stride 64, ``max_pool2d(p5, 1, stride 2)``),
    ``out_channels`` channels each (256 in ViTDet). Each level is a rescale of the stride-16 map
    (x4: deconv, norm, GELU, deconv halving the channels twice; x2: one deconv; x1: identity;
    x0.5: 2x2 max-pool) followed by a 1x1 and a 3x3 convolution, each followed by ``norm`` (no
    activation). Module names are detectron2's (``net`` for the ViT, ``simfp_<level>`` for the
    levels, registered before ``net``), so a detectron2 ViTDet state dict has exactly this
    module's names and order.

    A hierarchical backbone (:func:`is_hierarchical`) gives its stride-16 stage instead of the last
    block (:func:`simple_source`); the levels are then made as for a ViT-B/16's map of that width.
    """

    def __init__(
        self,
        vit: nn.Module,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        norm: str = "ln",
        top_block: bool = True,
    ):
        super().__init__()
        # ViT: the last block, embed_dim channels at the patch stride; hierarchical: the stride-16 stage.
        self.source_index, dim, source_stride = simple_source(vit)
        self.strides: list[int] = []
        self.level_names: list[str] = []
        for scale in scales:
            name, stride, level = simple_level(dim, source_stride, scale, out_channels, norm)
            self.add_module(name, level)
            self.strides.append(stride)
            self.level_names.append(name)
        self.net = vit
        self.top_block = top_block
        if top_block:
            self.strides.append(self.strides[-1] * 2)
        self.names = [f"p{int(math.log2(s))}" for s in self.strides]
        self.out_channels = out_channels

    @property
    def vit(self) -> nn.Module:
        return self.net

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """(B, 3, H, W) -> OrderedDict of (B, out_channels, H / s, W / s) for each stride s."""
        feat = self.net.forward_intermediates(x, indices=[self.source_index], output_fmt="NCHW")[0]
        outs = [getattr(self, name)(feat) for name in self.level_names]
        if self.top_block:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(self.names, outs))


def equal_interval_blocks(depth: int, taps: int = 4) -> list[int]:
    """0-based indices of the last block of each of ``taps`` equal subsets (ViT-B: 2, 5, 8, 11)."""
    if depth % taps:
        raise ValueError(f"depth {depth} does not split into {taps} equal subsets; pass the tap blocks")
    step = depth // taps
    return [step * (i + 1) - 1 for i in range(taps)]


class RescaleNeck(nn.Module):
    """Four maps at the ViT's stride rescaled x4, x2, x1, x0.5 (BEiT / MAE segmentation neck).

    x4: 2x2 deconvolution, ``norm``, GELU, 2x2 deconvolution; x2: one 2x2 deconvolution; x1:
    identity; x0.5: 2x2 max-pool; every level keeps the ViT's width. Module names are
    mmsegmentation's ``Feature2Pyramid`` ones (``upsample_4x``, ``upsample_2x``, ``identity``,
    ``downsample_2x``), so its checkpoints need no renaming here.
    """

    def __init__(self, dim: int, norm: str = "bn"):
        super().__init__()
        self.upsample_4x = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            make_norm(norm, dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.upsample_2x = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.identity = nn.Identity()
        self.downsample_2x = nn.MaxPool2d(2, stride=2)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Four (B, D, h, w) maps -> (B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, h/2, w/2)."""
        if len(feats) != 4:
            raise ValueError(f"the rescale neck takes 4 maps, got {len(feats)}")
        ops = (self.upsample_4x, self.upsample_2x, self.identity, self.downsample_2x)
        return [op(f) for op, f in zip(ops, feats)]


class FourTapPyramid(nn.Module):
    """Four blocks of ``vit`` rescaled x4, x2, x1, x0.5 (strides 4, 8, 16, 32), ViT width each.

    A hierarchical backbone (:func:`is_hierarchical`, e.g. a ConvNeXt) is tapped at four stages
    instead, taken as they are (no rescaling: ``neck`` is Identity), each with its own width
    (``level_channels``) and stride (its ``feature_info``); the backbone stays under ``vit``.

    Args:
        tap_blocks: 0-based block indices; default equal intervals (Benchmarking-ViT detection:
            ViT-B 2, 5, 8, 11). BEiT/MAE segmentation uses 3, 5, 7, 11 for ViT-B. For a
            hierarchical backbone: stage indices, default all four stages.
        norm: norm between the two x4 deconvolutions (``bn`` BEiT, ``gn`` Benchmarking-ViT).
        fpn_channels: if set, a standard FPN (torchvision) maps the four levels to this many
            channels and adds a stride-64 level, as Mask R-CNN expects.
    """

    def __init__(
        self,
        vit: nn.Module,
        tap_blocks: Sequence[int] | None = None,
        norm: str = "bn",
        fpn_channels: int | None = None,
        fpn_norm: str = "none",
    ):
        super().__init__()
        self.vit = vit
        hierarchical = is_hierarchical(vit)
        if hierarchical:
            info = vit.feature_info
            self.tap_blocks = list(tap_blocks) if tap_blocks is not None else list(range(len(info)))
            if len(self.tap_blocks) != 4 or not all(0 <= int(i) < len(info) for i in self.tap_blocks):
                raise ValueError(f"FourTapPyramid needs 4 stage indices in 0..{len(info) - 1}, got {self.tap_blocks}")
            self.neck = nn.Identity()  # the stages already are at strides 4 .. 32
            self.level_channels = [int(info[i]["num_chs"]) for i in self.tap_blocks]
            self.strides = [int(info[i]["reduction"]) for i in self.tap_blocks]
        else:
            dim = vit.embed_dim
            self.tap_blocks = list(tap_blocks) if tap_blocks is not None else equal_interval_blocks(len(vit.blocks))
            if len(self.tap_blocks) != 4:
                raise ValueError(f"FourTapPyramid needs 4 tap blocks, got {self.tap_blocks}")
            self.neck = RescaleNeck(dim, norm)
            self.level_channels = [dim] * 4
            self.strides = [vit.patch_size // 4, vit.patch_size // 2, vit.patch_size, vit.patch_size * 2]
        self.fpn = None
        if fpn_channels:
            from torchvision.ops import FeaturePyramidNetwork
            from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

            norm_layer = None if fpn_norm == "none" else (lambda c: make_norm(fpn_norm, c))
            self.fpn = FeaturePyramidNetwork(
                list(self.level_channels), fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer
            )
            self.strides.append(self.strides[-1] * 2)
            self.out_channels = fpn_channels
        else:  # one width (a ViT's), or the list of the stages' widths
            widths = set(self.level_channels)
            self.out_channels = self.level_channels[0] if len(widths) == 1 else list(self.level_channels)
        self.names = [f"p{int(math.log2(s))}" for s in self.strides]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """(B, 3, H, W) -> OrderedDict of maps, finest first."""
        taps = self.vit.forward_intermediates(x, indices=self.tap_blocks, output_fmt="NCHW")
        levels = OrderedDict(zip(self.names, self.neck(taps)))
        if self.fpn is not None:
            out = self.fpn(levels)
            return OrderedDict(zip(self.names, out.values()))
        return levels


# Global-attention blocks of the windowed ViTDet backbones (ViTDet section 3; detectron2 configs).
VITDET_GLOBAL_BLOCKS = {
    "vit_base_patch16": (2, 5, 8, 11),
    "vit_large_patch16": (5, 11, 17, 23),
    "vit_huge_patch14": (7, 15, 23, 31),
    "vit_huge_patch16": (7, 15, 23, 31),
}
