"""mae-transfer: pretrain Masked Autoencoder ViT backbones and measure how well they transfer."""

__version__ = "0.1.0"
