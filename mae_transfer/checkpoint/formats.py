"""Which format a checkpoint is in, and its tensors in this toolkit's ViT names.

Ours are the official MAE / timm names; :func:`to_vit_state_dict` converts Hugging Face
(:mod:`.hf`), mmsegmentation / mmpretrain (:mod:`.mmseg`) and detectron2 ViTDet (:mod:`.detectron2`)
backbones, and :func:`infer_vit_config` reads the architecture off the shapes.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from mae_transfer.checkpoint.detectron2 import vitdet_backbone_to_vit
from mae_transfer.checkpoint.hf import hf_to_vit
from mae_transfer.checkpoint.mmseg import mmseg_backbone_to_vit

try:  # detectron2 model-zoo pickles hold numpy arrays
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

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
                sd = {k[len(p) :]: v for k, v in sd.items()}
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
            return {(n[len(prefix) :] if n.startswith(prefix) else n): v for n, v in sd.items()}
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
    hf_dec = any(
        k.startswith(("decoder.decoder_layers.", "decoder.decoder_pred.", "decoder.decoder_embed.")) for k in keys
    )
    if hf_enc or hf_dec:
        return "hf_vitmae_pretraining" if hf_dec else "hf_vitmae_model"
    timm_like = any(k.endswith("patch_embed.proj.weight") for k in keys) or any(
        re.match(r"^blocks\.\d+\.", k) for k in keys
    )
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
        out = hf_to_vit(sd)
    elif fmt == "detectron2_vitdet":
        out = vitdet_backbone_to_vit(sd)
    elif fmt == "mmseg":
        out = mmseg_backbone_to_vit(sd)
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
            "embed_dim",
            "depth",
            "num_heads",
            "mlp_ratio",
            "patch_size",
            "in_chans",
            "grid_size",
            "img_size",
            "has_cls_token",
            "pos_embed_has_cls_row",
            "num_classes",
            "global_pool",
            "use_rel_pos",
            "qkv_bias",
            "is_full_mae",
            "decoder_embed_dim",
            "decoder_depth",
            "decoder_num_heads",
            "name",
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
        cfg["decoder_embed_dim"] = (
            int(de.shape[0]) if de is not None else (int(sd["mask_token"].shape[-1]) if "mask_token" in sd else None)
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
    # A model names its own sizes: an MAE is "mae_" + its encoder's name (MAE_PRESETS).
    return getattr(model, "size_name_prefix", "") + name
