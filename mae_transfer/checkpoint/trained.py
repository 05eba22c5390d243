"""Trained task models (detectors, segmenters) with the config that builds them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from mae_transfer.checkpoint.checks import check_dtypes, first_names
from mae_transfer.checkpoint.io import CheckpointError, atomic_save, load_file, load_safely


def save_trained_model(model: torch.nn.Module, config: Any, path: str | os.PathLike, fmt: str, **extra: Any) -> Path:
    """A trained task model (detector, segmenter) with the config that builds it, written atomically."""
    from mae_transfer.config import to_dict

    return atomic_save({"format": fmt, "model": model.state_dict(), "config": to_dict(config), **extra}, path)


def trained_model_file(source: str | os.PathLike, expected: str) -> Path:
    """The file ``--weights source`` names: a file as it is, a run directory's weights file
    (:func:`.hub.weights_file`: its ``checkpoint-last.pth``), ``hf-hub:`` / ``timm:`` names from the
    cache. A folder without such a file, and a path that does not exist, raise one
    :class:`CheckpointError` saying which it is and what file is ``expected`` (e.g. "detector.pth or
    checkpoint-last.pth of a coco run")."""
    from mae_transfer.checkpoint.hub import weights_file

    path = weights_file(source)
    if path.is_dir():
        found = sorted(
            p.name for p in path.iterdir() if p.suffix.lower() in (".pth", ".pt", ".pkl", ".bin", ".safetensors")
        )
        holds = (
            f" (it holds {', '.join(found[:4])}{' ...' if len(found) > 4 else ''})"
            if found
            else " (it holds no weights file)"
        )
        raise CheckpointError(f"--weights {source}: is a folder, not a weights file{holds}; give the file: {expected}")
    if not path.is_file():
        raise CheckpointError(f"--weights {source}: file not found; give {expected}")
    return path


def read_trained_model(
    path: str | os.PathLike, head_prefix: str, artifact: str, command: str, trust: bool = False
) -> tuple[dict, dict | None]:
    """State dict and saved config of ``artifact`` (or a training checkpoint) of a ``command`` run.

    Read with ``weights_only`` (:func:`load_safely`) unless ``trust``. A file without
    ``head_prefix`` keys is a backbone, not a trained task model: the message says to pass it as
    ``--backbone``. Weights that are not floating point are refused (:func:`.checks.check_dtypes`);
    completeness is :func:`load_trained_model`'s (the model built from the saved config).
    """
    # a path, a run directory, hf-hub:ORG/NAME or timm:ARCH.TAG
    path = trained_model_file(path, f"{artifact} or checkpoint-last.pth of a {command} run")
    state = load_file(path, map_location="cpu") if trust else load_safely(path, "--weights")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(
            f"--weights {path}: not a trained model (expected {artifact} or checkpoint-last.pth of a {command} run)"
        )
    if not any(k.startswith(head_prefix) for k in state["model"]):
        raise CheckpointError(
            f"--weights {path} holds no {head_prefix}* weights: it looks like a backbone; "
            "pass it as --backbone to train a model"
        )
    check_dtypes(state["model"], f"--weights {path}")
    return state["model"], state.get("config")


def load_trained_model(
    model: torch.nn.Module, state: Mapping[str, Any], path: str | os.PathLike, explain: Any = None
) -> None:
    """``load_state_dict`` of a whole trained model, with one message naming what does not fit: the
    tensors of other shapes, those with no place in the model and the missing ones. ``explain(state,
    target, shape_mismatches)`` may add a sentence (e.g. about the class count)."""
    from mae_transfer.checkpoint.loading import fit_vits_to_state_dict

    # A backbone fitted to a released checkpoint when it was trained (BEiT's tables, DINOv2's layer
    # scale and registers) is fitted again: the model built from the saved config has only its size.
    fit_vits_to_state_dict(model, state)
    target = model.state_dict()
    unexpected = [k for k in state if k not in target]
    missing = [k for k in target if k not in state]
    shapes = [k for k in state if k in target and tuple(state[k].shape) != tuple(target[k].shape)]
    if not (unexpected or missing or shapes):
        model.load_state_dict(state)
        return
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} differ in shape (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)})"
        )
    if unexpected:
        parts.append(f"{len(unexpected)} have no place in the model ({first_names(unexpected, 3)})")
    if missing:
        parts.append(f"{len(missing)} model tensors are missing ({first_names(missing, 6)})")
    hint = explain(state, target, shapes) if explain is not None else ""
    raise CheckpointError(
        f"--weights {path} does not fit this model: {'; '.join(parts)}.{(' ' + hint) if hint else ''} "
        "Use the --preset / model.* settings it was trained with"
    )


def class_count_hint(*keys: str, offset: int = 0, advice: str = ""):
    """An ``explain`` for :func:`load_trained_model`: when the classifier ``keys`` (the first that
    differs in shape) disagree, "The file predicts N classes, the data has M" (``offset``: outputs
    that are no class, e.g. detection's background) and ``advice``."""

    def explain(state: Mapping[str, Any], target: Mapping[str, Any], shapes: list[str]) -> str:
        key = next((k for k in keys if k in shapes), None)
        if key is None:
            return ""
        have, want = state[key].shape[0] - offset, target[key].shape[0] - offset
        return f"The file predicts {have} classes, the data has {want}{': ' + advice if advice else ''}."

    return explain
