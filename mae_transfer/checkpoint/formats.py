"""Which format a checkpoint is in, and its tensors in this toolkit's ViT names.

Ours are the official MAE / timm names; :func:`to_vit_state_dict` converts Hugging Face
(:mod:`.hf`), mmsegmentation / mmpretrain (:mod:`.mmseg`) and detectron2 ViTDet (:mod:`.detectron2`)
backbones and the released baselines of the MAE paper's comparisons as they are published (MoCo v3,
BEiT, DeiT, DINO, DINOv2), and :func:`infer_vit_config` reads the architecture off the shapes.
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
    "mocov3",
    "beit",
    "deit",
    "dino",
    "dinov2",
    "unknown",
)

# Containers that wrap a state dict, tried in this order: official MAE / timm / our trainer use
# "model", mmcv / Lightning use "state_dict", DeepSpeed uses "module".
_CONTAINER_KEYS = ("model", "state_dict", "module")
# Prefixes that wrappers add to every key: DDP / DataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A DINO / iBOT training checkpoint holds "student" and "teacher"; DINO's evaluation reads the teacher.
_SSL_TEACHER_KEY = "teacher"

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
        if inner is None and not _looks_like_state_dict(state):
            v = state.get(_SSL_TEACHER_KEY)
            if isinstance(v, Mapping) and _looks_like_state_dict(v):
                inner = v
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


# ---------------------------------------------------------------------------- released baselines
# MoCo v3 (github.com/facebookresearch/moco-v3): {"state_dict": MoCo_ViT under DDP}, the ViT in
# module.base_encoder (its head replaced by the projection MLP), module.momentum_encoder (a copy) and
# module.predictor. Its main_lincls.py keeps base_encoder without its head: so do we.
_MOCO_ENCODER = "base_encoder."
# BEiT's pretraining checkpoints share one relative position table across the blocks.
_BEIT_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_LAYER_SCALE = re.compile(r"\.ls([12])\.gamma$")  # timm / DINOv2 names of layer scale
_DINOV2_CHUNK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # DINOv2's block_chunks: blocks.<chunk>.<block>.


def _moco_prefix(keys: Any) -> str | None:
    """The prefix up to ``base_encoder.`` of a MoCo v3 ViT checkpoint's keys, or None."""
    for k in keys:
        if k.endswith(_MOCO_ENCODER + "patch_embed.proj.weight"):
            return k[: -len("patch_embed.proj.weight")]
    return None


def _is_dino_training(keys: list[str]) -> bool:
    """A DINO teacher (or student): the ViT under ``backbone.``, DINO's head (``head.last_layer``)."""
    return any(k.startswith("backbone.") and k.endswith("patch_embed.proj.weight") for k in keys) and any(
        k.startswith("head.last_layer") for k in keys
    )


def _is_beit(keys: list[str]) -> bool:
    """BEiT's names: separate ``q_bias`` / ``v_bias``, a shared table, or per-block tables without ``pos_embed``."""
    if any(k == _BEIT_SHARED_TABLE or k.endswith("." + _BEIT_SHARED_TABLE) for k in keys):
        return True
    if any(k.endswith(".attn.q_bias") for k in keys):
        return True
    tables = any(k.endswith(".attn.relative_position_bias_table") for k in keys)
    return tables and not any(k == "pos_embed" or k.endswith(".pos_embed") for k in keys)


def _is_dinov2(sd: Mapping[str, Any], keys: list[str]) -> bool:
    """DINOv2's layer scale (``ls1.gamma``) with its ``mask_token``, registers or 14-pixel patches."""
    if not any(_LAYER_SCALE.search(k) for k in keys):
        return False
    if any(k.split(".")[-1] in ("mask_token", "register_tokens", "reg_token") for k in keys):
        return True
    return any(
        k.endswith("patch_embed.proj.weight") and getattr(sd[k], "dim", lambda: 0)() == 4 and sd[k].shape[-1] == 14
        for k in keys
    )


def _learned_class_row(sd: Mapping[str, Any]) -> bool:
    """Whether ``pos_embed`` has a class row that was learned (not the zero row of MAE's and MoCo v3's
    fixed sin-cos tables). False for tensors without values (the meta device)."""
    pos = sd.get("pos_embed")
    if not isinstance(pos, torch.Tensor) or pos.is_meta or pos.dim() != 3 or "cls_token" not in sd:
        return False
    found = _grid_from_tokens(int(pos.shape[1]), 1)
    return bool(found and found[0] == 1 and pos[0, 0].float().abs().max() > 0)


def _classify(sd: Mapping[str, Any]) -> str:
    """Format of a bare (unwrapped, prefix-stripped) state dict, from its key names only."""
    keys = list(sd)
    if not keys:
        return "unknown"
    if any(k.startswith("backbone.net.") for k in keys):
        return "detectron2_vitdet"
    if any(k.startswith(("backbone.layers.", "backbone.patch_embed.projection.")) for k in keys):
        return "mmseg"
    if _moco_prefix(keys) is not None:
        return "mocov3"
    if _is_dino_training(keys):
        return "dino"
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
        if _is_beit(keys):
            return "beit"
        if _is_dinov2(sd, keys):
            return "dinov2"
        if any(k == "dist_token" or k.endswith(".dist_token") for k in keys):
            return "deit"
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
    - ``"mocov3"``: a MoCo v3 checkpoint (``base_encoder.``, with ``momentum_encoder.`` and
      ``predictor.``; usually ``{"state_dict": ...}`` under DDP's ``module.``);
    - ``"beit"``: BEiT's names (timm's ``beit_*`` and the official release): ``attn.q_bias`` /
      ``attn.v_bias``, per-block (or a shared ``rel_pos_bias.``) ``relative_position_bias_table``
      and no ``pos_embed``;
    - ``"dinov2"``: layer scale as ``ls1.gamma`` / ``ls2.gamma`` with DINOv2's ``mask_token`` or
      register tokens (``register_tokens``, timm's ``reg_token``) or 14-pixel patches (timm's
      ``vit_*_patch14_dinov2`` and the official release, also with ``block_chunks``);
    - ``"deit"``: DeiT's distilled ViT (``dist_token``, ``head_dist``). A plain DeiT or any other
      supervised timm ViT has exactly timm's names and is ``timm_vit``;
    - ``"dino"``: a DINO training checkpoint (its ``teacher``: ``backbone.`` and DINO's head
      ``head.last_layer``), or a bare state dict (no container, as DINO's releases and timm's
      ``vit_*.dino`` files are) of a headless encoder whose ``pos_embed`` class row was learned.
      An MAE or MoCo v3 encoder has the zero class row of a fixed sin-cos table, and MAE releases
      come in ``{"model": ...}``; a headless supervised encoder saved bare would read as ``dino``
      too (the tensors are converted identically, only the name differs). Meta tensors: ``mae_encoder``;
    - ``"unknown"``: anything else (optimizer-only files, detection heads, other models).
    """
    sd, ours = _unwrap(state)
    if ours:
        return "ours"
    fmt = _classify_any(sd)
    if fmt == "mae_encoder" and _is_bare(state) and _learned_class_row(_strip_generic_prefix(dict(sd))):
        return "dino"
    return fmt


def _is_bare(state: Any) -> bool:
    """Whether ``state`` is itself the tensor dict (no ``{"model": ...}``-style container)."""
    return isinstance(state, Mapping) and _looks_like_state_dict(state)


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


def _rename_layer_scale(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm / DINOv2 ``blocks.N.ls1.gamma`` / ``ls2.gamma`` -> our (BEiT's) ``gamma_1`` / ``gamma_2``."""
    if not any(_LAYER_SCALE.search(k) for k in sd):
        return sd
    return {_LAYER_SCALE.sub(r".gamma_\1", k): v for k, v in sd.items()}


def _mocov3_to_vit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base encoder without its projection head (MoCo v3's main_lincls.py); the momentum
    encoder, the predictor and the projection head are left out."""
    prefix = _moco_prefix(sd) or _MOCO_ENCODER
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and not k.startswith(prefix + "head.")}


def _dino_to_vit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DINO training checkpoint's ViT (``backbone.``, DINO's eval code); its head is left out.
    A released (bare) file has our names already."""
    if _is_dino_training(list(sd)):
        return {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return _strip_generic_prefix(dict(sd))


def _beit_to_vit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's / the official BEiT names are ours but for: a shared table (pretraining checkpoints),
    copied into every block as BEiT's fine-tuning code does; the ``relative_position_index``
    buffers (rebuilt by our attention) and the pretraining ``mask_token``, left out. ``q_bias`` /
    ``v_bias`` are merged into ``qkv.bias`` for every format (:func:`_merge_split_qkv_bias`)."""
    out = _strip_generic_prefix(dict(sd))
    shared = out.pop(_BEIT_SHARED_TABLE, None)
    out.pop("rel_pos_bias.relative_position_index", None)
    out.pop("mask_token", None)
    for k in [k for k in out if k.endswith(".attn.relative_position_index")]:
        del out[k]
    if shared is not None:
        for i in _block_indices(out, "blocks"):
            out.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared.clone())
    return out


def _deit_to_vit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeiT's distillation token becomes one register token: tokens [class, dist, patches] with
    position rows for the class and dist tokens are [class, register, patches] with the dist row
    added to the token (a prefix row is never interpolated, so this holds at every input size).
    ``head_dist`` stays as it is (no place in our ViT: reported unexpected)."""
    out = _strip_generic_prefix(dict(sd))
    dist, pos = out.get("dist_token"), out.get("pos_embed")
    if dist is None or pos is None or pos.dim() != 3 or "cls_token" not in out:
        return out
    side = math.isqrt(max(int(pos.shape[1]) - 2, 0))
    if side * side != int(pos.shape[1]) - 2:
        return out
    del out["dist_token"]
    out["reg_token"] = dist + pos[:, 1:2]
    out["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    return out


def _dinov2_to_vit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 (official and timm): ``block_chunks`` flattened, ``register_tokens`` -> ``reg_token``,
    ``mask_token`` (pretraining only) left out; ``ls1.gamma`` renamed for every format
    (:func:`_rename_layer_scale`). The official register models add the class row of ``pos_embed``
    to the class token as ours do; timm's files hold it in ``cls_token`` and have no class row (a
    zero row is added when loading)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in _strip_generic_prefix(dict(sd)).items():
        if k == "mask_token":
            continue
        k = "reg_token" if k == "register_tokens" else _DINOV2_CHUNK.sub(r"blocks.\1.", k)
        out[k] = v
    return out


def to_vit_state_dict(state: Any, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a checkpoint in any supported format to this toolkit's parameter names.

    ``state`` is what ``torch.load`` returned (containers are unwrapped) or a bare state dict;
    ``fmt`` forces a format (one of :data:`FORMATS`) instead of :func:`detect_format`. Keys that
    have no counterpart keep their original names, so loading reports them as unexpected.
    Hugging Face q/k/v projections are fused into ``attn.qkv`` in q, k, v order; BEiT-style
    separate q/v biases become ``attn.qkv.bias`` with a zero key bias; timm's layer scale
    ``ls1.gamma`` / ``ls2.gamma`` becomes ``gamma_1`` / ``gamma_2``. The released baselines:
    MoCo v3's base encoder and DINO's teacher without their projection heads, BEiT's shared table
    in every block, DeiT's distillation token as a register token, DINOv2's registers as
    ``reg_token`` (see the ``_*_to_vit`` functions).
    """
    sd, ours = _unwrap(state)
    if fmt is None or fmt == "ours":
        fmt = _classify_any(sd)
    elif fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt in ("mae_full", "mae_encoder", "timm_vit"):
        out = _strip_generic_prefix(sd)
    elif fmt == "mocov3":
        out = _mocov3_to_vit(sd)
    elif fmt == "dino":
        out = _dino_to_vit(sd)
    elif fmt == "beit":
        out = _beit_to_vit(sd)
    elif fmt == "deit":
        out = _deit_to_vit(sd)
    elif fmt == "dinov2":
        out = _dinov2_to_vit(sd)
    elif fmt in ("hf_vitmae_model", "hf_vitmae_pretraining"):
        out = hf_to_vit(sd)
    elif fmt == "detectron2_vitdet":
        out = vitdet_backbone_to_vit(sd)
    elif fmt == "mmseg":
        out = mmseg_backbone_to_vit(sd)
    else:
        out = dict(sd)
    return _rename_layer_scale(_merge_split_qkv_bias(out))


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
    Unknown values are None. Also what a released baseline's ViT needs beyond its size:
    ``abs_pos_embed`` (False: no ``pos_embed``, BEiT), ``rel_pos_type`` (``"decomposed"``,
    ``"table"`` or None; a table also gives ``num_heads`` and, without ``pos_embed``, the grid and
    image size), ``layer_scale`` (per-block gammas) and ``reg_tokens`` (register tokens, 0 without).
    MoCo v3's ViT-S has 12 heads (``vit_small_patch16_h12``).
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
            "rel_pos_type",
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
    cfg["abs_pos_embed"] = "pos_embed" in sd
    cfg["layer_scale"] = bool(blocks) and f"blocks.{blocks[0]}.gamma_1" in sd
    reg = sd.get("reg_token")
    cfg["reg_tokens"] = int(reg.shape[1]) if reg is not None and reg.dim() == 3 else 0
    if cfg["use_rel_pos"]:
        cfg["rel_pos_type"] = "decomposed"
    table = sd.get(f"blocks.{blocks[0]}.attn.relative_position_bias_table") if blocks else None
    if table is not None and table.dim() == 2:
        cfg["rel_pos_type"] = "table"
        cfg["num_heads"] = int(table.shape[1])
        grid = table_grid(int(table.shape[0]))
        if grid is not None and "pos_embed" not in sd:
            cfg["grid_size"] = grid
            if isinstance(cfg["patch_size"], int):
                cfg["img_size"] = grid[0] * cfg["patch_size"]
    if fmt == "mocov3" and cfg["embed_dim"] == 384 and cfg["num_heads"] is None:
        cfg["num_heads"] = 12  # MoCo v3's vit_small (vits.py): 12 heads of 32 channels
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
    cfg["name"] = _standard_name(cfg["embed_dim"], cfg["depth"], cfg["patch_size"], cfg["num_heads"])
    return cfg


def table_grid(rows: int) -> tuple[int, int] | None:
    """The square token grid a BEiT table of ``rows`` = (2W - 1)^2 + 3 rows is made for, or None."""
    m = rows - 3
    side = (math.isqrt(max(m, 0)) + 1) // 2
    return (side, side) if side > 0 and (2 * side - 1) ** 2 == m else None


def _standard_name(
    embed_dim: int | None, depth: int | None, patch_size: Any, num_heads: int | None = None
) -> str | None:
    from mae_transfer.models.vit import VIT_SIZES

    hits = [n for n, s in VIT_SIZES.items() if s.embed_dim == embed_dim and s.depth == depth]
    if num_heads:  # known (relative position tables, MoCo v3): sizes with these heads first
        hits = sorted(hits, key=lambda n: VIT_SIZES[n].num_heads != num_heads)
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
