"""Speed of one MAE pretraining step: images/s, step time, peak memory, FLOPs and TFLOP/s.

A step is exactly what pretraining runs: forward with random masking, the masked-patch MSE loss
(fp32, inside the model), backward, an AdamW step (betas 0.9/0.95, weight decay 0.05 on the same
parameter groups as :class:`mae_transfer.pretrain.task.PretrainTask`) and
``zero_grad(set_to_none=True)``. The images are random normal tensors made on the device once, so
neither data loading nor host-to-device copies hide the model's own speed.

FLOPs are reported two ways, both per image per training step and counting matrix multiplies
only (2 FLOPs per multiply-add):

- analytic: ``model.flops_per_image()["train_step"]`` (3 x forward); used for the TFLOP/s headline
  and the MFU, so numbers stay comparable between runs, devices and batch sizes;
- measured: :class:`torch.utils.flop_counter.FlopCounterMode` over one eager forward + backward of
  a batch of 2 on the same device and precision (divided by 2), a cross-check of the formula.

Library code only logs; the CLI prints :func:`format_speed_report`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from typing import Callable

import torch

from mae_transfer.engine.bench import autocast_for, bench_precision, count_flops, run_environment
from mae_transfer.engine.bench import device_name as _device_name
from mae_transfer.engine.bench import resolve_device as _resolve_device
from mae_transfer.engine.bench import rss_peak_bytes as _rss_peak_bytes
from mae_transfer.engine.bench import tf32_enabled as _tf32_enabled
from mae_transfer.engine.optim import param_groups
from mae_transfer.io import atomic_write_json
from mae_transfer.pretrain.model import MaskedAutoencoderViT, create_mae

log = logging.getLogger(__name__)

# bf16 dense matmul throughput measured on this project's H100/H200 machines (the vendor's dense
# bf16 figure, 989 TFLOP/s on H100 SXM, is not reached by real GEMMs); the default MFU reference.
MEASURED_HOPPER_BF16_TFLOPS = 790.0

_PRECISIONS = ("auto", "bf16", "fp32")


# ---------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------
def count_train_step_flops(
    model: MaskedAutoencoderViT,
    imgs: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    mask_ratio: float | None = None,
) -> tuple[float, list[str]]:
    """Count the FLOPs of one eager forward + backward with ``FlopCounterMode``.

    imgs: (N, C, H, W) on the model's device (N = 2 is plenty; the count is linear in N).
    Returns (FLOPs per image, sorted names of the attention ops that ran, e.g.
    ``["aten._scaled_dot_product_flash_attention"]`` on a GPU where FlashAttention was picked).

    Activation checkpointing is switched off for the count (recomputation is not model work,
    MFU convention) and the gradients it leaves are cleared.
    """
    was_training, was_ckpt = model.training, model.grad_checkpointing
    model.train()
    model.grad_checkpointing = False

    def forward_backward():
        with autocast():
            out = model(imgs, mask_ratio=mask_ratio)
        out.loss.backward()

    try:
        total, attention = count_flops(forward_backward)
    finally:
        model.zero_grad(set_to_none=True)
        model.grad_checkpointing = was_ckpt
        model.train(was_training)
    return total / imgs.shape[0], attention


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _default_peak_tflops(device_name: str, precision: str) -> tuple[float | None, str]:
    # The 790 figure is a bf16 matmul peak; an fp32 (TF32) run gets no default reference.
    if precision == "bf16" and any(k in device_name for k in ("H100", "H200")):
        return MEASURED_HOPPER_BF16_TFLOPS, f"{MEASURED_HOPPER_BF16_TFLOPS:g} TFLOP/s measured bf16 peak"
    return None, ""


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def run_pretrain_speed(
    model: str = "mae_vit_base_patch16",
    batch_size: int = 256,
    steps: int = 20,
    warmup: int = 5,
    device: str | None = None,
    precision: str = "auto",
    compile: bool = False,
    grad_checkpointing: bool = False,
    mask_ratio: float = 0.75,
    img_size: int | None = None,
    fused_adamw: bool | None = None,
    json_path: str | os.PathLike | None = None,
    peak_tflops: float | None = None,
    seed: int = 0,
) -> dict:
    """Time ``steps`` MAE pretraining steps after ``warmup`` untimed ones.

    Args:
        model: an ``MAE_PRESETS`` name.
        batch_size: images per step; the synthetic batch is (batch_size, 3, img, img) on the device.
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``; None = cuda when available.
        precision: ``"bf16"`` (autocast to bfloat16, loss in fp32), ``"fp32"`` (TF32 matmuls on
            GPU) or ``"auto"`` (bf16 on cuda, fp32 on cpu).
        compile: ``torch.compile`` the model (compilation falls in the warm-up steps).
        fused_adamw: the single-kernel AdamW; None = on for cuda.
        json_path: also write the result there (atomically).
        peak_tflops: device peak for the MFU; None = 790 (measured bf16) on H100/H200 in bf16.

    Returns a flat, JSON-serialisable dict (see :func:`format_speed_report` for the fields).
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, steps >= 1, warmup >= 0; got {batch_size}, {steps}, {warmup}")
    dev = _resolve_device(device)
    on_cuda = dev.type == "cuda"
    precision = bench_precision(precision, dev)
    if fused_adamw is None:
        fused_adamw = on_cuda
    if compile and warmup == 0:
        log.warning("compile=True with warmup=0: compilation time falls into the timed steps")

    torch.manual_seed(seed)
    overrides: dict = dict(mask_ratio=mask_ratio, grad_checkpointing=grad_checkpointing)
    if img_size is not None:
        overrides["img_size"] = img_size
    rss_before = _rss_peak_bytes()
    if on_cuda:
        torch.cuda.set_device(dev)
    # Built on the CPU then moved: initialisation is cheap and identical on every device.
    net = create_mae(model, **overrides).to(dev)
    net.train()
    n_params = sum(p.numel() for p in net.parameters())
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    h, w = net.img_size
    imgs = torch.randn(batch_size, net.in_chans, h, w, device=dev)

    def autocast():
        return autocast_for(precision, dev)

    with _tf32_enabled(on_cuda):
        analytic = float(net.flops_per_image()["train_step"])
        # Counted on the eager model before compiling and before the optimizer exists, so its
        # gradients cannot leak into the timed run.
        pair = imgs[:2] if batch_size >= 2 else imgs.repeat(2, 1, 1, 1)
        measured, attention_ops = count_train_step_flops(net, pair, autocast, mask_ratio)
        net.zero_grad(set_to_none=True)

        groups = param_groups(net, 0.05, 1.0, no_weight_decay=())
        groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
        lr = 1.5e-4 * batch_size / 256  # the MAE recipe's lr rule; the value does not affect speed
        # fused=None (not False) off the GPU lets torch pick its default foreach implementation.
        opt = torch.optim.AdamW(
            groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.05, fused=True if fused_adamw else None
        )
        runner = torch.compile(net) if compile else net

        def step() -> torch.Tensor:
            # No .item() / host sync: the CPU queues steps ahead of the GPU as in real training.
            with autocast():
                out = runner(imgs, mask_ratio=mask_ratio)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss.detach()

        loss = None
        first_step_s = float("nan")
        for i in range(warmup):
            t0 = time.perf_counter()
            loss = step()
            if i == 0:
                # The first step carries compilation, cuDNN/cuBLAS autotuning and allocator growth.
                if on_cuda:
                    torch.cuda.synchronize(dev)
                first_step_s = time.perf_counter() - t0

        if on_cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            # One event between consecutive steps: step i lasts events[i] -> events[i + 1] on the
            # stream, read only after the final synchronize.
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            t_start = time.perf_counter()
            events[0].record()
            for i in range(steps):
                loss = step()
                events[i + 1].record()
            torch.cuda.synchronize(dev)
            wall = time.perf_counter() - t_start
            step_ms = [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
            peak_mem = torch.cuda.max_memory_allocated(dev)
            peak_reserved = torch.cuda.max_memory_reserved(dev)
            memory_kind = "cuda max_memory_allocated over the timed steps"
            timer = "cuda events (per step), perf_counter with synchronize (total)"
        else:
            step_ms = []
            t_start = time.perf_counter()
            for _ in range(steps):
                t = time.perf_counter()
                loss = step()
                step_ms.append((time.perf_counter() - t) * 1e3)
            wall = time.perf_counter() - t_start
            # ru_maxrss is a process-lifetime high-water mark: growth is 0 when an earlier part of
            # the process had already used more.
            peak_mem = max(0, _rss_peak_bytes() - rss_before)
            peak_reserved = None
            memory_kind = "cpu peak RSS growth during the run (ru_maxrss)"
            timer = "perf_counter"
        final_loss = float(loss) if loss is not None else float("nan")  # the one sync, after timing

    if not math.isfinite(final_loss):
        log.warning("the loss is not finite (%s): the timing may not reflect a healthy run", final_loss)

    images_per_s = batch_size * steps / wall
    tflops = analytic * images_per_s / 1e12
    tflops_measured = measured * images_per_s / 1e12
    device_name = _device_name(dev)
    if peak_tflops is None:
        peak, peak_source = _default_peak_tflops(device_name, precision)
    else:
        peak, peak_source = float(peak_tflops), f"{float(peak_tflops):g} TFLOP/s given"
    result = {
        "model": model,
        "img_size": h,
        "patch_size": net.patch_size,
        "mask_ratio": mask_ratio,
        "params_m": n_params / 1e6,
        "trainable_params_m": n_trainable / 1e6,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "precision": precision,
        "compile": bool(compile),
        "grad_checkpointing": bool(grad_checkpointing),
        "fused_adamw": bool(fused_adamw),
        **run_environment(dev),
        "timer": timer,
        "images_per_s": images_per_s,
        "step_ms_mean": wall * 1e3 / steps,
        "step_ms_median": statistics.median(step_ms),
        "step_ms_min": min(step_ms),
        "step_ms_max": max(step_ms),
        "first_step_s": first_step_s,
        "peak_memory_gib": peak_mem / 2**30,
        "peak_memory_reserved_gib": None if peak_reserved is None else peak_reserved / 2**30,
        "memory_kind": memory_kind,
        "flops_per_image_analytic": analytic,
        "flops_per_image_measured": measured,
        "flops_measured_over_analytic": measured / analytic if analytic else float("nan"),
        "tflops": tflops,
        "tflops_measured_flops": tflops_measured,
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "mfu": tflops / peak if peak else None,
        "attention_ops": attention_ops,
        "final_loss": final_loss,
    }
    log.info(
        "%s bs %d %s on %s: %.1f images/s, %.2f ms/step, %.2f TFLOP/s",
        model,
        batch_size,
        precision,
        device_name,
        images_per_s,
        result["step_ms_mean"],
        tflops,
    )
    if json_path is not None:
        atomic_write_json(json_path, result)
        log.info("speed result written to %s", json_path)
    return result


def _fmt_flops(x: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f} FLOP"


def format_speed_report(result: dict) -> str:
    """A small aligned table of a :func:`run_pretrain_speed` result."""
    r = result
    rows: list[tuple[str, str]] = [
        ("model", f"{r['model']} ({r['params_m']:.1f} M params, {r['img_size']} px, mask {r['mask_ratio']:g})"),
        ("device", f"{r['device_name']} [{r['device']}]"),
        ("torch", r["torch_version"]),
        ("date", r["date"]),
        (
            "setup",
            (
                f"batch {r['batch_size']}, {r['precision']}, compile={r['compile']}, "
                f"grad_ckpt={r['grad_checkpointing']}, fused_adamw={r['fused_adamw']}"
            ),
        ),
        ("steps", f"{r['steps']} timed after {r['warmup']} warm-up ({r['timer']})"),
        ("images/s", f"{r['images_per_s']:.1f}"),
        (
            "step time",
            (
                f"mean {r['step_ms_mean']:.2f} ms, median {r['step_ms_median']:.2f} ms "
                f"(min {r['step_ms_min']:.2f}, max {r['step_ms_max']:.2f})"
            ),
        ),
    ]
    if r.get("first_step_s") is not None and math.isfinite(r["first_step_s"]):
        rows.append(("first step", f"{r['first_step_s']:.2f} s (incl. compile / allocator warm-up)"))
    mem = f"{r['peak_memory_gib']:.2f} GiB ({r['memory_kind']})"
    if r.get("peak_memory_reserved_gib") is not None:
        mem += f"; reserved {r['peak_memory_reserved_gib']:.2f} GiB"
    rows.append(("peak memory", mem))
    rows.append(
        (
            "FLOPs/img/step",
            (
                f"{_fmt_flops(r['flops_per_image_analytic'])} analytic (model.flops_per_image, 3 x fwd); "
                f"{_fmt_flops(r['flops_per_image_measured'])} FlopCounterMode "
                f"(x{r['flops_measured_over_analytic']:.3f})"
            ),
        )
    )
    rows.append(
        ("TFLOP/s", (f"{r['tflops']:.3g} (analytic FLOPs; {r['tflops_measured_flops']:.3g} with counted FLOPs)"))
    )
    if r.get("mfu") is not None:
        rows.append(("MFU", f"{100 * r['mfu']:.1f} % vs {r['peak_tflops_source']}"))
    else:
        rows.append(("MFU", "n/a (give --peak-tflops)"))
    if r.get("attention_ops"):
        rows.append(("attention ops", ", ".join(r["attention_ops"])))
    rows.append(("final loss", f"{r['final_loss']:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)} : {v}" for k, v in rows)


__all__ = [
    "MEASURED_HOPPER_BF16_TFLOPS",
    "count_train_step_flops",
    "format_speed_report",
    "run_pretrain_speed",
]
