"""The CPU fast paths compute what the plain formulations compute: the attention's qkv split (bit
for bit), the RoI heads' channels-last layout and fc1 on a channels-last map (within float
rounding), and the pooler without a zero fill (bit for bit)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from mae_transfer.detection.boxes import assign_levels
from mae_transfer.detection.roi_heads import BoxHead, MaskHead, ROIPooler
from mae_transfer.models.vit import Attention


def _grads(loss: torch.Tensor, tensors) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(tensors)))


def test_attention_split_gives_the_permuted_splits_values_and_gradients_bit_for_bit():
    torch.manual_seed(0)
    attn = Attention(48, 4)
    x = torch.randn(2, 10, 48, requires_grad=True)

    def permuted(x):  # (3, B, heads, T, C) permuted view, split on its first axis
        b, t, d = x.shape
        q, k, v = attn.qkv(x).reshape(b, t, 3, 4, 12).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))

    out, ref = attn(x), permuted(x)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    params = [x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight]
    for a, b in zip(_grads((out * g).sum(), params), _grads((ref * g).sum(), params)):
        assert torch.equal(a, b)


def test_box_head_on_a_channels_last_map_equals_flatten_then_fc_values_and_gradients():
    torch.manual_seed(0)
    head = BoxHead(16, 7, conv_dims=[16, 16], fc_dims=[32, 24], norm="ln")
    x = torch.randn(5, 16, 7, 7)

    def reference(x):  # NCHW throughout, (C, S, S) flattening
        for k in range(head.num_convs):
            conv = getattr(head, f"conv{k + 1}")
            y = F.conv2d(x.contiguous(), conv.weight, conv.bias, padding=1)
            y = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), conv.norm.weight, conv.norm.bias, conv.norm.eps)
            x = F.relu(y.permute(0, 3, 1, 2).contiguous())
        x = x.flatten(1)
        return F.relu(head.fc2(F.relu(head.fc1(x))))

    out, ref = head(x), reference(x)
    assert out.shape == ref.shape == (5, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [head.fc1.weight, head.fc1.bias, head.conv1.weight, head.conv2.norm.weight]
    for a, b in zip(_grads((out * g).sum(), params), _grads((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Without convolutions the map is flattened as it comes (NCHW order), as before.
    fc_only = BoxHead(16, 7, conv_dims=[], fc_dims=[8])
    torch.testing.assert_close(fc_only(x), F.relu(fc_only.fc1(x.flatten(1))))


def test_mask_head_in_channels_last_equals_nchw():
    torch.manual_seed(0)
    head = MaskHead(16, [16, 16, 8], num_classes=3, norm="ln")
    x = torch.randn(4, 16, 14, 14)
    out = head(x)
    ref = x
    for k in range(head.num_convs):
        conv = getattr(head, f"mask_fcn{k + 1}")
        y = F.conv2d(ref, conv.weight, conv.bias, padding=1)
        y = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), conv.norm.weight, conv.norm.bias, conv.norm.eps)
        ref = F.relu(y.permute(0, 3, 1, 2).contiguous())
    ref = head.predictor(F.relu(head.deconv(ref)))
    assert out.shape == ref.shape == (4, 3, 28, 28)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pooler_fills_every_row_from_the_level_of_its_box():
    torch.manual_seed(0)
    strides = [4, 8, 16, 32]
    feats = [torch.randn(2, 8, 128 // s, 128 // s) for s in strides]
    xy = torch.rand(60, 2) * 100
    wh = torch.rand(60, 2) * torch.tensor([[2.0], [30.0], [120.0]]).repeat(20, 1) + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    pooler = ROIPooler(7, strides, sampling_ratio=0, canonical_box_size=32.0)
    for _ in range(2):  # a recycled allocation must not leak into the result
        out = pooler(feats, [boxes[:25], boxes[25:]])
    levels = assign_levels(boxes, 2, 5, canonical_size=32.0)
    assert len(set(levels.tolist())) >= 3
    batch = torch.tensor([0.0] * 25 + [1.0] * 35)[:, None]
    for i in range(len(boxes)):
        lvl = int(levels[i])
        roi = torch.cat([batch[i], boxes[i]])[None]
        want = roi_align(feats[lvl], roi, (7, 7), 1.0 / strides[lvl], 0, aligned=True)[0]
        assert torch.equal(out[i], want), i
