"""detectron2 ViTDet Mask R-CNN checkpoints: read, describe, write.

The toolkit's detector (``mae_transfer.detection.model.MaskRCNN`` with the simple feature pyramid)
uses detectron2's module and parameter names, so a ViTDet state dict needs no renaming: this
module reads both file forms, checks every name, infers the architecture from the shapes and
writes our detectors back in the layout ``DetectionCheckpointer`` writes.

Files:

* ``model_final.pth`` of a detectron2 run: ``torch.save({"model": state_dict, "iteration": N,
  ...})`` (optimizer and scheduler states may be there too; they are ignored). Read with
  ``torch.load(weights_only=True)``.
* model-zoo ``.pkl``: a plain pickle of ``{"model": {name: numpy array}, "__author__": ...}``.
  Reading a pickle can run code stored in it, so it needs ``trust=True`` (``--trust-checkpoint``).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from mae_transfer.checkpoint.checks import VIT_BLOCK_PARAMS, check_dtypes, require, required_names
from mae_transfer.checkpoint.io import CheckpointError, atomic_save, check_read_back, load_safely

log = logging.getLogger(__name__)

# Every name of a ViTDet Mask R-CNN with the simple feature pyramid, as patterns.
_PATTERNS = [
    re.compile(p)
    for p in (
        r"backbone\.net\.pos_embed",
        r"backbone\.net\.patch_embed\.proj\.(weight|bias)",
        r"backbone\.net\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
        r"backbone\.net\.blocks\.\d+\.attn\.rel_pos_[hw]",
        r"backbone\.simfp_[2-5]\.\d+\.(weight|bias)",
        r"backbone\.simfp_[2-5]\.\d+\.norm\.(weight|bias)",
        r"proposal_generator\.rpn_head\.conv(\.conv\d+)?\.(weight|bias)",
        r"proposal_generator\.rpn_head\.(objectness_logits|anchor_deltas)\.(weight|bias)",
        r"roi_heads\.box_head\.(conv\d+|fc\d+)\.(weight|bias)",
        r"roi_heads\.box_head\.conv\d+\.norm\.(weight|bias)",
        r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)",
        r"roi_heads\.mask_head\.(mask_fcn\d+|deconv|predictor)\.(weight|bias)",
        r"roi_heads\.mask_head\.mask_fcn\d+\.norm\.(weight|bias)",
    )
]
# Buffers older detectron2 files store; used for the input normalisation when present.
_PIXEL_STATS = ("pixel_mean", "pixel_std")


def _wb(*modules: str) -> list[str]:
    return [f"{m}.{p}" for m in modules for p in ("weight", "bias")]


# The names every ViTDet Mask R-CNN has, whatever its size: the ViT's embeddings, the simple feature
# pyramid with LayerNorm (ViTDet's SimpleFeaturePyramid: p2 = deconv, LN, GELU, deconv; p3 = deconv;
# p4 = identity; p5 = max pool; each then a 1x1 and a 3x3 conv with LN), the RPN's outputs, the box
# head's fc1 and predictor, the mask head's deconv and predictor.
_VITDET_FIXED = (
    "backbone.net.pos_embed",
    *_wb("backbone.net.patch_embed.proj"),
    *_wb(
        "backbone.simfp_2.0",
        "backbone.simfp_2.1",
        "backbone.simfp_2.3",
        "backbone.simfp_2.4.norm",
        "backbone.simfp_2.5.norm",
    ),
    "backbone.simfp_2.4.weight",
    "backbone.simfp_2.5.weight",
    *_wb("backbone.simfp_3.0", "backbone.simfp_3.1.norm", "backbone.simfp_3.2.norm"),
    "backbone.simfp_3.1.weight",
    "backbone.simfp_3.2.weight",
    *_wb("backbone.simfp_4.0.norm", "backbone.simfp_4.1.norm"),
    "backbone.simfp_4.0.weight",
    "backbone.simfp_4.1.weight",
    *_wb("backbone.simfp_5.1.norm", "backbone.simfp_5.2.norm"),
    "backbone.simfp_5.1.weight",
    "backbone.simfp_5.2.weight",
    *_wb("proposal_generator.rpn_head.objectness_logits", "proposal_generator.rpn_head.anchor_deltas"),
    *_wb("roi_heads.box_head.fc1", "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"),
    *_wb("roi_heads.mask_head.deconv", "roi_heads.mask_head.predictor"),
)


def required_keys(sd: Mapping[str, Any]) -> list[str]:
    """Every name the ViTDet Mask R-CNN described by ``sd`` needs: :data:`_VITDET_FIXED`, every ViT
    block 0..N-1 with what any block has (relative position tables), the RPN's shared convs
    (``conv`` or ``conv.conv0..``), the box head's ``conv1..`` and the mask head's ``mask_fcn1..``
    (each with its norm when any has one)."""
    rpn = "proposal_generator.rpn_head.conv."
    several = any(k.startswith(rpn + "conv") for k in sd)
    return required_names(
        sd,
        (*_VITDET_FIXED, *(() if several else _wb(rpn[:-1]))),
        (
            (r"backbone\.net\.blocks\.", 0, VIT_BLOCK_PARAMS),
            (r"proposal_generator\.rpn_head\.conv\.conv", 0, ()),
            (r"roi_heads\.box_head\.conv", 1, ()),
            (r"roi_heads\.mask_head\.mask_fcn", 1, ()),
        ),
    )


def vitdet_backbone_to_vit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ViTDet checkpoint's ViT (``backbone.net.*``) in our names, which it uses already (plus
    ``rel_pos_h/w``); the pyramid, RPN and RoI heads keep their names (unexpected in a ViT)."""
    p = "backbone.net."
    return {(k[len(p) :] if k.startswith(p) else k): v for k, v in sd.items()}


def is_vitdet_state_dict(sd: Mapping[str, Any]) -> bool:
    """Whether the keys are those of a whole ViTDet detector (backbone, RPN and RoI heads)."""
    return any(k.startswith("backbone.net.") for k in sd) and any(k.startswith("roi_heads.") for k in sd)


def unmapped_keys(sd: Mapping[str, Any]) -> list[str]:
    """Names that are not part of a ViTDet Mask R-CNN with the simple feature pyramid."""
    return [k for k in sd if k not in _PIXEL_STATS and not any(p.fullmatch(k) for p in _PATTERNS)]


def _to_tensors(model: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    import numpy as np

    out = {}
    for k, v in model.items():
        if isinstance(v, torch.Tensor):
            out[str(k)] = v
        elif isinstance(v, np.ndarray) and v.dtype != object:
            out[str(k)] = torch.from_numpy(np.ascontiguousarray(v))
        else:
            raise CheckpointError(f"{path}: entry {k!r} of its model is a {type(v).__name__}, not a tensor")
    return out


def read_vitdet(path: str | os.PathLike, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and metadata (``iteration``, ``format``) of a detectron2 ViTDet file.

    Raises :class:`CheckpointError` naming the file when it is missing, unreadable, a pickle
    without ``trust``, not a whole detector, or holds weights that are not floating point.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix.lower() == ".pkl":
        if not trust:
            raise CheckpointError(
                f"{path} is a pickle (the detectron2 model-zoo form); unpickling can run code stored in the file. "
                "If you trust its source, pass --trust-checkpoint (or convert it once with "
                "`mae-transfer export --to detectron2 --trust-checkpoint`)"
            )
        try:
            with open(path, "rb") as f:
                obj = pickle.load(f, encoding="latin1")
        except Exception as e:
            raise CheckpointError(f"{path} could not be unpickled ({type(e).__name__}: {e})") from None
        fmt = "detectron2 model zoo (.pkl)"
    else:
        obj = torch.load(path, map_location="cpu", weights_only=False) if trust else load_safely(path, "--weights")
        fmt = "detectron2 (DetectionCheckpointer)"
    model = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(model, Mapping):
        raise CheckpointError(
            f"{path}: no 'model' state dict inside (a detectron2 checkpoint is {{'model': ..., 'iteration': ...}})"
        )
    sd = _to_tensors(model, path)
    check_dtypes(sd, str(path))
    if not is_vitdet_state_dict(sd):
        raise CheckpointError(f"{path} is not a ViTDet detector (no backbone.net.* and roi_heads.* weights)")
    meta = {"format": fmt, "iteration": obj.get("iteration") if isinstance(obj, Mapping) else None}
    return sd, meta


def _norm_kind(sd: Mapping[str, torch.Tensor], prefix: str) -> str:
    if f"{prefix}.norm.running_mean" in sd:
        return "bn"
    if f"{prefix}.norm.weight" in sd:
        return "ln"
    return "none"


def _indices(sd: Mapping[str, Any], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def describe_vitdet(sd: Mapping[str, torch.Tensor], default_num_heads_dim: int = 64) -> dict[str, Any]:
    """The architecture a ViTDet state dict was made for, from its shapes.

    Returns the ViT's ``embed_dim``, ``depth``, ``num_heads`` (from the relative position tables'
    head width; without them ``embed_dim / 64``), ``patch_size``, ``mlp_ratio``, ``use_rel_pos``,
    ``img_size`` (the global blocks' token grid x patch), ``window_size`` and ``global_blocks``
    (from the table lengths), ``pretrain_img_size`` and ``pos_embed_class_row`` (from
    ``pos_embed``); the pyramid's ``channels`` and ``pyramid_norm``; ``rpn_convs``,
    ``num_anchors``; the heads' ``box_head_convs``, ``fc_dim``, ``mask_head_convs``,
    ``head_norm`` and ``num_classes``; and ``notes`` on what could not be read from the shapes.
    Raises :class:`CheckpointError` naming every missing tensor (:func:`required_keys`) and for
    layouts the detector cannot build.
    """
    require(sd, required_keys(sd), "not a complete ViTDet Mask R-CNN")
    notes: list[str] = []
    out: dict[str, Any] = {}
    pw = sd["backbone.net.patch_embed.proj.weight"]
    embed, patch = int(pw.shape[0]), int(pw.shape[-1])
    blocks = _indices(sd, r"backbone\.net\.blocks\.(\d+)\.")
    if blocks != list(range(len(blocks))):
        raise CheckpointError(f"ViT blocks are not numbered 0..N-1: {blocks}")
    depth = len(blocks)
    out.update(embed_dim=embed, patch_size=patch, depth=depth)
    out["mlp_ratio"] = sd["backbone.net.blocks.0.mlp.fc1.weight"].shape[0] / embed
    rel = [sd.get(f"backbone.net.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    out["use_rel_pos"] = all(r is not None for r in rel)
    if out["use_rel_pos"]:
        head_dim = int(rel[0].shape[1])
        out["num_heads"] = embed // head_dim
        lengths = [int(r.shape[0]) for r in rel]
        longest = max(lengths)
        grid = (longest + 1) // 2
        out["img_size"] = grid * patch
        out["global_blocks"] = tuple(i for i, n in enumerate(lengths) if n == longest)
        windows = {(n + 1) // 2 for n in lengths if n != longest}
        if len(windows) > 1:
            raise CheckpointError(f"window blocks with different window sizes ({sorted(windows)}) are not supported")
        out["window_size"] = windows.pop() if windows else 0
    else:
        out["num_heads"] = max(1, embed // default_num_heads_dim)
        notes.append(
            f"no relative position tables: num_heads {out['num_heads']} (head width {default_num_heads_dim}), "
            "the input size, window size and global blocks cannot be read from the file; give them as model.* options"
        )
    pos = sd.get("backbone.net.pos_embed")
    if pos is not None:
        rows = int(pos.shape[1])
        side = math.isqrt(rows - 1)
        if side * side == rows - 1:
            out["pos_embed_class_row"], out["pretrain_img_size"] = True, side * patch
        elif math.isqrt(rows) ** 2 == rows:
            out["pos_embed_class_row"], out["pretrain_img_size"] = False, math.isqrt(rows) * patch
        else:
            raise CheckpointError(
                f"backbone.net.pos_embed has {rows} rows: not a square grid (with or without a class row)"
            )
    levels = _indices(sd, r"backbone\.simfp_(\d+)\.")
    if levels != [2, 3, 4, 5]:
        raise CheckpointError(f"the simple feature pyramid has levels p{levels}; the detector builds p2-p5 (+ p6)")
    out["channels"] = int(sd["backbone.simfp_4.0.weight"].shape[0])
    out["pyramid_norm"] = _norm_kind(sd, "backbone.simfp_4.0")
    convs = [k for k in sd if re.fullmatch(r"proposal_generator\.rpn_head\.conv(\.conv\d+)?\.weight", k)]
    out["rpn_convs"] = len(convs)
    out["num_anchors"] = int(sd["proposal_generator.rpn_head.objectness_logits.weight"].shape[0])
    out["box_head_convs"] = len(_indices(sd, r"roi_heads\.box_head\.conv(\d+)\."))
    fcs = _indices(sd, r"roi_heads\.box_head\.fc(\d+)\.")
    if len(fcs) != 1:
        raise CheckpointError(f"the box head has {len(fcs)} fully connected layers; the detector builds ViTDet's one")
    out["fc_dim"] = int(sd["roi_heads.box_head.fc1.weight"].shape[0])
    out["mask_head_convs"] = len(_indices(sd, r"roi_heads\.mask_head\.mask_fcn(\d+)\."))
    out["head_norm"] = _norm_kind(sd, "roi_heads.box_head.conv1") if out["box_head_convs"] else "ln"
    k1 = int(sd["roi_heads.box_predictor.cls_score.weight"].shape[0]) - 1
    if int(sd["roi_heads.box_predictor.bbox_pred.weight"].shape[0]) != 4 * k1:
        raise CheckpointError("class-agnostic box regression (4 rows) is not supported; ViTDet regresses per class")
    if int(sd["roi_heads.mask_head.predictor.weight"].shape[0]) != k1:
        raise CheckpointError("class-agnostic masks are not supported; ViTDet predicts one mask per class")
    out["num_classes"] = k1
    out["notes"] = notes
    return out


def save_vitdet(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, iteration: int = 0) -> Path:
    """Write a ViTDet state dict as ``DetectionCheckpointer`` does (``{"model", "iteration"}``),
    atomically, then read it back with ``weights_only=True`` and check every tensor. Refuses, before
    writing, tensors the format has no place for and a detector that is not complete
    (:func:`required_keys`); the file read back must hold the complete set."""
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    bad = unmapped_keys(sd)
    if bad:
        raise CheckpointError(
            f"cannot write a detectron2 ViTDet checkpoint: {len(bad)} tensors have no place in it, "
            f"e.g. {', '.join(bad[:5])}"
        )
    require(sd, required_keys(sd), f"cannot write {path}: not a complete ViTDet Mask R-CNN")
    path = atomic_save({"model": sd, "iteration": int(iteration)}, path)
    back = load_safely(path, "exported file")["model"]
    require(back, required_keys(sd), f"{path}: the file read back is not a complete ViTDet Mask R-CNN")
    check_read_back(sd, back, path)
    return path


__all__ = [
    "describe_vitdet",
    "is_vitdet_state_dict",
    "read_vitdet",
    "required_keys",
    "save_vitdet",
    "unmapped_keys",
    "vitdet_backbone_to_vit",
]
