"""COCO evaluation at val2017 size: time and peak memory of the toolkit's evaluation path.

Builds a synthetic ground truth the size of COCO val2017 (5,000 images of COCO's usual sizes,
36,781 instances of 80 categories with polygon masks, 1% crowd regions as uncompressed RLEs) and
100 detections per image (500,000, with compressed-RLE masks; jittered ground-truth boxes with
ellipse masks and random boxes, so the AP is neither 0 nor 100), then runs what ``mae-transfer
coco --eval-only`` runs after the model: ``COCOEvaluator.process`` per batch on every (simulated)
process, ``state()`` pickled as the gather sends it, unpickled, ``merge`` and ``evaluate`` on the
main process, and ``save_results_json`` of the predictions file.

Each (code, backend) runs in a fresh subprocess, so peaks do not mix: ``new`` is the working tree's
``mae_transfer.detection.coco``; ``old`` is that file at ``--old-ref`` (default: the last revision
with one dict per detection), run with the same dataset class. The mask pasting of ``process`` (the same
code in both) is replaced by
masks already encoded: the output's ``mask_probs`` carries the RLEs and ``paste_masks_rle`` hands
them through. Reported per run: seconds of ``process``, of gather (unpickling) + ``merge`` +
``evaluate``, and of writing the predictions; the peak resident memory above the memory after the
dataset was loaded (VmHWM, reset through /proc/self/clear_refs); the pickled state; the 12 AP
numbers and the SHA-256 of the predictions file (equal for old and new).

    python benchmarks/coco_eval_full_size.py                    # new and old, pycocotools and faster
    python benchmarks/coco_eval_full_size.py --code new --backends faster --images 500   # quicker
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OLD_REF = "9b49d5c"  # the last revision whose COCOEvaluator kept one dict per detection

# COCO's 80 category ids (1..90 without the ten unused ones).
CAT_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
# (width, height) of val2017 images and roughly how often each occurs.
SIZES = [
    ((640, 480), 0.45),
    ((640, 427), 0.2),
    ((480, 640), 0.12),
    ((427, 640), 0.06),
    ((640, 425), 0.07),
    ((640, 360), 0.05),
    ((500, 375), 0.05),
]


# ------------------------------------------------------------------------------------ ground truth
def _polygon(rng: np.random.Generator, x: float, y: float, w: float, h: float) -> list[float]:
    """A star-shaped polygon (12-24 vertices) inside the box."""
    k = int(rng.integers(12, 25))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = rng.uniform(0.75, 1.0, k)
    px = x + w / 2 + np.cos(ang) * rad * w / 2
    py = y + h / 2 + np.sin(ang) * rad * h / 2
    return np.round(np.stack([px, py], 1).reshape(-1), 2).tolist()


def _shoelace(poly: list[float]) -> float:
    xy = np.asarray(poly).reshape(-1, 2)
    return 0.5 * abs(float(np.dot(xy[:, 0], np.roll(xy[:, 1], -1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], -1))))


def _column_runs(h: int, w: int, x0: float, y0: float, x1: float, y1: float) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs) of the ellipse inscribed in a box."""
    c = np.arange(max(0, int(math.floor(x0))), min(w, int(math.ceil(x1))))
    a, b = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    t = ((c + 0.5) - (x0 + x1) / 2) / a
    half = b * np.sqrt(np.clip(1 - t * t, 0, None))
    top = np.clip(np.round((y0 + y1) / 2 - half), 0, h).astype(np.int64)
    bot = np.clip(np.round((y0 + y1) / 2 + half), 0, h).astype(np.int64)
    keep = bot > top
    c, top, bot = c[keep], top[keep], bot[keep]
    if not len(c):
        return [h * w]
    start, length = c * h + top, bot - top
    counts = np.empty(2 * len(c) + 1, dtype=np.int64)
    counts[0] = start[0]
    counts[2:-1:2] = start[1:] - (start[:-1] + length[:-1])
    counts[1::2] = length
    counts[-1] = h * w - (start[-1] + length[-1])
    return counts.tolist()


def make_ground_truth(root: Path, images: int, annotations: int, seed: int) -> None:
    """``root/annotations/instances_val2017.json`` and empty image files in ``root/val2017``."""
    rng = np.random.default_rng(seed)
    sizes, p = zip(*SIZES)
    choice = rng.choice(len(sizes), images, p=np.array(p) / sum(p))
    imgs = [
        {"id": 1000 + 7 * i, "file_name": f"{1000 + 7 * i:012d}.jpg", "width": sizes[c][0], "height": sizes[c][1]}
        for i, c in enumerate(choice)
    ]
    weight = rng.gamma(1.2, size=images)  # instances per image vary (COCO: 0 to 63, 7.3 on average)
    per_image = rng.multinomial(annotations, weight / weight.sum())
    # person is a quarter of COCO's instances; the rest fall off like a power law.
    cat_p = np.r_[8.0, 1.0 / np.arange(1, 80) ** 0.7]
    cat_p /= cat_p.sum()
    anns = []
    for im, n in zip(imgs, per_image):
        W, H = im["width"], im["height"]
        for _ in range(int(n)):
            side = math.exp(rng.normal(4.0, 1.15))  # areas: ~40% small, ~35% medium, ~25% large (as COCO)
            ar = math.exp(rng.uniform(-0.7, 0.7))
            w, h = min(W - 2, max(2.0, side * math.sqrt(ar))), min(H - 2, max(2.0, side / math.sqrt(ar)))
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            ann = {"id": len(anns) + 1, "image_id": im["id"], "category_id": CAT_IDS[rng.choice(80, p=cat_p)]}
            if rng.random() < 0.01:  # crowd region: an uncompressed RLE, as in COCO
                counts = _column_runs(H, W, x, y, x + w, y + h)
                ann.update(
                    iscrowd=1,
                    segmentation={"counts": counts, "size": [H, W]},
                    area=float(sum(counts[1::2])),
                    bbox=[round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                )
            else:
                poly = _polygon(rng, x, y, w, h)
                xy = np.asarray(poly).reshape(-1, 2)
                x0, y0 = xy.min(0)
                x1, y1 = xy.max(0)
                ann.update(
                    iscrowd=0,
                    segmentation=[poly],
                    area=round(_shoelace(poly), 2),
                    bbox=[round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                )
            anns.append(ann)
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in CAT_IDS]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2017").mkdir(exist_ok=True)
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": imgs, "annotations": anns, "categories": cats})
    )
    for im in imgs:
        (root / "val2017" / im["file_name"]).touch()


# -------------------------------------------------------------------------------------- detections
def make_outputs(ds, index: int, seed: int, per_image: int):
    """``(target, output)`` of one image as the model would give them, masks already as RLEs."""
    import torch
    from pycocotools import mask as mask_utils

    image_id = ds.image_ids[index]
    info = ds.coco.imgs[image_id]
    H, W = int(info["height"]), int(info["width"])
    rng = np.random.default_rng([seed, index])
    gt = [a for a in ds.coco.imgToAnns.get(image_id, []) if not a["iscrowd"]]
    boxes, labels, scores = [], [], []
    for a in gt:
        if rng.random() < 0.8 and len(boxes) < per_image:
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 0.08, 4) * [w, h, w, h]
            boxes.append([x + j[0], y + j[1], x + w + j[2], y + h + j[3]])
            cat = a["category_id"] if rng.random() < 0.8 else CAT_IDS[rng.integers(80)]
            labels.append(ds.cat_id_to_label[cat])
            scores.append(rng.uniform(0.3, 1.0))
    while len(boxes) < per_image:
        side = math.exp(rng.normal(3.8, 1.0))
        w, h = min(W - 1, side * math.exp(rng.uniform(-0.5, 0.5))), min(H - 1, side * math.exp(rng.uniform(-0.5, 0.5)))
        x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
        boxes.append([x, y, x + w, y + h])
        labels.append(int(rng.integers(80)))
        scores.append(rng.uniform(0.0, 0.6))
    b = np.clip(np.asarray(boxes, np.float32), 0, [W, H, W, H]).astype(np.float32)
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
    order = np.argsort(-np.asarray(scores), kind="stable")  # the detector gives them by score
    b, labels, scores = b[order], np.asarray(labels)[order], np.asarray(scores, np.float32)[order]
    runs = [{"size": [H, W], "counts": _column_runs(H, W, *box)} for box in b.tolist()]
    rles = [{"size": [H, W], "counts": r["counts"].decode("ascii")} for r in mask_utils.frPyObjects(runs, H, W)]
    target = {"image_id": torch.tensor(image_id), "orig_size": torch.tensor([H, W])}
    output = {
        "boxes": torch.from_numpy(b),
        "scores": torch.from_numpy(scores),
        "labels": torch.from_numpy(labels.astype(np.int64)),
        "mask_probs": rles,
    }  # handed through by the patched paste_masks_rle
    return target, output


# ------------------------------------------------------------------------------------ measurement
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _load_coco_module(code: str, old_ref: str, workdir: Path):
    if code == "new":
        import mae_transfer.detection.coco as module

        return module
    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{old_ref}:mae_transfer/detection/coco.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = workdir / f"coco_{old_ref.replace('/', '_')}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("coco_old_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_child(args) -> dict:
    import torch

    from mae_transfer.detection.coco import CocoDetection

    torch.set_num_threads(1)
    workdir = Path(args.workdir)
    module = _load_coco_module(args.code, args.old_ref, workdir)
    module.paste_masks_rle = lambda probs, boxes, image_hw: probs  # masks come encoded (see the docstring)
    ds = CocoDetection(workdir / "coco", "val2017")
    ds.coco, ds.image_ids  # noqa: B018  (the ground truth is built before the measurement)
    n = len(ds)
    gc.collect()
    rss0 = _status("VmRSS")
    peaks: dict[str, int] = {}  # phase -> highest resident memory during it, above rss0
    exact_peak = _reset_peak()

    def end_phase(name: str) -> None:
        peaks[name] = _status("VmHWM") - rss0
        _reset_peak()

    seconds_process, blobs = 0.0, []
    for rank in range(args.ranks):  # what every process does, one after the other
        ev = module.COCOEvaluator(ds, backend=args.backend)
        ev.reset()
        shard = list(range(rank, n, args.ranks))
        for b in range(0, len(shard), args.batch):
            targets, outputs = zip(
                *(make_outputs(ds, i, args.seed, args.detections) for i in shard[b : b + args.batch])
            )
            t = time.perf_counter()
            ev.process((None, list(targets)), list(outputs))
            seconds_process += time.perf_counter() - t
        blobs.append(pickle.dumps(ev.state()))  # what the gather sends
        del ev
    gc.collect()
    pickled = sum(len(b) for b in blobs)
    end_phase("process")

    t0 = time.perf_counter()
    main = module.COCOEvaluator(ds, backend=args.backend)
    rss_sent = _status("VmRSS")
    states = [pickle.loads(b) for b in blobs]  # what the main process receives
    rss_received = _status("VmRSS")
    del blobs
    main.merge(states)
    del states
    t1 = time.perf_counter()
    end_phase("gather_merge")
    metrics = main.evaluate()
    t2 = time.perf_counter()
    end_phase("evaluate")
    pred = workdir / f"predictions_{args.code}_{args.backend}.json"
    module.save_results_json(main.results, pred)
    t3 = time.perf_counter()
    end_phase("save")
    digest = hashlib.sha256(pred.read_bytes()).hexdigest()
    pred.unlink()
    return {
        "code": args.code,
        "backend": args.backend,
        "images": n,
        "detections": int(len(main.results)),
        "process_s": seconds_process,
        "merge_s": t1 - t0,
        "evaluate_s": t2 - t1,
        "save_s": t3 - t2,
        "peak_increase_bytes": max(peaks.values()),
        "phase_peaks_bytes": peaks,
        "peak_exact": exact_peak,
        "pickled_state_bytes": pickled,
        "unpickled_state_bytes": rss_received - rss_sent,
        "metrics": metrics,
        "predictions_sha256": digest,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--annotations", type=int, default=36781)
    p.add_argument("--detections", type=int, default=100, help="per image")
    p.add_argument("--ranks", type=int, default=8, help="simulated processes (the shards of DistributedSampler)")
    p.add_argument("--batch", type=int, default=2, help="images per process() call (eval_batch_size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--code", nargs="+", default=["new", "old"], choices=["new", "old"])
    p.add_argument("--backends", nargs="+", default=["pycocotools", "faster"], choices=["pycocotools", "faster"])
    p.add_argument(
        "--old-ref",
        default=OLD_REF,
        help="git revision whose detection/coco.py is the old code "
        f"(default {OLD_REF}: the last with one dict per detection)",
    )
    p.add_argument("--workdir", help="keep the synthetic data here (default: a temporary folder)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.code = args.code[0]
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="coco_eval_full_size_")
    workdir = Path(args.workdir or tmp.name)
    gt = workdir / "coco" / "annotations" / "instances_val2017.json"
    t = time.perf_counter()
    if not gt.is_file():
        make_ground_truth(workdir / "coco", args.images, args.annotations, args.seed)
        print(
            f"ground truth: {args.images} images, {args.annotations} instances in "
            f"{time.perf_counter() - t:.0f} s ({gt})",
            flush=True,
        )
    runs = []
    for backend in args.backends:
        for code in args.code:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--code",
                code,
                "--backend",
                backend,
                "--workdir",
                str(workdir),
                "--old-ref",
                args.old_ref,
                "--ranks",
                str(args.ranks),
                "--batch",
                str(args.batch),
                "--seed",
                str(args.seed),
                "--detections",
                str(args.detections),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{code}/{backend} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1][len("RESULT ") :])
            runs.append(r)
            print(
                f"{code:4s} {backend:12s} process {r['process_s']:7.1f} s | gather+merge {r['merge_s']:6.1f} s | "
                f"evaluate {r['evaluate_s']:7.1f} s | save json {r['save_s']:5.1f} s | "
                f"peak +{r['peak_increase_bytes'] / 2**30:.2f} GiB"
                f"{'' if r['peak_exact'] else ' (peak since start)'} ("
                + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in r["phase_peaks_bytes"].items())
                + f") | state {r['pickled_state_bytes'] / 2**20:.0f} MiB pickled, "
                f"+{r['unpickled_state_bytes'] / 2**20:.0f} MiB unpickled",
                flush=True,
            )
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    print(f"{r['images']} images, {r['detections']} detections")
    print(f"{'':18s} " + " ".join(f"{kind}_{n:4s}" for kind in ("bbox", "segm") for n in names))
    for r in runs:
        print(
            f"{r['code']:4s} {r['backend']:12s} "
            + " ".join(f"{r['metrics'][k][n]:9.5f}" for k in ("bbox", "segm") for n in names)
        )
    numbers = {
        (r["code"], r["backend"]): json.dumps([r["metrics"][k][n] for k in ("bbox", "segm") for n in names])
        for r in runs
    }
    for backend in args.backends:
        if ("new", backend) in numbers and ("old", backend) in numbers:
            same = numbers[("new", backend)] == numbers[("old", backend)]
            print(f"{backend}: old and new numbers {'bit-identical' if same else 'DIFFER'}")
    values = [json.loads(v) for v in numbers.values()]
    diff = max(abs(a - b) for v in values for a, b in zip(values[0], v) if not (math.isnan(a) or math.isnan(b)))
    print(f"largest difference between any two runs' numbers: {diff:.3g}")
    digests = {r["predictions_sha256"] for r in runs}
    print(
        f"predictions files: {'all byte-identical' if len(digests) == 1 else 'DIFFER'} "
        f"(sha256 {sorted(digests)[0][:16]}...)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
