"""Hugging Face ``ViTMAEModel`` / ``ViTMAEForPreTraining`` / ``ViTModel`` names -> ours."""

from __future__ import annotations

import re

import torch

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


def _split_param(name: str) -> tuple[str, str]:
    mod, _, param = name.rpartition(".")
    return mod, param


def hf_to_vit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    # (our block prefix, "weight"/"bias") -> {"q"/"k"/"v": (original name, tensor)}
    pending: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, v in sd.items():
        name = key[len("vit.") :] if key.startswith("vit.") else key
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
        elif key.startswith("decoder.") and _split_param(key[len("decoder.") :])[0] in _HF_DECODER_MODULES:
            out[key[len("decoder.") :]] = v
            continue
        elif key.startswith("classifier."):  # ViTForImageClassification
            out["head." + key[len("classifier.") :]] = v
            continue
        out[key] = v  # not mapped: keeps its name and is reported unexpected
    for (block, param), parts in pending.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"{block}.attn.qkv.{param}"] = torch.cat([parts[c][1] for c in ("q", "k", "v")], dim=0)
        else:  # an incomplete triple cannot be fused: keep the pieces under their own names
            for orig, t in parts.values():
                out[orig] = t
    return out


# ---------------------------------------------------------------------------------------- writing
_TO_HF_TOP = {ours: hf for hf, ours in _HF_TOP.items()}
_TO_HF_LAYER = {
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
}


def vit_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our plain ViT encoder -> Hugging Face ``ViTMAEModel`` names as the Hub stores them (the fused
    qkv split into query, key, value); the inverse of :func:`hf_to_vit` for the encoder."""
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        if key in _TO_HF_TOP:
            out[_TO_HF_TOP[key]] = v
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            raise ValueError(f"{key} has no place in a Hugging Face ViTMAEModel")
        idx, mod, param = m.groups()
        prefix = f"encoder.layer.{idx}"
        if mod == "attn.qkv":
            for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{prefix}.attention.attention.{name}.{param}"] = part.contiguous()
        elif mod in _TO_HF_LAYER:
            out[f"{prefix}.{_TO_HF_LAYER[mod]}.{param}"] = v
        else:
            raise ValueError(f"{key} has no place in a Hugging Face ViTMAEModel")
    return out
