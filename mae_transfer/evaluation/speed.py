"""``mae-transfer speed all``: every workload's steady-state benchmark in one table and one JSON (the
data pipelines, ``--data-only``, are measured by :mod:`mae_transfer.evaluation.data_speed`).

Workloads (GPU sizes; ``tiny``: the same code paths on micro models, for CPUs and CI):
MAE pretraining ViT-B/16 (eager and ``torch.compile``) and ViT-L/16, ViT-B fine-tuning at 224,
ViTDet-B Mask R-CNN at 1024 (training and inference), UperNet ViT-B at 512 (training and
sliding-window inference). Each line prints its target (README "Speed") beside the measurement.

Every workload is declared by its task (``TaskSpec.speed``, a :class:`~mae_transfer.spec.SpeedPlan`:
its function, options, defaults and rows here); :func:`workloads`, :func:`data_workloads` and
:func:`data_aliases` give the ``speed`` command its choices from the registry.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mae_transfer.io import atomic_write_json

if TYPE_CHECKING:
    from mae_transfer.spec import TaskSpec

log = logging.getLogger(__name__)

HOPPER_BF16_TFLOPS = 790.0  # measured dense bf16 matmul peak of an H100/H200 (pretrain/speed.py)


def workloads() -> dict[str, TaskSpec]:
    """The tasks ``mae-transfer speed NAME`` measures (those with a ``SpeedPlan``), in the plans' order."""
    from mae_transfer.evaluation.registry import TASKS

    specs = [spec for spec in TASKS.values() if spec.speed is not None]
    return {spec.name: spec for spec in sorted(specs, key=lambda spec: spec.speed.order)}


def data_workloads() -> tuple[str, ...]:
    """The tasks ``speed NAME --data-only`` measures: the benchmark tasks that train on data of their
    own (``check-data``'s tasks less the shared ``--data`` groups such as ImageNet), in registry order."""
    from mae_transfer.evaluation.registry import TASKS, benchmark_tasks

    return tuple(
        name
        for name in benchmark_tasks()
        if not TASKS[name].data_group and TASKS[name].family not in ("frozen", "train")
    )


def data_aliases() -> dict[str, str]:
    """The commands of :func:`data_workloads` named otherwise than their tasks -> the task that
    command runs by default (``inat`` -> ``inat2018``: the default of ``--year``)."""
    from mae_transfer.evaluation.options import FLAGS
    from mae_transfer.evaluation.registry import TASKS, spec_for

    defaults = {name: flag.kwargs.get("default") for name, flag in FLAGS.items()}
    out: dict[str, str] = {}
    for task in data_workloads():
        command = TASKS[task].command
        if command != task and command not in out:
            out[command] = spec_for(command, defaults).name
    return out


def _workloads(
    tiny: bool, device: str | None, precision: str = "auto", steps: int | None = None, warmup: int | None = None
) -> list[tuple[str, str, Callable[[], dict]]]:
    """(label, target, run) of every workload (the ``bench`` or ``tiny`` rows of each task's
    ``SpeedPlan``), run lazily; ``steps`` / ``warmup`` replace each workload's own counts when given."""
    from mae_transfer.spec import resolve

    if tiny:  # micro models, a few steps: the code paths, not the numbers
        kw = dict(steps=steps or 2, warmup=1 if warmup is None else warmup, device=device, precision=precision)
    else:
        kw = dict(
            device=device,
            precision=precision,
            **({} if steps is None else {"steps": steps}),
            **({} if warmup is None else {"warmup": warmup}),
        )
    out = []
    for spec in workloads().values():
        run = resolve(spec.speed.run)
        for row in spec.speed.tiny if tiny else spec.speed.bench:
            out.append((row.label, row.target, functools.partial(run, **row.kwargs, **kw)))
    return out


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


__all__ = ["run_speed_all", "format_speed_table", "workloads", "data_workloads", "data_aliases"]
