"""Detection training pieces: large-scale jitter, layer decay groups, backbone loading, the command."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import result_rows
from mae_transfer.cli import main
from mae_transfer.data.stats import IMAGENET_MEAN
from mae_transfer.detection.transforms import LargeScaleJitter, SeededTransformDataset, collate_detection


def one_object(h=40, w=60, box=(10, 5, 30, 25)):
    image = torch.rand(3, h, w)
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    masks[0, y1:y2, x1:x2] = 1
    return image, {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([3]), "masks": masks,
                   "iscrowd": torch.tensor([0]), "area": torch.tensor([400.0])}


def mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_lsj_without_scaling_pads_bottom_right_with_the_mean_and_flips_boxes_with_masks():
    image, target = one_object()
    lsj = LargeScaleJitter(64, scale_range=(1.0, 1.0), flip_prob=1.0)  # scale 1: the 60 px side fits 64
    out, t = lsj(image, target)
    assert out.shape == (3, 64, 64)
    # Scaled by 64/60, the 40 rows become 42 or 43; below them the mean colour pads to 64 rows.
    assert torch.allclose(out[:, 43:, :], torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 21, 64))
    assert not torch.allclose(out[:, 41, :], torch.tensor(IMAGENET_MEAN).view(3, 1).expand(3, 64))
    assert set(t) == {"boxes", "labels", "masks"} and t["labels"].tolist() == [3]
    s = 64 / 60
    x1, y1, x2, y2 = 10 * s, 5 * s, 30 * s, 25 * s
    torch.testing.assert_close(t["boxes"][0], torch.tensor([64 - x2, y1, 64 - x1, y2]), atol=0.6, rtol=0)
    # The mask moved with the box (to the pixel).
    assert all(abs(a - b) <= 1.0 for a, b in zip(mask_box(t["masks"][0]), t["boxes"][0].tolist()))
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (1, 64, 64)


def test_lsj_crops_large_scales_and_drops_instances_that_leave_the_crop():
    torch.manual_seed(0)
    image, target = one_object(h=64, w=64, box=(2, 2, 10, 10))
    lsj = LargeScaleJitter(64, scale_range=(2.0, 2.0), flip_prob=0.0)
    kept = dropped = 0
    for _ in range(40):
        out, t = lsj(image, target)
        assert out.shape == (3, 64, 64)
        assert t["boxes"].shape[0] == t["masks"].shape[0] == t["labels"].shape[0]
        if len(t["boxes"]):
            kept += 1
            b = t["boxes"][0]
            assert (b >= 0).all() and (b <= 64).all() and b[2] > b[0] and b[3] > b[1]
        else:
            dropped += 1
    # The 16x16 object of the 128 px image is in the random 64 px crop about a third of the time.
    assert kept > 0 and dropped > 0


def test_seeded_wrapper_repeats_per_sample_and_epoch_and_drops_crowds():
    from mae_transfer.detection.coco import drop_crowd

    class Two(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            image, t = one_object()
            t["iscrowd"] = torch.tensor([1 if i == 3 else 0])
            return image * 0 + i / 4, t

    ds = SeededTransformDataset(Two(), LargeScaleJitter(48), seed=5, prepare=drop_crowd)
    a, b = ds[1], ds[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    ds.set_epoch(1)
    c = ds[1]
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1]["boxes"], c[1]["boxes"]))
    assert len(ds[3][1]["boxes"]) == 0  # the crowd region is not a training target
    images, targets = collate_detection([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2 and isinstance(targets, list)


def test_layer_decay_groups_cover_the_vit_inside_mask_rcnn():
    from mae_transfer.detection.config import build_config
    from mae_transfer.detection.task import VIT_PREFIX, build_detector
    from mae_transfer.engine.optim import param_groups

    cfg = build_config("toy", {"model": {"name": "vit_nano_patch8", "img_size": 64}})
    model = build_detector(cfg, num_classes=5)
    groups = param_groups(model, 0.1, 0.7, no_weight_decay=("pos_embed",), vit_prefix=VIT_PREFIX)
    by_name = {n: g for g in groups for n in g["param_names"]}
    depth = 2
    assert by_name[VIT_PREFIX + "patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.7 ** (depth + 1))
    assert by_name[VIT_PREFIX + "blocks.1.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.7)
    assert by_name[VIT_PREFIX + "pos_embed"]["weight_decay"] == 0.0
    assert by_name[VIT_PREFIX + "blocks.0.attn.rel_pos_h"]["weight_decay"] == 0.1  # 2-D table: decayed, as in ViTDet
    head = [n for n in by_name if n.startswith("roi_heads.box_head")][0]
    assert by_name[head]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


def test_official_mae_encoder_loads_into_mask_rcnn_with_only_new_parts_missing(shared):
    from mae_transfer.checkpoint import load_backbone
    from mae_transfer.detection.model import PyramidBackbone, build_mask_rcnn
    from mae_transfer.models.pyramid import SimpleFeaturePyramid
    from mae_transfer.models.vit import VisionTransformer

    ref = torch.load(shared / "reference" / "mae_official" / "mae_reference.pt", weights_only=False)["norm_pix_True"]
    vit = VisionTransformer(img_size=128, patch_size=8, embed_dim=96, depth=3, num_heads=4, num_classes=0, global_pool="",
                            class_token=False, window_size=8, global_blocks=(2,), use_rel_pos=True)
    model = build_mask_rcnn(PyramidBackbone(SimpleFeaturePyramid(vit, out_channels=32)), num_classes=81, img_size=128,
                            head_channels=32, fc_dim=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_backbone(model.backbone.body.vit, {"model": ref["state_dict"]}, expected_missing="dense", expected_unexpected="dense")
    assert sorted({k.rsplit(".", 1)[-1] for k in report.missing}) == ["rel_pos_h", "rel_pos_w"]
    after = model.state_dict()
    prefix = "backbone.body.vit."
    for k, v in after.items():
        bare = k.removeprefix(prefix)
        if not k.startswith(prefix):
            assert torch.equal(v, before[k]), k  # pyramid and heads: untouched by the backbone load
        elif "rel_pos" in bare:
            assert v.abs().sum() == 0, k  # new, zero-initialised (MAE A.3, ViTDet)
        elif bare != "pos_embed":  # resized from the 8x8 to the 16x16 grid
            torch.testing.assert_close(v, ref["state_dict"][bare], msg=k)


# ------------------------------------------------------------------------------- the command

# A nano ViT (2 blocks x 64) with 16-channel heads on the 64 px toy COCO scenes.
SMALL = ["--model", "vit_nano_patch8", "--img-size", "64", "model.window_size=4", "model.channels=16", "model.fc_dim=32",
         "train.batch_size=8", "train.effective_batch_size=8", "train.num_workers=0", "train.progress=false",
         "train.log_every=2", "optim.warmup_steps=2", "eval_batch_size=8"]


def test_coco_command_trains_evaluates_saves_and_reevaluates_the_same_numbers(tmp_path, cache, capsys):
    out = tmp_path / "det"
    assert main(["coco", "--output", str(out), "--epochs", "2", "--visualize", "2", *SMALL]) == 0
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
    assert main(["coco", "--output", str(out), "--epochs", "2", *SMALL]) == 0
    assert (out / "checkpoint-last.pth").stat().st_mtime_ns == ckpt_before
    assert result_rows(out) == pytest.approx(r, nan_ok=True)

    again = tmp_path / "again"
    assert main(["coco", "--eval-only", "--weights", str(out / "detector.pth"), "--output", str(again),
                 "train.num_workers=0", "eval_batch_size=8"]) == 0
    r2 = result_rows(again)
    for k, v in r.items():
        assert v == pytest.approx(r2[k], abs=1e-9, nan_ok=True), k


def test_coco_command_starts_from_a_pretrained_encoder(tmp_path, cache):
    pre = tmp_path / "pre"
    assert main(["pretrain", "--output", str(pre), "--epochs", "1", "model.name=mae_vit_nano_patch8", "model.img_size=32",
                 "data.toy_images_per_class=8", "train.batch_size=16", "train.effective_batch_size=16",
                 "train.num_workers=0", "train.progress=false", "vis.every_epochs=0"]) == 0
    out = tmp_path / "det"
    args = [a for a in SMALL if a not in ("--model", "vit_nano_patch8")]  # the size comes from the checkpoint
    assert main(["coco", "--backbone", str(pre / "encoder.pth"), "--output", str(out), "--max-steps", "1", *args]) == 0
    enc = torch.load(pre / "encoder.pth", weights_only=False)["model"]
    det = torch.load(out / "checkpoint-last.pth", weights_only=False)
    assert det["signature"]["model"] == "vit_nano_patch8"
    # One small step moves the weights a little: the detector's ViT started from the encoder.
    w0, w1 = enc["blocks.0.attn.qkv.weight"], det["model"]["backbone.body.vit.blocks.0.attn.qkv.weight"]
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
    """Eight real coco_tiny train images (1-3 objects each): 100 steps lift bbox AP on those images
    from 0 (untrained) to well above it; the same command on the whole split is in the README."""
    import collections
    import contextlib
    import os

    from mae_transfer.detection.config import build_config
    from mae_transfer.detection.task import DetectionTask
    from mae_transfer.engine.distributed import DistInfo
    from mae_transfer.engine.trainer import Trainer

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

    cfg = build_config("toy", {
        "data": {"path": str(root), "val_split": "train2017", "scale_range": [0.8, 1.2]},
        "model": {"img_size": 128},
        "train": {"epochs": 50, "batch_size": 4, "effective_batch_size": 4, "num_workers": 0, "progress": False},
        "optim": {"lr": 5e-4, "warmup_steps": 20}, "eval_batch_size": 8, "visualize": 0,
    })
    task = DetectionTask(cfg)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    untrained = task.run_eval(task.build_model(), dist.device, contextlib.nullcontext, dist, 0, None)
    trainer = Trainer(task, cfg.train, cfg.optim, tmp_path / "run", dist, config=cfg)
    trainer.fit()
    assert trainer.step == 100
    trained = task.last_eval
    assert untrained["bbox"]["AP"] < 1.0
    assert trained["bbox"]["AP"] > 5.0, trained["bbox"]
    assert trained["segm"]["AP"] > 2.0, trained["segm"]
