"""Normalisation statistics shared by every task."""

# ImageNet channel mean / std used by the official MAE data pipelines (and by timm).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
