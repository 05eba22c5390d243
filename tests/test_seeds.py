"""``bench --seeds N``: every seed a job of its own (key, run directory, skipped when done), the
tables' ``mean ± std (n)``, every run in the CSV, error bars in the plots; a store without seeds
reads exactly as before."""

from __future__ import annotations

import csv
import hashlib
import io
import statistics

from mae_transfer.cli import main
from mae_transfer.evaluation import runner as bench
from mae_transfer.evaluation.plots import _comparison, comparison_data
from mae_transfer.evaluation.store import ResultStore
from mae_transfer.evaluation.tables import SEEDS_NOTE, render


def _csv_rows(path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_bench_seeds_runs_each_seed_once_and_tabulates_mean_and_std(tmp_path, cache, capsys):
    res = tmp_path / "res"
    argv = ["bench", "--backbone", "r=random", "--tasks", "linprobe", "--set", "linprobe:train.epochs=1"]
    argv += ["--results", str(res), "--in-process"]
    assert main([*argv, "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    runs = sorted((r for r in ResultStore(res).read() if r["metric"] == "top1"), key=lambda r: r["seed"])
    assert [r["seed"] for r in runs] == [0, 1, 2]
    assert len({r["job_key"] for r in runs}) == 3 and len({r["run_dir"] for r in runs}) == 3
    assert {r["seed_group"] for r in runs} == {runs[0]["job_key"]} and {r["seed_base"] for r in runs} == {0}
    # The first seed is the job of a bench without --seeds: same key (the pinned identities hold).
    plain = bench.plan_jobs(
        bench.parse_backbones(["r=random"]), ["linprobe"], res, overrides={"linprobe": ["train.epochs=1"]}
    )
    assert [j.key for j in plain] == [runs[0]["job_key"]] and plain[0].seed is None

    values = [r["value"] for r in runs]
    mean, std = statistics.mean(values), statistics.stdev(values)  # the sample std (n - 1)
    cell = f"**{mean:.1f} ± {std:.1f}** (3)"  # bold: the best (only) backbone
    print(f"seeds 0,1,2: {values} -> {cell}")
    line = f"| r | micro | toy | {cell} |"
    assert line in out and line in (res / "tables.md").read_text()
    assert SEEDS_NOTE.replace("_", "\\_") in out
    # The CSV: the mean (with std and n), then every run with its seed.
    lines = _csv_rows(res / "table_imagenet.csv")
    ours = [r for r in lines if r["block"] == "ours"]
    assert [r["seed"] for r in ours] == ["mean", "0", "1", "2"]
    assert float(ours[0]["linear probe"]) == round(mean, 4) and float(ours[0]["linear probe_std"]) == round(std, 4)
    assert ours[0]["linear probe_n"] == "3"
    assert [float(r["linear probe"]) for r in ours[1:]] == values
    # The plots: the mean, and the std as the error bar.
    stored = ResultStore(res).read()
    assert comparison_data(stored) == (["linear probe top-1"], {"r": [mean]})
    assert _comparison(stored)[3] == {"r": [std]}
    assert (res / "plots" / "comparison.png").stat().st_size > 0

    # The same command again runs nothing.
    before, tables = (res / "results.jsonl").read_text(), (res / "tables.md").read_text()
    assert main([*argv, "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 3 and "jobs: 0 run, 3 already done" in out
    assert (res / "results.jsonl").read_text() == before and (res / "tables.md").read_text() == tables

    # Without --seeds: the first seed's job, done; its tables hold one number, no "(1)".
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 1 and f"| r | micro | toy | **{values[0]:.1f}** |" in out
    assert "±" not in out.split("Paper rows")[0]


def _row(bb, task, protocol, metric, value, dataset, key, model="vit_micro_patch8"):
    return {
        "task": task,
        "backbone": bb,
        "model": model,
        "dataset": dataset,
        "protocol": protocol,
        "metric": metric,
        "value": value,
        "job_key": key,
    }


def _single_seed_store() -> list[dict]:
    rows = []
    for bb, ap, miou, ft, lin, knn in (
        ("mae", 31.25, 15.0, 60.0, 41.5, 33.0),
        ("scratch", 12.5, 5.0, 50.0, 20.25, 23.0),
    ):
        rows += [
            _row(bb, "coco", "mask_rcnn_toy", "bbox_AP", ap, "coco (toy)", f"{bb}-coco"),
            _row(bb, "coco", "mask_rcnn_toy", "segm_AP", ap - 3, "coco (toy)", f"{bb}-coco"),
            _row(bb, "ade20k", "toy_ss", "mIoU", miou, "ade20k (toy)", f"{bb}-ade"),
            _row(bb, "finetune", "finetune", "top1", ft, "imagefolder (toy)", f"{bb}-ft"),
            _row(bb, "linprobe", "linprobe", "top1", lin, "imagefolder (toy)", f"{bb}-lin"),
            _row(bb, "knn", "knn20", "top1", knn, "imagefolder (toy)", f"{bb}-knn"),
        ]
    rows.append(_row("mae", "linprobe", "linprobe", "top1", 42.75, "imagefolder (toy)", "mae-lin2"))  # last row wins
    rows.append(
        {"task": "ade20k", "backbone": "scratch", "metric": "job_failed", "value": None, "job_key": "scratch-ade"}
    )
    return rows


# What the tables of _single_seed_store() read before seeds existed (rendered by the code before
# them, without the paper's rows, which paper.yaml may extend).
BEFORE_IMAGENET_MD = """\
**ImageNet-style classification, top-1**

| method | ViT | data | fine-tune | linear probe | k-NN |
|:---|:---|:---|---:|---:|---:|
| mae | micro | toy | **60.0** (+10.0) | **42.8** (+22.5) | **33.0** (+10.0) |
| scratch | micro | toy | 50.0 | 20.2 | 23.0 |

(±x.x): difference to scratch. k-NN: top-1 of the weighted k-NN classifier, k=20. Our protocols: finetune, \
linprobe, knn20. Our rows ran on the built-in toy data: they check the pipeline and are not comparable with \
the paper's rows.
"""
BEFORE_CSV = (
    "# Table 4: COCO object detection and instance segmentation (Mask R-CNN)\n"
    "block,method,size,data,APbox,APbox_delta,APmask,APmask_delta\n"
    "ours,mae,micro,toy,31.25,18.75,28.25,18.75\nours,scratch,micro,toy,12.5,,9.5,\n\n"
    "# Table 5: ADE20K semantic segmentation (UperNet)\nblock,method,size,data,mIoU,mIoU_delta\n"
    "ours,mae,micro,toy,15.0,\nours,scratch,micro,toy,failed,\n\n"
    "# ImageNet-style classification, top-1\n"
    "block,method,size,data,fine-tune,fine-tune_delta,linear probe,linear probe_delta,k-NN,k-NN_delta\n"
    "ours,mae,micro,toy,60.0,10.0,42.75,22.5,33.0,10.0\nours,scratch,micro,toy,50.0,,20.25,,23.0,\n"
)
BEFORE_SHA256 = {
    "markdown": "2febb61037931d87c77ac8a9b97720e8fec5eb508894281fdc4304ac5c057118",
    "latex": "bcdde9baf55bf476218ddeca259a768d5fcb46607944b1bf114829550f6f7a46",
    "csv": "6bc770cfcf6cd4537e513664546aae6da217ec20385cfe443d49b51f7eafcc25",
}


def test_a_store_without_seeds_reads_exactly_as_before():
    rows = _single_seed_store()
    got = {fmt: render(rows, fmt, paper=False) for fmt in BEFORE_SHA256}
    assert got["markdown"].endswith(BEFORE_IMAGENET_MD) and got["csv"] == BEFORE_CSV
    assert {fmt: hashlib.sha256(text.encode()).hexdigest() for fmt, text in got.items()} == BEFORE_SHA256
    # One seed per job of a seeded benchmark reads the same: no "n=1".
    tagged = [{**r, "seed": 0, "seed_group": r["job_key"], "seed_base": 0} for r in rows]
    assert {fmt: render(tagged, fmt, paper=False) for fmt in BEFORE_SHA256} == got
    assert comparison_data(tagged) == comparison_data(rows)


def test_seeds_join_a_first_seed_run_without_seeds_and_a_failed_seed_leaves_the_others():
    first = _row("mae", "linprobe", "linprobe", "top1", 40.0, "imagefolder (toy)", "k0")  # a bench without --seeds
    more = [
        {**_row("mae", "linprobe", "linprobe", "top1", v, "imagefolder (toy)", f"k{s}"), "seed": s}
        for s, v in ((1, 44.0), (2, 42.0))
    ]
    for r in more:
        r.update(seed_group="k0", seed_base=0)
    failed = {"task": "linprobe", "backbone": "mae", "metric": "job_failed", "value": None, "job_key": "k3"}
    failed.update(seed=3, seed_group="k0", seed_base=0)
    md = render([first, *more, failed], paper=False)
    assert "| mae | micro | toy | **42.0 ± 2.0** (3) |" in md
    text = render([first, *more, failed], "csv", paper=False)
    lines = list(csv.DictReader(io.StringIO(text.split("\n", 1)[1])))
    assert [(r["seed"], r["linear probe"]) for r in lines] == [
        ("mean", "42.0"),
        ("0", "40.0"),
        ("1", "44.0"),
        ("2", "42.0"),
    ]
    # Only failures: the cell fails as before.
    assert "| mae | – | – | failed |" in render([failed], paper=False)
