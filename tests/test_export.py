"""`mae-transfer export --to timm / hf`: folders that timm and transformers open as they are, giving
the same features as our ViT, and bit-identical round trips back into our ViT."""

from __future__ import annotations

import json

import pytest
import torch

from mae_transfer.checkpoint import CheckpointError, export_mae_encoder, load_backbone, read_checkpoint
from mae_transfer.checkpoint.timm import encoder_state_dict, timm_model_args
from mae_transfer.cli import main
from mae_transfer.models.vit import create_vit


def _vit(pool="token", img=64):
    torch.manual_seed(0)
    vit = create_vit("vit_micro_patch8", img_size=img, num_classes=0, global_pool=pool).eval()
    with torch.no_grad():  # non-trivial norms, so a mix-up of norm parameters shows
        for name, p in vit.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return vit


def _batch(img=64):
    return torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_timm_opens_the_export_and_computes_the_same_features(tmp_path, pool):
    timm = pytest.importorskip("timm")
    vit = _vit(pool)
    src = export_mae_encoder(vit, tmp_path / "enc.pth") if pool == "token" else tmp_path / "vit.pth"
    if pool == "avg":
        torch.save({"model": vit.state_dict()}, src)
    out = tmp_path / "timm"
    assert main(["export", str(src), "--to", "timm", "--output", str(out)]) == 0
    args = json.loads((out / "config.json").read_text())["model_args"]
    x = _batch()
    with torch.no_grad():
        ours = vit.forward_features(x)
        a = timm.create_model(
            "vit_base_patch16_224",
            pretrained=True,
            num_classes=0,
            pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
            **args,
        ).eval()
        b = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        for model in (a, b):
            assert (model.forward_features(x) - ours).abs().max() <= 1e-5
            assert (model(x) - vit.forward_head(ours, pre_logits=True)).abs().max() <= 1e-5  # pooled feature
    # Back into our ViT: bit-identical.
    again = _vit(pool)
    torch.nn.init.zeros_(again.pos_embed)
    load_backbone(again, out, expected_missing=())
    assert all(torch.equal(again.state_dict()[k], v) for k, v in vit.state_dict().items())


def test_timm_export_of_vit_b_has_timms_own_shapes():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = create_vit("vit_base_patch16", num_classes=0, global_pool="token")
        theirs = timm.create_model("vit_base_patch16_224", num_classes=0)
    enc = encoder_state_dict(ours.state_dict(), "vit-b")
    arch, args = timm_model_args(enc)
    assert arch == "vit_base_patch16_224" and args["num_heads"] == 12 and args["img_size"] == 224
    assert {k: tuple(v.shape) for k, v in enc.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_hf_opens_the_export_and_computes_the_same_features(tmp_path):
    transformers = pytest.importorskip("transformers")
    vit = _vit("token")
    enc = export_mae_encoder(vit, tmp_path / "enc.pth")
    out = tmp_path / "hf"
    assert main(["export", str(enc), "--to", "hf", "--output", str(out)]) == 0
    model = transformers.ViTMAEModel.from_pretrained(str(out)).eval()
    x = _batch()
    n = (64 // 8) ** 2
    with torch.no_grad():
        theirs = model(pixel_values=x, noise=torch.arange(n, dtype=torch.float32).expand(2, n)).last_hidden_state
        ours = vit.forward_features(x)
    assert theirs.shape == ours.shape and (theirs - ours).abs().max() <= 1e-5
    # Back into our ViT through the Hugging Face reader: bit-identical.
    sd = read_checkpoint(out)
    again = _vit("token")
    torch.nn.init.zeros_(again.cls_token)
    load_backbone(again, sd, expected_missing=())
    assert all(torch.equal(again.state_dict()[k], v) for k, v in vit.state_dict().items())


def test_exports_refuse_what_the_formats_cannot_hold(tmp_path, capsys):
    seg = create_vit(
        "vit_micro_patch8", img_size=64, num_classes=0, use_rel_pos=True, rel_pos_type="table", layer_scale=1.0
    )
    with pytest.raises(CheckpointError, match="plain timm/Hugging Face ViT"):
        encoder_state_dict(seg.state_dict(), tmp_path / "x")
    torch.save({"model": _vit("avg").state_dict()}, tmp_path / "avg.pth")
    assert main(["export", str(tmp_path / "avg.pth"), "--to", "hf", "--output", str(tmp_path / "hf")]) == 2
    assert "final norm" in capsys.readouterr().err and not (tmp_path / "hf").exists()
