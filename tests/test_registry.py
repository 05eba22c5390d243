"""The task registry: the README's "Adding a task" example, run as written, reaches every consumer.

A new task is one module (its config and TrainTask) plus one registry entry; with nothing else
changed it must be a `bench --tasks` choice, a command of the CLI, a job the runner runs, a column
of the tables and a bar of the plots.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from mae_transfer.checkpoint import export_mae_encoder
from mae_transfer.cli import main
from mae_transfer.evaluation import runner
from mae_transfer.evaluation.plots import comparison_data
from mae_transfer.evaluation.registry import TABLES, TASKS
from mae_transfer.evaluation.store import ResultStore
from mae_transfer.models.vit import create_vit

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> list[str]:
    """The Python blocks of the README's "Adding a task" section, in order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Adding a task", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def example_task(tmp_path, monkeypatch):
    blocks = readme_example()
    assert len(blocks) == 2, "the README's example is a task module and a registry entry"
    for block in blocks:
        name = re.match(r"# (\w+)\.py", block).group(1)
        (tmp_path / f"{name}.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_tasks  # noqa: F401 - registers the task

    yield TASKS["meanprobe"]
    TASKS.pop("meanprobe", None)
    TABLES.pop("probes", None)
    for mod in ("my_tasks", "my_probe"):
        sys.modules.pop(mod, None)


def test_a_task_added_through_the_registry_reaches_runner_cli_tables_and_plots(tmp_path, cache, example_task, capsys):
    assert "meanprobe" in runner.parse_tasks("all")
    with pytest.raises(SystemExit) as e:  # the CLI grew the command, with the family's options
        main(["meanprobe", "--help"])
    assert e.value.code == 0 and "--backbone" in capsys.readouterr().out

    encoder = export_mae_encoder(
        create_vit("vit_micro_patch8", img_size=64, num_classes=0, global_pool="token"), tmp_path / "enc.pth"
    )
    results = tmp_path / "results"
    argv = [
        "bench",
        "--backbone",
        f"mae={encoder}",
        "--backbone",
        "scratch=random",
        "--tasks",
        "meanprobe",
        "--results",
        str(results),
        "--in-process",
        "--set",
        "meanprobe:train.epochs=2",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [r for r in ResultStore(results).read() if r["task"] == "meanprobe"]
    assert {r["backbone"] for r in rows} == {"mae", "scratch"} and all(0 <= r["value"] <= 100 for r in rows)
    assert "Frozen-feature probes, top-1" in out and "mean-token probe" in out  # the bench's own tables

    assert main(["table", "--results", str(results)]) == 0
    table = capsys.readouterr().out
    line = next(ln for ln in table.splitlines() if ln.startswith("| mae |"))
    assert f"{next(r['value'] for r in rows if r['backbone'] == 'mae'):.1f}" in line

    labels, values = comparison_data(ResultStore(results).read())
    assert labels == ["mean-token probe top-1"] and set(values) == {"mae", "scratch"}
    assert (results / "plots" / "comparison.png").exists() and (results / "plots" / "training_curves.png").exists()
    # Run again: both jobs are found done and skipped.
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 2


def test_the_console_script_finds_task_modules_in_the_current_folder(tmp_path):
    """`MAE_TRANSFER_TASKS=my_tasks mae-transfer meanprobe` from the folder holding my_tasks.py (the
    README's example) works with the console script, which does not put that folder on sys.path;
    a module found nowhere is one line naming it and PYTHONPATH, for every command."""
    script = Path(sys.executable).parent / "mae-transfer"
    if not script.exists():
        pytest.skip("the mae-transfer console script is not installed in this environment")
    for block in readme_example():
        name = re.match(r"# (\w+)\.py", block).group(1)
        (tmp_path / f"{name}.py").write_text(block)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ok = subprocess.run(
        [str(script), "meanprobe", "--help"],
        cwd=tmp_path,
        env={**env, "MAE_TRANSFER_TASKS": "my_tasks"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "meanprobe" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run(
        [str(script), "--help"],
        cwd=tmp_path,
        env={**env, "MAE_TRANSFER_TASKS": "my_tasks,not_there"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
    assert "'not_there'" in lines[0] and "PYTHONPATH" in lines[0] and str(tmp_path) in lines[0]


def test_the_readme_task_evaluates_sharded_under_torchrun(tmp_path, cache):
    """The README's example under `torchrun --nproc_per_node 2` (gloo): the engine evaluates after
    training with every process on its shard (``ctx.loader``) and the example sums the counts
    (``ctx.all_sum``), so the top-1 equals one process's and every image is counted once. The
    learning rate is too small to move the weights, so both runs evaluate the same (seeded) model: a
    process scoring only its own half would print another number, one scoring all of them would count
    every image twice."""
    for block in readme_example():
        name = re.match(r"# (\w+)\.py", block).group(1)
        (tmp_path / f"{name}.py").write_text(block)
    encoder = export_mae_encoder(
        create_vit("vit_micro_patch8", img_size=64, num_classes=0, global_pool="token"), tmp_path / "enc.pth"
    )
    env = {**os.environ, "MAE_TRANSFER_TASKS": "my_tasks", "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    common = ["-m", "mae_transfer", "meanprobe", "--backbone", str(encoder), "train.epochs=1", "optim.lr=1e-12"]
    launchers = {
        1: [sys.executable],
        2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    }
    from mae_transfer.classification.datasets import build_dataset

    val = build_dataset("imagefolder", None, "val")
    top1, images = {}, {}
    for procs, launcher in launchers.items():
        out = tmp_path / f"run{procs}"
        argv = [*launcher, *common, "--output", str(out), "train.device=cpu"]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert [r["metric"] for r in rows] == ["top1"]
        top1[procs] = rows[0]["value"]
        # Every image scored once over all processes (not once per process, not half of them).
        [final] = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
        images[procs] = final["images"]
    assert top1[1] == top1[2] and images[1] == images[2] == len(val), (top1, images)


def test_one_knn_column_rule_for_tables_and_the_runner():
    from mae_transfer.engine.results import ResultRow
    from mae_transfer.spec import preferred_knn_protocol

    assert preferred_knn_protocol(["knn10", "knn20", "knn200", "linprobe_sweep"]) == "knn20"
    assert preferred_knn_protocol(["knn100", "knn10", None]) == "knn10"  # no k=20: the smallest k
    assert preferred_knn_protocol(["linprobe_sweep", None]) is None
    rows = [
        ResultRow(task="knn", protocol=f"knn{k}", metric="top1", value=float(k), dataset="d", split="val")
        for k in (100, 10)
    ]
    assert runner.headline(rows) == "top-1 10.00"
