"""UperNet on a plain ViT (the BEiT / MAE ADE20K setup), and sliding-window inference.

Backbone (MAE paper A.4, BEiT segmentation configs): the ViT with relative position bias switched
on and zero-initialised (MAE pre-training has none), global attention in every block, four taps at
equal intervals (ViT-B blocks 4, 6, 8, 12 = 0-based 3, 5, 7, 11; ViT-L 8, 12, 16, 24) rescaled
x4 (deconv, BatchNorm, GELU, deconv), x2 (deconv), x1, x0.5 (max-pool) by
:class:`~mae_transfer.models.pyramid.FourTapPyramid`.

Decode head (UperNet, Xiao et al. ECCV 2018, as configured by BEiT/mmsegmentation): a pyramid
pooling module (bins 1, 2, 3, 6) on the coarsest level, 1x1 lateral convolutions, top-down FPN
fusion, 3x3 FPN convolutions, all levels upsampled to stride 4 and fused by a 3x3 convolution,
dropout 0.1 and a 1x1 classifier; every convolution with BatchNorm (SyncBN under DDP) and ReLU.
Auxiliary FCN head on the stride-16 level (one 3x3 convolution, 256 channels), loss weight 0.4.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_transfer.models.pyramid import FourTapPyramid
from mae_transfer.models.vit import create_vit


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """UperNet decode head over ``len(in_channels)`` levels, finest first."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        top = in_channels[-1]
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(top, channels, 1)) for s in self.pool_scales])
        self.ppm_bottleneck = conv_bn_relu(top + len(self.pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList([conv_bn_relu(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [top] + [_resize(p(top), top.shape[-2:]) for p in self.ppm]
        lat = [l(f) for l, f in zip(self.laterals, feats[:-1])] + [self.ppm_bottleneck(torch.cat(pooled, 1))]
        for i in range(len(lat) - 1, 0, -1):  # top-down: add the upsampled coarser level
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: ``num_convs`` 3x3 convolutions, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        layers = [conv_bn_relu(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)]
        self.convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


class UperNetViT(nn.Module):
    """ViT + four-tap pyramid + UperNet (+ auxiliary FCN head in training).

    ``forward(images)`` returns logits at the input size (inputs are padded to a multiple of the
    coarsest stride and the padding is cut from the logits). In training mode it returns
    ``(logits, aux_logits)``.
    """

    def __init__(self, backbone: FourTapPyramid, num_classes: int, channels: int = 768, aux_channels: int = 256,
                 aux_level: int = 2, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        dims = [backbone.out_channels] * 4
        self.decode_head = UperHead(dims, channels, num_classes, dropout=dropout)
        self.aux_level = aux_level
        self.aux_head = FCNHead(dims[aux_level], aux_channels, num_classes, dropout=dropout) if aux_channels else None
        self.num_classes = num_classes
        self.size_divisor = max(backbone.strides)

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        d = self.size_divisor
        ph, pw = (d - h % d) % d, (d - w % d) % d
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = list(self.backbone(x).values())
        logits = _resize(self.decode_head(feats), (h + ph, w + pw))[..., :h, :w]
        if self.training and self.aux_head is not None:
            aux = _resize(self.aux_head(feats[self.aux_level]), (h + ph, w + pw))[..., :h, :w]
            return logits, aux
        return logits


def build_upernet(
    vit_name: str,
    num_classes: int,
    img_size: int = 512,
    tap_blocks: Sequence[int] | None = None,
    use_rel_pos: bool = True,
    drop_path: float = 0.1,
    channels: int = 768,
    aux_channels: int = 256,
    grad_checkpointing: bool = False,
) -> UperNetViT:
    """UperNet on ``vit_name`` (random weights; load a backbone into ``model.backbone.vit``)."""
    vit = create_vit(vit_name, img_size=img_size, num_classes=0, global_pool="", use_rel_pos=use_rel_pos,
                     drop_path_rate=drop_path, grad_checkpointing=grad_checkpointing)
    vit.norm = nn.Identity()  # the taps are block outputs; an unused final norm would stop DDP
    depth = len(vit.blocks)
    if tap_blocks is None:
        # BEiT/MAE ADE20K taps (0-based): ViT-B [3, 5, 7, 11], ViT-L [7, 11, 15, 23].
        tap_blocks = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}.get(depth) or tuple(
            sorted({max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1)})
        )
    if len(tap_blocks) != 4 or len(set(tap_blocks)) != 4 or not all(0 <= b < depth for b in tap_blocks):
        raise ValueError(
            f"UperNet needs 4 distinct tap blocks in 0..{depth - 1} for the {depth}-block {vit_name}, got {tuple(tap_blocks)}: "
            "set model.tap_blocks (or use a deeper model)"
        )
    pyramid = FourTapPyramid(vit, tap_blocks=list(tap_blocks), norm="bn")
    return UperNetViT(pyramid, num_classes, channels=channels, aux_channels=aux_channels)


@torch.no_grad()
def slide_inference(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int = 512, stride: int = 341) -> torch.Tensor:
    """Logits (B, C, H, W) of ``image`` (B, 3, H, W) from ``crop x crop`` windows ``stride`` apart,
    averaged where they overlap (BEiT / mmsegmentation's ``slide`` mode). Windows are shifted back
    inside the image at the borders; an image smaller than the window is one window of its own
    size, so the result equals whole-image inference whenever one window covers the image."""
    b, _, h, w = image.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    logits = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits[:, :, y1:y2, x1:x2] += model(image[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


__all__ = ["UperHead", "FCNHead", "UperNetViT", "build_upernet", "slide_inference"]
