"""The backbone seam: one BackboneConfig in every task config, one create_backbone, files read once,
and one identity rule for configs (what goes into job keys and result rows' config_hash)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mae_transfer.checkpoint import describe, export_mae_encoder
from mae_transfer.classification.config import build_config as classification_config
from mae_transfer.classification.task import build_classifier
from mae_transfer.config import config_hash, identity
from mae_transfer.detection.config import build_config as detection_config
from mae_transfer.detection.task import build_detector
from mae_transfer.evaluation import runner as bench
from mae_transfer.models.backbone import BACKBONES, BackboneConfig, create_backbone
from mae_transfer.models.vit import VisionTransformer, create_vit
from mae_transfer.segmentation.config import build_config as segmentation_config
from mae_transfer.segmentation.task import build_segmenter


@pytest.fixture
def encoder(tmp_path):
    torch.manual_seed(0)
    vit = create_vit("vit_nano_patch8", img_size=64, num_classes=0, global_pool="token")
    return export_mae_encoder(vit, tmp_path / "weights" / "enc.pth")


def test_every_task_config_holds_one_backbone_config():
    configs = {
        "classification": classification_config("toy_finetune"),
        "detection": detection_config("toy"),
        "segmentation": segmentation_config("toy"),
    }
    shared = {f.name for f in dataclasses.fields(BackboneConfig)}
    for task, cfg in configs.items():
        assert isinstance(cfg.model, BackboneConfig), task
        # The backbone's fields are declared once, in BackboneConfig, not again in the task's config.
        own = set(type(cfg.model).__dict__.get("__annotations__", {}))
        assert not own & shared, (task, own & shared)


def test_create_backbone_builds_what_each_task_asked_for():
    cfg = BackboneConfig(name="vit_nano_patch8", drop_path=0.2)
    vit = create_backbone(cfg, img_size=32, num_classes=5, global_pool="avg")
    assert isinstance(vit, VisionTransformer) and vit.embed_dim == 64 and len(vit.blocks) == 2
    assert vit.head.out_features == 5 and vit.grid_size == (4, 4)
    # An explicit size without a name, and the task's override of stochastic depth.
    odd = create_backbone(
        BackboneConfig(name=None, embed_dim=48, depth=3, num_heads=3, patch_size=8),
        img_size=32,
        num_classes=0,
        drop_path_rate=0.0,
    )
    assert odd.embed_dim == 48 and len(odd.blocks) == 3 and odd.blocks[-1].drop_path.__class__.__name__ == "Identity"
    with pytest.raises(ValueError, match="unknown backbone family 'nope'"):
        create_backbone(BackboneConfig(family="nope"))
    with pytest.raises(ValueError, match="needs embed_dim"):
        create_backbone(BackboneConfig(name=None, depth=2))
    assert set(BACKBONES) >= {"vit"}


def test_the_task_builders_go_through_the_seam(monkeypatch):
    seen = []
    real = BACKBONES["vit"]

    def spy(cfg, **use):
        seen.append(type(cfg).__module__)
        return real(cfg, **use)

    monkeypatch.setitem(BACKBONES, "vit", spy)
    build_classifier(classification_config("toy_finetune"), 3)
    build_detector(detection_config("toy"), 3)
    build_segmenter(segmentation_config("toy"))
    assert seen == [
        "mae_transfer.classification.config",
        "mae_transfer.detection.config",
        "mae_transfer.segmentation.config",
    ]


def test_bench_planning_reads_each_backbone_file_once(tmp_path, encoder, monkeypatch):
    describe.clear_cache()
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    backbones = bench.parse_backbones([f"mae={encoder}", "scratch=random"])
    tasks = ["knn", "linprobe", "finetune", "inat2018", "places365", "coco", "ade20k"]
    jobs = bench.plan_jobs(backbones, tasks, tmp_path / "res")
    assert len(jobs) == 2 * len(tasks)
    assert [r for r in reads if r == str(encoder)] == [str(encoder)], reads
    # A file rewritten in place is read again (the cache is keyed by size and mtime too).
    torch.manual_seed(1)
    export_mae_encoder(create_vit("vit_nano_patch8", img_size=64, num_classes=0, global_pool="token"), encoder)
    reads.clear()  # the export reads its file back to check it
    bench.plan_jobs(bench.parse_backbones([f"mae={encoder}"]), ["linprobe", "coco"], tmp_path / "res")
    assert [r for r in reads if r == str(encoder)] == [str(encoder)]


def test_one_identity_rule_leaves_out_paths_and_display_options_only():
    base = detection_config("toy")
    moved = detection_config("toy", {"data": {"path": "/elsewhere/coco"}, "visualize": 4, "eval_backend": "faster"})
    moved.backbone = "/weights/other-name.pth"
    assert config_hash(base) == config_hash(moved)
    for changed in ({"data": {"flip_prob": 0.0}}, {"model": {"drop_path": 0.3}}, {"train": {"epochs": 7}}):
        assert config_hash(detection_config("toy", changed)) != config_hash(base), changed
    cls = classification_config("toy_finetune")
    assert "path" not in identity(cls)["data"] and "reprob" in identity(cls)["data"]
    # A frozen evaluation's options: the data folder given as `data` is a path too.
    assert identity({"data": "/x", "dataset": "inat2018", "k": [20]}) == {"dataset": "inat2018", "k": [20]}


# The identity of each task's toy config. A change here re-runs every job of a benchmark store written
# before it (job keys hash this identity): change a default or a config field only on purpose, then
# update the value and say so in the change's note.
PINNED = {
    "classification": "96f767950e91",
    "detection": "26a28566516f",
    "segmentation": "74d201a79187",
}


def test_config_identities_are_pinned():
    got = {
        "classification": config_hash(classification_config("toy_finetune")),
        "detection": config_hash(detection_config("toy")),
        "segmentation": config_hash(segmentation_config("toy")),
    }
    assert got == PINNED
