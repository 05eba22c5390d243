"""timm's format: a folder with ``model.safetensors`` (timm's ViT names, which are ours) and the
``config.json`` timm's hub loader reads (architecture, pretrained config, model arguments).

``timm.create_model("local-dir:FOLDER", pretrained=True)`` opens it, and so does
``timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=FOLDER/model.safetensors),
num_classes=0, **model_args)`` (README "Models and checkpoints"); a fine-tuned classifier is written
with its head, ``num_classes=N`` in ``config.json``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from mae_transfer.checkpoint.checks import VIT_BLOCK_PARAMS, first_names, require
from mae_transfer.checkpoint.formats import infer_vit_config, to_vit_state_dict
from mae_transfer.checkpoint.io import CheckpointError, save_model_folder

# The plain ViT encoder in timm's names (= ours, = the official MAE's).
_ENCODER_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|fc_norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)
# A fine-tuned classifier's head, which timm's ViT holds (a linear probe's BatchNorm + Linear it does not).
_LINEAR_HEAD = ("head.weight", "head.bias")
_TARGETS = {"timm": "timm's ViT", "hf": "Hugging Face's ViTMAEModel"}
# timm architectures of the standard sizes (their defaults are overridden by model_args anyway).
_ARCH = {
    (768, 12, 16): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
    (1280, 32, 14): "vit_huge_patch14_224",
}
# ImageNet statistics, what every MAE recipe normalises with.
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def encoder_state_dict(
    state: Mapping[str, Any], path: str | os.PathLike, target: str = "timm"
) -> dict[str, torch.Tensor]:
    """The plain ViT encoder of any checkpoint :func:`to_vit_state_dict` reads, in our (= timm's)
    names, with a classifier's linear head when ``target`` (``"timm"``, ``"hf"``) holds it; refuses
    what a plain ViT cannot hold (relative position tables, layer scales) and a classifier head the
    target has no place for, naming the ``--to`` that keeps it. An MAE decoder is left out (the
    encoder is what these formats hold)."""
    sd = to_vit_state_dict(dict(state))
    extra = sorted(k for k in sd if re.match(r"^blocks\.\d+\.(attn\.(rel_pos|relative_position)|gamma_)", k))
    if extra:
        raise CheckpointError(
            f"cannot write {path}: the ViT has parts a plain timm/Hugging Face ViT does not (e.g. {extra[0]}); "
            "export a pretraining encoder or a classification backbone instead"
        )
    heads = [k for k in sd if k.startswith("head.")]
    linear = all(k in _LINEAR_HEAD for k in heads)
    keep_head = linear and target == "timm"
    if heads and not keep_head:
        where = (
            "--to timm keeps them"
            if linear
            else "no --to format keeps them (a linear probe's BatchNorm + Linear head): "
            "evaluate the file with --eval-only --weights, or write the encoder alone with --to mae"
        )
        raise CheckpointError(
            f"cannot write {path}: {_TARGETS[target]} has no place for the classifier {first_names(heads)}, "
            f"which would be lost; {where}"
        )
    # (meta tensors stay where they are: the shapes of a model built on the meta device)
    enc = {
        k: (v.detach() if v.is_meta else v.detach().cpu().contiguous())
        for k, v in sd.items()
        if _ENCODER_KEY.match(k) or (keep_head and k in _LINEAR_HEAD)
    }
    if "patch_embed.proj.weight" not in enc or not any(k.startswith("blocks.") for k in enc):
        raise CheckpointError(f"nothing to export to {path}: no ViT encoder weights found")
    return enc


def _num_heads(info: dict, num_heads: int | None, path) -> int:
    if num_heads:
        return int(num_heads)
    from mae_transfer.models.vit import vit_size

    if info.get("name"):
        return vit_size(info["name"])["num_heads"]
    raise CheckpointError(
        f"cannot write {path}: the number of attention heads of a ViT of width {info['embed_dim']} "
        "is not in its weights; pass --num-heads"
    )


def timm_model_args(
    enc: dict[str, torch.Tensor], num_heads: int | None = None, path: Any = ""
) -> tuple[str, dict[str, Any]]:
    """The timm architecture and the ``model_args`` that build exactly this encoder."""
    info = infer_vit_config(enc)
    if not info.get("has_cls_token") or not info.get("pos_embed_has_cls_row"):
        raise CheckpointError(f"cannot write {path}: timm's MAE ViTs have a class token and a class row in pos_embed")
    avg = "fc_norm.weight" in enc and "norm.weight" not in enc
    args = {
        "img_size": int(info["img_size"]),
        "patch_size": int(info["patch_size"]),
        "embed_dim": int(info["embed_dim"]),
        "depth": int(info["depth"]),
        "num_heads": _num_heads(info, num_heads, path),
        "mlp_ratio": float(info["mlp_ratio"]),
        "global_pool": "avg" if avg else "token",
        "class_token": True,
        "qkv_bias": bool(info.get("qkv_bias", True)),
    }
    arch = _ARCH.get((args["embed_dim"], args["depth"], args["patch_size"]), "vit_base_patch16_224")
    return arch, args


def timm_keys(args: Mapping[str, Any], num_classes: int = 0) -> list[str]:
    """Every name in the state dict of timm's ``VisionTransformer`` built with ``model_args`` ``args``
    (:func:`timm_model_args`) and ``num_classes``: the complete set an export must hold."""
    block = [p for p in VIT_BLOCK_PARAMS if args["qkv_bias"] or p != "attn.qkv.bias"]
    norm = "fc_norm" if args["global_pool"] == "avg" else "norm"  # timm: fc_norm replaces norm when pooling the mean
    return [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        *(f"blocks.{i}.{p}" for i in range(args["depth"]) for p in block),
        f"{norm}.weight",
        f"{norm}.bias",
        *(_LINEAR_HEAD if num_classes else ()),
    ]


def complete_encoder(
    enc: Mapping[str, torch.Tensor], args: Mapping[str, Any], num_classes: int, path: Any
) -> list[str]:
    """The names timm's ViT of ``args`` needs (:func:`timm_keys`), after refusing an encoder that
    lacks some or holds tensors it has no place for (they would be lost)."""
    required = timm_keys(args, num_classes)
    lost = [k for k in enc if k not in required]
    if lost:
        raise CheckpointError(
            f"cannot write {path}: a ViT with global_pool={args['global_pool']!r} has no place for "
            f"{first_names(lost)}, which would be lost"
        )
    require(enc, required, f"cannot write {path}: not a complete ViT")
    return required


def export_timm(state: Mapping[str, Any], out_dir: str | os.PathLike, num_heads: int | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` + ``out_dir/config.json`` for timm (each atomically) and
    read them back (:func:`~mae_transfer.checkpoint.io.save_model_folder`), checking the complete set
    of timm's state dict (:func:`timm_keys`): the encoder, and a fine-tuned classifier's ``head`` (and
    ``fc_norm``) with ``num_classes`` in the config, so ``timm.create_model(ARCH, num_classes=N,
    global_pool=..., **model_args)`` loads it with ``strict=True``."""
    out = Path(out_dir)
    enc = encoder_state_dict(state, out, "timm")
    arch, args = timm_model_args(enc, num_heads, out)
    head = enc.get("head.weight", enc.get("head.bias"))
    num_classes = int(head.shape[0]) if head is not None else 0
    required = complete_encoder(enc, args, num_classes, out)
    size = args["img_size"]
    config = {
        "architecture": arch,
        "num_classes": num_classes,
        "num_features": args["embed_dim"],
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "tag": "mae_transfer",
            "custom_load": False,
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": list(_MEAN),
            "std": list(_STD),
            "num_classes": num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    return save_model_folder(out, enc, config, required)


__all__ = ["complete_encoder", "encoder_state_dict", "export_timm", "timm_keys", "timm_model_args"]
