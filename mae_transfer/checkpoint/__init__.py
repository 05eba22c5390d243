"""Checkpoints: our training checkpoints, and every foreign format the toolkit reads or writes.

This package is the only place that knows foreign parameter names, one module per format with its
reader and writer side by side:

* :mod:`.io`: atomic saves, safe loading (``weights_only``), reading every file form;
* :mod:`.checks`: what every reader and writer checks: floating-point weights, complete models;
* :mod:`.formats`: which format a checkpoint is in, its ViT in our names, its architecture;
* :mod:`.hf`, :mod:`.timm`, :mod:`.mmseg`, :mod:`.detectron2`, :mod:`.mae`: Hugging Face (read and
  ViTMAEModel export), timm (model folder export), mmsegmentation / mmpretrain (whole segmentors
  too), detectron2 ViTDet (whole detectors too), the official MAE release (the encoder export);
* :mod:`.hub`: weights by name (``hf-hub:ORG/NAME``, ``timm:ARCH.TAG``) through the Hugging Face cache;
* :mod:`.describe`: what a backbone file holds (size name, image size), read once per process;
* :mod:`.loading`: pretrained weights into a ViT with shape adaptation and a report of every key;
* :mod:`.trained`: trained task models with their config.
"""

from __future__ import annotations

from mae_transfer.checkpoint.checks import check_dtypes
from mae_transfer.checkpoint.describe import describe_checkpoint
from mae_transfer.checkpoint.formats import FORMATS, detect_format, infer_vit_config, to_vit_state_dict
from mae_transfer.checkpoint.hub import weights_sha256
from mae_transfer.checkpoint.io import CheckpointError, atomic_save, load_file, load_safely
from mae_transfer.checkpoint.loading import (
    EXPECTED_MISSING,
    EXPECTED_UNEXPECTED,
    LoadReport,
    init_backbone,
    load_backbone,
)
from mae_transfer.checkpoint.mae import export_mae_encoder
from mae_transfer.checkpoint.reading import read_checkpoint
from mae_transfer.checkpoint.trained import class_count_hint, load_trained_model, read_trained_model, save_trained_model

__all__ = [
    "EXPECTED_MISSING",
    "EXPECTED_UNEXPECTED",
    "check_dtypes",
    "class_count_hint",
    "describe_checkpoint",
    "FORMATS",
    "CheckpointError",
    "LoadReport",
    "atomic_save",
    "detect_format",
    "export_mae_encoder",
    "infer_vit_config",
    "init_backbone",
    "load_backbone",
    "load_file",
    "load_safely",
    "load_trained_model",
    "read_checkpoint",
    "read_trained_model",
    "save_trained_model",
    "to_vit_state_dict",
    "weights_sha256",
]
