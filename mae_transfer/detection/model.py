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

from mae_transfer.data.stats import IMAGENET_MEAN, IMAGENET_STD
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
    fpn_norm: str = "bn",
    channels: int = 256,
) -> PyramidBackbone:
    """A windowed ViT (global blocks at equal intervals) wrapped in a pyramid of ``channels`` maps.

    pyramid: ``simple`` (ViTDet: LayerNorm, ``norm`` default ``ln``) or ``fpn4`` (Benchmarking-ViT:
    four taps rescaled with GroupNorm in the x4 branch, ``norm`` default ``gn``, then an FPN whose
    convolutions are followed by ``fpn_norm``, BatchNorm in that recipe).
    """
    if global_blocks is None:
        # ViTDet's propagation blocks: the last block of each quarter (ViTDet section 3).
        with torch.device("meta"):
            depth = len(create_vit(vit_name, num_classes=0, global_pool="").blocks)
        if vit_name in VITDET_GLOBAL_BLOCKS:
            global_blocks = tuple(VITDET_GLOBAL_BLOCKS[vit_name])
        else:  # small test models: quarters when the depth allows, else the last block
            global_blocks = tuple(equal_interval_blocks(depth)) if depth % 4 == 0 else (depth - 1,)
    vit = create_vit(
        vit_name, img_size=img_size, num_classes=0, global_pool="", class_token=False, window_size=window_size,
        global_blocks=global_blocks, use_rel_pos=use_rel_pos, drop_path_rate=drop_path, grad_checkpointing=grad_checkpointing,
    )
    # The pyramids read block outputs directly (ViTDet and Benchmarking-ViT have no final norm); an
    # unused LayerNorm would also stop DDP, which requires every parameter to get a gradient.
    vit.norm = nn.Identity()
    if pyramid == "simple":
        body = SimpleFeaturePyramid(vit, out_channels=channels, norm=norm or "ln")
    elif pyramid == "fpn4":
        # Taps at the end of each quarter of the blocks (Benchmarking-ViT: ViT-B 2, 5, 8, 11).
        body = FourTapPyramid(
            vit, tap_blocks=equal_interval_blocks(len(vit.blocks)), norm=norm or "gn", fpn_channels=channels, fpn_norm=fpn_norm
        )
    else:
        raise ValueError(f"unknown pyramid {pyramid!r}; use simple or fpn4")
    return PyramidBackbone(body)


def build_mask_rcnn(
    backbone: PyramidBackbone,
    num_classes: int,
    img_size: int = 1024,
    head_norm: str = "ln",
    head_channels: int = 256,
    fc_dim: int = 1024,
    box_batch_size_per_image: int = 512,
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
    image_mean: tuple[float, float, float] = IMAGENET_MEAN,
    image_std: tuple[float, float, float] = IMAGENET_STD,
) -> MaskRCNN:
    """Mask R-CNN with normalised heads; ``num_classes`` includes the background (COCO: 81).

    Images are resized so that the longer side is ``img_size`` (ViTDet's test resize: shortest
    edge 1024, longest at most 1024) and every batch is padded to ``img_size x img_size``, as both
    ViT recipes do at training and test time (Benchmarking-ViT section 3: smaller padding at test
    costs 0.5-1 AP). Training images from :class:`LargeScaleJitter` already have that size.
    Test-time defaults: score threshold 0.05, at most 100 detections an image (COCO protocol).
    """
    norm_layer = {"ln": LayerNorm2d, "bn": nn.BatchNorm2d}[head_norm]
    levels = backbone.names  # p2..p6
    # One anchor size per level, 3 aspect ratios (FPN / ViTDet defaults): 32 px at stride 4.
    anchors = AnchorGenerator(sizes=tuple((32 * 2**i,) for i in range(len(levels))), aspect_ratios=((0.5, 1.0, 2.0),) * len(levels))
    roi_levels = [n for n in levels if n != "p6"]  # RoIs are pooled from strides 4-32
    c = backbone.out_channels
    model = MaskRCNN(
        backbone,
        num_classes=None,  # the predictors below fix the class count
        min_size=img_size,
        max_size=img_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=0),
        box_head=FastRCNNConvFCHead((c, 7, 7), [head_channels] * 4, [fc_dim], norm_layer=norm_layer),
        box_predictor=FastRCNNPredictor(fc_dim, num_classes),
        box_batch_size_per_image=box_batch_size_per_image,
        box_score_thresh=score_thresh,
        box_detections_per_img=detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=14, sampling_ratio=0),
        mask_head=MaskRCNNHeads(c, [head_channels] * 4, 1, norm_layer=norm_layer),
        mask_predictor=MaskRCNNPredictor(head_channels, head_channels, num_classes),
    )
    # Pad every batch to the full square: batch sizes round up to a multiple of this.
    model.transform.size_divisible = img_size
    return model


__all__ = ["PyramidBackbone", "build_vit_backbone", "build_mask_rcnn"]
