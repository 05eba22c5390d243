"""Released baselines read as they are published (issue 25, item 7): MoCo v3, BEiT, DeiT, DINO and
DINOv2 files load into our one ViT and compute what timm's definition of the same model computes.

Every file is built from timm's own model (pretrained=False, tiny sizes, the options of the named
model) with the released key names, its weights jittered so that no block is an identity (layer
scale starts at 1e-5); our ViT is built for the file's size alone, as a task builds it, and
``load_backbone`` fits it (layer scale, BEiT's tables, registers). fp32 on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from mae_transfer.checkpoint import (
    describe_checkpoint,
    detect_format,
    infer_vit_config,
    load_backbone,
    load_trained_model,
    to_vit_state_dict,
)
from mae_transfer.models.vit import VisionTransformer

timm = pytest.importorskip("timm")
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models.beit import Beit  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

TOL = 1e-5
TINY = dict(embed_dim=64, depth=2, num_heads=2)


def _jitter(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _ours(info: dict, **kw) -> VisionTransformer:
    """Our ViT of the file's size (what a task builds from ``describe_checkpoint``), no options."""
    args = dict(
        img_size=info["img_size"],
        patch_size=info["patch_size"],
        embed_dim=info["embed_dim"],
        depth=info["depth"],
        num_heads=kw.pop("num_heads", TINY["num_heads"]),
    )
    args.update(kw)
    return VisionTransformer(**args).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _same_features(name: str, ours, ref, x: torch.Tensor, ref_pooled=None) -> None:
    """forward_features and the pooled pre-logits equal timm's (< 1e-5), the differences printed."""
    with torch.no_grad():
        f_ours, f_ref = ours.forward_features(x), ref.forward_features(x)
        p_ours = ours.forward_head(f_ours, pre_logits=True)
        p_ref = ref.forward_head(f_ref, pre_logits=True) if ref_pooled is None else ref_pooled(f_ref)
    d_feat, d_pool = _max_diff(f_ours, f_ref), _max_diff(p_ours, p_ref)
    print(f"{name}: max |ours - timm| forward_features {d_feat:.2e}, pooled pre-logits {d_pool:.2e}")
    assert d_feat < TOL and d_pool < TOL


# ---------------------------------------------------------------------------- DINO
def test_dino_release_bare_state_dict(tmp_path):
    # vit_base_patch16_224.dino: a plain ViT, class token, no head (num_classes=0); released bare.
    ref = _jitter(TimmViT(img_size=64, patch_size=16, num_classes=0, **TINY))
    path = tmp_path / "dino_vit_pretrain.pth"
    torch.save(ref.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert not any(k.startswith("head") for k in sd)
    assert detect_format(sd) == "dino"
    assert detect_format({"model": sd}) == "mae_encoder"  # MAE's release layout keeps its name
    info = describe_checkpoint(path)
    assert info["format"] == "dino" and (info["img_size"], info["patch_size"]) == (64, 16)

    ours = _ours(info, num_classes=0, global_pool="token")
    report = load_backbone(ours, path)
    assert report.format == "dino" and report.missing == [] and report.unexpected == []
    _same_features("dino", ours, ref, torch.randn(2, 3, 64, 64))


def test_dino_training_checkpoint_reads_the_teacher():
    teacher = _jitter(TimmViT(img_size=64, patch_size=16, num_classes=0, **TINY), seed=1)
    student = _jitter(TimmViT(img_size=64, patch_size=16, num_classes=0, **TINY), seed=2)
    head = {"head.mlp.0.weight": torch.randn(32, 64), "head.last_layer.weight_g": torch.ones(16, 1)}
    ckpt = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()}, **head},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
        "epoch": 100,
    }
    assert detect_format(ckpt) == "dino"
    assert set(to_vit_state_dict(ckpt)) == set(teacher.state_dict())  # DINO's head left out
    ours = _ours(infer_vit_config(ckpt), num_classes=0, global_pool="token")
    report = load_backbone(ours, ckpt)
    assert report.missing == [] and report.unexpected == []
    _same_features("dino (teacher)", ours, teacher, torch.randn(2, 3, 64, 64))


# ---------------------------------------------------------------------------- MoCo v3
def _moco_v3_checkpoint(base: torch.nn.Module, momentum: torch.nn.Module, width: int) -> dict:
    """moco-v3's main_moco.py save: {"epoch", "arch", "state_dict": MoCo_ViT under DDP, "optimizer"};
    base_encoder.head is the 3-layer projection MLP (BatchNorm), the predictor a 2-layer MLP."""
    mlp = {"head.0.weight": torch.randn(128, width), "head.1.weight": torch.ones(128), "head.1.bias": torch.zeros(128)}
    mlp |= {"head.1.running_mean": torch.zeros(128), "head.1.running_var": torch.ones(128)}
    mlp |= {"head.1.num_batches_tracked": torch.tensor(5), "head.3.weight": torch.randn(32, 128)}
    sd = {}
    for name, enc in (("base_encoder", base), ("momentum_encoder", momentum)):
        sd |= {f"module.{name}.{k}": v for k, v in enc.state_dict().items()}
        sd |= {f"module.{name}.{k}": v.clone() for k, v in mlp.items()}
    sd |= {"module.predictor.0.weight": torch.randn(128, 32), "module.predictor.3.weight": torch.randn(32, 128)}
    return {"epoch": 300, "arch": "vit_base", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


def test_mocov3_checkpoint_reads_the_base_encoder(tmp_path):
    base = _jitter(TimmViT(img_size=64, patch_size=16, num_classes=0, **TINY), seed=1)
    momentum = _jitter(TimmViT(img_size=64, patch_size=16, num_classes=0, **TINY), seed=2)
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save(_moco_v3_checkpoint(base, momentum, 64), path)
    ckpt = torch.load(path, weights_only=True)
    assert detect_format(ckpt) == "mocov3"
    # Momentum encoder, predictor and projection head are left out (MoCo v3's main_lincls.py).
    assert set(to_vit_state_dict(ckpt)) == set(base.state_dict())
    info = describe_checkpoint(path)
    assert info["format"] == "mocov3" and info["img_size"] == 64

    ours = _ours(info, num_classes=0, global_pool="token")
    report = load_backbone(ours, path)
    assert report.format == "mocov3" and report.missing == [] and report.unexpected == []
    _same_features("mocov3", ours, base, torch.randn(2, 3, 64, 64))


def test_mocov3_vit_small_is_sized_with_its_12_heads():
    with torch.device("meta"):  # shapes only
        vits = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    sd = {f"module.base_encoder.{k}": v for k, v in vits.state_dict().items()}
    ckpt = {"state_dict": sd}
    info = infer_vit_config(ckpt)
    assert info["format"] == "mocov3" and info["num_heads"] == 12 and info["name"] == "vit_small_patch16_h12"


# ---------------------------------------------------------------------------- BEiT
def _beit(**kw) -> Beit:
    # beit_base_patch16_224: no absolute table, per-block relative position bias, layer scale 0.1,
    # q/v biases, mean pooling with fc_norm.
    args = dict(img_size=64, patch_size=16, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
    return _jitter(Beit(**{**args, **TINY, **kw}))


def test_beit_loads_into_our_vit_built_from_its_size(tmp_path):
    ref = _beit(num_classes=10)
    path = tmp_path / "beit_base_patch16_224.pth"
    torch.save({"model": ref.state_dict()}, path)  # the official release's container
    info = describe_checkpoint(path)
    assert info["format"] == "beit"
    assert (info["img_size"], info["grid_size"], info["num_heads"]) == (64, (4, 4), 2)
    assert not info["abs_pos_embed"] and info["rel_pos_type"] == "table" and info["layer_scale"]

    ours = _ours(info, num_classes=10, global_pool="avg")  # a plain ViT: load_backbone fits it
    report = load_backbone(ours, path)
    assert report.format == "beit" and report.missing == [] and report.unexpected == []
    assert ours.pos_embed is None and ours.blocks[0].gamma_1 is not None
    assert any("relative position bias tables" in n for n in report.adapted)
    x = torch.randn(2, 3, 64, 64)
    _same_features("beit", ours, ref, x)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) < TOL

    # Built with BEiT's options, nothing is fitted and the result is the same.
    built = _ours(info, num_classes=10, use_rel_pos=True, rel_pos_type="table", layer_scale=0.1, abs_pos_embed=False)
    report = load_backbone(built, path, fit_architecture=False)
    assert report.missing == [] and report.unexpected == [] and report.adapted == []
    _same_features("beit (built with its options)", built, ref, x)

    # A classifier fine-tuned from it is rebuilt from its size and read back with --eval-only.
    again = _ours(info, num_classes=10, global_pool="avg")
    load_trained_model(again, ours.state_dict(), "classifier.pth")
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


def test_beit_pretraining_shared_table_is_copied_into_every_block():
    ref = _beit(num_classes=0, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    sd = ref.state_dict()
    sd["mask_token"] = torch.zeros(1, 1, 64)  # BEiT's pretraining checkpoints
    assert "rel_pos_bias.relative_position_bias_table" in sd
    assert detect_format(sd) == "beit"
    ours = _ours(infer_vit_config(sd), num_classes=0, global_pool="avg")
    report = load_backbone(ours, sd)
    assert report.missing == [] and report.unexpected == []
    _same_features("beit (shared table)", ours, ref, torch.randn(2, 3, 64, 64))


def test_beit_table_is_cropped_for_a_smaller_grid():
    ref = _beit(num_classes=0)
    ours = VisionTransformer(img_size=32, patch_size=16, num_classes=0, global_pool="avg", **TINY).eval()
    big = VisionTransformer(img_size=64, patch_size=16, num_classes=0, global_pool="avg", **TINY).eval()
    load_backbone(big, ref.state_dict())
    ours.add_rel_pos_tables((2, 2))  # a model made for a 2x2 grid: the 4x4 table's central offsets
    report = load_backbone(ours, ref.state_dict())
    assert any("central offsets" in n for n in report.adapted)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(ours.forward_features(x), big.forward_features(x)) < TOL


# ---------------------------------------------------------------------------- DeiT
def test_deit_supervised_vit_is_timm_vit():
    # deit_base_patch16_224: timm's plain ViT (class token pooling) with its classifier.
    ref = _jitter(TimmViT(img_size=64, patch_size=16, num_classes=10, **TINY))
    sd = ref.state_dict()
    assert detect_format({"model": sd}) == "timm_vit"  # DeiT's names are exactly timm's
    ours = _ours(infer_vit_config(sd), num_classes=10, global_pool="token")
    report = load_backbone(ours, {"model": sd})
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, 64, 64)
    _same_features("deit", ours, ref, x)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) < TOL


def test_deit_distilled_token_is_read_as_a_register_token():
    ref = _jitter(VisionTransformerDistilled(img_size=64, patch_size=16, num_classes=10, **TINY))
    sd = ref.state_dict()
    assert "dist_token" in sd and detect_format({"model": sd}) == "deit"
    ours = _ours(infer_vit_config(sd), num_classes=10, global_pool="token")
    report = load_backbone(ours, {"model": sd}, expected_unexpected="head_dist.*")
    assert ours.num_reg_tokens == 1 and report.missing == []
    assert sorted(report.unexpected) == ["head_dist.bias", "head_dist.weight"]
    # Tokens [class, dist, patches] equal; we pool the class token, timm averages class and dist.
    _same_features("deit distilled", ours, ref, torch.randn(2, 3, 64, 64), ref_pooled=lambda f: f[:, 0])


# ---------------------------------------------------------------------------- DINOv2
def _dinov2(**kw) -> TimmViT:
    # vit_base_patch14_dinov2: patch 14, 518 px (37x37 table), layer scale 1e-5, no head.
    args = dict(img_size=518, patch_size=14, init_values=1e-5, num_classes=0)
    return _jitter(TimmViT(**{**args, **TINY, **kw}))


def test_dinov2_timm_and_official_layouts(tmp_path):
    ref = _dinov2()
    sd = ref.state_dict()
    assert "blocks.0.ls1.gamma" in sd and sd["pos_embed"].shape[1] == 1 + 37 * 37
    official = {**sd, "mask_token": torch.zeros(1, 64)}  # dinov2_vitb14_pretrain.pth
    chunked = {  # block_chunks=2: blocks.<chunk>.<block>.
        (k.replace("blocks.", f"blocks.{k.split('.')[1]}.", 1) if k.startswith("blocks.") else k): v
        for k, v in official.items()
    }
    x = torch.randn(1, 3, 518, 518)
    for layout, state in (("timm", sd), ("official", official), ("official, chunked", chunked)):
        assert detect_format(state) == "dinov2", layout
        info = infer_vit_config(state)
        assert (info["img_size"], info["patch_size"], info["layer_scale"]) == (518, 14, True)
        ours = _ours(info, num_classes=0, global_pool="token")
        report = load_backbone(ours, state, expected_unexpected="mask_token")
        assert report.missing == [] and report.unexpected == [], layout
        _same_features(f"dinov2 ({layout})", ours, ref, x)
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(official, path)
    assert describe_checkpoint(path)["img_size"] == 518


def test_dinov2_table_is_interpolated_to_the_input():
    # The 37x37 table resized to 16x16 (224 px): bicubic, align_corners=False, the class row kept
    # (the official MAE code's rule); timm's resample_abs_pos_embed without antialias does the same.
    ref = _dinov2()
    ours = VisionTransformer(img_size=224, patch_size=14, num_classes=0, global_pool="token", **TINY).eval()
    load_backbone(ours, ref.state_dict())
    small = _dinov2(img_size=224)
    sd = dict(ref.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (16, 16), num_prefix_tokens=1, antialias=False)
    small.load_state_dict(sd)
    _same_features("dinov2 at 224 px", ours, small, torch.randn(1, 3, 224, 224))
    # timm's default (antialias=True, what its dynamic_img_size does) smooths the table further.
    sd["pos_embed"] = resample_abs_pos_embed(ref.state_dict()["pos_embed"], (16, 16), num_prefix_tokens=1)
    d = _max_diff(ours.pos_embed_for((16, 16)), sd["pos_embed"])
    print(f"dinov2 at 224 px: our table vs timm's antialiased resample {d:.2e} (not compared)")


def test_dinov2_with_registers_timm_and_official_layouts():
    # vit_base_patch14_reg4_dinov2: 4 register tokens after the class token, no_embed_class (timm).
    ref = _dinov2(reg_tokens=4, no_embed_class=True)
    sd = ref.state_dict()
    assert sd["reg_token"].shape == (1, 4, 64) and sd["pos_embed"].shape[1] == 37 * 37
    # The official release: register_tokens, a class row in pos_embed that the class token adds.
    row = torch.randn(1, 1, 64)
    official = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed", "cls_token")}
    official |= {
        "register_tokens": sd["reg_token"],
        "cls_token": sd["cls_token"] - row,
        "mask_token": torch.zeros(1, 64),
    }
    official["pos_embed"] = torch.cat([row, sd["pos_embed"]], dim=1)
    x = torch.randn(1, 3, 518, 518)
    for layout, state in (("timm", sd), ("official", official)):
        assert detect_format(state) == "dinov2", layout
        info = infer_vit_config(state)
        assert info["reg_tokens"] == 4 and info["img_size"] == 518
        ours = _ours(info, num_classes=0, global_pool="token")
        report = load_backbone(ours, state, expected_unexpected="mask_token")
        assert ours.num_reg_tokens == 4 and ours.num_prefix_tokens == 5
        assert report.missing == [] and report.unexpected == [], layout
        _same_features(f"dinov2 reg4 ({layout})", ours, ref, x)
        with torch.no_grad():  # mean pooling skips the class and register tokens, as timm's does
            f = ours.forward_features(x)
            ours.global_pool = "avg"
            ours.fc_norm = torch.nn.Identity()
            assert _max_diff(ours.forward_head(f, pre_logits=True), ref.forward_features(x)[:, 5:].mean(1)) < TOL


def test_register_tokens_built_explicitly_keep_every_other_name():
    plain = VisionTransformer(img_size=32, patch_size=8, num_classes=0, global_pool="token", **TINY)
    reg = VisionTransformer(img_size=32, patch_size=8, num_classes=0, global_pool="token", reg_tokens=4, **TINY)
    assert set(reg.state_dict()) == set(plain.state_dict()) | {"reg_token"}
    assert reg.layer_id("reg_token") == 0 and "reg_token" in reg.no_weight_decay()
    assert reg.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 1 + 4 + 16, 64)
    with pytest.raises(ValueError, match="register tokens need global attention"):
        VisionTransformer(img_size=32, patch_size=8, class_token=False, global_pool="", window_size=2, reg_tokens=1)


# ---------------------------------------------------------------------------- a task reads them
def test_knn_reads_a_mocov3_file_and_names_it(tmp_path, cache, capfd):
    from mae_transfer.cli import main

    # The nano size (64 wide, 2 blocks, 4 heads, patch 8, 32 px): what the toy k-NN run builds from the file.
    base = _jitter(TimmViT(img_size=32, patch_size=8, num_classes=0, embed_dim=64, depth=2, num_heads=4))
    momentum = _jitter(TimmViT(img_size=32, patch_size=8, num_classes=0, embed_dim=64, depth=2, num_heads=4), 2)
    path = tmp_path / "mocov3_nano.pth.tar"
    torch.save(_moco_v3_checkpoint(base, momentum, 64), path)
    out = tmp_path / "knn"
    assert main(["knn", "--backbone", str(path), "--output", str(out), "--k", "5", "--device", "cpu"]) == 0
    captured = capfd.readouterr()
    log = captured.out + captured.err  # the command's log: the load report names the format
    assert f"loaded {path} (format mocov3): 30 tensors loaded, 0 missing, 0 unexpected" in log
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows and {r["model"] for r in rows} == {"vit_nano_patch8"}
    # The rows name the backbone by its path and sha256 (the format is in the load report above).
    assert {r["backbone"] for r in rows} == {str(path)} and all(r["backbone_sha256"] for r in rows)
    # Through bench, the rows also name the layout the file was read as.
    res = tmp_path / "res"
    argv = ["bench", "--backbone", f"moco={path}", "--backbone", "scratch=random", "--tasks", "knn"]
    assert main([*argv, "--results", str(res), "--in-process"]) == 0
    rows = [json.loads(line) for line in (res / "results.jsonl").read_text().splitlines()]
    formats = {r["backbone"]: r.get("backbone_format") for r in rows}
    assert formats == {"moco": "mocov3", "scratch": None}, formats
