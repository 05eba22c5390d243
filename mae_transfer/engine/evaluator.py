"""The evaluator interface and the one evaluation loop (detectron2's ``DatasetEvaluator`` idea).

A task's evaluator sees the model's outputs batch by batch on every process (``reset``,
``process``), hands over what it accumulated (``state``), and on the main process, once the engine
has gathered every process's state (``merge``), computes the metrics (``evaluate``). The
cross-process reduction is the engine's (:func:`run_evaluator`); evaluators hold no distributed code.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch

from mae_transfer.engine.distributed import gather_objects


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
    evaluator; gather every process's state and merge and evaluate it on the main process (on every
    process with ``everywhere``).

    Returns the metrics where evaluated and ``{}`` elsewhere; ``evaluator.seconds`` is the time of
    this process's loop. Every process must call it (the gather is a collective). ``desc=None``: no
    progress bar."""
    from tqdm.auto import tqdm

    evaluator.reset()
    t0 = time.monotonic()
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit=unit, disable=not main or desc is None, leave=False, mininterval=5.0):
            evaluator.process(batch, predict(batch))
    evaluator.seconds = time.monotonic() - t0
    states = gather_objects(evaluator.state())
    if not (main or everywhere):
        return {}
    evaluator.merge(states)
    return evaluator.evaluate()


__all__ = ["DatasetEvaluator", "run_evaluator"]
