"""Every file form a checkpoint can take, read safely: ``.safetensors``, PyTorch files, model-zoo
pickles (only when trusted), model folders, run directories and hub names. Above the format
modules (it unwraps and checks what it reads); :mod:`mae_transfer.checkpoint.io` below them."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from mae_transfer.checkpoint.checks import check_dtypes
from mae_transfer.checkpoint.errors import CheckpointError
from mae_transfer.checkpoint.formats import _unwrap
from mae_transfer.checkpoint.hub import is_named, resolve_weights
from mae_transfer.checkpoint.io import load_file, load_safely


def read_checkpoint(path: str | os.PathLike, trust: bool = False) -> Any:
    """Read a checkpoint file safely: ``.safetensors`` (never pickle), a PyTorch file with
    ``torch.load(weights_only=True)`` (:func:`load_safely`), a model folder (``model.safetensors`` or
    ``pytorch_model.bin``: Hugging Face, timm) or a run directory (``encoder.pth``, else
    ``checkpoint-last.pth``).

    Files that need full unpickling (a detectron2 model-zoo ``.pkl``, checkpoints that pickled
    Python objects) are refused with a :class:`CheckpointError` saying why, unless ``trust``
    (``--trust-checkpoint``): unpickling can run code stored in the file. Raises
    :class:`CheckpointError` naming the file when it is missing or unreadable, or when its model's
    weights are not floating point (:func:`~mae_transfer.checkpoint.checks.check_dtypes`).
    """
    path = resolve_weights(path) if is_named(path) else Path(path)  # hf-hub:ORG/NAME, timm:ARCH.TAG
    if path.is_dir():  # a Hugging Face / timm model folder, or a run directory of ours
        for name in ("model.safetensors", "pytorch_model.bin", "encoder.pth", "checkpoint-last.pth"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(
                f"checkpoint {path} is a folder without model.safetensors, pytorch_model.bin (a model folder), "
                "encoder.pth or checkpoint-last.pth (a run directory)"
            )
    state = _read_file(path, trust)
    check_dtypes(_unwrap(state)[0], f"checkpoint {path}")  # its model's tensors (not an optimizer's)
    return state


def _read_file(path: Path, trust: bool) -> Any:
    """One checkpoint file, by its suffix (see :func:`read_checkpoint`)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors" and path.is_file():
        try:
            from safetensors.torch import load_file as st_load
        except ImportError:  # pragma: no cover - optional dependency
            raise CheckpointError(
                f"checkpoint {path} is a .safetensors file: pip install safetensors to read it"
            ) from None
        try:
            return st_load(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} could not be read ({type(e).__name__}: {e}); "
                "the file is truncated or not safetensors"
            ) from None
    if suffix == ".pkl" and path.is_file():
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} is a Python pickle (.pkl, e.g. a detectron2 model-zoo file): "
                "reading it runs whatever code the file holds. If you trust its source, pass --trust-checkpoint"
            )
        # detectron2 model-zoo files are plain pickles of numpy arrays, which torch.load rejects.
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except Exception:
            pass  # maybe a torch file with a .pkl name: load_file gives the error if it is not
    return load_file(path) if trust else load_safely(path)


__all__ = ["read_checkpoint"]
