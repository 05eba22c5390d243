"""Small helpers shared by the speed benchmarks of every task: devices, memory, TF32."""

from __future__ import annotations

import contextlib
import resource
import sys

import torch


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_environment(dev: torch.device) -> dict[str, str]:
    """Where and when a speed measurement ran (the same four fields in every workload's result)."""
    import datetime

    return {
        "device": str(dev),
        "device_name": device_name(dev),
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def rss_peak_bytes() -> int:
    """The process's high-water resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextlib.contextmanager
def tf32_enabled(on: bool):
    """TF32 matmuls/convolutions for the fp32 parts (as the trainer does), restored afterwards."""
    if not on:
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def time_steps(step, steps: int, warmup: int, dev: torch.device) -> dict:
    """Run ``step()`` ``warmup`` times untimed, then ``steps`` times timed (synchronised on a GPU).

    Returns ``first_step_s`` (the first warm-up step: compilation, autotuning, allocator growth),
    ``wall_s`` of the timed steps, ``step_ms_median``, ``peak_memory_gib`` over the timed steps (CUDA
    ``max_memory_allocated``; on the CPU the growth of the process's peak RSS) and ``memory_kind``."""
    import statistics
    import time

    on_cuda = dev.type == "cuda"

    def sync():
        if on_cuda:
            torch.cuda.synchronize(dev)

    rss_before = rss_peak_bytes()
    first = float("nan")
    for i in range(warmup):
        t0 = time.perf_counter()
        step()
        if i == 0:
            sync()
            first = time.perf_counter() - t0
    sync()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    t_start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(dev) if on_cuda else max(0, rss_peak_bytes() - rss_before)
    return {
        "first_step_s": first,
        "wall_s": wall,
        "step_ms_median": statistics.median(times) * 1e3,
        "peak_memory_gib": peak / 2**30,
        "memory_kind": "cuda max_memory_allocated" if on_cuda else "cpu peak RSS growth (ru_maxrss)",
    }


def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and P V of ``(B, h, S, d)`` tensors: 2 matmuls, 2 FLOPs per multiply-add."""
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * (d_q + d_v)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Backward of fused attention: scores recomputed (1 matmul) + dV, dP, dQ, dK (4 matmuls).

    The same convention as torch's own formula for the CUDA flash / efficient kernels, so CPU and
    GPU counts agree: 2.5x the forward, not 2x, because fused kernels recompute the scores.
    """
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * (3 * d_q + 2 * d_v)


def extra_flop_formulas() -> dict:
    """Formulas for ops that ``FlopCounterMode`` misses.

    torch registers the CUDA attention kernels but not the CPU flash kernel that
    ``F.scaled_dot_product_attention`` dispatches to on CPU; without these, CPU counts silently
    leave out every attention matmul.
    """
    aten = torch.ops.aten
    mapping = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_forward_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward_flops),
    ):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return mapping


class _SDPACalls(torch.overrides.TorchFunctionMode):
    """Counts ``F.scaled_dot_product_attention`` calls (the fused kernel, if any, shows up as an
    aten op; the unfused math fallback only as plain matmuls)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


MATH_ATTENTION = "math (unfused SDPA)"


def count_flops(fn) -> tuple[float, list[str]]:
    """FLOPs of one call of ``fn()`` (``torch.utils.flop_counter``: matmuls and convolutions, 2 per
    multiply-add) and the names of the attention kernels it ran: the fused SDPA kernels by their
    aten names, :data:`MATH_ATTENTION` when ``scaled_dot_product_attention`` ran unfused (e.g. a
    CPU attention bias that needs a gradient; its matmuls are counted as matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
    sdpa = _SDPACalls()
    with counter, sdpa:
        fn()
    ops = counter.get_flop_counts().get("Global", {})
    fused = sorted(str(op) for op in ops if "attention" in str(op) and "backward" not in str(op))
    return float(counter.get_total_flops()), fused or ([MATH_ATTENTION] if sdpa.calls else [])


def benchmark_training(
    forward_backward,
    optimizer,
    batch_size: int,
    steps: int,
    warmup: int,
    dev: torch.device,
    timed_forward_backward=None,
) -> dict:
    """A training benchmark: the FLOPs of one ``forward_backward()`` (counted once, eagerly, its
    gradients cleared), then ``steps`` timed steps of ``timed_forward_backward`` (default: the same;
    e.g. a compiled model's) + ``optimizer.step()`` + ``zero_grad`` (:func:`time_steps`).
    Returns the timing fields plus ``images_per_s``, ``flops_per_image``, ``tflops`` and ``attention_ops``."""
    flops, attention = count_flops(forward_backward)
    optimizer.zero_grad(set_to_none=True)
    run = timed_forward_backward or forward_backward

    def step():
        run()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed = time_steps(step, steps, warmup, dev)
    ips = batch_size * steps / timed["wall_s"]
    return {
        **timed,
        "images_per_s": ips,
        "flops_per_image": flops / batch_size,
        "tflops": flops / batch_size * ips / 1e12,
        "attention_ops": attention,
    }


def bench_precision(precision: str, dev: torch.device) -> str:
    """A speed benchmark's precision, by the toolkit's one rule (``"auto"``: bf16 on a GPU, fp32 on
    a CPU; fp16 on a GPU only): :func:`mae_transfer.engine.precision.resolve_precision`."""
    from mae_transfer.engine.precision import resolve_precision

    return resolve_precision(precision, dev)


def autocast_for(precision: str, dev: torch.device):
    """The autocast context of a benchmark precision: the training loop's own
    (:func:`mae_transfer.engine.precision.autocast_context`)."""
    from mae_transfer.engine.precision import autocast_context

    return autocast_context(precision, dev)
