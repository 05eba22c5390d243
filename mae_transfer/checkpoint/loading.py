"""Loading pretrained weights of any format into a backbone: shape adaptation and a report of every key.

The ViT reads every format :mod:`mae_transfer.checkpoint.formats` knows; another family reads its own
checkpoints through its model's ``checkpoint_filter_fn`` (beside its builder, e.g.
:func:`mae_transfer.models.convnet.convnet_checkpoint_filter`)."""

from __future__ import annotations

import fnmatch
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from mae_transfer.checkpoint.checks import check_dtypes
from mae_transfer.checkpoint.checks import compact as _compact
from mae_transfer.checkpoint.checks import first_names as _first
from mae_transfer.checkpoint.formats import (
    _block_indices,
    _describe,
    _grid_from_tokens,
    _suggest,
    _unwrap,
    detect_format,
    infer_vit_config,
    table_grid,
    to_vit_state_dict,
)
from mae_transfer.checkpoint.io import CheckpointError
from mae_transfer.checkpoint.reading import read_checkpoint
from mae_transfer.models.pos_embed import resize_pos_embed

log = logging.getLogger(__name__)

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
    "dense": (
        "blocks.*.attn.rel_pos_*",
        "blocks.*.attn.relative_position_bias_table",
        "blocks.*.gamma_*",
        "head.*",
        "fc_norm.*",
        "norm.*",
    ),
    # Continuing pretraining from an encoder-only checkpoint: the decoder starts fresh.
    "pretrain": ("mask_token", "decoder_*"),
}
EXPECTED_UNEXPECTED: dict[str, tuple[str, ...]] = {
    # The official fine-tuning model has no final norm (fc_norm replaces it) and no decoder.
    "finetune": ("norm.*", "mask_token", "decoder_*"),
    # A checkpoint that was fine-tuned with global pooling brings an fc_norm the probe may not use.
    "linprobe": ("fc_norm.*", "mask_token", "decoder_*"),
    # Dense backbones built without a class token (ViTDet) ignore it; no head or decoder either.
    "dense": (
        "cls_token",
        "norm.*",
        "fc_norm.*",
        "head.*",
        "mask_token",
        "decoder_*",
        "blocks.*.attn.relative_position_index",
    ),
    # A fine-tuned checkpoint used to initialise pretraining brings a classifier.
    "pretrain": ("head.*", "fc_norm.*"),
}


# ---------------------------------------------------------------------------- architecture
def fit_vit_to_checkpoint(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Give our ViT the parts that a checkpoint's ViT (``sd``, our names) has and ``model`` was built
    without, so that a released backbone computes what it was trained to compute in every task that
    builds the ViT from its size alone: layer scale (``gamma_1`` / ``gamma_2``: BEiT, DINOv2), BEiT's
    per-block relative position tables (for the global-attention blocks without relative
    positions; made for the checkpoint's grid) and no absolute ``pos_embed`` when the checkpoint
    has tables and none, register tokens (``reg_token``: DINOv2 with registers, DeiT's
    distillation token) unless a block attends in windows. Only our plain ViT is fitted (an MAE
    has its own forward). Returns one note per change (also in :class:`LoadReport`'s ``adapted``).
    """
    from mae_transfer.models.vit import VisionTransformer  # the model layer (timm) only when loading a ViT

    if not isinstance(model, VisionTransformer) or type(model).forward is not VisionTransformer.forward:
        return []
    blocks = _block_indices(sd, "blocks")
    if not blocks:
        return []
    notes: list[str] = []
    first = f"blocks.{blocks[0]}."
    if first + "gamma_1" in sd and any(blk.gamma_1 is None for blk in model.blocks):
        n = model.add_layer_scale(1.0)
        notes.append(f"architecture: layer scale (gamma_1, gamma_2) added to {n} blocks, as the checkpoint has")
    table = sd.get(first + "attn.relative_position_bias_table")
    if table is not None and table.dim() == 2 and int(table.shape[1]) == model.num_heads:
        grid = table_grid(int(table.shape[0]))
        if grid is not None:
            n = model.add_rel_pos_tables(grid)
            if n:
                notes.append(
                    f"architecture: relative position bias tables ({grid[0]}x{grid[1]} grid) added to {n} "
                    "blocks, as the checkpoint has"
                )
    if (
        "pos_embed" not in sd
        and model.pos_embed is not None
        and not model.fixed_pos_embed
        and any(k.endswith(".attn.relative_position_bias_table") for k in sd)
    ):
        model.remove_abs_pos_embed()
        notes.append("architecture: no absolute pos_embed (the checkpoint has relative position tables only)")
    reg = sd.get("reg_token")
    if (
        reg is not None
        and reg.dim() == 3
        and model.num_reg_tokens == 0
        and not any(blk.window_size > 0 for blk in model.blocks)
    ):
        model.add_reg_tokens(int(reg.shape[1]))
        notes.append(f"architecture: {int(reg.shape[1])} register tokens added, as the checkpoint has")
    return notes


def fit_vits_to_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """:func:`fit_vit_to_checkpoint` for every ViT inside a task model (``state``: the whole model's
    state dict, e.g. a trained classifier or segmenter whose backbone was fitted when it was trained)."""
    from mae_transfer.models.vit import VisionTransformer

    notes: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, VisionTransformer):
            prefix = f"{name}." if name else ""
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            notes += [f"{prefix}{n}" if prefix else n for n in fit_vit_to_checkpoint(module, sub)]
    return notes


# ---------------------------------------------------------------------------- adaptation
def _fit_table(table: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """A BEiT table for another grid: the central offsets when the grid is not larger (exactly what
    the attention reads of the larger table), else resized bicubically (what it does at run time)."""
    if new[0] <= old[0] and new[1] <= old[1]:
        heads = table.shape[1]
        plane = table[: (2 * old[0] - 1) * (2 * old[1] - 1)].view(2 * old[0] - 1, 2 * old[1] - 1, heads)
        plane = plane[old[0] - new[0] : old[0] + new[0] - 1, old[1] - new[1] : old[1] + new[1] - 1]
        return torch.cat([plane.reshape(-1, heads), table[(2 * old[0] - 1) * (2 * old[1] - 1) :]], dim=0)
    from mae_transfer.models.vit import resize_relative_position_table

    return resize_relative_position_table(table, old, new)


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
            new = F.interpolate(
                src.t().unsqueeze(0).float(), size=int(want.shape[0]), mode="linear", align_corners=False
            )
            sd[name] = new[0].t().to(src.dtype)
            notes.append(f"{name}: {src.shape[0]} -> {want.shape[0]} offsets (linear)")
    for name in [n for n in sd if n.endswith(".attn.relative_position_bias_table")]:
        if name not in target:
            continue
        src, want = sd[name], target[name]
        if src.dim() != 2 or want.dim() != 2 or src.shape[1] != want.shape[1] or src.shape[0] == want.shape[0]:
            continue
        old, new = table_grid(int(src.shape[0])), table_grid(int(want.shape[0]))
        if old is None or new is None or ((new[0] > old[0] or new[1] > old[1]) and not interpolate_pos_embed):
            continue
        sd[name] = _fit_table(src, old, new)
        how = "central offsets" if new[0] <= old[0] and new[1] <= old[1] else "bicubic"
        notes.append(f"{name}: {old[0]}x{old[1]} -> {new[0]}x{new[1]} grid ({how})")
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


def _patterns(spec: str | Iterable[str], presets: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Patterns from a preset name, a single pattern or an iterable of patterns/preset names."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        out.extend(presets[item] if item in presets else (item,))
    return tuple(out)


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


@dataclass(frozen=True)
class _Sizes:
    """What the messages of :func:`load_backbone` say of the checkpoint's and the model's sizes."""

    ckpt: str
    model: str
    same: bool  # same width and depth (a shape mismatch is then not a size mismatch)
    suggest: str  # a --model value that fits the checkpoint
    depths: tuple[int | None, int | None] = (None, None)  # blocks of the checkpoint and of the model

    @classmethod
    def of_vit(cls, ckpt: Mapping[str, Any], model_cfg: Mapping[str, Any], model: torch.nn.Module) -> "_Sizes":
        same = (ckpt["embed_dim"], ckpt["depth"]) == (model_cfg["embed_dim"], model_cfg["depth"])
        return cls(
            _describe(ckpt), _describe(model_cfg), same, _suggest(ckpt, model), (ckpt["depth"], model_cfg["depth"])
        )

    @classmethod
    def of_family(cls, ckpt: str, model: str) -> "_Sizes":
        # A description starts with the size name when the size has one ("convnet_nano: ...").
        name = ckpt.split(":")[0] if ":" in ckpt else "a model of the checkpoint's size"
        return cls(ckpt, model, ckpt == model, name)


def load_backbone(
    model: torch.nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    expected_missing: str | Iterable[str] = (),
    expected_unexpected: str | Iterable[str] = (),
    interpolate_pos_embed: bool = True,
    strict_shapes: bool = True,
    trust: bool = False,
    fit_architecture: bool = True,
) -> LoadReport:
    """Load pretrained weights of any supported format into ``model`` (a ViT or MAE of ours).

    Steps: read ``source`` (a path, or an already loaded checkpoint / state dict), detect its
    format, convert names (:func:`to_vit_state_dict`), with ``fit_architecture`` give our ViT the
    parts the checkpoint's ViT has and the model lacks (:func:`fit_vit_to_checkpoint`: layer scale,
    BEiT's tables and no ``pos_embed``, register tokens), adapt shapes to the model (bicubic
    ``pos_embed`` / ``decoder_pos_embed`` grid resize and class-row add/drop, bicubic patch-kernel
    resize when the patch size differs, linear ``rel_pos_h/w`` resize, BEiT tables cropped or
    resized bicubically to the model's grid), then
    ``model.load_state_dict(strict=False)``.

    ``expected_missing`` / ``expected_unexpected`` are fnmatch patterns (``"head.*"``,
    ``"decoder_*"``) or names of presets in :data:`EXPECTED_MISSING` / :data:`EXPECTED_UNEXPECTED`
    (``"finetune"``, ``"linprobe"``, ``"dense"``, ``"pretrain"``). A checkpoint tensor whose shape
    does not fit is left out without complaint when its key is expected missing (a classifier for
    another number of classes).

    Files are read safely (:func:`read_checkpoint`): a file that needs full unpickling is refused
    unless ``trust``; weights that are not floating point are refused (:func:`.checks.check_dtypes`).

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
        check_dtypes(_unwrap(raw)[0], src_name)  # files are checked as they are read (read_checkpoint)
    else:
        src_name = str(source)
        raw = read_checkpoint(source, trust=trust)
    notes: list[str] = []
    family_filter = getattr(model, "checkpoint_filter_fn", None)
    if family_filter is None:  # the ViT: every format of mae_transfer.checkpoint.formats
        fmt = detect_format(raw)
        sd = to_vit_state_dict(raw)
        if fit_architecture:
            notes += fit_vit_to_checkpoint(model, sd)
        target = model.state_dict()
        # Described before adaptation, so messages give the checkpoint's own grid and patch size.
        sizes = _Sizes.of_vit(infer_vit_config(sd), infer_vit_config(target), model)
        sd = _adapt(sd, model, target, interpolate_pos_embed, notes)
    else:  # another family reads its own checkpoints (models/backbone.py: beside its builder)
        target = model.state_dict()
        sd, fmt = family_filter(_unwrap(raw)[0])
        sizes = _Sizes.of_family(model.describe_state_dict(sd), model.describe_state_dict(target))

    common = [k for k in sd if k in target]
    if not common:
        raise CheckpointError(
            f"no backbone weights found in {src_name} (format detected: {fmt}; "
            f"{len(sd)} tensors, e.g. {_first(list(sd), 4) or 'none'}): pass a checkpoint of the model's family "
            f"({type(model).__name__})"
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
        if not sizes.same:
            why = (
                f"checkpoint {src_name} holds {sizes.ckpt}; the model is "
                f"{sizes.model}: pass a checkpoint of the same size or choose --model {sizes.suggest}"
            )
        else:
            why = f"checkpoint {src_name} ({sizes.ckpt}) does not fit the model ({sizes.model})"
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
        if sizes.same:
            advice = (
                "If they are meant to start from their initial values, name them in expected_missing "
                f"(patterns, or a preset: {', '.join(EXPECTED_MISSING)})"
            )
        else:
            advice = f"Pass a checkpoint for this model, or choose --model {sizes.suggest} to fit the checkpoint"
        raise CheckpointError(
            f"checkpoint {src_name} lacks {len(bad_missing)} parameters of the model that were not expected "
            f"to be missing: {_first(bad_missing)}. The checkpoint seems to hold {sizes.ckpt} "
            f"(format detected: {fmt}); the model is {sizes.model}. {advice}"
        )
    unexpected = [k for k in sd if k not in target]
    model.load_state_dict(loadable, strict=False)  # loadable holds model keys of matching shapes only
    report = LoadReport(
        loaded=list(loadable),
        missing=missing,
        unexpected=unexpected,
        format=fmt,
        source=src_name,
        mismatched=mismatched,
        adapted=notes,
    )
    log.info("%s", report.summary())
    surprising = [k for k in unexpected if not _matches(k, exp_unexpected)]
    if surprising:
        extra = ""
        if sizes.depths[0] and sizes.depths[1] and sizes.depths[0] > sizes.depths[1]:
            extra = f" (the checkpoint has {sizes.depths[0]} blocks, the model {sizes.depths[1]})"
        log.warning(
            "%s: %d checkpoint tensors have no place in the model and are ignored%s: %s",
            src_name,
            len(surprising),
            extra,
            ", ".join(_compact(surprising)),
        )
    return report


def init_backbone(model: torch.nn.Module, source: str | os.PathLike | None, **load_kwargs: Any) -> LoadReport | None:
    """The one start of every transfer task's backbone: :func:`load_backbone` of ``source`` into
    ``model``, or, with no source, random weights and a warning saying so (the from-scratch
    baseline). ``load_kwargs``: the task's ``expected_missing`` / ``expected_unexpected``."""
    if source:
        return load_backbone(model, source, **load_kwargs)
    log.warning(
        "NO --backbone: the ViT starts from RANDOM weights (the from-scratch baseline); pass --backbone ckpt.pth "
        "to evaluate pretrained weights"
    )
    return None
