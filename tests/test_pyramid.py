"""Pyramid adapters: strides and channels at 1024 px, and numerics on small inputs."""

from __future__ import annotations

import pytest
import torch

from mae_transfer.models.pyramid import (
    VITDET_GLOBAL_BLOCKS,
    FourTapPyramid,
    SimpleFeaturePyramid,
    equal_interval_blocks,
)
from mae_transfer.models.vit import VisionTransformer, create_vit


def vitdet_b(**kw):
    return create_vit(
        "vit_base_patch16",
        img_size=1024,
        num_classes=0,
        global_pool="",
        class_token=False,
        window_size=14,
        global_blocks=VITDET_GLOBAL_BLOCKS["vit_base_patch16"],
        use_rel_pos=True,
        **kw,
    )


def test_simple_feature_pyramid_strides_and_channels_at_1024px():
    with torch.device("meta"):
        sfp = SimpleFeaturePyramid(vitdet_b())
        out = sfp(torch.empty(1, 3, 1024, 1024))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    assert [tuple(v.shape) for v in out.values()] == [
        (1, 256, 256, 256),
        (1, 256, 128, 128),
        (1, 256, 64, 64),
        (1, 256, 32, 32),
        (1, 256, 16, 16),
    ]
    assert sfp.strides == [4, 8, 16, 32, 64] and sfp.out_channels == 256
    # ViTDet's deconvolutions halve the channels: 768 -> 384 -> 192 at stride 4.
    assert sfp.simfp_2[3].out_channels == 192 and sfp.simfp_3[0].out_channels == 384


def test_four_tap_pyramid_strides_and_channels_at_1024px():
    with torch.device("meta"):
        vit = create_vit(
            "vit_base_patch16",
            img_size=1024,
            num_classes=0,
            global_pool="",
            class_token=False,
            window_size=14,
            global_blocks=(2, 5, 8, 11),
            use_rel_pos=True,
        )
        plain = FourTapPyramid(vit, norm="gn")
        fpn = FourTapPyramid(vit, norm="gn", fpn_channels=256)
        x = torch.empty(2, 3, 1024, 1024)
        a, b = plain(x), fpn(x)
    assert plain.tap_blocks == [2, 5, 8, 11]
    assert [tuple(v.shape) for v in a.values()] == [
        (2, 768, 256, 256),
        (2, 768, 128, 128),
        (2, 768, 64, 64),
        (2, 768, 32, 32),
    ]
    assert list(b) == ["p2", "p3", "p4", "p5", "p6"] and fpn.out_channels == 256
    assert [tuple(v.shape)[1:] for v in b.values()] == [
        (256, 256, 256),
        (256, 128, 128),
        (256, 64, 64),
        (256, 32, 32),
        (256, 16, 16),
    ]


def test_equal_interval_taps_of_the_recipes():
    assert equal_interval_blocks(12) == [2, 5, 8, 11]  # ViT-B: blocks 3, 6, 9, 12
    assert equal_interval_blocks(24) == [5, 11, 17, 23]  # ViT-L
    assert equal_interval_blocks(32) == [7, 15, 23, 31] == list(VITDET_GLOBAL_BLOCKS["vit_huge_patch14"])
    with pytest.raises(ValueError):
        equal_interval_blocks(10)


def test_pyramid_levels_are_the_tapped_blocks():
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0, global_pool="", class_token=False
    )
    pyr = FourTapPyramid(vit, tap_blocks=[0, 1, 2, 3], norm="bn").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = pyr(x)
        taps = vit.forward_intermediates(x, indices=[0, 1, 2, 3])
    torch.testing.assert_close(out["p3"], taps[2])  # stride 8 with patch 8: the identity level
    torch.testing.assert_close(out["p4"], torch.nn.functional.max_pool2d(taps[3], 2))
    assert out["p1"].shape[-1] == 32 and out["p2"].shape[-1] == 16
    sfp = SimpleFeaturePyramid(vit, out_channels=16)
    with torch.no_grad():
        o = sfp(x)
    assert [v.shape[-1] for v in o.values()] == [32, 16, 8, 4, 2]
    # Gradients reach the backbone through every level.
    sum(v.sum() for v in sfp(x).values()).backward()
    assert vit.blocks[-1].attn.qkv.weight.grad is not None


def test_official_mae_weights_load_into_a_windowed_detection_backbone(shared):
    from mae_transfer.checkpoint import load_backbone

    ref = torch.load(shared / "reference" / "mae_official" / "mae_reference.pt", weights_only=False)["norm_pix_True"]
    vit = VisionTransformer(
        img_size=128,
        patch_size=8,
        embed_dim=96,
        depth=3,
        num_heads=4,
        num_classes=0,
        global_pool="",
        class_token=False,
        window_size=8,
        global_blocks=(2,),
        use_rel_pos=True,
    )
    sfp = SimpleFeaturePyramid(vit, out_channels=32)
    report = load_backbone(sfp.vit, {"model": ref["state_dict"]}, expected_missing="dense", expected_unexpected="dense")
    # Only the new relative-position tables are missing; the class token and the decoder of the
    # pretraining checkpoint are left out; the 8x8 position grid is resized to 16x16.
    assert sorted({k.rsplit(".", 1)[-1] for k in report.missing}) == ["rel_pos_h", "rel_pos_w"]
    assert {"cls_token", "mask_token", "decoder_pred.weight"} <= set(report.unexpected)
    torch.testing.assert_close(sfp.vit.blocks[1].attn.qkv.weight, ref["state_dict"]["blocks.1.attn.qkv.weight"])
    assert sfp.vit.pos_embed.shape == (1, 16 * 16, 96)
    with torch.no_grad():
        out = sfp(torch.randn(1, 3, 128, 128))
    assert [v.shape[-1] for v in out.values()] == [64, 32, 16, 8, 4]
