"""UperNet on a plain ViT (the BEiT / MAE ADE20K setup): the same function as mmsegmentation's
``configs/mae`` model, and sliding-window inference.

Backbone (MAE paper A.4 via BEiT's segmentation code; mmsegmentation's ``MAE`` backbone): the ViT
with a class token, global attention, BEiT's per-block relative position bias table (zero-
initialised from MAE weights) and layer scale (``gamma_1``, ``gamma_2`` at 1.0), no final norm;
four taps at equal relative depths (ViT-B blocks 4, 6, 8, 12 = 0-based 3, 5, 7, 11) rescaled by
:class:`~mae_transfer.models.pyramid.RescaleNeck` (x4, x2, x1, x0.5).

Decode head (UperNet, Xiao et al. ECCV 2018, as mmsegmentation's ``UPerHead``): a pyramid pooling
module (bins 1, 2, 3, 6) on the coarsest level, 1x1 lateral convolutions, top-down fusion, 3x3
FPN convolutions, all levels resized to stride 4 and fused by a 3x3 convolution, dropout 0.1 and
a 1x1 classifier; every convolution with BatchNorm (SyncBN under DDP) and ReLU. Auxiliary FCN
head on the stride-16 level (one 3x3 convolution), loss weight 0.4. Every resize is bilinear with
``align_corners=False``.

Module names are mmsegmentation's (``neck.upsample_4x``, ``decode_head.psp_modules``,
``lateral_convs``, ``fpn_bottleneck``, ``conv_seg``, ``auxiliary_head.convs``, ``conv`` / ``bn``
inside each convolution block); the backbone keeps the official MAE / timm ViT names, and
:mod:`mae_transfer.checkpoint.mmseg` maps its ``layers.N.ln1`` ... names.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_transfer.models.pyramid import RescaleNeck, SimpleNeck, drop_unused_stages, is_hierarchical, simple_source


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Module):
    """Convolution (no bias), BatchNorm, ReLU: mmsegmentation's ``ConvModule`` with its names
    ``conv`` and ``bn`` and its initialisation (Kaiming normal, fan out, ReLU; BN 1 and 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class _ClassifierHead(nn.Module):
    """What mmsegmentation's decode heads share: dropout, then a 1x1 ``conv_seg`` (N(0, 0.01))."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x) if self.dropout is not None else x)


class UPerHead(_ClassifierHead):
    """UperNet decode head over ``len(in_channels)`` levels, finest first -> logits at the finest stride."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales=(1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, dropout)
        top = in_channels[-1]
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(top, channels, 1)) for s in self.pool_scales]
        )
        self.bottleneck = ConvBNReLU(top + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [top] + [_resize(p(top), top.shape[-2:]) for p in self.psp_modules]
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1])] + [self.bottleneck(torch.cat(pooled, 1))]
        for i in range(len(lat) - 1, 0, -1):  # top-down: add the upsampled coarser level
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1))
        return self.classify(fused)


class FCNHead(_ClassifierHead):
    """Auxiliary head: ``num_convs`` 3x3 convolutions, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(
            *[ConvBNReLU(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.convs(x))


class UperNetViT(nn.Module):
    """ViT (``backbone``) + four taps + :class:`RescaleNeck` (``neck``) + UperNet (``decode_head``)
    (+ the auxiliary FCN head, ``auxiliary_head``, in training).

    ``forward(images)`` returns logits at the input size (an input that is not a multiple of the
    coarsest stride is padded and the padding cut from the logits). In training mode it returns
    ``(logits, aux_logits)``.

    A hierarchical backbone (its ``feature_info`` lists several strides, e.g. a ConvNeXt) is read
    from its ``feature_info`` instead: ``taps`` are stage indices taken as they are (no rescaling,
    ``neck`` is Identity; each level keeps its stage's width into the head), ``simple`` rescales the
    stride-16 stage as the ViT's last block.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tap_blocks: Sequence[int],
        num_classes: int,
        channels: int = 768,
        aux_channels: int = 256,
        aux_level: int = 2,
        aux_convs: int = 1,
        dropout: float = 0.1,
        neck_norm: str = "bn",
        pyramid: str = "taps",
        pyramid_channels: int = 256,
    ):
        super().__init__()
        info = backbone.feature_info  # ViT: one entry per block; hierarchical: one per stage
        depth = len(info)
        hierarchical = is_hierarchical(backbone)
        self.backbone = backbone
        self.pyramid = pyramid
        if pyramid == "taps":  # BEiT / MAE / mmsegmentation: four blocks, rescaled
            tap_blocks = tuple(int(b) for b in tap_blocks)
            if len(tap_blocks) != 4 or not all(0 <= b < depth for b in tap_blocks):
                what = "stage indices" if hierarchical else "tap blocks"
                raise ValueError(f"UperNet needs 4 {what} in 0..{depth - 1}, got {tap_blocks}: set model.tap_blocks")
            self.tap_blocks = tap_blocks
            if hierarchical:  # stages at strides 4 .. 32 already: no rescaling
                self.neck = nn.Identity()
                dims = [int(info[b]["num_chs"]) for b in tap_blocks]
                self.size_divisor = max(int(info[b]["reduction"]) for b in tap_blocks)
            else:
                dim = backbone.embed_dim
                self.neck = RescaleNeck(dim, neck_norm)
                dims = [dim] * 4
                self.size_divisor = backbone.patch_size * 2  # the coarsest level is half the token grid
        elif pyramid == "simple":  # ViTDet: the last block (a hierarchical one's stride-16 stage), rescaled
            index, dim, stride = simple_source(backbone)
            self.tap_blocks = (index,)
            self.neck = SimpleNeck(dim, stride, pyramid_channels)
            dims = [pyramid_channels] * 4
            self.size_divisor = stride * 2  # the coarsest level is half the source map
        else:
            raise ValueError(f"model.pyramid must be 'taps' or 'simple', got {pyramid!r}")
        self.decode_head = UPerHead(dims, channels, num_classes, dropout=dropout)
        self.aux_level = aux_level
        self.auxiliary_head = (
            FCNHead(dims[aux_level], aux_channels, num_classes, num_convs=aux_convs, dropout=dropout)
            if aux_channels
            else None
        )
        self.num_classes = num_classes

    @property
    def vit(self) -> nn.Module:
        return self.backbone

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The neck's four levels (strides patch/4 .. patch*2) of a (B, 3, H, W) batch: the tap blocks
        (or the last block, for the simple pyramid) through ``forward_intermediates`` and the neck."""
        return self.neck(self.backbone.forward_intermediates(x, indices=list(self.tap_blocks), output_fmt="NCHW"))

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        d = self.size_divisor
        ph, pw = (d - h % d) % d, (d - w % d) % d
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.features(x)
        logits = _resize(self.decode_head(feats), (h + ph, w + pw))[..., :h, :w]
        if self.training and self.auxiliary_head is not None:
            aux = _resize(self.auxiliary_head(feats[self.aux_level]), (h + ph, w + pw))[..., :h, :w]
            return logits, aux
        return logits


def default_tap_blocks(depth: int) -> tuple[int, ...]:
    """BEiT / mmsegmentation's MAE taps: ViT-B [3, 5, 7, 11], ViT-L [7, 11, 15, 23], and for other
    depths the same relative positions (1/3, 1/2, 2/3 and all of the depth; 6 blocks: [1, 2, 3, 5])."""
    known = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}
    return known.get(depth) or tuple(sorted({max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1)}))


def build_upernet(
    vit: nn.Module,
    num_classes: int,
    tap_blocks: Sequence[int] | None = None,
    channels: int = 768,
    aux_channels: int = 256,
    aux_convs: int = 1,
    pyramid: str = "taps",
    pyramid_channels: int = 256,
) -> UperNetViT:
    """UperNet on ``vit`` (its final norm is dropped: the taps are block outputs, and an unused
    norm would stop DDP, which needs a gradient for every parameter). On a hierarchical backbone
    (e.g. a ConvNeXt) ``tap_blocks`` are stage indices, default all four, and the stages after the
    last one read are dropped for the same reason."""
    vit.norm = nn.Identity()
    if tap_blocks is not None:
        taps = tuple(tap_blocks)
    elif is_hierarchical(vit):
        taps = tuple(range(len(vit.feature_info)))
    else:
        taps = default_tap_blocks(len(vit.blocks))
    model = UperNetViT(
        vit,
        taps,
        num_classes,
        channels=channels,
        aux_channels=aux_channels,
        aux_convs=aux_convs,
        pyramid=pyramid,
        pyramid_channels=pyramid_channels,
    )
    drop_unused_stages(vit, model.tap_blocks)  # a no-op for a ViT
    return model


def slide_windows(height: int, width: int, crop: int = 512, stride: int = 341) -> list[tuple[int, int, int, int]]:
    """``(y1, y2, x1, x2)`` of the ``crop x crop`` windows ``stride`` apart that cover a ``height x
    width`` image, row by row (BEiT / mmsegmentation's ``slide`` mode): windows are shifted back
    inside the image at the borders, and a side shorter than the window is one window of its length."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


@torch.no_grad()
def slide_inference(
    model: nn.Module, image: torch.Tensor, num_classes: int, crop: int = 512, stride: int = 341
) -> torch.Tensor:
    """Logits (B, C, H, W) of ``image`` (B, 3, H, W) from the :func:`slide_windows` of ``crop`` every
    ``stride`` px, averaged where they overlap (BEiT / mmsegmentation's ``slide`` mode). An image
    smaller than the window is one window of its own size, so the result equals whole-image
    inference whenever one window covers the image."""
    b, _, h, w = image.shape
    logits = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        logits[:, :, y1:y2, x1:x2] += model(image[:, :, y1:y2, x1:x2]).float()
        count[:, :, y1:y2, x1:x2] += 1
    return logits / count


__all__ = [
    "ConvBNReLU",
    "FCNHead",
    "UPerHead",
    "UperNetViT",
    "build_upernet",
    "default_tap_blocks",
    "slide_inference",
    "slide_windows",
]
