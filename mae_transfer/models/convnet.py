"""A hierarchical convolutional backbone family, ``convnet``: ConvNeXt (Liu et al., "A ConvNet for the
2020s", CVPR 2022) behind the same contract as the ViT (:mod:`mae_transfer.models.backbone`).

Architecture (ConvNeXt section 2 and the official ``models/convnext.py``): a "patchify" stem (4x4
convolution of stride 4 + LayerNorm), four stages at strides 4, 8, 16, 32 with a separate
downsampling layer (LayerNorm + 2x2 convolution of stride 2) in front of stages 2-4, and blocks of a
7x7 depthwise convolution, LayerNorm, an inverted-bottleneck MLP (``mlp_ratio`` x, GELU), layer scale
(initial 1e-6) and stochastic depth rising linearly to ``drop_path`` over all blocks. The classifier
is global average pooling + LayerNorm (``fc_norm``) + a linear ``head``.

Parameter names follow the ViT's where the roles agree, so the tasks' name rules apply unchanged:
``stem.*`` (layer 0), one flat ``blocks.N.*`` list over all stages (layer N + 1; linear probing and
partial fine-tuning train the last k of them), ``downsamples.i.*`` (in front of stage i + 1; the
layer of that stage's first block), ``norm`` (no norm before pooling in ConvNeXt: Identity),
``fc_norm`` and ``head``. Checkpoints of the official repository (``downsample_layers``,
``stages.S.B``) and of timm (``stages.S.downsample``, ``stages.S.blocks.B.conv_dw`` / ``mlp.fc1``,
``head.norm``) are renamed to these by :func:`convnet_checkpoint_filter`, which
:func:`mae_transfer.checkpoint.load_backbone` finds as the model's ``checkpoint_filter_fn`` (timm's
``checkpoint_filter_fn`` idea: each family reads its own checkpoints, beside its builder).

``feature_info`` has one entry per STAGE (the ViT's has one per block): ``forward_intermediates``
indices are stage indices, and a consumer tells the two apart by the strides (several here, one
in a ViT); see :func:`mae_transfer.models.pyramid.is_hierarchical`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mae_transfer.models.pyramid import LayerNorm2d

try:  # timm's DropPath is the reference implementation of stochastic depth (as in models/vit.py).
    from timm.layers import DropPath
except ImportError:  # pragma: no cover - very old timm
    from timm.models.layers import DropPath


@dataclass(frozen=True)
class ConvNetSize:
    dims: tuple[int, int, int, int]  # channels of stages 1-4
    depths: tuple[int, int, int, int]  # blocks in stages 1-4


# ConvNeXt-T/S/B/L: Liu et al. 2022, section 3 ("We construct different ConvNeXt variants ...":
# ConvNeXt-T C = (96, 192, 384, 768), B = (3, 3, 9, 3); S: B = (3, 3, 27, 3); B: C = (128, ..., 1024);
# L: C = (192, ..., 1536)), as in the official models/convnext.py. nano/pico: tiny sizes for tests.
CONVNET_SIZES: dict[str, ConvNetSize] = {
    "convnet_tiny": ConvNetSize((96, 192, 384, 768), (3, 3, 9, 3)),
    "convnet_small": ConvNetSize((96, 192, 384, 768), (3, 3, 27, 3)),
    "convnet_base": ConvNetSize((128, 256, 512, 1024), (3, 3, 27, 3)),
    "convnet_large": ConvNetSize((192, 384, 768, 1536), (3, 3, 27, 3)),
    # Very small models for tests and CPU demos.
    "convnet_nano": ConvNetSize((16, 32, 64, 128), (1, 1, 2, 1)),
}

STEM_STRIDE = 4


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> Linear (x mlp_ratio) -> GELU -> Linear -> layer scale, residual
    with stochastic depth (the official block, channels-last MLP)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNet(nn.Module):
    """ConvNeXt-style hierarchical backbone offering the backbone contract of the tasks.

    Args:
        dims, depths: channels and blocks of each stage (4 stages: strides 4, 8, 16, 32).
        num_classes: classifier outputs (0: no head).
        global_pool: ``"avg"`` (average pool + ``fc_norm`` + head) or ``""`` (``forward`` returns
            the last stage's map). There is no class token, so no ``"token"``.
        img_size: the training input size (kept for reference; the network takes any multiple of
            its stride).
    """

    def __init__(
        self,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (3, 3, 9, 3),
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        layer_scale: float = 1e-6,
        head_drop: float = 0.0,
        grad_checkpointing: bool = False,
        img_size: int | Sequence[int] = 224,
    ):
        super().__init__()
        if len(dims) != len(depths) or not dims:
            raise ValueError(f"convnet: dims {tuple(dims)} and depths {tuple(depths)} need one entry per stage")
        if global_pool not in ("avg", ""):
            raise ValueError(
                f"the convnet family pools by average ('avg') or not at all (''), got global_pool={global_pool!r}: "
                "it has no class token"
            )
        self.dims = [int(d) for d in dims]
        self.depths = [int(d) for d in depths]
        self.img_size = img_size
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing
        self.embed_dim = self.num_features = self.dims[-1]

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, self.dims[0], kernel_size=STEM_STRIDE, stride=STEM_STRIDE), LayerNorm2d(self.dims[0])
        )
        self.downsamples = nn.ModuleList(
            [
                nn.Sequential(LayerNorm2d(self.dims[i]), nn.Conv2d(self.dims[i], self.dims[i + 1], 2, stride=2))
                for i in range(len(self.dims) - 1)
            ]
        )
        total = sum(self.depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear, as the official linspace
        stage_dims = [dim for dim, depth in zip(self.dims, self.depths) for _ in range(depth)]
        self.blocks = nn.ModuleList(
            [
                ConvNeXtBlock(dim, mlp_ratio, drop_path=dpr[i], layer_scale=layer_scale)
                for i, dim in enumerate(stage_dims)
            ]
        )
        # ConvNeXt norms after pooling (fc_norm); ``norm`` (the ViT's pre-pool norm) stays Identity so
        # that the dense tasks' ``net.norm = nn.Identity()`` is a no-op here.
        self.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6) if global_pool == "avg" else nn.Identity()
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation: truncated normal (std 0.02) convolutions and linears, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ structure
    @staticmethod
    def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        """How :func:`mae_transfer.checkpoint.load_backbone` reads this family's checkpoints."""
        return convnet_checkpoint_filter(state_dict)

    @staticmethod
    def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
        return describe_convnet_state_dict(state_dict)

    @property
    def stage_ends(self) -> list[int]:
        """One past the index of each stage's last block in ``blocks``."""
        ends, n = [], 0
        for d in self.depths:
            n += d
            ends.append(n)
        return ends

    @property
    def reductions(self) -> list[int]:
        return [STEM_STRIDE * 2**i for i in range(len(self.depths))]

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per stage (what ``forward_intermediates`` indexes): the module whose output it is
        (the stage's last block), channels and stride."""
        return [
            {"module": f"blocks.{end - 1}", "num_chs": dim, "reduction": red, "stage": i}
            for i, (end, dim, red) in enumerate(zip(self.stage_ends, self.dims, self.reductions))
        ]

    # ---------------------------------------------------------------- the backbone contract
    def layer_id(self, name: str) -> int:
        """Depth index of parameter ``name`` for layer-wise lr decay, the ViT's rule with blocks over
        all stages: ``stem.*`` 0, ``blocks.n.*`` n + 1, ``downsamples.i.*`` the layer of the first block of
        the stage it leads into, everything else (``fc_norm``, ``head``) the top, ``num_layer_ids - 1``."""
        if name.startswith("stem."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith("downsamples."):
            stage = int(name.split(".")[1]) + 1
            return self.stage_ends[stage - 1] + 1
        return len(self.blocks) + 1

    @property
    def num_layer_ids(self) -> int:
        """The number of distinct ``layer_id`` values (blocks + 2)."""
        return len(self.blocks) + 2

    def no_weight_decay(self) -> set[str]:
        """None beyond the 1-D rule (biases, norms, layer scales), as the official ConvNeXt recipe."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` outputs (0 = none), optionally another pooling."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"the convnet family pools by 'avg' or '', got {global_pool!r}")
            if global_pool != self.global_pool:
                self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6) if global_pool == "avg" else nn.Identity()
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.stem[0].weight.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one in ``indices`` (timm's method of this name), and the head
        with ``prune_head``: a dense model that reads an inner stage alone (the simple pyramid reads
        stride 16) then has no parameter without a gradient (DDP needs a gradient for each). Returns
        the kept stage indices."""
        wanted = self._stage_indices(indices)
        last = max(wanted)
        self.blocks = self.blocks[: self.stage_ends[last]]
        self.downsamples = self.downsamples[:last]
        self.dims, self.depths = self.dims[: last + 1], self.depths[: last + 1]
        self.embed_dim = self.num_features = self.dims[-1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.head = nn.Identity()
            self.num_classes, self.global_pool = 0, ""
        return wanted

    # ------------------------------------------------------------------ forward pieces
    def _stage_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        n = len(self.depths)
        if indices is None:
            wanted = list(range(n))
        elif isinstance(indices, int):
            wanted = list(range(n - indices, n))
        else:
            wanted = [i % n if -n <= i < n else i for i in indices]
        for i in wanted:
            if not 0 <= i < n:
                raise ValueError(f"stage index {i} is outside 0..{n - 1} (the convnet family indexes stages)")
        return wanted

    def _check_input(self, x: torch.Tensor, last_stage: int) -> None:
        r = self.reductions[last_stage]
        if x.shape[-2] % r or x.shape[-1] % r:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by the stride {r} of the convnet")

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def run_stage(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``s`` (its downsampling layer, or the stem for stage 0, then its blocks)."""
        x = self.stem(x) if s == 0 else self.downsamples[s - 1](x)
        for i in range(self.stage_ends[s] - self.depths[s], self.stage_ends[s]):
            x = self.run_block(i, x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the last stage's map (B, D, H/32, W/32)."""
        self._check_input(x, len(self.depths) - 1)
        for s in range(len(self.depths)):
            x = self.run_stage(s, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average-pool (B, D, h, w) -> fc_norm -> (B, D) features or logits (B, num_classes);
        without pooling the map is returned as it is."""
        if self.global_pool != "avg":
            return x
        x = self.fc_norm(x.mean(dim=(-2, -1)))
        if pre_logits:
            return x
        return self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        output_fmt: str = "NCHW",
        norm: bool = False,
        return_prefix_tokens: bool = False,
        stop_early: bool = True,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Outputs of chosen STAGES (the ViT's call, with stage indices instead of block indices).

        Args:
            indices: stage indices (0-based, negatives count from the end), an int n for the last n
                stages, or None for all four.
            output_fmt: ``"NCHW"`` (B, C_s, H/r_s, W/r_s) or ``"NLC"`` (B, h*w, C_s).
            norm: apply ``norm`` (Identity: ConvNeXt has no pre-pool norm) to the last stage's output.
            return_prefix_tokens: also return (B, 0, C_s) "class tokens" (there are none), for callers
                written for the ViT.
            stop_early: skip the stages after the last requested one.
        """
        wanted = self._stage_indices(indices)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        n = len(self.depths)
        last = max(wanted) if (stop_early and wanted) else n - 1
        self._check_input(x, last)
        outs: dict[int, torch.Tensor] = {}
        for s in range(last + 1):
            x = self.run_stage(s, x)
            if s in wanted:
                outs[s] = self.norm(x) if (norm and s == n - 1) else x
        feats = [outs[i] for i in wanted]
        if output_fmt == "NLC":
            feats = [f.flatten(2).transpose(1, 2) for f in feats]
        if return_prefix_tokens:
            return feats, [f.new_zeros(f.shape[0], 0, self.dims[i]) for f, i in zip(feats, wanted)]
        return feats


# timm's names inside a block -> the official ones used here.
_TIMM_BLOCK = {"conv_dw": "dwconv", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2"}


def convnet_checkpoint_filter(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict in this module's names, format)`` of a ConvNeXt checkpoint's tensors: the official
    repository's (``downsample_layers.0`` = the stem, ``stages.S.B.*``, ``norm`` after pooling),
    timm's (``stem``, ``stages.S.downsample``, ``stages.S.blocks.B.{conv_dw,mlp.fc1,mlp.fc2}``,
    ``head.norm`` / ``head.fc``) or ours (unchanged). A stage's blocks are numbered on from the
    blocks of the stages before it, as counted in the checkpoint itself; tensors no rule names keep
    their names (the loader reports them as unexpected)."""
    keys = list(state_dict)
    if any(k.startswith("downsample_layers.") for k in keys):
        fmt, block = "convnext-official", re.compile(r"stages\.(\d+)\.(\d+)\.(.+)")
    elif any(re.match(r"stages\.\d+\.blocks\.", k) for k in keys):
        fmt, block = "timm-convnext", re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)")
    else:
        return dict(state_dict), "mae-transfer"
    per_stage: dict[int, int] = {}
    for k in keys:
        m = block.match(k)
        if m:
            per_stage[int(m[1])] = max(per_stage.get(int(m[1]), 0), int(m[2]) + 1)
    offset = {s: sum(per_stage.get(t, 0) for t in range(s)) for s in per_stage}
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        m = block.match(k)
        if m:
            rest = m[3]
            for theirs, ours in _TIMM_BLOCK.items():
                rest = re.sub(rf"^{re.escape(theirs)}\.", ours + ".", rest)
            name = f"blocks.{offset[int(m[1])] + int(m[2])}.{rest}"
        elif m := re.match(r"downsample_layers\.(\d+)\.(.+)", k):
            i = int(m[1])
            name = f"stem.{m[2]}" if i == 0 else f"downsamples.{i - 1}.{m[2]}"
        elif m := re.match(r"stages\.(\d+)\.downsample\.(.+)", k):
            name = f"downsamples.{int(m[1]) - 1}.{m[2]}"
        elif k.startswith("norm."):  # the official norm after pooling
            name = "fc_norm." + k[len("norm.") :]
        elif k.startswith("head.norm."):
            name = "fc_norm." + k[len("head.norm.") :]
        elif k.startswith("head.fc."):
            name = "head." + k[len("head.fc.") :]
        else:
            name = k
        out[name] = v
    return out, fmt


def describe_convnet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``convnet dims (96, 192, 384, 768), depths (3, 3, 9, 3)`` of a state dict in this module's
    names (for messages), the size name too when it is one of :data:`CONVNET_SIZES`."""
    dims = [int(state_dict["stem.0.weight"].shape[0])] if "stem.0.weight" in state_dict else []
    dims += [int(v.shape[0]) for k, v in sorted(state_dict.items()) if re.fullmatch(r"downsamples\.\d+\.1\.weight", k)]
    widths = [int(v.shape[0]) for k, v in sorted(state_dict.items(), key=lambda kv: _block_index(kv[0])) if _is_dw(k)]
    depths = [sum(1 for w in widths if w == d) for d in dims]
    names = [n for n, size in CONVNET_SIZES.items() if list(size.dims) == dims and list(size.depths) == depths]
    return f"{names[0] + ': ' if names else ''}convnet dims {tuple(dims)}, depths {tuple(depths)}"


def _is_dw(key: str) -> bool:
    return re.fullmatch(r"blocks\.\d+\.dwconv\.weight", key) is not None


def _block_index(key: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", key)
    return int(m[1]) if m else -1


def convnet_size(name: str | None) -> ConvNetSize:
    if name not in CONVNET_SIZES:
        raise ValueError(f"unknown convnet {name!r}; choose one of: {', '.join(CONVNET_SIZES)}")
    return CONVNET_SIZES[name]


def build_convnet(cfg: Any, **use: Any) -> ConvNet:  # cfg: a models.backbone.BackboneConfig
    """The ``convnet`` family's builder for :data:`~mae_transfer.models.backbone.BACKBONES`: the size by
    ``cfg.name`` (:data:`CONVNET_SIZES`), ``cfg.mlp_ratio``, ``cfg.drop_path`` (``use["drop_path_rate"]``
    overrides it) and ``cfg.grad_checkpointing``; from ``use``: ``img_size``, ``num_classes`` (default 0)
    and ``global_pool`` (default ``"avg"``). The ViT's options in ``use`` (``class_token``,
    ``window_size``, ``global_blocks``, ``use_rel_pos``, ``rel_pos_type``, ``layer_scale``,
    ``pos_embed_*`` ...) mean nothing to a convolutional network and are ignored."""
    explicit = {k: v for k, v in cfg.explicit_size().items() if v is not None}
    if explicit:
        raise ValueError(
            f"the convnet family is sized by name ({', '.join(CONVNET_SIZES)}); "
            f"{', '.join(explicit)} are ViT sizes: leave them unset"
        )
    size = convnet_size(cfg.name)
    global_pool = use.get("global_pool")
    return ConvNet(
        dims=size.dims,
        depths=size.depths,
        num_classes=use.get("num_classes", 0),
        global_pool="avg" if global_pool is None else global_pool,
        mlp_ratio=cfg.mlp_ratio,
        drop_path_rate=use.get("drop_path_rate", cfg.drop_path),
        grad_checkpointing=cfg.grad_checkpointing,
        img_size=use["img_size"],
    )


__all__ = [
    "CONVNET_SIZES",
    "ConvNeXtBlock",
    "ConvNet",
    "ConvNetSize",
    "build_convnet",
    "convnet_checkpoint_filter",
    "convnet_size",
    "describe_convnet_state_dict",
]
