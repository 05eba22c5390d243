"""Mask R-CNN on a plain ViT: the same function as detectron2's ViTDet Mask R-CNN.

Built from torchvision's ops (RoIAlign, batched NMS) and this package's own modules rather than
torchvision's ``MaskRCNN`` class, whose every stage differs from detectron2's in some convention
(class layout, rounded anchors, RoIAlign offsets and cached scales, proposal ranking, losses,
mask targets, test resize and mask pasting); see the README's "differences from detectron2".
Module and parameter names are detectron2's, so a detectron2 ViTDet checkpoint is this model's
state dict as is (``mae_transfer.checkpoint.detectron2``):

* ``backbone``: :class:`~mae_transfer.models.pyramid.SimpleFeaturePyramid` (``net`` = the ViT,
  ``simfp_2..5``) or, for the Benchmarking-ViT recipe, a four-tap pyramid with an FPN;
* ``proposal_generator``: :class:`~mae_transfer.detection.rpn.RPN`;
* ``roi_heads``: :class:`~mae_transfer.detection.roi_heads.ROIHeads`.

Inputs are uint8 RGB images (3, h, w) (or float with 0-255 values) no larger than ``img_size``;
they are normalised with the ImageNet mean and std (0-255 units) and zero-padded at the bottom
and right to ``img_size x img_size``, which both ViT recipes use at training and test time.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from mae_transfer.data.stats import IMAGENET_MEAN, IMAGENET_STD
from mae_transfer.detection.boxes import clip_boxes, nonempty
from mae_transfer.detection.masks import paste_masks
from mae_transfer.detection.roi_heads import BoxHead, BoxPredictor, MaskHead, ROIHeads, ROIPooler
from mae_transfer.detection.rpn import RPN, AnchorGenerator, RPNHead
from mae_transfer.models.backbone import BackboneConfig, create_backbone
from mae_transfer.models.pyramid import (
    VITDET_GLOBAL_BLOCKS,
    FourTapPyramid,
    SimpleFeaturePyramid,
    drop_unused_stages,
    equal_interval_blocks,
    is_hierarchical,
)
from mae_transfer.models.vit import VIT_SIZES, VisionTransformer

# Anchor side per pyramid level, 8 x its stride: 32 px at stride 4 up to 512 px at stride 64 (FPN, ViTDet).
ANCHOR_SIZE_PER_STRIDE = 8
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def pixel_stats(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> tuple[list[float], list[float]]:
    """Mean and std in 0-255 units (ImageNet: 123.675, 116.28, 103.53 / 58.395, 57.12, 57.375)."""
    return [round(float(m) * 255, 6) for m in mean], [round(float(s) * 255, 6) for s in std]


def detection_backbone(
    cfg: BackboneConfig,
    img_size: int,
    window_size: int = 14,
    global_blocks: Sequence[int] | None = None,
    use_rel_pos: bool = True,
    pretrain_img_size: int = 224,
) -> nn.Module:
    """The network ``cfg`` describes as detection uses it (no class token or classifier, no final
    norm), through :func:`~mae_transfer.models.backbone.create_backbone`.

    For the ViT: ViTDet's windowed ViT. The absolute position table keeps the ``pretrain_img_size``
    grid and its class row (ViTDet) and is resized to the input grid at every forward; the relative
    position tables of the global blocks are made for ``img_size``, those of window blocks for the
    window. ``global_blocks`` default: ViTDet's for the standard sizes, else the last block of each
    quarter (or the last block). Other families ignore the ViT's options.
    """
    if global_blocks is None and cfg.family == "vit":
        depth = cfg.size()["depth"]
        if cfg.name in VITDET_GLOBAL_BLOCKS and depth == VIT_SIZES[cfg.name].depth:
            global_blocks = VITDET_GLOBAL_BLOCKS[cfg.name]
        else:  # small test models: quarters when the depth allows, else the last block
            global_blocks = equal_interval_blocks(depth) if depth % 4 == 0 else (depth - 1,)
    net = create_backbone(
        cfg,
        img_size=img_size,
        num_classes=0,
        global_pool="",
        class_token=False,
        window_size=window_size,
        global_blocks=global_blocks or (),
        use_rel_pos=use_rel_pos,
        pos_embed_img_size=pretrain_img_size,
        pos_embed_class_row=True,
    )
    # The pyramids read block outputs directly (ViTDet and Benchmarking-ViT have no final norm); an
    # unused LayerNorm would also stop DDP, which requires every parameter to get a gradient.
    net.norm = nn.Identity()
    return net


def build_vit(
    name: str | None,
    img_size: int,
    window_size: int = 14,
    global_blocks: Sequence[int] | None = None,
    use_rel_pos: bool = True,
    drop_path: float = 0.1,
    grad_checkpointing: bool = False,
    pretrain_img_size: int = 224,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    patch_size: int | None = None,
    mlp_ratio: float = 4.0,
) -> VisionTransformer:
    """:func:`detection_backbone` of a ViT given by size name (see ``VIT_SIZES``), each of
    ``embed_dim``/``depth``/``num_heads``/``patch_size`` overriding it; with ``name=None`` all four
    are needed."""
    cfg = BackboneConfig(
        name=name,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch_size,
        mlp_ratio=mlp_ratio,
        drop_path=drop_path,
        grad_checkpointing=grad_checkpointing,
    )
    return detection_backbone(cfg, img_size, window_size, global_blocks, use_rel_pos, pretrain_img_size)


def build_pyramid(
    vit: nn.Module,
    pyramid: str = "simple",
    channels: int = 256,
    norm: str | None = None,
    fpn_norm: str = "none",
) -> nn.Module:
    """``simple``: ViTDet's simple feature pyramid (LayerNorm by default); ``fpn4``: Benchmarking-ViT's
    four taps (GroupNorm in the x4 branch by default) into an FPN with ``fpn_norm``.

    ``vit`` may be a hierarchical backbone (its ``feature_info`` lists several strides): ``simple``
    then rescales its stride-16 stage and drops the stages after it (unused: DDP needs a gradient for
    every parameter), ``fpn4`` feeds its four stages to the FPN as they are."""
    if pyramid == "simple":
        fp = SimpleFeaturePyramid(vit, out_channels=channels, norm=norm or "ln")
        drop_unused_stages(vit, [fp.source_index])  # a no-op for a ViT
        return fp
    if pyramid == "fpn4":
        # Taps at the end of each quarter of the blocks (Benchmarking-ViT: ViT-B 2, 5, 8, 11); a
        # hierarchical backbone's four stages.
        return FourTapPyramid(
            vit,
            tap_blocks=None if is_hierarchical(vit) else equal_interval_blocks(len(vit.blocks)),
            norm=norm or "gn",
            fpn_channels=channels,
            fpn_norm=fpn_norm,
        )
    raise ValueError(f"unknown pyramid {pyramid!r}; use simple or fpn4")


class MaskRCNN(nn.Module):
    """Backbone pyramid + RPN + RoI heads, with detectron2's pre- and post-processing."""

    def __init__(
        self,
        backbone: nn.Module,
        proposal_generator: RPN,
        roi_heads: ROIHeads,
        img_size: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ):
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.img_size = int(img_size)
        self.register_buffer(
            "pixel_mean", torch.tensor(list(pixel_mean), dtype=torch.float32).view(-1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(list(pixel_std), dtype=torch.float32).view(-1, 1, 1), persistent=False
        )

    @property
    def vit(self) -> VisionTransformer:
        return self.backbone.vit

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes

    def preprocess(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise and zero-pad (bottom, right) to ``img_size`` squares: (B, 3, S, S) and the
        unpadded sizes, which proposals and boxes are clipped to."""
        s = self.img_size
        dev = self.pixel_mean.device
        batch = torch.zeros(len(images), 3, s, s, device=dev)
        sizes = []
        for i, im in enumerate(images):
            h, w = int(im.shape[-2]), int(im.shape[-1])
            if h > s or w > s:
                raise ValueError(
                    f"image {i} is {h}x{w}, larger than the detector's {s}x{s} input: resize it first "
                    "(mae_transfer.detection.transforms.resize_for_test)"
                )
            batch[i, :, :h, :w] = (im.to(dev, non_blocking=True).float() - self.pixel_mean) / self.pixel_std
            sizes.append((h, w))
        return batch, sizes

    def forward(self, images: Sequence[torch.Tensor], targets: Sequence[dict] | None = None):
        """Training (``targets`` given): the loss dict. Otherwise detections in the input frame
        (see :meth:`inference`)."""
        if targets is None:
            return self.inference(images)
        x, sizes = self.preprocess(images)
        features = self.backbone(x)
        dev = x.device
        targets = [{**t, "boxes": t["boxes"].to(dev).float(), "labels": t["labels"].to(dev)} for t in targets]
        proposals, losses = self.proposal_generator(features, sizes, [t["boxes"] for t in targets])
        samples = self.roi_heads.sample([p[0] for p in proposals], targets)
        feats = [features[f] for f in self.roi_heads.in_features]
        losses.update(self.roi_heads.losses(feats, samples, targets))
        return losses

    @torch.no_grad()
    def inference(
        self,
        images: Sequence[torch.Tensor],
        output_sizes: Sequence[tuple[int, int]] | None = None,
        paste: bool = True,
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image: ``boxes`` (N, 4) xyxy, ``scores``, ``labels`` (0..K-1) and
        ``masks`` (N, H, W) bool (or only ``mask_probs`` (N, 28, 28) with ``paste=False``).

        ``output_sizes`` are the sizes to report in (the original images that were resized to
        ``images``): boxes are scaled by ``output / input`` and clipped, empty boxes dropped, and
        masks pasted at that size. Default: the input sizes.
        """
        x, sizes = self.preprocess(images)
        features = self.backbone(x)
        proposals, _ = self.proposal_generator(features, sizes)
        feats = [features[f] for f in self.roi_heads.in_features]
        dets = self.roi_heads.detect(feats, [p[0] for p in proposals], sizes)
        out = []
        for d, (h, w), target in zip(dets, sizes, output_sizes or sizes):
            oh, ow = int(target[0]), int(target[1])
            boxes = d["boxes"].clone()
            boxes[:, 0::2] *= ow / w
            boxes[:, 1::2] *= oh / h
            boxes = clip_boxes(boxes, (oh, ow))
            keep = nonempty(boxes)
            res = {
                "boxes": boxes[keep],
                "scores": d["scores"][keep],
                "labels": d["classes"][keep],
                "mask_probs": d["mask_probs"][keep],
            }
            if paste:
                res["masks"] = paste_masks(res["mask_probs"], res["boxes"], (oh, ow))
            out.append(res)
        return out

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detections on one uint8 RGB image (3, H, W) of any size, in its own pixel frame: the
        test resize (longest side ``img_size``, PIL bilinear) is done here."""
        from mae_transfer.detection.transforms import resize_for_test

        resized = resize_for_test(image, self.img_size)
        return self.inference([resized], [tuple(image.shape[-2:])])[0]


def build_mask_rcnn(
    backbone: nn.Module,
    num_classes: int,
    img_size: int = 1024,
    head_norm: str = "ln",
    head_channels: int = 256,
    fc_dim: int = 1024,
    rpn_convs: int = 2,
    box_head_convs: int = 4,
    mask_head_convs: int = 4,
    box_batch_size_per_image: int = 512,
    rpn_pre_nms_topk: tuple[int, int] = (2000, 1000),
    rpn_post_nms_topk: tuple[int, int] = (1000, 1000),
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
) -> MaskRCNN:
    """Mask R-CNN for ``num_classes`` object classes (COCO: 80; the background is implicit).

    Defaults are ViTDet's (``mask_rcnn_vitdet_b_100ep.py``): 2-conv RPN, 4conv1fc box head with
    ``fc_dim`` 1024, 4-conv mask head, all ``head_channels`` wide with ``head_norm`` (LayerNorm;
    Benchmarking-ViT: BatchNorm); 512 sampled RoIs an image; score > 0.05, NMS 0.5, 100 detections.
    """
    levels = list(backbone.names)  # p2..p6
    strides = [int(s) for s in backbone.strides]
    c = backbone.out_channels
    anchors = AnchorGenerator([ANCHOR_SIZE_PER_STRIDE * s for s in strides], ASPECT_RATIOS, strides)
    rpn = RPN(
        RPNHead(c, anchors.num_anchors, rpn_convs),
        anchors,
        levels,
        pre_nms_topk=tuple(rpn_pre_nms_topk),
        post_nms_topk=tuple(rpn_post_nms_topk),
    )
    # RoIs are pooled from the four rescaled levels, not the max-pooled top level (ViTDet: p2-p5).
    n_roi = len(levels) - 1 if getattr(backbone, "top_block", True) else len(levels)
    roi_levels, roi_strides = levels[:n_roi], strides[:n_roi]
    box_head = BoxHead(c, 7, [head_channels] * box_head_convs, [fc_dim], norm=head_norm)
    roi_heads = ROIHeads(
        ROIPooler(7, roi_strides),
        box_head,
        BoxPredictor(box_head.output_dim, num_classes),
        ROIPooler(14, roi_strides),
        MaskHead(c, [head_channels] * (mask_head_convs + 1), num_classes, norm=head_norm),
        roi_levels,
        num_classes,
        batch_size_per_image=box_batch_size_per_image,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
    )
    if pixel_mean is None or pixel_std is None:
        pixel_mean, pixel_std = pixel_stats()
    return MaskRCNN(backbone, rpn, roi_heads, img_size, pixel_mean, pixel_std)


__all__ = ["MaskRCNN", "build_mask_rcnn", "build_pyramid", "build_vit", "detection_backbone", "pixel_stats"]
