"""What every weights reader and writer checks: tensor dtypes, and that a whole model is complete.

* :func:`check_dtypes`: weights are floating point (float32, float16, bfloat16, float64); integer
  tensors only where a format defines an integer buffer (:data:`INTEGER_BUFFERS`). A file cast to
  integers or booleans would otherwise load without complaint (``load_state_dict`` copies with a
  cast) and give rounded, meaningless numbers.
* :func:`require`: every name a format needs is there, named in one message when not (a
  ``KeyError`` from deep inside, or a file written without them, otherwise).
* :func:`required_names`: a format's complete name list from fixed names and repeated groups
  (``blocks.N.``: every block has what any block has).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from mae_transfer.checkpoint.errors import CheckpointError

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The integer tensors formats store (the reference files: mmsegmentation's checkpoint has both,
# detectron2's, the official MAE's, timm's and Hugging Face's ViT(MAE) none): BatchNorm's update
# counter (torch, mmcv heads) and BEiT's relative position index (mmseg / mmpretrain / timm BEiT).
INTEGER_BUFFERS = ("num_batches_tracked", "relative_position_index")
_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# The parameters of one plain ViT block in this toolkit's (= timm's, the official MAE's) names.
VIT_BLOCK_PARAMS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_dtypes(state_dict: Mapping[str, Any], source: str) -> None:
    """Raise :class:`CheckpointError` naming ``source`` (e.g. ``"--weights model.pth"``) and the
    first tensors that are not weights of a float type (integer tensors are allowed for the buffers in
    :data:`INTEGER_BUFFERS`). Non-tensor entries are ignored."""
    bad = []
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or value.dtype in WEIGHT_DTYPES:
            continue
        if str(name).rsplit(".", 1)[-1] in INTEGER_BUFFERS and value.dtype in _INTEGER_DTYPES:
            continue
        bad.append(f"{name} ({_dtype_name(value.dtype)})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{source}: {len(bad)} weight tensors are not floating point: {', '.join(bad[:3])}{more}. Weights must be "
            f"float32, float16, bfloat16 or float64 (integers only in {' / '.join(INTEGER_BUFFERS)} buffers): the file "
            "was cast or converted wrongly; use the original floating-point checkpoint"
        )


def compact(keys: Iterable[str]) -> list[str]:
    """Fold ``blocks.0.x`` ... ``blocks.11.x`` into ``blocks.{0-11}.x`` to keep reports short."""
    groups: dict[tuple[str, str], list[int]] = {}
    order: list[tuple[str, str]] = []
    for k in keys:
        m = re.match(r"^(.*?\.)(\d+)(\..*)$", k)
        key = (m.group(1), m.group(3)) if m else (k, "")
        if key not in groups:
            groups[key] = []
            order.append(key)
        if m:
            groups[key].append(int(m.group(2)))
    out = []
    for head, tail in order:
        idx = sorted(set(groups[(head, tail)]))
        if not idx:
            out.append(head)
            continue
        runs, start, prev = [], idx[0], idx[0]
        for i in idx[1:] + [None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            if i is not None:
                start = prev = i
        inner = runs[0] if len(runs) == 1 and "-" not in runs[0] else "{" + ",".join(runs) + "}"
        out.append(f"{head}{inner}{tail}")
    return out


def first_names(keys: Sequence[str], n: int = 6) -> str:
    """The first ``n`` (folded) key names, for error messages."""
    folded = compact(keys)
    more = len(folded) - n
    return ", ".join(folded[:n]) + (f" and {more} more" if more > 0 else "")


def required_names(
    state_dict: Mapping[str, Any], fixed: Iterable[str] = (), groups: Iterable[tuple[str, int, Sequence[str]]] = ()
) -> list[str]:
    """The names a whole model needs: ``fixed`` ones, and for each ``(prefix regex, first index,
    core suffixes)`` group (e.g. ``(r"backbone\\.net\\.blocks\\.", 0, VIT_BLOCK_PARAMS)``) every index
    from the first to the largest present (at least the first) with the core suffixes and every
    suffix any member of the group has (relative position tables, layer scales, norms)."""
    out = list(fixed)
    for prefix, start, core in groups:
        rx = re.compile(rf"^({prefix})(\d+)\.(.+)$")
        found = [(int(m.group(2)), m.group(3)) for k in state_dict if (m := rx.match(k))]
        literal = prefix.replace("\\", "")
        suffixes = list(dict.fromkeys([*core, *(s for _, s in found)]))
        last = max([i for i, _ in found] + [start])
        out += [f"{literal}{i}.{s}" for i in range(start, last + 1) for s in suffixes]
    return list(dict.fromkeys(out))


def require(
    state_dict: Mapping[str, Any], names: Iterable[str], what: str, shown: Callable[[str], str] | None = None
) -> None:
    """Raise one :class:`CheckpointError` (``what``: e.g. ``"--weights X is not a complete ViTDet
    Mask R-CNN"``) listing the ``names`` missing from ``state_dict`` (folded, ``shown`` renames them
    for the message, e.g. into the file's own names)."""
    missing = [k for k in names if k not in state_dict]
    if missing:
        listed = first_names([shown(k) for k in missing] if shown else missing, 8)
        raise CheckpointError(f"{what}: {len(missing)} tensors are missing: {listed}")


__all__ = [
    "INTEGER_BUFFERS",
    "VIT_BLOCK_PARAMS",
    "WEIGHT_DTYPES",
    "check_dtypes",
    "compact",
    "first_names",
    "require",
    "required_names",
]
