"""The same command with 1 and N processes: does each task family give the same numbers?

Every job is an ordinary `mae-transfer` command started by `torchrun --standalone` (gloo on CPU),
once with one process and once with N, and the script prints, per job, the metrics of both runs,
their largest difference and, for training jobs, the largest difference between the two loss
curves (the same steps: the effective batch does not depend on the number of processes).

- Evaluation jobs (`--eval-only`, k-NN) should agree exactly: every rank runs the same model on
  its shard and the results are gathered before scoring.
- Training jobs agree up to float reduction order (gradients are averaged by all-reduce instead of
  one sum), unless a part of the computation depends on which samples share a process: the jobs'
  notes say which and why.

    python benchmarks/process_parity.py --nproc 4 --out parity
    python benchmarks/process_parity.py --only knn,coco-eval     # some jobs only

It needs `../shared` (reference checkpoints, coco_tiny, the ADE20K sample, tiny_imagenet10) for
the eval jobs; about 8 minutes on two CPU cores with 4 processes. Finished runs are kept (and
skipped when the script runs again) until you delete `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MAE_TRANSFER_SHARED", REPO.parent / "shared"))

# A nano MAE on 32 px toy images (as in tests/test_pretrain_cli.py).
TINY_PRETRAIN = [
    "model.name=mae_vit_nano_patch8",
    "model.img_size=32",
    "data.toy_images_per_class=12",
    "train.batch_size=8",
    "train.effective_batch_size=16",
    "train.log_every=1",
    "vis.num_images=4",
    "optim.warmup_epochs=1",
]


def jobs(out: Path) -> list[dict]:
    """(name, family, kind, argv, note); argv may name files that earlier one-process runs wrote."""
    ref_coco = SHARED / "reference" / "vitdet" / "model_final.pth"
    ref_ade = SHARED / "reference" / "mmseg_upernet" / "checkpoint.pth"
    encoder = out / "pretrain-1" / "encoder.pth"
    classifier = out / "finetune-1" / "classifier.pth"
    return [
        dict(
            name="pretrain",
            family="pretrain",
            kind="train",
            argv=["pretrain", "--epochs", "2", *TINY_PRETRAIN],
            note="per-sample seeded crops and masks; gradients averaged by all-reduce",
        ),
        dict(
            name="finetune",
            family="classification",
            kind="train",
            argv=[
                "finetune",
                "--backbone",
                str(encoder),
                "model.img_size=32",
                "train.epochs=5",
                "eval_every_epochs=5",
                "train.log_every=1",
            ],
            note="mixup/cutmix pair the images of each process's batch and draw one weight per process "
            "batch (timm's Mixup, mode 'batch', as in the official code); drop path draws from each "
            "process's own generator; RandAugment and random erasing are seeded per sample",
        ),
        dict(
            name="finetune-plain",
            family="classification",
            kind="train",
            argv=[
                "finetune",
                "--backbone",
                str(encoder),
                "model.img_size=32",
                "train.epochs=5",
                "eval_every_epochs=5",
                "train.log_every=1",
                "model.drop_path=0.0",
                "data.mixup=0.0",
                "data.cutmix=0.0",
            ],
            note="the same without drop path and mixup/cutmix: what is left is float reduction order",
        ),
        dict(
            name="finetune-eval",
            family="classification",
            kind="eval",
            argv=["finetune", "--eval-only", "--weights", str(classifier)],
        ),
        dict(
            name="linprobe",
            family="classification",
            kind="train",
            argv=[
                "linprobe",
                "--backbone",
                str(encoder),
                "model.img_size=32",
                "train.epochs=5",
                "eval_every_epochs=5",
                "train.log_every=1",
            ],
            note="the head's BatchNorm (official MAE linear probe) normalises by each process's own batch, "
            "as the official code does under DDP: 1/N of the samples per statistic",
        ),
        dict(
            name="knn",
            family="classification",
            kind="eval",
            argv=[
                "knn",
                "--data",
                str(SHARED / "data" / "tiny_imagenet10"),
                "--backbone",
                str(encoder),
                "--img-size",
                "32",
            ],
        ),
        dict(
            name="coco-eval",
            family="detection",
            kind="eval",
            argv=[
                "coco",
                "--eval-only",
                "--weights",
                str(ref_coco),
                "--data",
                str(SHARED / "data" / "coco_tiny"),
                "eval_batch_size=4",
            ],
        ),
        dict(
            name="coco",
            family="detection",
            kind="train",
            argv=["coco", "train.epochs=3", "train.log_every=1", "visualize=0"],
            note="the RPN's anchor and the RoI heads' proposal sampling (torch.randperm) draw from each "
            "process's own generator, as in detectron2",
        ),
        dict(
            name="ade20k-eval",
            family="segmentation",
            kind="eval",
            argv=["ade20k", "--eval-only", "--weights", str(ref_ade), "--data", str(SHARED / "data" / "ade20k_sample")],
        ),
        dict(
            name="ade20k",
            family="segmentation",
            kind="train",
            argv=["ade20k", "train.epochs=3", "train.log_every=1", "visualize=0"],
            note="the decode heads' BatchNorm is SyncBN on GPUs, as in mmsegmentation, but PyTorch's "
            "SyncBatchNorm does not run on CPU: with gloo each process normalises by its own 2 images",
        ),
    ]


def run(job: dict, nproc: int, out: Path, env: dict) -> tuple[Path, float]:
    run_dir = out / f"{job['name']}-{nproc}"
    done = out / f"{job['name']}-{nproc}.done"
    if done.exists():
        return run_dir, float(done.read_text())  # done before
    shutil.rmtree(run_dir, ignore_errors=True)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    argv = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "mae_transfer",
        *job["argv"],
        "--output",
        str(run_dir),
        "--device",
        "cpu",
    ]
    start = time.perf_counter()
    log = out / f"{job['name']}-{nproc}.log"
    with open(log, "w") as f:
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"{job['name']} with {nproc} process(es) failed (rc {rc}); see {log}")
    seconds = time.perf_counter() - start
    done.write_text(str(seconds))
    return run_dir, seconds


def metrics(run_dir: Path) -> dict[str, float]:
    """The run's result rows; for pretraining (no result rows) the last reconstruction error."""
    if (run_dir / "results.jsonl").exists():
        rows = map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())
        return {r["metric"]: r["value"] for r in rows if isinstance(r.get("value"), (int, float))}
    rec = run_dir / "reconstruction.jsonl"
    if rec.exists():
        last = json.loads(rec.read_text().splitlines()[-1])
        return {k: v for k, v in last.items() if k.endswith("mse")}
    return {}


def losses(run_dir: Path) -> list[float]:
    path = run_dir / "train.jsonl"
    if not path.exists():
        return []
    return [float(json.loads(line)["loss"]) for line in path.read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=4, help="processes of the second run (default 4)")
    ap.add_argument("--out", type=Path, default=Path("parity"), help="run folders and the summary (parity.json)")
    ap.add_argument("--only", default="", help="comma-separated job names (default: all)")
    args = ap.parse_args()
    if not (SHARED / "reference").is_dir():
        raise SystemExit(f"shared reference material not found at {SHARED} (set MAE_TRANSFER_SHARED)")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MAE_TRANSFER_CACHE": str(out / "cache"), "PYTHONPATH": str(REPO)}
    wanted = {n for n in args.only.split(",") if n}
    summary = []
    for job in jobs(out):
        if wanted and job["name"] not in wanted:
            continue
        (one, t1), (many, tn) = run(job, 1, out, env), run(job, args.nproc, out, env)
        m1, mn = metrics(one), metrics(many)
        shared_keys = sorted(set(m1) & set(mn))
        diff = max((abs(m1[k] - mn[k]) for k in shared_keys), default=float("nan"))
        l1, ln = losses(one), losses(many)
        loss_diff = (
            max((abs(a - b) for a, b in zip(l1, ln)), default=float("nan")) if len(l1) == len(ln) else float("inf")
        )
        row = dict(
            job=job["name"],
            family=job["family"],
            kind=job["kind"],
            nproc=args.nproc,
            metrics_1=m1,
            metrics_n=mn,
            max_metric_diff=diff,
            steps=len(l1),
            max_loss_diff=loss_diff,
            seconds_1=t1,
            seconds_n=tn,
            note=job.get("note", ""),
        )
        summary.append(row)
        print(f"\n{job['name']} ({job['family']}, {job['kind']}): 1 vs {args.nproc} processes")
        for k in shared_keys:
            print(f"  {k:28s} {m1[k]:12.6f} {mn[k]:12.6f}  diff {abs(m1[k] - mn[k]):.3g}")
        print(
            f"  largest metric difference {diff:.3g}"
            + (f"; loss curves over {len(l1)} steps differ by at most {loss_diff:.3g}" if l1 else "")
        )
        if job.get("note"):
            print(f"  note: {job['note']}")
        (out / "parity.json").write_text(json.dumps(summary, indent=1))
    print(f"\nsummary: {out / 'parity.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
