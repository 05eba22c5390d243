"""A Hugging Face ``ViTMAEModel`` folder from an encoder: the Hub's names (:mod:`.hf`) with the
encoder checks and model arguments of the timm writer (:mod:`.timm`)."""

from __future__ import annotations

from pathlib import Path

from mae_transfer.checkpoint.errors import CheckpointError
from mae_transfer.checkpoint.hf import vit_to_hf
from mae_transfer.checkpoint.io import save_model_folder
from mae_transfer.checkpoint.timm import complete_encoder, encoder_state_dict, timm_model_args


def export_hf(state, out_dir, num_heads: int | None = None):
    """Write a folder ``transformers.ViTMAEModel.from_pretrained`` opens: ``model.safetensors`` in the
    Hub's names and ``config.json`` (model_type ``vit_mae``, ``mask_ratio`` 0.0 so that every patch is
    encoded). Each file atomically; read back and checked bit for bit. An incomplete encoder, and
    tensors ViTMAEModel has no place for (a classifier head, ``fc_norm``), are refused.

    ViTMAEModel still orders the tokens by its ``noise`` argument (random by default): pass
    ``noise=torch.arange(num_patches).expand(batch, -1)`` to keep the image order; the class token
    and any pooled feature do not depend on it."""
    out = Path(out_dir)
    enc = encoder_state_dict(state, out, "hf")  # a classifier head is refused: it would be lost
    if "norm.weight" not in enc:
        raise CheckpointError(
            f"cannot write {out}: ViTMAEModel normalises every token (final norm), this encoder only pools "
            "through fc_norm; export a pretraining encoder (export --to mae / the run's encoder.pth)"
        )
    _, args = timm_model_args(enc, num_heads, out)
    complete_encoder(enc, args, 0, out)  # every tensor of the encoder, nothing it would lose
    hf = vit_to_hf(enc)
    config = {
        "architectures": ["ViTMAEModel"],
        "model_type": "vit_mae",
        "hidden_size": args["embed_dim"],
        "num_hidden_layers": args["depth"],
        "num_attention_heads": args["num_heads"],
        "intermediate_size": int(args["embed_dim"] * args["mlp_ratio"]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": args["img_size"],
        "patch_size": args["patch_size"],
        "num_channels": 3,
        "qkv_bias": args["qkv_bias"],
        "mask_ratio": 0.0,
        "norm_pix_loss": False,
        "torch_dtype": "float32",
    }
    return save_model_folder(out, hf, config)


__all__ = ["export_hf"]
