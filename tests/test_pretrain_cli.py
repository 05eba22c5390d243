"""`mae-transfer pretrain` end to end: toy run, kills and resumes, DDP, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import built_once

from mae_transfer.cli import main

# A nano MAE on 32 px toy images: seconds per epoch on one CPU core.
TINY = [
    "model.name=mae_vit_nano_patch8",
    "model.img_size=32",
    "data.toy_images_per_class=12",
    "train.batch_size=8",
    "train.effective_batch_size=16",
    "train.log_every=1",
    "train.num_workers=0",
    "train.progress=false",
    "vis.num_images=4",
    "optim.warmup_epochs=1",
]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train.jsonl").read_text().splitlines()]


def cli(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mae_transfer", "pretrain", *args]


@pytest.fixture(autouse=True)
def _one_toy_cache(cache):
    """The commands these tests start read the toy data of the test run's one cache."""


def env(tmp_path: Path) -> dict:
    e = dict(os.environ)
    e.setdefault("MAE_TRANSFER_CACHE", str(tmp_path / "cache"))
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def test_toy_pretraining_learns_and_writes_everything(tmp_path, cache, capsys):
    out = tmp_path / "run"
    rc = main(["pretrain", "--output", str(out), "--epochs", "4", "optim.blr=5e-3", *TINY])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "finished at step" in printed and "encoder.pth" in printed
    curve = losses(out)
    assert len(curve) == 4 * 7  # 120 toy images // 16 per step = 7 steps per epoch
    assert sum(curve[-5:]) / 5 < 0.9 * sum(curve[:5]) / 5, curve
    pngs = sorted((out / "reconstructions").glob("epoch*.png"))
    assert [p.name for p in pngs] == [f"epoch{i:04d}.png" for i in range(1, 5)]
    rec = [json.loads(line) for line in (out / "reconstruction.jsonl").read_text().splitlines()]
    assert rec[-1]["masked_pixel_mse"] < rec[0]["masked_pixel_mse"]
    # The exported encoder is in the official format and loads into a ViT for transfer.
    from mae_transfer.checkpoint import load_backbone
    from mae_transfer.models.vit import create_vit

    enc = torch.load(out / "encoder.pth", weights_only=False)
    assert set(enc) == {"model"} and "blocks.0.attn.qkv.weight" in enc["model"]
    assert not any(k.startswith("decoder") or k == "mask_token" for k in enc["model"])
    vit = create_vit("vit_nano_patch8", img_size=32, num_classes=10)
    load_backbone(vit, out / "encoder.pth", expected_missing=("head.*", "fc_norm.*"), expected_unexpected=("norm.*",))
    # Running the finished command again does no work and keeps the results.
    before = (out / "checkpoint-last.pth").stat().st_mtime_ns
    assert main(["pretrain", "--output", str(out), "--epochs", "4", "optim.blr=5e-3", *TINY]) == 0
    assert len(losses(out)) == len(curve)
    assert (out / "checkpoint-last.pth").stat().st_mtime_ns == before


def _wait_for(predicate, proc, timeout=120.0):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


KILLED_ARGS = ["--epochs", "3", *TINY, "train.ckpt_every_minutes=0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run every killed-and-resumed run must end as (one for all signals)."""

    def run(base: Path) -> None:
        subprocess.run(
            cli(base, "--output", str(base / "full"), *KILLED_ARGS), env=env(base), check=True, capture_output=True
        )

    return built_once(tmp_path_factory, "uninterrupted_pretraining", run) / "full"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_to_the_same_result(tmp_path, sig, uninterrupted):
    args = KILLED_ARGS
    full = uninterrupted

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        cli(tmp_path, "--output", str(run), *args), env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    # Kill it mid-epoch 2: after a few logged steps past the first epoch.
    ok = _wait_for(
        lambda: (run / "train.jsonl").exists() and len((run / "train.jsonl").read_text().splitlines()) >= 9, proc
    )
    assert ok, proc.communicate()[0].decode()[-3000:]
    proc.send_signal(sig)
    output = proc.communicate(timeout=60)[0].decode()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, output[-2000:]
        assert "run the same command again to resume" in output
    else:
        assert proc.returncode == -signal.SIGKILL
    # Whatever was on disk is a complete checkpoint; no temporary file is mistaken for one.
    state = torch.load(run / "checkpoint-last.pth", weights_only=False)
    stopped_at = state["step"]
    assert 0 < stopped_at < 21
    subprocess.run(cli(tmp_path, "--output", str(run), *args), env=env(tmp_path), check=True, capture_output=True)
    final = torch.load(run / "checkpoint-last.pth", weights_only=False)
    reference = torch.load(full / "checkpoint-last.pth", weights_only=False)
    assert final["step"] == reference["step"] == 21
    for k, v in reference["model"].items():
        torch.testing.assert_close(final["model"][k], v, atol=1e-5, rtol=1e-4, msg=k)
    assert losses(run) == pytest.approx(losses(full), abs=1e-5)


def test_two_process_ddp_matches_one_process_with_accumulation(tmp_path):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not found")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    args = ["--epochs", "2", *TINY, "--device", "cpu"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    e = env(tmp_path)
    e["OMP_NUM_THREADS"] = "1"
    subprocess.run(cli(tmp_path, "--output", str(one), *args), env=e, check=True, capture_output=True)
    r = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "mae_transfer",
            "pretrain",
            "--output",
            str(two),
            *args,
        ],
        env=e,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    cfg_one = (one / "config.yaml").read_text()
    cfg_two = (two / "config.yaml").read_text()
    assert "accum_steps: 2" in cfg_one and "world_size: 1" in cfg_one
    assert "accum_steps: 1" in cfg_two and "world_size: 2" in cfg_two
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 14
    # Same samples and masks per step: the curves agree up to float reduction order.
    assert b == pytest.approx(a, abs=1e-4)
    assert sum(a[-3:]) < sum(a[:3])


def test_missing_and_empty_data_folders_are_clear_errors(tmp_path, cache, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "r1"), *TINY]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert main(["pretrain", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "r2"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and "no images" in err.lower()


def test_corrupt_images_are_skipped_and_counted(tmp_path, cache, caplog):
    from mae_transfer.data.toy import write_imagefolder

    root = write_imagefolder(
        tmp_path / "data", num_classes=2, train_per_class=16, val_per_class=1, image_size=32, seed=0
    )
    victim = sorted((root / "train").rglob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated JPEG
    (root / "train" / sorted(os.listdir(root / "train"))[0] / "empty.jpg").write_bytes(b"")
    out = tmp_path / "run"
    rc = main(["pretrain", "--data", str(root), "--output", str(out), "--epochs", "1", *TINY])
    assert rc == 0
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert epochs[-1]["corrupt_images"] == 2
    assert victim.name in caplog.text


def test_a_checkpoint_of_another_model_is_refused(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--output", str(out), "--epochs", "1", *TINY]) == 0
    before = (out / "checkpoint-last.pth").read_bytes()
    capsys.readouterr()
    rc = main(["pretrain", "--output", str(out), "--epochs", "1", *TINY, "model.name=mae_vit_micro_patch8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "different model" in err and "mae_vit_micro_patch8" in err and str(out) in err
    assert (out / "checkpoint-last.pth").read_bytes() == before
    # --init with weights of another size names the file and both sizes.
    rc = main(
        [
            "pretrain",
            "--output",
            str(tmp_path / "other"),
            "--epochs",
            "1",
            *TINY,
            "model.name=mae_vit_micro_patch8",
            "model.img_size=32",
            "--init",
            str(out / "checkpoint-last.pth"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "checkpoint-last.pth" in err and "Traceback" not in err


def test_print_config_and_help(capsys):
    assert main(["pretrain", "--print-config", "--data", "/x"]) == 0
    out = capsys.readouterr().out
    # The paper's recipe is the default when real data is given.
    for line in (
        "name: mae_vit_base_patch16",
        "mask_ratio: 0.75",
        "norm_pix_loss: true",
        "blr: 0.00015",
        "weight_decay: 0.05",
        "warmup_epochs: 40.0",
        "epochs: 800",
        "effective_batch_size: 4096",
        "min_scale: 0.2",
    ):
        assert line in out, line
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "paper's recipe" in capsys.readouterr().out


def test_a_runs_config_yaml_as_preset_reproduces_the_run(tmp_path, cache):
    """config.yaml (with its "derived" section) goes back in through --preset: the same resolved
    config, and a run from it ends with the same weights."""
    import yaml

    first = tmp_path / "first"
    assert main(["pretrain", "--output", str(first), "--epochs", "1", *TINY]) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert "derived" in saved
    again = tmp_path / "again"
    assert main(["pretrain", "--preset", str(first / "config.yaml"), "--output", str(again)]) == 0
    resolved = yaml.safe_load((again / "config.yaml").read_text())
    assert {k: v for k, v in resolved.items() if k != "derived"} == {k: v for k, v in saved.items() if k != "derived"}
    a = torch.load(first / "encoder.pth", weights_only=True)["model"]
    b = torch.load(again / "encoder.pth", weights_only=True)["model"]
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_online_knn_logs_its_curve_and_the_plot_shows_it(tmp_path, cache):
    """`pretrain --knn-data DIR --knn-every 1`: the encoder's k-NN top-1 on DIR's val split after
    every epoch, in eval.csv next to the training curve, and beside the loss in the pretraining plot;
    without --knn-data nothing is evaluated (no eval.csv)."""
    from mae_transfer.cli import main
    from mae_transfer.data.toy import write_imagefolder
    from mae_transfer.evaluation.plots import plot_pretraining

    knn_data = write_imagefolder(tmp_path / "knn_images", train_per_class=8, val_per_class=4, image_size=32)
    out = tmp_path / "run"
    assert main(["pretrain", "--output", str(out), "--epochs", "2", "--knn-data", str(knn_data), *TINY]) == 0
    rows = (out / "eval.csv").read_text().splitlines()
    head = rows[0].split(",")
    assert {"epoch", "knn_top1", "knn_top5"} <= set(head) and len(rows) == 3  # after epochs 1 and 2
    for row in rows[1:]:
        value = dict(zip(head, row.split(",")))
        assert 0.0 <= float(value["knn_top1"]) <= float(value["knn_top5"]) <= 100.0
    assert [dict(zip(head, r.split(",")))["epoch"] for r in rows[1:]] == ["1", "2"]
    assert "online k-NN (k=20): top-1" in (out / "log.txt").read_text()
    assert plot_pretraining(out, tmp_path / "pre.png").stat().st_size > 1000

    plain = tmp_path / "plain"
    assert main(["pretrain", "--output", str(plain), "--epochs", "1", *TINY]) == 0
    assert not (plain / "eval.csv").exists()
