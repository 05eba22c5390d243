"""Reading and writing checkpoint files: atomic saves, safe loading, every file form we read."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterable

import torch

try:  # detectron2 model-zoo pickles hold numpy arrays
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


class CheckpointError(Exception):
    """A checkpoint that cannot be used: names the file and says what to do."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`mae_transfer.io.atomic_write`: a reader sees either the previous
    complete file or the new complete file, never a partial one, even after a SIGKILL mid-write."""
    from mae_transfer.io import atomic_write

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def save_model_folder(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict, required: Iterable[str] = ()) -> Path:
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
    if set(back) != set(tensors) or any(not torch.equal(back[k], tensors[k]) for k in tensors):
        raise CheckpointError(f"{out / 'model.safetensors'}: the file read back differs from what was written")
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
            f"{what} {path} could not be read ({type(e).__name__}: {e}); the file is truncated or not a PyTorch checkpoint"
        ) from None


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
    from mae_transfer.checkpoint.hub import is_named, resolve_weights

    path = resolve_weights(path) if is_named(path) else Path(path)  # hf-hub:ORG/NAME, timm:ARCH.TAG
    if path.is_dir():  # a Hugging Face / timm model folder, or a run directory of ours
        for name in ("model.safetensors", "pytorch_model.bin", "encoder.pth", "checkpoint-last.pth"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"checkpoint {path} is a folder without model.safetensors, pytorch_model.bin (a model folder), "
                                  "encoder.pth or checkpoint-last.pth (a run directory)")
    from mae_transfer.checkpoint.checks import check_dtypes
    from mae_transfer.checkpoint.formats import _unwrap

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
            raise CheckpointError(f"checkpoint {path} is a .safetensors file: pip install safetensors to read it") from None
        try:
            return st_load(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} could not be read ({type(e).__name__}: {e}); the file is truncated or not safetensors"
            ) from None
    if suffix == ".pkl" and path.is_file():
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} is a Python pickle (.pkl, e.g. a detectron2 model-zoo file): reading it runs whatever "
                "code the file holds. If you trust its source, pass --trust-checkpoint"
            )
        # detectron2 model-zoo files are plain pickles of numpy arrays, which torch.load rejects.
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except Exception:
            pass  # maybe a torch file with a .pkl name: load_file gives the error if it is not
    return load_file(path) if trust else load_safely(path)
