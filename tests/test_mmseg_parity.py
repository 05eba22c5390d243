"""The segmenter is mmsegmentation's MAE + UperNet: the same function, checked on mmsegmentation's
own outputs (``../shared/reference/mmseg_upernet``: checkpoint, taps, neck maps, logits, label maps,
IoUMetric), and mmsegmentation checkpoints in and out.

Every check goes through what ``mae-transfer ade20k --eval-only --weights`` runs: the weights
reader that infers the architecture from the file, the config, the builder, the ADE20K folder with
the test resize (OpenCV, as mmcv), sliding-window inference and the metric.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shared_root
from PIL import Image

from mae_transfer.cli import main
from mae_transfer.segmentation.config import build_config
from mae_transfer.segmentation.task import (
    SegmentationTask,
    build_segmenter,
    load_segmenter_weights,
    read_segmenter_weights,
)

REF = shared_root() / "reference" / "mmseg_upernet"
SAMPLE = shared_root() / "data" / "ade20k_sample"
pytestmark = pytest.mark.skipif(
    not (REF / "checkpoint.pth").is_file() or not (SAMPLE / "images").is_dir(),
    reason=f"mmsegmentation reference or ade20k_sample not found under {shared_root()} (set MAE_TRANSFER_SHARED)",
)


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REF / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def segmenter():
    """The reference model and task as ``--eval-only --weights checkpoint.pth --data ade20k_sample`` builds them."""
    state, saved = read_segmenter_weights(REF / "checkpoint.pth")
    cfg = build_config(None, {**saved, "data": {**saved["data"], "path": str(SAMPLE)}, "train": {"num_workers": 0}})
    task = SegmentationTask(cfg, train=False)
    model = build_segmenter(cfg)
    load_segmenter_weights(model, state, REF / "checkpoint.pth")
    return model.eval(), task


def _input(name: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(REF / "input" / f"{name}.png")).copy()).permute(2, 0, 1)


def test_architecture_and_test_settings_are_read_from_the_checkpoint():
    _, saved = read_segmenter_weights(REF / "checkpoint.pth")
    m = saved["model"]
    assert m["name"] is None and (m["embed_dim"], m["depth"], m["num_heads"], m["patch_size"]) == (96, 6, 3, 16)
    assert (m["img_size"], m["channels"], m["aux_channels"], m["aux_convs"]) == (256, 64, 32, 1)
    assert m["rel_pos_type"] == "table" and m["layer_scale"] == 1.0
    assert saved["data"] == {"num_classes": 150, "scale": [1024, 256]} and saved["test"] == {"stride": 170}


def test_taps_neck_and_head_logits_of_the_first_window_match_mmseg(segmenter, reference):
    model, task = segmenter
    assert model.tap_blocks == (1, 2, 3, 5)  # mmseg's relative positions for 6 blocks
    first = reference["first_window"]
    y1, y2, x1, x2 = first["window"]
    x = task.val_set.transform.normalise(_input(first["image"]))[:, y1:y2, x1:x2][None]
    with torch.no_grad():
        taps = model.backbone.forward_intermediates(x, indices=list(model.tap_blocks), output_fmt="NCHW")
        neck = model.neck(taps)
        decode = model.decode_head(neck)
        aux = model.auxiliary_head(neck[2])
    for ours, ref in zip(taps, first["backbone_outs"]):
        assert (ours[0] - ref).abs().max() < 1e-4
    for ours, ref in zip(neck, first["neck_outs"]):
        assert ours.shape[1:] == ref.shape and (ours[0] - ref).abs().max() < 1e-4
    s = int(first["decode_logits_stride"])
    assert (decode[0][:, ::s, ::s] - first["decode_logits"]).abs().max() < 1e-3
    assert (aux[0] - first["aux_logits"]).abs().max() < 1e-3


def test_test_resize_gives_mmsegs_input_bytes(segmenter, reference):
    """The JPEG through the dataset's test transform (OpenCV's uint8 bilinear, as mmcv) is exactly
    the image mmsegmentation normalised (``input/*.png``)."""
    _, task = segmenter
    ds = task.val_set
    for i, img in enumerate(reference["images"]):
        image, target = ds[i]
        assert target["path"].endswith(img["name"] + ".jpg")
        assert list(target["resized_size"]) == list(img["img_shape"]) and list(target["label"].shape) == list(
            img["ori_shape"]
        )
        assert torch.equal(image, ds.transform.normalise(_input(img["name"])))


def test_logits_label_maps_and_metrics_match_mmseg(segmenter, reference):
    model, task = segmenter
    from mae_transfer.segmentation.metrics import SegmentationMeter

    meter = SegmentationMeter(150)
    for i, img in enumerate(reference["images"]):
        image, target = task.val_set[i]
        with torch.no_grad():
            logits = task.logits(model, image, target["label"].shape, _no_autocast)[0]
        grid = logits[:, ::16, ::16]
        assert grid.shape == img["seg_logits_grid"].shape
        assert (grid - img["seg_logits_grid"]).abs().max() < 1e-3, img["name"]
        pred = logits.argmax(0)
        ref_pred = torch.from_numpy(np.asarray(Image.open(REF / "pred" / f"{img['name']}.png")).astype(np.int64))
        differ = torch.nonzero((pred != ref_pred).reshape(-1), as_tuple=True)[0]
        near_ties = set(img["near_ties"]["index"].tolist())
        assert set(differ.tolist()) <= near_ties, img["name"]
        meter.update(pred, target["label"])
    ours = meter.compute()
    ref = json.loads((REF / "metrics.json").read_text())["unrounded"]
    for key in ("aAcc", "mIoU", "mAcc"):
        assert abs(100 * ours[key] - 100 * ref[key]) < 0.01, (key, ours[key], ref[key])


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


def test_the_command_prints_mmsegs_numbers(tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "ade20k",
                "--eval-only",
                "--weights",
                str(REF / "checkpoint.pth"),
                "--data",
                str(SAMPLE),
                "--output",
                str(out),
                "train.num_workers=0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "34.45   40.22   88.95" in printed  # mIoU, mAcc, aAcc as mmsegmentation rounds them
    ours = json.loads((out / "metrics.json").read_text())
    ref = json.loads((REF / "metrics.json").read_text())["unrounded"]
    for key in ("aAcc", "mIoU", "mAcc"):
        assert abs(ours[key] - ref[key]) < 1e-4, key


def test_export_to_mmseg_has_the_reference_layout_and_round_trips(tmp_path):
    out = tmp_path / "mmseg.pth"
    assert main(["export", str(REF / "checkpoint.pth"), "--to", "mmseg", "--output", str(out)]) == 0
    ref = torch.load(REF / "checkpoint.pth", weights_only=True)["state_dict"]
    back = torch.load(out, weights_only=True)
    assert set(back) == {"meta", "state_dict"} and len(back["meta"]["dataset_meta"]["classes"]) == 150
    assert list(back["state_dict"]) == list(ref)  # the same names, in the same order
    for k, v in ref.items():
        assert back["state_dict"][k].dtype == v.dtype and torch.equal(back["state_dict"][k], v), k


def test_our_segmenter_exports_and_reimports_bit_identically(tmp_path):
    from mae_transfer.segmentation.task import save_segmenter

    cfg = build_config(
        None,
        {
            "model": {
                "name": None,
                "embed_dim": 64,
                "depth": 4,
                "num_heads": 2,
                "patch_size": 16,
                "img_size": 128,
                "channels": 32,
                "aux_channels": 16,
            },
            "data": {"num_classes": 9},
            "test": {"stride": 85},
        },
    )
    torch.manual_seed(1)
    model = build_segmenter(cfg)
    with torch.no_grad():  # tables and gammas away from their init, BN statistics too
        for name, p in model.named_parameters():
            if "relative_position" in name or "gamma" in name:
                p.normal_()
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)
    ours = tmp_path / "segmenter.pth"
    save_segmenter(model, cfg, [f"c{i}" for i in range(9)], ours)
    exported = tmp_path / "mmseg.pth"
    assert main(["export", str(ours), "--to", "mmseg", "--output", str(exported)]) == 0
    state, saved = read_segmenter_weights(exported)
    m = saved["model"]
    assert (m["embed_dim"], m["depth"], m["num_heads"], m["img_size"], m["channels"]) == (64, 4, 2, 128, 32)
    again = build_segmenter(build_config(None, saved))
    load_segmenter_weights(again, state, exported)
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_tensors_are_named(tmp_path):
    from mae_transfer.checkpoint import CheckpointError

    ck = torch.load(REF / "checkpoint.pth", weights_only=True)
    ck["state_dict"]["decode_head.conv_extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(ck, bad)
    with pytest.raises(CheckpointError, match="decode_head.conv_extra.weight"):
        read_segmenter_weights(bad)
