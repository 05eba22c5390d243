"""``bench --trainable-blocks``: the MAE paper's Figure 9 (top-1 against the number of last blocks
fine-tuned) in one command. k = 0 is the linprobe job and k = depth the finetune job (the very jobs of
a bench without the grid, each run once), the others partial fine-tuning jobs; the table "Figure 9"
and plots/partial_finetuning.png come from their rows, which stay out of the paper's tables."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch

from mae_transfer.checkpoint import export_mae_encoder
from mae_transfer.cli import main
from mae_transfer.config import ConfigError
from mae_transfer.evaluation import runner as bench
from mae_transfer.evaluation.plots import comparison_data, partial_finetuning_data, plot_partial_finetuning
from mae_transfer.evaluation.store import ResultStore
from mae_transfer.evaluation.tables import FIGURE9_TITLE, render
from mae_transfer.models.vit import create_vit


@pytest.fixture
def encoder(tmp_path) -> Path:
    torch.manual_seed(0)
    vit = create_vit("vit_nano_patch8", img_size=64, num_classes=0, global_pool="token")  # 2 blocks
    return export_mae_encoder(vit, tmp_path / "weights" / "enc.pth")


def test_the_grid_plans_linprobe_partial_and_finetune_jobs_each_once(tmp_path, encoder):
    bbs = bench.parse_backbones([f"mae={encoder}", "scratch=random"])
    res = tmp_path / "res"
    plain = bench.plan_jobs(bbs, ["linprobe", "finetune"], res)
    assert bench.plan_jobs(bbs, ["linprobe", "finetune"], res, trainable_blocks=None) == plain
    key = {(j.backbone.name, j.task): j.key for j in plain}

    grid = bench.plan_jobs(bbs, ["finetune"], res, trainable_blocks=bench.parse_trainable_blocks("0,1,full"))
    got = [(j.backbone.name, j.task, j.trainable_blocks, j.depth) for j in grid]
    assert got == [
        (b, t, k, 2) for b in ("mae", "scratch") for t, k in (("linprobe", 0), ("finetune", 1), ("finetune", 2))
    ]
    for j in grid:  # k = 0 and k = depth: the jobs of the plain bench (same key, run directory, command)
        if j.trainable_blocks in (0, 2):
            assert j.key == key[j.backbone.name, j.task] and not j.partial
            assert j.run_dir.name == f"{j.task}-{j.key[:8]}" and "--trainable-blocks" not in j.argv
        else:
            assert j.partial and j.task == "finetune" and j.argv[0] == "finetune"
            assert j.argv[j.argv.index("--trainable-blocks") + 1] == "1"
            assert (
                j.run_dir.name == f"finetune-partial1-{j.key[:8]}"
                and j.label == f"finetune · {j.backbone.name} · last 1 block"
            )
    assert len({j.key for j in grid}) == len({j.run_dir for j in grid}) == 6

    # linprobe also asked for, before or after finetune: one job, where it comes first; figure9 on a
    # 2-block ViT is 0, 1, 2; planning again gives the same keys.
    for tasks in (["linprobe", "finetune"], ["finetune", "linprobe"]):
        again = bench.plan_jobs(bbs, tasks, res, trainable_blocks=["figure9"])
        assert [j.key for j in again] == [j.key for j in grid]
    assert bench.grid_blocks(["figure9"], 12) == [0, 1, 2, 4, 6, 12]  # ViT-B, the paper's ticks
    assert bench.grid_blocks(["figure9"], 24) == [0, 1, 2, 4, 6, 12, 18, 24]  # ViT-L, the paper's grid

    # With --seeds, every job of the grid is seeded; the first seed is the job above.
    seeded = bench.plan_jobs(bbs[:1], ["finetune"], res, seeds=2, trainable_blocks=[1])
    assert [(j.trainable_blocks, j.seed) for j in seeded] == [(1, 0), (1, 1)]
    assert seeded[0].key == grid[1].key and seeded[1].key != seeded[0].key and seeded[1].partial


def test_bad_grids_say_what_to_give(tmp_path, encoder):
    bbs = bench.parse_backbones([f"mae={encoder}"])
    res = tmp_path / "res"
    with pytest.raises(ConfigError, match=r"--trainable-blocks '1,x'.*0,1,2,4,6,full"):
        bench.parse_trainable_blocks("1,x")
    with pytest.raises(ConfigError, match=r"--trainable-blocks 3: mae's vit_nano_patch8 has 2 blocks"):
        bench.plan_jobs(bbs, ["finetune"], res, trainable_blocks=[0, 3])
    with pytest.raises(ConfigError, match="add finetune to --tasks"):
        bench.plan_jobs(bbs, ["linprobe"], res, trainable_blocks=[0, 1])
    with pytest.raises(ConfigError, match="leave that --set out"):
        bench.plan_jobs(bbs, ["finetune"], res, overrides={"*": ["model.trainable_blocks=1"]}, trainable_blocks=[1])
    # k = 0 is the linprobe job: its --set is used, not refused as a task not run.
    (job, *_rest) = bench.plan_jobs(
        bbs, ["finetune"], res, overrides={"linprobe": ["train.epochs=1"]}, trainable_blocks=[0, 1]
    )
    assert job.task == "linprobe" and job.options["overrides"] == ["train.epochs=1"]


def _row(bb, task, protocol, value, key, k=None, **extra):
    row = {"task": task, "backbone": bb, "model": "vit_micro_patch8", "dataset": "imagefolder (toy)"}
    row.update(protocol=protocol, metric="top1", value=value, job_key=key, **extra)
    if k is not None:
        row.update(trainable_blocks=k, model_depth=4)
    return row


def test_figure9_table_and_points_from_rows(tmp_path):
    rows = [
        # mae: the linear probe and full fine-tuning ran before the grid (no k on their rows).
        _row("mae", "linprobe", "linprobe", 30.0, "m0"),
        _row("mae", "finetune", "finetune", 60.0, "m4"),
        _row("mae", "finetune", "partial", 50.0, "m1", 1),
        _row("mae", "finetune", "partial", 54.0, "m2", 2),
        # scratch: two seeds at k = 1, a failed k = 2.
        _row("scratch", "linprobe", "linprobe", 10.0, "s0", 0),
        _row("scratch", "finetune", "partial", 20.0, "s1", 1, seed=0, seed_group="s1", seed_base=0),
        _row("scratch", "finetune", "partial", 24.0, "s1b", 1, seed=1, seed_group="s1", seed_base=0),
        {**_row("scratch", "finetune", "partial", None, "s2", 2), "metric": "job_failed"},
        _row("scratch", "finetune", "finetune", 40.0, "s4", 4),
    ]
    md = render(rows, paper=True)
    fig9 = md[md.index(FIGURE9_TITLE) :]
    assert "| method | ViT | data | 0 (linear) | 1 | 2 | 4 (full) |" in fig9
    assert "| mae | micro | toy | **30.0** (+20.0) | **50.0** (+28.0) | **54.0** | **60.0** (+20.0) |" in fig9
    assert "| scratch | micro | toy | 10.0 | 22.0 ± 2.8 (2) | failed | 40.0 |" in fig9
    assert "| MAE (paper) | L | IN1K | 73.5 | 81.0 | 83.1 | 84.2 |" in fig9
    # The ImageNet table: full fine-tuning and the linear probe only; a failed partial job is no failure there.
    imagenet = md[md.index("ImageNet-style") : md.index(FIGURE9_TITLE)]
    assert "| mae | micro | toy | **60.0** (+20.0) | **30.0** (+20.0) |" in imagenet
    assert "| scratch | micro | toy | 40.0 | 10.0 |" in imagenet
    assert comparison_data(rows) == (
        ["ImageNet fine-tune top-1", "linear probe top-1"],
        {"mae": [60.0, 30.0], "scratch": [40.0, 10.0]},
    )
    # The CSV lists every seed; the plot's points are the table's numbers.
    text = render(rows, "csv", paper=False).split(f"# {FIGURE9_TITLE}\n")[1]
    lines = list(csv.DictReader(io.StringIO(text)))
    assert [(r["method"], r["seed"], r["1"]) for r in lines] == [
        ("mae", "", "50.0"),
        ("scratch", "mean", "22.0"),
        ("scratch", "0", "20.0"),
        ("scratch", "1", "24.0"),
    ]
    ks, series, depth = partial_finetuning_data(rows)
    assert ks == [0, 1, 2, 4] and depth == {"mae": 4, "scratch": 4}
    assert [v for v, _, _ in series["mae"]] == [30.0, 50.0, 54.0, 60.0]
    assert series["scratch"][1][1] == pytest.approx(2.828, abs=1e-3) and series["scratch"][2] == (None, None, True)
    assert plot_partial_finetuning(rows, tmp_path / "fig9.png").read_bytes()[:4] == b"\x89PNG"
    # A bench of linprobe and finetune without the grid: no Figure 9, the tables read as before; the
    # same jobs of a grid 0,full: Figure 9 with those two points.
    plain = [
        {k: v for k, v in r.items() if k not in ("trainable_blocks", "model_depth")}
        for r in rows
        if r["protocol"] != "partial"
    ]
    assert FIGURE9_TITLE not in render(plain) and render(plain) == md[: md.index(f"**{FIGURE9_TITLE}")].rstrip() + "\n"
    grid = [{**r, "trainable_blocks": 4 if r["task"] == "finetune" else 0} for r in plain]
    assert "| mae | micro | toy | **30.0** (+20.0) | **60.0** (+20.0) |" in render(grid)


def test_figure9_on_toy_data_in_one_command(tmp_path, cache, capsys):
    res = tmp_path / "res"
    argv = ["bench", "--backbone", "r=random", "--random-model", "vit_nano_patch8", "--trainable-blocks", "figure9"]
    # One epoch, 32 px, no loader workers (their start costs more than this data): about 2 CPU-s a job.
    argv += ["--set", "*:train.epochs=1", "--set", "*:model.img_size=32", "--set", "*:train.num_workers=0"]
    argv += ["--results", str(res), "--in-process"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 jobs: 1 backbone(s) x 1 task(s); finetune as a grid over 0,1,2 blocks fine-tuned" in out
    assert "jobs: 3 run, 0 already done" in out and "no metric" not in out
    rows = [r for r in ResultStore(res).read() if r["metric"] == "top1"]
    assert sorted((r["task"], r["protocol"], r["trainable_blocks"]) for r in rows) == [
        ("finetune", "finetune", 2),
        ("finetune", "partial", 1),
        ("linprobe", "linprobe", 0),
    ]
    value = {r["trainable_blocks"]: r["value"] for r in rows}
    assert "finetune · r · last 1 block: done in" in out and f"top-1 {value[1]:.2f}" in out
    line = f"| r | nano | toy | {' | '.join(f'**{value[k]:.1f}**' for k in (0, 1, 2))} |"
    print(line)
    assert FIGURE9_TITLE in out and line in out and line in (res / "tables.md").read_text()
    assert (res / "table_figure9.csv").exists()
    plot = res / "plots" / "partial_finetuning.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"{plot}" in out
    # The same command again: nothing to run.
    before = (res / "results.jsonl").read_text()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 3 and "jobs: 0 run, 3 already done" in out
    assert (res / "results.jsonl").read_text() == before
