"""The ViT's options behave as the transfer recipes need."""

from __future__ import annotations

import pytest
import torch

from mae_transfer.models.pos_embed import resize_pos_embed, sincos_2d
from mae_transfer.models.vit import VIT_SIZES, VisionTransformer, create_vit


def small_vit(**kw):
    base = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=4, num_classes=5)
    base.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**base)


def test_sincos_table_equals_the_official_one(shared):
    ref = torch.load(shared / "reference" / "mae_official" / "mae_reference.pt", weights_only=False)
    sd = ref["norm_pix_False"]["state_dict"]
    torch.testing.assert_close(sincos_2d(96, 8, 1).unsqueeze(0), sd["pos_embed"], atol=1e-6, rtol=0)
    torch.testing.assert_close(sincos_2d(64, 8, 1).unsqueeze(0), sd["decoder_pos_embed"], atol=1e-6, rtol=0)


def test_window_attention_covering_the_image_equals_global_attention():
    plain = small_vit(class_token=False, global_pool="", num_classes=0)
    windowed = small_vit(class_token=False, global_pool="", num_classes=0, window_size=8, global_blocks=(1, 3))
    windowed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(windowed.forward_features(x), plain.forward_features(x), atol=1e-5, rtol=0)


def test_smaller_windows_change_the_output_and_padding_works():
    plain = small_vit(class_token=False, global_pool="", num_classes=0)
    windowed = small_vit(class_token=False, global_pool="", num_classes=0, window_size=3, global_blocks=(3,))
    windowed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)  # 8x8 tokens, windows of 3 need padding to 9x9
    with torch.no_grad():
        a, b = windowed.forward_features(x), plain.forward_features(x)
    assert a.shape == b.shape
    assert (a - b).abs().max() > 1e-3


def test_zero_initialised_relative_position_bias_changes_nothing_until_trained():
    plain = small_vit()
    rel = small_vit(use_rel_pos=True)
    missing, unexpected = rel.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(set(k.split(".")[-1] for k in missing)) == ["rel_pos_h", "rel_pos_w"]
    assert not unexpected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rel.forward_features(x), plain.forward_features(x), atol=1e-5, rtol=0)
        for blk in rel.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.5)
        assert (rel.forward_features(x) - plain.forward_features(x)).abs().max() > 1e-3
    # The bias receives gradients (it is trainable for transfer).
    rel(x).sum().backward()
    assert rel.blocks[0].attn.rel_pos_w.grad is not None


def test_relative_position_tables_resize_to_other_inputs():
    rel = small_vit(
        use_rel_pos=True, class_token=False, global_pool="", num_classes=0, window_size=4, global_blocks=(3,)
    )
    with torch.no_grad():
        out = rel.forward_features(torch.randn(1, 3, 96, 80))
    assert out.shape == (1, 12 * 10, 48)


def test_forward_intermediates_shapes_and_consistency():
    vit = small_vit(global_pool="token")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = vit.forward_intermediates(x, indices=[0, 3, -2])
        tokens, prefix = vit.forward_intermediates(
            x, indices=[3], output_fmt="NLC", norm=True, return_prefix_tokens=True
        )
        full = vit.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 48, 8, 8)] * 3
    torch.testing.assert_close(tokens[0], full[:, 1:])
    torch.testing.assert_close(prefix[0], full[:, :1])
    with pytest.raises(ValueError, match="outside"):
        vit.forward_intermediates(x, indices=[7])


def test_position_embeddings_interpolate_for_other_sizes():
    vit = small_vit()
    with torch.no_grad():
        logits = vit(torch.randn(2, 3, 96, 128))
    assert logits.shape == (2, 5)
    table = resize_pos_embed(vit.pos_embed, (12, 16), 1)
    assert table.shape == (1, 1 + 12 * 16, 48)
    # Resizing to the same grid is the identity; the class row is kept.
    torch.testing.assert_close(resize_pos_embed(vit.pos_embed, (8, 8), 1), vit.pos_embed)
    torch.testing.assert_close(table[:, :1], vit.pos_embed[:, :1])


def test_activation_checkpointing_gives_the_same_gradients():
    a = small_vit()
    b = small_vit(grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_drop_path_is_stochastic_in_training_only():
    vit = small_vit(drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    vit.train()
    assert not torch.allclose(vit(x), vit(x))
    vit.eval()
    torch.testing.assert_close(vit(x), vit(x))


@pytest.mark.parametrize("name", sorted(VIT_SIZES))
def test_sizes_have_the_published_parameter_counts(name):
    with torch.device("meta"):
        vit = create_vit(name, num_classes=1000)
    params = sum(p.numel() for p in vit.parameters()) / 1e6
    # ViT paper Table 1 / DeiT: tiny 5.7M, small 22M, base 86M, large 304M, huge 632M.
    expected = {
        "vit_tiny_patch16": 5.7,
        "vit_small_patch16": 22.1,
        "vit_base_patch16": 86.6,
        "vit_large_patch16": 304.3,
        "vit_huge_patch14": 632.0,
        "vit_huge_patch16": 632.2,
    }
    if name in expected:
        assert abs(params - expected[name]) / expected[name] < 0.01, params


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="divisible by the patch size"):
        small_vit()(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="unknown ViT"):
        create_vit("vit_gigantic")
    with pytest.raises(ValueError, match=r"prefix \(class\) tokens"):
        small_vit(window_size=4).forward_features(torch.randn(1, 3, 64, 64))
