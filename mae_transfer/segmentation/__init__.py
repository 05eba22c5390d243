"""Semantic segmentation transfer: UperNet on ViT pyramids, ADE20K data and metrics."""
