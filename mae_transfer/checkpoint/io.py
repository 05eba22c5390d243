"""Checkpoint files: atomic saves, safe loading, read-back checks, model folders (the file forms a
checkpoint can take are read by :mod:`mae_transfer.checkpoint.reading`)."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from mae_transfer.checkpoint.errors import CheckpointError  # also importable from here, its old home

try:  # detectron2 model-zoo pickles hold numpy arrays
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`mae_transfer.io.atomic_write`: a reader sees either the previous
    complete file or the new complete file, never a partial one, even after a SIGKILL mid-write."""
    from mae_transfer.io import atomic_write

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same tensor bit for bit: dtype, shape and every element's bits.
    Unlike ``torch.equal`` (where NaN != NaN), a NaN or inf read back from a file equals the one
    written, so diverged weights are not mistaken for a bad write."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    as_int = _SAME_SIZE_INT.get(a.element_size())
    if as_int is None:  # complex128: compare the real and imaginary parts' bits
        return same_tensor(torch.view_as_real(a), torch.view_as_real(b))
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def check_read_back(written: dict[str, torch.Tensor], back: Any, path: str | os.PathLike, ordered: bool = True) -> None:
    """Raise :class:`CheckpointError` unless the tensors ``back`` (read from ``path``) are
    ``written``, bit for bit (:func:`same_tensor`; with ``ordered`` in the same key order too).
    Weights holding NaN or inf are written faithfully and only warned about: the training that made
    them diverged, which the warning says instead of calling the file different."""
    import logging

    keys_ok = isinstance(back, dict) and (list(back) == list(written) if ordered else set(back) == set(written))
    if not keys_ok or any(not same_tensor(back[k], written[k]) for k in written):
        raise CheckpointError(f"{path}: the file read back differs from what was written")
    bad = [k for k, v in written.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        logging.getLogger(__name__).warning(
            "%s: %d tensors hold NaN or inf values (e.g. %s): the weights were written as they are, but the model "
            "they come from diverged and is not usable",
            path,
            len(bad),
            ", ".join(bad[:3]),
        )


def save_model_folder(
    out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict, required: Iterable[str] = ()
) -> Path:
    """A model folder as timm and Hugging Face keep them: ``model.safetensors`` and ``config.json``,
    each written atomically, then read back and compared (tensors bit for bit; the file must hold
    every ``required`` name, the complete set the target model has: the writer refuses an incomplete
    model before calling this). Returns the folder."""
    import json

    from safetensors.torch import load_file as st_load
    from safetensors.torch import save as st_save

    from mae_transfer.checkpoint.checks import require
    from mae_transfer.io import atomic_write, atomic_write_json

    out = Path(out_dir)
    with atomic_write(out / "model.safetensors", "wb") as f:
        f.write(st_save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", config)
    back = st_load(str(out / "model.safetensors"))
    require(back, required, f"{out / 'model.safetensors'}: the file read back is not a complete model")
    check_read_back(tensors, back, out / "model.safetensors", ordered=False)
    if json.loads((out / "config.json").read_text()) != json.loads(json.dumps(config)):
        raise CheckpointError(f"{out / 'config.json'}: the file read back differs from what was written")
    return out


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint file by FULL unpickling (``weights_only=False``), with a clear error for
    missing or unreadable files. Only for files the user trusts (``--trust-checkpoint``): everything
    else goes through :func:`load_safely`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (check the path)")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(e).__name__}: {e}); "
            "the file is truncated or not a PyTorch checkpoint"
        ) from None


def _numpy_globals() -> list:
    """The numpy names a pickle of plain numpy arrays uses (array rebuild, dtypes): no code runs."""
    core = getattr(np, "_core", None) or np.core
    out = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


def load_safely(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings, containers and plain numpy
    arrays only, so loading a stranger's file cannot run code. A file that needs more (arbitrary
    pickled objects) gives a :class:`CheckpointError` saying so; load it yourself only if you
    trust where it came from (``--trust-checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist (check the path)")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what_for = f"it calls {found.group(1)}" if found else type(e).__name__
        raise CheckpointError(
            f"{what} {path} holds Python objects beyond tensors and plain containers ({what_for}); loading it "
            "could run code stored in it. If you trust its source, pass --trust-checkpoint"
        ) from None
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise CheckpointError(
            f"{what} {path} could not be read ({type(e).__name__}: {e}); "
            "the file is truncated or not a PyTorch checkpoint"
        ) from None
