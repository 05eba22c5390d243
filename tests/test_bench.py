"""The evaluation runner: planning, skipping done jobs, surviving failures, resuming after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from mae_transfer.checkpoint import export_mae_encoder
from mae_transfer.cli import main
from mae_transfer.config import ConfigError
from mae_transfer.evaluation import runner as bench
from mae_transfer.evaluation.registry import benchmark_tasks
from mae_transfer.evaluation.store import ResultStore
from mae_transfer.models.vit import create_vit


@pytest.fixture
def encoder(tmp_path) -> Path:
    torch.manual_seed(0)
    return export_mae_encoder(
        create_vit("vit_nano_patch8", img_size=64, num_classes=0, global_pool="token"), tmp_path / "weights" / "enc.pth"
    )


def test_bad_specifications_name_the_option(tmp_path, encoder):
    with pytest.raises(ConfigError, match="no such file"):
        bench.parse_backbones([f"mae={tmp_path / 'missing.pth'}"])
    with pytest.raises(ConfigError, match="given twice"):
        bench.parse_backbones([f"a={encoder}", "a=random"])
    with pytest.raises(ConfigError, match="unknown task.*cocoo"):
        bench.parse_tasks("coco,cocoo")
    with pytest.raises(ConfigError, match="TASK:KEY=VALUE"):
        bench.parse_overrides(["train.epochs=3"])
    with pytest.raises(ConfigError, match="TASK=VALUE"):
        bench.parse_task_map(["cityscapes=/data"], "--data", benchmark_tasks())
    assert [b.name for b in bench.parse_backbones([str(encoder), "scratch=random"])] == ["enc", "scratch"]
    assert bench.parse_tasks("all") == benchmark_tasks()


def test_job_identity_follows_weights_and_config_not_file_names(tmp_path, encoder):
    copy = tmp_path / "elsewhere" / "renamed.pth"
    copy.parent.mkdir()
    copy.write_bytes(encoder.read_bytes())
    a, b, rnd = bench.parse_backbones([f"a={encoder}", f"b={copy}", "scratch=random"])
    jobs = bench.plan_jobs([a, b, rnd], ["linprobe", "knn"], tmp_path / "res")
    by = {(j.backbone.name, j.task): j for j in jobs}
    assert by["a", "linprobe"].key == by["b", "linprobe"].key  # same bytes, other path
    assert by["a", "knn"].key == by["b", "knn"].key
    assert by["a", "linprobe"].key != by["scratch", "linprobe"].key
    # Random weights get the architecture of the checkpoint, also for k-NN's input size.
    assert by["scratch", "linprobe"].model == "vit_nano_patch8"
    assert by["scratch", "knn"].argv[-5:] == ["--model", "vit_nano_patch8", "--img-size", "64", "--sweep"]
    other = bench.plan_jobs([a], ["linprobe"], tmp_path / "res", overrides={"linprobe": ["train.epochs=2"]})
    assert other[0].key != by["a", "linprobe"].key
    with pytest.raises(ConfigError, match="linprobe job of a: unknown option train.nonsense"):
        bench.plan_jobs([a], ["linprobe"], tmp_path / "res", overrides={"linprobe": ["train.nonsense=1"]})


def test_print_launcher_gives_torchrun_commands(tmp_path, encoder, capsys):
    rc = main(
        [
            "bench",
            "--backbone",
            f"mae={encoder}",
            "--tasks",
            "linprobe,knn",
            "--results",
            str(tmp_path / "res"),
            "--launcher",
            "print",
            "--nproc-per-node",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "--nproc_per_node=4 -m mae_transfer linprobe" in out
    # k-NN shards its feature extraction too (test_classification_cli: same numbers as one process).
    assert "torch.distributed.run --standalone --nproc_per_node=4 -m mae_transfer knn" in out
    assert not (tmp_path / "res" / "results.jsonl").exists()


def _rows(results: Path) -> list[dict]:
    return ResultStore(results).read()


def test_bench_records_skips_and_survives_a_failing_job(tmp_path, encoder, cache, capsys):
    broken = tmp_path / "broken_inat"
    broken.mkdir()
    (broken / "train2018.json").write_text("{not json")
    res = tmp_path / "res"
    argv = [
        "bench",
        "--backbone",
        f"mae={encoder}",
        "--backbone",
        "scratch=random",
        "--tasks",
        "knn,linprobe,inat2018",
        "--set",
        "linprobe:train.epochs=1",
        "--data",
        f"inat2018={broken}",
        "--results",
        str(res),
        "--in-process",
    ]
    assert main(argv) == 1  # the inat jobs fail, the others finish
    out = capsys.readouterr().out
    rows = _rows(res)
    failed = [r for r in rows if r["metric"] == "job_failed"]
    assert {(r["backbone"], r["task"]) for r in failed} == {("mae", "inat2018"), ("scratch", "inat2018")}
    assert all("train2018.json" in r["error"] for r in failed)
    good = [r for r in rows if r["metric"] != "job_failed"]
    assert {(r["backbone"], r["task"]) for r in good} == {
        (b, t) for b in ("mae", "scratch") for t in ("knn", "linprobe")
    }
    for r in good:  # provenance on every row
        assert r["backbone_sha256"] == (
            bench.parse_backbones([str(encoder)])[0].sha256 if r["backbone"] == "mae" else None
        )
        assert r["git_commit"] and r["versions"]["torch"] and r["hardware"] and r["date"] and r["job_key"]
        assert r["wall_time_s"] > 0 and r["model"] == "vit_nano_patch8"
    assert "failed" in out and "| mae" in out
    tables = (res / "tables.md").read_text()

    # Second run: nothing that finished runs again, the failures are retried (and fail again).
    assert main(argv) == 1
    out2 = capsys.readouterr().out
    assert out2.count("done before, skipped") == 4 and out2.count("FAILED after") == 2
    rows2 = _rows(res)
    assert [r for r in rows2 if r["metric"] != "job_failed"] == good
    assert (res / "tables.md").read_text() == tables
    # The store reads as a table.
    pd = pytest.importorskip("pandas")
    frame = pd.read_json(res / "results.jsonl", lines=True)
    assert len(frame) == len(rows2) and {"backbone", "task", "metric", "value", "config_hash"} <= set(frame.columns)


def test_killed_benchmark_redoes_only_the_interrupted_job(tmp_path, encoder, cache, capsys):
    # The jobs run inside the benchmark's process (--in-process: two interpreter starts fewer); the
    # signal forwarding to job processes is shown by tests/test_cluster.py (JobCommand).
    res = tmp_path / "res"
    epochs = 5  # 30 steps of ~0.3 s on a CPU: the stop (after 3 logged steps) lands in the middle, not after the end
    argv = [
        sys.executable,
        "-m",
        "mae_transfer",
        "bench",
        "--backbone",
        f"mae={encoder}",
        "--tasks",
        "knn,linprobe",
        "--set",
        f"linprobe:train.epochs={epochs}",
        "--set",
        "linprobe:train.log_every=1",
        "--results",
        str(res),
        "--in-process",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 240
    train_csv = None
    while time.time() < deadline and proc.poll() is None:
        found = list(res.glob("runs/mae/linprobe-*/train.csv"))
        if found and len(found[0].read_text().splitlines()) > 3:
            train_csv = found[0]
            break
        time.sleep(0.5)
    assert train_csv is not None, f"linprobe never started: {proc.communicate()[0] if proc.poll() is not None else ''}"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "run the same command again to resume" in out
    run_dir = train_csv.parent
    assert (run_dir / "checkpoint-last.pth").exists()
    stopped_at = torch.load(run_dir / "checkpoint-last.pth", map_location="cpu", weights_only=False)["step"]
    assert 0 < stopped_at < epochs * 6
    rows = _rows(res)
    assert {r["task"] for r in rows} == {"knn"}  # the interrupted job recorded nothing

    assert main(argv[3:]) == 0  # the same command again, in this process
    out = capsys.readouterr().out
    assert "knn · mae: done before, skipped" in out
    assert "linprobe · mae: resuming" in out
    assert "jobs: 1 run, 1 already done" in out
    rows = _rows(res)
    assert {r["task"] for r in rows} == {"knn", "linprobe"}
    log = (run_dir / "log.txt").read_text()
    assert f"resuming from {run_dir / 'checkpoint-last.pth'} at step {stopped_at}" in log
    assert json.loads((run_dir / "results.jsonl").read_text().splitlines()[0])["step"] == epochs * 6
