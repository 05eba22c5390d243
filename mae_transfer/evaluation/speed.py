"""``mae-transfer speed all``: every workload's steady-state benchmark in one table and one JSON (the
data pipelines, ``--data-only``, are measured by :mod:`mae_transfer.evaluation.data_speed`).

Workloads (GPU sizes; ``tiny``: the same code paths on micro models, for CPUs and CI):
MAE pretraining ViT-B/16 (eager and ``torch.compile``) and ViT-L/16, ViT-B fine-tuning at 224,
ViTDet-B Mask R-CNN at 1024 (training and inference), UperNet ViT-B at 512 (training and
sliding-window inference). Each line prints its target (README "Speed") beside the measurement.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from mae_transfer.io import atomic_write_json

log = logging.getLogger(__name__)

HOPPER_BF16_TFLOPS = 790.0  # measured dense bf16 matmul peak of an H100/H200 (pretrain/speed.py)


def _workloads(
    tiny: bool, device: str | None, precision: str = "auto", steps: int | None = None, warmup: int | None = None
) -> list[tuple[str, str, Callable[[], dict]]]:
    """(label, target, run) of every workload, run lazily; ``steps`` / ``warmup`` replace each
    workload's own counts when given."""
    from mae_transfer.classification.speed import run_finetune_speed
    from mae_transfer.detection.speed import run_detection_speed
    from mae_transfer.pretrain.speed import run_pretrain_speed
    from mae_transfer.segmentation.speed import run_segmentation_speed

    if tiny:  # micro models, a few steps: the code paths, not the numbers
        kw = dict(steps=steps or 2, warmup=1 if warmup is None else warmup, device=device, precision=precision)
        return [
            ("MAE pretrain micro/8", "-", lambda: run_pretrain_speed("mae_vit_micro_patch8", batch_size=8, **kw)),
            ("fine-tune micro/8", "-", lambda: run_finetune_speed("toy_finetune", batch_size=8, num_classes=10, **kw)),
            ("Mask R-CNN micro", "-", lambda: run_detection_speed("toy", batch_size=2, **kw)),
            ("UperNet micro", "-", lambda: run_segmentation_speed("toy", batch_size=2, **kw)),
        ]
    kw = dict(
        device=device,
        precision=precision,
        **({} if steps is None else {"steps": steps}),
        **({} if warmup is None else {"warmup": warmup}),
    )
    return [
        (
            "MAE pretrain ViT-B/16",
            ">= 40 % MFU",
            lambda: run_pretrain_speed("mae_vit_base_patch16", batch_size=256, **kw),
        ),
        (
            "MAE pretrain ViT-B/16 compiled",
            ">= 40 % MFU",
            lambda: run_pretrain_speed("mae_vit_base_patch16", batch_size=256, compile=True, **kw),
        ),
        (
            "MAE pretrain ViT-L/16",
            ">= 40 % MFU",
            lambda: run_pretrain_speed("mae_vit_large_patch16", batch_size=128, **kw),
        ),
        ("fine-tune ViT-B/16", ">= 3000 img/s", lambda: run_finetune_speed("finetune_vit_base", batch_size=128, **kw)),
        ("ViTDet-B Mask R-CNN", ">= 6.4 img/s", lambda: run_detection_speed("vitdet_mask_rcnn_b", batch_size=4, **kw)),
        ("UperNet ViT-B", ">= 40 img/s", lambda: run_segmentation_speed("upernet_vit_b", batch_size=8, **kw)),
    ]


def _row(label: str, target: str, r: dict) -> dict:
    ips = r.get("images_per_s", r.get("train_images_per_s"))
    tflops = r.get("tflops")
    mfu = r.get("mfu")
    if (
        mfu is None
        and tflops is not None
        and any(k in r.get("device_name", "") for k in ("H100", "H200"))
        and r.get("precision") == "bf16"
    ):
        mfu = tflops / HOPPER_BF16_TFLOPS
    return {
        "workload": f"{label} {r.get('img_size')}px",
        "target": target,
        "images_per_s": ips,
        "step_ms": r.get("step_ms_median", (r.get("step_s_median") or float("nan")) * 1e3),
        "peak_memory_gib": r.get("peak_memory_gib", r.get("train_peak_memory_gib")),
        "tflops": tflops,
        "mfu": mfu,
        "inference_images_per_s": r.get("eval_images_per_s"),
        "precision": r.get("precision"),
        "attention": ", ".join(a.replace("aten.", "") for a in r.get("attention_ops") or []) or "-",
        "detail": r,
    }


def run_speed_all(
    tiny: bool = False,
    device: str | None = None,
    json_path: str | Path | None = None,
    echo: Callable[[str], None] = print,
    precision: str = "auto",
    steps: int | None = None,
    warmup: int | None = None,
) -> list[dict]:
    """Run every workload (a failing one is recorded with its error and the others go on) in
    ``precision`` (auto: bf16 on a GPU, fp32 on a CPU)."""
    rows = []
    t0 = time.perf_counter()
    for label, target, run in _workloads(tiny, device, precision, steps, warmup):
        echo(f"  {label} ...")
        try:
            rows.append(_row(label, target, run()))
        except Exception as e:  # noqa: BLE001 - one workload (e.g. out of memory) must not hide the others
            log.warning("%s failed: %r", label, e)
            rows.append({"workload": label, "target": target, "error": f"{type(e).__name__}: {e}"[:300]})
    if json_path is not None:
        atomic_write_json(
            json_path, {"tiny": tiny, "precision": precision, "seconds": time.perf_counter() - t0, "rows": rows}
        )
    return rows


def format_speed_table(rows: list[dict]) -> str:
    """The one table of ``speed all``."""

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = [
        "workload",
        "img/s",
        "step ms",
        "mem GiB",
        "TFLOP/s",
        "MFU",
        "infer img/s",
        "precision",
        "attention",
        "target",
    ]
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append([r["workload"], "FAILED", r["error"][:60], "", "", "", "", "", "", r["target"]])
            continue
        lines.append(
            [
                r["workload"],
                num(r["images_per_s"], ".1f"),
                num(r["step_ms"], ".0f"),
                num(r["peak_memory_gib"], ".2f"),
                num(r["tflops"], ".2f"),
                "-" if r["mfu"] is None else f"{100 * r['mfu']:.0f} %",
                num(r["inference_images_per_s"], ".1f"),
                r["precision"] or "-",
                r["attention"],
                r["target"],
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


__all__ = ["run_speed_all", "format_speed_table"]
