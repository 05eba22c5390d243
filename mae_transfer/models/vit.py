"""One Vision Transformer for every task.

Parameter names are those of the official MAE and timm ViTs (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``,
``fc_norm``, ``head``), and the optional relative position tables use detectron2's ViTDet names
(``blocks.N.attn.rel_pos_{h,w}``), so released checkpoints load without renaming.

Options that transfer recipes switch on:
- window attention (non-overlapping, no shift) in every block except ``global_blocks``
  (ViTDet / Benchmarking-ViT detection recipes);
- decomposed relative position bias, zero-initialised, used for transfer only (MAE paper A.3/A.4,
  ViTDet section 3);
- drop path, activation checkpointing, position-embedding interpolation to any input size and
  ``forward_intermediates`` for the pyramid adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mae_transfer.models.pos_embed import resize_pos_embed, sincos_2d

try:  # timm's DropPath is the reference implementation of stochastic depth.
    from timm.layers import DropPath
except ImportError:  # pragma: no cover - very old timm
    from timm.models.layers import DropPath


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class PatchEmbed(nn.Module):
    """Image to patch tokens: (B, C, H, W) -> (B, H/p * W/p, D) and the grid size (H/p, W/p)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = _pair(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        ph, pw = self.patch_size
        if x.shape[-2] % ph or x.shape[-1] % pw:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by the patch size {self.patch_size}")
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Per-pair relative position embeddings, (q_size, k_size, C), from a (L, C) table.

    The table holds one row per relative offset, L = 2 * max(q_size, k_size) - 1; a table trained
    for another size is resized linearly first. Offsets are scaled so that query and key grids of
    different sizes cover the same extent (ViTDet's convention, so detectron2 weights behave alike).
    """
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        rel_pos = (
            F.interpolate(rel_pos.t().unsqueeze(0).float(), size=max_dist, mode="linear", align_corners=False)[0]
            .t()
            .to(rel_pos.dtype)
        )
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    offsets = (q_coords - k_coords) + (k_size - 1) * k_scale
    return rel_pos[offsets.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_hw: tuple[int, int],
    k_hw: tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias from decomposed (row + column) relative positions.

    q: (B, heads, qh*qw, C) unscaled queries. Returns (B, heads, qh*qw, kh*kw).
    """
    qh, qw = q_hw
    kh, kw = k_hw
    rh = relative_position_table(qh, kh, rel_pos_h).to(q.dtype)
    rw = relative_position_table(qw, kw, rel_pos_w).to(q.dtype)
    b, nh, _, c = q.shape
    r_q = q.reshape(b, nh, qh, qw, c)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)
    bias = bias_h[..., :, None] + bias_w[..., None, :]
    return bias.reshape(b, nh, qh * qw, kh * kw)


def relative_position_index(
    grid: tuple[int, int], table_grid: tuple[int, int], num_prefix_tokens: int = 0
) -> torch.Tensor:
    """BEiT's index (T, T) into a relative position bias table made for ``table_grid`` (Wh, Ww), for
    the tokens of ``grid`` (h, w) <= (Wh, Ww) after ``num_prefix_tokens`` class tokens.

    Patches at (y_i, x_i), (y_j, x_j) read entry ``(y_i - y_j + Wh - 1) * (2 Ww - 1) + x_i - x_j + Ww - 1``;
    with L = (2 Wh - 1)(2 Ww - 1), a class token as query reads L, as key L + 1, both L + 2.
    """
    (h, w), (th, tw) = grid, table_grid
    if h > th or w > tw:
        raise ValueError(f"a {h}x{w} token grid needs offsets beyond the {th}x{tw} table; resize the table first")
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    grid_index = (ys[:, None] - ys[None, :] + th - 1) * (2 * tw - 1) + (xs[:, None] - xs[None, :] + tw - 1)
    p = num_prefix_tokens
    if not p:
        return grid_index
    n = (2 * th - 1) * (2 * tw - 1)
    index = torch.empty(p + h * w, p + h * w, dtype=torch.int64)
    index[p:, p:] = grid_index
    index[:p, :] = n
    index[:, :p] = n + 1
    index[:p, :p] = n + 2
    return index


def resize_relative_position_table(
    table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], extra: int = 3
) -> torch.Tensor:
    """A BEiT table ((2Wh-1)(2Ww-1) + extra, heads) for another token grid: the offset plane of each
    head resized bicubically (``align_corners=False``); the class-token entries are kept."""
    (oh, ow), (nh, nw) = old_grid, new_grid
    if (oh, ow) == (nh, nw):
        return table
    heads = table.shape[1]
    plane, rest = table[: (2 * oh - 1) * (2 * ow - 1)], table[(2 * oh - 1) * (2 * ow - 1) :]
    plane = plane.t().reshape(1, heads, 2 * oh - 1, 2 * ow - 1).float()
    plane = F.interpolate(plane, size=(2 * nh - 1, 2 * nw - 1), mode="bicubic", align_corners=False)
    plane = plane.reshape(heads, -1).t().to(table.dtype)
    return torch.cat([plane, rest[:extra]], dim=0)


class Attention(nn.Module):
    """Multi-head self-attention on ``F.scaled_dot_product_attention`` (FlashAttention on GPU).

    Relative positions (``use_rel_pos``), in one of two forms:

    * ``rel_pos_type="decomposed"`` (ViTDet): ``rel_pos_h`` / ``rel_pos_w`` tables of head-width
      vectors; the bias of a query/key pair is the query's dot product with its row and column
      offset embeddings (query-dependent). Class tokens get no bias.
    * ``rel_pos_type="table"`` (BEiT, mmsegmentation's MAE): one scalar per head and offset in
      ``relative_position_bias_table`` ((2 Wh - 1)(2 Ww - 1) + 3, heads), three extra entries for the
      class token as query, as key, and both; looked up by :func:`relative_position_index`. A
      smaller grid reads a subset of the offsets; a larger one resizes the table bicubically.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_size: tuple[int, int] | None = None,
        rel_pos_zero_init: bool = True,
        rel_pos_type: str = "decomposed",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if rel_pos_type not in ("decomposed", "table"):
            raise ValueError(f"rel_pos_type must be 'decomposed' or 'table', got {rel_pos_type!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        self.rel_pos_type = rel_pos_type
        if use_rel_pos:
            if rel_pos_size is None:
                raise ValueError("use_rel_pos needs rel_pos_size (the token grid the tables are made for)")
            self.rel_pos_size = (int(rel_pos_size[0]), int(rel_pos_size[1]))
            if rel_pos_type == "decomposed":
                self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, self.head_dim))
                self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, self.head_dim))
                if not rel_pos_zero_init:
                    nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                    nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
            else:
                self._make_table(self.rel_pos_size, rel_pos_zero_init)

    def _make_table(self, size: tuple[int, int], zero_init: bool, like: torch.Tensor | None = None) -> None:
        n = (2 * size[0] - 1) * (2 * size[1] - 1) + 3
        kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n, self.num_heads, **kw))
        if not zero_init:  # BEiT; MAE transfer starts from zeros
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._index_cache: dict = {}

    def add_rel_pos_table(self, table_grid: tuple[int, int]) -> None:
        """Switch on the table form of relative positions (zero-initialised), made for ``table_grid``:
        the attention of a model built without relative positions, fitted to a BEiT checkpoint."""
        if self.use_rel_pos:
            raise ValueError("this attention already has relative positions")
        self.use_rel_pos, self.rel_pos_type = True, "table"
        self.rel_pos_size = (int(table_grid[0]), int(table_grid[1]))
        self._make_table(self.rel_pos_size, True, like=self.qkv.weight)

    def table_bias(self, hw: tuple[int, int], num_prefix_tokens: int, device: torch.device) -> torch.Tensor:
        """The table form's bias (heads, T, T) for a grid ``hw`` after ``num_prefix_tokens`` tokens."""
        table, size = self.relative_position_bias_table, self.rel_pos_size
        if hw[0] > size[0] or hw[1] > size[1]:
            big = (max(hw[0], size[0]), max(hw[1], size[1]))
            table, size = resize_relative_position_table(table, size, big), big
        key = (tuple(hw), num_prefix_tokens, size, str(device))
        index = self._index_cache.get(key)
        if index is None:
            index = relative_position_index(tuple(hw), size, num_prefix_tokens).to(device)
            self._index_cache[key] = index
        t = index.shape[0]
        return table[index.reshape(-1)].view(t, t, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None, num_prefix_tokens: int = 0) -> torch.Tensor:
        """x: (B, T, D) with T = num_prefix_tokens + H*W. Returns (B, T, D)."""
        b, t, d = x.shape
        # (B, T, 3, heads, C) split on its 3-axis, each (B, heads, T, C) a strided view: the backward
        # of the split then stacks the three gradients straight into the qkv layer's (B, T, 3D)
        # output layout (splitting a permuted (3, B, heads, T, C) view needed a second copy).
        q, k, v = (y.transpose(1, 2) for y in self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).unbind(2))
        bias = None
        if self.use_rel_pos:
            if hw is None:
                raise ValueError("relative position bias needs the token grid size")
            p = num_prefix_tokens
            if self.rel_pos_type == "table":
                bias = self.table_bias(hw, p, x.device).unsqueeze(0).to(q.dtype)
            else:
                grid_bias = decomposed_rel_pos_bias(q[:, :, p:], self.rel_pos_h, self.rel_pos_w, hw, hw)
                # Prefix (class) tokens get no relative bias: zero rows and columns around the grid block.
                bias = F.pad(grid_bias, (p, 0, p, 0)) if p else grid_bias
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x.transpose(1, 2).reshape(b, t, d)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWindows, window*window, C), zero-padding H and W up to the window."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c), (hp, wp)


def window_unpartition(x: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nWindows, window*window, C) -> (B, H, W, C)."""
    hp, wp = padded_hw
    h, w = hw
    b = x.shape[0] // ((hp // window) * (wp // window))
    x = x.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w].contiguous()


class Block(nn.Module):
    """Pre-norm Transformer block; ``window_size > 0`` makes its attention local (no shift)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        window_size: int = 0,
        use_rel_pos: bool = False,
        rel_pos_size: tuple[int, int] | None = None,
        rel_pos_zero_init: bool = True,
        rel_pos_type: str = "decomposed",
        layer_scale: float | None = None,
    ):
        super().__init__()
        if window_size > 0 and use_rel_pos and rel_pos_type == "table":
            raise ValueError(
                "the table form of relative positions is for global attention (BEiT); use 'decomposed' with windows"
            )
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_size=(window_size, window_size) if window_size > 0 else rel_pos_size,
            rel_pos_zero_init=rel_pos_zero_init,
            rel_pos_type=rel_pos_type,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Layer scale (CaiT; BEiT / mmsegmentation's MAE: init_values 1.0 for segmentation).
        if layer_scale is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def add_layer_scale(self, value: float = 1.0) -> None:
        """Add ``gamma_1`` / ``gamma_2`` (filled with ``value``) to a block built without layer scale."""
        if self.gamma_1 is not None:
            return
        w = self.norm1.weight
        self.gamma_1 = nn.Parameter(torch.full(w.shape, float(value), device=w.device, dtype=w.dtype))
        self.gamma_2 = nn.Parameter(torch.full(w.shape, float(value), device=w.device, dtype=w.dtype))

    def _attend(self, x: torch.Tensor, hw: tuple[int, int] | None, num_prefix_tokens: int) -> torch.Tensor:
        if self.window_size <= 0:
            return self.attn(x, hw, num_prefix_tokens)
        if hw is None or num_prefix_tokens:
            raise ValueError("window attention needs a token grid without prefix (class) tokens")
        b, _, c = x.shape
        windows, padded = window_partition(x.view(b, hw[0], hw[1], c), self.window_size)
        windows = self.attn(windows, (self.window_size, self.window_size), 0)
        return window_unpartition(windows, self.window_size, padded, hw).view(b, hw[0] * hw[1], c)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None, num_prefix_tokens: int = 0) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        if self.gamma_1 is None:
            x = x + self.drop_path(self._attend(self.norm1(x), hw, num_prefix_tokens))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self._attend(self.norm1(x), hw, num_prefix_tokens))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def init_transformer_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform Linear (as JAX ViT), zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """Plain ViT with a global-pool (``fc_norm``) or class-token head.

    Args:
        img_size: the training input size; position embeddings are made for it and interpolated
            on the fly for other sizes.
        global_pool: ``"avg"`` (mean of patch tokens + ``fc_norm``, the official MAE fine-tuning
            head), ``"token"`` (final ``norm`` + class token, linear probing) or ``""`` (features only,
            final ``norm`` kept).
        class_token: whether a class token is prepended (dense backbones with window attention
            drop it, as ViTDet does).
        window_size: > 0 turns on window attention in every block not listed in ``global_blocks``.
        use_rel_pos: decomposed relative position bias in every block (zero-initialised).
        fixed_pos_embed: 2-D sin-cos position embeddings that are not trained (MAE pretraining).
        grad_checkpointing: recompute block activations in backward to save memory.
        pos_embed_img_size: the image size the absolute position table is made for (default
            ``img_size``). Dense backbones keep the 224 px pretraining table and resize it to the
            input's token grid at every forward (ViTDet's ``pretrain_img_size``), while the
            relative position tables follow ``img_size``.
        pos_embed_class_row: whether ``pos_embed`` stores a class-token row (default: when there
            is a class token). ViTDet keeps the pretraining class row, unused, so pretrained and
            detectron2 checkpoints load with their own shapes (``pretrain_use_cls_token``).
        rel_pos_type: ``"decomposed"`` (ViTDet's ``rel_pos_h/w``) or ``"table"`` (BEiT's per-head
            ``relative_position_bias_table``, mmsegmentation's MAE segmentation backbone); see
            :class:`Attention`.
        layer_scale: initial value of the per-block ``gamma_1`` / ``gamma_2`` scales of the two
            branches (None: no layer scale).
        reg_tokens: register tokens (``reg_token``, DINOv2 with registers; timm's semantics): learned
            tokens after the class token that get no position embedding; pooling skips them.
        abs_pos_embed: whether there is an absolute position table ``pos_embed`` (False: BEiT, whose
            blocks have relative position tables only).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        class_token: bool = True,
        window_size: int = 0,
        global_blocks: Sequence[int] = (),
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        fixed_pos_embed: bool = False,
        grad_checkpointing: bool = False,
        head_drop: float = 0.0,
        pos_embed_img_size: int | tuple[int, int] | None = None,
        pos_embed_class_row: bool | None = None,
        rel_pos_type: str = "decomposed",
        layer_scale: float | None = None,
        reg_tokens: int = 0,
        abs_pos_embed: bool = True,
    ):
        super().__init__()
        if global_pool not in ("avg", "token", ""):
            raise ValueError(f"global_pool must be 'avg', 'token' or '', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        self.img_size = _pair(img_size)
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.num_reg_tokens = int(reg_tokens)
        if self.num_reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")
        if self.num_reg_tokens and window_size > 0:
            raise ValueError("register tokens need global attention (window attention takes no prefix tokens)")
        if fixed_pos_embed and not abs_pos_embed:
            raise ValueError("fixed_pos_embed needs an absolute position table (abs_pos_embed=True)")
        # Prefix tokens: the class token, then the register tokens (only the class token has a pos_embed row).
        self.num_prefix_tokens = (1 if class_token else 0) + self.num_reg_tokens
        self.grad_checkpointing = grad_checkpointing
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.global_blocks = tuple(sorted(set(int(i) for i in global_blocks)))
        for i in self.global_blocks:
            if not 0 <= i < depth:
                raise ValueError(f"global block index {i} is outside 0..{depth - 1}")

        pos_size = self.img_size if pos_embed_img_size is None else _pair(pos_embed_img_size)
        self.pos_embed_grid = (pos_size[0] // patch_size, pos_size[1] // patch_size)
        self.pos_embed_prefix = (
            self._num_class_tokens if pos_embed_class_row is None else int(bool(pos_embed_class_row))
        )
        if self.pos_embed_prefix < self._num_class_tokens:
            raise ValueError("a class token needs a class row in pos_embed (pos_embed_class_row=True)")

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, self.num_reg_tokens, embed_dim)) if self.num_reg_tokens else None
        num_pos = self.pos_embed_prefix + self.pos_embed_grid[0] * self.pos_embed_grid[1]
        if abs_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim), requires_grad=not fixed_pos_embed)
        else:
            self.register_parameter("pos_embed", None)
        self.fixed_pos_embed = fixed_pos_embed

        # Stochastic depth grows linearly with depth (computed in Python: works under a meta device).
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            [
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    drop_path=dpr[i],
                    norm_eps=norm_eps,
                    window_size=0 if (window_size <= 0 or i in self.global_blocks) else window_size,
                    use_rel_pos=use_rel_pos,
                    rel_pos_size=self.grid_size,
                    rel_pos_zero_init=rel_pos_zero_init,
                    rel_pos_type=rel_pos_type,
                    layer_scale=layer_scale,
                )
                for i in range(depth)
            ]
        )
        # The official fine-tuning model replaces the final norm by fc_norm after pooling; keeping
        # the unused one as Identity keeps state-dict names equal to the official ones.
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Random initialisation as in MAE pretraining (also the from-scratch baseline)."""
        if self.fixed_pos_embed:
            table = sincos_2d(self.embed_dim, self.pos_embed_grid, self.pos_embed_prefix)
            self.pos_embed.data.copy_(table.unsqueeze(0))
        elif self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)  # timm
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear on flattened patches
        nn.init.zeros_(self.patch_embed.proj.bias)
        for name, module in self.named_modules():
            if module is self:
                continue
            init_transformer_weights(module)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)  # official fine-tuning head init
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that the official recipes exclude from weight decay."""
        return {"pos_embed", "cls_token"} | ({"reg_token"} if self.reg_token is not None else set())

    @property
    def _num_class_tokens(self) -> int:
        return self.num_prefix_tokens - self.num_reg_tokens

    # ---------------------------------------------------------------- fitting a released checkpoint
    # A released backbone may need parts the task's ViT was built without (BEiT's relative position
    # tables, layer scale and no absolute table, DINOv2's layer scale and registers): these add them
    # before its weights are loaded (mae_transfer.checkpoint.loading fits the model to the file).
    def add_layer_scale(self, value: float = 1.0) -> int:
        """Give every block without layer scale ``gamma_1`` / ``gamma_2`` (filled with ``value``);
        returns the number of blocks changed."""
        changed = [blk for blk in self.blocks if blk.gamma_1 is None]
        for blk in changed:
            blk.add_layer_scale(value)
        return len(changed)

    def add_rel_pos_tables(self, table_grid: tuple[int, int]) -> int:
        """Give every global-attention block without relative positions BEiT's per-head bias table
        made for ``table_grid`` (zero-initialised); returns the number of blocks changed."""
        changed = [blk for blk in self.blocks if blk.window_size <= 0 and not blk.attn.use_rel_pos]
        for blk in changed:
            blk.attn.add_rel_pos_table(table_grid)
        return len(changed)

    def remove_abs_pos_embed(self) -> None:
        """Drop the absolute position table (BEiT: relative position tables only)."""
        if self.fixed_pos_embed:
            raise ValueError("a fixed sin-cos position table cannot be removed")
        self.pos_embed = None

    def add_reg_tokens(self, n: int) -> None:
        """Add ``n`` register tokens (``reg_token``) to a ViT built without them."""
        if self.num_reg_tokens:
            raise ValueError(f"this ViT already has {self.num_reg_tokens} register tokens")
        if any(blk.window_size > 0 for blk in self.blocks):
            raise ValueError("register tokens need global attention (window attention takes no prefix tokens)")
        w = self.patch_embed.proj.weight
        self.reg_token = nn.Parameter(torch.zeros(1, int(n), self.embed_dim, device=w.device, dtype=w.dtype))
        nn.init.normal_(self.reg_token, std=1e-6)
        self.num_reg_tokens = int(n)
        self.num_prefix_tokens += int(n)

    # ---------------------------------------------------------------- the backbone contract
    # What the rest of the toolkit asks of a backbone (timm's idea of ``group_matcher`` and
    # ``feature_info``): ``forward_intermediates`` for pyramids, ``feature_info`` to describe its
    # outputs and ``layer_id`` for layer-wise lr decay (engine.optim.param_groups finds the backbone
    # inside a task's model by this method, not by parameter-name prefixes).
    def layer_id(self, name: str) -> int:
        """Depth index of the parameter ``name`` (relative to this module) for layer-wise lr decay:
        the embeddings (``cls_token``, ``reg_token``, ``pos_embed``, ``mask_token``, ``patch_embed.*``) are layer 0,
        ``blocks.i.*`` is layer i + 1, everything else (final norm, head, decoder) depth + 1: the rule
        of the official MAE fine-tuning code (util/lr_decay.py), detectron2's
        ``get_vit_lr_decay_rate`` and mmsegmentation's ``LearningRateDecayOptimizerConstructor``."""
        if name in ("cls_token", "pos_embed", "mask_token", "reg_token") or name.startswith("patch_embed."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    @property
    def num_layer_ids(self) -> int:
        """The number of distinct ``layer_id`` values (depth + 2)."""
        return self.depth + 2

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per block output that ``forward_intermediates`` can return: its module name,
        channels and stride (reduction) relative to the input."""
        return [
            {"module": f"blocks.{i}", "num_chs": self.embed_dim, "reduction": self.patch_size}
            for i in range(self.depth)
        ]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for ``num_classes`` outputs (0 = no head)."""
        self.num_classes = num_classes
        device = self.patch_embed.proj.weight.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ forward pieces
    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """Position embeddings (1, class + h*w, D) for a token grid, interpolated when needed (None
        without an absolute table). Register tokens have no row.

        The table is resized (bicubic, ``align_corners=False``) at every call whose grid differs
        from the table's, which is how ViTDet uses its 14x14 pretraining table at any input size.
        """
        if self.pos_embed is None:
            return None
        n_cls = self._num_class_tokens
        if tuple(grid) == self.pos_embed_grid and self.pos_embed_prefix == n_cls:
            return self.pos_embed
        return resize_pos_embed(
            self.pos_embed,
            grid,
            self.pos_embed_prefix,
            old_grid=self.pos_embed_grid,
            new_prefix_tokens=n_cls,
        )

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> tokens (B, prefix + h*w, D) with position embeddings, and the grid.

        Token order: class token, register tokens, patches (timm's); the register tokens get no
        position embedding."""
        x, grid = self.patch_embed(x)
        pos = self.pos_embed_for(grid)
        n_cls = self._num_class_tokens
        if pos is not None:
            x = x + pos[:, n_cls:]
        prefix = []
        if self.cls_token is not None:
            cls = self.cls_token if pos is None else self.cls_token + pos[:, :1]
            prefix.append(cls.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        return x, grid

    def run_block(self, i: int, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        blk = self.blocks[i]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, grid, self.num_prefix_tokens, use_reentrant=False)
        return blk(x, grid, self.num_prefix_tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens after the last block and final norm, (B, prefix + h*w, D)."""
        x, grid = self.embed(x)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, grid)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool tokens (B, T, D) -> (B, D) features, or logits (B, num_classes)."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        else:
            return x
        x = self.fc_norm(x)
        if pre_logits:
            return x
        return self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes) (or pooled features when there is no head)."""
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
        """Outputs of chosen blocks, for pyramid adapters and feature probes.

        Args:
            indices: block indices (0-based, negatives count from the end), or an int n for the
                last n blocks; None = every block.
            output_fmt: ``"NCHW"`` -> (B, D, h, w) maps of the patch tokens, ``"NLC"`` -> (B, h*w, D).
            norm: apply the final ``norm`` to each output.
            return_prefix_tokens: also return the class tokens (B, prefix, D) of each output.
            stop_early: skip the blocks after the last requested one.
        """
        depth = len(self.blocks)
        if indices is None:
            wanted = list(range(depth))
        elif isinstance(indices, int):
            wanted = list(range(depth - indices, depth))
        else:
            wanted = [i % depth if -depth <= i < depth else i for i in indices]
        for i in wanted:
            if not 0 <= i < depth:
                raise ValueError(f"block index {i} is outside 0..{depth - 1}")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        b = x.shape[0]
        x, grid = self.embed(x)
        last = max(wanted) if (stop_early and wanted) else depth - 1
        feats, prefixes = [], []
        wanted_set = set(wanted)
        for i in range(last + 1):
            x = self.run_block(i, x, grid)
            if i in wanted_set:
                y = self.norm(x) if norm else x
                prefixes.append(y[:, : self.num_prefix_tokens])
                y = y[:, self.num_prefix_tokens :]
                if output_fmt == "NCHW":
                    y = y.transpose(1, 2).reshape(b, -1, grid[0], grid[1])
                feats.append(y)
        order = {i: n for n, i in enumerate(sorted(wanted_set))}
        feats = [feats[order[i]] for i in wanted]
        prefixes = [prefixes[order[i]] for i in wanted]
        return (feats, prefixes) if return_prefix_tokens else feats


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int


# Widths/depths/heads of the standard ViT sizes (ViT paper Table 1; DeiT for tiny/small; MAE-repo
# models_vit.py for base/large/huge, huge with patch 14).
VIT_SIZES: dict[str, ViTSize] = {
    "vit_tiny_patch16": ViTSize(192, 12, 3, 16),
    "vit_small_patch16": ViTSize(384, 12, 6, 16),
    "vit_base_patch16": ViTSize(768, 12, 12, 16),
    "vit_large_patch16": ViTSize(1024, 24, 16, 16),
    "vit_huge_patch14": ViTSize(1280, 32, 16, 14),
    "vit_huge_patch16": ViTSize(1280, 32, 16, 16),
    # Very small models for tests and CPU demos.
    "vit_micro_patch8": ViTSize(96, 4, 4, 8),
    "vit_nano_patch8": ViTSize(64, 2, 4, 8),
    # Sizes of released baselines: DINOv2 (patch 14), DINO (patch 8), MoCo v3's ViT-S (12 heads, not 6).
    "vit_small_patch14": ViTSize(384, 12, 6, 14),
    "vit_base_patch14": ViTSize(768, 12, 12, 14),
    "vit_large_patch14": ViTSize(1024, 24, 16, 14),
    "vit_small_patch8": ViTSize(384, 12, 6, 8),
    "vit_base_patch8": ViTSize(768, 12, 12, 8),
    "vit_small_patch16_h12": ViTSize(384, 12, 12, 16),
}


SIZE_FIELDS = ("embed_dim", "depth", "num_heads", "patch_size")


def vit_size(name: str | None, **explicit: int | None) -> dict[str, int]:
    """``embed_dim``, ``depth``, ``num_heads`` and ``patch_size`` of the size ``name``, each overridden
    by an explicit value; with ``name=None`` all four must be given (a ViT of no standard size, e.g.
    one read from a checkpoint). Raises ValueError for an unknown name or a missing value."""
    if name is not None and name not in VIT_SIZES:
        raise ValueError(f"unknown ViT {name!r}; choose one of: {', '.join(VIT_SIZES)}")
    size = dict(VIT_SIZES[name].__dict__) if name is not None else {}
    size.update({k: int(v) for k, v in explicit.items() if k in SIZE_FIELDS and v is not None})
    missing = [k for k in SIZE_FIELDS if k not in size]
    if missing:
        raise ValueError(f"a ViT without a size name needs {', '.join(missing)}")
    return size


def named_size(embed_dim: int, depth: int, num_heads: int, patch_size: int) -> str | None:
    """The ``VIT_SIZES`` name of exactly this size, or None."""
    for name, s in VIT_SIZES.items():
        if (s.embed_dim, s.depth, s.num_heads, s.patch_size) == (embed_dim, depth, num_heads, patch_size):
            return name
    return None


def vit_size_label(name: str | None, **explicit: int | None) -> str:
    """``name`` when the explicit sizes agree with it, else ``vit_<width>x<depth>_patch<p>``."""
    given = {k: v for k, v in explicit.items() if k in SIZE_FIELDS and v is not None}
    base = VIT_SIZES.get(name) if name else None
    if base is not None and all(getattr(base, k) == v for k, v in given.items()):
        return name
    size = {**(base.__dict__ if base is not None else {}), **given}
    return f"vit_{size.get('embed_dim')}x{size.get('depth')}_patch{size.get('patch_size')}"


def create_vit(name: str, **kwargs) -> VisionTransformer:
    """Build a ViT by size name (see ``VIT_SIZES``); keyword arguments override the defaults."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown ViT {name!r}; choose one of: {', '.join(VIT_SIZES)}")
    s = VIT_SIZES[name]
    cfg = dict(embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads, patch_size=s.patch_size)
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


def vit_flops_per_image(embed_dim: int, depth: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs (2 x multiply-adds) of ``depth`` Transformer blocks on ``tokens`` tokens.

    Per block: qkv + proj = 4 N D^2 MACs, attention scores + weighted sum = 2 N^2 D MACs,
    MLP = 2 N D^2 mlp_ratio MACs.
    """
    n, d = tokens, embed_dim
    macs = depth * (4 * n * d * d + 2 * n * n * d + 2 * mlp_ratio * n * d * d)
    return 2.0 * macs


__all__ = [
    "PatchEmbed",
    "Attention",
    "Block",
    "VisionTransformer",
    "VIT_SIZES",
    "create_vit",
    "named_size",
    "vit_size",
    "vit_size_label",
    "decomposed_rel_pos_bias",
    "relative_position_index",
    "resize_relative_position_table",
    "init_transformer_weights",
    "vit_flops_per_image",
    "window_partition",
    "window_unpartition",
]
