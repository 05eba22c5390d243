"""Position embeddings: fixed 2-D sin-cos tables and resizing of learned tables.

The sin-cos layout follows the official MAE code (MAE-repo `util/pos_embed.py`): the first half of
the channels encodes the column (x) coordinate and the second half the row (y) coordinate, each as
``[sin(pos * omega), cos(pos * omega)]`` with ``omega = 1 / 10000 ** (k / (D / 4))``. Keeping the
same layout means a table we build equals the one stored in released checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding. positions: (M,) -> (M, embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.double().reshape(-1)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """2-D sin-cos table of shape (num_prefix_tokens + H*W, embed_dim), prefix rows zero.

    Tokens are in row-major (raster) order, as produced by ``patch_embed`` + ``flatten(2)``.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if num_prefix_tokens:
        emb = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
    new_prefix_tokens: int | None = None,
) -> torch.Tensor:
    """Resize a (1, prefix + H*W, D) table to ``new_grid`` with bicubic interpolation.

    The grid part is treated as an image and resized (bicubic, align_corners=False, as in the
    official fine-tuning code); prefix (class-token) rows are kept, or dropped/added as zeros when
    ``new_prefix_tokens`` differs from ``num_prefix_tokens``.
    """
    new_prefix = num_prefix_tokens if new_prefix_tokens is None else new_prefix_tokens
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid.shape[1]
    if old_grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"cannot infer a square grid from {n} position embeddings; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) != tuple(new_grid):
        dim = grid.shape[-1]
        orig_dtype = grid.dtype
        grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(orig_dtype)
    if new_prefix < num_prefix_tokens:
        prefix = prefix[:, :new_prefix]
    elif new_prefix > num_prefix_tokens:
        pad = prefix.new_zeros(1, new_prefix - num_prefix_tokens, grid.shape[-1])
        prefix = torch.cat([prefix, pad], dim=1)
    return torch.cat([prefix, grid], dim=1)
