"""Segmentation: metrics equal the ADE20K devkit's, sliding windows, UperNet, the ade20k command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import result_rows
from PIL import Image

from mae_transfer.models.vit import create_vit
from mae_transfer.segmentation.metrics import SegmentationMeter
from mae_transfer.segmentation.model import build_upernet, slide_inference


def small_upernet(num_classes: int, img_size: int, **kw):
    """UperNet on a micro ViT in mmsegmentation's MAE form (class token, bias table, layer scale)."""
    vit = create_vit(
        "vit_micro_patch8",
        img_size=img_size,
        num_classes=0,
        global_pool="",
        use_rel_pos=True,
        rel_pos_type="table",
        layer_scale=1.0,
    )
    with torch.no_grad():  # tables away from their zero init, so that they matter
        for blk in vit.blocks:
            blk.attn.relative_position_bias_table.normal_(std=0.3)
    return build_upernet(vit, num_classes, tap_blocks=(0, 1, 2, 3), channels=16, aux_channels=8, **kw)


def test_metrics_reproduce_the_ade20k_devkit_on_perturbed_predictions(shared):
    root = shared / "data" / "ade20k_sample"
    ref = json.loads((root / "reference_metrics.json").read_text())
    meter = SegmentationMeter(150)
    for path in sorted((root / "annotations" / "validation").glob("*.png")):
        label = torch.from_numpy(np.asarray(Image.open(path)).astype(np.int64))
        pred = torch.from_numpy(np.asarray(Image.open(root / "predictions_perturbed" / path.name)).astype(np.int64))
        # Devkit indices 1..150 are our 0..149; label 0 is ignored; a predicted 0 ("unlabelled") is
        # outside our classes (-1): wrong on a labelled pixel and in no class's prediction area.
        meter.update(pred - 1, torch.where(label == 0, 255, label - 1))
    r = meter.compute()
    assert r["aAcc"] == pytest.approx(ref["pixel_accuracy"], abs=1e-6)
    assert r["mIoU"] == pytest.approx(ref["mean_iou"], abs=1e-6)
    assert r["num_classes_with_union"] == ref["num_classes_with_union"]
    for key, value in ref["per_class_iou"].items():
        assert r["per_class_iou"][int(key) - 1] == pytest.approx(value, abs=1e-6), key
    defined = {i for i, v in enumerate(r["per_class_iou"]) if not np.isnan(v)}
    assert defined == {int(k) - 1 for k in ref["per_class_iou"]}


def test_metrics_accumulate_over_the_dataset_not_per_image():
    m = SegmentationMeter(2)
    m.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 0]))  # image 1: 4/4 of class 0
    m.update(torch.tensor([1, 1]), torch.tensor([0, 1]))  # image 2: 1 wrong pixel of class 0
    r = m.compute(["a", "b"])
    # class 0: I = 4, U = 5 + 4 - 4 = 5 -> 0.8; class 1: I = 1, U = 1 + 2 - 1 = 2 -> 0.5
    assert r["per_class"]["a"]["IoU"] == pytest.approx(0.8) and r["per_class"]["b"]["IoU"] == pytest.approx(0.5)
    assert r["mIoU"] == pytest.approx(0.65) and r["aAcc"] == pytest.approx(5 / 6)
    assert r["mAcc"] == pytest.approx((4 / 5 + 1) / 2)
    other = SegmentationMeter(2)
    other.merge(m)
    assert torch.equal(other.confusion, m.confusion)


def test_sliding_window_equals_whole_image_when_one_window_covers_it_and_handles_small_and_large_images():
    torch.manual_seed(0)
    model = small_upernet(5, 64).eval()
    with torch.no_grad():
        for h, w in ((64, 64), (40, 57)):  # exactly one window, and an image smaller than the window
            x = torch.randn(1, 3, h, w)
            whole = model(x)
            slid = slide_inference(model, x, 5, crop=64, stride=43)
            assert slid.shape == (1, 5, h, w)
            assert torch.equal(whole, slid)
        x = torch.randn(2, 3, 100, 150)
        slid = slide_inference(model, x, 5, crop=64, stride=43)
        assert slid.shape == (2, 5, 100, 150) and torch.isfinite(slid).all()
        assert torch.isfinite(model(x)).all()  # a grid beyond the 8x8 table: the table is resized
        # Each output pixel is the mean of the windows that cover it: the first window alone covers (0, 0).
        torch.testing.assert_close(slid[:, :, :10, :10], model(x[:, :, :64, :64])[:, :, :10, :10])


def test_upernet_levels_names_and_the_auxiliary_head():
    from mae_transfer.segmentation.config import build_config
    from mae_transfer.segmentation.task import build_segmenter

    with torch.device("meta"):
        model = build_segmenter(build_config())
    assert model.tap_blocks == (3, 5, 7, 11)  # BEiT/MAE: blocks 4, 6, 8, 12
    assert [len(model.decode_head.psp_modules), model.decode_head.pool_scales] == [4, (1, 2, 3, 6)]
    assert model.decode_head.conv_seg.out_channels == 150 and model.auxiliary_head.conv_seg.out_channels == 150
    sd = model.state_dict()
    # mmsegmentation's MAE backbone: a bias table of (2 x 32 - 1)^2 + 3 entries per head, layer scale.
    assert sd["backbone.blocks.0.attn.relative_position_bias_table"].shape == (63 * 63 + 3, 12)
    assert (
        sd["backbone.blocks.11.gamma_2"].shape == (768,) and "backbone.pos_embed" in sd and "backbone.cls_token" in sd
    )
    assert {
        "neck.upsample_4x.1.running_var",
        "decode_head.psp_modules.3.1.bn.weight",
        "decode_head.fpn_bottleneck.conv.weight",
        "auxiliary_head.convs.0.conv.weight",
    } <= set(sd)
    assert not any(k.startswith(("backbone.norm", "backbone.fc_norm", "backbone.head")) for k in sd)
    torch.manual_seed(0)
    small = small_upernet(4, 32)
    small.train()
    logits, aux = small(torch.randn(2, 3, 32, 32))
    assert logits.shape == aux.shape == (2, 4, 32, 32)
    small.eval()
    assert small(torch.randn(1, 3, 30, 45)).shape == (1, 4, 30, 45)  # padded to the stride, cut back


# ------------------------------------------------------------------------------- the command

SMALL = [
    "--model",
    "vit_micro_patch8",
    "--img-size",
    "32",
    "model.tap_blocks=[0,1,2,3]",
    "model.channels=16",
    "model.aux_channels=8",
    "data.scale=[64,32]",
    "test.stride=21",
    "train.batch_size=8",
    "train.effective_batch_size=8",
    "train.num_workers=0",
    "train.progress=false",
    "train.log_every=2",
    "optim.warmup_steps=2",
]


def test_ade20k_command_trains_evaluates_and_reevaluates_the_same_numbers(tmp_path, cache, capsys):
    from mae_transfer.cli import main

    out = tmp_path / "seg"
    assert main(["ade20k", "--output", str(out), "--epochs", "1", "--visualize", "2", *SMALL]) == 0
    assert "mIoU" in capsys.readouterr().out
    r = result_rows(out)
    assert set(r) == {"mIoU", "mAcc", "aAcc"} and all(0 <= v <= 100 for v in r.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_class"]) == 150 and "wall" in metrics["per_class"]
    assert len(list((out / "visualize").glob("*.png"))) == 2
    again = tmp_path / "again"
    assert (
        main(
            [
                "ade20k",
                "--eval-only",
                "--weights",
                str(out / "segmenter.pth"),
                "--output",
                str(again),
                "train.num_workers=0",
            ]
        )
        == 0
    )
    assert result_rows(again) == pytest.approx(r)
    tta = tmp_path / "tta"
    assert (
        main(
            [
                "ade20k",
                "--eval-only",
                "--weights",
                str(out / "segmenter.pth"),
                "--output",
                str(tta),
                "--flip",
                "--multi-scale",
                "train.num_workers=0",
            ]
        )
        == 0
    )
    protocols = {json.loads(line)["protocol"] for line in (tta / "results.jsonl").read_text().splitlines()}
    assert protocols == {"toy_ms+flip"} and set(result_rows(tta)) == {"mIoU", "mAcc", "aAcc"}


def test_segmentation_can_take_the_simple_pyramid_of_detection(tmp_path, cache, capsys):
    # model.pyramid=simple: ViTDet's pyramid from the last block instead of the four taps; the run
    # trains, evaluates, saves and evaluates again from its file, and layer decay leaves the neck at
    # full lr.
    from mae_transfer.cli import main
    from mae_transfer.engine.trainer import OptimConfig
    from mae_transfer.segmentation.config import build_config
    from mae_transfer.segmentation.task import SegmentationTask, build_segmenter

    out = tmp_path / "simple"
    assert (
        main(
            [
                "ade20k",
                "--output",
                str(out),
                "--epochs",
                "1",
                *SMALL,
                "model.pyramid=simple",
                "model.pyramid_channels=24",
            ]
        )
        == 0
    )
    r = result_rows(out)
    assert set(r) == {"mIoU", "mAcc", "aAcc"}
    again = tmp_path / "again"
    assert (
        main(
            [
                "ade20k",
                "--eval-only",
                "--weights",
                str(out / "segmenter.pth"),
                "--output",
                str(again),
                "train.num_workers=0",
            ]
        )
        == 0
    )
    assert result_rows(again) == pytest.approx(r)

    cfg = build_config(
        "toy",
        {
            "model": {"name": "vit_micro_patch8", "img_size": 32, "pyramid": "simple", "pyramid_channels": 24},
            "test": {"stride": 21},
        },
    )
    model = build_segmenter(cfg)
    levels = model.features(torch.zeros(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in levels] == [(24, 16, 16), (24, 8, 8), (24, 4, 4), (24, 2, 2)]
    groups = SegmentationTask.param_groups(None, model, OptimConfig(weight_decay=0.05, layer_decay=0.5))
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["neck.simfp_2.0.weight"] == 1.0 and scale["backbone.blocks.0.attn.qkv.weight"] == 0.5**4


def test_ade20k_errors_are_one_clear_line(tmp_path, cache, capsys):
    from mae_transfer.cli import main

    assert main(["ade20k", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["ade20k", "--eval-only", "--output", str(tmp_path / "x")]) == 2
    assert "--eval-only needs --weights" in capsys.readouterr().err
    assert main(["ade20k", "--img-size", "32", "--output", str(tmp_path / "x")]) == 2
    assert "test.stride must be in 1..model.img_size (32)" in capsys.readouterr().err
    assert (
        main(
            [
                "ade20k",
                "--model",
                "vit_nano_patch8",
                "--img-size",
                "32",
                "test.stride=21",
                "--output",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "4 tap blocks in 0..1" in capsys.readouterr().err


def test_tiny_upernet_overfits_a_handful_of_toy_images(tmp_path):
    """Eight toy scenes: 32 steps make the loss fall and mIoU on those images rise far above the
    untrained model's (loss ratio 0.41, mIoU 0.001 -> 0.51 on this CPU)."""
    from mae_transfer.data.toy import write_ade20k
    from mae_transfer.engine.distributed import DistInfo
    from mae_transfer.engine.trainer import EvalContext, Trainer
    from mae_transfer.segmentation.config import build_config
    from mae_transfer.segmentation.task import SegmentationTask

    root = write_ade20k(tmp_path / "ade", train_images=8, val_images=3, image_size=64)
    cfg = build_config(
        "toy",
        {
            "data": {"path": str(root), "val_split": "training", "ratio_range": [1.0, 1.0], "photometric": False},
            "train": {
                "epochs": 32,
                "batch_size": 8,
                "effective_batch_size": 8,
                "num_workers": 0,
                "progress": False,
                "log_every": 10,
            },
            "optim": {"lr": 3e-3, "warmup_steps": 10},
            "visualize": 0,
        },
    )
    task = SegmentationTask(cfg)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    untrained = task.evaluate(task.build_model().eval(), EvalContext(dist.device, "fp32", dist, 0, None))
    trainer = Trainer(task, cfg.train, cfg.optim, tmp_path / "run", dist, config=cfg)
    trainer.fit()
    losses = [float(r["loss"]) for r in map(json.loads, (tmp_path / "run" / "train.jsonl").read_text().splitlines())]
    assert losses[-1] < 0.5 * losses[0]
    trained = task.last_eval
    assert trained["mIoU"] > untrained["mIoU"] + 0.3, (untrained["mIoU"], trained["mIoU"])


def test_official_mae_encoder_loads_into_upernet_with_only_tables_and_gammas_missing(shared):
    """As mmsegmentation initialises them: bias tables at zero (MAEAttention), gammas at 1.0
    (init_values), the position grid resized once (bicubic) to the crop."""
    from mae_transfer.checkpoint import load_backbone
    from mae_transfer.models.vit import VisionTransformer

    ref = torch.load(shared / "reference" / "mae_official" / "mae_reference.pt", weights_only=False)["norm_pix_True"]
    vit = VisionTransformer(
        img_size=128,
        patch_size=8,
        embed_dim=96,
        depth=3,
        num_heads=4,
        num_classes=0,
        global_pool="",
        use_rel_pos=True,
        rel_pos_type="table",
        layer_scale=1.0,
    )
    model = build_upernet(vit, 150, tap_blocks=[0, 1, 2, 2], channels=32, aux_channels=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_backbone(
        model.backbone, {"model": ref["state_dict"]}, expected_missing="dense", expected_unexpected="dense"
    )
    assert sorted({k.rsplit(".", 1)[-1] for k in report.missing}) == [
        "gamma_1",
        "gamma_2",
        "relative_position_bias_table",
    ]
    assert {"mask_token", "decoder_pred.weight"} <= set(report.unexpected)
    assert any("pos_embed" in note and "bicubic" in note for note in report.adapted)
    for k, v in model.state_dict().items():
        bare = k.removeprefix("backbone.")
        if not k.startswith("backbone."):
            assert torch.equal(v, before[k]), k  # neck, UperNet and auxiliary head keep their init
        elif "relative_position_bias_table" in bare:
            assert v.abs().sum() == 0, k  # turned on for transfer, zero-initialised (MAE A.4, mmseg MAEAttention)
        elif "gamma" in bare:
            assert torch.equal(v, torch.ones_like(v)), k
        elif bare != "pos_embed":
            torch.testing.assert_close(v, ref["state_dict"][bare], msg=k)
    assert torch.equal(model.backbone.cls_token, ref["state_dict"]["cls_token"])


def test_loss_is_averaged_over_all_pixels_and_optimizer_groups_follow_mmseg():
    """mmsegmentation's CrossEntropyLoss (avg_non_ignore=False) divides by every pixel, ignored ones
    too; its layer-decay constructor decays pos_embed and cls_token (its exemption never matches)."""
    import torch.nn.functional as F

    from mae_transfer.engine.trainer import OptimConfig
    from mae_transfer.segmentation.config import build_config
    from mae_transfer.segmentation.task import SegmentationTask, build_segmenter, segmentation_loss

    logits = torch.randn(2, 5, 4, 4)
    label = torch.randint(0, 5, (2, 4, 4))
    label[0, :2] = 255
    per_pixel = F.cross_entropy(logits, label, ignore_index=255, reduction="none")
    torch.testing.assert_close(segmentation_loss(logits, label), per_pixel.sum() / 32)
    assert segmentation_loss(logits, torch.full_like(label, 255)) == 0

    cfg = build_config("toy")
    model = build_segmenter(cfg)
    groups = SegmentationTask.param_groups(None, model, OptimConfig(weight_decay=0.05, layer_decay=0.65))
    by_name = {n: g for g in groups for n in g["param_names"]}
    depth = 4
    assert (
        by_name["backbone.pos_embed"]["weight_decay"] == 0.05 and by_name["backbone.cls_token"]["weight_decay"] == 0.05
    )
    assert by_name["backbone.pos_embed"]["lr_scale"] == pytest.approx(0.65 ** (depth + 1))
    assert by_name["backbone.blocks.0.attn.relative_position_bias_table"]["weight_decay"] == 0.05
    assert (
        by_name["backbone.blocks.0.gamma_1"]["weight_decay"] == 0.0
        and by_name["backbone.blocks.0.norm1.bias"]["weight_decay"] == 0.0
    )
    assert by_name["backbone.blocks.3.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65)
    assert (
        by_name["decode_head.conv_seg.weight"]["lr_scale"] == 1.0
        and by_name["neck.upsample_4x.0.weight"]["lr_scale"] == 1.0
    )
