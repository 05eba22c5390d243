"""Backbones shared by every task: the ViT and its position embeddings."""

from mae_transfer.models.vit import VIT_SIZES, Block, VisionTransformer, create_vit

__all__ = ["VIT_SIZES", "Block", "VisionTransformer", "create_vit"]
