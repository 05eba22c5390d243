"""The ``pretrain`` command's entry in the registry (no benchmark task)."""

from __future__ import annotations

from mae_transfer.pretrain.data_spec import TOY_DATA
from mae_transfer.spec import DemoPlan, SpeedPlan, SpeedRun, TaskSpec

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


SPECS: dict[str, TaskSpec] = {
    "pretrain": TaskSpec(
        help="pretrain an MAE (paper recipe; toy data when no --data)",
        description=PRETRAIN_HELP,
        epilog=PRETRAIN_EPILOG,
        option_help={
            "data": "ImageFolder/ImageNet root (train/<class>/*.JPEG or <class>/*); default: built-in toy data",
            "model": "MAE model, e.g. mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14",
        },
        name="pretrain",
        title="MAE pretraining",
        command="pretrain",
        family="pretrain",
        config="mae_transfer.pretrain.config:build_config",
        task="mae_transfer.pretrain.task:PretrainTask",
        toy_data=TOY_DATA,
        benchmark=False,
        demo=DemoPlan(full=("train.epochs=30",), quick=("train.epochs=3",)),
        speed=SpeedPlan(
            run="mae_transfer.pretrain.speed:run_pretrain_speed",
            options=(
                "model",
                "batch_size",
                "steps",
                "warmup",
                "precision",
                "device",
                "compile",
                "grad_checkpointing",
                "img_size",
                "peak_tflops",
                "json",
            ),
            order=0,
            cpu_defaults={"batch_size": 8},
            report="mae_transfer.pretrain.speed:format_speed_report",
            writes_json=True,
            # README "Speed": the MAE ViT-B target, 40 % of the measured bf16 peak of an H100/H200.
            bench=(
                SpeedRun("MAE pretrain ViT-B/16", ">= 40 % MFU", {"model": "mae_vit_base_patch16", "batch_size": 256}),
                SpeedRun(
                    "MAE pretrain ViT-B/16 compiled",
                    ">= 40 % MFU",
                    {"model": "mae_vit_base_patch16", "batch_size": 256, "compile": True},
                ),
                SpeedRun("MAE pretrain ViT-L/16", ">= 40 % MFU", {"model": "mae_vit_large_patch16", "batch_size": 128}),
            ),
            tiny=(SpeedRun("MAE pretrain micro/8", "-", {"model": "mae_vit_micro_patch8", "batch_size": 8}),),
        ),
    ),
}
