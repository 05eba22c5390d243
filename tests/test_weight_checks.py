"""Every weights reader checks dtypes and completeness, and exports refuse what the target cannot
hold (issue 23): one line and exit 2 through the command, before any model runs or anything is
written. The bad files are made in tmp_path from the reference checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import shared_root

from mae_transfer.checkpoint import CheckpointError, check_dtypes
from mae_transfer.cli import main
from mae_transfer.models.vit import create_vit

REF = shared_root() / "reference"
VITDET, MMSEG = REF / "vitdet" / "model_final.pth", REF / "mmseg_upernet" / "checkpoint.pth"
DATA = shared_root() / "data"
needs_refs = pytest.mark.skipif(
    not VITDET.is_file() or not MMSEG.is_file(), reason=f"reference checkpoints not under {REF}"
)


def _refused(argv: list, capsys, *names: str) -> str:
    """Run the command in-process: exit 2, no traceback, one error line naming ``names``."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mae-transfer: error:")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, (rc, err)
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _cast(sd: dict, dtype: torch.dtype) -> dict:
    """Every floating-point tensor cast (integer buffers stay as they are)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def _vit_safetensors(path: Path, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    vit = create_vit("vit_micro_patch8", img_size=64, num_classes=0, global_pool="token")
    save_file(
        {k: (v > 0 if dtype == torch.bool else (v * 100).to(dtype)).contiguous() for k, v in vit.state_dict().items()},
        str(path),
    )
    return path


# ---------------------------------------------------------------------------- the checks themselves
def test_floating_point_weights_and_the_formats_integer_buffers_pass():
    check_dtypes(
        {
            "w": torch.zeros(2, dtype=torch.bfloat16),
            "bn.num_batches_tracked": torch.tensor(3),
            "layers.0.attn.relative_position_index": torch.zeros(2, 2, dtype=torch.long),
            "meta": "not a tensor",
        },
        "x",
    )
    for dtype in (torch.int32, torch.bool, torch.uint8, torch.complex64, torch.float8_e4m3fn):
        with pytest.raises(
            CheckpointError, match=rf"x: 1 weight tensors are not floating point: w \({str(dtype)[6:]}\)"
        ):
            check_dtypes({"w": torch.zeros(2).to(dtype)}, "x")
    with pytest.raises(
        CheckpointError, match=r"bn.num_batches_tracked \(bool\)"
    ):  # integer buffers: integers, not bool
        check_dtypes({"bn.num_batches_tracked": torch.tensor(True)}, "x")


@needs_refs
def test_the_reference_checkpoints_are_exactly_their_formats_complete_set():
    from mae_transfer.checkpoint.detectron2 import required_keys as vitdet_keys
    from mae_transfer.checkpoint.mmseg import required_keys as segmenter_keys
    from mae_transfer.checkpoint.mmseg import to_segmenter_state_dict

    d2 = torch.load(VITDET, weights_only=True)["model"]
    mm = torch.load(MMSEG, weights_only=True)["state_dict"]
    check_dtypes(d2, "vitdet")
    check_dtypes(mm, "mmseg")  # int64 relative_position_index and num_batches_tracked
    assert sorted(vitdet_keys(d2)) == sorted(d2)
    ours = to_segmenter_state_dict(mm)
    assert sorted(segmenter_keys(ours)) == sorted(ours)


def test_our_detector_and_segmenter_hold_exactly_the_complete_set():
    """The formats' lists agree with the models this toolkit builds (other sizes, one RPN conv, no
    relative position tables, no auxiliary head)."""
    from mae_transfer.checkpoint.detectron2 import required_keys as vitdet_keys
    from mae_transfer.checkpoint.mmseg import required_keys as segmenter_keys
    from mae_transfer.detection.config import build_config as detection_config
    from mae_transfer.detection.task import build_detector
    from mae_transfer.segmentation.config import build_config as segmentation_config
    from mae_transfer.segmentation.task import build_segmenter

    vit = {"name": None, "embed_dim": 64, "depth": 4, "num_heads": 2, "patch_size": 16, "img_size": 128}
    for model in (
        {**vit, "window_size": 4, "global_blocks": [1], "channels": 32, "fc_dim": 64},
        {**vit, "use_rel_pos": False, "rpn_convs": 1, "channels": 32, "fc_dim": 64},
    ):
        with torch.device("meta"):
            sd = build_detector(detection_config(None, {"model": model}), 7).state_dict()
        assert sorted(vitdet_keys(sd)) == sorted(sd), model
    for model in (
        {**vit, "channels": 32, "aux_channels": 16},
        {**vit, "channels": 32, "aux_channels": 0, "use_rel_pos": False},
    ):
        with torch.device("meta"):
            sd = build_segmenter(
                segmentation_config(None, {"model": model, "data": {"num_classes": 9}, "test": {"stride": 85}})
            ).state_dict()
        assert sorted(segmenter_keys(sd)) == sorted(sd), model


@pytest.mark.parametrize("pool,classes", [("token", 0), ("avg", 0), ("token", 7), ("avg", 7)])
def test_the_timm_list_is_timms_own_state_dict(pool, classes):
    timm = pytest.importorskip("timm")
    from mae_transfer.checkpoint.timm import timm_keys

    args = {
        "img_size": 64,
        "patch_size": 8,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "mlp_ratio": 4.0,
        "global_pool": pool,
        "class_token": True,
        "qkv_bias": True,
    }
    with torch.device("meta"):
        theirs = timm.create_model("vit_base_patch16_224", num_classes=classes, **args).state_dict()
    assert sorted(timm_keys(args, classes)) == sorted(theirs)


# ---------------------------------------------------------------------------- the commands
@needs_refs
def test_an_int32_mmseg_checkpoint_is_refused_before_evaluation(tmp_path, capsys):
    ck = torch.load(MMSEG, weights_only=True)
    bad = tmp_path / "int32.pth"
    torch.save({**ck, "state_dict": _cast(ck["state_dict"], torch.int32)}, bad)
    out = tmp_path / "eval"
    line = _refused(
        ["ade20k", "--eval-only", "--weights", bad, "--data", DATA / "ade20k_sample", "--output", out],
        capsys,
        str(bad),
        "173 weight tensors are not floating point: backbone.cls_token (int32)",
    )
    assert "relative_position_index" not in line.split(". Weights must")[0]  # the int64 buffers are the format's
    assert not out.exists()


@needs_refs
@pytest.mark.parametrize(
    "name,drop,argv,shown",
    [
        # A missing tensor of an mmseg file is named as mmseg names it.
        (
            "mmseg",
            "backbone.layers.2.ffn.layers.1.weight",
            ["ade20k", "--eval-only", "--weights"],
            "backbone.layers.2.ffn.layers.1.weight",
        ),
        (
            "mmseg",
            "decode_head.fpn_convs.1.bn.running_var",
            ["export", "--to", "mmseg", "--output"],
            "decode_head.fpn_convs.1.bn.running_var",
        ),
        (
            "vitdet",
            "roi_heads.box_predictor.bbox_pred.weight",
            ["coco", "--eval-only", "--weights"],
            "roi_heads.box_predictor.bbox_pred.weight",
        ),
        ("vitdet", "backbone.net.pos_embed", ["coco", "--eval-only", "--weights"], "backbone.net.pos_embed"),
        ("vitdet", "backbone.net.pos_embed", ["export", "--to", "detectron2", "--output"], "backbone.net.pos_embed"),
        (
            "vitdet",
            "roi_heads.box_predictor.bbox_pred.weight",
            ["export", "--to", "detectron2", "--output"],
            "bbox_pred.weight",
        ),
        (
            "vitdet",
            "backbone.net.blocks.2.attn.rel_pos_w",
            ["export", "--to", "detectron2", "--output"],
            "backbone.net.blocks.2.attn.rel_pos_w",
        ),
    ],
)
def test_a_whole_model_missing_a_tensor_is_refused(tmp_path, capsys, name, drop, argv, shown):
    ref, container = (VITDET, "model") if name == "vitdet" else (MMSEG, "state_dict")
    ck = torch.load(ref, weights_only=True)
    del ck[container][drop]
    bad = tmp_path / "incomplete.pth"
    torch.save(ck, bad)
    out = tmp_path / "out"
    if argv[0] == "export":
        cmd = ["export", bad, *argv[1:], out]
    else:
        cmd = [*argv, bad, "--data", DATA / ("coco_tiny" if name == "vitdet" else "ade20k_sample"), "--output", out]
    line = _refused(cmd, capsys, str(bad), shown, "1 tensors are missing")
    assert "not a complete" in line and not out.exists()


@needs_refs
def test_an_int32_detector_and_classifier_are_refused_for_evaluation(tmp_path, capsys):
    from mae_transfer.classification.config import build_config
    from mae_transfer.classification.task import build_classifier, save_classifier

    ck = torch.load(VITDET, weights_only=True)
    bad = tmp_path / "d2.pth"
    torch.save({**ck, "model": _cast(ck["model"], torch.int32)}, bad)
    _refused(
        ["coco", "--eval-only", "--weights", bad, "--data", DATA / "coco_tiny", "--output", tmp_path / "c"],
        capsys,
        str(bad),
        "133 weight tensors are not floating point",
        "(int32)",
    )
    cfg = build_config("toy_finetune", {})
    save_classifier(build_classifier(cfg, 10), cfg, tmp_path / "classifier.pth")
    state = torch.load(tmp_path / "classifier.pth", weights_only=True)
    torch.save({**state, "model": _cast(state["model"], torch.float8_e5m2)}, bad := tmp_path / "fp8.pth")
    _refused(
        ["finetune", "--eval-only", "--weights", bad, "--output", tmp_path / "f"], capsys, str(bad), "(float8_e5m2)"
    )
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32])
@pytest.mark.parametrize(
    "argv", [["finetune", "--backbone"], ["pretrain", "--init"], ["export", "--to", "timm", "--output"]]
)
def test_integer_and_bool_files_are_refused_as_backbone_init_and_export_input(tmp_path, capsys, dtype, argv):
    bad = _vit_safetensors(tmp_path / "vit.safetensors", dtype)
    out = tmp_path / "out"
    cmd = ["export", bad, *argv[1:], out] if argv[0] == "export" else [*argv, bad, "--output", out, "train.epochs=1"]
    _refused(
        cmd,
        capsys,
        f"checkpoint {bad}",
        f"weight tensors are not floating point: blocks.0.attn.proj.bias ({str(dtype)[6:]})",
    )
    # Nothing a run or an export writes (a refused run keeps at most its log).
    written = {p.name for p in out.rglob("*")} if out.exists() else set()
    assert written <= {"log.txt"}, written


def test_an_int32_torch_file_is_not_exported(tmp_path, capsys):
    vit = create_vit("vit_micro_patch8", img_size=64, num_classes=0)
    torch.save({"model": _cast(vit.state_dict(), torch.int32)}, bad := tmp_path / "enc.pth")
    for to in ("timm", "hf", "mae"):
        _refused(["export", bad, "--to", to, "--output", tmp_path / to], capsys, str(bad), "(int32)")
        assert not (tmp_path / to).exists()


# ---------------------------------------------------------------------------- classifiers to timm
def _classifier(tmp_path: Path, pool: str, protocol: str = "finetune") -> tuple[torch.nn.Module, Path]:
    from mae_transfer.classification.config import build_config
    from mae_transfer.classification.task import build_classifier, save_classifier

    cfg = build_config(f"toy_{protocol}", {"model": {"global_pool": pool}})
    torch.manual_seed(0)
    model = build_classifier(cfg, 10).eval()
    with torch.no_grad():  # a trained head and norms, not their initial values
        for name, p in model.named_parameters():
            if name.startswith(("head", "fc_norm", "norm")):
                p.normal_()
    return model, save_classifier(model, cfg, tmp_path / "classifier.pth")


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_a_fine_tuned_classifier_goes_to_timm_with_its_head(tmp_path, pool):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    model, path = _classifier(tmp_path, pool)
    out = tmp_path / "timm"
    assert main(["export", str(path), "--to", "timm", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 10 and config["global_pool"] == pool
    args = {k: v for k, v in config["model_args"].items() if k != "global_pool"}
    theirs = timm.create_model(config["architecture"], num_classes=10, global_pool=pool, **args).eval()
    theirs.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        assert ours.shape == (2, 10)
        assert (theirs(x) - ours).abs().max() <= 1e-5
        assert (timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x) - ours).abs().max() <= 1e-5


def test_heads_a_target_cannot_hold_are_refused_with_the_format_that_keeps_them(tmp_path, capsys):
    _, probe = _classifier(tmp_path, "token", "linprobe")  # BatchNorm + Linear: no export format holds it
    _refused(
        ["export", probe, "--to", "timm", "--output", tmp_path / "t"],
        capsys,
        "head.0.running_mean",
        "no --to format keeps them",
    )
    assert not (tmp_path / "t").exists()
    (tmp_path / "ft").mkdir()
    _, tuned = _classifier(tmp_path / "ft", "token")
    _refused(["export", tuned, "--to", "hf", "--output", tmp_path / "h"], capsys, "head.weight", "--to timm keeps them")
    assert not (tmp_path / "h").exists()
