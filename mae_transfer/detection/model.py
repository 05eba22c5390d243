"""Mask R-CNN on a plain ViT with torchvision's detection building blocks (no detectron2).

Heads follow the transfer recipes: a 2-conv RPN head, a 4-conv + 1-fc box head and a 4-conv mask
head, all with normalisation (Benchmarking-ViT section 3 and ViTDet section 3; torchvision's
``maskrcnn_resnet50_fpn_v2`` uses the same head shapes). ViTDet normalises with LayerNorm, the
Benchmarking-ViT recipe with (Sync)BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from mae_transfer.models.pyramid import VITDET_GLOBAL_BLOCKS, FourTapPyramid, LayerNorm2d, SimpleFeaturePyramid, equal_interval_blocks
from mae_transfer.models.vit import create_vit


class PyramidBackbone(nn.Module):
    """What torchvision's detectors expect: ``forward(x) -> OrderedDict`` and ``out_channels``."""

    def __init__(self, pyramid: nn.Module):
        super().__init__()
        self.body = pyramid
        self.out_channels = pyramid.out_channels
        self.names = list(pyramid.names)

    def forward(self, x):
        return self.body(x)


def build_vit_backbone(
    vit_name: str,
    pyramid: str = "simple",
    img_size: int = 1024,
    window_size: int = 14,
    global_blocks: tuple[int, ...] | None = None,
    use_rel_pos: bool = True,
    drop_path: float = 0.1,
    grad_checkpointing: bool = False,
    norm: str | None = None,
) -> PyramidBackbone:
    """A windowed ViT (global blocks at equal intervals) wrapped in a pyramid.

    pyramid: ``simple`` (ViTDet, LayerNorm) or ``fpn4`` (Benchmarking-ViT: four taps + FPN, BN).
    """
    if global_blocks is None:
        # ViTDet's propagation blocks: the last block of each quarter (ViTDet section 3).
        with torch.device("meta"):
            depth = len(create_vit(vit_name, num_classes=0, global_pool="").blocks)
        global_blocks = tuple(VITDET_GLOBAL_BLOCKS.get(vit_name, equal_interval_blocks(depth)))
    vit = create_vit(
        vit_name, img_size=img_size, num_classes=0, global_pool="", class_token=False, window_size=window_size,
        global_blocks=global_blocks, use_rel_pos=use_rel_pos, drop_path_rate=drop_path, grad_checkpointing=grad_checkpointing,
    )
    if pyramid == "simple":
        body = SimpleFeaturePyramid(vit, out_channels=256, norm=norm or "ln")
    elif pyramid == "fpn4":
        # Taps at the end of each quarter of the blocks (Benchmarking-ViT: ViT-B 2, 5, 8, 11).
        body = FourTapPyramid(vit, tap_blocks=equal_interval_blocks(len(vit.blocks)), norm=norm or "bn", fpn_channels=256)
    else:
        raise ValueError(f"unknown pyramid {pyramid!r}; use simple or fpn4")
    return PyramidBackbone(body)


def build_mask_rcnn(backbone: PyramidBackbone, num_classes: int, img_size: int = 1024, head_norm: str = "ln") -> MaskRCNN:
    """Mask R-CNN with normalised heads; ``num_classes`` includes the background (COCO: 81).

    Images are resized so that the longer side is ``img_size`` and padded to a multiple of 32.
    """
    norm_layer = {"ln": LayerNorm2d, "bn": nn.BatchNorm2d}[head_norm]
    levels = backbone.names  # p2..p6
    # One anchor size per level, 3 aspect ratios (FPN / ViTDet defaults): 32 px at stride 4.
    anchors = AnchorGenerator(sizes=tuple((32 * 2**i,) for i in range(len(levels))), aspect_ratios=((0.5, 1.0, 2.0),) * len(levels))
    roi_levels = [n for n in levels if n != "p6"]  # RoIs are pooled from strides 4-32
    c = backbone.out_channels
    return MaskRCNN(
        backbone,
        num_classes=None,  # the predictors below fix the class count
        min_size=img_size,
        max_size=img_size,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=0),
        box_head=FastRCNNConvFCHead((c, 7, 7), [256, 256, 256, 256], [1024], norm_layer=norm_layer),
        box_predictor=FastRCNNPredictor(1024, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=14, sampling_ratio=0),
        mask_head=MaskRCNNHeads(c, [256, 256, 256, 256], 1, norm_layer=norm_layer),
        mask_predictor=MaskRCNNPredictor(256, 256, num_classes),
    )


__all__ = ["PyramidBackbone", "build_vit_backbone", "build_mask_rcnn"]
