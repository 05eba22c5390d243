"""Speed of ViT fine-tuning steps (images/s, memory, TFLOP/s) on synthetic on-device batches.

A step is what ``mae-transfer finetune`` runs: forward, cross-entropy, backward and an AdamW step
on the layer-decay groups (augmentation and mixup are data-side and not part of the model's speed).
"""

from __future__ import annotations

import logging

import torch

from mae_transfer.classification.config import build_config
from mae_transfer.classification.task import build_classifier
from mae_transfer.engine.bench import (
    autocast_for,
    bench_precision,
    benchmark_training,
    resolve_device,
    run_environment,
    tf32_enabled,
)
from mae_transfer.engine.optim import param_groups

log = logging.getLogger(__name__)


def run_finetune_speed(
    preset: str = "finetune_vit_base",
    batch_size: int = 128,
    steps: int = 10,
    warmup: int = 3,
    device: str | None = None,
    precision: str = "auto",
    num_classes: int = 1000,
    compile: bool = False,
) -> dict:
    """Time ``steps`` fine-tuning steps after ``warmup`` untimed ones."""
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    precision = bench_precision(precision, dev)
    cfg = build_config(preset)
    torch.manual_seed(0)
    net = build_classifier(cfg, num_classes).to(dev).train()
    size = cfg.model.img_size
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=g).to(dev)
    labels = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)
    groups = [
        {k: v for k, v in grp.items() if k != "param_names"}
        for grp in param_groups(
            net, cfg.optim.weight_decay, cfg.optim.layer_decay, no_weight_decay=net.no_weight_decay()
        )
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3, fused=True if on_cuda else None)
    runner = torch.compile(net) if compile else net

    def forward_backward(model=net):
        with autocast_for(precision, dev):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()

    with tf32_enabled(on_cuda):
        timed = benchmark_training(
            forward_backward,
            opt,
            batch_size,
            steps,
            warmup,
            dev,
            timed_forward_backward=lambda: forward_backward(runner),
        )
    return {
        "workload": "finetune",
        "preset": preset,
        "model": cfg.model.name,
        "img_size": size,
        "batch_size": batch_size,
        "precision": precision,
        "compile": compile,
        **run_environment(dev),
        **{
            k: timed[k]
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
    }


__all__ = ["run_finetune_speed"]
