"""Detection training pieces: large-scale jitter, layer decay groups, backbone loading, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import result_rows

from mae_transfer.cli import main
from mae_transfer.detection.transforms import (
    LargeScaleJitter,
    SeededTransformDataset,
    collate_detection,
    resize_for_test,
    resize_uint8,
    shortest_edge_size,
)


def one_object(h=40, w=60, box=(10, 5, 30, 25)):
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    x1, y1, x2, y2 = box
    poly = [np.array([x1, y1, x2, y1, x2, y2, x1, y2], dtype=np.float64)]
    return image, {
        "boxes": torch.tensor([box], dtype=torch.float32),
        "labels": torch.tensor([3]),
        "segments": [poly],
        "iscrowd": torch.tensor([0]),
        "area": torch.tensor([400.0]),
    }


def test_lsj_without_scaling_keeps_the_size_fits_the_box_and_flips_polygons():
    image, target = one_object()
    lsj = LargeScaleJitter(64, scale_range=(1.0, 1.0), flip_prob=1.0)  # scale 1: the 60 px side becomes 64
    out, t = lsj(image, target)
    # No padding in the data (the detector pads): 40 x 60 scaled by 64/60 is 43 x 64 (42.67 rounded).
    assert out.shape == (3, 43, 64) and out.dtype == torch.uint8
    assert set(t) == {"boxes", "labels", "segments"} and t["labels"].tolist() == [3]
    sx, sy = 64 / 60, 43 / 40
    x1, y1, x2, y2 = 10 * sx, 5 * sy, 30 * sx, 25 * sy
    # The box is recomputed from the flipped, scaled polygon: exact up to float32.
    torch.testing.assert_close(t["boxes"][0], torch.tensor([64 - x2, y1, 64 - x1, y2]))
    assert torch.equal(out, resize_uint8(image, (43, 64)).flip(-1))


def test_lsj_crops_large_scales_and_drops_instances_that_leave_the_crop():
    torch.manual_seed(0)
    image, target = one_object(h=64, w=64, box=(2, 2, 10, 10))
    lsj = LargeScaleJitter(64, scale_range=(2.0, 2.0), flip_prob=0.0)
    kept = dropped = 0
    for _ in range(40):
        out, t = lsj(image, target)
        assert out.shape == (3, 64, 64)
        assert t["boxes"].shape[0] == len(t["segments"]) == t["labels"].shape[0]
        if len(t["boxes"]):
            kept += 1
            b = t["boxes"][0]
            assert (b >= 0).all() and (b <= 64).all() and b[2] > b[0] and b[3] > b[1]
        else:
            dropped += 1
    # The 16x16 object at the corner of the 128 px image is in the 64 px crop when the offset is small.
    assert kept > 0 and dropped > 0


def test_test_resize_is_detectron2s_size_rule_and_pil_bilinear():
    assert shortest_edge_size(425, 640, 320) == (213, 320)  # rounded half up (212.5), not floored
    assert shortest_edge_size(640, 425, 320) == (320, 213)
    assert shortest_edge_size(240, 320, 320) == (240, 320)
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    out = resize_for_test(image, 64)
    from PIL import Image

    ref = np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((64, 43), Image.BILINEAR))
    assert out.shape == (3, 43, 64) and np.array_equal(out.permute(1, 2, 0).numpy(), ref)


def test_seeded_wrapper_repeats_per_sample_and_epoch_and_drops_crowds():
    from mae_transfer.detection.coco import drop_crowd

    class Two(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            image, t = one_object()
            t["iscrowd"] = torch.tensor([1 if i == 3 else 0])
            return torch.full_like(image, 10 * i), t

    ds = SeededTransformDataset(Two(), LargeScaleJitter(48), seed=5, prepare=drop_crowd)
    a, b = ds[1], ds[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    ds.set_epoch(1)
    c = ds[1]
    assert not (a[0].shape == c[0].shape and torch.equal(a[0], c[0]) and torch.equal(a[1]["boxes"], c[1]["boxes"]))
    assert len(ds[3][1]["boxes"]) == 0  # the crowd region is not a training target
    images, targets = collate_detection([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2 and isinstance(targets, list)


def test_optimizer_groups_follow_detectron2_vitdet():
    """Layer decay over the ViT blocks; weight decay on everything but torch's norms and pos_embed
    (detectron2 decays biases, the relative position tables and the heads' channel LayerNorms)."""
    from mae_transfer.detection.config import build_config
    from mae_transfer.detection.task import build_detector, detection_param_groups
    from mae_transfer.engine.trainer import OptimConfig

    cfg = build_config("toy", {"model": {"name": "vit_nano_patch8", "img_size": 64}})
    model = build_detector(cfg, num_classes=5)
    groups = detection_param_groups(model, OptimConfig(weight_decay=0.1, layer_decay=0.7))
    by_name = {n: g for g in groups for n in g["param_names"]}
    depth, v = 2, "backbone.net."
    assert by_name[v + "patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.7 ** (depth + 1))
    assert by_name[v + "pos_embed"]["lr_scale"] == pytest.approx(0.7 ** (depth + 1))
    assert by_name[v + "blocks.1.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.7)
    assert by_name[v + "pos_embed"]["weight_decay"] == 0.0
    assert (
        by_name[v + "blocks.0.norm1.weight"]["weight_decay"] == 0.0
        and by_name[v + "blocks.0.norm1.bias"]["weight_decay"] == 0.0
    )
    assert by_name[v + "blocks.0.attn.rel_pos_h"]["weight_decay"] == 0.1
    assert by_name[v + "blocks.0.attn.qkv.bias"]["weight_decay"] == 0.1
    x1 = model.backbone.level_names[2]  # the stride-8 level of this patch-8 ViT
    assert by_name[f"backbone.{x1}.0.norm.weight"]["weight_decay"] == 0.1  # channel LayerNorm: decayed
    assert by_name["roi_heads.box_head.conv1.norm.bias"]["weight_decay"] == 0.1
    assert by_name["roi_heads.box_head.fc1.bias"]["weight_decay"] == 0.1
    assert (
        by_name[f"backbone.{x1}.0.weight"]["lr_scale"] == 1.0
        and by_name["roi_heads.mask_head.predictor.weight"]["lr_scale"] == 1.0
    )
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


def test_official_mae_encoder_loads_into_mask_rcnn_with_only_new_parts_missing(shared):
    from mae_transfer.checkpoint import load_backbone
    from mae_transfer.detection.model import build_mask_rcnn, build_pyramid, build_vit

    ref = torch.load(shared / "reference" / "mae_official" / "mae_reference.pt", weights_only=False)["norm_pix_True"]
    # The reference MAE: 96 wide, 3 blocks of 4 heads, patch 8 on 64 px (an 8x8 grid + class row).
    vit = build_vit(
        None,
        128,
        window_size=8,
        global_blocks=(2,),
        embed_dim=96,
        depth=3,
        num_heads=4,
        patch_size=8,
        pretrain_img_size=64,
    )
    model = build_mask_rcnn(build_pyramid(vit, channels=32), num_classes=80, img_size=128, head_channels=32, fc_dim=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_backbone(
        model.vit, {"model": ref["state_dict"]}, expected_missing="dense", expected_unexpected="dense"
    )
    assert sorted({k.rsplit(".", 1)[-1] for k in report.missing}) == ["rel_pos_h", "rel_pos_w"]
    assert not report.adapted  # the pretraining grid and class row are kept as they are (ViTDet)
    after = model.state_dict()
    prefix = "backbone.net."
    for k, v in after.items():
        bare = k.removeprefix(prefix)
        if not k.startswith(prefix):
            assert torch.equal(v, before[k]), k  # pyramid and heads: untouched by the backbone load
        elif "rel_pos" in bare:
            assert v.abs().sum() == 0, k  # new, zero-initialised (MAE A.3, ViTDet)
        else:
            torch.testing.assert_close(v, ref["state_dict"][bare], msg=k)


# ------------------------------------------------------------------------------- the command

# A nano ViT (2 blocks x 64) with 16-channel heads on the 64 px toy COCO scenes.
SMALL = [
    "--model",
    "vit_nano_patch8",
    "--img-size",
    "64",
    "model.window_size=4",
    "model.channels=16",
    "model.fc_dim=32",
    "train.batch_size=8",
    "train.effective_batch_size=8",
    "train.num_workers=0",
    "train.progress=false",
    "train.log_every=2",
    "optim.warmup_steps=2",
    "eval_batch_size=8",
]


def test_coco_command_trains_evaluates_saves_and_reevaluates_the_same_numbers(tmp_path, cache, capsys):
    out = tmp_path / "det"
    assert main(["coco", "--output", str(out), "--epochs", "1", "--visualize", "2", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "bbox" in printed and "segm" in printed
    r = result_rows(out)
    assert {"bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_APs"} <= set(r)
    preds = json.loads((out / "predictions_val2017.json").read_text())
    assert preds and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(preds[0])
    assert len(list((out / "visualize").glob("*.png"))) == 2
    train_rows = (out / "train.csv").read_text().splitlines()
    assert "loss_mask" in train_rows[0] and len(train_rows) > 2

    # The same command again: the run is complete, so it only re-evaluates, to the same numbers.
    ckpt_before = (out / "checkpoint-last.pth").stat().st_mtime_ns
    assert main(["coco", "--output", str(out), "--epochs", "1", *SMALL]) == 0
    assert (out / "checkpoint-last.pth").stat().st_mtime_ns == ckpt_before
    assert result_rows(out) == pytest.approx(r, nan_ok=True)

    # Training is deterministic on a machine, with or without DataLoader worker processes (the
    # demo's COCO comparison rests on it): a fresh run gives the same losses and the same AP.
    fresh = tmp_path / "fresh"
    assert main(["coco", "--output", str(fresh), "--epochs", "1", *SMALL, "train.num_workers=1"]) == 0

    def losses(lines):  # the loss and lr columns (the others are timings)
        head = lines[0].split(",")
        keep = [i for i, h in enumerate(head) if "loss" in h or h in ("step", "lr")]
        return [[row.split(",")[i] for i in keep] for row in lines[1:]]

    assert len(losses(train_rows)[0]) >= 6 and losses((fresh / "train.csv").read_text().splitlines()) == losses(
        train_rows
    )
    assert result_rows(fresh) == pytest.approx(r, nan_ok=True)

    again = tmp_path / "again"
    assert (
        main(
            [
                "coco",
                "--eval-only",
                "--weights",
                str(out / "detector.pth"),
                "--output",
                str(again),
                "train.num_workers=0",
                "eval_batch_size=8",
            ]
        )
        == 0
    )
    r2 = result_rows(again)
    for k, v in r.items():
        assert v == pytest.approx(r2[k], abs=1e-9, nan_ok=True), k
    try:  # the same evaluation with faster-coco-eval (eval_backend=faster) gives the same numbers
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return
    fast = tmp_path / "fast"
    assert (
        main(
            [
                "coco",
                "--eval-only",
                "--weights",
                str(out / "detector.pth"),
                "--output",
                str(fast),
                "train.num_workers=0",
                "eval_batch_size=8",
                "eval_backend=faster",
            ]
        )
        == 0
    )
    r3 = result_rows(fast)
    for k, v in r.items():
        assert v == pytest.approx(r3[k], abs=1e-4, nan_ok=True), k


def test_coco_command_starts_from_a_pretrained_encoder(tmp_path, cache):
    pre = tmp_path / "pre"
    assert (
        main(
            [
                "pretrain",
                "--output",
                str(pre),
                "--epochs",
                "1",
                "model.name=mae_vit_nano_patch8",
                "model.img_size=32",
                "data.toy_images_per_class=8",
                "train.batch_size=16",
                "train.effective_batch_size=16",
                "train.num_workers=0",
                "train.progress=false",
                "vis.every_epochs=0",
            ]
        )
        == 0
    )
    out = tmp_path / "det"
    args = [a for a in SMALL if a not in ("--model", "vit_nano_patch8")]  # the size comes from the checkpoint
    assert main(["coco", "--backbone", str(pre / "encoder.pth"), "--output", str(out), "--max-steps", "1", *args]) == 0
    enc = torch.load(pre / "encoder.pth", weights_only=False)["model"]
    det = torch.load(out / "checkpoint-last.pth", weights_only=False)
    assert det["signature"]["model"] == "vit_nano_patch8"
    # One small step moves the weights a little: the detector's ViT started from the encoder.
    w0, w1 = enc["blocks.0.attn.qkv.weight"], det["model"]["backbone.net.blocks.0.attn.qkv.weight"]
    assert (w1 - w0).abs().max() < 0.01 < w0.abs().max()
    assert result_rows(out)["bbox_AP"] >= 0


def test_coco_command_errors_are_one_clear_line(tmp_path, cache, capsys):
    assert main(["coco", "--eval-only", "--output", str(tmp_path / "x")]) == 2
    assert "--eval-only needs --weights" in capsys.readouterr().err
    assert main(["coco", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    backbone = tmp_path / "vit.pth"
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 1)}}, backbone)
    assert main(["coco", "--eval-only", "--weights", str(backbone), "--output", str(tmp_path / "x")]) == 2
    assert "looks like a backbone" in capsys.readouterr().err
    assert main(["coco", "--output", str(tmp_path / "x"), "model.img_size=100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_tiny_mask_rcnn_memorises_real_coco_images(shared, tmp_path):
    """Eight real coco_tiny train images (1-3 objects each) at 96 px: 40 steps lift bbox and mask AP
    on those images from 0 (untrained) to well above it (13.0 / 8.3 on this CPU); the same command
    on the whole split is in the README."""
    import collections
    import os

    from mae_transfer.detection.config import build_config
    from mae_transfer.detection.task import DetectionTask
    from mae_transfer.engine.distributed import DistInfo
    from mae_transfer.engine.trainer import EvalContext, Trainer

    src = shared / "data" / "coco_tiny"
    root = tmp_path / "coco8"
    (root / "annotations").mkdir(parents=True)
    os.symlink(src / "train2017", root / "train2017")
    d = json.loads((src / "annotations" / "instances_train2017.json").read_text())
    count = collections.Counter(a["image_id"] for a in d["annotations"] if not a["iscrowd"])
    keep = [i["id"] for i in sorted(d["images"], key=lambda i: i["id"]) if 1 <= count[i["id"]] <= 3][:8]
    d["images"] = [i for i in d["images"] if i["id"] in keep]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in keep]
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(d))

    cfg = build_config(
        "toy",
        {
            "data": {"path": str(root), "val_split": "train2017", "scale_range": [0.8, 1.2]},
            "model": {"img_size": 96},
            "train": {"epochs": 20, "batch_size": 4, "effective_batch_size": 4, "num_workers": 0, "progress": False},
            # From random init: every layer at the full lr (no layer decay).
            "optim": {"lr": 8e-4, "warmup_steps": 8, "layer_decay": 1.0},
            "eval_batch_size": 8,
            "visualize": 0,
        },
    )
    task = DetectionTask(cfg)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    untrained = task.evaluate(task.build_model().eval(), EvalContext(dist.device, "fp32", dist, 0, None))
    trainer = Trainer(task, cfg.train, cfg.optim, tmp_path / "run", dist, config=cfg)
    # 40 steps from random weights follow one trajectory per thread count (float sums in another
    # order); one thread, as under the test command, where the AP is measured (2 threads: 8.7 / 4.5).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    assert trainer.step == 40
    trained = task.last_eval
    assert untrained["bbox"]["AP"] < 1.0
    assert trained["bbox"]["AP"] > 5.0, trained["bbox"]
    assert trained["segm"]["AP"] > 2.0, trained["segm"]
