"""A second backbone family through the seam: ``model.family=convnet`` (a ConvNeXt-style hierarchical
network, mae_transfer.models.convnet) built by the real task entry points, trained a little, and the
pyramids / UperNet reading its stages from ``feature_info``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mae_transfer.classification.config import build_config as classification_config
from mae_transfer.classification.task import build_classifier, eval_transform, freeze_for_protocol
from mae_transfer.detection.config import build_config as detection_config
from mae_transfer.detection.task import build_detector
from mae_transfer.engine.optim import param_groups
from mae_transfer.models.backbone import BACKBONES, BackboneConfig, create_backbone
from mae_transfer.models.convnet import ConvNet
from mae_transfer.models.pyramid import FourTapPyramid, SimpleFeaturePyramid, is_hierarchical
from mae_transfer.segmentation.config import build_config as segmentation_config
from mae_transfer.segmentation.task import build_segmenter

CONVNET = {"family": "convnet", "name": "convnet_nano"}


def test_the_convnet_backbone_contract():
    net = create_backbone(BackboneConfig(**CONVNET, drop_path=0.1), img_size=64, num_classes=5)
    assert isinstance(net, ConvNet) and is_hierarchical(net) and net.embed_dim == 128
    info = net.feature_info
    assert [f["reduction"] for f in info] == [4, 8, 16, 32] and [f["num_chs"] for f in info] == [16, 32, 64, 128]
    x = torch.randn(2, 3, 64, 64)
    maps = net.forward_intermediates(x, indices=[0, 1, 2, 3], output_fmt="NCHW")
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    # Negative indices and NLC as for the ViT; the last stage's map is what forward_features gives.
    net.eval()
    with torch.no_grad():
        (last,) = net.forward_intermediates(x, indices=[-1], output_fmt="NLC")
        torch.testing.assert_close(last, net.forward_features(x).flatten(2).transpose(1, 2))
        assert net(x).shape == (2, 5)
    # Layer ids: stem 0, blocks 1..5 in order, each downsampling layer with its stage's first block, head last.
    assert net.num_layer_ids == 7
    assert net.layer_id("stem.0.weight") == 0 and net.layer_id("blocks.4.pwconv1.weight") == 5
    assert net.layer_id("downsamples.2.1.weight") == net.layer_id("blocks.4.dwconv.weight")
    assert net.layer_id("head.weight") == net.layer_id("fc_norm.weight") == 6
    # The ViT's dense-task options mean nothing here and are ignored; its explicit sizes are refused.
    dense = create_backbone(
        BackboneConfig(**CONVNET), img_size=64, class_token=False, window_size=4, use_rel_pos=True, global_pool=""
    )
    assert isinstance(dense.head, torch.nn.Identity) and isinstance(dense.fc_norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="sized by name"):
        create_backbone(BackboneConfig(**CONVNET, embed_dim=64), img_size=64)
    with pytest.raises(ValueError, match="no class token"):
        create_backbone(BackboneConfig(**CONVNET), img_size=64, global_pool="token")
    net.set_grad_checkpointing(True)
    net.train()
    net(x).sum().backward()
    assert net.blocks[0].dwconv.weight.grad is not None


def test_an_unknown_family_or_size_is_one_clear_error():
    assert {"vit", "convnet"} <= set(BACKBONES)
    with pytest.raises(ValueError, match="unknown backbone family 'resnet'; known: convnet, vit"):
        build_detector(detection_config("toy", {"model": {"family": "resnet", "img_size": 64}}), 3)
    with pytest.raises(ValueError, match="unknown convnet 'convnet_huge'"):
        build_segmenter(segmentation_config("toy", {"model": {"family": "convnet", "name": "convnet_huge"}}))


def _toy_images(cfg, per_class: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    from mae_transfer.data.toy import ensure_toy_dataset, write_imagefolder

    root = ensure_toy_dataset("imagefolder", write_imagefolder, train_per_class=per_class, val_per_class=1)
    tf = eval_transform(cfg)
    folders = sorted(p for p in (root / "train").iterdir() if p.is_dir())[:classes]
    images, labels = [], []
    for c, folder in enumerate(folders):
        for path in sorted(folder.iterdir())[:per_class]:
            images.append(tf(Image.open(path).convert("RGB")))
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def test_classification_finetunes_a_convnet_with_layer_decay(cache):
    cfg = classification_config("toy_finetune", {"model": CONVNET})
    torch.manual_seed(0)
    model = build_classifier(cfg, num_classes=4)
    assert isinstance(model, ConvNet) and model.head.out_features == 4
    assert len(freeze_for_protocol(model, cfg)) == len(list(model.parameters()))
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75, no_weight_decay=model.no_weight_decay())
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    top = model.num_layer_ids - 1
    assert scale["head.weight"] == 1.0 and scale["stem.0.weight"] == pytest.approx(0.75**top)
    assert scale["blocks.0.pwconv1.weight"] == pytest.approx(0.75 ** (top - 1))
    assert {g["layer_id"] for g in groups} == set(range(model.num_layer_ids))

    images, labels = _toy_images(cfg, per_class=2, classes=4)
    opt = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "param_names"}} for g in groups], lr=2e-3)
    for g in opt.param_groups:
        g["lr"] = 2e-3 * g["lr_scale"]
    model.train()
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_linear_probe_and_partial_finetuning_of_a_convnet():
    # The flat ``blocks`` list and the ViT's head names make the other two protocols work unchanged;
    # the official linear probe's class-token pooling does not exist here: one clear error.
    with pytest.raises(ValueError, match="convnet family .* no class token"):
        build_classifier(classification_config("toy_linprobe", {"model": CONVNET}), num_classes=3)
    probe = classification_config("toy_linprobe", {"model": {**CONVNET, "global_pool": "avg"}})
    model = build_classifier(probe, num_classes=3)
    trainable = freeze_for_protocol(model, probe)
    assert trainable and all(n.startswith(("head.", "fc_norm.")) for n in trainable)
    partial = classification_config(
        "toy_finetune", {"protocol": "partial", "model": {**CONVNET, "trainable_blocks": 1}}
    )
    trainable = freeze_for_protocol(build_classifier(partial, num_classes=3), partial)
    assert {n.split(".")[0] for n in trainable} == {"blocks", "fc_norm", "head"}
    assert {n.split(".")[1] for n in trainable if n.startswith("blocks.")} == {"4"}


def _det_targets(n: int):
    import numpy as np

    def square(x0, y0, x1, y1):
        return [np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]

    return [
        {
            "boxes": torch.tensor([[10.0, 8.0, 40.0, 30.0], [5.0, 35.0, 25.0, 60.0]]),
            "labels": torch.tensor([0, 1 + i]),
            "segments": [square(10, 8, 40, 30), square(5, 35, 25, 60)],
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("pyramid,kind", [("simple", SimpleFeaturePyramid), ("fpn4", FourTapPyramid)])
def test_detection_on_a_convnet(pyramid, kind):
    cfg = detection_config("toy", {"model": {**CONVNET, "pyramid": pyramid, "img_size": 64}})
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=3)
    assert isinstance(model.backbone, kind) and isinstance(model.vit, ConvNet)
    assert model.backbone.strides == [4, 8, 16, 32, 64] and model.backbone.names == ["p2", "p3", "p4", "p5", "p6"]
    if pyramid == "simple":  # the stride-16 stage rescaled (64 channels, halved by each deconvolution)
        assert model.backbone.simfp_2[3].out_channels == 16 and model.backbone.simfp_4[0].in_channels == 64
        assert len(model.vit.feature_info) == 3  # the stride-32 stage is unused: dropped
    else:  # the four stages into the FPN with their own widths
        assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == [16, 32, 64, 128]
    images = [
        torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8),
        torch.randint(0, 256, (3, 40, 64), dtype=torch.uint8),
    ]
    model.train()
    losses = model(images, _det_targets(2))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    # Every backbone parameter gets a gradient (what DDP needs), the stem included.
    missing = [n for n, p in model.vit.named_parameters() if p.grad is None]
    assert not missing and model.vit.stem[0].weight.grad.abs().sum() > 0
    groups = param_groups(model, 0.1, 0.7)
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.7 ** (model.vit.num_layer_ids - 1))
    model.eval()
    preds = model(images)
    assert len(preds) == 2 and {"boxes", "labels", "scores", "masks", "mask_probs"} <= set(preds[0])
    assert preds[0]["masks"].shape[1:] == (64, 48) and preds[1]["masks"].shape[1:] == (40, 64)


@pytest.mark.parametrize("pyramid", ["taps", "simple"])
def test_segmentation_on_a_convnet(pyramid):
    cfg = segmentation_config("toy", {"model": {**CONVNET, "pyramid": pyramid}, "data": {"num_classes": 5}})
    torch.manual_seed(0)
    model = build_segmenter(cfg)
    assert isinstance(model.backbone, ConvNet) and model.size_divisor == 32
    if pyramid == "taps":  # the four stages as they are, their widths into UperNet
        assert model.tap_blocks == (0, 1, 2, 3) and isinstance(model.neck, torch.nn.Identity)
        assert [c.conv.in_channels for c in model.decode_head.lateral_convs] == [16, 32, 64]
    else:
        assert model.tap_blocks == (2,) and len(model.backbone.feature_info) == 3
    model.train()
    x = torch.randn(2, 3, 64, 48)  # 48 is not a multiple of 32: padded and cut
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 5, 64, 48)
    (logits.mean() + 0.4 * aux.mean()).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5, 64, 48)


# ---------------------------------------------------------------------------- checkpoints of the family


def _official_layout(timm_sd: dict) -> dict:
    """timm's ConvNeXt names -> the official repository's (``downsample_layers``, ``stages.S.B``,
    ``dwconv`` / ``pwconv``, ``norm`` and ``head`` after pooling); checked against timm's own
    official -> timm conversion below."""
    import re

    out = {}
    for k, v in timm_sd.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_convnext_checkpoints_of_timm_and_the_official_repository_load_to_the_same_function(tmp_path, layout, cache):
    """The family reads its own checkpoints (its model's ``checkpoint_filter_fn``, beside the builder):
    a ConvNeXt saved by timm or in the official repository's names loads into ``convnet_nano`` with
    every tensor placed, and the network computes what timm's computes, stage by stage."""
    from timm.models.convnext import ConvNeXt as TimmConvNeXt
    from timm.models.convnext import checkpoint_filter_fn

    from mae_transfer.checkpoint import load_backbone

    torch.manual_seed(0)
    ref = TimmConvNeXt(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=7, ls_init_value=0.5).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped or missing norm shows
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    sd = ref.state_dict()
    if layout == "official":
        sd = _official_layout(sd)
        back = checkpoint_filter_fn({"model": sd}, ref)  # timm's reading of the official names
        assert back.keys() == ref.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    path = tmp_path / "convnext.pth"
    torch.save({"model": sd}, path)

    ours = create_backbone(BackboneConfig(**CONVNET, drop_path=0.0), img_size=64, num_classes=7).eval()
    report = load_backbone(ours, path)
    assert report.format == {"timm": "timm-convnext", "official": "convnext-official"}[layout]
    assert not report.missing and not report.unexpected and not report.mismatched
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        theirs = ref.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        for a, b in zip(ours.forward_intermediates(x, indices=[0, 1, 2, 3]), theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # A checkpoint of another size is refused with both sizes named.
    small = create_backbone(BackboneConfig(family="convnet", name="convnet_tiny"), img_size=64).eval()
    with pytest.raises(Exception, match=r"convnet_nano: convnet dims \(16, 32, 64, 128\).*convnet_tiny"):
        load_backbone(small, path)

    if layout == "official":  # the command reads it too: fine-tuning starts from it, a new head for 10 classes
        from mae_transfer.cli import main

        out = tmp_path / "run"
        argv = ["finetune", "--backbone", str(path), "--output", str(out), "model.family=convnet"]
        assert main([*argv, "model.name=convnet_nano", "train.epochs=1", "train.num_workers=0"]) == 0
        log = (out / "log.txt").read_text()
        assert f"loaded {path} (format convnext-official)" in log and "missing: head.weight, head.bias" in log
