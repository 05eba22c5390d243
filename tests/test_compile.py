"""torch.compile: the models' compute graphs trace without a break, and --compile compiles what can be."""

from __future__ import annotations

import torch
import torch._dynamo as dynamo

from mae_transfer.cli import main


def _breaks(module, *args, **kwargs) -> list[str]:
    dynamo.reset()
    explained = dynamo.explain(module)(*args, **kwargs)
    return [b.reason.splitlines()[0] for b in explained.break_reasons] if explained.graph_break_count else []


def test_models_trace_as_one_graph():
    """MAE pretraining, the ViT classifier, ViTDet's backbone (windowed attention, relative positions,
    simple pyramid) and UperNet each trace as a single graph: nothing falls back to Python between
    kernels when they are compiled (the GPU benchmark compiles them)."""
    from mae_transfer.detection.model import build_pyramid, build_vit
    from mae_transfer.models.vit import create_vit
    from mae_transfer.pretrain.model import create_mae
    from mae_transfer.segmentation.config import build_config
    from mae_transfer.segmentation.task import build_segmenter

    torch.manual_seed(0)
    assert _breaks(create_mae("mae_vit_micro_patch8", img_size=64), torch.randn(2, 3, 64, 64), mask_ratio=0.75) == []
    vit = create_vit("vit_micro_patch8", img_size=64, num_classes=10, global_pool="avg", drop_path_rate=0.1)
    assert _breaks(vit, torch.randn(2, 3, 64, 64)) == []
    backbone = build_pyramid(build_vit("vit_micro_patch8", 128, window_size=4, use_rel_pos=True), "simple", 32)
    assert _breaks(backbone, torch.randn(2, 3, 128, 128)) == []
    cfg = build_config("toy", {})
    assert _breaks(build_segmenter(cfg), torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size)) == []


def test_coco_compile_compiles_the_backbone_only(tmp_path, cache, monkeypatch):
    """Mask R-CNN's heads have data-dependent shapes (dozens of graph breaks), so ``train.compile``
    compiles the detector's backbone in place (same parameter names) and not the whole model."""
    compiled = []

    def record(module, *args, **kwargs):
        compiled.append(type(module).__name__)

    def whole_model(*args, **kwargs):
        raise AssertionError("torch.compile of the whole detector")

    monkeypatch.setattr(torch.nn.Module, "compile", record)
    monkeypatch.setattr(torch, "compile", whole_model)
    small = [
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
    ]
    assert main(["coco", "--output", str(tmp_path / "det"), "--max-steps", "1", *small, "train.compile=true"]) == 0
    assert compiled == ["SimpleFeaturePyramid"]
    state = torch.load(tmp_path / "det" / "detector.pth", weights_only=True)["model"]
    assert any(k.startswith("backbone.net.blocks.0.") for k in state) and not any("_orig_mod" in k for k in state)
