"""The frozen linear segmentation protocol (DINOv2's): it learns, the feature cache spares the
backbone, the command selects it by --protocol and the tables give it its own column."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import result_rows

from mae_transfer.models.vit import VisionTransformer

# A ViT of 2 blocks x 64 with patch 4: 8 x 8 tokens a 32 px window, cheap on a CPU.
TINY = {"name": None, "embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 32}


def _count_backbone_calls(monkeypatch) -> list[int]:
    """Counts every run of a ViT's blocks for features (what the linear model calls)."""
    calls = [0]
    original = VisionTransformer.forward_intermediates

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VisionTransformer, "forward_intermediates", counted)
    return calls


def test_linear_head_on_a_frozen_vit_memorises_real_ade20k_images(shared, tmp_path, monkeypatch):
    """The 3 ADE20K validation images of ../shared: a linear head on a frozen random ViT, trained on
    their (unflipped, undistorted) crops with DINOv2's recipe path, then evaluated on the same images
    by sliding windows: mIoU far above the untrained head's, and the backbone's weights untouched."""
    from mae_transfer.engine.distributed import DistInfo
    from mae_transfer.engine.trainer import EvalContext, Trainer
    from mae_transfer.segmentation.config import build_config
    from mae_transfer.segmentation.linear import LinearSegmentationTask

    root = shared / "data" / "ade20k_sample"
    if not (root / "images" / "validation").is_dir():
        pytest.skip(f"{root} not found")
    monkeypatch.setenv("MAE_TRANSFER_FEATURE_CACHE", "0")  # every evaluation runs the backbone here
    cfg = build_config(
        "toy_linear",
        {
            "model": TINY,
            "data": {
                "path": str(root),
                "train_split": "validation",
                "scale": [128, 32],
                "ratio_range": [1.0, 1.0],
                "flip_prob": 0.0,
                "photometric": False,
            },
            "test": {"stride": 21},
            "train": {
                "epochs": 40,
                "batch_size": 3,
                "effective_batch_size": 3,
                "num_workers": 0,
                "progress": False,
                "log_every": 10,
            },
            "optim": {"lr": 0.05, "warmup_steps": 5},
            "visualize": 0,
        },
    )
    task = LinearSegmentationTask(cfg)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    ctx = EvalContext(dist.device, "fp32", dist, 0, None)
    model = task.build_model().eval()
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    untrained = task.evaluate(model, ctx)["mIoU"]
    trainer = Trainer(task, cfg.train, cfg.optim, tmp_path / "run", dist, config=cfg)
    trainer.fit()
    trained = task.last_eval["mIoU"]
    assert trained > untrained + 0.25 and trained > 0.3, (untrained, trained)
    after = trainer.unwrapped.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # frozen: only the head learned


SMALL = [
    "--model",
    "vit_nano_patch8",
    "--img-size",
    "32",
    "data.scale=[64,32]",
    "test.stride=21",
    "train.batch_size=8",
    "train.effective_batch_size=8",
    "train.num_workers=0",
    "train.progress=false",
    "train.log_every=2",
    "optim.warmup_steps=2",
    "visualize=0",
]


def test_second_head_reads_the_feature_cache_and_never_runs_the_backbone(tmp_path, cache, monkeypatch, capsys):
    """`ade20k --protocol linear` with fixed training windows: the first run computes and caches the
    features of its training and evaluation windows; a second run with two other heads (a sweep) and
    an --eval-only of the first run's weights never run the backbone, and the evaluation from the
    cache gives the first run's numbers. The rows name the protocol; `table` shows its column."""
    from mae_transfer.cli import main

    calls = _count_backbone_calls(monkeypatch)
    common = ["ade20k", "--protocol", "linear", "--max-steps", "3", *SMALL, "linear.train_input=fixed"]
    common.append("train.seed=31")  # its own random backbone: a cache no other test wrote
    first, second, again = tmp_path / "first", tmp_path / "second", tmp_path / "again"
    assert main([*common, "--output", str(first)]) == 0
    assert calls[0] > 0
    made = calls[0]
    assert main([*common, "--output", str(second), "linear.lrs=[0.003,0.03]"]) == 0
    assert calls[0] == made  # the sweep's heads trained and were evaluated on cached features only
    weights = ["--eval-only", "--weights", str(first / "segmenter.pth")]
    assert (
        main(["ade20k", "--protocol", "linear", *weights, "--output", str(again), "train.num_workers=0", "visualize=0"])
        == 0
    )
    assert calls[0] == made
    assert result_rows(again) == pytest.approx(result_rows(first))

    rows = [json.loads(line) for line in (first / "results.jsonl").read_text().splitlines()]
    assert {(r["task"], r["protocol"]) for r in rows} == {("ade20k_linear", "linear_ss")}
    sweep = {(r["protocol"], r["metric"]) for r in map(json.loads, (second / "results.jsonl").read_text().splitlines())}
    assert {("linear_ss@lr=0.003", "mIoU"), ("linear_ss@lr=0.03", "mIoU"), ("linear_sweep_ss", "mIoU")} <= sweep
    capsys.readouterr()
    assert main(["table", "--results", str(first), "--no-paper"]) == 0
    table = capsys.readouterr().out
    assert "linear, frozen" in table and f"{result_rows(first)['mIoU']:.1f}" in table


def test_protocol_selects_the_task_and_leaves_upernet_jobs_as_they_were():
    """--protocol linear / linear_ms select their tasks; UperNet's config identity (its job keys and
    config hashes) has no trace of the new fields; the recipes resolve."""
    from mae_transfer.config import identity
    from mae_transfer.evaluation import front
    from mae_transfer.evaluation.registry import TASKS, spec_for

    ade20k = spec_for("ade20k", {})
    assert ade20k.name == "ade20k"
    for protocol, task in (("linear", "ade20k_linear"), ("linear_ms", "ade20k_linear_ms"), ("upernet", "ade20k")):
        assert front.task_for_options(ade20k, {"seg_protocol": protocol}).name == task
    upernet = front.prepare(ade20k, {})
    assert upernet.cfg.protocol == "upernet" and {"protocol", "linear"}.isdisjoint(identity(upernet.cfg))
    assert "--protocol" not in front.command_line(ade20k, {})
    linear = front.prepare(ade20k, {"seg_protocol": "linear", "data": "/datasets/ADEChallengeData2016"})
    cfg = linear.cfg
    assert linear.spec.name == "ade20k_linear" and cfg.protocol == "linear" and cfg.linear_layers() == 1
    # DINOv2's recipe (dinov2_vitb14_ade20k_linear_config.py): AdamW 1e-3, wd 1e-4, batch 16, 512 crops.
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.effective_batch_size, cfg.model.img_size) == (
        1e-3,
        1e-4,
        16,
        512,
    )
    ms = front.prepare(TASKS["ade20k_linear_ms"], {"data": "/datasets/ADEChallengeData2016"}).cfg
    assert ms.linear_layers() == 4 and ms.model.img_size == 640 and len(ms.test.scales) > 1
    assert front.command_line(TASKS["ade20k_linear"], {})[1:3] == ["--protocol", "linear"]
