"""`mae-transfer demo --quick`: pretraining, every transfer task from MAE and random weights, tables."""

from __future__ import annotations

from dataclasses import replace

from mae_transfer.cli import main
from mae_transfer.evaluation.demo import MAE_NAME, RANDOM_NAME, demo_tasks
from mae_transfer.evaluation.plots import comparison_data
from mae_transfer.evaluation.store import ResultStore

# The demo's run here takes one task of each kind (detection, segmentation, a classification dataset
# of the official files, k-NN); every other task's quick and full jobs are planned below (their
# settings resolve to configs), and each one runs in its own command's tests.
QUICK_TASKS = ["coco", "ade20k", "inat2018", "knn"]


def test_the_demo_plans_every_task_with_its_quick_and_full_settings(tmp_path):
    from mae_transfer.evaluation import demo, runner

    assert set(QUICK_TASKS) <= set(demo_tasks(quick=True)) and len(demo_tasks(quick=True)) >= 7
    backbones = [runner.Backbone(RANDOM_NAME, None)]
    for quick in (True, False):
        tasks = demo_tasks(quick)
        jobs = runner.plan_jobs(backbones, tasks, tmp_path / "res", overrides=demo._overrides(tasks, quick))
        assert [j.task for j in jobs] == tasks and len({j.key for j in jobs}) == len(tasks)


def test_quick_demo_runs_every_kind_of_task_and_resumes_without_work(tmp_path, cache, capsys, monkeypatch):
    # One epoch per schedule instead of --quick's 2-3, the transfer jobs cut to 2 steps (train.max_steps ends
    # with the final evaluation, the results and the pictures): the same code paths at a fraction of
    # the CI time.
    from mae_transfer.evaluation import demo
    from mae_transfer.evaluation.registry import TASKS

    monkeypatch.setattr(demo, "demo_tasks", lambda quick=False: list(QUICK_TASKS))
    monkeypatch.setattr(demo, "QUICK_ALL", ["train.epochs=1", "train.max_steps=2"])
    pretrain = TASKS["pretrain"]
    monkeypatch.setitem(TASKS, "pretrain", replace(pretrain, demo=replace(pretrain.demo, quick=("train.epochs=1",))))
    out_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out_dir)]) == 0
    out = capsys.readouterr().out
    for title in ("Table 4", "Table 5", "Table 6", "ImageNet"):
        assert title in out
    assert "Does the MAE encoder beat random weights" in out
    rows = ResultStore(out_dir / "results").read()
    assert not [r for r in rows if r["metric"] == "job_failed"]
    labels, values = comparison_data(rows)
    assert {r["task"] for r in rows} == set(QUICK_TASKS)
    assert len(labels) == len(QUICK_TASKS) + 1  # COCO reports APbox and APmask
    for label, mae, rnd in zip(labels, values[MAE_NAME], values[RANDOM_NAME]):  # measured for both, and reported
        assert mae is not None and rnd is not None, label
        assert f"\n  {label:26s} MAE {mae:6.2f}  random {rnd:6.2f}  " in out
    # The pictures it announces exist.
    assert list((out_dir / "pretrain" / "reconstructions").glob("*.png"))
    assert len(list((out_dir / "results" / "runs").glob("*/coco-*/visualize/*.png"))) >= 2
    assert len(list((out_dir / "results" / "runs").glob("*/ade20k-*/visualize/*.png"))) >= 2
    for name in ("comparison.png", "training_curves.png", "pretraining.png"):
        assert (out_dir / "results" / "plots" / name).stat().st_size > 1000
    assert {p.name for p in (out_dir / "results").iterdir()} >= {"tables.md", "tables.tex", "results.jsonl"}

    # A second run redoes nothing and prints the same tables.
    assert main(["demo", "--quick", "--output", str(out_dir)]) == 0
    again = capsys.readouterr().out
    assert "[pretrain] done before" in again
    assert again.count("done before, skipped") == 2 * len(QUICK_TASKS)
    assert ResultStore(out_dir / "results").read() == rows
    table = lambda text: text[text.index("**Table") : text.index("Does the MAE")]  # noqa: E731
    assert table(again) == table(out)
