"""Checkpoints: our training checkpoints, and every foreign format the toolkit reads or writes.

This package is the only place that knows foreign parameter names: backbones of every format here,
whole detectron2 ViTDet detectors in :mod:`mae_transfer.checkpoint.detectron2`.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from mae_transfer.models.pos_embed import resize_pos_embed

try:  # detectron2 model-zoo pickles hold numpy arrays
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint that cannot be used: names the file and says what to do."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A reader therefore sees either the previous complete file or the new complete file, never a
    partial one, even if the process is killed (SIGKILL) in the middle of writing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # Make the rename itself durable.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint file with a clear error for missing or unreadable files."""
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
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{what} {path} holds Python objects beyond tensors and plain containers ({first}); loading it "
            "could run code stored in it. If you trust its source, pass --trust-checkpoint"
        ) from None
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise CheckpointError(
            f"{what} {path} could not be read ({type(e).__name__}: {e}); the file is truncated or not a PyTorch checkpoint"
        ) from None


# ====================================================================== formats
#
# Everything below converts foreign parameter names to ours (which are the official MAE / timm
# names), adapts shapes that legitimately differ between pretraining and transfer (position grid,
# patch size, relative-position tables) and loads with one clear report.

FORMATS = (
    "ours",
    "mae_full",
    "mae_encoder",
    "timm_vit",
    "hf_vitmae_model",
    "hf_vitmae_pretraining",
    "detectron2_vitdet",
    "mmseg",
    "unknown",
)

# Containers that wrap a state dict, tried in this order: official MAE / timm / our trainer use
# "model", mmcv / Lightning use "state_dict", DeepSpeed uses "module".
_CONTAINER_KEYS = ("model", "state_dict", "module")
# Prefixes that wrappers add to every key: DDP / DataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_OUR_TRAIN_FORMAT = "mae_transfer.train_checkpoint"

# Names the official MAE encoder has (models_mae.py / models_vit.py); ``export_mae_encoder`` keeps
# exactly these so the official main_finetune.py sees only the keys it expects.
_OFFICIAL_ENCODER_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)

# Presets of key patterns (fnmatch globs) that each transfer use tolerates. "Missing" = the model
# has the parameter, the checkpoint does not (it keeps its initial value); "unexpected" = the
# checkpoint has it, the model does not (it is ignored).
EXPECTED_MISSING: dict[str, tuple[str, ...]] = {
    # A new classifier; the official global-pool fine-tuning model adds fc_norm after pooling.
    "finetune": ("head.*", "fc_norm.*"),
    # Linear probing: a new head (fc_norm only when probing the mean of patch tokens).
    "linprobe": ("head.*", "fc_norm.*"),
    # Detection / segmentation backbones: zero-initialised relative position tables (MAE A.3/A.4,
    # ViTDet's rel_pos_h/w or BEiT's bias table), layer scale (1.0, mmseg's MAE segmentation), no
    # classifier, and backbones without a final norm.
    "dense": ("blocks.*.attn.rel_pos_*", "blocks.*.attn.relative_position_bias_table", "blocks.*.gamma_*", "head.*",
              "fc_norm.*", "norm.*"),
    # Continuing pretraining from an encoder-only checkpoint: the decoder starts fresh.
    "pretrain": ("mask_token", "decoder_*"),
}
EXPECTED_UNEXPECTED: dict[str, tuple[str, ...]] = {
    # The official fine-tuning model has no final norm (fc_norm replaces it) and no decoder.
    "finetune": ("norm.*", "mask_token", "decoder_*"),
    # A checkpoint that was fine-tuned with global pooling brings an fc_norm the probe may not use.
    "linprobe": ("fc_norm.*", "mask_token", "decoder_*"),
    # Dense backbones built without a class token (ViTDet) ignore it; no head or decoder either.
    "dense": ("cls_token", "norm.*", "fc_norm.*", "head.*", "mask_token", "decoder_*", "blocks.*.attn.relative_position_index"),
    # A fine-tuned checkpoint used to initialise pretraining brings a classifier.
    "pretrain": ("head.*", "fc_norm.*"),
}


def _is_tensor_like(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or (np is not None and isinstance(v, np.ndarray))


def _tensor_items(d: Mapping) -> dict[str, torch.Tensor]:
    """The tensor entries of a mapping (detectron2 pickles hold numpy arrays: made tensors)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            out[str(k)] = v
        elif np is not None and isinstance(v, np.ndarray) and v.dtype != object:
            out[str(k)] = torch.from_numpy(np.ascontiguousarray(v))
    return out


def _looks_like_state_dict(d: Any) -> bool:
    return isinstance(d, Mapping) and len(d) > 0 and any(_is_tensor_like(v) for v in d.values())


def _is_our_train_checkpoint(d: Any) -> bool:
    if not isinstance(d, Mapping):
        return False
    if d.get("format") == _OUR_TRAIN_FORMAT:
        return True
    # Older / hand-made trainer checkpoints: the official MAE trainer writes "epoch"/"args" instead.
    return all(k in d for k in ("model", "optimizer", "step", "config"))


def _unwrap(state: Any) -> tuple[dict[str, torch.Tensor], bool]:
    """Descend through containers to the tensor dict; returns it and whether it was ours."""
    ours = False
    seen = 0
    while isinstance(state, Mapping) and seen < 8:
        seen += 1
        if _is_our_train_checkpoint(state):
            ours = True
        inner = None
        for key in _CONTAINER_KEYS:
            v = state.get(key)
            if isinstance(v, torch.nn.Module):
                v = v.state_dict()
            if isinstance(v, Mapping) and (_looks_like_state_dict(v) or any(c in v for c in _CONTAINER_KEYS)):
                inner = v
                break
        if inner is None:
            break
        state = inner
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    tensors = _tensor_items(state) if isinstance(state, Mapping) else {}
    return _strip_wrapper_prefixes(tensors), ours


def _strip_wrapper_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while sd and changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def _strip_generic_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix (``encoder.``, ``backbone.`` ...) in front of timm-style names.

    Found from the key that ends in ``patch_embed.proj.weight``; only keys under that prefix are
    renamed, so heads living beside the backbone keep their names (and are reported unexpected).
    """
    if "patch_embed.proj.weight" in sd:
        return sd
    for k in sd:
        if k.endswith(".patch_embed.proj.weight"):
            prefix = k[: -len("patch_embed.proj.weight")]
            return {(n[len(prefix):] if n.startswith(prefix) else n): v for n, v in sd.items()}
    return sd


_HF_ENCODER_STARTS = (
    "embeddings.patch_embeddings.",
    "vit.embeddings.patch_embeddings.",
    "encoder.layer.",
    "vit.encoder.layer.",
    "vit.layers.",
)


def _classify(sd: Mapping[str, Any]) -> str:
    """Format of a bare (unwrapped, prefix-stripped) state dict, from its key names only."""
    keys = list(sd)
    if not keys:
        return "unknown"
    if any(k.startswith("backbone.net.") for k in keys):
        return "detectron2_vitdet"
    if any(k.startswith(("backbone.layers.", "backbone.patch_embed.projection.")) for k in keys):
        return "mmseg"
    hf_enc = any(k.startswith(_HF_ENCODER_STARTS) for k in keys)
    hf_dec = any(k.startswith(("decoder.decoder_layers.", "decoder.decoder_pred.", "decoder.decoder_embed.")) for k in keys)
    if hf_enc or hf_dec:
        return "hf_vitmae_pretraining" if hf_dec else "hf_vitmae_model"
    timm_like = any(k.endswith("patch_embed.proj.weight") for k in keys) or any(re.match(r"^blocks\.\d+\.", k) for k in keys)
    if timm_like:
        if "mask_token" in sd or any(k.startswith("decoder_") for k in keys):
            return "mae_full"
        if any(k.startswith(("head.", "fc_norm.")) for k in keys):
            return "timm_vit"
        return "mae_encoder"
    return "unknown"


def detect_format(state: Any) -> str:
    """Name the checkpoint format of ``state`` (a loaded checkpoint or a state dict).

    Containers are unwrapped first (``{"model": ...}``, ``{"state_dict": ...}``,
    ``{"module": ...}``, DDP ``module.`` and ``torch.compile`` ``_orig_mod.`` prefixes). Rules, on
    key names only (tensors may live on the meta device):

    - ``"ours"``: a training checkpoint of this toolkit (``format ==
      "mae_transfer.train_checkpoint"``, or ``model``/``optimizer``/``step``/``config`` together);
    - ``"detectron2_vitdet"``: keys under ``backbone.net.``;
    - ``"mmseg"``: ``backbone.layers.N.`` or ``backbone.patch_embed.projection.`` (mmseg, mmpretrain);
    - ``"hf_vitmae_pretraining"``: Hugging Face names with a ``decoder.decoder_*`` part;
    - ``"hf_vitmae_model"``: Hugging Face encoder names (``embeddings.patch_embeddings.``,
      ``encoder.layer.N.`` of transformers 4, ``layers.N.`` of transformers 5, optionally under
      ``vit.``) without a decoder;
    - ``"mae_full"``: official / timm names plus ``mask_token`` or ``decoder_*``;
    - ``"timm_vit"``: official / timm names with a classifier (``head.*`` or ``fc_norm.*``);
    - ``"mae_encoder"``: official / timm names, no classifier, no decoder (released encoders).
      ``timm_vit`` and ``mae_encoder`` share every name and convert identically;
    - ``"unknown"``: anything else (optimizer-only files, detection heads, other models).
    """
    sd, ours = _unwrap(state)
    if ours:
        return "ours"
    return _classify_any(sd)


def _classify_any(sd: Mapping[str, Any]) -> str:
    # Known prefixed layouts first (detectron2's backbone.net. is one); then a generic wrapper prefix.
    fmt = _classify(sd)
    return _classify(_strip_generic_prefix(dict(sd))) if fmt == "unknown" else fmt


# ---------------------------------------------------------------------------- name conversion
# Per-layer names of Hugging Face ViT / ViTMAE layers. transformers 4 (and every checkpoint on the
# Hub) uses the first spelling; transformers 5 renamed modules in memory and converts on load.
_HF_QKV = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_HF_LAYER = {
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_DECODER_TOP = {
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
}
_HF_DECODER_MODULES = ("decoder_embed", "decoder_norm", "decoder_pred")

# mmcv / mmseg / mmpretrain per-layer names.
_MM_LAYER = {
    "ln1": "norm1",
    "ln2": "norm2",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.proj",
    "attn.attn.out_proj": "attn.proj",  # mmcv MultiheadAttention wraps nn.MultiheadAttention
    "ffn.layers.0.0": "mlp.fc1",
    "ffn.layers.1": "mlp.fc2",
}
_MM_PARAM = {
    # nn.MultiheadAttention packs q, k, v in this order: the same layout as a fused qkv Linear.
    "attn.attn.in_proj_weight": "attn.qkv.weight",
    "attn.attn.in_proj_bias": "attn.qkv.bias",
    # BEiT-style attention (mmseg MAE / BEiT backbones): separate q and v biases, merged below.
    "attn.q_bias": "attn.q_bias",
    "attn.v_bias": "attn.v_bias",
    # BEiT's relative position bias table (its index buffer is derived and ignored) and layer scale.
    "attn.relative_position_bias_table": "attn.relative_position_bias_table",
    "attn.relative_position_index": "attn.relative_position_index",
    "gamma_1": "gamma_1",
    "gamma_2": "gamma_2",
}


def _split_param(name: str) -> tuple[str, str]:
    mod, _, param = name.rpartition(".")
    return mod, param


def _convert_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    # (our block prefix, "weight"/"bias") -> {"q"/"k"/"v": (original name, tensor)}
    pending: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, v in sd.items():
        name = key[len("vit."):] if key.startswith("vit.") else key
        m = re.match(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$", name)
        dm = re.match(r"^decoder\.decoder_layers\.(\d+)\.(.+)$", key)
        if m or dm:
            idx, rest = (m or dm).groups()
            block = f"{'decoder_blocks' if dm else 'blocks'}.{idx}"
            mod, param = _split_param(rest)
            if mod in _HF_QKV:
                pending.setdefault((block, param), {})[_HF_QKV[mod]] = (key, v)
                continue
            if mod in _HF_LAYER:
                out[f"{block}.{_HF_LAYER[mod]}.{param}"] = v
                continue
        elif name in _HF_TOP and not key.startswith("decoder."):
            out[_HF_TOP[name]] = v
            continue
        elif key in _HF_DECODER_TOP:
            out[_HF_DECODER_TOP[key]] = v
            continue
        elif key.startswith("decoder.") and _split_param(key[len("decoder."):])[0] in _HF_DECODER_MODULES:
            out[key[len("decoder."):]] = v
            continue
        elif key.startswith("classifier."):  # ViTForImageClassification
            out["head." + key[len("classifier."):]] = v
            continue
        out[key] = v  # not mapped: keeps its name and is reported unexpected
    for (block, param), parts in pending.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"{block}.attn.qkv.{param}"] = torch.cat([parts[c][1] for c in ("q", "k", "v")], dim=0)
        else:  # an incomplete triple cannot be fused: keep the pieces under their own names
            for orig, t in parts.values():
                out[orig] = t
    return out


def _convert_mm_layer(rest: str) -> str | None:
    if rest in _MM_PARAM:
        return _MM_PARAM[rest]
    mod, param = _split_param(rest)
    if mod in _MM_LAYER:
        return f"{_MM_LAYER[mod]}.{param}"
    return None


def _convert_mmseg(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        new = None
        if key.startswith("backbone."):
            name = key[len("backbone."):]
            m = re.match(r"^layers\.(\d+)\.(.+)$", name)
            if m:
                rest = _convert_mm_layer(m.group(2))
                new = f"blocks.{m.group(1)}.{rest}" if rest else None
            elif name in ("cls_token", "pos_embed"):
                new = name
            elif name.startswith("patch_embed.projection."):
                new = "patch_embed.proj." + name[len("patch_embed.projection."):]
            elif name.startswith("ln1."):  # mm's final norm
                new = "norm." + name[len("ln1."):]
        elif key.startswith("neck."):  # mmpretrain MAEPretrainDecoder
            name = key[len("neck."):]
            m = re.match(r"^decoder_blocks\.(\d+)\.(.+)$", name)
            if m:
                rest = _convert_mm_layer(m.group(2))
                new = f"decoder_blocks.{m.group(1)}.{rest}" if rest else None
            elif name in ("mask_token", "decoder_pos_embed"):
                new = name
            elif name.startswith(("decoder_embed.", "decoder_pred.")):
                new = name
            elif name.startswith("ln1."):  # the decoder norm (build_norm_layer postfix 1)
                new = "decoder_norm." + name[len("ln1."):]
        out[new or key] = v
    return out


def _convert_detectron2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # ViTDet's backbone.net uses timm/MAE names already (plus rel_pos_h/w); FPN, RPN and ROI heads
    # keep their names and are reported unexpected.
    p = "backbone.net."
    return {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}


def _merge_split_qkv_bias(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BEiT-style ``attn.q_bias`` + ``attn.v_bias`` -> ``attn.qkv.bias`` (the key bias is zero)."""
    qs = [k for k in sd if k.endswith(".attn.q_bias")]
    if not qs:
        return sd
    sd = dict(sd)
    for qk in qs:
        base = qk[: -len("q_bias")]
        vk, target = base + "v_bias", base + "qkv.bias"
        if vk in sd and target not in sd:
            q, v = sd.pop(qk), sd.pop(vk)
            sd[target] = torch.cat([q, torch.zeros_like(q), v], dim=0)
    return sd


def to_vit_state_dict(state: Any, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a checkpoint in any supported format to this toolkit's parameter names.

    ``state`` is what ``torch.load`` returned (containers are unwrapped) or a bare state dict;
    ``fmt`` forces a format (one of :data:`FORMATS`) instead of :func:`detect_format`. Keys that
    have no counterpart keep their original names, so loading reports them as unexpected.
    Hugging Face q/k/v projections are fused into ``attn.qkv`` in q, k, v order; BEiT-style
    separate q/v biases become ``attn.qkv.bias`` with a zero key bias.
    """
    sd, ours = _unwrap(state)
    if fmt is None or fmt == "ours":
        fmt = _classify_any(sd)
    elif fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt in ("mae_full", "mae_encoder", "timm_vit"):
        out = _strip_generic_prefix(sd)
    elif fmt in ("hf_vitmae_model", "hf_vitmae_pretraining"):
        out = _convert_hf(sd)
    elif fmt == "detectron2_vitdet":
        out = _convert_detectron2(sd)
    elif fmt == "mmseg":
        out = _convert_mmseg(sd)
    else:
        out = dict(sd)
    return _merge_split_qkv_bias(out)


# ---------------------------------------------------------------------------- inspection
def _block_indices(sd: Mapping[str, Any], prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _grid_from_tokens(n: int, prefer_prefix: int) -> tuple[int, tuple[int, int]] | None:
    """(prefix rows, square grid) for a table of ``n`` rows, or None when no square fits."""
    for p in (prefer_prefix, 1 - prefer_prefix):
        m = n - p
        side = math.isqrt(max(m, 0))
        if m > 0 and side * side == m:
            return p, (side, side)
    return None


def infer_vit_config(state_dict: Any) -> dict[str, Any]:
    """What a checkpoint's parameter shapes say about the ViT it was made for.

    Accepts any supported format (converted first). Returns a dict with ``embed_dim``, ``depth``,
    ``num_heads`` (only knowable from relative position tables; else None), ``mlp_ratio``,
    ``patch_size``, ``in_chans``, ``grid_size`` and ``img_size`` (from a square ``pos_embed``;
    None otherwise), ``has_cls_token``, ``pos_embed_has_cls_row``, ``num_classes`` (None without a
    head), ``global_pool`` (``"avg"`` with ``fc_norm``, ``"token"`` with a head but no
    ``fc_norm``, None without a head), ``use_rel_pos``,
    ``qkv_bias``, ``is_full_mae`` with ``decoder_embed_dim``, ``decoder_depth`` and
    ``decoder_num_heads`` (None), ``format`` and ``name`` (the matching ``VIT_SIZES`` entry or None).
    Unknown values are None.
    """
    fmt = detect_format(state_dict)
    sd = to_vit_state_dict(state_dict)
    cfg: dict[str, Any] = dict.fromkeys(
        (
            "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "in_chans", "grid_size", "img_size",
            "has_cls_token", "pos_embed_has_cls_row", "num_classes", "global_pool", "use_rel_pos", "qkv_bias",
            "is_full_mae", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "name",
        )
    )
    cfg["format"] = fmt
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.dim() == 4:
        cfg["embed_dim"], cfg["in_chans"] = int(w.shape[0]), int(w.shape[1])
        cfg["patch_size"] = int(w.shape[2]) if w.shape[2] == w.shape[3] else (int(w.shape[2]), int(w.shape[3]))
    blocks = _block_indices(sd, "blocks")
    cfg["depth"] = len(blocks) if blocks else None
    if cfg["embed_dim"] is None:
        for k in ("blocks.0.norm1.weight", "cls_token", "norm.weight", "fc_norm.weight"):
            if k in sd:
                cfg["embed_dim"] = int(sd[k].shape[-1])
                break
    fc1 = sd.get(f"blocks.{blocks[0]}.mlp.fc1.weight") if blocks else None
    if fc1 is not None and cfg["embed_dim"]:
        cfg["mlp_ratio"] = fc1.shape[0] / cfg["embed_dim"]
    if blocks:
        cfg["qkv_bias"] = f"blocks.{blocks[0]}.attn.qkv.bias" in sd
        rel = sd.get(f"blocks.{blocks[0]}.attn.rel_pos_h")
        cfg["use_rel_pos"] = rel is not None
        if rel is not None and cfg["embed_dim"] and rel.shape[-1]:
            cfg["num_heads"] = cfg["embed_dim"] // int(rel.shape[-1])
    cfg["has_cls_token"] = "cls_token" in sd
    pos = sd.get("pos_embed")
    if pos is not None and pos.dim() >= 2:
        found = _grid_from_tokens(int(pos.shape[-2]), 1 if cfg["has_cls_token"] else 0)
        if found:
            cfg["pos_embed_has_cls_row"] = bool(found[0])
            cfg["grid_size"] = found[1]
            if isinstance(cfg["patch_size"], int):
                cfg["img_size"] = found[1][0] * cfg["patch_size"]
    head = sd.get("head.weight")
    cfg["num_classes"] = int(head.shape[0]) if head is not None and head.dim() == 2 else None
    # fc_norm exists only in global-pool classifiers; a head without it pools the class token.
    if "fc_norm.weight" in sd:
        cfg["global_pool"] = "avg"
    elif cfg["num_classes"] is not None:
        cfg["global_pool"] = "token"
    dec = _block_indices(sd, "decoder_blocks")
    cfg["is_full_mae"] = "mask_token" in sd or bool(dec) or "decoder_pred.weight" in sd
    if cfg["is_full_mae"]:
        de = sd.get("decoder_embed.weight")
        cfg["decoder_embed_dim"] = int(de.shape[0]) if de is not None else (
            int(sd["mask_token"].shape[-1]) if "mask_token" in sd else None
        )
        cfg["decoder_depth"] = len(dec)
    cfg["name"] = _standard_name(cfg["embed_dim"], cfg["depth"], cfg["patch_size"])
    return cfg


def _standard_name(embed_dim: int | None, depth: int | None, patch_size: Any) -> str | None:
    from mae_transfer.models.vit import VIT_SIZES

    hits = [n for n, s in VIT_SIZES.items() if s.embed_dim == embed_dim and s.depth == depth]
    exact = [n for n in hits if VIT_SIZES[n].patch_size == patch_size]
    return (exact or hits or [None])[0]


def _describe(cfg: Mapping[str, Any]) -> str:
    text = f"a ViT of width {cfg.get('embed_dim')} and depth {cfg.get('depth')}"
    if cfg.get("patch_size") is not None:
        text += f" (patch {cfg['patch_size']}"
        if cfg.get("img_size"):
            text += f", {cfg['img_size']} px"
        text += ")"
    if cfg.get("is_full_mae"):
        text += f" with an MAE decoder of width {cfg.get('decoder_embed_dim')} and depth {cfg.get('decoder_depth')}"
    return text


def _suggest(cfg: Mapping[str, Any], model: torch.nn.Module) -> str:
    """A ``--model`` value that fits the checkpoint, for error messages."""
    name = cfg.get("name")
    if name is None:
        return "a model of the checkpoint's size"
    if hasattr(model, "decoder_blocks"):
        from mae_transfer.pretrain.model import MAE_PRESETS

        for preset, p in MAE_PRESETS.items():
            if p["encoder"] == name:
                return preset
    return name


# ---------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint file: PyTorch (via :func:`load_file`), detectron2 ``.pkl`` or ``.safetensors``.

    A directory is read as a Hugging Face model folder (``model.safetensors`` or
    ``pytorch_model.bin``). Raises :class:`CheckpointError` naming the file when it is missing or
    unreadable.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"checkpoint {path} is a folder without model.safetensors or pytorch_model.bin")
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
        # detectron2 model-zoo files are plain pickles of numpy arrays, which torch.load rejects.
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except Exception:
            pass  # maybe a torch file with a .pkl name: load_file gives the error if it is not
    return load_file(path)


# ---------------------------------------------------------------------------- adaptation
def _target_prefix_tokens(model: torch.nn.Module, target: Mapping[str, torch.Tensor]) -> int:
    # Rows of prefix tokens in the model's pos_embed (a ViTDet backbone keeps an unused class row).
    n = getattr(model, "pos_embed_prefix", getattr(model, "num_prefix_tokens", None))
    return int(n) if n is not None else (1 if "cls_token" in target else 0)


def _target_grid(model: torch.nn.Module, rows: int, prefix: int) -> tuple[int, int]:
    grid = getattr(model, "pos_embed_grid", getattr(model, "grid_size", None))
    if grid is not None and grid[0] * grid[1] == rows - prefix:
        return (int(grid[0]), int(grid[1]))
    side = math.isqrt(rows - prefix)
    return (side, side)


def _adapt_pos_table(
    name: str,
    table: torch.Tensor,
    want: torch.Size,
    new_prefix: int,
    new_grid: tuple[int, int],
    has_cls: bool,
    allow_resize: bool,
    notes: list[str],
) -> torch.Tensor | None:
    """Fit a (1, prefix + H*W, D) table to ``want``; None when it cannot be done.

    Adding or dropping the class row is always allowed (no information is invented for the grid);
    resizing the grid only with ``allow_resize``.
    """
    if table.dim() == 2:
        table = table.unsqueeze(0)
    if table.dim() != 3 or table.shape[-1] != want[-1]:
        return None
    rows = int(table.shape[1])
    # Prefer the reading in which the grid part already has the target's size.
    order = (1, 0) if has_cls else (0, 1)
    old = None
    for p in order:
        if rows - p == new_grid[0] * new_grid[1]:
            old = (p, new_grid)
            break
    if old is None:
        old = _grid_from_tokens(rows, order[0])
    if old is None:
        return None
    old_prefix, old_grid = old
    if tuple(old_grid) != tuple(new_grid) and not allow_resize:
        return None
    out = resize_pos_embed(table, new_grid, old_prefix, old_grid=old_grid, new_prefix_tokens=new_prefix)
    if out.shape != want:
        return None
    how = " (bicubic)" if tuple(old_grid) != tuple(new_grid) else ""
    notes.append(
        f"{name}: {old_prefix} prefix + {old_grid[0]}x{old_grid[1]} grid -> {new_prefix} prefix + "
        f"{new_grid[0]}x{new_grid[1]} grid{how}"
    )
    return out


def _adapt(
    sd: dict[str, torch.Tensor],
    model: torch.nn.Module,
    target: Mapping[str, torch.Tensor],
    interpolate_pos_embed: bool,
    notes: list[str],
) -> dict[str, torch.Tensor]:
    """Reshape checkpoint tensors whose shapes legitimately differ from the model's."""
    sd = dict(sd)
    has_cls = "cls_token" in sd
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        want = target["pos_embed"].shape
        prefix = _target_prefix_tokens(model, target)
        grid = _target_grid(model, want[-2], prefix)
        new = _adapt_pos_table("pos_embed", sd["pos_embed"], want, prefix, grid, has_cls, interpolate_pos_embed, notes)
        if new is not None:
            sd["pos_embed"] = new
    if "decoder_pos_embed" in sd and "decoder_pos_embed" in target:
        want = target["decoder_pos_embed"].shape
        if sd["decoder_pos_embed"].shape != want:
            grid = _target_grid(model, want[-2], 1)
            new = _adapt_pos_table(
                "decoder_pos_embed", sd["decoder_pos_embed"], want, 1, grid, True, interpolate_pos_embed, notes
            )
            if new is not None:
                sd["decoder_pos_embed"] = new
    k = "patch_embed.proj.weight"
    if k in sd and k in target:
        src, want = sd[k], target[k]
        if src.dim() == 4 and src.shape[:2] == want.shape[:2] and src.shape[2:] != want.shape[2:]:
            # ViTDet's recipe for ViT-H/14 -> /16: resize the kernel like an image (bicubic).
            new = F.interpolate(src.float(), size=tuple(want.shape[2:]), mode="bicubic", align_corners=False)
            sd[k] = new.to(src.dtype)
            notes.append(f"{k}: kernel {tuple(src.shape[2:])} -> {tuple(want.shape[2:])} (bicubic)")
    for name in [n for n in sd if n.endswith((".attn.rel_pos_h", ".attn.rel_pos_w"))]:
        if name not in target:
            continue
        src, want = sd[name], target[name]
        if src.dim() == 2 and want.dim() == 2 and src.shape[1] == want.shape[1] and src.shape[0] != want.shape[0]:
            new = F.interpolate(src.t().unsqueeze(0).float(), size=int(want.shape[0]), mode="linear", align_corners=False)
            sd[name] = new[0].t().to(src.dtype)
            notes.append(f"{name}: {src.shape[0]} -> {want.shape[0]} offsets (linear)")
    return sd


# ---------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """What :func:`load_backbone` did.

    loaded: model keys that received checkpoint values; missing: model keys that kept their
    initial values (expected or tolerated); unexpected: checkpoint keys (converted names) the model
    has no place for; mismatched: (key, checkpoint shape, model shape) left out because the shapes
    differ; adapted: shape adaptations that were made (interpolations).
    """

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    format: str
    source: str
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A multi-line human-readable report (block indices are folded into ranges)."""
        lines = [
            f"loaded {self.source} (format {self.format}): {len(self.loaded)} tensors loaded, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"
            + (f", {len(self.mismatched)} left out for their shape" if self.mismatched else "")
        ]
        for title, keys in (("loaded", self.loaded), ("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {title}: " + ", ".join(_compact(keys)))
        for k, a, b in self.mismatched:
            lines.append(f"  shape differs: {k} checkpoint {a} vs. model {b}")
        for note in self.adapted:
            lines.append(f"  adapted {note}")
        return "\n".join(lines)


def _compact(keys: Iterable[str]) -> list[str]:
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


def _patterns(spec: str | Iterable[str], presets: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Patterns from a preset name, a single pattern or an iterable of patterns/preset names."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        out.extend(presets[item] if item in presets else (item,))
    return tuple(out)


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _first(keys: Sequence[str], n: int = 6) -> str:
    """The first ``n`` (folded) key names, for error messages."""
    folded = _compact(keys)
    more = len(folded) - n
    return ", ".join(folded[:n]) + (f" and {more} more" if more > 0 else "")


def load_backbone(
    model: torch.nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    expected_missing: str | Iterable[str] = (),
    expected_unexpected: str | Iterable[str] = (),
    interpolate_pos_embed: bool = True,
    strict_shapes: bool = True,
) -> LoadReport:
    """Load pretrained weights of any supported format into ``model`` (a ViT or MAE of ours).

    Steps: read ``source`` (a path, or an already loaded checkpoint / state dict), detect its
    format, convert names (:func:`to_vit_state_dict`), adapt shapes to the model (bicubic
    ``pos_embed`` / ``decoder_pos_embed`` grid resize and class-row add/drop, bicubic patch-kernel
    resize when the patch size differs, linear ``rel_pos_h/w`` resize), then
    ``model.load_state_dict(strict=False)``.

    ``expected_missing`` / ``expected_unexpected`` are fnmatch patterns (``"head.*"``,
    ``"decoder_*"``) or names of presets in :data:`EXPECTED_MISSING` / :data:`EXPECTED_UNEXPECTED`
    (``"finetune"``, ``"linprobe"``, ``"dense"``, ``"pretrain"``). A checkpoint tensor whose shape
    does not fit is left out without complaint when its key is expected missing (a classifier for
    another number of classes).

    Raises :class:`CheckpointError` naming the source when nothing in it fits the model, when a
    shape cannot be adapted (with ``strict_shapes``; otherwise those tensors are skipped with a
    warning), or when model parameters are missing that were not expected. Unexpected checkpoint
    keys that were not expected only give a warning. The report is logged at INFO and returned.
    """
    exp_missing = _patterns(expected_missing, EXPECTED_MISSING)
    exp_unexpected = _patterns(expected_unexpected, EXPECTED_UNEXPECTED)
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    if isinstance(source, Mapping):
        src_name = "<in-memory state dict>"
        raw: Any = source
    else:
        src_name = str(source)
        raw = read_checkpoint(source)
    fmt = detect_format(raw)
    sd = to_vit_state_dict(raw)
    target = model.state_dict()
    # Described before adaptation, so messages give the checkpoint's own grid and patch size.
    ckpt_cfg = infer_vit_config(sd)
    model_cfg = infer_vit_config(target)
    notes: list[str] = []
    sd = _adapt(sd, model, target, interpolate_pos_embed, notes)

    common = [k for k in sd if k in target]
    if not common:
        raise CheckpointError(
            f"no backbone weights found in {src_name} (format detected: {fmt}; "
            f"{len(sd)} tensors, e.g. {_first(list(sd), 4) or 'none'}): pass a ViT / MAE checkpoint"
        )
    loadable: dict[str, torch.Tensor] = {}
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for k in common:
        if sd[k].shape == target[k].shape:
            loadable[k] = sd[k]
        else:
            mismatched.append((k, tuple(sd[k].shape), tuple(target[k].shape)))
    bad_shapes = [m for m in mismatched if not _matches(m[0], exp_missing)]
    if bad_shapes and strict_shapes:
        k, a, b = bad_shapes[0]
        if ckpt_cfg["embed_dim"] != model_cfg["embed_dim"] or ckpt_cfg["depth"] != model_cfg["depth"]:
            why = (
                f"checkpoint {src_name} holds {_describe(ckpt_cfg)}; the model is "
                f"{_describe(model_cfg)}: pass a checkpoint of the same size or choose --model "
                f"{_suggest(ckpt_cfg, model)}"
            )
        else:
            why = f"checkpoint {src_name} ({_describe(ckpt_cfg)}) does not fit the model ({_describe(model_cfg)})"
        hint = ""
        if k in ("pos_embed", "decoder_pos_embed") and not interpolate_pos_embed:
            hint = "; allow interpolate_pos_embed to resize the position grid"
        raise CheckpointError(
            f"{why} ({len(bad_shapes)} tensors differ in shape, e.g. {k}: checkpoint {a} vs. model {b}; "
            f"format detected: {fmt}){hint}"
        )
    for k, a, b in mismatched:
        level = logging.INFO if _matches(k, exp_missing) else logging.WARNING
        log.log(level, "%s: leaving out %s, checkpoint shape %s does not fit the model's %s", src_name, k, a, b)

    missing = [k for k in target if k not in loadable]
    skipped = {m[0] for m in mismatched}
    bad_missing = [k for k in missing if not _matches(k, exp_missing) and k not in skipped]
    if bad_missing:
        same_size = (ckpt_cfg["embed_dim"], ckpt_cfg["depth"]) == (model_cfg["embed_dim"], model_cfg["depth"])
        if same_size:
            advice = (
                "If they are meant to start from their initial values, name them in expected_missing "
                f"(patterns, or a preset: {', '.join(EXPECTED_MISSING)})"
            )
        else:
            advice = f"Pass a checkpoint for this model, or choose --model {_suggest(ckpt_cfg, model)} to fit the checkpoint"
        raise CheckpointError(
            f"checkpoint {src_name} lacks {len(bad_missing)} parameters of the model that were not expected "
            f"to be missing: {_first(bad_missing)}. The checkpoint seems to hold {_describe(ckpt_cfg)} "
            f"(format detected: {fmt}); the model is {_describe(model_cfg)}. {advice}"
        )
    unexpected = [k for k in sd if k not in target]
    model.load_state_dict(loadable, strict=False)  # loadable holds model keys of matching shapes only
    report = LoadReport(
        loaded=list(loadable), missing=missing, unexpected=unexpected, format=fmt, source=src_name,
        mismatched=mismatched, adapted=notes,
    )
    log.info("%s", report.summary())
    surprising = [k for k in unexpected if not _matches(k, exp_unexpected)]
    if surprising:
        extra = ""
        if ckpt_cfg["depth"] and model_cfg["depth"] and ckpt_cfg["depth"] > model_cfg["depth"]:
            extra = f" (the checkpoint has {ckpt_cfg['depth']} blocks, the model {model_cfg['depth']})"
        log.warning(
            "%s: %d checkpoint tensors have no place in the model and are ignored%s: %s",
            src_name, len(surprising), extra, ", ".join(_compact(surprising)),
        )
    return report


# ---------------------------------------------------------------------------- export
def export_mae_encoder(model_or_state_dict: torch.nn.Module | Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the encoder as the official MAE release does: ``{"model": encoder_state_dict}``.

    Accepts a model (an MAE or a ViT of ours, DDP / compiled wrappers too) or any checkpoint /
    state dict :func:`to_vit_state_dict` reads. Only official encoder names are kept (``cls_token``,
    ``pos_embed``, ``patch_embed.proj``, ``blocks.N.*``, ``norm``); ``mask_token``, ``decoder_*``,
    classifier heads, ``fc_norm`` and relative position tables are dropped, so the official
    ``main_finetune.py`` finds exactly ``head.*`` (+ ``fc_norm.*``) missing. Written atomically.
    """
    obj: Any = model_or_state_dict
    if isinstance(obj, torch.nn.Module):
        while isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            obj = obj.module
        obj = getattr(obj, "_orig_mod", obj)  # torch.compile wrapper
        sd = obj.encoder_state_dict() if hasattr(obj, "encoder_state_dict") else obj.state_dict()
        sd = _strip_wrapper_prefixes(dict(sd))
    else:
        sd = to_vit_state_dict(obj)
    encoder = {k: v.detach().cpu().contiguous() for k, v in sd.items() if _OFFICIAL_ENCODER_KEY.match(k)}
    if "patch_embed.proj.weight" not in encoder or not any(k.startswith("blocks.") for k in encoder):
        raise CheckpointError(f"nothing to export to {path}: no ViT encoder weights found")
    if "cls_token" not in encoder:
        # The official fine-tuning code always has a class token and a class row in pos_embed.
        raise CheckpointError(
            f"cannot export to {path} in the official MAE format: the encoder has no class token"
        )
    dropped = [k for k in sd if k not in encoder]
    if dropped:
        log.info("export to %s leaves out %d non-encoder tensors: %s", path, len(dropped), ", ".join(_compact(dropped)))
    path = atomic_save({"model": encoder}, path)
    back = load_safely(path, "exported file")["model"]
    if list(back) != list(encoder) or any(not torch.equal(back[k], encoder[k]) for k in encoder):
        raise CheckpointError(f"{path}: the file read back differs from what was written")
    return path


# ------------------------------------------------------------------------ trained task models
def save_trained_model(model: torch.nn.Module, config: Any, path: str | os.PathLike, fmt: str, **extra: Any) -> Path:
    """A trained task model (detector, segmenter) with the config that builds it, written atomically."""
    from mae_transfer.config import to_dict

    return atomic_save({"format": fmt, "model": model.state_dict(), "config": to_dict(config), **extra}, path)


def read_trained_model(
    path: str | os.PathLike, head_prefix: str, artifact: str, command: str, trust: bool = False
) -> tuple[dict, dict | None]:
    """State dict and saved config of ``artifact`` (or a training checkpoint) of a ``command`` run.

    Read with ``weights_only`` (:func:`load_safely`) unless ``trust``. A file without
    ``head_prefix`` keys is a backbone, not a trained task model: the message says to pass it as
    ``--backbone``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--weights {path}: file not found")
    state = load_file(path, map_location="cpu") if trust else load_safely(path, "--weights")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"--weights {path}: not a trained model (expected {artifact} or checkpoint-last.pth of a {command} run)")
    if not any(k.startswith(head_prefix) for k in state["model"]):
        raise CheckpointError(
            f"--weights {path} holds no {head_prefix}* weights: it looks like a backbone; pass it as --backbone to train a model"
        )
    return state["model"], state.get("config")


def load_trained_model(
    model: torch.nn.Module, state: Mapping[str, Any], path: str | os.PathLike, explain: Any = None
) -> None:
    """``load_state_dict`` of a whole trained model, with one message naming what does not fit: the
    tensors of other shapes, those with no place in the model and the missing ones. ``explain(state,
    target, shape_mismatches)`` may add a sentence (e.g. about the class count)."""
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
        parts.append(f"{len(shapes)} differ in shape (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)})")
    if unexpected:
        parts.append(f"{len(unexpected)} have no place in the model (e.g. {', '.join(unexpected[:3])})")
    if missing:
        parts.append(f"{len(missing)} model tensors are missing (e.g. {', '.join(missing[:3])})")
    hint = explain(state, target, shapes) if explain is not None else ""
    raise CheckpointError(
        f"--weights {path} does not fit this model: {'; '.join(parts)}.{(' ' + hint) if hint else ''} "
        "Use the --preset / model.* settings it was trained with"
    )
