"""mmsegmentation MAE / BEiT + UperNet segmentors: read, describe, write.

The toolkit's segmenter (``mae_transfer.segmentation.model.UperNetViT``) uses mmsegmentation's names
for the neck and both heads (``neck.upsample_4x``, ``decode_head.psp_modules``, ``auxiliary_head``),
and the official MAE / timm names for the ViT. This module maps the ViT's names both ways
(``layers.N.ln1`` <-> ``blocks.N.norm1``, ``ffn.layers.0.0`` <-> ``mlp.fc1``, ...), checks every
tensor, infers the architecture from the shapes and writes our segmenters in the layout
mmsegmentation's ``CheckpointHook`` writes (``{"meta", "state_dict"}``), so its ``load_checkpoint``
and ``mmseg.apis.init_model`` take them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mae_transfer.checkpoint.checks import VIT_BLOCK_PARAMS, check_dtypes, require, required_names
from mae_transfer.checkpoint.io import CheckpointError, atomic_save, check_read_back, load_safely

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


def _convert_mm_layer(rest: str) -> str | None:
    if rest in _MM_PARAM:
        return _MM_PARAM[rest]
    mod, _, param = rest.rpartition(".")
    if mod in _MM_LAYER:
        return f"{_MM_LAYER[mod]}.{param}"
    return None


def _backbone_to_ours(name: str) -> str | None:
    """One name of an mmseg / mmpretrain ViT (without ``backbone.``) in ours, or None."""
    if name in ("cls_token", "pos_embed"):
        return name
    if name.startswith("patch_embed.projection."):
        return "patch_embed.proj." + name[len("patch_embed.projection.") :]
    if name.startswith("ln1."):  # mm's final norm
        return "norm." + name[len("ln1.") :]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    ours = _convert_mm_layer(m.group(2)) if m else None
    return f"blocks.{m.group(1)}.{ours}" if ours else None


def mmseg_backbone_to_vit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ViT of an mmsegmentation / mmpretrain checkpoint (``backbone.layers.N...``, mmpretrain's
    ``neck.decoder_*`` MAE decoder) in our names; other keys keep theirs (unexpected in a ViT)."""
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        new = None
        if key.startswith("backbone."):
            new = _backbone_to_ours(key[len("backbone.") :])
        elif key.startswith("neck."):  # mmpretrain MAEPretrainDecoder
            name = key[len("neck.") :]
            m = re.match(r"^decoder_blocks\.(\d+)\.(.+)$", name)
            if m:
                rest = _convert_mm_layer(m.group(2))
                new = f"decoder_blocks.{m.group(1)}.{rest}" if rest else None
            elif name in ("mask_token", "decoder_pos_embed"):
                new = name
            elif name.startswith(("decoder_embed.", "decoder_pred.")):
                new = name
            elif name.startswith("ln1."):  # the decoder norm (build_norm_layer postfix 1)
                new = "decoder_norm." + name[len("ln1.") :]
        out[new or key] = v
    return out


_HEADS = (
    re.compile(r"neck\.(upsample_4x\.[013]|upsample_2x\.0)\.(weight|bias)"),
    re.compile(r"neck\.upsample_4x\.1\.(weight|bias|running_mean|running_var|num_batches_tracked)"),
    re.compile(r"(decode_head|auxiliary_head)\.conv_seg\.(weight|bias)"),
    re.compile(
        r"decode_head\.(psp_modules\.\d+\.1|bottleneck|lateral_convs\.\d+|fpn_convs\.\d+|fpn_bottleneck)"
        r"\.(conv\.weight|bn\.(weight|bias|running_mean|running_var|num_batches_tracked))"
    ),
    re.compile(
        r"auxiliary_head\.convs\.\d+\.(conv\.weight|bn\.(weight|bias|running_mean|running_var|num_batches_tracked))"
    ),
)


_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_CONV_BN = ("conv.weight", *(f"bn.{p}" for p in _BN))
# The names every MAE/BEiT-UperNet segmenter has (in this toolkit's names): the ViT's embeddings,
# the neck (x4: deconv, BN, GELU, deconv; x2: deconv), UperNet's four pooling branches, bottleneck,
# three lateral and fpn convs (conv + BN each), fpn bottleneck and classifier.
_SEGMENTER_FIXED = (
    "backbone.cls_token",
    "backbone.pos_embed",
    "backbone.patch_embed.proj.weight",
    "backbone.patch_embed.proj.bias",
    *(f"neck.{m}.{p}" for m in ("upsample_4x.0", "upsample_4x.3", "upsample_2x.0") for p in ("weight", "bias")),
    *(f"neck.upsample_4x.1.{p}" for p in _BN),
    *(
        f"decode_head.{m}.{p}"
        for m in (
            *(f"psp_modules.{i}.1" for i in range(4)),
            "bottleneck",
            *(f"lateral_convs.{i}" for i in range(3)),
            *(f"fpn_convs.{i}" for i in range(3)),
            "fpn_bottleneck",
        )
        for p in _CONV_BN
    ),
    "decode_head.conv_seg.weight",
    "decode_head.conv_seg.bias",
)


def required_keys(sd: Mapping[str, Any]) -> list[str]:
    """Every name (in this toolkit's names) the segmenter described by ``sd`` needs:
    :data:`_SEGMENTER_FIXED`, every ViT block 0..N-1 with what any block has (relative position
    tables, layer scales), and the auxiliary head when it has one (classifier and ``convs.0..``)."""
    aux = any(k.startswith("auxiliary_head.") for k in sd)
    return required_names(
        sd,
        (*_SEGMENTER_FIXED, *(("auxiliary_head.conv_seg.weight", "auxiliary_head.conv_seg.bias") if aux else ())),
        ((r"backbone\.blocks\.", 0, VIT_BLOCK_PARAMS), *(((r"auxiliary_head\.convs\.", 0, _CONV_BN),) if aux else ())),
    )


def _mmseg_name(name: str) -> str:
    """One of our segmenter's names in mmsegmentation's (for messages about mmseg files)."""
    if name.startswith("backbone."):
        return "backbone." + (_backbone_to_mmseg(name[len("backbone.") :]) or name[len("backbone.") :])
    return name


def is_mmseg_segmentor(sd: Mapping[str, Any]) -> bool:
    """Whether the keys are those of a whole mmsegmentation ViT segmentor (backbone + decode head)."""
    return any(k.startswith("backbone.layers.") for k in sd) and any(k.startswith("decode_head.") for k in sd)


# Our per-block names -> mmseg's (the inverse of the tables above, without mmcv's MultiheadAttention).
_TO_MM_PARAM = {v: k for k, v in _MM_PARAM.items() if not k.startswith("attn.attn.")}
_TO_MM_LAYER = {v: k for k, v in _MM_LAYER.items() if not k.startswith("attn.attn.")}


def _backbone_to_mmseg(name: str) -> str | None:
    if name in ("cls_token", "pos_embed"):
        return name
    if name.startswith("patch_embed.proj."):
        return "patch_embed.projection." + name[len("patch_embed.proj.") :]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if not m:
        return None
    block, rest = m.group(1), m.group(2)
    if rest in _TO_MM_PARAM:
        return f"layers.{block}.{_TO_MM_PARAM[rest]}"
    mod, _, param = rest.rpartition(".")
    if mod in _TO_MM_LAYER and param in ("weight", "bias"):
        return f"layers.{block}.{_TO_MM_LAYER[mod]}.{param}"
    return None


def _grid(pos_embed: torch.Tensor) -> tuple[int, int]:
    rows = int(pos_embed.shape[1]) - 1
    side = math.isqrt(rows)
    if side * side != rows:
        raise CheckpointError(f"backbone.pos_embed has {rows + 1} rows: not a class row plus a square grid")
    return side, side


def to_segmenter_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmsegmentation segmentor state dict in this toolkit's names.

    ``relative_position_index`` buffers are checked against the index the table form computes (an
    mmseg file with another index layout would be misread) and dropped; BEiT's separate ``q_bias`` /
    ``v_bias`` become one ``qkv.bias`` (zero key bias). Raises :class:`CheckpointError` naming every
    tensor that has no place in the segmenter, and every one it needs that is missing (in mmseg's
    names, :func:`required_keys`).
    """
    from mae_transfer.models.vit import relative_position_index

    out: dict[str, torch.Tensor] = {}
    unmapped = []
    grid = _grid(sd["backbone.pos_embed"]) if "backbone.pos_embed" in sd else None
    for key, value in sd.items():
        if key.startswith("backbone."):
            name = key[len("backbone.") :]
            if re.fullmatch(r"layers\.\d+\.attn\.relative_position_index", name):
                # (without pos_embed there is no grid to check against: the segmenter is incomplete, said below)
                if grid is not None and not torch.equal(value.long(), relative_position_index(grid, grid, 1)):
                    raise CheckpointError(f"{key} is not BEiT's relative position index for a {grid} token grid")
                continue
            ours = _backbone_to_ours(name)
            if ours is None:
                unmapped.append(key)
                continue
            out["backbone." + ours] = value
        elif any(p.fullmatch(key) for p in _HEADS):
            out[key] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(
            f"{len(unmapped)} tensors have no place in the MAE-UperNet segmenter: {', '.join(unmapped[:6])}"
            + (f" and {len(unmapped) - 6} more" if len(unmapped) > 6 else "")
        )
    for qk in [k for k in out if k.endswith(".attn.q_bias") and k[: -len("q_bias")] + "v_bias" in out]:
        base = qk[: -len("q_bias")]
        q, v = out.pop(qk), out.pop(base + "v_bias")
        out[base + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    require(out, required_keys(out), "not a complete MAE-UperNet segmentor", shown=_mmseg_name)
    return out


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def describe_segmentor(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture of a segmenter state dict in this toolkit's names (see
    :func:`to_segmenter_state_dict`): the ViT's ``embed_dim``, ``depth``, ``num_heads`` (from the
    bias tables; without them ``embed_dim / 64``), ``patch_size``, ``mlp_ratio``, ``img_size`` (the
    position grid x patch), ``use_rel_pos``, ``rel_pos_type``, ``layer_scale`` (1.0 when the blocks
    have gammas, the values themselves are loaded); the heads' ``channels``, ``aux_channels``,
    ``aux_convs`` and ``num_classes``."""
    require(sd, required_keys(sd), "not a complete MAE-UperNet segmentor")
    pw = sd["backbone.patch_embed.proj.weight"]
    embed, patch = int(pw.shape[0]), int(pw.shape[-1])
    depth = _count(sd, r"backbone\.blocks\.(\d+)\.")
    out: dict[str, Any] = {"embed_dim": embed, "patch_size": patch, "depth": depth}
    out["mlp_ratio"] = sd["backbone.blocks.0.mlp.fc1.weight"].shape[0] / embed
    table = sd.get("backbone.blocks.0.attn.relative_position_bias_table")
    decomposed = sd.get("backbone.blocks.0.attn.rel_pos_h")
    if table is not None:
        out.update(use_rel_pos=True, rel_pos_type="table", num_heads=int(table.shape[1]))
    elif decomposed is not None:
        out.update(use_rel_pos=True, rel_pos_type="decomposed", num_heads=embed // int(decomposed.shape[1]))
    else:
        out.update(use_rel_pos=False, num_heads=max(1, embed // 64))
    out["layer_scale"] = 1.0 if "backbone.blocks.0.gamma_1" in sd else None
    out["img_size"] = _grid(sd["backbone.pos_embed"])[0] * patch
    out["channels"] = int(sd["decode_head.conv_seg.weight"].shape[1])
    out["num_classes"] = int(sd["decode_head.conv_seg.weight"].shape[0])
    aux = sd.get("auxiliary_head.conv_seg.weight")
    out["aux_channels"] = int(aux.shape[1]) if aux is not None else 0
    out["aux_convs"] = _count(sd, r"auxiliary_head\.convs\.(\d+)\.") if aux is not None else 1
    pools = _count(sd, r"decode_head\.psp_modules\.(\d+)\.")
    if pools != 4:
        raise CheckpointError(
            f"the UperNet head has {pools} pooling branches; the segmenter builds the usual 4 (1, 2, 3, 6)"
        )
    return out


def read_mmseg(path: str | os.PathLike, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict (in mmsegmentation's names) and ``meta`` of an mmsegmentation checkpoint
    (``{"meta", "state_dict"}`` or a bare state dict); ``weights_only`` unless ``trust``; weights that
    are not floating point are refused."""
    path = Path(path)
    obj = torch.load(path, map_location="cpu", weights_only=False) if trust else load_safely(path, "--weights")
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not is_mmseg_segmentor(sd):
        raise CheckpointError(
            f"{path} is not an mmsegmentation ViT segmentor (no backbone.layers.* and decode_head.* weights)"
        )
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    check_dtypes(sd, str(path))
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, dict(meta)


def to_mmseg_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our segmenter's state dict in mmsegmentation's names and order (with the
    ``relative_position_index`` buffers it stores). Raises :class:`CheckpointError` for tensors
    mmsegmentation's MAE + UperNet has no place for."""
    from mae_transfer.models.vit import relative_position_index

    out: dict[str, torch.Tensor] = {}
    grid = _grid(sd["backbone.pos_embed"])
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))})
    # mmsegmentation's order: embeddings, then per layer gammas, ln1, attention (table, index,
    # qkv, proj), ln2, ffn; then the neck and heads in the order both models register them.
    order = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    per_block = [
        "gamma_1",
        "gamma_2",
        "norm1.weight",
        "norm1.bias",
        "attn.relative_position_bias_table",
        "attn.q_bias",
        "attn.v_bias",
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
    ]
    for name in order + [f"blocks.{b}.{p}" for b in blocks for p in per_block]:
        key = "backbone." + name
        if key not in sd:
            continue
        out["backbone." + _backbone_to_mmseg(name)] = sd[key]
        if name.endswith("attn.relative_position_bias_table"):
            block = name.split(".")[1]
            out[f"backbone.layers.{block}.attn.relative_position_index"] = relative_position_index(grid, grid, 1)
    rest = [k for k in sd if not k.startswith("backbone.")]
    left = [k for k in sd if k.startswith("backbone.") and "backbone." + (_backbone_to_mmseg(k[9:]) or "?") not in out]
    bad = left + [k for k in rest if not any(p.fullmatch(k) for p in _HEADS)]
    if bad:
        raise CheckpointError(
            f"cannot write an mmsegmentation MAE-UperNet checkpoint: {len(bad)} tensors have no place in it, "
            f"e.g. {', '.join(bad[:5])}"
        )
    out.update({k: sd[k] for k in rest})
    return out


def save_mmseg(
    sd: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Write our segmenter as mmsegmentation's ``{"meta", "state_dict"}`` (atomically), with the class
    names and palette in ``meta["dataset_meta"]``; read it back with ``weights_only=True`` and check
    every tensor. A segmenter that is not complete (:func:`required_keys`) is refused before anything
    is written; the file read back must hold the complete set."""
    required = [_mmseg_name(k) for k in required_keys(sd)]
    require(sd, required_keys(sd), f"cannot write {path}: not a complete MAE-UperNet segmentor", shown=_mmseg_name)
    state = {k: v.detach().cpu().contiguous() for k, v in to_mmseg_state_dict(sd).items()}
    meta: dict[str, Any] = {"exported_by": "mae-transfer"}
    if class_names is not None:
        meta["dataset_meta"] = {
            "classes": list(class_names),
            **({"palette": [list(map(int, c)) for c in palette]} if palette is not None else {}),
        }
    path = atomic_save({"meta": meta, "state_dict": state}, path)
    back = load_safely(path, "exported file")["state_dict"]
    require(back, required, f"{path}: the file read back is not a complete MAE-UperNet segmentor")
    check_read_back(state, back, path)
    return path


__all__ = [
    "describe_segmentor",
    "is_mmseg_segmentor",
    "mmseg_backbone_to_vit",
    "read_mmseg",
    "required_keys",
    "save_mmseg",
    "to_mmseg_state_dict",
    "to_segmenter_state_dict",
]
