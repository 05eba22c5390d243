"""The Masked Autoencoder (He et al., CVPR 2022): asymmetric ViT encoder + lightweight decoder.

The encoder is :class:`mae_transfer.models.vit.VisionTransformer` itself (this class extends it),
so encoder parameters carry exactly the official names and an exported encoder loads into every
transfer task. Decoder names (``mask_token``, ``decoder_embed``, ``decoder_pos_embed``,
``decoder_blocks``, ``decoder_norm``, ``decoder_pred``) are the official ones too, so the released
"full" checkpoints load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mae_transfer.models.pos_embed import sincos_2d
from mae_transfer.models.vit import VIT_SIZES, Block, VisionTransformer, init_transformer_weights


@dataclass
class MAEOutput:
    """What one MAE forward pass returns.

    loss: scalar, MSE over masked patches only.
    pred: (B, L, p*p*C) decoder prediction per patch, patchified in (p, q, c) order.
    mask: (B, L), 1 = masked (loss counted), 0 = visible, in the original patch order.
    ids_restore: (B, L) permutation that puts the shuffled tokens back in order.
    latent: (B, 1 + L_keep, D) encoder output (class token + visible tokens, after ``norm``).
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor
    latent: torch.Tensor


class MaskedAutoencoderViT(VisionTransformer):
    """MAE with a ViT encoder that sees only the visible patches.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_eps: encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder (paper default 512 x 8, 16
            heads; MAE paper Table 1a/1b).
        mask_ratio: fraction of patches removed (paper default 0.75, Table 1 / Figure 5).
        norm_pix_loss: regress per-patch normalised pixels (Table 1d; used by released models).
    """

    # Model names of MAEs are "mae_" + the encoder's size name (MAE_PRESETS): used in messages.
    size_name_prefix = "mae_"

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            norm_eps=norm_eps,
            class_token=True,
            fixed_pos_embed=True,
            grad_checkpointing=grad_checkpointing,
        )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_eps=norm_eps)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_embed.out_features, self.grid_size, 1).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_norm, self.decoder_pred, *self.decoder_blocks.modules()]:
            init_transformer_weights(m)

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), each patch flattened in (row, column, channel) order."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # b, h', w', p, q, c
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W), the inverse of :meth:`patchify` on this model's grid."""
        p = self.patch_size
        gh, gw = self.grid_size
        b = x.shape[0]
        x = x.reshape(b, gh, gw, p, p, self.in_chans).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, self.in_chans, gh * p, gw * p)

    # ------------------------------------------------------------------ masking
    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by sorting uniform noise; low noise = kept.

        x: (B, L, D); noise: (B, L) or None (drawn here). Returns the visible tokens
        (B, L_keep, D), the mask (B, L; 1 = removed) and ids_restore (B, L).
        """
        b, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(b, length, device=x.device)
        elif noise.shape != (b, length):
            raise ValueError(f"masking noise must have shape {(b, length)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, length, device=x.device, dtype=x.dtype)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return visible, mask, ids_restore

    # ------------------------------------------------------------------ encoder / decoder
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (B, C, H, W) -> latent (B, 1 + L_keep, D), mask (B, L), ids_restore (B, L)."""
        x, grid = self.patch_embed(imgs)
        if grid != self.grid_size:
            raise ValueError(f"MAE was built for {self.img_size} inputs, got {tuple(imgs.shape[-2:])}")
        x = x + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for i in range(len(self.blocks)):
            # Visible tokens are no grid: blocks here run global attention without a grid size.
            x = self.run_block(i, x, None)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + L_keep, D) -> per-patch prediction (B, L, p*p*C)."""
        x = self.decoder_embed(latent)
        b, n, d = x.shape
        length = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(b, length + 1 - n, -1).to(x.dtype)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Regression target (B, L, p*p*C): pixels, or per-patch normalised pixels."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        loss = (pred.float() - self.target(imgs.float())) ** 2
        loss = loss.mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> MAEOutput:
        """imgs (B, C, H, W) normalised images; noise (B, L) optional masking noise."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return MAEOutput(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore, latent=latent)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predicted images (B, C, H, W) in the input's normalisation.

        With ``norm_pix_loss`` the prediction is in per-patch normalised units; it is mapped back
        with the mean and variance of each true patch, as people do to look at MAE outputs.
        """
        pred = pred.float()
        if self.norm_pix_loss:
            target = self.patchify(imgs.float())
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        return self.unpatchify(pred)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's parameters under the official names (no ``mask_token``, ``decoder_*``)."""
        return {k: v for k, v in self.state_dict().items() if not (k.startswith("decoder_") or k == "mask_token")}

    def flops_per_image(self) -> dict[str, float]:
        """Analytic forward FLOPs per image (2 x MACs) of the Transformer parts.

        The encoder runs on 1 + L_keep tokens, the decoder on 1 + L tokens; patch embedding,
        decoder embedding and prediction layers are added. A training step costs about 3x this.
        """
        from mae_transfer.models.vit import vit_flops_per_image

        length = self.grid_size[0] * self.grid_size[1]
        keep = int(length * (1 - self.mask_ratio))
        d = self.embed_dim
        dd = self.decoder_embed.out_features
        p2c = self.patch_size**2 * self.in_chans
        # Patch embedding runs on all L patches (masking comes after it); the prediction layer also
        # runs on the class token, which is dropped afterwards.
        enc = vit_flops_per_image(d, len(self.blocks), 1 + keep) + 2 * length * p2c * d
        dec = vit_flops_per_image(dd, len(self.decoder_blocks), 1 + length)
        dec += 2 * (1 + keep) * d * dd + 2 * (1 + length) * dd * p2c
        return {"encoder": enc, "decoder": dec, "forward": enc + dec, "train_step": 3 * (enc + dec)}


# The paper's models (MAE paper section 3 / A.1; MAE-repo models_mae.py) and small ones for tests
# and CPU demos.
MAE_PRESETS: dict[str, dict] = {
    "mae_vit_base_patch16": dict(
        encoder="vit_base_patch16", img_size=224, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16
    ),
    "mae_vit_large_patch16": dict(
        encoder="vit_large_patch16", img_size=224, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16
    ),
    "mae_vit_huge_patch14": dict(
        encoder="vit_huge_patch14", img_size=224, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16
    ),
    "mae_vit_tiny_patch16": dict(
        encoder="vit_tiny_patch16", img_size=224, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4
    ),
    "mae_vit_micro_patch8": dict(
        encoder="vit_micro_patch8", img_size=64, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4
    ),
    "mae_vit_nano_patch8": dict(
        encoder="vit_nano_patch8", img_size=32, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2
    ),
}


def create_mae(name: str, **overrides) -> MaskedAutoencoderViT:
    """Build an MAE by preset name (``MAE_PRESETS``); keyword arguments override the preset."""
    if name not in MAE_PRESETS:
        raise ValueError(f"unknown MAE model {name!r}; choose one of: {', '.join(MAE_PRESETS)}")
    cfg = dict(MAE_PRESETS[name])
    size = VIT_SIZES[cfg.pop("encoder")]
    kwargs = dict(embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads, patch_size=size.patch_size)
    kwargs.update(cfg)
    kwargs.update(overrides)
    return MaskedAutoencoderViT(**kwargs)


def encoder_name_for(mae_name: str) -> str:
    """The ViT size name of an MAE preset's encoder, e.g. ``vit_base_patch16``."""
    return MAE_PRESETS[mae_name]["encoder"]
