"""Pictures of MAE reconstructions, to see what pretraining has learned.

One PNG, one row per image, four columns (as in the MAE paper's Figure 2/3):

    original | masked | reconstruction | reconstruction + visible

- masked: the input with the removed patches painted mid-grey (what the encoder sees);
- reconstruction: the decoder's prediction for every patch, visible ones included;
- reconstruction + visible: the original's visible patches with predicted masked patches.

Only PIL and numpy are used. Small images are upscaled by an integer factor with nearest-neighbour
so that the patch grid stays sharp.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mae_transfer.data.stats import IMAGENET_MEAN, IMAGENET_STD
from mae_transfer.io import atomic_write
from mae_transfer.pretrain.model import MaskedAutoencoderViT

log = logging.getLogger(__name__)

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
MASK_GREY = 0.5  # fill of removed patches in the "masked" column, in [0, 1] pixel units
MIN_CELL = 128  # smallest cell side in pixels after upscaling
PAD = 4
HEADER_H = 18
TITLE_H = 18
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class GridLayout:
    """Where things go in the PNG (pixels). Cells are ``cell_h`` x ``cell_w``, ``pad`` apart."""

    rows: int
    cols: int
    cell_h: int
    cell_w: int
    scale: int
    top: int  # height of the title + column-title band above the first row

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole picture."""
        width = self.cols * self.cell_w + (self.cols + 1) * PAD
        height = self.top + self.rows * self.cell_h + (self.rows + 1) * PAD
        return width, height

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, upper, right, lower) of a cell, as ``PIL.Image.crop`` takes it."""
        left = PAD + col * (self.cell_w + PAD)
        upper = self.top + PAD + row * (self.cell_h + PAD)
        return left, upper, left + self.cell_w, upper + self.cell_h


def grid_layout(num_images: int, img_hw: tuple[int, int], title: str | None = None) -> GridLayout:
    """The layout :func:`save_reconstruction_grid` uses for ``num_images`` images of size ``img_hw``."""
    h, w = img_hw
    scale = max(1, math.ceil(MIN_CELL / min(h, w)))
    top = HEADER_H + (TITLE_H if title else 0)
    return GridLayout(rows=num_images, cols=len(COLUMNS), cell_h=h * scale, cell_w=w * scale, scale=scale, top=top)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def reconstruction_panels(
    model: MaskedAutoencoderViT, images: torch.Tensor, noise: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Run the model in eval mode and return the pictures, in the images' normalisation.

    images: (B, C, H, W) normalised; noise: (B, L) masking noise or None (random masking).
    Returns fp32 CPU tensors: ``original``, ``reconstruction``, ``pasted`` (visible original +
    predicted masked patches), all (B, C, H, W), and ``mask`` (B, 1, H, W) with 1 on removed pixels.
    """
    device, dtype = _model_device_dtype(model)
    imgs = images.to(device=device, dtype=dtype)
    if noise is not None:
        noise = noise.to(device)
    with _eval_mode(model):
        out = model(imgs, noise=noise)
        # reconstruct() undoes norm_pix_loss with each true patch's statistics.
        pred = model.reconstruct(imgs, out.pred).float()
        p2 = model.patch_size**2
        mask = model.unpatchify(out.mask.float().unsqueeze(-1).expand(-1, -1, p2 * model.in_chans))[:, :1]
    original = imgs.float()
    pasted = original * (1 - mask) + pred * mask
    return {"original": original.cpu(), "reconstruction": pred.cpu(), "pasted": pasted.cpu(), "mask": mask.cpu()}


@torch.no_grad()
def reconstruction_error(model: MaskedAutoencoderViT, images: torch.Tensor, noise: torch.Tensor | None = None) -> float:
    """Mean squared error over the masked patches' pixels, in the images' normalisation.

    Unlike the training loss this is in pixel units also for ``norm_pix_loss`` models (the
    prediction is mapped back first), so it compares across models and over training. Pass a fixed
    ``noise`` (B, L) to compare on the same masks; eval mode, restored afterwards.
    """
    panels = reconstruction_panels(model, images, noise)
    mask = panels["mask"]
    sq = (panels["reconstruction"] - panels["original"]) ** 2  # (B, C, H, W)
    denom = mask.sum() * sq.shape[1]
    if denom == 0:
        return 0.0
    return float((sq * mask).sum() / denom)


def _to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, C, H, W) normalised -> (B, H, W, 3) uint8, un-normalised and clamped to [0, 1]."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, cut with an ellipsis so that it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_reconstruction_grid(
    model: MaskedAutoencoderViT,
    images: torch.Tensor,
    path: str | os.PathLike,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    noise: torch.Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Write one PNG of reconstructions (see the module docstring for the columns).

    images: (B, C, H, W) normalised with ``mean``/``std``; noise: (B, L) masking noise (pass the
    same noise every epoch to watch the same masks improve). The model runs on its own device in
    eval mode under no_grad; its train/eval mode is restored. The file is written atomically.
    Returns the path. Layout: :func:`grid_layout`.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(f"mean/std need {images.shape[1]} values, got {len(mean)} and {len(std)}")
    panels = reconstruction_panels(model, images, noise)
    mean = [float(v) for v in mean]
    std = [float(v) for v in std]
    original = _to_uint8(panels["original"], mean, std)
    recon = _to_uint8(panels["reconstruction"], mean, std)
    pasted = _to_uint8(panels["pasted"], mean, std)
    removed = panels["mask"][:, 0].numpy().astype(bool)  # (B, H, W)
    masked = original.copy()
    masked[removed] = round(MASK_GREY * 255)

    b, h, w = removed.shape
    layout = grid_layout(b, (h, w), title)
    canvas = np.empty((layout.size[1], layout.size[0], 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for row in range(b):
        for col, cell in enumerate((original[row], masked[row], recon[row], pasted[row])):
            if layout.scale > 1:
                cell = cell.repeat(layout.scale, axis=0).repeat(layout.scale, axis=1)
            left, upper, right, lower = layout.cell_box(row, col)
            canvas[upper:lower, left:right] = cell

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    y = 2
    if title:
        draw.text((PAD, y), _fit_text(draw, title, font, layout.size[0] - 2 * PAD), fill=(0, 0, 0), font=font)
        y += TITLE_H
    for col, name in enumerate(COLUMNS):
        left = layout.cell_box(0, col)[0]
        label = _fit_text(draw, name, font, layout.cell_w)
        draw.text((left, y), label, fill=(0, 0, 0), font=font)

    path = Path(path)
    with atomic_write(path, "wb") as f:
        picture.save(f, format="PNG")
    log.debug("reconstruction grid (%d images) written to %s", b, path)
    return path


__all__ = [
    "COLUMNS",
    "GridLayout",
    "grid_layout",
    "reconstruction_error",
    "reconstruction_panels",
    "save_reconstruction_grid",
]
