"""The ``mae-transfer`` command. Task packages are imported only when their command runs."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

log = logging.getLogger("mae_transfer.cli")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what schedulers expect from a preempted job

PRETRAIN_HELP = """\
Pretrain a Masked Autoencoder (MAE) ViT.

The defaults are the MAE paper's recipe: ViT-B/16 encoder, 8 x 512 decoder, 75 % random masking,
normalised-pixel loss, AdamW (0.9, 0.95), lr = 1.5e-4 x batch / 256, weight decay 0.05, cosine
schedule with 40 warmup epochs out of 800, effective batch 4096, RandomResizedCrop(0.2-1) + flip.

With no --data it runs the `toy` preset on the built-in toy data (a tiny ViT on 64 px images,
a few minutes on a laptop CPU) and says so. Any config field can be overridden as KEY=VALUE.

The run directory (--output) holds config.yaml, train.csv / train.jsonl, TensorBoard logs,
reconstructions/epochNNNN.png (original | masked | prediction | prediction + visible, a fixed
batch every epoch), checkpoint-last.pth (written atomically) and, at the end, encoder.pth in the
official MAE format. Running the same command again resumes where it stopped (also after a kill).
"""

PRETRAIN_EPILOG = """\
examples:
  mae-transfer pretrain                                  # toy run on CPU, about 5 minutes
  mae-transfer pretrain --data /datasets/imagenet        # the paper's ViT-B recipe
  mae-transfer pretrain --data /datasets/imagenet --preset mae_vit_large_800ep
  torchrun --nproc_per_node 8 -m mae_transfer pretrain --data /datasets/imagenet --batch-size 128
  mae-transfer pretrain --data DIR optim.blr=1e-4 model.mask_ratio=0.9 train.epochs=400
  mae-transfer pretrain --print-config                   # show the resolved config and exit

multi-node (SLURM): one task per GPU, `srun mae-transfer pretrain ...` with MASTER_ADDR and
MASTER_PORT exported, or `srun torchrun --nnodes $SLURM_NNODES --nproc_per_node 8
--rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 -m mae_transfer pretrain ...`.
"""


def _merge_flags(overrides: dict, flags: dict[tuple[str, ...], object]) -> None:
    """Put the command-line flags that were given into the nested overrides dict."""
    for keys, value in flags.items():
        if value is not None:
            node = overrides
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = value


def _model_from_backbone(args, overrides: dict, rename: dict[str, str] | None = None, pos_size_key: str | None = None) -> None:
    """Without --model, take the ViT size from the --backbone checkpoint (``rename`` maps sizes);
    with ``pos_size_key``, also the image size its position table was pretrained at (detection
    keeps that table and resizes it at every forward, as ViTDet does)."""
    model = overrides.get("model", {})
    want_name = not (args.model or "name" in model)
    want_pos = pos_size_key is not None and pos_size_key not in model
    if not args.backbone or not (want_name or want_pos):
        return
    from mae_transfer.checkpoint import infer_vit_config, read_checkpoint, to_vit_state_dict

    info = infer_vit_config(to_vit_state_dict(read_checkpoint(args.backbone)))
    if want_name and info.get("name"):
        overrides.setdefault("model", {})["name"] = (rename or {}).get(info["name"], info["name"])
    if want_pos and info.get("img_size"):
        overrides.setdefault("model", {})[pos_size_key] = int(info["img_size"])


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain an MAE (paper recipe; toy data when no --data)",
        description=PRETRAIN_HELP, epilog=PRETRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", metavar="DIR", help="ImageFolder/ImageNet root (train/<class>/*.JPEG or <class>/*); default: built-in toy data")
    p.add_argument("--output", metavar="DIR", help="run directory (default: runs/pretrain-<preset or model>)")
    p.add_argument("--preset", metavar="NAME", help="a preset name (see `mae-transfer presets`) or a YAML file")
    p.add_argument("--model", metavar="NAME", help="MAE model, e.g. mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--batch-size", type=int, help="images per process per step (train.batch_size)")
    p.add_argument("--effective-batch-size", type=int, help="global batch; gradient accumulation makes up the rest")
    p.add_argument("--blr", type=float, help="base lr; lr = blr x effective batch / 256")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--init", metavar="CKPT", help="start from these weights (official MAE, timm, Hugging Face, ours)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the schedule still spans all epochs)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", metavar="CKPT", help="resume from this training checkpoint instead of the run directory's")
    g.add_argument("--no-resume", action="store_true", help="refuse to continue a run already in --output")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.blr=1e-4 train.epochs=400")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args) -> int:
    from mae_transfer.config import parse_overrides, to_dict
    from mae_transfer.engine.distributed import cleanup, init_distributed
    from mae_transfer.engine.logger import setup_logging
    from mae_transfer.engine.trainer import Trainer
    from mae_transfer.pretrain.config import build_config
    from mae_transfer.pretrain.task import PretrainTask

    overrides = parse_overrides(args.overrides)
    flags = {
        ("data", "path"): args.data,
        ("model", "name"): args.model,
        ("train", "epochs"): args.epochs,
        ("train", "batch_size"): args.batch_size,
        ("train", "effective_batch_size"): args.effective_batch_size,
        ("train", "device"): args.device,
        ("train", "max_steps"): args.max_steps,
        ("optim", "blr"): args.blr,
        ("init",): args.init,
    }
    _merge_flags(overrides, flags)
    preset = args.preset
    toy = not (args.data or (overrides.get("data") or {}).get("path"))
    if toy and preset is None:
        preset = "toy"
    cfg = build_config(preset, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0

    device = None if cfg.train.device == "auto" else cfg.train.device
    dist_info = init_distributed(device)
    name = Path(preset).stem if preset else cfg.model.name
    output = Path(args.output or f"runs/pretrain-{name}")
    setup_logging(dist_info.rank, output / "log.txt")
    if not cfg.data.path:
        log.warning(
            "no --data given: using the built-in toy data and the %r preset (a demo, not the paper's "
            "recipe); pass --data DIR to pretrain on your images", preset,
        )
    resume = args.resume or ("never" if args.no_resume else "auto")
    try:
        trainer = Trainer(PretrainTask(cfg), cfg.train, cfg.optim, output, dist_info, config=cfg, resume=resume)
        summary = trainer.fit()
    finally:
        cleanup()
    if dist_info.is_main:
        print(
            f"pretraining {'finished' if summary['finished'] else 'stopped'} at step {summary['step']} of "
            f"{summary['total_steps']}; run directory: {output}"
        )
        if (output / "encoder.pth").exists():
            print(f"encoder (official MAE format): {output / 'encoder.pth'}")
        if (output / "reconstructions").is_dir():
            print(f"reconstruction pictures: {output / 'reconstructions'}")
    return 0


CLASSIFY_EPILOG = """\
protocols (MAE paper section 4 and appendix A):
  finetune   end-to-end, global average pool + fc_norm, layer-wise lr decay, RandAugment, mixup,
             cutmix, label smoothing, random erasing, AdamW, cosine with warmup (official scripts)
  linprobe   frozen encoder, class token, BatchNorm (no affine) + linear head, LARS
  partial    fine-tune only the last k blocks (paper Figure 9): --protocol partial --trainable-blocks k

examples:
  mae-transfer finetune --data /datasets/imagenet --backbone mae_pretrain_vit_base.pth
  mae-transfer linprobe --data /datasets/imagenet --backbone runs/pretrain-toy/encoder.pth
  mae-transfer inat --year 2018 --data /datasets/inat2018 --backbone ckpt.pth --preset finetune_paper_table9
  mae-transfer places --version 365 --data /datasets/places365 --backbone ckpt.pth
  mae-transfer finetune --backbone runs/pretrain-toy/encoder.pth      # toy data, a few minutes on CPU
With no --backbone the ViT starts from random weights (the from-scratch baseline), and says so.
Results: <output>/results.jsonl (one row per metric), eval.csv per evaluated epoch, and a table.
"""


def _add_classification(sub, name: str, help_text: str, protocol: str | None, dataset: str | None) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text + ".", epilog=CLASSIFY_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if name == "inat":
        p.add_argument("--year", type=int, choices=[2017, 2018, 2019], default=2018)
    if name == "places":
        p.add_argument("--version", type=int, choices=[205, 365], default=365)
    if dataset is None and name not in ("inat", "places"):
        p.add_argument("--dataset", default="imagefolder",
                       choices=["imagefolder", "inat2017", "inat2018", "inat2019", "places205", "places365"],
                       help="dataset format of --data (default: imagefolder = ImageNet layout)")
    p.add_argument("--data", metavar="DIR", help="dataset root in its official layout; default: built-in toy data in that layout")
    p.add_argument("--backbone", metavar="CKPT", help="pretrained weights (official MAE, timm, Hugging Face, ours); none = random init")
    if protocol is None:
        p.add_argument("--protocol", choices=["finetune", "linprobe", "partial"], default="finetune")
    p.add_argument("--trainable-blocks", type=int, help="partial fine-tuning: train the last k blocks")
    p.add_argument("--preset", metavar="NAME", help="recipe preset (see `mae-transfer presets`) or YAML file")
    p.add_argument("--model", metavar="NAME", help="ViT size, e.g. vit_base_patch16 (default: from the backbone checkpoint)")
    p.add_argument("--output", metavar="DIR", help="run directory (default: runs/<command>-<dataset>-<protocol>)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per process per step")
    p.add_argument("--effective-batch-size", type=int)
    p.add_argument("--blr", type=float, help="base lr; lr = blr x effective batch / 256")
    p.add_argument("--missing", choices=["error", "skip"], help="images listed in the annotations but absent on disk")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"])
    p.add_argument("--max-steps", type=int)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--print-config", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_run_classification, command_name=name, fixed_protocol=protocol, fixed_dataset=dataset)


def _run_classification(args) -> int:
    from mae_transfer.classification.config import build_config
    from mae_transfer.classification.task import ClassificationTask, format_results
    from mae_transfer.config import parse_overrides, to_dict
    from mae_transfer.engine.distributed import cleanup, init_distributed
    from mae_transfer.engine.logger import setup_logging
    from mae_transfer.engine.trainer import Trainer

    protocol = args.fixed_protocol or getattr(args, "protocol", "finetune")
    if protocol == "finetune" and args.trainable_blocks:
        protocol = "partial"  # fine-tuning only the last k blocks
    if args.command_name == "inat":
        dataset = f"inat{args.year}"
    elif args.command_name == "places":
        dataset = f"places{args.version}"
    else:
        dataset = args.fixed_dataset or args.dataset
    toy = not args.data
    if args.preset:
        preset = args.preset
    elif protocol == "linprobe":
        preset = "toy_linprobe" if toy else "linprobe"
    elif toy:
        preset = "toy_finetune"
    else:
        # iNaturalist and Places follow the paper's Table 9 setting (appendix A.5); folders
        # (ImageNet) the official script of the released ViT-B.
        preset = "finetune_paper_table9" if args.command_name in ("inat", "places") else "finetune_vit_base"
    overrides = parse_overrides(args.overrides)
    flags = {
        ("protocol",): protocol, ("data", "dataset"): dataset, ("data", "path"): args.data,
        ("data", "missing"): args.missing, ("backbone",): args.backbone, ("model", "name"): args.model,
        ("model", "trainable_blocks"): args.trainable_blocks, ("train", "epochs"): args.epochs,
        ("train", "batch_size"): args.batch_size, ("train", "effective_batch_size"): args.effective_batch_size,
        ("train", "device"): args.device, ("train", "max_steps"): args.max_steps, ("optim", "blr"): args.blr,
    }
    _merge_flags(overrides, flags)
    _model_from_backbone(args, overrides)
    cfg = build_config(preset, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    dist_info = init_distributed(None if cfg.train.device == "auto" else cfg.train.device)
    output = Path(args.output or f"runs/{args.command_name}-{dataset}-{protocol}")
    setup_logging(dist_info.rank, output / "log.txt")
    if not cfg.data.path:
        log.warning("no --data given: using the built-in toy data in the %s format and the %r preset", dataset, preset)
    try:
        task = ClassificationTask(cfg)
        trainer = Trainer(task, cfg.train, cfg.optim, output, dist_info, config=cfg, resume="never" if args.no_resume else "auto")
        trainer.fit()
    finally:
        cleanup()
    if dist_info.is_main:
        print(format_results(task.last_eval, task.best_top1, cfg))
        print(f"results: {output / 'results.jsonl'}")
    return 0


COCO_HELP = """\
COCO instance detection and segmentation with Mask R-CNN on a ViT backbone (MAE paper Table 4,
ViTDet): the same function as detectron2's ViTDet Mask R-CNN (no detectron2 needed), checked
against detectron2's own outputs, and it reads and writes detectron2 checkpoints.

The default recipe is ViTDet's Mask R-CNN ViT-B from MAE weights: simple feature pyramid from the
last block, 14x14 window attention with 4 global blocks, relative position bias, LayerNorm heads,
1024 px large-scale jitter, AdamW lr 1e-4, weight decay 0.1, layer decay 0.7, drop path 0.1,
fp16 with a loss scaler, 100 epochs at batch 64 with step decay (COCO val2017: 51.6 box AP /
45.9 mask AP in ViTDet). `--preset benchmarking_mask_rcnn_b` is the Benchmarking-ViT protocol of
the MAE paper's Table 4 (four taps + FPN, BatchNorm, lr 8e-5, cosine). See `mae-transfer presets`.

Training ends with an evaluation on --eval-split (pycocotools: bbox and segm AP, AP50, AP75,
APs/m/l), in fp32 unless eval_precision=bf16. The run directory holds metrics.json, results.jsonl
(one row per metric), predictions_<split>.json (COCO results format), detector.pth (detectron2
parameter names), checkpoint-last.pth and with --visualize N, visualize/*.png (ground truth |
prediction). Running the same command again resumes.

--eval-only --weights also takes a detectron2 ViTDet checkpoint (model_final.pth; a model-zoo
.pkl with --trust-checkpoint): the architecture, input size and classes are read from the file.
`mae-transfer export --to detectron2` writes a trained detector back in detectron2's layout.
"""

COCO_EPILOG = """\
examples:
  mae-transfer coco                                          # toy data, tiny ViT, a few minutes on CPU
  mae-transfer coco --backbone mae_pretrain_vit_base.pth --data /datasets/coco
  torchrun --nproc_per_node 8 -m mae_transfer coco --backbone ckpt.pth --data /datasets/coco --batch-size 8
  mae-transfer coco --backbone ckpt.pth --data /datasets/coco --preset vitdet_mask_rcnn_b_1gpu   # one 24 GB GPU
  mae-transfer coco --backbone ckpt.pth --data /datasets/coco --preset benchmarking_mask_rcnn_l
  mae-transfer coco --eval-only --weights runs/coco/detector.pth --data /datasets/coco --visualize 8
  mae-transfer coco --eval-only --weights model_final.pth --data /datasets/coco    # a detectron2 ViTDet model
  mae-transfer export runs/coco/detector.pth --to detectron2 --output model_final.pth
  mae-transfer coco --data /datasets/coco --print-config     # the resolved recipe
Category ids may be any (COCO's are non-contiguous); both splits need the same category list.
Crowd regions are ignored in training and handled by COCOeval in evaluation.
"""


def _add_dense_options(p, data_help: str, artifact: str, size_help: str) -> None:
    """The options ``coco`` and ``ade20k`` share."""
    p.add_argument("--backbone", metavar="CKPT", help="pretrained ViT weights (official MAE, timm, Hugging Face, ours); none = random init")
    p.add_argument("--data", metavar="DIR", help=data_help)
    p.add_argument("--preset", metavar="NAME", help="recipe preset (see `mae-transfer presets`) or YAML file")
    p.add_argument("--model", metavar="NAME", help="ViT size, e.g. vit_large_patch16 (default: from the backbone checkpoint)")
    p.add_argument("--img-size", type=int, help=size_help)
    p.add_argument("--output", metavar="DIR", help="run directory (default: runs/<command>-<preset>)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per process per step")
    p.add_argument("--effective-batch-size", type=int, help="global batch; gradient accumulation makes up the rest")
    p.add_argument("--lr", type=float, help="peak learning rate (absolute, for the effective batch)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"])
    p.add_argument("--max-steps", type=int)
    p.add_argument("--eval-only", action="store_true", help="only evaluate --weights (no training)")
    p.add_argument("--weights", metavar="PATH", help=f"trained model ({artifact} or checkpoint-last.pth) for --eval-only")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (detectron2 model-zoo .pkl, old files); this can run code "
                        "stored in the file, so only for files from a source you trust")
    p.add_argument("--visualize", type=int, metavar="N", help="save N evaluation images with predictions next to the ground truth")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--print-config", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.drop_path=0.2 optim.layer_decay=0.8")


def _add_coco(sub) -> None:
    p = sub.add_parser("coco", help="COCO detection transfer: Mask R-CNN on a ViT (ViTDet / MAE Table 4)",
                       description=COCO_HELP, epilog=COCO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_dense_options(p, "COCO root with train2017/, val2017/, annotations/; default: built-in toy COCO", "detector.pth",
                       "training and test size (model.img_size; 1024 in the recipes)")
    p.add_argument("--train-split", metavar="NAME", help="folder and annotations/instances_NAME.json to train on (default train2017)")
    p.add_argument("--eval-split", metavar="NAME", help="split to evaluate on (default val2017)")
    p.add_argument("--skip-bad", action="store_true", help="skip unknown category ids and missing image files (counted) instead of stopping")
    p.set_defaults(func=_run_coco)


ADE20K_HELP = """\
ADE20K semantic segmentation with UperNet on a ViT (MAE paper Table 5): the same function as
mmsegmentation's MAE + UperNet (configs/mae), checked against mmsegmentation's own outputs, natively
in PyTorch (no mmsegmentation / mmcv); it reads and writes mmsegmentation checkpoints.

The default recipe is the MAE paper's A.4 setup with mmsegmentation's MAE hyper-parameters: ViT-B
with BEiT's relative position bias table (zero-initialised) and layer scale 1.0, four taps (blocks 4,
6, 8, 12) rescaled x4 x2 x1 x0.5, UperNet (768 channels) + auxiliary FCN head (weight 0.4), 512
crops of images resized by 0.5-2.0 x (2048, 512) with at most 75 % of a crop one class, flip and
photometric distortion, AdamW lr 1e-4, weight decay 0.05, layer decay 0.65, drop path 0.1, 1500
warmup iterations, poly decay, fp16 with a loss scaler, 100 epochs at batch 16. Evaluation (fp32)
resizes the short side to 512 (long side at most 2048) with OpenCV as mmcv does, runs 512 px sliding
windows with stride 341 and scores at the original size: mIoU, mean class accuracy, pixel accuracy
and per-class IoU, accumulated over the whole split.

--eval-only --weights also takes an mmsegmentation MAE/BEiT UperNet checkpoint ({"meta",
"state_dict"}): the architecture and classes are read from the file, the crop from its position
table (test resize and stride follow mmsegmentation's ADE20K rule for that crop; override with
data.scale / test.stride). `mae-transfer export --to mmseg` writes a trained segmenter back.
"""

ADE20K_EPILOG = """\
examples:
  mae-transfer ade20k                                        # toy data, tiny ViT, a few minutes on CPU
  mae-transfer ade20k --backbone mae_pretrain_vit_base.pth --data /datasets/ADEChallengeData2016
  torchrun --nproc_per_node 8 -m mae_transfer ade20k --backbone ckpt.pth --data DIR --batch-size 2
  mae-transfer ade20k --backbone ckpt.pth --data DIR --preset upernet_vit_b_1gpu    # one 24 GB GPU
  mae-transfer ade20k --eval-only --weights runs/ade20k-upernet_vit_b/segmenter.pth --data DIR --flip --multi-scale
  mae-transfer ade20k --eval-only --weights mmseg_upernet_mae.pth --data DIR       # an mmsegmentation model
  mae-transfer export runs/ade20k-upernet_vit_b/segmenter.pth --to mmseg --output mmseg.pth
  mae-transfer ade20k --data MY_DATA --num-classes 19 data.reduce_zero_label=false  # your own data, same layout
Layout: DIR/images/{training,validation}/*.jpg and DIR/annotations/{training,validation}/*.png
(0 = unlabelled and ignored, 1..150 = classes), objectInfo150.txt for the class names.
"""


def _add_ade20k(sub) -> None:
    p = sub.add_parser("ade20k", help="ADE20K segmentation transfer: UperNet on a ViT (MAE Table 5)",
                       description=ADE20K_HELP, epilog=ADE20K_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_dense_options(p, "ADEChallengeData2016 folder (or the folder holding it); default: built-in toy ADE20K",
                       "segmenter.pth", "training crop and sliding-window size (model.img_size; 512 in the recipes)")
    p.add_argument("--num-classes", type=int, help="classes of your own data in the same layout (data.num_classes; 150)")
    p.add_argument("--bad-labels", choices=["error", "ignore"], help="label values outside the classes: stop (default) or ignore those pixels")
    p.add_argument("--missing", choices=["error", "skip"], help="images without a label map: stop (default) or skip them")
    p.add_argument("--flip", action="store_true", help="test with horizontal flips too")
    p.add_argument("--multi-scale", action="store_true",
                   help="test at 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 x the original image (mmsegmentation 1.x TTA; with --flip: ms+flip)")
    p.set_defaults(func=_run_ade20k)


def _dense_spec(kind: str) -> dict:
    """What differs between the dense tasks' commands: modules, names, extra flags."""
    if kind == "coco":
        from mae_transfer.detection import config, task

        return {"config": config, "task": task.DetectionTask, "format": task.format_metrics, "read": task.read_detector_weights,
                "load": task.load_detector_weights, "artifact": "detector.pth", "data": "COCO", "default_preset": "vitdet_mask_rcnn_b",
                "pictures": "ground truth | prediction",
                # ViTDet runs ViT-H with 16 px patches (the 14 px kernel is resized on load, ViTDet A.2).
                "rename": {"vit_huge_patch14": "vit_huge_patch16"}, "pos_size_key": "pretrain_img_size"}
    from mae_transfer.segmentation import config, task

    return {"config": config, "task": task.SegmentationTask, "format": task.format_metrics, "read": task.read_segmenter_weights,
            "load": task.load_segmenter_weights, "artifact": "segmenter.pth", "data": "ADE20K", "default_preset": "upernet_vit_b",
            "pictures": "image | ground truth | prediction", "rename": {}}


def _run_dense(args, kind: str, flags: dict) -> int:
    """Shared front of ``coco`` and ``ade20k``: config from preset, weights and flags; train or evaluate."""
    from mae_transfer.config import ConfigError, parse_overrides, to_dict

    spec = _dense_spec(kind)
    if args.eval_only and not args.weights:
        raise ConfigError(f"--eval-only needs --weights PATH (a {spec['artifact']} or checkpoint-last.pth of a {kind} run)")
    if args.weights and not args.eval_only:
        raise ConfigError("--weights is for --eval-only; to start training from a pretrained ViT use --backbone")
    toy = not args.data
    preset = args.preset or ("toy" if toy else None)
    overrides = parse_overrides(args.overrides)
    weights = None
    if args.weights:
        weights, saved = spec["read"](args.weights, trust=args.trust_checkpoint)
        # Build and test the model as it was trained (architecture, test settings, resize scale),
        # unless the command line says otherwise; where the data is comes from the command line.
        for section in ("model", "test", "data"):
            if isinstance((saved or {}).get(section), dict):
                kept = {k: v for k, v in saved[section].items() if k != "path"}
                overrides[section] = {**kept, **overrides.get(section, {})}
    common = {
        ("data", "path"): args.data, ("backbone",): args.backbone, ("model", "name"): args.model,
        ("model", "img_size"): args.img_size, ("train", "epochs"): args.epochs, ("train", "batch_size"): args.batch_size,
        ("train", "effective_batch_size"): args.effective_batch_size, ("train", "device"): args.device,
        ("train", "max_steps"): args.max_steps, ("optim", "lr"): args.lr, ("visualize",): args.visualize,
    }
    _merge_flags(overrides, {**common, **flags})
    _model_from_backbone(args, overrides, rename=spec["rename"], pos_size_key=spec.get("pos_size_key"))
    cfg = spec["config"].build_config(preset, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    name = Path(preset).stem if preset else spec["default_preset"]
    output = Path(args.output or (f"runs/{kind}-eval-{name}" if args.eval_only else f"runs/{kind}-{name}"))

    from mae_transfer.engine.distributed import cleanup, init_distributed
    from mae_transfer.engine.logger import setup_logging
    from mae_transfer.engine.trainer import Trainer, autocast_context, default_num_workers, resolve_precision

    dist_info = init_distributed(None if cfg.train.device == "auto" else cfg.train.device)
    setup_logging(dist_info.rank, output / "log.txt")
    if not cfg.data.path:
        log.warning("no --data given: using the built-in toy %s data and the %r preset (a demo, not a paper recipe)", spec["data"], preset)
    try:
        if args.eval_only:
            task = spec["task"](cfg, train=False)
            model = task.build_model(load_backbone=False)
            spec["load"](model, weights, args.weights)
            model.to(dist_info.device)
            # Detection evaluates in fp32 unless asked otherwise (eval_precision), as detectron2 does.
            precision = resolve_precision(getattr(cfg, "eval_precision", None) or cfg.train.precision, dist_info.device)
            autocast = lambda: autocast_context(precision, dist_info.device)  # noqa: E731
            workers = default_num_workers(cfg.train.num_workers, dist_info.device)
            metrics = task.run_eval(model, dist_info.device, autocast, dist_info, workers, output)
            if dist_info.is_main:
                task.write_results(output, metrics, step=-1)
                if cfg.visualize:
                    task.visualize(model, dist_info.device, autocast, output / "visualize")
        else:
            task = spec["task"](cfg)
            trainer = Trainer(task, cfg.train, cfg.optim, output, dist_info, config=cfg, resume="never" if args.no_resume else "auto")
            trainer.fit()
            metrics = task.last_eval
    finally:
        cleanup()
    if dist_info.is_main:
        print(spec["format"](metrics, cfg))
        print(f"results: {output / 'results.jsonl'}; metrics: {output / 'metrics.json'}"
              + ("" if args.eval_only else f"; weights: {output / spec['artifact']}"))
        if cfg.visualize:
            print(f"pictures ({spec['pictures']}): {output / 'visualize'}")
    return 0


def _run_ade20k(args) -> int:
    flags = {("data", "num_classes"): args.num_classes, ("data", "bad_labels"): args.bad_labels, ("data", "missing"): args.missing,
             ("test", "flip"): True if args.flip else None,
             ("test", "scales"): [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] if args.multi_scale else None}
    return _run_dense(args, "ade20k", flags)


def _run_coco(args) -> int:
    flags = {("data", "train_split"): args.train_split, ("data", "val_split"): args.eval_split,
             ("data", "skip_bad"): True if args.skip_bad else None}
    return _run_dense(args, "coco", flags)


def _add_knn(sub) -> None:
    p = sub.add_parser("knn", help="k-NN and linear-probe-sweep evaluation of frozen features",
                       description="Evaluate frozen features: weighted k-NN (cosine, T=0.07) and, with --sweep, a linear probe "
                                   "that trains several learning rates at once on the extracted features.")
    p.add_argument("--dataset", default="imagefolder",
                   choices=["imagefolder", "inat2017", "inat2018", "inat2019", "places205", "places365"])
    p.add_argument("--data", metavar="DIR")
    p.add_argument("--backbone", metavar="CKPT")
    p.add_argument("--model", metavar="NAME")
    p.add_argument("--img-size", type=int)
    p.add_argument("--k", default="10,20,100,200", help="comma-separated neighbour counts")
    p.add_argument("--sweep", action="store_true", help="also run the linear-probe lr sweep")
    p.add_argument("--output", metavar="DIR")
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.set_defaults(func=_run_knn)


def _run_knn(args) -> int:
    from mae_transfer.classification.frozen import run_frozen_eval
    from mae_transfer.engine.logger import setup_logging

    setup_logging(0)
    table = run_frozen_eval(
        dataset=args.dataset, data=args.data, backbone=args.backbone, model=args.model, img_size=args.img_size,
        ks=tuple(int(k) for k in args.k.split(",")), sweep=args.sweep,
        output=Path(args.output or f"runs/knn-{args.dataset}"), device=args.device,
    )
    print(table)
    return 0


def _add_speed(sub) -> None:
    p = sub.add_parser(
        "speed", help="measure training speed (images/s, step time, memory, TFLOP/s)",
        description=textwrap.dedent(
            """\
            Measure the speed of a training step on synthetic data created on the device (so data
            loading does not hide the model's speed): images/s, step time, peak memory and achieved
            TFLOP/s over a steady-state window after warm-up steps.

            FLOPs are counted for matrix multiplications (2 per multiply-add) of one training step,
            taken as 3 x the forward pass; for MAE the encoder runs on the visible tokens only
            (ViT-B/16 at 224 px, 75 %% masking: about 58.7 GFLOP per image per step).

            `speed coco` times Mask R-CNN training steps (synthetic images with 8 boxes and masks
            each) and inference of a detection preset, e.g. ViTDet ViT-B at 1024 px:
              mae-transfer speed coco --preset vitdet_mask_rcnn_b --batch-size 4 --json det.json"""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("what", choices=["pretrain", "coco"], help="which training step to measure")
    p.add_argument("--model", default="mae_vit_base_patch16", help="pretrain: the MAE model")
    p.add_argument("--preset", default="vitdet_mask_rcnn_b", help="coco: the detection preset")
    p.add_argument("--batch-size", type=int, help="default: 256 on GPU, 8 on CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU, fp32 on the CPU; fp16 (coco, GPU only) is ViTDet's AMP with loss scaling")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--img-size", type=int)
    p.add_argument("--peak-tflops", type=float, help="device peak for the MFU column")
    p.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    p.set_defaults(func=_run_speed)


def _run_speed(args) -> int:
    import torch

    from mae_transfer.engine.logger import setup_logging
    from mae_transfer.pretrain.speed import format_speed_report, run_pretrain_speed

    setup_logging(0)
    on_gpu = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    if args.what == "coco":
        from mae_transfer.detection.speed import format_detection_speed, run_detection_speed

        result = run_detection_speed(
            preset=args.preset, batch_size=args.batch_size or (4 if on_gpu else 1), steps=args.steps, warmup=args.warmup,
            device=args.device, precision=args.precision, grad_checkpointing=args.grad_checkpointing or None,
            img_size=args.img_size, json_path=args.json,
        )
        print(format_detection_speed(result))
        if args.json:
            print(f"written to {args.json}")
        return 0
    batch = args.batch_size or (256 if on_gpu else 8)
    kwargs = dict(
        model=args.model, batch_size=batch, steps=args.steps, warmup=args.warmup, device=args.device,
        precision=args.precision, compile=args.compile, grad_checkpointing=args.grad_checkpointing,
        img_size=args.img_size, json_path=args.json,
    )
    if args.peak_tflops is not None:
        kwargs["peak_tflops"] = args.peak_tflops
    result = run_pretrain_speed(**kwargs)
    print(format_speed_report(result))
    if args.json:
        print(f"written to {args.json}")
    return 0


BENCH_HELP = """\
Benchmark backbones on the MAE paper's transfer protocols and tabulate the results.

Every (backbone, task) pair is one job: the ordinary `mae-transfer <task>` command with its own run
directory under RESULTS/runs/. Jobs run one after another (under torchrun with --nproc-per-node),
or are printed (--launcher print) or submitted to SLURM through submitit (--launcher slurm). Every
metric lands in RESULTS/results.jsonl with its provenance (backbone sha256, config hash, git commit,
package versions, hardware, wall time, date); pandas reads it with read_json(path, lines=True).

Running the same command again does no work for jobs already recorded (same backbone weights and
the same resolved config), records jobs that finished outside the runner, retries failed jobs,
and resumes a job that was interrupted from its checkpoint. A failing job is recorded with its
error and the benchmark goes on. At the end the tables (Markdown, LaTeX, CSV) and plots are
written to RESULTS/ and the Markdown tables printed.

Tasks: coco, ade20k, inat2017, inat2018, inat2019, places205, places365, finetune, linprobe, knn
(finetune, linprobe and knn read --data imagenet=DIR). With no --data for a task it runs on the
built-in toy data in that dataset's format with the task's toy preset.
"""

BENCH_EPILOG = """\
examples:
  mae-transfer bench --backbone mae=runs/pretrain-toy/encoder.pth --backbone scratch=random --tasks all
  mae-transfer bench --backbone mae=mae_pretrain_vit_base.pth --tasks coco,ade20k \\
      --data coco=/datasets/coco --data ade20k=/datasets/ADEChallengeData2016 \\
      --preset coco=vitdet_mask_rcnn_b --preset ade20k=upernet_vit_b --nproc-per-node 8
  mae-transfer bench ... --set coco:train.epochs=25 --set '*:train.device=cuda'
  mae-transfer bench ... --launcher print        # the torchrun commands, to run elsewhere
  mae-transfer bench ... --launcher slurm --slurm-partition learnfair --slurm-time 4320
  mae-transfer table --results results/          # the tables again, in any format
"""


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run backbones x transfer tasks and tabulate the results (resumable)",
                       description=BENCH_HELP, epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", action="append", default=[], metavar="NAME=CKPT",
                   help="a backbone to evaluate (repeatable); NAME=random for random weights of the same architecture")
    p.add_argument("--tasks", default="all", help="comma-separated tasks or 'all' (default)")
    p.add_argument("--results", default="results", metavar="DIR", help="results directory (default: results/)")
    p.add_argument("--data", action="append", default=[], metavar="TASK=DIR", help="dataset root of a task (imagenet=DIR for finetune/linprobe/knn)")
    p.add_argument("--preset", action="append", default=[], metavar="TASK=NAME", help="recipe preset of a task (see `mae-transfer presets`)")
    p.add_argument("--set", action="append", default=[], metavar="TASK:KEY=VALUE", help="config override of a task ('*' for all tasks)")
    p.add_argument("--random-model", metavar="NAME", help="architecture of random-init backbones (default: that of the first checkpoint)")
    p.add_argument("--launcher", choices=["local", "print", "slurm"], default="local")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per job; > 1 runs jobs under torchrun")
    p.add_argument("--in-process", action="store_true", help="run jobs inside this process (faster for tiny jobs; no torchrun)")
    p.add_argument("--verbose", action="store_true", help="show the jobs' own output instead of writing it to their bench.log")
    p.add_argument("--no-retry", action="store_true", help="do not run failed jobs again")
    p.add_argument("--baseline", metavar="NAME", help="backbone the deltas refer to (default: one named random/scratch)")
    p.add_argument("--slurm-partition", metavar="NAME")
    p.add_argument("--slurm-time", type=int, default=4320, metavar="MIN", help="SLURM time limit in minutes")
    p.set_defaults(func=_run_bench)


def _report(rows: list, results: Path, baseline: str | None, pretrain_dir: Path | None = None) -> tuple[str, dict, list]:
    """Write tables and plots of ``rows`` into ``results``; return the Markdown and the paths."""
    from mae_transfer.report.plots import plot_all
    from mae_transfer.report.tables import render, write_tables

    kw = {"baseline": baseline or "auto"}
    markdown = render(rows, "markdown", **kw)
    tables = write_tables(rows, results, **kw) if rows else {}
    plots = plot_all(rows, results / "plots", pretrain_dir=pretrain_dir) if rows else []
    return markdown, tables, plots


def _run_bench(args) -> int:
    from mae_transfer import bench
    from mae_transfer.config import ConfigError
    from mae_transfer.engine.logger import setup_logging

    setup_logging(0)
    backbones = bench.parse_backbones(args.backbone)
    tasks = bench.parse_tasks(args.tasks)
    data = bench.parse_task_map(args.data, "--data", [*bench.TASKS, "imagenet"])
    presets = bench.parse_task_map(args.preset, "--preset", bench.TASKS)
    overrides = bench.parse_overrides(args.set)
    if args.nproc_per_node < 1:
        raise ConfigError("--nproc-per-node must be at least 1")
    if args.in_process and args.nproc_per_node > 1:
        raise ConfigError("--in-process runs jobs in this one process; it cannot use --nproc-per-node > 1")
    if args.baseline and args.baseline not in [b.name for b in backbones]:
        raise ConfigError(f"--baseline {args.baseline!r} is not one of the backbones: {', '.join(b.name for b in backbones)}")
    results = Path(args.results)
    jobs = bench.plan_jobs(backbones, tasks, results, data, presets, overrides, args.random_model)
    print(f"{len(jobs)} jobs: {len(backbones)} backbone(s) x {len(tasks)} task(s); results: {results / 'results.jsonl'}")
    if args.launcher == "print":
        bench.print_commands(jobs, results, args.nproc_per_node)
        return 0
    if args.launcher == "slurm":
        slurm = {"timeout_min": args.slurm_time}
        if args.slurm_partition:
            slurm["slurm_partition"] = args.slurm_partition
        bench.submit_slurm(jobs, results, args.nproc_per_node, slurm)
        return 0
    try:
        outcomes = bench.run_jobs(jobs, results, nproc=args.nproc_per_node, in_process=args.in_process,
                                  verbose=args.verbose, retry_failed=not args.no_retry)
    except bench.BenchInterrupted as e:
        print(f"mae-transfer bench: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    markdown, tables, plots = _report(bench.latest_rows(results, jobs), results, args.baseline)
    print()
    print(markdown)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "cached", "recorded", "failed")}
    print(f"\njobs: {counts['done']} run, {counts['cached']} already done, {counts['recorded']} recorded, {counts['failed']} failed")
    if tables:
        print(f"tables: {', '.join(str(p) for p in tables.values())}")
    if plots:
        print(f"plots: {', '.join(str(p) for p in plots)}")
    for o in outcomes:
        if o.status == "failed":
            print(f"FAILED {o.job.label}: {o.error} (log: {o.job.run_dir / 'bench.log'})")
    return 1 if counts["failed"] else 0


def _add_table(sub) -> None:
    p = sub.add_parser(
        "table", help="the paper's tables (Markdown, LaTeX, CSV) from a results directory",
        description="Render the results store as the MAE paper's tables: Table 4 (COCO APbox/APmask), Table 5 (ADE20K "
                    "mIoU), Table 6 (iNaturalist/Places top-1) and ImageNet-style fine-tune / linear probe / k-NN top-1, "
                    "with the paper's numbers in their own rows, deltas to a baseline backbone, and the best value of "
                    "each column in bold.",
        epilog="examples:\n  mae-transfer table --results results/\n  mae-transfer table --results results/ --format latex > tables.tex\n"
               "  mae-transfer table --results results/ --output paper/ --paper-sizes B,L",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--results", default="results", metavar="DIR", help="results directory (holds results.jsonl)")
    p.add_argument("--format", choices=["markdown", "latex", "csv"], default="markdown", help="what to print (default markdown)")
    p.add_argument("--output", metavar="DIR", help="also write tables.md, tables.tex (standalone document) and table_*.csv here")
    p.add_argument("--baseline", metavar="NAME", help="backbone the deltas refer to (default: one named random/scratch; 'none' for no deltas)")
    p.add_argument("--backbones", metavar="A,B", help="only these backbones, in this order")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper's rows")
    p.add_argument("--paper-sizes", metavar="B,L", help="ViT sizes of the paper rows (default: the sizes of your backbones, else B)")
    p.add_argument("--full", action="store_true", help="keep columns without results")
    p.set_defaults(func=_run_table)


def _table_rows(args) -> list:
    from mae_transfer.config import ConfigError
    from mae_transfer.results import ResultStore

    store = ResultStore(args.results)
    if not store.path.exists():
        raise ConfigError(f"--results {args.results}: no {store.path.name} there; run `mae-transfer bench --results {args.results} ...` first")
    rows = store.read()
    if args.backbones:
        order = [b.strip() for b in args.backbones.split(",") if b.strip()]
        known = list(dict.fromkeys(r.get("backbone") for r in rows))
        missing = [b for b in order if b not in known]
        if missing:
            raise ConfigError(f"--backbones: {', '.join(missing)} not in {store.path} (it has: {', '.join(map(str, known))})")
        rows = sorted((r for r in rows if r.get("backbone") in order), key=lambda r: order.index(r["backbone"]))
    return rows


def _run_table(args) -> int:
    from mae_transfer.report.tables import render, write_tables

    rows = _table_rows(args)
    kw = {"baseline": None if (args.baseline or "").lower() == "none" else (args.baseline or "auto"),
          "paper": not args.no_paper, "full": args.full,
          "paper_sizes": [s.strip().upper() for s in args.paper_sizes.split(",")] if args.paper_sizes else None}
    try:
        print(render(rows, args.format, **kw))
    except ValueError as e:
        from mae_transfer.config import ConfigError

        raise ConfigError(str(e)) from None
    if args.output:
        paths = write_tables(rows, Path(args.output), **kw)
        print(f"written: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="training curves and per-task comparison bars (PNG) from a results directory",
                       description="Draw the training-loss curves of every job (one panel per task, one line per backbone) "
                                   "and a bar chart of the headline metric of every task per backbone.")
    p.add_argument("--results", default="results", metavar="DIR")
    p.add_argument("--output", metavar="DIR", help="where the PNGs go (default: RESULTS/plots)")
    p.add_argument("--pretrain", metavar="RUN_DIR", help="also plot this MAE pretraining run's loss")
    p.add_argument("--backbones", metavar="A,B", help="only these backbones")
    p.set_defaults(func=_run_plot)


def _run_plot(args) -> int:
    from mae_transfer.report.plots import plot_all

    rows = _table_rows(args)
    out = Path(args.output or Path(args.results) / "plots")
    paths = plot_all(rows, out, pretrain_dir=Path(args.pretrain) if args.pretrain else None)
    if not paths:
        print("nothing to plot yet")
    for path in paths:
        print(path)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole toolkit on built-in toy data: pretrain, every transfer task, tables (no data needed)",
        description="Pretrain a tiny MAE on the built-in toy data, then run every transfer task (COCO Mask R-CNN, "
                    "ADE20K UperNet, iNaturalist, Places, fine-tuning, linear probing, k-NN) on toy data in each "
                    "dataset's real format, once from the MAE encoder and once from random weights, and print the "
                    "paper-style tables. About 10-15 minutes on 2 CPU cores (--quick: under 3, shorter schedules "
                    "whose numbers mean little). Run it again to continue or to see the tables; nothing is redone.",
    )
    p.add_argument("--output", default="runs/demo", metavar="DIR", help="where everything goes (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a 2-3 minute smoke run")
    p.add_argument("--verbose", action="store_true", help="show every job's own output")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from mae_transfer.demo import run_demo

    return run_demo(Path(args.output), quick=args.quick, verbose=args.verbose)


def _add_toy_data(sub) -> None:
    kinds = ["imagefolder", "coco", "ade20k", "inat2017", "inat2018", "inat2019", "places205", "places365"]
    p = sub.add_parser(
        "toy-data", help="write a built-in toy dataset in a real on-disk format",
        description="Write one of the built-in toy datasets (deterministic) in the exact on-disk format of the real dataset, to look at or to test a pipeline.",
    )
    p.add_argument("kind", choices=kinds)
    p.add_argument("--output", metavar="DIR", help="where to write (default: the toolkit's cache)")
    p.set_defaults(func=_run_toy_data)


def _run_toy_data(args) -> int:
    from mae_transfer.data.toy import ensure_toy_dataset

    root = ensure_toy_dataset(args.kind, root=Path(args.output) if args.output else None)
    print(root)
    return 0


EXPORT_HELP = """\
Write weights in another project's format, atomically, and check the file by reading it back.

  --to mae          the ViT encoder as the official MAE release ({'model': encoder}, official names),
                    from a pretraining checkpoint (ours, official full MAE, Hugging Face ViTMAE).
  --to detectron2   a trained detector (detector.pth or checkpoint-last.pth of a `coco` run, or a
                    detectron2 model-zoo .pkl) as detectron2's DetectionCheckpointer writes it:
                    {'model': state_dict, 'iteration': 0}, loadable by detectron2's ViTDet
                    LazyConfig (train.init_checkpoint / MODEL.WEIGHTS) and by torch.load(weights_only=True).
  --to mmseg        a trained segmenter (segmenter.pth or checkpoint-last.pth of an `ade20k` run) as
                    mmsegmentation writes it: {'meta': {'dataset_meta': classes}, 'state_dict': ...}
                    with its MAE backbone names, for its configs/mae UperNet (load_checkpoint, init_model).
"""


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write weights in another format (official MAE encoder, detectron2 ViTDet, mmsegmentation)",
                       description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--to", required=True, choices=["mae", "detectron2", "mmseg"], help="the format to write")
    p.add_argument("--output", required=True, metavar="PATH")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow input files that need full unpickling (model-zoo .pkl)")
    p.set_defaults(func=_run_export)
    p = sub.add_parser(
        "export-encoder", help="write the encoder of a pretraining checkpoint in the official MAE format (= export --to mae)",
        description="Read a pretraining checkpoint (ours, official full MAE, Hugging Face ViTMAE) and write {'model': encoder} with the official parameter names.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--output", required=True, metavar="PATH")
    p.set_defaults(func=_run_export, to="mae", trust_checkpoint=False)


def _run_export(args) -> int:
    if args.to == "mmseg":
        from mae_transfer.checkpoint.mmseg import save_mmseg
        from mae_transfer.segmentation.task import read_segmenter_file, segmenter_class_names, segmenter_weights

        contents = read_segmenter_file(args.checkpoint, trust=args.trust_checkpoint)
        state, _ = segmenter_weights(contents, args.checkpoint)
        names, palette = segmenter_class_names(contents)
        path = save_mmseg(state, args.output, names, palette)
        print(f"{path}: {len(state)} tensors in mmsegmentation's MAE-UperNet layout (read back and checked)")
        return 0
    if args.to == "detectron2":
        from mae_transfer.checkpoint.detectron2 import save_vitdet
        from mae_transfer.detection.task import read_detector_weights

        state, _ = read_detector_weights(args.checkpoint, trust=args.trust_checkpoint)
        path = save_vitdet(state, args.output)
        print(f"{path}: {len(state)} tensors in detectron2's ViTDet layout (read back and checked)")
        return 0
    from mae_transfer.checkpoint import export_mae_encoder, read_checkpoint, to_vit_state_dict

    state = to_vit_state_dict(read_checkpoint(args.checkpoint))
    path = export_mae_encoder(state, args.output)
    print(path)
    return 0


def _add_presets(sub) -> None:
    p = sub.add_parser("presets", help="list the recipe presets")
    p.set_defaults(func=_run_presets)


def _run_presets(args) -> int:
    from mae_transfer.classification import config as cls_config
    from mae_transfer.detection import config as det_config
    from mae_transfer.pretrain import config as pre_config
    from mae_transfer.segmentation import config as seg_config

    for title, module in (("mae-transfer pretrain", pre_config), ("mae-transfer finetune / linprobe / inat / places", cls_config),
                          ("mae-transfer coco", det_config), ("mae-transfer ade20k", seg_config)):
        print(f"{title} --preset NAME:")
        for name in module.available_presets():
            first = (module.PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
            print(f"  {name:24s} {first}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mae_transfer import __version__

    parser = argparse.ArgumentParser(
        prog="mae-transfer",
        description="Pretrain MAE ViT backbones and measure how well they transfer (MAE paper protocols).",
        epilog="Run `mae-transfer COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"mae-transfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_pretrain(sub)
    _add_classification(sub, "finetune", "fine-tune a ViT end to end on an image-classification dataset", "finetune", None)
    _add_classification(sub, "linprobe", "linear probing of a frozen ViT (the official MAE protocol)", "linprobe", None)
    _add_classification(sub, "inat", "iNaturalist 2017/2018/2019 transfer (MAE paper Table 6)", None, None)
    _add_classification(sub, "places", "Places205/365 transfer (MAE paper Table 6)", None, None)
    _add_coco(sub)
    _add_ade20k(sub)
    _add_knn(sub)
    _add_bench(sub)
    _add_table(sub)
    _add_plot(sub)
    _add_speed(sub)
    _add_toy_data(sub)
    _add_export(sub)
    _add_presets(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may come anywhere (also after options): argparse's positional list ends
    # at the first option, so later overrides arrive as "unknown" and are put back here.
    args, unknown = parser.parse_known_args(argv)
    stray = [u for u in unknown if u.startswith("-") or "=" not in u]
    if stray or (unknown and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or unknown)}")
    if unknown:
        args.overrides = list(args.overrides or []) + unknown
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    from mae_transfer.checkpoint import CheckpointError
    from mae_transfer.config import ConfigError
    from mae_transfer.engine.trainer import TrainingInterrupted

    user_errors: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, FloatingPointError)
    try:
        from mae_transfer.data.errors import DataError

        user_errors += (DataError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        return args.func(args)
    except TrainingInterrupted as e:
        print(f"mae-transfer: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors as e:
        print(f"mae-transfer: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
