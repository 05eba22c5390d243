"""Classification transfer end to end on the toy data: protocols, frozen weights, resume, results."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, result_rows

from mae_transfer.cli import main

# A nano ViT (2 blocks x 64, patch 8) on 32 px toy images: a few seconds per run.
SMALL = [
    "--model",
    "vit_nano_patch8",
    "model.img_size=32",
    "train.batch_size=16",
    "train.effective_batch_size=16",
    "train.num_workers=0",
    "train.progress=false",
    "train.log_every=1",
    "eval_every_epochs=1",
    "optim.warmup_epochs=1",
    "eval_batch_size=32",
]


@pytest.fixture
def encoder(tmp_path, cache):
    """A briefly pretrained nano MAE encoder in the official format."""
    out = tmp_path / "pre"
    rc = main(
        [
            "pretrain",
            "--output",
            str(out),
            "--epochs",
            "1",
            "model.name=mae_vit_nano_patch8",
            "model.img_size=32",
            "data.toy_images_per_class=8",
            "train.batch_size=16",
            "train.effective_batch_size=16",
            "train.num_workers=0",
            "train.progress=false",
            "vis.every_epochs=0",
        ]
    )
    assert rc == 0
    return out / "encoder.pth"


def test_linear_probe_leaves_every_backbone_parameter_bit_identical(tmp_path, cache, encoder, capsys):
    out = tmp_path / "lin"
    assert main(["linprobe", "--backbone", str(encoder), "--output", str(out), "--epochs", "2", *SMALL]) == 0
    assert "linprobe" in capsys.readouterr().out
    trained = torch.load(out / "checkpoint-last.pth", weights_only=False)["model"]
    pretrained = torch.load(encoder, weights_only=False)["model"]
    compared = 0
    for k, v in pretrained.items():
        if k in trained:
            assert torch.equal(trained[k], v), k
            compared += 1
    assert compared == len(pretrained)  # norm, blocks, embeddings: all frozen and all present
    # The head did train, and its BatchNorm has no affine parameters (official probe).
    assert "head.1.weight" in trained and "head.0.weight" not in trained and "head.0.running_mean" in trained
    r = result_rows(out)
    assert set(r) == {"top1", "top5", "mean_per_class", "top1_best_epoch"}
    assert 0 <= r["top1"] <= 100


def test_partial_finetuning_trains_only_the_last_blocks(tmp_path, cache, encoder):
    out = tmp_path / "partial"
    assert (
        main(
            [
                "finetune",
                "--backbone",
                str(encoder),
                "--trainable-blocks",
                "1",
                "--output",
                str(out),
                "--epochs",
                "1",
                *SMALL,
            ]
        )
        == 0
    )
    trained = torch.load(out / "checkpoint-last.pth", weights_only=False)["model"]
    pretrained = torch.load(encoder, weights_only=False)["model"]
    assert torch.equal(trained["blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])
    assert torch.equal(trained["patch_embed.proj.weight"], pretrained["patch_embed.proj.weight"])
    assert not torch.equal(trained["blocks.1.attn.qkv.weight"], pretrained["blocks.1.attn.qkv.weight"])


def test_finetuning_from_scratch_says_so_and_writes_results(tmp_path, cache, caplog):
    out = tmp_path / "ft"
    assert main(["finetune", "--output", str(out), "--epochs", "2", *SMALL]) == 0
    assert "RANDOM weights" in caplog.text
    r = result_rows(out)
    assert r["top1"] >= 0 and r["top5"] >= r["top1"]
    evals = (out / "eval.jsonl").read_text().splitlines()
    assert len(evals) == 2


@pytest.mark.parametrize(
    "command,extra",
    [
        ("inat", ["--year", "2017"]),
        ("inat", ["--year", "2019"]),
        ("places", ["--version", "205"]),
        ("places", ["--version", "365"]),
    ],
)
def test_inat_and_places_commands_run_on_their_official_formats(tmp_path, cache, command, extra):
    out = tmp_path / command
    assert main([command, *extra, "--output", str(out), "--epochs", "1", *SMALL]) == 0
    r = result_rows(out)
    assert 0 <= r["mean_per_class"] <= 100


def test_knn_and_sweep_on_frozen_features(tmp_path, cache, encoder, capsys):
    out = tmp_path / "knn"
    assert (
        main(["knn", "--backbone", str(encoder), "--output", str(out), "--k", "5,20", "--sweep", "--device", "cpu"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "k-NN k=5" in printed and "linear sweep" in printed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["protocol"] for r in rows} == {"knn5", "knn20", "linprobe_sweep"}
    # A standalone run's rows are fully described (issue 23, 9): the ViT evaluated and the provenance.
    assert {r["model"] for r in rows} == {"vit_nano_patch8"}  # read from the nano encoder
    assert all(r["git_commit"] is not None and r["versions"] and r["hardware"] and r["date"] for r in rows)


def test_knn_under_torchrun_shards_the_features_and_gives_the_same_numbers(tmp_path, cache, encoder, capsys):
    """k-NN runs on the engine's EvalContext: under `torchrun --nproc_per_node 2` (gloo) each process
    extracts its shard of each split, the features are gathered and the main process scores them."""
    single = tmp_path / "one"
    assert main(["knn", "--backbone", str(encoder), "--output", str(single), "--k", "5,20", "--device", "cpu"]) == 0
    capsys.readouterr()
    two = tmp_path / "two"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    argv += ["mae_transfer", "knn", "--backbone", str(encoder), "--output", str(two), "--k", "5,20", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("k-NN k=5") == 1  # the main process reports
    values = lambda d: {(r["protocol"], r["metric"]): r["value"] for r in map(json.loads, (d / "results.jsonl").open())}  # noqa: E731
    assert values(two) == values(single) and len(values(single)) == 9  # k=5, k=20 and the sweep, 3 metrics each


def test_finetuning_resumes_after_a_kill(tmp_path, cache):
    env = dict(os.environ, MAE_TRANSFER_CACHE=str(cache), PYTHONUNBUFFERED="1")
    command = ["finetune", "--epochs", "3", *SMALL, "train.ckpt_every_minutes=0"]
    args = [sys.executable, "-m", "mae_transfer", *command]
    full = tmp_path / "full"  # the uninterrupted run, in this process (one interpreter start less)
    assert main([*command, "--output", str(full)]) == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, "--output", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    jl = run / "train.jsonl"
    start = time.monotonic()
    while time.monotonic() - start < 120 and proc.poll() is None:
        if jl.exists() and len(jl.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = torch.load(run / "checkpoint-last.pth", weights_only=False)["step"]
    subprocess.run([*args, "--output", str(run)], env=env, check=True, capture_output=True)
    final = torch.load(run / "checkpoint-last.pth", weights_only=False)
    ref = torch.load(full / "checkpoint-last.pth", weights_only=False)
    assert 0 < steps_before < final["step"] == ref["step"]
    for k, v in ref["model"].items():
        torch.testing.assert_close(final["model"][k], v, atol=1e-5, rtol=1e-4, msg=k)
    assert result_rows(run)["top1"] == pytest.approx(result_rows(full)["top1"])


def test_a_standalone_run_reaches_the_tables(tmp_path, cache, capsys):
    """`inat --year 2018 --output R` then `table --results R`: Table 6 shows that run's number (its
    result rows name the benchmark task, not just "classification")."""
    out = tmp_path / "inat"
    assert main(["inat", "--year", "2018", "--output", str(out), "--epochs", "1", *SMALL]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"inat2018"}
    top1 = next(r["value"] for r in rows if r["metric"] == "top1")
    capsys.readouterr()
    assert main(["table", "--results", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Table 6" in printed and "iNat 2018" in printed and f"{top1:.1f}" in printed


def test_runs_round_trip_config_resume_and_eval_only(tmp_path, cache, encoder, capsys):
    """A run's config.yaml reproduces its resolved config; --resume takes a checkpoint or a run
    directory; --eval-only --weights gives the top-1 the run ended with (classifier.pth or the
    training checkpoint), and refuses a backbone file with a clear line."""
    import yaml

    run = tmp_path / "ft"
    argv = ["finetune", "--backbone", str(encoder), "--epochs", "2", *SMALL]
    assert main([*argv, "--output", str(run)]) == 0
    end = {r["metric"]: r["value"] for r in map(json.loads, (run / "results.jsonl").read_text().splitlines())}
    assert (run / "classifier.pth").exists()
    trained_row = json.loads((run / "results.jsonl").read_text().splitlines()[0])
    # A run made without `bench` is described as fully as a benchmark's (what ran it, where, when).
    assert trained_row["backbone"] == str(encoder) and trained_row["model"] == "vit_nano_patch8"
    assert all(trained_row[k] for k in ("versions", "hardware", "date"))
    capsys.readouterr()

    assert main([*argv, "--print-config"]) == 0
    original = yaml.safe_load(capsys.readouterr().out)
    assert main(["finetune", "--preset", str(run / "config.yaml"), "--backbone", str(encoder), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == original

    for weights in (
        run / "classifier.pth",
        run / "checkpoint-last.pth",
        run,
    ):  # a run directory: its checkpoint-last.pth
        out = tmp_path / f"eval-{weights.stem}"
        assert (
            main(["finetune", "--eval-only", "--weights", str(weights), "--output", str(out), "train.num_workers=0"])
            == 0
        )
        rows = {r["metric"]: r["value"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
        assert rows["top1"] == end["top1"] and rows["top5"] == end["top5"]
        first = json.loads((out / "results.jsonl").read_text().splitlines()[0])
        assert first["step"] == -1
        # The rows name the weights evaluated (not "random init"), and share the run's config hash.
        evaluated = weights if weights.is_file() else weights / "checkpoint-last.pth"
        assert first["backbone"] == str(evaluated.resolve()) and first["weights_format"] == "mae-transfer"
        assert first["backbone_sha256"] == hashlib.sha256(evaluated.read_bytes()).hexdigest()
        assert first["config_hash"] == trained_row["config_hash"]
    assert main(["finetune", "--eval-only", "--weights", str(encoder), "--output", str(tmp_path / "bad")]) == 2
    assert "looks like a backbone" in capsys.readouterr().err

    # --resume PATH (a run directory or its checkpoint): a new run directory continues from there,
    # here with a longer schedule.
    more = tmp_path / "more"
    assert (
        main(
            [
                "finetune",
                "--backbone",
                str(encoder),
                "--epochs",
                "3",
                *SMALL,
                "--output",
                str(more),
                "--resume",
                str(run / "checkpoint-last.pth"),
            ]
        )
        == 0
    )
    steps_done = json.loads((run / "results.jsonl").read_text().splitlines()[0])["step"]
    assert f"resuming from {run / 'checkpoint-last.pth'} at step {steps_done}" in (more / "log.txt").read_text()
    assert json.loads((more / "results.jsonl").read_text().splitlines()[0])["step"] == steps_done * 3 // 2
    assert main(["finetune", "--output", str(tmp_path / "x"), "--resume", str(tmp_path / "nowhere")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_knn_from_random_weights_is_the_same_network_on_every_run(tmp_path):
    """Without --backbone the k-NN baseline is a seeded random init: two runs (the global generator
    in another state for the second) give the same numbers."""
    from mae_transfer.data.toy import write_imagefolder

    data = write_imagefolder(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=3, image_size=32)
    values = []
    for run in ("a", "b"):
        argv = ["knn", "--data", str(data), "--model", "vit_nano_patch8", "--img-size", "32", "--k", "1,5"]
        assert main([*argv, "--output", str(tmp_path / run)]) == 0
        rows = [json.loads(line) for line in (tmp_path / run / "results.jsonl").read_text().splitlines()]
        values.append([(r["protocol"], r["metric"], r["value"]) for r in rows])
    assert values[0] == values[1]
