"""Failures that came late or said the wrong thing (issue 23, item 6): each stops where it is first
knowable, in one line that names the file and the command-line flag that helps.

Every test here is fast: tiny data in ``tmp_path``; where a command would train, the training loop
is replaced by one that fails the test, so a test only passes when the command stops before it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader

from mae_transfer.cli import main
from mae_transfer.data.errors import DataError
from mae_transfer.data.toy import write_ade20k, write_coco
from mae_transfer.detection.coco import CocoDetection, COCOEvaluator
from mae_transfer.engine.trainer import Trainer


class TrainingStarted(Exception):
    """Raised instead of training: the command got past every up-front check."""


@pytest.fixture
def no_training(monkeypatch):
    """Replace the training loop; ``seen`` holds the trainer that would have trained."""
    seen: dict = {}

    def loop(self, *args, **kwargs):
        seen["trainer"] = self
        raise TrainingStarted

    monkeypatch.setattr(Trainer, "_loop", loop)
    return seen


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:200])  # a JPEG header and nothing else
    return path


@pytest.fixture
def coco(tmp_path) -> Path:
    return write_coco(tmp_path / "coco", num_categories=3, train_images=4, val_images=3, image_size=48, crowd_prob=0.0)


# A nano Mask R-CNN; these commands never train (see no_training).
COCO_ARGS = [
    "--model",
    "vit_nano_patch8",
    "--img-size",
    "64",
    "model.window_size=4",
    "model.channels=16",
    "model.fc_dim=32",
    "train.batch_size=2",
    "train.effective_batch_size=2",
    "train.num_workers=0",
    "train.progress=false",
]
ADE_ARGS = [
    "--model",
    "vit_micro_patch8",
    "--img-size",
    "32",
    "model.tap_blocks=[0,1,2,3]",
    "model.channels=16",
    "model.aux_channels=8",
    "data.scale=[64,32]",
    "test.stride=21",
    "train.batch_size=2",
    "train.effective_batch_size=2",
    "train.num_workers=0",
    "train.progress=false",
]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mae-transfer: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------- 1. unreadable images, up front


def test_a_corrupt_coco_val_image_stops_the_command_before_training(coco, tmp_path, no_training, capsys):
    bad = _truncate(sorted((coco / "val2017").glob("*.jpg"))[1])
    assert main(["coco", "--data", str(coco), "--output", str(tmp_path / "run"), *COCO_ARGS]) == 2
    line = _error_line(capsys)
    assert str(bad) in line and "cannot decode" in line and "--skip-bad" in line and "check-data" in line
    assert "trainer" not in no_training and not (tmp_path / "run" / "checkpoint-last.pth").exists()


def test_skip_bad_leaves_a_corrupt_val_image_out_of_the_evaluation_before_training(coco, tmp_path, no_training, caplog):
    bad = _truncate(sorted((coco / "val2017").glob("*.jpg"))[0])
    with caplog.at_level(logging.WARNING), pytest.raises(TrainingStarted):
        main(["coco", "--data", str(coco), "--output", str(tmp_path / "run"), "--skip-bad", *COCO_ARGS])
    val = no_training["trainer"].task.val_set
    assert len(val) == 2 and val.num_unreadable_images == 1 and val.unreadable_files == [bad]
    assert int(bad.stem) not in val.image_ids
    assert "left out 1 unreadable image" in caplog.text and str(bad) in caplog.text


def test_a_wrong_image_size_in_val_is_found_up_front_too(coco, tmp_path, no_training, capsys):
    path = sorted((coco / "val2017").glob("*.jpg"))[2]
    Image.open(path).resize((40, 30)).save(path)
    assert main(["coco", "--data", str(coco), "--output", str(tmp_path / "run"), *COCO_ARGS]) == 2
    line = _error_line(capsys)
    assert str(path) in line and "40x30" in line and "--skip-bad" in line


def test_valid_data_passes_the_up_front_check_with_nothing_left_out(coco, tmp_path, no_training):
    with pytest.raises(TrainingStarted):
        main(["coco", "--data", str(coco), "--output", str(tmp_path / "run"), *COCO_ARGS])
    val = no_training["trainer"].task.val_set
    assert len(val) == 3 and val.num_unreadable_images == 0


# ------------------------------------------------------------------ 1. unreadable images, while reading


def test_an_unreadable_training_image_is_one_line_from_a_worker_or_replaced_with_skip_bad(coco, caplog):
    bad = _truncate(sorted((coco / "train2017").glob("*.jpg"))[0])
    from torch._utils import ExceptionWrapper

    strict = CocoDetection(coco, "train2017")
    index = [i for i in range(len(strict)) if strict.image_path(i) == bad][0]
    try:
        strict[index]
    except DataError:
        # What a DataLoader worker sends and the main process re-raises (a real worker would add 5 s:
        # torch joins a worker that failed only after its 5 s status-check timeout).
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as info:
        wrapped.reraise()
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and "--skip-bad" in message and "skip_bad=True" not in message

    lenient = CocoDetection(coco, "train2017", skip_bad=True)
    items = list(DataLoader(lenient, batch_size=None, num_workers=1))  # the worker marks the file and warns ...
    with caplog.at_level(logging.WARNING):
        again = [lenient[i] for i in range(len(lenient))]  # ... the main process sees the mark: no second warning
    assert lenient.num_unreadable_images == 1 and lenient.num_corrupt == 1 and str(bad) not in caplog.text
    replacement = (index + 1) % len(lenient)
    assert int(items[index][1]["image_id"]) == lenient.image_ids[replacement]
    assert torch.equal(items[index][0], lenient[replacement][0]) and torch.equal(again[index][0], items[index][0])
    for i, (image, target) in enumerate(items):  # every other item is untouched
        if i != index:
            assert int(target["image_id"]) == lenient.image_ids[i] and torch.equal(image, again[i][0])


def test_an_eval_image_unreadable_while_evaluating_is_left_out_of_the_metrics(coco):
    """With skip_bad, an evaluation item whose image cannot be read (here found only while
    evaluating) is a placeholder the evaluator leaves out: the ground truth of the other images
    predicted exactly gives box AP 100, which it would not if the dropped image still counted."""
    val = CocoDetection(coco, "val2017", skip_bad=True, unreadable="drop")
    bad = _truncate(val.image_path(1))
    states = []
    for shard in ([0, 1], [2]):  # two processes
        ev = COCOEvaluator(val)
        for i in shard:
            image, target = val[i]
            boxes = target["boxes"]
            out = {
                "boxes": boxes,
                "scores": torch.ones(len(boxes)),
                "labels": target["labels"],
                "mask_probs": torch.ones(len(boxes), 28, 28),
            }
            ev.process((None, [target]), [out])
        states.append(ev.state())
    assert isinstance(states[0], tuple) and not isinstance(states[1], tuple)
    main_ev = COCOEvaluator(val)
    main_ev.merge(states)
    assert main_ev.dropped_image_ids == [val.image_ids[1]] and val.unreadable_files == [bad]
    assert main_ev.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


def test_eval_only_with_skip_bad_evaluates_the_readable_images_and_records_the_rest(coco, tmp_path):
    """``--eval-only`` has no training to protect, so its split is not checked up front: the loader
    finds the corrupt image, and with --skip-bad the evaluation leaves it out and says so."""
    from mae_transfer.detection.config import build_config
    from mae_transfer.detection.task import DetectionTask, save_detector

    cfg = build_config(
        "toy",
        {
            "data": {"path": str(coco)},
            "model": {
                "name": "vit_nano_patch8",
                "img_size": 64,
                "window_size": 4,
                "channels": 16,
                "fc_dim": 32,
                "detections_per_img": 5,
            },
        },
    )
    task = DetectionTask(cfg, train=False)
    save_detector(task.build_model(load_backbone=False), cfg, task.class_names, tmp_path / "detector.pth")  # untrained
    bad = _truncate(sorted((coco / "val2017").glob("*.jpg"))[0])
    run = [
        "coco",
        "--eval-only",
        "--weights",
        str(tmp_path / "detector.pth"),
        "--data",
        str(coco),
        "train.num_workers=0",
    ]
    assert main([*run, "--output", str(tmp_path / "strict")]) == 2
    assert main([*run, "--output", str(tmp_path / "lenient"), "--skip-bad"]) == 0
    metrics = json.loads((tmp_path / "lenient" / "metrics.json").read_text())
    assert metrics["unreadable_images_left_out"] == 1 and metrics["time"]["images"] == 2
    assert int(bad.stem) not in {
        p["image_id"] for p in json.loads((tmp_path / "lenient" / "predictions_val2017.json").read_text())
    }


# ---------------------------------------------------------------------------- 1. ADE20K, up front


@pytest.fixture
def ade(tmp_path) -> Path:
    write_ade20k(tmp_path / "ade", num_categories=4, train_images=4, val_images=3, image_size=48)
    return tmp_path / "ade"


def _set_label(ade: Path, split: str, value: int) -> Path:
    path = sorted((ade / "ADEChallengeData2016" / "annotations" / split).glob("*.png"))[-1]
    label = np.array(Image.open(path))
    label[0, :4] = value
    Image.fromarray(label).save(path)
    return path


def test_a_bad_ade20k_val_label_stops_before_training_unless_ignored(ade, tmp_path, no_training, capsys):
    path = _set_label(ade, "validation", 200)
    assert main(["ade20k", "--data", str(ade), "--output", str(tmp_path / "run"), *ADE_ARGS]) == 2
    line = _error_line(capsys)
    assert (
        str(path) in line
        and "label values 200" in line
        and "--bad-labels ignore" in line
        and "bad_labels='ignore'" not in line
    )
    assert "trainer" not in no_training
    with pytest.raises(TrainingStarted):  # the escape: those pixels are ignored, training starts
        main(["ade20k", "--data", str(ade), "--output", str(tmp_path / "run2"), "--bad-labels", "ignore", *ADE_ARGS])


def test_a_corrupt_ade20k_val_image_stops_before_training(ade, tmp_path, no_training, capsys):
    image = _truncate(sorted((ade / "ADEChallengeData2016" / "images" / "validation").glob("*.jpg"))[0])
    assert main(["ade20k", "--data", str(ade), "--output", str(tmp_path / "run"), *ADE_ARGS]) == 2
    line = _error_line(capsys)
    assert str(image) in line and "cannot decode" in line and "trainer" not in no_training


def test_check_data_reports_bad_ade20k_label_values_and_says_the_run_stops(ade):
    from mae_transfer.evaluation.check_data import _decode_check, format_check_data
    from mae_transfer.segmentation.ade20k import SegmentationFolder

    _set_label(ade, "validation", 250)
    ds = SegmentationFolder(ade, "validation")
    report = _decode_check(ds, full=True, sample=0)
    assert report["unreadable"] == 1 and "label values 250" in report["examples"][0]
    split = {
        "split": "val",
        "served": len(ds),
        "classes": 150,
        "missing_files": 0,
        "decode": report,
        "index_mib": 0.0,
        "index": "in memory",
    }
    text, stops = format_check_data(
        {
            "task": "ade20k",
            "data": str(ade),
            "build_seconds": 0.0,
            "run_skips_bad_data": False,
            "splits": [split],
            "memory": {
                "index_mib": 0,
                "rank_datasets_mib": 0,
                "worker_uss_mib": None,
                "gpus": 1,
                "workers": 1,
                "node_data_mib": 0,
            },
        }
    )
    assert stops and "a run stops on them" in text


# --------------------------------------------------------------------------------- 2. and 3. messages


def test_data_hints_name_command_line_flags_not_python_arguments(coco, ade):
    ann = coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 9999
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match="--skip-bad") as info:
        CocoDetection(coco, "val2017")
    assert "skip_bad=True" not in str(info.value)
    (coco / "train2017" / sorted(p.name for p in (coco / "train2017").iterdir())[0]).unlink()
    with pytest.raises(DataError, match="--skip-bad") as info:
        CocoDetection(coco, "train2017")
    assert "skip_bad=True" not in str(info.value)

    from mae_transfer.segmentation.ade20k import SegmentationFolder

    next((ade / "ADEChallengeData2016" / "annotations" / "training").glob("*.png")).unlink()
    with pytest.raises(DataError, match="--missing skip") as info:
        SegmentationFolder(ade, "training")
    assert "missing='skip'" not in str(info.value)


def test_not_a_coco_file_names_only_what_is_missing(tmp_path):
    from mae_transfer.detection.coco import _read_instances

    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match=r"missing keys: categories\)$"):
        _read_instances(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(DataError) as info:
        _read_instances(path)
    assert "JSON list" in str(info.value) and "missing keys" not in str(info.value)


# ------------------------------------------------------------------------------------ 4. --weights DIR


@pytest.mark.parametrize("command, artifact", [("coco", "detector.pth"), ("ade20k", "segmenter.pth")])
def test_a_folder_as_weights_says_it_is_a_folder_and_which_file_to_give(command, artifact, tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    assert main([command, "--eval-only", "--weights", str(folder), "--output", str(tmp_path / "x")]) == 2
    line = _error_line(capsys)
    assert "is a folder" in line and artifact in line and "checkpoint-last.pth" in line and "file not found" not in line
    (folder / "model_final.pth").write_bytes(b"")
    assert main([command, "--eval-only", "--weights", str(folder), "--output", str(tmp_path / "x")]) == 2
    assert "it holds model_final.pth" in _error_line(capsys)


# ------------------------------------------------------------------------------------ 5. and 6. NaN


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(4, generator=g), "y": torch.randn(1, generator=g)}


class _Task:
    name = "tiny"
    collate_fn = None
    evaluated = None

    def __init__(self, nan_at=None, break_weights_at=None):
        self.nan_at, self.break_weights_at, self.calls = nan_at, break_weights_at, 0

    def signature(self):
        return {}

    def build_model(self):
        torch.manual_seed(0)
        return nn.Linear(4, 1)

    def build_train_dataset(self):
        return _Data()

    def param_groups(self, model, optim):
        return [{"params": list(model.parameters())}]

    def compile_targets(self, model):
        return None

    def check_data(self, trainer):
        pass

    def training_step(self, model, batch, device):
        self.calls += 1
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        if self.break_weights_at is not None and self.calls >= self.break_weights_at:
            with torch.no_grad():  # as an update with an inf learning rate leaves them (after a finite loss)
                model.weight.fill_(float("nan"))
        return loss, {}

    def on_epoch_end(self, trainer, epoch):
        pass

    def on_train_end(self, trainer):
        pass


def _fit(tmp_path, task, clip_grad=None, **train):
    from mae_transfer.engine.distributed import DistInfo
    from mae_transfer.engine.trainer import OptimConfig, TrainConfig

    cfg = TrainConfig(
        **{
            "epochs": 2,
            "batch_size": 8,
            "log_every": 1,
            "num_workers": 0,
            "progress": False,
            "precision": "fp32",
            **train,
        }
    )
    return Trainer(task, cfg, OptimConfig(lr=0.01, clip_grad=clip_grad), tmp_path, DistInfo()).fit()


def test_a_nan_loss_before_any_checkpoint_says_so_and_only_suggests_what_applies(tmp_path):
    with pytest.raises(FloatingPointError) as info:
        _fit(tmp_path, _Task(nan_at=2))
    message = str(info.value)
    assert "no checkpoint was saved yet" in message and "last good checkpoint" not in message
    assert "fp32" not in message  # the run is fp32 already
    assert "--lr, now 0.01" in message and "optim.clip_grad" in message
    with pytest.raises(FloatingPointError) as info:
        _fit(tmp_path / "clipped", _Task(nan_at=2), clip_grad=1.0)
    assert "optim.clip_grad" not in str(info.value)


def test_a_nan_loss_after_a_checkpoint_names_it_with_its_step(tmp_path):
    with pytest.raises(FloatingPointError) as info:
        _fit(tmp_path, _Task(nan_at=6))  # 4 steps an epoch: the epoch-1 checkpoint is at step 4
    assert f"last good checkpoint {tmp_path / 'checkpoint-last.pth'} (step 4)" in str(info.value)
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_weights_that_diverge_on_the_last_step_are_reported_not_saved(tmp_path):
    with pytest.raises(FloatingPointError, match="the weights became NaN or inf at step 1 .*weight"):
        _fit(tmp_path, _Task(break_weights_at=1), max_steps=1)
    assert not (tmp_path / "checkpoint-last.pth").exists()


def test_read_back_checks_are_nan_aware_and_name_diverged_weights(tmp_path, caplog):
    from mae_transfer.checkpoint import export_mae_encoder
    from mae_transfer.checkpoint.io import CheckpointError, check_read_back, same_tensor
    from mae_transfer.models.vit import create_vit

    nan = torch.tensor([1.0, math.nan, math.inf])
    assert same_tensor(nan, nan.clone()) and not torch.equal(nan, nan.clone())
    assert not same_tensor(nan, torch.tensor([1.0, math.nan, -math.inf])) and not same_tensor(nan, nan.double())
    with pytest.raises(CheckpointError, match="differs"):
        check_read_back({"a": nan}, {"a": torch.zeros(3)}, "x.pth")
    vit = create_vit("vit_micro_patch8", img_size=32, num_classes=0)
    sd = vit.state_dict()
    sd["blocks.0.attn.qkv.weight"][0, 0] = math.nan
    with caplog.at_level(logging.WARNING):
        path = export_mae_encoder(sd, tmp_path / "encoder.pth")  # before: "the file read back differs"
    assert path.is_file() and "hold NaN or inf" in caplog.text and "blocks.0.attn.qkv.weight" in caplog.text


# ------------------------------------------------------------------------------------- 7. hub message


@pytest.mark.parametrize("offline", [True, False])
def test_hub_errors_read_as_sentences(offline, monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    from mae_transfer.checkpoint.hub import resolve_weights
    from mae_transfer.checkpoint.io import CheckpointError

    def fail(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(hub, "snapshot_download", fail)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    with pytest.raises(CheckpointError) as info:
        resolve_weights("hf-hub:someone/nothing")
    message = str(info.value)
    assert "is could" not in message and str(tmp_path / "hub") in message
    assert ("is not in the local cache" in message) == offline and ("could not be downloaded" in message) != offline


def test_ade20k_with_one_image_per_step_is_one_line_before_training(ade, tmp_path, no_training, capsys):
    """The decode head's BatchNorm cannot train on one image a step (torch raises at the first
    step); said before training, naming the flag to change."""
    args = [a for a in ADE_ARGS if not a.startswith("train.batch_size") and not a.startswith("train.effective")]
    assert (
        main(
            [
                "ade20k",
                "--data",
                str(ade),
                "--output",
                str(tmp_path / "run"),
                *args,
                "--batch-size",
                "1",
                "--effective-batch-size",
                "2",
            ]
        )
        == 2
    )
    line = _error_line(capsys)
    assert "--batch-size 2 or more" in line and "trainer" not in no_training
