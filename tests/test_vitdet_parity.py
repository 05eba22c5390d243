"""The detector is detectron2's ViTDet Mask R-CNN: the same function, checked on detectron2's own
outputs (``../shared/reference/vitdet``: weights, intermediate tensors, detections, COCO AP), and
detectron2 checkpoints in and out.

Every check goes through the code that ``mae-transfer coco --eval-only --weights`` runs: the
weights reader that infers the architecture from the file, the config, the model builder, the
COCO dataset with the test resize, and the command itself for the whole-split checks.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import built_once, shared_root
from pycocotools import mask as mask_utils

from mae_transfer.cli import main
from mae_transfer.detection.config import build_config
from mae_transfer.detection.task import build_detector, load_detector_weights, read_detector_weights

REF = shared_root() / "reference" / "vitdet"
COCO_TINY = shared_root() / "data" / "coco_tiny"
pytestmark = [
    pytest.mark.skipif(
        not (REF / "model_final.pth").is_file() or not (COCO_TINY / "val2017").is_dir(),
        reason=f"detectron2 reference or coco_tiny not found under {shared_root()} (set MAE_TRANSFER_SHARED)",
    ),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # pycocotools' decode vs numpy 2
]


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REF / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def detector():
    """The reference detector as ``--eval-only --weights model_final.pth`` builds it."""
    state, saved = read_detector_weights(REF / "model_final.pth")
    cfg = build_config(None, {"model": saved["model"]})
    model = build_detector(cfg, saved["num_classes"])
    load_detector_weights(model, state, REF / "model_final.pth")
    return model.eval(), cfg


@pytest.fixture(scope="module")
def val_set():
    from mae_transfer.detection.coco import CocoDetection

    return CocoDetection(COCO_TINY, "val2017")


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode(
        {"size": rle["size"], "counts": rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]}
    )


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _box_iou(a, b) -> float:
    """IoU of two COCO ``[x, y, w, h]`` boxes."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def match_one_to_one(ours: list[dict], ref: list[dict]) -> tuple[int, float, float]:
    """Greedy one-to-one matching (same image and category, box IoU > 0.99, score within 1e-4).

    Returns the matches, the largest score difference and the smallest mask IoU among them."""
    by_image = collections.defaultdict(list)
    for i, r in enumerate(ours):
        by_image[r["image_id"]].append(i)
    used, matched, worst_score, worst_mask = set(), 0, 0.0, 1.0
    for r in ref:
        best = None
        for i in by_image[r["image_id"]]:
            o = ours[i]
            if i in used or o["category_id"] != r["category_id"] or abs(o["score"] - r["score"]) > 1e-4:
                continue
            iou = _box_iou(o["bbox"], r["bbox"])
            if iou > 0.99 and (best is None or iou > best[0]):
                best = (iou, i)
        if best is not None:
            used.add(best[1])
            matched += 1
            o = ours[best[1]]
            worst_score = max(worst_score, abs(o["score"] - r["score"]))
            if "segmentation" in r:
                worst_mask = min(worst_mask, _mask_iou(_decode(o["segmentation"]), _decode(r["segmentation"])))
    return matched, worst_score, worst_mask


# ------------------------------------------------------------------------- 0. the checkpoint


def test_architecture_is_read_from_the_checkpoint():
    """A 96-wide, 4-deep ViT is no named size: it is built from the shapes, not refused."""
    _, saved = read_detector_weights(REF / "model_final.pth")
    m = saved["model"]
    assert saved["num_classes"] == 80
    assert m["name"] is None and (m["embed_dim"], m["depth"], m["num_heads"], m["patch_size"]) == (96, 4, 3, 16)
    assert (
        m["img_size"] == 320
        and m["window_size"] == 8
        and m["global_blocks"] == [1, 3]
        and m["pretrain_img_size"] == 224
    )
    assert (m["channels"], m["fc_dim"], m["rpn_convs"], m["box_head_convs"], m["mask_head_convs"]) == (64, 256, 2, 4, 4)


# ------------------------------------------------------------------------- 1.-4. intermediates


def test_backbone_and_pyramid_match_detectron2(detector, reference):
    model, _ = detector
    img = reference["images"][0]
    with torch.no_grad():
        feats = model.backbone(img["input_normalized_padded"][None])
        last = model.vit.forward_intermediates(img["input_normalized_padded"][None], indices=[-1])[0][0]
    assert (last - img["vit_last_feat"]).abs().max() < 1e-4
    for name, want in img["features"].items():
        assert feats[name].shape[1:] == want.shape
        assert (feats[name][0] - want).abs().max() < 1e-4, name


def test_test_resize_and_normalisation_match_detectron2(detector, reference, val_set):
    from mae_transfer.detection.transforms import ResizeForTest

    model, cfg = detector
    resize = ResizeForTest(cfg.model.img_size)
    for img in reference["images"]:
        image, target = val_set[val_set.image_ids.index(img["image_id"])]
        assert list(image.shape[-2:]) == list(img["orig_hw"])
        resized, _ = resize(image, target)
        assert list(resized.shape[-2:]) == list(img["resized_hw"]), img["image_id"]
        diff = (resized.int() - img["image_uint8_rgb"].int()).abs().max()
        assert diff <= 1, (img["image_id"], diff)
    first = reference["images"][0]
    x, sizes = model.preprocess([first["image_uint8_rgb"]])
    assert sizes == [tuple(first["resized_hw"])] and x.shape[-2:] == tuple(first["padded_hw"])
    assert (x[0] - first["input_normalized_padded"]).abs().max() < 1e-5


def test_proposals_match_detectron2(detector, reference):
    model, _ = detector
    img = reference["images"][0]
    with torch.no_grad():
        x, sizes = model.preprocess([img["image_uint8_rgb"]])
        ((boxes, logits),) = model.proposal_generator(model.backbone(x), sizes)[0]
    assert boxes.shape == img["proposals"].shape == (1000, 4)
    assert (boxes - img["proposals"]).abs().max() < 1e-3
    assert (logits - img["proposal_logits"]).abs().max() < 1e-4


def test_final_detections_of_every_reference_image_match_detectron2(detector, reference, val_set):
    from mae_transfer.detection.transforms import resize_for_test

    model, cfg = detector
    for n, img in enumerate(reference["images"]):
        image, _ = val_set[val_set.image_ids.index(img["image_id"])]
        resized = resize_for_test(image, cfg.model.img_size)
        with torch.no_grad():
            x, sizes = model.preprocess([resized])
            feats = model.backbone(x)
            proposals, _ = model.proposal_generator(feats, sizes)
            raw = model.roi_heads.detect([feats[f] for f in model.roi_heads.in_features], [proposals[0][0]], sizes)[0]
            out = model.inference([resized], [tuple(img["orig_hw"])])[0]
        # Before post-processing (in the resized frame) and after (original frame, pasted masks).
        assert len(raw["boxes"]) == len(img["roi_boxes"]) and torch.equal(raw["classes"], img["roi_classes"])
        assert (raw["boxes"] - img["roi_boxes"]).abs().max() < 0.01 and (
            raw["scores"] - img["roi_scores"]
        ).abs().max() < 1e-4
        if n == 0:
            assert (raw["mask_probs"] - img["mask_probs"]).abs().max() < 1e-4
        assert len(out["boxes"]) == len(img["boxes"]), img["image_id"]
        assert torch.equal(out["labels"], img["classes"])
        assert (out["boxes"] - img["boxes"]).abs().max() < 0.01
        assert (out["scores"] - img["scores"]).abs().max() < 1e-4
        ious = [_mask_iou(out["masks"][k].numpy(), _decode(rle)) for k, rle in enumerate(img["masks_rle"])]
        assert min(ious) >= 0.99, (img["image_id"], min(ious))


# ------------------------------------------------------------------------- 5.-6. the command


def _evaluate_val(out: Path) -> None:
    argv = ["coco", "--eval-only", "--weights", str(REF / "model_final.pth"), "--data", str(COCO_TINY)]
    assert main([*argv, "--output", str(out), "eval_batch_size=4"]) == 0


@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
    """One evaluation of the 80 val images for every test worker that needs it."""
    return built_once(tmp_path_factory, "d2_val", _evaluate_val)


def _reference_metrics(split: str) -> dict:
    return json.loads((REF / "metrics.json").read_text())[split]


def test_all_val_detections_match_detectron2_one_to_one(val_run):
    ours = json.loads((val_run / "predictions_val2017.json").read_text())
    ref = json.loads(gzip.decompress((REF / "coco_instances_results_val2017.json.gz").read_bytes()))
    assert len(ref) == 2610
    assert collections.Counter(r["image_id"] for r in ours) == collections.Counter(r["image_id"] for r in ref)
    matched, worst_score, worst_mask = match_one_to_one(ours, ref)
    assert matched == len(ref) == len(ours)
    assert worst_score < 1e-4 and worst_mask >= 0.99


def test_eval_only_rows_name_detectron2s_file_and_the_table_shows_it(val_run, capsys):
    """The rows of `coco --eval-only --weights model_final.pth` say which weights were evaluated
    (path, sha256, format), never "random init"; `mae-transfer table` lists them under that name."""
    rows = [json.loads(line) for line in (val_run / "results.jsonl").read_text().splitlines()]
    weights = (REF / "model_final.pth").resolve()
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert {(r["backbone"], r["backbone_sha256"], r["weights_format"]) for r in rows} == {
        (str(weights), sha, "detectron2")
    }
    capsys.readouterr()
    assert main(["table", "--results", str(val_run)]) == 0
    table = capsys.readouterr().out
    assert str(weights).replace("_", "\\_") in table and "random init" not in table


@pytest.mark.parametrize("split", ["val2017", "train2017"])
def test_coco_ap_matches_detectron2(split, val_run, tmp_path, capsys):
    if split == "val2017":
        run = val_run
    else:
        run = tmp_path / "train"
        assert (
            main(
                [
                    "coco",
                    "--eval-only",
                    "--weights",
                    str(REF / "model_final.pth"),
                    "--data",
                    str(COCO_TINY),
                    "--eval-split",
                    "train2017",
                    "--output",
                    str(run),
                    "eval_batch_size=4",
                ]
            )
            == 0
        )
        assert "fp32" in capsys.readouterr().out  # evaluation says its precision
    ours, ref = json.loads((run / "metrics.json").read_text()), _reference_metrics(split)
    for kind in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            # The values are hundredths of a percent, so equal to float noise, not within 0.1 only.
            assert abs(ours[kind][name] - ref[kind][name]) < 1e-6, (
                split,
                kind,
                name,
                ours[kind][name],
                ref[kind][name],
            )


# ------------------------------------------------------------------------- RoI scales regression


def _wide_first_subset(root: Path) -> tuple[Path, dict[int, int]]:
    """Four val images renumbered so that wide ones come first on every process: 417285 (160 of 320
    rows after the test resize, under 0.707 x 320) as id 1, 184324 (213 rows) as 2, then portraits."""
    order = [417285, 184324, 338304, 166918]
    new_id = {old: i + 1 for i, old in enumerate(order)}
    data = json.loads((COCO_TINY / "annotations" / "instances_val2017.json").read_text())
    data["images"] = [{**im, "id": new_id[im["id"]]} for im in data["images"] if im["id"] in new_id]
    data["annotations"] = [
        {**a, "image_id": new_id[a["image_id"]]} for a in data["annotations"] if a["image_id"] in new_id
    ]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    os.symlink(COCO_TINY / "val2017", root / "val2017")
    return root, new_id


def _reference_for(new_id: dict[int, int]) -> list[dict]:
    ref = json.loads((REF / "detections.json").read_text())
    return [{**r, "image_id": new_id[r["image_id"]]} for r in ref if r["image_id"] in new_id]


def _assert_matches_reference(predictions: list[dict], new_id: dict[int, int]) -> None:
    ref = _reference_for(new_id)
    assert collections.Counter(r["image_id"] for r in predictions) == collections.Counter(r["image_id"] for r in ref)
    matched, worst_score, worst_mask = match_one_to_one(predictions, ref)
    assert matched == len(ref) == len(predictions) and worst_mask >= 0.99


def test_wide_first_batches_give_the_same_detections_eval_only_visualize_and_precision(tmp_path, capsys):
    """torchvision's MultiScaleRoIAlign cached its scales from the first batch; a first batch of
    wide images then made every scale twice too large. The pooler's scales here are the strides."""
    root, new_id = _wide_first_subset(tmp_path / "coco")
    out = tmp_path / "eval"
    assert (
        main(
            [
                "coco",
                "--eval-only",
                "--weights",
                str(REF / "model_final.pth"),
                "--data",
                str(root),
                "--output",
                str(out),
                "--visualize",
                "2",
                "eval_batch_size=1",
                "train.num_workers=0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "fp32" in printed
    _assert_matches_reference(json.loads((out / "predictions_val2017.json").read_text()), new_id)
    assert len(list((out / "visualize").glob("*.png"))) == 2
    # bf16 only on request, and then it says so.
    assert (
        main(
            [
                "coco",
                "--eval-only",
                "--weights",
                str(REF / "model_final.pth"),
                "--data",
                str(root),
                "--output",
                str(tmp_path / "bf16"),
                "eval_precision=bf16",
                "train.num_workers=0",
            ]
        )
        == 0
    )
    assert "bf16" in capsys.readouterr().out


def test_pictures_use_the_same_detections_when_the_first_image_is_wide(detector, val_set):
    """``--visualize`` runs ``model.predict`` image by image; a fresh model whose first image is wide."""
    _, cfg = detector
    state, saved = read_detector_weights(REF / "model_final.pth")
    fresh = build_detector(build_config(None, {"model": saved["model"]}), 80)
    load_detector_weights(fresh, state, REF / "model_final.pth")
    fresh.eval()
    ref = {r["image_id"]: r for r in torch.load(REF / "reference.pt", weights_only=True)["images"]}
    for image_id in (417285, 338304):  # wide first, then portrait
        image, _ = val_set[val_set.image_ids.index(image_id)]
        pred = fresh.predict(image)
        assert len(pred["boxes"]) == len(ref[image_id]["boxes"]) and torch.equal(
            pred["labels"], ref[image_id]["classes"]
        )
        assert (pred["boxes"] - ref[image_id]["boxes"]).abs().max() < 0.01


@pytest.mark.slow
def test_two_process_evaluation_gives_the_same_detections(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun not found")
    root, new_id = _wide_first_subset(tmp_path / "coco")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29541",
            "-m",
            "mae_transfer",
            "coco",
            "--eval-only",
            "--weights",
            str(REF / "model_final.pth"),
            "--data",
            str(root),
            "--output",
            str(out),
            "eval_batch_size=1",
            "train.num_workers=0",
            "train.device=cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_matches_reference(json.loads((out / "predictions_val2017.json").read_text()), new_id)


# ------------------------------------------------------------------------- checkpoints both ways


def test_export_to_detectron2_has_the_reference_layout_and_round_trips(tmp_path, capsys):
    out = tmp_path / "model_final.pth"
    assert main(["export", str(REF / "model_final.pth"), "--to", "detectron2", "--output", str(out)]) == 0
    ref = torch.load(REF / "model_final.pth", weights_only=True)["model"]
    back = torch.load(out, weights_only=True)
    assert set(back) == {"model", "iteration"}
    assert list(back["model"]) == list(ref)  # the same names, in the same order
    for k, v in ref.items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v), k


def test_our_detector_exports_and_reimports_bit_identically(tmp_path):
    """A detector of this toolkit (random weights, a ViT of no named size) -> detectron2 file ->
    read back with the architecture inferred from it: every tensor identical."""
    from mae_transfer.detection.task import save_detector

    cfg = build_config(
        None,
        {
            "model": {
                "name": None,
                "embed_dim": 64,
                "depth": 2,
                "num_heads": 2,
                "patch_size": 16,
                "img_size": 128,
                "window_size": 4,
                "global_blocks": [1],
                "channels": 32,
                "fc_dim": 64,
                "pretrain_img_size": 64,
            }
        },
    )
    torch.manual_seed(3)
    model = build_detector(cfg, num_classes=7)
    with torch.no_grad():  # zero-initialised tables would hide a transposition
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    ours = tmp_path / "detector.pth"
    save_detector(model, cfg, [f"c{i}" for i in range(7)], ours)
    exported = tmp_path / "d2.pth"
    assert main(["export", str(ours), "--to", "detectron2", "--output", str(exported)]) == 0
    state, saved = read_detector_weights(exported)
    m = saved["model"]
    assert saved["num_classes"] == 7 and (m["embed_dim"], m["depth"], m["num_heads"], m["img_size"]) == (64, 2, 2, 128)
    assert (m["window_size"], m["global_blocks"], m["pretrain_img_size"]) == (4, [1], 64)
    again = build_detector(build_config(None, {"model": m}), saved["num_classes"])
    load_detector_weights(again, state, exported)
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_model_zoo_pickles_need_trust_and_unknown_tensors_are_named(tmp_path):
    from mae_transfer.checkpoint import CheckpointError

    ref = torch.load(REF / "model_final.pth", weights_only=True)["model"]
    pkl = tmp_path / "model_final_abc.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in ref.items()}, "__author__": "Detectron2 Model Zoo"}, f)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_detector_weights(pkl)
    state, saved = read_detector_weights(pkl, trust=True)
    assert saved["num_classes"] == 80 and all(torch.equal(state[k], ref[k]) for k in ref)

    extra = tmp_path / "extra.pth"
    torch.save({"model": {**ref, "roi_heads.keypoint_head.score_lowres.weight": torch.zeros(1)}}, extra)
    with pytest.raises(CheckpointError, match="roi_heads.keypoint_head.score_lowres.weight"):
        read_detector_weights(extra)

    evil = tmp_path / "evil.pth"
    torch.save({"model": ref, "hook": Path("x")}, evil)  # an arbitrary object: needs full unpickling
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_detector_weights(evil)


def test_a_checkpoint_for_other_classes_is_refused_with_the_reason(detector):
    from mae_transfer.checkpoint import CheckpointError

    _, cfg = detector
    state, _ = read_detector_weights(REF / "model_final.pth")
    ten = build_detector(cfg, num_classes=10)
    with pytest.raises(CheckpointError, match="predicts 80 classes, the data has 10"):
        load_detector_weights(ten, state, "model_final.pth")
