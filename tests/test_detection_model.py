"""Mask R-CNN on ViT pyramids: losses in training, COCO-style predictions in evaluation."""

from __future__ import annotations

import pytest
import torch

from mae_transfer.detection.model import build_mask_rcnn, build_vit_backbone


def targets(n_images: int, size: int = 64):
    out = []
    for i in range(n_images):
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 8:30, 10:40] = 1
        masks[1, 35:60, 5:25] = 1
        out.append({"boxes": torch.tensor([[10.0, 8.0, 40.0, 30.0], [5.0, 35.0, 25.0, 60.0]]),
                    "labels": torch.tensor([1, 2 + i]), "masks": masks})
    return out


@pytest.mark.parametrize("vit,pyramid,head_norm", [("vit_nano_patch8", "simple", "ln"), ("vit_micro_patch8", "fpn4", "bn")])
def test_mask_rcnn_trains_and_predicts_on_a_windowed_vit(vit, pyramid, head_norm):
    torch.manual_seed(0)
    backbone = build_vit_backbone(vit, pyramid=pyramid, img_size=64, window_size=4, global_blocks=(1,), drop_path=0.0)
    model = build_mask_rcnn(backbone, num_classes=4, img_size=64, head_norm=head_norm)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    model.train()
    losses = model(images, targets(2))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    # Gradients reach the ViT through the pyramid and the heads.
    assert backbone.body.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        preds = model(images)
    assert len(preds) == 2 and set(preds[0]) == {"boxes", "labels", "scores", "masks"}
    assert preds[0]["masks"].shape[1:] == (1, 64, 64)


def test_default_global_blocks_are_vitdets():
    with torch.device("meta"):
        b = build_vit_backbone("vit_base_patch16", img_size=1024)
    assert b.body.vit.global_blocks == (2, 5, 8, 11) and b.out_channels == 256
    assert b.names == ["p2", "p3", "p4", "p5", "p6"]
