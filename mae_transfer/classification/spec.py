"""The classification tasks' entries in the registry (fine-tuning, linear and attentive probing, iNaturalist,
Places, k-NN)."""

from __future__ import annotations

from mae_transfer.classification.data_spec import NUM_CLASSES, TOY_DATA
from mae_transfer.spec import Column, DemoPlan, SpeedPlan, SpeedRun, TaskSpec, TrainedWeights

CLASSIFY_EPILOG = """\
protocols (MAE paper section 4 and appendix A):
  finetune   end-to-end, global average pool + fc_norm, layer-wise lr decay, RandAugment, mixup,
             cutmix, label smoothing, random erasing, AdamW, cosine with warmup (official scripts)
  linprobe   frozen encoder, class token, BatchNorm (no affine) + linear head, LARS
  partial    fine-tune only the last k blocks (paper Figure 9): --protocol partial --trainable-blocks k
  attentive  frozen encoder; one cross-attention block whose learned query pools ALL its output tokens
             (patch and class tokens) + linear head, AdamW, cosine (V-JEPA's attentive probe);
             model.lr_sweep=[0.25,0.5,1,2,4] trains one head per lr factor in the same pass and
             reports the best on val (chosen on val, as `knn --sweep` does)

examples:
  mae-transfer finetune --data /datasets/imagenet --backbone mae_pretrain_vit_base.pth
  mae-transfer linprobe --data /datasets/imagenet --backbone runs/pretrain-toy/encoder.pth
  mae-transfer attentive --data /datasets/imagenet --backbone mae_pretrain_vit_base.pth
  mae-transfer inat --year 2018 --protocol attentive --data /datasets/inat2018 --backbone ckpt.pth
  mae-transfer inat --year 2018 --data /datasets/inat2018 --backbone ckpt.pth --preset finetune_paper_table9
  mae-transfer places --version 365 --data /datasets/places365 --backbone ckpt.pth
  mae-transfer finetune --backbone runs/pretrain-toy/encoder.pth      # toy data, a few minutes on CPU
With no --backbone the ViT starts from random weights (the from-scratch baseline), and says so.
Results: <output>/results.jsonl (one row per metric), eval.csv per evaluated epoch, and a table.
"""


_FT = "finetune|"  # fine-tuning rows (partial fine-tuning reports protocol "partial": not this column)
_CLS = dict(
    epilog=CLASSIFY_EPILOG,
    family="classification",
    weights=TrainedWeights(
        read="mae_transfer.classification.task:read_classifier_weights",
        load="mae_transfer.classification.task:load_classifier_weights",
        artifact="classifier.pth",
        sections=("model",),
    ),
    config="mae_transfer.classification.config:build_config",
    task="mae_transfer.classification.task:ClassificationTask",
    report="mae_transfer.classification.task:report",
    toy_preset="toy_finetune",
)
_TRANSFER_HELP = {
    "inat": "iNaturalist 2017/2018/2019 transfer (MAE paper Table 6)",
    "places": "Places205/365 transfer (MAE paper Table 6)",
}


def _transfer(name: str, title: str, command: str, fixed: dict, quick: bool) -> TaskSpec:
    # iNaturalist and Places follow the paper's Table 9 setting (appendix A.5). The demo uses toy
    # splits with 20 validation images per class instead of 5, so that the comparison with random
    # weights is not decided by one or two images.
    demo = DemoPlan(full=("train.epochs=25",), quick=() if quick else None, toy_data={"val_per_category": 20})
    return TaskSpec(
        name=name,
        title=title,
        command=command,
        fixed={**fixed, "dataset": name},
        options=(*fixed, "protocol"),
        toy_data=TOY_DATA[name],
        num_classes=NUM_CLASSES[name],
        default_preset="finetune_paper_table9",
        table="transfer",
        demo=demo,
        help=_TRANSFER_HELP[command],
        description=_TRANSFER_HELP[command] + ".",
        columns=(
            Column(name, title, "top1", _FT, bar="top-1"),
            # --protocol attentive on this dataset: a column of its own (not the paper's fine-tuning),
            # shown where such a run exists (the paper's tables have no attentive probe).
            Column(f"{name}_attentive", f"{title} attentive", "top1", "attentive", keep="present"),
        ),
        **_CLS,
    )


SPECS: dict[str, TaskSpec] = {
    **{
        f"inat{y}": _transfer(f"inat{y}", f"iNat {y}", "inat", {"year": y}, quick=y == 2018) for y in (2017, 2018, 2019)
    },
    **{
        f"places{v}": _transfer(f"places{v}", f"Places{v}", "places", {"version": v}, quick=v == 365)
        for v in (205, 365)
    },
    "finetune": TaskSpec(
        help="fine-tune a ViT end to end on an image-classification dataset",
        description="Fine-tune a ViT end to end on an image-classification dataset.",
        name="finetune",
        title="ImageNet fine-tune",
        command="finetune",
        # --protocol: finetune (the default), or another protocol on the same data (partial comes with
        # --trainable-blocks; linprobe and attentive have their own tasks and rows).
        options=("dataset", "protocol"),
        data_group="imagenet",
        toy_data=TOY_DATA["imagefolder"],
        num_classes=NUM_CLASSES["imagefolder"],
        default_preset="finetune_vit_base",
        table="imagenet",
        demo=DemoPlan(full=("train.epochs=15",), quick=()),
        speed=SpeedPlan(
            run="mae_transfer.classification.speed:run_finetune_speed",
            options=("preset", "batch_size", "steps", "warmup", "precision", "device", "compile", "json"),
            order=1,
            bench=(
                SpeedRun("fine-tune ViT-B/16", ">= 3000 img/s", {"preset": "finetune_vit_base", "batch_size": 128}),
            ),
            tiny=(SpeedRun("fine-tune micro/8", "-", {"preset": "toy_finetune", "batch_size": 8, "num_classes": 10}),),
        ),
        columns=(Column("finetune", "fine-tune", "top1", _FT, bar="top-1"),),
        **_CLS,
    ),
    "linprobe": TaskSpec(
        help="linear probing of a frozen ViT (the official MAE protocol)",
        description="Linear probing of a frozen ViT (the official MAE protocol).",
        name="linprobe",
        title="linear probe",
        command="linprobe",
        fixed={"protocol": "linprobe"},
        options=("dataset",),
        data_group="imagenet",
        toy_data=TOY_DATA["imagefolder"],
        num_classes=NUM_CLASSES["imagefolder"],
        default_preset="linprobe",
        table="imagenet",
        demo=DemoPlan(full=("train.epochs=15",), quick=()),
        columns=(Column("linprobe", "linear probe", "top1", "linprobe|", bar="top-1"),),
        **{**_CLS, "toy_preset": "toy_linprobe"},
    ),
    "attentive": TaskSpec(
        help="attentive probing of a frozen ViT (learned-query cross-attention pool + linear head, V-JEPA)",
        description="Attentive probing of a frozen ViT: one cross-attention block whose learned query pools "
        "every output token, and a linear head, trained with V-JEPA's frozen-evaluation recipe "
        "(model.lr_sweep=[...] trains several learning rates in one pass).",
        name="attentive",
        title="attentive probe",
        command="attentive",
        fixed={"protocol": "attentive"},
        options=("dataset",),
        data_group="imagenet",
        toy_data=TOY_DATA["imagefolder"],
        num_classes=NUM_CLASSES["imagefolder"],
        default_preset="attentive",
        table="imagenet",
        demo=DemoPlan(full=("train.epochs=15",)),
        # Shown where an attentive run exists (the paper has no attentive probe to print beside it).
        columns=(Column("attentive", "attentive probe", "top1", "attentive", keep="present", bar="top-1"),),
        **{**_CLS, "toy_preset": "toy_attentive"},
    ),
    "knn": TaskSpec(
        help="k-NN and linear-probe-sweep evaluation of frozen features",
        description="Evaluate frozen features: weighted k-NN (cosine, T=0.07) and, with --sweep, "
        "a linear probe that trains several learning rates at once on the extracted features.",
        name="knn",
        title="k-NN",
        command="knn",
        family="frozen",
        task="mae_transfer.classification.frozen:run_frozen_eval",
        fixed={"sweep": True},
        data_group="imagenet",
        toy_data=TOY_DATA["imagefolder"],
        num_classes=NUM_CLASSES["imagefolder"],
        toy_preset=None,
        table="imagenet",
        trains=False,
        native_resolution=True,
        demo=DemoPlan(full=(), quick=()),
        columns=(Column("knn", "k-NN", "top1", r"knn\d+", bar="top-1", prefer="knn"),),
    ),
}


def _fixed(key: str) -> list:
    return sorted({s.fixed[key] for s in SPECS.values() if key in s.fixed})


# The choices of the classification options, from the entries above (one place names the datasets).
DATASETS = list(TOY_DATA)  # imagefolder: an ImageNet-style folder, any classes; then iNat and Places
INAT_YEARS = _fixed("year")
PLACES_VERSIONS = _fixed("version")
# partial: fine-tuning of the last k blocks (Figure 9); attentive: V-JEPA's attentive probe. The first is
# the default of --protocol.
PROTOCOLS = ["finetune", "linprobe", "partial", "attentive"]


def protocol_and_preset(spec: TaskSpec, opts: dict, toy: bool) -> tuple[str | None, str | None]:
    """The protocol and preset of a classification run: fine-tuning with ``--trainable-blocks`` is
    partial fine-tuning (the paper's Figure 9); the linear and attentive probes have their own recipes
    whatever the data (the official MAE linprobe script: ``linprobe``, ``toy_linprobe`` on toy data;
    V-JEPA's probe: ``attentive``, ``toy_attentive``); otherwise the task's presets. ``--preset`` wins."""
    protocol = opts.get("protocol")
    if protocol == "finetune" and opts.get("trainable_blocks"):
        protocol = "partial"
    if opts.get("preset"):
        return protocol, opts["preset"]
    if protocol in ("linprobe", "attentive"):
        return protocol, f"toy_{protocol}" if toy else protocol
    return protocol, spec.toy_preset if toy else spec.default_preset
