"""``mae-transfer demo``: the whole toolkit on the built-in toy data, no dataset needed.

1. pretrain a tiny MAE (micro ViT, 64 px) on the toy ImageFolder;
2. run every transfer task on toy data in its dataset's real on-disk format, once from the MAE
   encoder and once from random weights of the same network, through the benchmark runner;
3. print the paper-style tables, write them (Markdown, LaTeX, CSV) and the plots, check that every
   task's metric beats the random-init run, and say where the pictures are.

Everything lives under one folder and resumes: running the demo again redoes nothing that finished.
The schedules below are sized for 2 CPU cores; they are demos of the pipelines, not paper recipes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mae_transfer.evaluation import runner
from mae_transfer.evaluation.registry import TASKS, benchmark_tasks
from mae_transfer.io import file_sha256

log = logging.getLogger(__name__)

MAE_NAME = "MAE (toy pretraining)"
RANDOM_NAME = "random init"
# Every run of the demo on top of a task's toy preset (each task's own settings are in its
# registry entry, ``TaskSpec.demo``): --quick shortens every schedule to 2 epochs.
QUICK_ALL = ["train.epochs=2"]


def demo_tasks(quick: bool = False) -> list[str]:
    """The benchmark tasks the demo runs (``--quick``: those whose entry has quick settings)."""
    plans = {t: TASKS[t].demo for t in benchmark_tasks()}
    return [t for t, plan in plans.items() if plan is not None and (not quick or plan.quick is not None)]


def _overrides(tasks: list[str], quick: bool) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for task in tasks:
        spec = TASKS[task]
        if spec.trains:  # k-NN trains nothing
            out[task] = (QUICK_ALL + list(spec.demo.quick or ())) if quick else list(spec.demo.full)
    return out


def run_demo(output: Path, quick: bool = False, verbose: bool = False, echo=print) -> int:
    from mae_transfer.evaluation.plots import comparison_data
    from mae_transfer.evaluation.report import write_report

    t0 = time.perf_counter()
    tasks = demo_tasks(quick)
    output = Path(output)
    echo(f"mae-transfer demo{' --quick' if quick else ''}: everything goes to {output}/ (run again to resume)")

    # 1. MAE pretraining on the toy ImageFolder (the registry's pretraining entry).
    pretrain = next(spec for spec in TASKS.values() if spec.family == "pretrain")
    pre_dir = output / pretrain.name
    encoder = pre_dir / "encoder.pth"
    if encoder.exists():
        echo(f"[pretrain] done before: {encoder}")
    else:
        echo(f"[pretrain] a micro MAE on the toy images (log: {pre_dir / 'log.txt'})")
        pre_dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        rc = runner.run_in_process(
            pretrain,
            {"overrides": list(pretrain.demo.quick if quick else pretrain.demo.full), "output": str(pre_dir)},
            pre_dir / "bench.log",
            verbose,
        )
        if rc in (130, 143):
            echo("[pretrain] interrupted; run the demo again to resume")
            return rc
        if rc != 0 or not encoder.exists():
            echo(f"[pretrain] FAILED (exit {rc}); see {pre_dir / 'bench.log'}")
            return 1
        echo(f"[pretrain] done in {time.perf_counter() - t:.0f} s: {encoder}")

    # 2. Every transfer task from the MAE encoder and from random weights.
    results = output / "results"
    backbones = [
        runner.Backbone(MAE_NAME, str(encoder.resolve()), file_sha256(encoder)),
        runner.Backbone(RANDOM_NAME, None),
    ]
    from mae_transfer.data.toy import ensure_toy_dataset

    larger = {t: TASKS[t] for t in tasks if TASKS[t].demo.toy_data and not quick}
    data = {t: str(ensure_toy_dataset(**spec.toy_data.arguments(), **spec.demo.toy_data)) for t, spec in larger.items()}
    # A --data folder means real data to the task commands, so name the toy preset explicitly.
    presets = {t: spec.toy_preset for t, spec in larger.items()}
    jobs = runner.plan_jobs(backbones, tasks, results, data=data, presets=presets, overrides=_overrides(tasks, quick))
    echo(f"[transfer] {len(jobs)} jobs ({len(tasks)} tasks x 2 backbones); results: {results / 'results.jsonl'}")
    try:
        outcomes = runner.run_jobs(jobs, results, in_process=True, verbose=verbose)
    except runner.BenchInterrupted as e:
        echo(f"[transfer] {e}")
        return 143

    # 3. Tables, plots, the check against random init, and where the pictures are.
    rows = runner.latest_rows(results, jobs)
    markdown, tables, plots = write_report(rows, results, RANDOM_NAME, pretrain_dir=pre_dir)
    echo("")
    echo(markdown)
    echo("")
    echo("Does the MAE encoder beat random weights on every task?")
    # The same headline metrics as the comparison bars (plots.comparison_data).
    labels, values = comparison_data(rows)
    mae_values, rnd_values = values.get(MAE_NAME, [None] * len(labels)), values.get(RANDOM_NAME, [None] * len(labels))
    wins, width = 0, max([26, *map(len, labels)])  # one column for the longest label
    for label, mae, rnd in zip(labels, mae_values, rnd_values):
        ok = mae is not None and rnd is not None and mae > rnd
        wins += ok
        fmt = lambda v: "failed" if v is None else f"{v:6.2f}"  # noqa: E731
        echo(f"  {label:{width}s} MAE {fmt(mae)}  random {fmt(rnd)}  {'yes' if ok else 'NO'}")
    echo(f"  {wins} of {len(labels)} metrics{' (--quick schedules are too short to mean much)' if quick else ''}")
    echo("")
    echo("Pictures:")
    echo(
        f"  MAE reconstructions (original | masked | prediction | prediction + visible): {pre_dir / 'reconstructions'}"
    )
    for job in jobs:
        if (job.run_dir / "visualize").is_dir():
            what = job.spec.dense.what if job.spec.dense else "pictures"
            echo(f"  {job.task} {what} ({job.backbone.name}): {job.run_dir / 'visualize'}")
    for path in plots:
        echo(f"  plot: {path}")
    if tables:
        echo(f"Tables: {', '.join(str(p) for p in tables.values())}")
    failed = [o for o in outcomes if o.status == "failed"]
    echo(f"demo finished in {time.perf_counter() - t0:.0f} s" + (f"; {len(failed)} job(s) FAILED" if failed else ""))
    return 1 if failed else 0
