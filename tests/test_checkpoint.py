"""Checkpoint formats: detection, name conversion, shape adaptation, loading reports and errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_root

from mae_transfer.checkpoint import (
    EXPECTED_MISSING,
    EXPECTED_UNEXPECTED,
    CheckpointError,
    LoadReport,
    atomic_save,
    detect_format,
    export_mae_encoder,
    infer_vit_config,
    load_backbone,
    to_vit_state_dict,
)
from mae_transfer.models.pos_embed import resize_pos_embed
from mae_transfer.models.vit import VisionTransformer, create_vit
from mae_transfer.pretrain.model import MaskedAutoencoderViT, create_mae

SHARED = shared_root()
OFFICIAL = SHARED / "reference" / "mae_official"

SIZES = [
    ("vit_base_patch16", "mae_vit_base_patch16"),
    ("vit_large_patch16", "mae_vit_large_patch16"),
    ("vit_huge_patch14", "mae_vit_huge_patch14"),
]


def _encoder_only(sd):
    return {k: v for k, v in sd.items() if not (k.startswith("decoder_") or k == "mask_token")}


def _small_vit(**kw) -> VisionTransformer:
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, global_pool="token")
    cfg.update(kw)
    return VisionTransformer(**cfg)


# ---------------------------------------------------------------------------- official full checkpoints
@pytest.fixture(scope="module")
def official_keys():
    path = OFFICIAL / "mae_full_checkpoint_keys.json"
    if not path.is_file():
        pytest.skip(f"official key list not found at {path} (set MAE_TRANSFER_SHARED)")
    return json.loads(path.read_text())


@pytest.mark.parametrize("vit_name,mae_name", SIZES)
def test_official_full_checkpoint_names_and_shapes(official_keys, vit_name, mae_name):
    ref = {k: tuple(s) for k, s in official_keys[vit_name].items()}
    with torch.device("meta"):  # shapes only: ViT-H would take seconds and GBs on the CPU
        mae = create_mae(mae_name)
        vit = create_vit(vit_name, num_classes=1000)
    ours = {k: tuple(v.shape) for k, v in mae.state_dict().items()}
    assert ours == ref

    full = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    assert detect_format(full) == "mae_full"
    assert detect_format({"model": full}) == "mae_full"
    encoder = _encoder_only(full)
    assert detect_format({"model": encoder}) == "mae_encoder"

    report = load_backbone(vit, {"model": encoder}, expected_missing="finetune", expected_unexpected="finetune")
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report.unexpected) == ["norm.bias", "norm.weight"]
    assert report.format == "mae_encoder"
    assert len(report.loaded) == len(encoder) - 2

    cfg = infer_vit_config(full)
    size = {"vit_base_patch16": (768, 12, 16), "vit_large_patch16": (1024, 24, 16), "vit_huge_patch14": (1280, 32, 14)}[
        vit_name
    ]
    assert (cfg["embed_dim"], cfg["depth"], cfg["patch_size"]) == size
    assert cfg["is_full_mae"] and cfg["decoder_embed_dim"] == 512 and cfg["decoder_depth"] == 8
    assert cfg["grid_size"] == (224 // size[2],) * 2 and cfg["img_size"] == 224
    assert cfg["has_cls_token"] and cfg["pos_embed_has_cls_row"] and cfg["num_heads"] is None
    assert cfg["name"] == vit_name
    assert not infer_vit_config(encoder)["is_full_mae"]


def test_full_checkpoint_into_mae_needs_nothing_and_encoder_into_mae_needs_the_pretrain_preset():
    torch.manual_seed(0)
    src = create_mae("mae_vit_nano_patch8")
    dst = create_mae("mae_vit_nano_patch8")
    report = load_backbone(dst, {"model": src.state_dict()})
    assert report.missing == [] and report.unexpected == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="mask_token|decoder_"):
        load_backbone(create_mae("mae_vit_nano_patch8"), src.encoder_state_dict())
    report = load_backbone(create_mae("mae_vit_nano_patch8"), src.encoder_state_dict(), expected_missing="pretrain")
    assert "mask_token" in report.missing and all(k == "mask_token" or k.startswith("decoder_") for k in report.missing)


# ---------------------------------------------------------------------------- export round trip
def test_export_round_trip_equals_mae_encoder(tmp_path):
    torch.manual_seed(0)
    mae = create_mae("mae_vit_micro_patch8").eval()
    path = export_mae_encoder(mae, tmp_path / "enc" / "encoder.pth")
    assert path == tmp_path / "enc" / "encoder.pth"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert set(saved) == {"model"}
    assert not any(k.startswith("decoder_") or k == "mask_token" for k in saved["model"])
    assert set(saved["model"]) == set(mae.encoder_state_dict())
    assert detect_format(saved) == "mae_encoder"

    vit = create_vit("vit_micro_patch8", img_size=64, num_classes=0, global_pool="token").eval()
    report = load_backbone(vit, path)
    assert report.missing == [] and report.unexpected == [] and report.source == str(path)

    x = torch.randn(2, 3, 64, 64)
    length = mae.grid_size[0] * mae.grid_size[1]
    noise = torch.arange(length).expand(2, length).float()  # identity order: nothing shuffled
    with torch.no_grad():
        latent, mask, _ = mae.forward_encoder(x, 0.0, noise=noise)
        feats = vit.forward_features(x)
    assert mask.sum() == 0
    torch.testing.assert_close(feats, latent, atol=1e-6, rtol=0)


def test_export_is_loadable_by_the_official_finetune_logic(tmp_path):
    # main_finetune.py: checkpoint["model"], drop a head of another shape, interpolate pos_embed,
    # load with strict=False and assert the missing keys are exactly the new head (+ fc_norm).
    torch.manual_seed(0)
    mae = create_mae("mae_vit_nano_patch8")
    path = export_mae_encoder(mae, tmp_path / "encoder.pth")
    checkpoint_model = torch.load(path, map_location="cpu", weights_only=True)["model"]
    model = create_vit("vit_nano_patch8", img_size=32, num_classes=5, global_pool="avg")
    for k in ("head.weight", "head.bias"):
        if k in checkpoint_model and checkpoint_model[k].shape != model.state_dict()[k].shape:
            del checkpoint_model[k]
    msg = model.load_state_dict(checkpoint_model, strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert set(msg.unexpected_keys) == {"norm.weight", "norm.bias"}


def test_export_from_a_checkpoint_dict_and_from_our_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    mae = create_mae("mae_vit_nano_patch8")
    ours = {
        "format": "mae_transfer.train_checkpoint",
        "model": mae.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "step": 10,
        "epoch": 0,
        "config": {"model": {"name": "mae_vit_nano_patch8"}},
    }
    assert detect_format(ours) == "ours"
    ddp = {"model": {"module." + k: v for k, v in mae.state_dict().items()}, "optimizer": {}, "step": 3, "config": {}}
    assert detect_format(ddp) == "ours"
    assert set(to_vit_state_dict(ddp)) == set(mae.state_dict())
    path = export_mae_encoder(ours, tmp_path / "e.pth")
    saved = torch.load(path, weights_only=True)["model"]
    for k, v in mae.encoder_state_dict().items():
        assert torch.equal(saved[k], v), k


# ---------------------------------------------------------------------------- official reference weights
@pytest.fixture(scope="module")
def reference():
    path = OFFICIAL / "mae_reference.pt"
    if not path.is_file():
        pytest.skip(f"official reference weights not found at {path} (set MAE_TRANSFER_SHARED)")
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("key", ["norm_pix_False", "norm_pix_True"])
def test_official_full_mae_loads_into_vit_and_mae(reference, key, caplog):
    ref = reference[key]
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=3, num_heads=4, num_classes=10)
    assert detect_format(ref["state_dict"]) == "mae_full"
    with caplog.at_level(logging.INFO, logger="mae_transfer.checkpoint"):
        report = load_backbone(
            vit, {"model": ref["state_dict"]}, expected_missing="finetune", expected_unexpected="finetune"
        )
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert set(report.unexpected) == {k for k in ref["state_dict"] if k.startswith(("decoder_", "mask_token", "norm."))}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # all expected: no warning
    assert any("4 missing" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(vit.pos_embed.detach(), ref["state_dict"]["pos_embed"])

    c = ref["config"]
    mae = MaskedAutoencoderViT(
        img_size=64,
        patch_size=8,
        embed_dim=96,
        depth=3,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
        norm_pix_loss=c["norm_pix_loss"],
    ).eval()
    report = load_backbone(mae, ref["state_dict"])
    assert report.missing == [] and report.unexpected == []
    with torch.no_grad():
        out = mae(ref["imgs"], noise=ref["noise"])
    torch.testing.assert_close(out.latent, ref["latent"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pred, ref["pred"], atol=1e-5, rtol=0)


def test_official_finetuned_vit_loads_with_nothing_missing(reference):
    ref = reference["vit_global_pool"]
    c = ref["config"]
    vit = VisionTransformer(
        img_size=c["img_size"],
        patch_size=c["patch_size"],
        embed_dim=c["embed_dim"],
        depth=c["depth"],
        num_heads=c["num_heads"],
        num_classes=c["num_classes"],
        global_pool="avg",
    ).eval()
    assert detect_format(ref["state_dict"]) == "timm_vit"
    report = load_backbone(vit, ref["state_dict"])
    assert report.missing == [] and report.unexpected == []
    with torch.no_grad():
        torch.testing.assert_close(vit(ref["x"]), ref["logits"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- timm
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_timm_vit_converts_and_gives_the_same_logits(pool):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, global_pool=pool).eval()
    assert ref.blocks[0].norm1.eps == 1e-6  # same LayerNorm eps as ours
    assert isinstance(ref.fc_norm, torch.nn.LayerNorm) == (pool == "avg")
    sd = ref.state_dict()
    assert detect_format(sd) == "timm_vit"
    ours = create_vit("vit_tiny_patch16", num_classes=10, global_pool=pool).eval()
    report = load_backbone(ours, sd)
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- Hugging Face
HF_SIZES = dict(
    hidden_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=384,
    image_size=64,
    patch_size=8,
    decoder_hidden_size=64,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=256,
    mask_ratio=0.75,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
)


def _legacy_hf_names(sd: dict) -> dict:
    """transformers-4 / Hub spelling of a transformers-5 ViTMAE state dict (names written out here,
    independently of the converter, from transformers 4.46 ``ViTMAELayer``)."""
    import re

    if not any(".layers." in k or k.startswith("layers.") for k in sd):
        return dict(sd)  # already the legacy spelling (transformers 4 installed)
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(vit\.)?layers\.", r"\1encoder.layer.", k)
        for new, old in (
            ("attention.q_proj", "attention.attention.query"),
            ("attention.k_proj", "attention.attention.key"),
            ("attention.v_proj", "attention.attention.value"),
            ("attention.o_proj", "attention.output.dense"),
            ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense"),
        ):
            k = k.replace("." + new + ".", "." + old + ".")
        out[k] = v
    return out


@pytest.mark.parametrize("norm_pix", [False, True])
def test_hf_vitmae_pretraining_matches_ours(norm_pix):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(norm_pix_loss=norm_pix, **HF_SIZES)).eval()
    # Random non-trivial LayerNorm / bias values so a swapped norm or bias would show.
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "position" not in n and "pos_embed" not in n:
                p.add_(torch.randn_like(p) * 0.02)
    sd = hf.state_dict()
    assert detect_format(sd) == "hf_vitmae_pretraining"
    ours = MaskedAutoencoderViT(
        img_size=64,
        patch_size=8,
        embed_dim=96,
        depth=3,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
        norm_eps=1e-6,
        mask_ratio=0.75,
        norm_pix_loss=norm_pix,
    ).eval()
    for names in (sd, _legacy_hf_names(sd)):
        report = load_backbone(ours, names)
        assert report.missing == [] and report.unexpected == [] and report.format == "hf_vitmae_pretraining"
        # HF's fixed sin-cos tables are loaded, not regenerated.
        torch.testing.assert_close(ours.pos_embed.detach(), sd["vit.embeddings.position_embeddings"])
        torch.testing.assert_close(ours.decoder_pos_embed.detach(), sd["decoder.decoder_pos_embed"])

    imgs = torch.randn(3, 3, 64, 64)
    noise = torch.rand(3, 64)
    with torch.no_grad():
        hf_out = hf(pixel_values=imgs, noise=noise)
        hf_latent = hf.vit(pixel_values=imgs, noise=noise).last_hidden_state
        out = ours(imgs, noise=noise)
    assert torch.equal(out.mask, hf_out.mask)
    torch.testing.assert_close(out.latent, hf_latent, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pred, hf_out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, hf_out.loss, atol=1e-5, rtol=0)


def test_hf_vitmae_model_loads_into_a_vit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # mask_ratio 0 and noise in patch order: HF's encoder then sees every patch, unshuffled, so its
    # output must equal a plain ViT's features.
    hf = transformers.ViTMAEModel(transformers.ViTMAEConfig(**{**HF_SIZES, "mask_ratio": 0.0})).eval()
    sd = hf.state_dict()
    assert detect_format(sd) == "hf_vitmae_model"
    assert detect_format(_legacy_hf_names(sd)) == "hf_vitmae_model"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hf_tokens = hf(pixel_values=x, noise=torch.arange(64).expand(2, 64).float()).last_hidden_state
    for names in (sd, _legacy_hf_names(sd), {"vit." + k: v for k, v in sd.items()}):
        vit = VisionTransformer(
            img_size=64, patch_size=8, embed_dim=96, depth=3, num_heads=4, num_classes=0, global_pool="token"
        ).eval()
        report = load_backbone(vit, names)
        assert report.missing == [] and report.unexpected == []
        with torch.no_grad():
            torch.testing.assert_close(vit.forward_features(x), hf_tokens, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- detectron2 / mmseg / wrappers
def test_detectron2_vitdet_backbone_with_rel_pos_and_no_class_token():
    torch.manual_seed(0)
    src = _small_vit(img_size=32, use_rel_pos=True)  # rel_pos tables for a 4x4 grid: 7 offsets
    with torch.no_grad():
        for blk in src.blocks:
            blk.attn.rel_pos_h.normal_()
            blk.attn.rel_pos_w.normal_()
    sd = {"backbone.net." + k: v for k, v in src.state_dict().items() if k != "cls_token" and not k.startswith("norm.")}
    sd["backbone.simfp_2.0.weight"] = torch.zeros(3)
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 3)
    sd["proposal_generator.rpn_head.conv.weight"] = torch.zeros(3)
    assert detect_format({"model": sd, "__author__": "detectron2"}) == "detectron2_vitdet"

    # Dense backbone: no class token, an 8x8 grid (64 px), so 15-offset tables from the 7-offset ones.
    dst = _small_vit(img_size=64, class_token=False, global_pool="", use_rel_pos=True)
    report = load_backbone(dst, {"model": sd}, expected_missing="dense", expected_unexpected="dense")
    assert sorted(report.missing) == ["norm.bias", "norm.weight"]
    assert set(report.unexpected) == {
        "backbone.simfp_2.0.weight",
        "roi_heads.box_predictor.cls_score.weight",
        "proposal_generator.rpn_head.conv.weight",
    }
    assert dst.pos_embed.shape == (1, 64, 32)
    want = resize_pos_embed(src.pos_embed.detach(), (8, 8), 1, old_grid=(4, 4), new_prefix_tokens=0)
    torch.testing.assert_close(dst.pos_embed.detach(), want)
    table = dst.blocks[0].attn.rel_pos_h.detach()
    assert table.shape == (15, 16)
    want = F.interpolate(src.blocks[0].attn.rel_pos_h.detach().t()[None], size=15, mode="linear", align_corners=False)[
        0
    ].t()
    torch.testing.assert_close(table, want)
    assert any("rel_pos_h" in n for n in report.adapted)


def test_dense_target_without_rel_pos_in_checkpoint_leaves_them_missing():
    src = _small_vit()
    dst = _small_vit(class_token=False, global_pool="", use_rel_pos=True)
    with pytest.raises(CheckpointError, match="rel_pos"):
        load_backbone(dst, src.state_dict())
    report = load_backbone(dst, src.state_dict(), expected_missing="dense", expected_unexpected="dense")
    assert all("rel_pos" in k for k in report.missing) and len(report.missing) == 4
    assert report.unexpected == ["cls_token"]


def _to_mm(sd: dict, prefix: str = "backbone.", beit: bool = False, in_proj: bool = False) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            rest = (
                rest.replace("norm1.", "ln1.")
                .replace("norm2.", "ln2.")
                .replace("mlp.fc1.", "ffn.layers.0.0.")
                .replace("mlp.fc2.", "ffn.layers.1.")
            )
            if in_proj and rest.startswith("attn.qkv."):
                rest = "attn.attn.in_proj_" + rest.rsplit(".", 1)[1]
            elif in_proj and rest.startswith("attn.proj."):
                rest = "attn.attn.out_proj." + rest.rsplit(".", 1)[1]
            if beit and rest == "attn.qkv.bias":
                d = v.shape[0] // 3
                out[f"{prefix}layers.{i}.attn.q_bias"] = v[:d]
                out[f"{prefix}layers.{i}.attn.v_bias"] = v[2 * d :]
                continue
            out[f"{prefix}layers.{i}.{rest}"] = v
        elif k.startswith("patch_embed.proj."):
            out[prefix + k.replace("patch_embed.proj.", "patch_embed.projection.")] = v
        elif k.startswith("norm."):
            out[prefix + k.replace("norm.", "ln1.")] = v
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("variant", ["vit", "in_proj", "beit"])
def test_mmseg_names(variant):
    torch.manual_seed(0)
    src = _small_vit().eval()
    sd = dict(src.state_dict())
    if variant == "beit":  # BEiT has no key bias: make it zero so the round trip is exact
        for i in range(2):
            sd[f"blocks.{i}.attn.qkv.bias"] = sd[f"blocks.{i}.attn.qkv.bias"].clone()
            sd[f"blocks.{i}.attn.qkv.bias"][32:64] = 0
        src.load_state_dict(sd)
    mm = _to_mm(sd, beit=variant == "beit", in_proj=variant == "in_proj")
    mm["decode_head.conv_seg.weight"] = torch.zeros(2, 2)
    ckpt = {"meta": {"mmseg_version": "1.x"}, "state_dict": mm}
    assert detect_format(ckpt) == "mmseg"
    dst = _small_vit().eval()
    report = load_backbone(dst, ckpt)
    assert report.missing == [] and report.unexpected == ["decode_head.conv_seg.weight"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_features(x), src.forward_features(x))


def test_mmpretrain_mae_neck_maps_to_the_decoder():
    torch.manual_seed(0)
    src = create_mae("mae_vit_nano_patch8")
    sd = src.state_dict()
    mm = _to_mm(src.encoder_state_dict())
    # MAEPretrainDecoder: the decoder layers are mm encoder layers under neck.decoder_blocks.N.
    decoder_layers = {k[len("decoder_") :]: v for k, v in sd.items() if k.startswith("decoder_blocks.")}
    for k, v in _to_mm(decoder_layers, prefix="neck.").items():
        mm[k.replace("neck.layers.", "neck.decoder_blocks.")] = v
    for k in (
        "mask_token",
        "decoder_pos_embed",
        "decoder_embed.weight",
        "decoder_embed.bias",
        "decoder_pred.weight",
        "decoder_pred.bias",
    ):
        mm["neck." + k] = sd[k]
    mm["neck.ln1.weight"], mm["neck.ln1.bias"] = sd["decoder_norm.weight"], sd["decoder_norm.bias"]
    assert any(k.startswith("neck.decoder_blocks.0.ffn.layers.0.0.") for k in mm)
    dst = create_mae("mae_vit_nano_patch8")
    report = load_backbone(dst, {"state_dict": mm})
    assert report.missing == [] and report.unexpected == []
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_wrappers_are_unwrapped():
    src = _small_vit()
    sd = src.state_dict()
    for wrapped in (
        {"module." + k: v for k, v in sd.items()},
        {"state_dict": {"_orig_mod." + k: v for k, v in sd.items()}},
        {"module": sd},
        {"model": {"encoder." + k: v for k, v in sd.items()}},
    ):
        assert set(to_vit_state_dict(wrapped)) == set(sd)
        assert load_backbone(_small_vit(), wrapped).missing == []


# ---------------------------------------------------------------------------- errors
def test_wider_checkpoint_names_file_and_both_widths(tmp_path):
    big = VisionTransformer(img_size=32, patch_size=8, embed_dim=768, depth=1, num_heads=12, num_classes=0)
    path = tmp_path / "vitb_like.pth"
    torch.save({"model": big.state_dict()}, path)
    micro = create_vit("vit_micro_patch8", img_size=32, num_classes=10)
    with pytest.raises(CheckpointError) as e:
        load_backbone(micro, path, expected_missing="finetune", expected_unexpected="finetune")
    msg = str(e.value)
    assert str(path) in msg and "width 768" in msg and "width 96" in msg and "--model" in msg


def test_vit_b_checkpoint_into_vit_s_suggests_the_model(official_keys):
    ref = {k: torch.empty(s, device="meta") for k, s in official_keys["vit_base_patch16"].items()}
    with torch.device("meta"):
        small = create_vit("vit_small_patch16", num_classes=1000)
    with pytest.raises(CheckpointError) as e:
        load_backbone(small, {"model": _encoder_only(ref)}, expected_missing="finetune")
    msg = str(e.value)
    assert "width 768 and depth 12" in msg and "width 384 and depth 12" in msg
    assert "--model vit_base_patch16" in msg


def test_shallower_checkpoint_reports_missing_blocks():
    src = _small_vit(depth=1)
    with pytest.raises(CheckpointError) as e:
        load_backbone(_small_vit(depth=2), src.state_dict())
    msg = str(e.value)
    assert "blocks.1." in msg and "depth 1" in msg and "depth 2" in msg


def test_deeper_checkpoint_warns_about_extra_blocks(caplog):
    src = _small_vit(depth=3)
    with caplog.at_level(logging.WARNING, logger="mae_transfer.checkpoint"):
        report = load_backbone(_small_vit(depth=2), src.state_dict())
    assert all(k.startswith("blocks.2.") for k in report.unexpected) and report.unexpected
    assert any("3 blocks" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_missing_truncated_and_optimizer_only_files(tmp_path):
    model = _small_vit()
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=str(missing)):
        load_backbone(model, missing)

    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(truncated)):
        load_backbone(model, truncated)

    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()
    opt_only = tmp_path / "optimizer.pth"
    torch.save({"optimizer": opt.state_dict(), "epoch": 3}, opt_only)
    with pytest.raises(CheckpointError) as e:
        load_backbone(model, opt_only)
    assert str(opt_only) in str(e.value) and "no backbone weights found" in str(e.value)
    assert "format detected: unknown" in str(e.value)

    heads = tmp_path / "heads.pth"
    torch.save({"model": {"roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 3)}}, heads)
    with pytest.raises(CheckpointError, match="no backbone weights found in .*heads.pth"):
        load_backbone(model, heads)

    rubbish = tmp_path / "random.pt"
    torch.save(torch.randn(3), rubbish)
    with pytest.raises(CheckpointError, match="no backbone weights found"):
        load_backbone(model, rubbish)


def test_pos_embed_224_interpolates_to_256():
    torch.manual_seed(0)
    src = create_vit("vit_tiny_patch16", num_classes=0, global_pool="token")
    dst = create_vit("vit_tiny_patch16", img_size=256, num_classes=0, global_pool="token")
    report = load_backbone(dst, src.state_dict())
    assert dst.pos_embed.shape == (1, 257, 192)
    want = resize_pos_embed(src.pos_embed.detach(), (16, 16), 1, old_grid=(14, 14))
    torch.testing.assert_close(dst.pos_embed.detach(), want)
    torch.testing.assert_close(dst.pos_embed[:, 0].detach(), src.pos_embed[:, 0].detach())  # class row kept
    assert any("pos_embed" in n and "bicubic" in n for n in report.adapted)
    with pytest.raises(CheckpointError, match="pos_embed.*interpolate_pos_embed"):
        load_backbone(
            create_vit("vit_tiny_patch16", img_size=256, num_classes=0, global_pool="token"),
            src.state_dict(),
            interpolate_pos_embed=False,
        )


def test_patch14_checkpoint_into_patch16_model():
    torch.manual_seed(0)
    src = VisionTransformer(
        img_size=224, patch_size=14, embed_dim=32, depth=1, num_heads=2, num_classes=0, global_pool="token"
    )
    dst = VisionTransformer(
        img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=0, global_pool="token"
    )
    report = load_backbone(dst, {"model": src.state_dict()})
    assert report.missing == []
    w = dst.patch_embed.proj.weight.detach()
    assert w.shape == (32, 3, 16, 16)
    torch.testing.assert_close(
        w, F.interpolate(src.patch_embed.proj.weight.detach(), size=(16, 16), mode="bicubic", align_corners=False)
    )
    assert dst.pos_embed.shape == (1, 1 + 14 * 14, 32)  # 16x16 grid of /14 -> 14x14 grid of /16
    assert any("kernel" in n for n in report.adapted)
    with torch.no_grad():
        assert torch.isfinite(dst(torch.randn(1, 3, 224, 224))).all()


def test_head_of_another_size_is_left_out_when_expected():
    src = _small_vit(num_classes=1000)
    dst = _small_vit(num_classes=10)
    with pytest.raises(CheckpointError, match="head.weight"):
        load_backbone(dst, src.state_dict())
    report = load_backbone(dst, src.state_dict(), expected_missing="finetune")
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert [m[0] for m in report.mismatched] == ["head.weight", "head.bias"]
    report = load_backbone(_small_vit(embed_dim=32, num_classes=10), src.state_dict(), strict_shapes=False)
    assert sorted(report.missing) == ["head.bias", "head.weight"]


def test_presets_are_small_tuples_of_patterns():
    assert set(EXPECTED_MISSING) == set(EXPECTED_UNEXPECTED) == {"finetune", "linprobe", "dense", "pretrain"}
    assert EXPECTED_MISSING["finetune"] == ("head.*", "fc_norm.*")
    assert "cls_token" in EXPECTED_UNEXPECTED["dense"] and "blocks.*.attn.rel_pos_*" in EXPECTED_MISSING["dense"]
    for presets in (EXPECTED_MISSING, EXPECTED_UNEXPECTED):
        for v in presets.values():
            assert isinstance(v, tuple) and all(isinstance(p, str) for p in v) and len(v) <= 8


def test_report_summary_is_readable():
    report = load_backbone(_small_vit(num_classes=3), _small_vit().state_dict(), expected_missing="head.*")
    assert isinstance(report, LoadReport)
    text = report.summary()
    assert "blocks.{0-1}.attn.qkv.weight" in text and "missing: head.weight, head.bias" in text


# ---------------------------------------------------------------------------- atomic_save
def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    atomic_save({"step": 1}, path)
    before = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *a, **kw):
        f.write(b"partial garbage")  # some bytes reach the temporary file before the crash
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.pth"]
    atomic_save({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.pth"]


# ---------------------------------------------------------------------------- other file types
def test_detectron2_pickle_of_numpy_arrays(tmp_path):
    import pickle

    src = _small_vit(class_token=False, global_pool="")
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {"model": {"backbone.net." + k: v.numpy() for k, v in src.state_dict().items()}, "__author__": "x"}, f
        )
    dst = _small_vit(class_token=False, global_pool="")
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):  # a pickle can run code: only when trusted
        load_backbone(dst, path)
    report = load_backbone(dst, path, trust=True)
    assert report.format == "detectron2_vitdet" and report.missing == [] and report.unexpected == []
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


def test_safetensors_file(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    src = _small_vit()
    path = tmp_path / "model.safetensors"
    st.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = _small_vit()
    assert load_backbone(dst, path).missing == []
    assert torch.equal(dst.pos_embed, src.pos_embed)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_backbone(dst, bad)
