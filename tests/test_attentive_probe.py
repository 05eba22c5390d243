"""The attentive probe (--protocol attentive): a frozen backbone, learned-query cross-attention heads, an
lr sweep in one backbone pass per batch, its rows and its table column."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from mae_transfer.checkpoint import export_mae_encoder
from mae_transfer.classification.attentive import (
    AttentiveProbe,
    clip_each_head,
    head_param_groups,
    sweep_losses,
    sweep_objective,
)
from mae_transfer.classification.config import build_config
from mae_transfer.classification.datasets import build_dataset
from mae_transfer.cli import main
from mae_transfer.engine.optim import Schedule, build_optimizer
from mae_transfer.models.vit import VisionTransformer, create_vit

# A nano ViT (2 blocks x 64, 4 heads, patch 8) on 32 px images.
SMALL = [
    "--model",
    "vit_nano_patch8",
    "model.img_size=32",
    "train.batch_size=16",
    "train.effective_batch_size=16",
    "train.num_workers=0",
    "train.progress=false",
    "train.log_every=1",
    "eval_batch_size=64",
]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_finetune_protocol_attentive_freezes_the_backbone_sweeps_in_one_pass_and_reaches_the_table(
    tmp_path, cache, capsys, monkeypatch
):
    """`finetune --protocol attentive` on the toy data with a 3-lr sweep: the backbone's tensors are
    bit-identical to the encoder's after training and only the heads moved; every batch (training and
    evaluation) runs the backbone once for all 3 heads; the rows say attentive, the chosen lr and every
    lr's top-1; `table` shows the attentive probe column."""
    encoder = export_mae_encoder(
        create_vit("vit_nano_patch8", img_size=32, num_classes=0, global_pool="token"), tmp_path / "enc.pth"
    )
    calls = []
    real = VisionTransformer.forward_features
    monkeypatch.setattr(VisionTransformer, "forward_features", lambda self, x: calls.append(len(x)) or real(self, x))
    out = tmp_path / "att"
    argv = ["finetune", "--protocol", "attentive", "--backbone", str(encoder), "--output", str(out), *SMALL]
    assert main([*argv, "--max-steps", "6", "model.lr_sweep=[0.5,1,4]"]) == 0
    printed = capsys.readouterr().out
    assert "attentive" in printed and "lr sweep, val top-1 per lr" in printed

    # One backbone pass per batch: 6 training steps of 16 images, then each val batch of 64 once.
    n_val = len(build_dataset("imagefolder", None, "val"))
    assert calls[:6] == [16] * 6 and sum(calls[6:]) == n_val and len(calls) == 6 + math.ceil(n_val / 64)

    trained = torch.load(out / "classifier.pth", weights_only=True)["model"]
    pretrained = torch.load(encoder, weights_only=True)["model"]
    for k, v in pretrained.items():  # every backbone tensor, bit for bit
        assert torch.equal(trained[f"backbone.{k}"], v), k
    assert not [k for k in trained if not k.startswith(("backbone.", "head."))]
    # Three heads, started from the same weights: each moved its own way (its own lr).
    for a, b in ((0, 1), (0, 2), (1, 2)):
        for name in ("pool.query", "pool.kv.weight", "linear.weight"):
            assert not torch.equal(trained[f"head.{a}.{name}"], trained[f"head.{b}.{name}"]), name

    rows = _rows(out)
    assert {r["task"] for r in rows} == {"attentive"} and {r["protocol"] for r in rows} == {"attentive"}
    top1 = next(r for r in rows if r["metric"] == "top1")
    sweep = top1["lr_sweep"]
    assert [s["lr_factor"] for s in sweep] == [0.5, 1.0, 4.0] and top1["selected_on"] == "val"
    assert top1["value"] == max(s["top1"] for s in sweep)
    best = next(s for s in sweep if s["top1"] == top1["value"])
    peak = build_config("toy_attentive").optim.blr * 16 / 256
    assert top1["lr_factor"] == best["lr_factor"] and top1["lr"] == pytest.approx(peak * best["lr_factor"])
    with open(out / "train.csv") as f:  # each head's loss is logged
        assert {"loss_x0.5", "loss_x1", "loss_x4"} <= set(next(csv.reader(f)))

    assert main(["table", "--results", str(out)]) == 0
    table = capsys.readouterr().out
    assert "attentive probe" in table and f"{top1['value']:.1f}" in table

    # --eval-only --weights: the same heads, the same numbers.
    again = tmp_path / "eval"
    assert main(["attentive", "--eval-only", "--weights", str(out / "classifier.pth"), "--output", str(again)]) == 0
    assert next(r for r in _rows(again) if r["metric"] == "top1")["lr_sweep"] == [
        {**s, "lr": None}
        for s in sweep  # no training, so no peak lr: the factors name the heads
    ]


def test_a_sweep_head_follows_exactly_the_run_of_its_lr_alone():
    """Head i of a sweep (with per-head clipping) ends bit-for-bit where a one-head run with its lr factor
    does: same init, its own gradient (the objective's sum), its own lr and its own clipping norm."""

    def train(factors):
        torch.manual_seed(0)
        vit = create_vit("vit_nano_patch8", img_size=32, num_classes=0, global_pool="")
        model = AttentiveProbe(vit, num_classes=5, num_probes=len(factors))
        model.backbone.requires_grad_(False)
        opt = build_optimizer("adamw", head_param_groups(model, factors, 0.05), 1.0, (0.9, 0.999), torch.device("cpu"))
        opt.register_step_pre_hook(clip_each_head(model, 0.5))
        schedule = Schedule(total_steps=4, peak_lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
            loss = sweep_objective(sweep_losses(model(x, all_heads=True), y))
            loss.backward()
            schedule.apply(opt, step)
            opt.step()
            opt.zero_grad()
        return model

    sweep = train([0.3, 1.0, 10.0])
    for i, f in enumerate([0.3, 10.0]):
        alone = train([f])
        for (name, a), b in zip(alone.head[0].state_dict().items(), sweep.head[2 * i].state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert not torch.allclose(sweep.head[0].linear.weight, sweep.head[2].linear.weight)


def test_the_attentive_probe_learns_real_images_on_a_frozen_random_vit(tmp_path, cache, shared):
    """Real photos (tiny_imagenet10, 10 per class): on a frozen random-init ViT the probe memorises its
    training images: the loss falls and top-1 on those images ends far above chance (10 %)."""
    source = shared / "data" / "tiny_imagenet10" / "train"
    if not source.is_dir():
        pytest.skip(f"tiny_imagenet10 not found at {source.parent}")
    data = tmp_path / "tiny"
    for cls in sorted(p for p in source.iterdir() if p.is_dir()):
        for split in ("train", "val"):  # val = the training images: memorisation
            (data / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:10]:
                (data / split / cls.name / f.name).symlink_to(f)
    out = tmp_path / "real"
    no_augmentation = ["data.auto_augment=null", "data.reprob=0", "data.min_scale=1.0"]
    argv = ["attentive", "--data", str(data), "--output", str(out), *SMALL, "--epochs", "10", "--blr", "0.1"]
    big_batch = ["train.batch_size=50", "train.effective_batch_size=50", "eval_batch_size=100"]
    assert main([*argv, *big_batch, *no_augmentation, "model.lr_sweep=null", "eval_every_epochs=0"]) == 0
    with open(out / "train.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 20 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses
    top1 = next(r["value"] for r in _rows(out) if r["metric"] == "top1")
    assert top1 >= 30, top1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["linprobe", "model.lr_sweep=[1,2]"], "model.lr_sweep is an option of the attentive probe"),
        (["attentive", "model.lr_sweep=[1,-2]"], "model.lr_sweep must be positive lr factors"),
        (["attentive", "model.lr_sweep=[1,1]"], "model.lr_sweep has a factor twice"),
        (["attentive", "optim.clip_grad=1.0"], "use head_clip_grad (each head on its own)"),
        (["attentive", "--trainable-blocks", "2"], "the attentive probe freezes the whole backbone"),
        (["attentive", "model.attentive_heads=5"], "model.attentive_heads: the pool's width 96"),
    ],
)
def test_bad_attentive_options_end_in_one_line(tmp_path, cache, capsys, argv, message):
    assert main([*argv, "--output", str(tmp_path / "x"), "--max-steps", "1"]) == 2
    assert message in capsys.readouterr().err


def test_existing_jobs_keep_their_identity():
    """The new fields at their defaults leave the config hash of every other protocol's job as it was."""
    from mae_transfer.config import identity

    for preset in ("linprobe", "finetune_vit_base", "toy_finetune"):
        ident = identity(build_config(preset))
        assert "head_clip_grad" not in ident
        assert "attentive_heads" not in ident["model"] and "lr_sweep" not in ident["model"]
    assert identity(build_config("toy_attentive"))["model"]["lr_sweep"] == [1.0, 3.0, 10.0]
