"""Mask R-CNN on ViT pyramids: losses in training, detections at test time, detectron2's names,
and the box / mask arithmetic against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mae_transfer.detection.boxes import BoxCoder, Matcher, assign_levels, cell_anchors, grid_anchors, subsample_labels
from mae_transfer.detection.masks import (
    clip_polygon,
    crop_segment,
    mask_targets,
    paste_masks,
    polygons_in_box,
    segment_box,
)
from mae_transfer.detection.model import build_mask_rcnn, build_pyramid, build_vit


def square(x0, y0, x1, y1):
    return [np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]


def targets(n_images: int):
    return [
        {
            "boxes": torch.tensor([[10.0, 8.0, 40.0, 30.0], [5.0, 35.0, 25.0, 60.0]]),
            "labels": torch.tensor([0, 1 + i]),
            "segments": [square(10, 8, 40, 30), square(5, 35, 25, 60)],
        }
        for i in range(n_images)
    ]


@pytest.mark.parametrize(
    "vit,pyramid,head_norm", [("vit_nano_patch8", "simple", "ln"), ("vit_micro_patch8", "fpn4", "bn")]
)
def test_mask_rcnn_trains_and_predicts_on_a_windowed_vit(vit, pyramid, head_norm):
    torch.manual_seed(0)
    net = build_vit(vit, 64, window_size=4, global_blocks=(1,), drop_path=0.0, pretrain_img_size=32)
    backbone = build_pyramid(net, pyramid, channels=32, fpn_norm="bn" if head_norm == "bn" else "none")
    model = build_mask_rcnn(backbone, num_classes=3, img_size=64, head_norm=head_norm, head_channels=32, fc_dim=64)
    images = [
        torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8),
        torch.randint(0, 256, (3, 40, 64), dtype=torch.uint8),
    ]
    model.train()
    losses = model(images, targets(2))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    # Gradients reach the ViT (and its resized 4x4 position table) through the pyramid and the heads.
    assert net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and net.pos_embed.grad.abs().sum() > 0
    model.eval()
    preds = model(images)
    assert len(preds) == 2 and {"boxes", "labels", "scores", "masks", "mask_probs"} <= set(preds[0])
    assert preds[0]["masks"].shape[1:] == (64, 48) and preds[0]["masks"].dtype == torch.bool
    assert preds[1]["masks"].shape[1:] == (40, 64)
    with pytest.raises(ValueError, match="larger than the detector's 64x64 input"):
        model([torch.zeros(3, 80, 64, dtype=torch.uint8)])


def test_state_dict_has_detectron2_names_and_pos_embed_keeps_the_pretraining_grid():
    with torch.device("meta"):
        net = build_vit("vit_base_patch16", 1024)
        model = build_mask_rcnn(build_pyramid(net), num_classes=80)
    assert net.global_blocks == (2, 5, 8, 11)
    sd = model.state_dict()
    assert list(sd)[0] == "backbone.simfp_2.0.weight"  # detectron2 registers the levels before the ViT
    assert sd["backbone.net.pos_embed"].shape == (1, 197, 768)  # 14x14 + class row, resized at every forward
    assert sd["backbone.net.blocks.2.attn.rel_pos_h"].shape == (127, 64)  # global: 64x64 grid
    assert sd["backbone.net.blocks.0.attn.rel_pos_h"].shape == (27, 64)  # 14x14 window
    assert sd["roi_heads.box_predictor.cls_score.weight"].shape == (81, 1024)  # background last
    assert sd["roi_heads.box_predictor.bbox_pred.weight"].shape == (320, 1024)
    assert sd["roi_heads.mask_head.predictor.weight"].shape == (80, 256, 1, 1)
    assert "proposal_generator.rpn_head.conv.conv1.weight" in sd and "roi_heads.box_head.conv4.norm.weight" in sd
    assert not any(k.startswith(("backbone.net.norm", "backbone.net.cls_token", "pixel_")) for k in sd)


def test_anchors_are_not_rounded_and_laid_out_per_position():
    cell = cell_anchors([32], [0.5, 1.0, 2.0])
    w = math.sqrt(32**2 / 0.5)
    torch.testing.assert_close(cell[0], torch.tensor([-w / 2, -0.5 * w / 2, w / 2, 0.5 * w / 2]))
    assert cell[0, 2].item() != round(cell[0, 2].item())  # 22.627..., not 23
    grid = grid_anchors(cell, 4, (2, 3))
    assert grid.shape == (18, 4)
    torch.testing.assert_close(grid[3], cell[0] + torch.tensor([4.0, 0.0, 4.0, 0.0]))  # (row 0, column 1, anchor 0)
    torch.testing.assert_close(grid[9], cell[0] + torch.tensor([0.0, 4.0, 0.0, 4.0]))  # (row 1, column 0, anchor 0)


def test_box_coder_round_trip_level_rule_matcher_and_sampler():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    a = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 6.0, 9.0]])
    b = torch.tensor([[1.0, 2.0, 12.0, 18.0], [4.0, 4.0, 8.0, 8.0]])
    torch.testing.assert_close(coder.decode(coder.encode(a, b), a), b)
    # Level rule: 224 px boxes on p4 (index 2 of p2..p5), 112 px on p3, tiny on p2, huge on p5.
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 2, 2], [0, 0, 2000, 2000]], dtype=torch.float32)
    assert assign_levels(boxes, 2, 5).tolist() == [2, 1, 0, 3]
    iou = torch.tensor([[0.8, 0.5, 0.1, 0.2], [0.1, 0.2, 0.25, 0.3]])
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)
    # 0.8 positive; 0.5 ignored; 0.1 negative... except that it is the best of ground truth 1 (0.3).
    assert matches.tolist() == [0, 0, 1, 1] and labels.tolist() == [1, -1, 0, 1]
    torch.manual_seed(0)
    pos, neg = subsample_labels(torch.tensor([1, 1, 1, 0, 0, 0, 0, -1]), 4, 0.25, 0)
    assert len(pos) == 1 and len(neg) == 3 and set(neg.tolist()) <= {3, 4, 5, 6}


def test_polygon_crop_box_and_mask_targets():
    # A concave U shape cut by a window at x = 6: two pieces, joined along the border.
    u = np.array([[0, 0], [10, 0], [10, 10], [7, 10], [7, 3], [3, 3], [3, 10], [0, 10]], dtype=np.float64)
    clipped = clip_polygon(u, 0, 0, 6, 20)
    assert clipped[:, 0].max() == 6 and clipped[:, 0].min() == 0
    seg = crop_segment([u.reshape(-1)], 2, 1, 4, 20)  # window x 2..6, y 1..21
    assert segment_box(seg) == [0.0, 0.0, 4.0, 9.0]
    assert crop_segment([u.reshape(-1)], 20, 0, 5, 5) == []  # nothing inside
    # The target of a box that is the object's own box is all ones; of its left half, too.
    m = polygons_in_box(square(10, 10, 30, 20), [10, 10, 30, 20], 28)
    assert m.all()
    t = mask_targets(
        [square(10, 10, 30, 20), torch.ones(40, 40, dtype=torch.uint8)],
        torch.tensor([0, 1, 0]),
        torch.tensor([[10.0, 10.0, 30.0, 20.0], [0.0, 0.0, 20.0, 20.0], [20.0, 0.0, 40.0, 20.0]]),
        28,
    )
    assert t.shape == (3, 28, 28) and bool(t[0].all()) and bool(t[1].all())
    assert t[2, :14].sum() == 0 and bool(t[2, 14:, :14].all()) and t[2, :, 14:].sum() == 0


def whole_image_paste(probs: torch.Tensor, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Reference paste: every mask sampled bilinearly at every pixel centre of the image (one
    grid_sample, zeros outside the mask), on at >= 0.5; what pasting in box windows must equal."""
    import torch.nn.functional as F

    n = probs.shape[0]
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    bx0, by0, bx1, by1 = boxes.split(1, dim=1)
    gy = (ys - by0) / (by1 - by0) * 2 - 1
    gx = (xs - bx0) / (bx1 - bx0) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], dim=3)
    return F.grid_sample(probs[:, None], grid, align_corners=False)[:, 0] >= 0.5


def test_paste_is_bilinear_at_pixel_centres_and_equals_whole_image_sampling():
    probs = torch.rand(6, 28, 28)
    boxes = torch.tensor(
        [
            [3.3, 4.7, 20.2, 30.9],
            [0.0, 0.0, 50.0, 40.0],
            [10.5, 2.25, 11.5, 3.0],
            [40.0, 30.0, 64.0, 48.0],
            [7.0, 7.0, 40.0, 9.0],
            [1.2, 0.4, 60.3, 47.9],
        ]
    )
    local = paste_masks(probs, boxes, (48, 64))
    whole = whole_image_paste(probs, boxes, 48, 64)  # every pixel of the image
    assert torch.equal(local, whole)
    # A constant mask covers exactly the pixels whose centres lie in the box, edges included (sample 0.5).
    full = paste_masks(torch.ones(1, 28, 28), torch.tensor([[2.4, 1.6, 7.5, 5.5]]), (10, 10))[0]
    ys, xs = torch.nonzero(full, as_tuple=True)
    assert (xs.min().item(), xs.max().item(), ys.min().item(), ys.max().item()) == (2, 7, 2, 5)


def test_paste_to_rle_equals_pycocotools_encoding_of_the_pasted_masks():
    """The evaluation's RLEs (pasted and encoded from box windows, in size-batched grid_samples)
    are pycocotools' encoding of the full masks, and those are the whole-image samples."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from mae_transfer.detection.masks import paste_masks_rle

    gen = torch.Generator().manual_seed(0)
    checked = 0
    for trial in range(60):
        h, w = (int(v) for v in torch.randint(3, 70, (2,), generator=gen))
        n = int(torch.randint(1, 25, (1,), generator=gen))
        a, b = (
            torch.rand(n, 2, generator=gen) * torch.tensor([w, h]),
            torch.rand(n, 2, generator=gen) * torch.tensor([w, h]),
        )
        boxes = torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)
        boxes[0] = torch.tensor([0.0, 0.0, float(w), float(h)])  # runs that continue from one column into the next
        if n > 1:
            boxes[1] = torch.tensor([1.5, 0.0, min(6.0, w), float(h)])
        if trial % 2:
            probs = torch.rand(n, 28, 28, generator=gen)
        else:  # solid masks: long runs
            probs = (torch.rand(n, 1, 1, generator=gen) + 0.3).expand(n, 28, 28).contiguous()
        whole = whole_image_paste(probs, boxes, h, w)
        assert torch.equal(paste_masks(probs, boxes, (h, w)), whole)
        expected = mask_utils.encode(np.asfortranarray(whole.numpy().transpose(1, 2, 0).astype(np.uint8)))
        got = paste_masks_rle(probs, boxes, (h, w))
        assert [r["size"] for r in got] == [[h, w]] * n
        assert [r["counts"] for r in got] == [e["counts"].decode("ascii") for e in expected]
        checked += n
    assert checked > 500
    assert paste_masks_rle(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 5)) == []


def test_new_layers_start_as_in_detectron2():
    torch.manual_seed(0)
    model = build_mask_rcnn(
        build_pyramid(build_vit("vit_nano_patch8", 64, window_size=4), channels=64),
        num_classes=80,
        img_size=64,
        head_channels=64,
        fc_dim=256,
    )
    rh, rpn = model.roi_heads, model.proposal_generator.rpn_head
    std = lambda p: p.detach().std().item()  # noqa: E731
    assert (
        0.009 < std(rh.box_predictor.cls_score.weight) < 0.011
        and 0.0009 < std(rh.box_predictor.bbox_pred.weight) < 0.0011
    )
    assert 0.0009 < std(rh.mask_head.predictor.weight) < 0.0011 and 0.009 < std(rpn.objectness_logits.weight) < 0.011
    # MSRA fill (fan out, ReLU) for the head convolutions: std sqrt(2 / (64 * 9)).
    assert abs(std(rh.box_head.conv1.weight) / (2 / (64 * 9)) ** 0.5 - 1) < 0.05
    assert all(
        p.abs().sum() == 0 for n, p in model.named_parameters() if "rel_pos" in n or n.endswith("predictor.bias")
    )
