"""Speed of Mask R-CNN training and inference on a ViT backbone (images/s and peak memory).

A training step is what ``mae-transfer coco`` runs: the detector's forward with targets (RPN,
box and mask losses, mask targets rasterised from polygons per RoI), backward, an AdamW step on
the task's ViTDet parameter groups and ``zero_grad``. The batch is synthetic: ``img_size`` square
uint8 images on the device and, for each, ``instances`` random boxes with rectangular polygons and
random labels (COCO averages about 7 instances an image). Inference is timed separately:
``model.eval()`` on the same images, one batch of ``eval_batch_size`` at a time, including
post-processing as the COCO evaluator runs it (masks pasted in their boxes and RLE-encoded).

Library code only logs; the CLI prints :func:`format_detection_speed`.
"""

from __future__ import annotations

import logging

import torch

from mae_transfer.detection.config import build_config
from mae_transfer.detection.masks import paste_masks_rle
from mae_transfer.detection.task import build_detector, detection_param_groups
from mae_transfer.engine.bench import (
    autocast_for,
    bench_precision,
    count_flops,
    resolve_device,
    run_environment,
    tf32_enabled,
    time_steps,
)
from mae_transfer.io import atomic_write_json

log = logging.getLogger(__name__)


def synthetic_batch(
    batch_size: int, img_size: int, instances: int, num_classes: int, device: torch.device, seed: int = 0
):
    """Random uint8 images and targets with ``instances`` boxes (8-50 % of the side) and polygons."""
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.randint(0, 256, (3, img_size, img_size), generator=g, dtype=torch.uint8))
        wh = (torch.rand(instances, 2, generator=g) * 0.42 + 0.08) * img_size
        xy = torch.rand(instances, 2, generator=g) * (img_size - wh)
        boxes = torch.cat([xy, xy + wh], 1).floor()
        segments = [[np.array([x1, y1, x2, y1, x2, y2, x1, y2], dtype=np.float64)] for x1, y1, x2, y2 in boxes.tolist()]
        labels = torch.randint(0, num_classes, (instances,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "segments": segments})
    images = [im.to(device) for im in images]
    return images, targets


def run_detection_speed(
    preset: str = "vitdet_mask_rcnn_b",
    batch_size: int = 4,
    steps: int = 10,
    warmup: int = 3,
    device: str | None = None,
    precision: str = "auto",
    grad_checkpointing: bool | None = None,
    img_size: int | None = None,
    instances: int = 8,
    eval_batch_size: int = 1,
    eval_steps: int | None = None,
    overrides: dict | None = None,
    json_path=None,
    seed: int = 0,
) -> dict:
    """Time ``steps`` training steps (after ``warmup``) and ``eval_steps`` inference batches."""
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, steps >= 1, warmup >= 0; got {batch_size}, {steps}, {warmup}")
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    precision = bench_precision(precision, dev)
    ov = dict(overrides or {})
    model_ov = dict(ov.get("model", {}))
    if grad_checkpointing is not None:
        model_ov["grad_checkpointing"] = grad_checkpointing
    if img_size is not None:
        model_ov["img_size"] = img_size
    ov["model"] = model_ov
    cfg = build_config(preset, ov)
    num_classes = 80  # COCO's categories (the background is implicit)
    torch.manual_seed(seed)
    if on_cuda:
        torch.cuda.set_device(dev)
    net = build_detector(cfg, num_classes).to(dev)
    n_params = sum(p.numel() for p in net.parameters())
    size = cfg.model.img_size
    images, targets = synthetic_batch(batch_size, size, instances, num_classes, dev, seed)

    def autocast():
        return autocast_for(precision, dev)

    groups = detection_param_groups(net, cfg.optim)
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=True if on_cuda else None)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None  # ViTDet's AMP: fp16 + loss scaling

    def batch_loss() -> torch.Tensor:
        with autocast():
            losses = net(images, targets)
        return sum(v.float() for v in losses.values())

    def step() -> torch.Tensor:
        loss = batch_loss()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def forward_backward() -> None:  # one step's FLOPs, counted once (no optimizer step)
        batch_loss().backward()
        opt.zero_grad(set_to_none=True)

    with tf32_enabled(on_cuda):
        net.train()
        flops, attention = count_flops(forward_backward)
        losses: list[torch.Tensor] = []
        train = time_steps(lambda: losses.append(step()), steps, warmup, dev)
        final_loss = float(losses[-1])

        # Inference, as evaluation runs it (no targets, post-processing included).
        net.eval()
        eval_steps = eval_steps or max(1, steps)
        batches = [images[i % batch_size : i % batch_size + 1] * eval_batch_size for i in range(eval_steps)]
        queue = iter(batches * 2)

        def infer():
            with torch.no_grad(), autocast():
                images_ = next(queue)
                outputs = net.inference(images_, paste=False)
            # As the COCO evaluator does: masks pasted in their boxes and RLE-encoded.
            for im, out in zip(images_, outputs):
                paste_masks_rle(out["mask_probs"], out["boxes"], tuple(im.shape[-2:]))

        evaluation = time_steps(infer, len(batches), min(max(1, warmup), len(batches)), dev)

    result = {
        "preset": preset,
        "model": cfg.model.vit_label(),
        "pyramid": cfg.model.pyramid,
        "img_size": size,
        "params_m": n_params / 1e6,
        "batch_size": batch_size,
        "instances_per_image": instances,
        "steps": steps,
        "warmup": warmup,
        "precision": precision,
        "grad_checkpointing": bool(cfg.model.grad_checkpointing),
        **run_environment(dev),
        "train_images_per_s": batch_size * steps / train["wall_s"],
        # Matmuls and convolutions (2 FLOPs per multiply-add); RoIAlign, NMS and mask rasterising not counted.
        "flops_per_image": flops / batch_size,
        "tflops": flops / batch_size * (batch_size * steps / train["wall_s"]) / 1e12,
        "attention_ops": attention,
        "train_s_per_image": train["wall_s"] / (batch_size * steps),
        "step_s_median": train["step_ms_median"] / 1e3,
        "first_step_s": train["first_step_s"],
        "train_peak_memory_gib": train["peak_memory_gib"],
        "memory_kind": train["memory_kind"],
        "eval_batch_size": eval_batch_size,
        "eval_images_per_s": eval_batch_size * len(batches) / evaluation["wall_s"],
        "eval_ms_per_image": evaluation["wall_s"] * 1e3 / (eval_batch_size * len(batches)),
        "eval_peak_memory_gib": evaluation["peak_memory_gib"] if on_cuda else None,
        "final_loss": final_loss,
    }
    log.info(
        "%s bs %d %s on %s: train %.2f img/s, inference %.2f img/s",
        preset,
        batch_size,
        precision,
        result["device_name"],
        result["train_images_per_s"],
        result["eval_images_per_s"],
    )
    if json_path is not None:
        atomic_write_json(json_path, result)
    return result


def format_detection_speed(r: dict) -> str:
    rows = [
        (
            "detector",
            f"Mask R-CNN, {r['model']} {r['pyramid']} pyramid ({r['params_m']:.1f} M params), "
            f"{r['img_size']} px [{r['preset']}]",
        ),
        ("device", f"{r['device_name']} [{r['device']}], torch {r['torch_version']}"),
        ("date", r["date"]),
        (
            "setup",
            f"batch {r['batch_size']}, {r['instances_per_image']} instances/image, "
            f"{r['precision']}, grad_ckpt={r['grad_checkpointing']}",
        ),
        (
            "train",
            f"{r['train_images_per_s']:.2f} images/s ({r['train_s_per_image']:.3f} s/image; "
            f"median step {r['step_s_median']:.3f} s; "
            f"{r['steps']} timed after {r['warmup']} warm-up, first step {r['first_step_s']:.1f} s)",
        ),
        (
            "train FLOPs",
            f"{r['flops_per_image'] / 1e9:.1f} GFLOP/image (matmuls and convolutions), {r['tflops']:.2f} TFLOP/s"
            + (f"; attention: {', '.join(r['attention_ops'])}" if r.get("attention_ops") else ""),
        ),
        ("train memory", f"{r['train_peak_memory_gib']:.2f} GiB ({r['memory_kind']})"),
        (
            "inference",
            f"{r['eval_images_per_s']:.2f} images/s "
            f"({r['eval_ms_per_image']:.1f} ms/image, batch {r['eval_batch_size']})"
            + (f", peak {r['eval_peak_memory_gib']:.2f} GiB" if r.get("eval_peak_memory_gib") is not None else ""),
        ),
        ("final loss", f"{r['final_loss']:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:>{width}s}  {v}" for k, v in rows)


__all__ = ["run_detection_speed", "format_detection_speed", "synthetic_batch"]
