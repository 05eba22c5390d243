"""The evaluator interface and the one evaluation loop (detectron2's ``DatasetEvaluator`` idea).

A task's evaluator sees the model's outputs batch by batch on every process (``reset``,
``process``), hands over what it accumulated (``state``), and on the main process, once the engine
has gathered every process's state there (``merge``), computes the metrics (``evaluate``). The
cross-process reduction is the engine's (:func:`run_evaluator`); evaluators hold no distributed code.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch

from mae_transfer.engine.distributed import broadcast_from_main, gather_to_main, world


class DatasetEvaluator:
    """Accumulates predictions of an evaluation split and turns them into metrics."""

    seconds: float = 0.0  # how long this process's last evaluation loop took (set by run_evaluator)

    def reset(self) -> None:
        """Forget everything: called before the first batch."""

    def process(self, inputs: Any, outputs: Any) -> None:
        """Take in one batch: the loader's ``inputs`` and the model's ``outputs`` for them."""
        raise NotImplementedError

    def state(self) -> Any:
        """What this process accumulated (picklable; tensors on the CPU), for the engine to gather."""
        raise NotImplementedError

    def merge(self, states: list[Any]) -> None:
        """Main process: take in the ``state()`` of every process, in rank order (its own included)."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        """The metrics of everything processed (after ``merge``)."""
        raise NotImplementedError


def progress(items: Iterable[Any], desc: str | None, unit: str = "batch", main: bool = True) -> Iterable[Any]:
    """``items`` with the progress bar of every evaluation pass (dense and classification
    evaluation, feature extraction): on the main process only, none when ``desc`` is None, redrawn
    at most every 5 s and cleared when the pass ends."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, disable=not main or desc is None, leave=False, mininterval=5.0)


def run_evaluator(
    evaluator: DatasetEvaluator,
    batches: Iterable[Any],
    predict: Callable[[Any], Any],
    main: bool = True,
    everywhere: bool = False,
    desc: str | None = "evaluating",
    unit: str = "batch",
) -> dict[str, Any]:
    """Run ``predict`` on every batch of this process's shard under ``torch.no_grad`` and feed the
    evaluator; gather every process's state on the main process (rank 0; no other process receives
    it), merge and evaluate it there, and with ``everywhere`` send the metrics to every process.

    ``main``: this is the main process (it shows the progress bar and returns the metrics); pass
    ``rank == 0``. Returns the metrics on the main process (on every process with ``everywhere``)
    and ``{}`` elsewhere; ``evaluator.seconds`` is the time of this process's loop. Every process
    must call it (the gather is a collective)."""
    evaluator.reset()
    t0 = time.monotonic()
    with torch.no_grad():
        for batch in progress(batches, desc, unit, main):
            evaluator.process(batch, predict(batch))
    evaluator.seconds = time.monotonic() - t0
    rank, world_size = world()
    states = gather_to_main(evaluator.state())
    metrics: Any = {}
    if rank == 0 and (main or everywhere):
        try:
            evaluator.merge(states)
            del states
            metrics = evaluator.evaluate()
        except BaseException as exc:
            if everywhere and world_size > 1:  # the other processes wait for the metrics: let them stop too
                broadcast_from_main(_EvaluationFailed(f"{type(exc).__name__}: {exc}"))
            raise
    if everywhere and world_size > 1:
        metrics = broadcast_from_main(metrics)
        if isinstance(metrics, _EvaluationFailed):
            raise RuntimeError(f"evaluation failed on the main process (rank 0): {metrics.message}")
    return metrics if (main or everywhere) else {}


class _EvaluationFailed:
    """Sent instead of the metrics when the main process's ``evaluate`` raised."""

    def __init__(self, message: str):
        self.message = message


__all__ = ["DatasetEvaluator", "run_evaluator", "progress"]
