"""Shared pieces of the side-by-side benchmarks: alternating timing, ratios, the table.

Every workload is a pair of callables on the same inputs, ``reference()`` and ``ours()``. They
run alternately (reference, ours, reference, ours, ...) after a warm-up of each, so that load on
the machine and clock changes hit both sides alike; the ratio of one pair is
``reference time / our time`` (above 1: ours is faster) and a workload reports the median ratio
over the pairs with the median times of each side.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


def use_source_tree(path: str | None) -> None:
    """Import ``mae_transfer`` from ``path`` (a checkout of another revision, for "before"
    numbers) instead of the installed package. Call before the first ``import mae_transfer``."""
    if path:
        sys.path.insert(0, str(Path(path).resolve()))


@dataclass
class Result:
    workload: str
    pairs: int
    reference_s: float  # median seconds per call
    ours_s: float
    ratio: float  # median over pairs of reference / ours
    ratios: list[float] = field(default_factory=list)
    outputs_equal: bool | None = None
    check: str = ""  # what was compared and the largest difference


def alternate(
    name: str, reference: Callable[[], object], ours: Callable[[], object], pairs: int = 3, warmup: int = 1
) -> Result:
    """Time ``reference`` and ``ours`` alternately, ``pairs`` times each after ``warmup`` calls."""
    for _ in range(warmup):
        reference()
        ours()
    ref_times, our_times, ratios = [], [], []
    for i in range(pairs):
        # Swap which side goes first every pair, so neither always runs on a warmer cache.
        order = (reference, ours) if i % 2 == 0 else (ours, reference)
        times = {}
        for fn in order:
            t0 = time.perf_counter()
            fn()
            times[fn is reference] = time.perf_counter() - t0
        ref_times.append(times[True])
        our_times.append(times[False])
        ratios.append(times[True] / times[False])
        print(
            f"  {name} pair {i + 1}/{pairs}: reference {times[True]:.3f} s, ours {times[False]:.3f} s, "
            f"ratio {ratios[-1]:.2f}",
            flush=True,
        )
    return Result(
        name, pairs, statistics.median(ref_times), statistics.median(our_times), statistics.median(ratios), ratios
    )


def print_table(results: list[Result], title: str) -> None:
    print(f"\n{title}")
    print("| workload | pairs | reference s | ours s | ratio (median) | outputs equal |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        eq = "-" if r.outputs_equal is None else ("yes" if r.outputs_equal else "NO")
        check = f" ({r.check})" if r.check else ""
        print(f"| {r.workload} | {r.pairs} | {r.reference_s:.3f} | {r.ours_s:.3f} | {r.ratio:.2f}x | {eq}{check} |")


def write_json(results: list[Result], path: str | None, extra: dict | None = None) -> None:
    if not path:
        return
    payload = {"results": [asdict(r) for r in results], **(extra or {})}
    Path(path).write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")


def top_ops(fn, n: int = 5) -> list[dict]:
    """The ``n`` operators with the most self CPU time in one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "op": e.key,
            "self_cpu_ms": e.self_cpu_time_total / 1000,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:n]
    ]


def print_ops(name: str, ops: list[dict]) -> None:
    print(f"\nour side, {name}: top {len(ops)} ops by self CPU time")
    print("| op | self CPU ms | share | calls |")
    print("| --- | ---: | ---: | ---: |")
    for o in ops:
        print(f"| `{o['op']}` | {o['self_cpu_ms']:.1f} | {100 * o['share']:.1f} % | {o['calls']} |")
