"""Speed of UperNet-on-ViT training and sliding-window inference (images/s, memory, TFLOP/s).

A training step is what ``mae-transfer ade20k`` runs on a crop batch: the segmenter's forward
(decode and auxiliary heads), mmsegmentation's loss, backward, an AdamW step on the task's
layer-decay groups. The batch is synthetic, made on the device: ``img_size`` crops and label maps
of random classes (with ignored pixels). Inference is the evaluation's sliding-window pass over an
image of ``img_size`` x 4/3 ``img_size`` (ADE20K's typical 512 x 683 after the test resize).
"""

from __future__ import annotations

import logging

import torch

from mae_transfer.engine.bench import (
    autocast_for,
    bench_precision,
    benchmark_training,
    resolve_device,
    run_environment,
    tf32_enabled,
    time_steps,
)
from mae_transfer.segmentation.config import build_config
from mae_transfer.segmentation.model import slide_inference
from mae_transfer.segmentation.task import SegmentationTask, build_segmenter, segmentation_loss

log = logging.getLogger(__name__)


def run_segmentation_speed(
    preset: str = "upernet_vit_b",
    batch_size: int = 8,
    steps: int = 10,
    warmup: int = 3,
    device: str | None = None,
    precision: str = "auto",
    eval_steps: int | None = None,
) -> dict:
    """Time ``steps`` training steps after ``warmup`` and ``eval_steps`` sliding-window inferences."""
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    precision = bench_precision(precision, dev)
    cfg = build_config(preset)
    torch.manual_seed(0)
    net = build_segmenter(cfg).to(dev).train()
    size, classes = cfg.model.img_size, cfg.data.num_classes
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=g).to(dev)
    labels = torch.randint(0, classes, (batch_size, size, size), generator=g)
    labels[:, : size // 8] = 255  # some ignored pixels, as in real label maps
    labels = labels.to(dev)
    groups = [
        {k: v for k, v in grp.items() if k != "param_names"}
        for grp in SegmentationTask.param_groups(None, net, cfg.optim)
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr or 1e-4, fused=True if on_cuda else None)

    def forward_backward():
        with autocast_for(precision, dev):
            logits, aux = net(images)
        loss = segmentation_loss(logits.float(), labels) + cfg.model.aux_weight * segmentation_loss(aux.float(), labels)
        loss.backward()
        return loss

    with tf32_enabled(on_cuda):
        train = benchmark_training(forward_backward, opt, batch_size, steps, warmup, dev)
        net.eval()
        image = torch.randn(1, 3, size, size * 4 // 3, generator=g).to(dev)
        stride = cfg.test.stride

        def infer():
            with torch.no_grad(), autocast_for(precision, dev):
                slide_inference(net, image, classes, crop=size, stride=stride)

        evaluation = time_steps(infer, eval_steps or max(1, steps // 2), max(1, warmup // 2), dev)
    return {
        "workload": "segmentation",
        "preset": preset,
        "model": cfg.model.vit_label(),
        "img_size": size,
        "batch_size": batch_size,
        "precision": precision,
        **run_environment(dev),
        **{
            k: train[k]
            for k in (
                "images_per_s",
                "step_ms_median",
                "first_step_s",
                "peak_memory_gib",
                "memory_kind",
                "flops_per_image",
                "tflops",
                "attention_ops",
            )
        },
        "eval_images_per_s": (eval_steps or max(1, steps // 2)) / evaluation["wall_s"],
        "eval_image_size": [size, size * 4 // 3],
        "eval_peak_memory_gib": evaluation["peak_memory_gib"],
    }


__all__ = ["run_segmentation_speed"]
