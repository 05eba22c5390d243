"""Plots of benchmark results: fake run directories in, real PNGs out (no torch)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from mae_transfer.evaluation.plots import (
    backbone_colors,
    comparison_data,
    plot_all,
    plot_comparison,
    plot_pretraining,
    plot_training_curves,
    read_curve,
)

BACKBONES = ("mae", "random init")


def write_run(d: Path, start: float, steps: int = 40, eval_rows: int = 2, partial: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    lines = ["step,epoch,loss,lr,images_per_second"]
    lines += [
        f"{s},{s // 10},{start * math.exp(-s / 12) + 0.05 * (s % 3):.5f},{1e-3 * (1 - s / steps):.6g},"
        for s in range(steps)
    ]
    text = "\r\n".join(lines) + "\r\n"
    (d / "train.csv").write_text(text + ("40,4,0.1" if partial else ""))
    if eval_rows:
        (d / "eval.csv").write_text(
            "step,epoch,top1\n" + "".join(f"{10 * (i + 1)},{i + 1},{50 + i}\n" for i in range(eval_rows))
        )
    return d


def make_rows(tmp_path: Path) -> list[dict]:
    rows: list[dict] = []

    def add(job, bb, metric, value, protocol, run=True, toy=True):
        row = {
            "task": job,
            "backbone": bb,
            "metric": metric,
            "value": value,
            "protocol": protocol,
            "dataset": f"{job} (toy)" if toy else job,
        }
        if run:
            row["run_dir"] = str(tmp_path / "runs" / f"{job}-{bb.replace(' ', '_')}")
        rows.append(row)

    for i, bb in enumerate(BACKBONES):
        off = 0.0 if bb == "mae" else -20.0
        for job in ("coco", "ade20k", "inat2018", "linprobe"):
            write_run(
                tmp_path / "runs" / f"{job}-{bb.replace(' ', '_')}",
                start=5.0 + i,
                eval_rows=1 + i,
                partial=(job == "ade20k"),
            )
        add("coco", bb, "bbox_AP", 30.0 + off, "mask_rcnn_toy")
        add("coco", bb, "segm_AP", 28.0 + off, "mask_rcnn_toy")
        add("ade20k", bb, "mIoU", 99.0, "upernet_ms")
        add("ade20k", bb, "mIoU", 40.0 + off, "upernet_ss")
        add("ade20k", bb, "mIoU", 98.0, "upernet_ms+flip")
        add("linprobe", bb, "top1", 10.0, "linprobe")
        add("linprobe", bb, "top1", 60.0 + off, "linprobe")  # last row wins
        add("linprobe", bb, "top5", 90.0, "linprobe")
        add("knn", bb, "top1", 11.0, "knn10", run=False)
        add("knn", bb, "top1", 55.0 + off, "knn20", run=False)
        add("knn", bb, "top1", 12.0, "knn200", run=False)
    add("inat2018", "mae", "top1", 70.0, "finetune")
    add("inat2018", "random init", "job_failed", None, "finetune")
    add("finetune", "random init", "job_failed", None, "finetune")  # failed everywhere: no group
    add("mystery", "mae", "top1", 1.0, "finetune")  # unknown job: ignored
    return rows


def check_png(path: Path, min_size=(300, 200), min_colors: int = 8) -> None:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > min_size[0] and im.size[1] > min_size[1]
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) >= min_colors


def test_read_curve_partial_and_empty(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("step,loss,lr\n0,2.5,0.1\n1,,x\n2,1.5\n3,1.2,0.1\n4,1.")
    cols = read_curve(p)
    assert cols["step"] == [0.0, 1.0, 3.0]
    assert cols["loss"][0] == 2.5 and math.isnan(cols["loss"][1]) and cols["loss"][2] == 1.2
    assert math.isnan(cols["lr"][1])
    (tmp_path / "empty.csv").write_text("")
    assert read_curve(tmp_path / "empty.csv") == {}
    (tmp_path / "header.csv").write_text("step,loss\n")
    assert read_curve(tmp_path / "header.csv") == {"step": [], "loss": []}
    with pytest.raises(FileNotFoundError):
        read_curve(tmp_path / "missing.csv")


def test_comparison_data_exact(tmp_path):
    labels, values = comparison_data(make_rows(tmp_path))
    assert labels == ["COCO APbox", "COCO APmask", "ADE20K mIoU", "iNat 2018 top-1", "linear probe top-1", "k-NN top-1"]
    assert list(values) == ["mae", "random init"]
    assert values["mae"] == [30.0, 28.0, 40.0, 70.0, 60.0, 55.0]
    assert values["random init"] == [10.0, 8.0, 20.0, None, 40.0, 35.0]


def test_knn_falls_back_to_smallest_k_and_ade_to_any():
    rows = [
        {"task": "knn", "backbone": "b", "metric": "top1", "value": v, "protocol": p}
        for p, v in (("knn50", 5.0), ("knn10", 3.0), ("linprobe_sweep", 9.0))
    ]
    rows.append({"task": "ade20k", "backbone": "b", "metric": "mIoU", "value": 7.0, "protocol": "upernet_ms"})
    assert comparison_data(rows) == (["ADE20K mIoU", "k-NN top-1"], {"b": [7.0, 3.0]})


def test_plot_comparison_png_and_nothing_to_draw(tmp_path):
    out = plot_comparison(make_rows(tmp_path), tmp_path / "out" / "cmp.png", title="test")
    assert out == tmp_path / "out" / "cmp.png"
    check_png(out)
    failed_only = [{"task": "coco", "backbone": "mae", "metric": "job_failed", "value": None, "protocol": "x"}]
    assert plot_comparison(failed_only, tmp_path / "none.png") is None
    assert plot_comparison([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_training_curves_and_pretraining(tmp_path):
    runs = {
        "coco": {"mae": write_run(tmp_path / "a", 5.0), "random init": write_run(tmp_path / "b", 6.0)},
        "knn": {"mae": tmp_path / "no-such-dir"},
    }
    out = plot_training_curves(runs, tmp_path / "curves.png")
    check_png(out)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.csv").write_text("")
    assert plot_training_curves({"coco": {"mae": tmp_path / "empty"}}, tmp_path / "c2.png") is None
    assert plot_pretraining(tmp_path / "empty", tmp_path / "p2.png") is None
    assert not (tmp_path / "c2.png").exists() and not (tmp_path / "p2.png").exists()
    check_png(plot_pretraining(write_run(tmp_path / "pre", 1.0, steps=200, eval_rows=0), tmp_path / "pre.png"))


def test_plot_all(tmp_path):
    rows = make_rows(tmp_path)
    rows.append(
        {
            "task": "coco",
            "backbone": "ghost",
            "metric": "bbox_AP",
            "value": 1.0,
            "protocol": "p",
            "run_dir": str(tmp_path / "gone"),
        }
    )
    pre = write_run(tmp_path / "pretrain", 1.0, steps=100, eval_rows=0)
    paths = plot_all(rows, tmp_path / "plots", pretrain_dir=pre)
    assert [p.name for p in paths] == ["training_curves.png", "comparison.png", "pretraining.png"]
    for p in paths:
        check_png(p)
    assert sorted(f.name for f in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)  # no temp files left
    assert [p.name for p in plot_all([], tmp_path / "empty")] == []


def test_backbone_colors_stable():
    c = backbone_colors(["mae", "random init", "mae", "x"])
    assert list(c) == ["mae", "random init", "x"]
    assert c["mae"] == "tab:blue" and c["random init"] == "tab:orange"
    assert len(backbone_colors(f"b{i}" for i in range(12))) == 12
