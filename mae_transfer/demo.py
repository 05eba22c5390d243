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

from mae_transfer import bench
from mae_transfer.io import file_sha256

log = logging.getLogger(__name__)

MAE_NAME = "MAE (toy pretraining)"
RANDOM_NAME = "random init"
TASKS = ("coco", "ade20k", "inat2017", "inat2018", "inat2019", "places205", "places365", "finetune", "linprobe", "knn")

# Per-task overrides of the toy presets (KEY=VALUE, as on the command line).
FULL = {
    "pretrain": ["--epochs", "30"],
    "*": [],
    # 64 px, the pretraining size, with windows as large as the pretraining grid (ViTDet's rule:
    # window = the global attention size of pretraining); 20 epochs of the toy preset.
    "coco": ["model.img_size=64", "model.window_size=8"],
    "ade20k": ["train.epochs=12"],
    "finetune": ["train.epochs=15"],
    "linprobe": ["train.epochs=15"],
    "inat2017": ["train.epochs=25"], "inat2018": ["train.epochs=25"], "inat2019": ["train.epochs=25"],
    "places205": ["train.epochs=25"], "places365": ["train.epochs=25"],
}
QUICK = {
    "pretrain": ["--epochs", "3"],
    "*": ["train.epochs=2"],
    "coco": ["train.epochs=2", "model.img_size=64", "model.window_size=8"],
    "ade20k": ["train.epochs=2"],
}
# iNaturalist / Places toy splits with 20 validation images per class instead of 5, so that the
# comparison with random weights is not decided by one or two images.
TOY_DATA = {"inat2017": {"val_per_category": 20}, "inat2018": {"val_per_category": 20}, "inat2019": {"val_per_category": 20},
            "places205": {"val_per_category": 20}, "places365": {"val_per_category": 20},
            # 64 toy COCO validation scenes instead of 16: AP on 16 scenes moves by points between runs.
            "coco": {"val_images": 64}}
# The presets these larger toy splits run with (their commands see a --data folder, i.e. real data).
TOY_PRESET = {"coco": "toy"}
QUICK_TASKS = ("coco", "ade20k", "inat2018", "places365", "finetune", "linprobe", "knn")


def _overrides(settings: dict, tasks: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for task in tasks:
        if task != "knn":  # k-NN trains nothing
            out[task] = settings.get("*", []) + settings.get(task, [])
    return out


def run_demo(output: Path, quick: bool = False, verbose: bool = False, echo=print) -> int:
    from mae_transfer.cli import _report
    from mae_transfer.report.plots import comparison_data

    t0 = time.perf_counter()
    settings, tasks = (QUICK, QUICK_TASKS) if quick else (FULL, TASKS)
    output = Path(output)
    echo(f"mae-transfer demo{' --quick' if quick else ''}: everything goes to {output}/ (run again to resume)")

    # 1. MAE pretraining on the toy ImageFolder.
    pre_dir = output / "pretrain"
    encoder = pre_dir / "encoder.pth"
    if encoder.exists():
        echo(f"[pretrain] done before: {encoder}")
    else:
        echo(f"[pretrain] a micro MAE on the toy images (log: {pre_dir / 'log.txt'})")
        pre_dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        rc = bench.run_in_process(["pretrain", *settings["pretrain"], "--output", str(pre_dir)], pre_dir / "bench.log", verbose)
        if rc in (130, 143):
            echo("[pretrain] interrupted; run the demo again to resume")
            return rc
        if rc != 0 or not encoder.exists():
            echo(f"[pretrain] FAILED (exit {rc}); see {pre_dir / 'bench.log'}")
            return 1
        echo(f"[pretrain] done in {time.perf_counter() - t:.0f} s: {encoder}")

    # 2. Every transfer task from the MAE encoder and from random weights.
    results = output / "results"
    backbones = [bench.Backbone(MAE_NAME, str(encoder.resolve()), file_sha256(encoder)), bench.Backbone(RANDOM_NAME, None)]
    from mae_transfer.data.toy import ensure_toy_dataset

    data = {t: str(ensure_toy_dataset(t, **TOY_DATA[t])) for t in tasks if t in TOY_DATA and not quick}
    # A --data folder means real data to the task commands, so name the toy preset explicitly.
    presets = {t: TOY_PRESET.get(t, "toy_finetune") for t in data}
    jobs = bench.plan_jobs(backbones, list(tasks), results, data=data, presets=presets, overrides=_overrides(settings, tasks))
    echo(f"[transfer] {len(jobs)} jobs ({len(tasks)} tasks x 2 backbones); results: {results / 'results.jsonl'}")
    try:
        outcomes = bench.run_jobs(jobs, results, in_process=True, verbose=verbose)
    except bench.BenchInterrupted as e:
        echo(f"[transfer] {e}")
        return 143

    # 3. Tables, plots, the check against random init, and where the pictures are.
    rows = bench.latest_rows(results, jobs)
    markdown, tables, plots = _report(rows, results, RANDOM_NAME, pretrain_dir=pre_dir)
    echo("")
    echo(markdown)
    echo("")
    echo("Does the MAE encoder beat random weights on every task?")
    # The same headline metrics as the comparison bars (plots.comparison_data).
    labels, values = comparison_data(rows)
    mae_values, rnd_values = values.get(MAE_NAME, [None] * len(labels)), values.get(RANDOM_NAME, [None] * len(labels))
    wins = 0
    for label, mae, rnd in zip(labels, mae_values, rnd_values):
        ok = mae is not None and rnd is not None and mae > rnd
        wins += ok
        fmt = lambda v: "failed" if v is None else f"{v:6.2f}"  # noqa: E731
        echo(f"  {label:26s} MAE {fmt(mae)}  random {fmt(rnd)}  {'yes' if ok else 'NO'}")
    echo(f"  {wins} of {len(labels)} metrics{' (--quick schedules are too short to mean much)' if quick else ''}")
    echo("")
    echo("Pictures:")
    echo(f"  MAE reconstructions (original | masked | prediction | prediction + visible): {pre_dir / 'reconstructions'}")
    for job in jobs:
        if job.task in ("coco", "ade20k") and (job.run_dir / "visualize").is_dir():
            what = "detections" if job.task == "coco" else "segmentations"
            echo(f"  {job.task} {what} ({job.backbone.name}): {job.run_dir / 'visualize'}")
    for path in plots:
        echo(f"  plot: {path}")
    if tables:
        echo(f"Tables: {', '.join(str(p) for p in tables.values())}")
    failed = [o for o in outcomes if o.status == "failed"]
    echo(f"demo finished in {time.perf_counter() - t0:.0f} s" + (f"; {len(failed)} job(s) FAILED" if failed else ""))
    return 1 if failed else 0
