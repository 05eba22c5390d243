"""The official MAE release format: ``{"model": encoder state dict}`` with the official names."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from mae_transfer.checkpoint.checks import compact as _compact
from mae_transfer.checkpoint.formats import _strip_wrapper_prefixes, to_vit_state_dict
from mae_transfer.checkpoint.io import CheckpointError, atomic_save, check_read_back, load_safely

log = logging.getLogger(__name__)

# Names the official MAE encoder has (models_mae.py / models_vit.py); ``export_mae_encoder`` keeps
# exactly these so the official main_finetune.py sees only the keys it expects.
_OFFICIAL_ENCODER_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)


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
        raise CheckpointError(f"cannot export to {path} in the official MAE format: the encoder has no class token")
    dropped = [k for k in sd if k not in encoder]
    if dropped:
        log.info("export to %s leaves out %d non-encoder tensors: %s", path, len(dropped), ", ".join(_compact(dropped)))
    path = atomic_save({"model": encoder}, path)
    back = load_safely(path, "exported file")["model"]
    check_read_back(encoder, back, path)
    return path
