"""The shared training engine: parameter groups, schedule, sampler, exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from mae_transfer.checkpoint import CheckpointError
from mae_transfer.config import ConfigError, parse_overrides
from mae_transfer.engine import DistInfo, OptimConfig, Schedule, TrainConfig, Trainer, TrainTask, param_groups
from mae_transfer.engine.sampler import EpochBatchSampler
from mae_transfer.models.vit import VisionTransformer


def official_lrd_scales(depth: int, decay: float) -> dict[str, float]:
    """The official rule (MAE-repo util/lr_decay.py): scale = decay ** (num_layers - layer_id),
    num_layers = depth + 1; embeddings are layer 0, block i is layer i + 1, the rest num_layers."""
    num_layers = depth + 1
    scales = {"patch_embed": decay**num_layers, "cls_token": decay**num_layers, "pos_embed": decay**num_layers}
    for i in range(depth):
        scales[f"blocks.{i}"] = decay ** (num_layers - (i + 1))
    scales["head"] = scales["fc_norm"] = 1.0
    return scales


def test_layer_decay_groups_match_the_official_rule():
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3)
    groups = param_groups(vit, weight_decay=0.05, layer_decay=0.75, no_weight_decay=vit.no_weight_decay())
    expected = official_lrd_scales(4, 0.75)
    seen = set()
    for g in groups:
        for name, p in zip(g["param_names"], g["params"]):
            key = next(k for k in expected if name == k or name.startswith(k + "."))
            assert g["lr_scale"] == pytest.approx(expected[key]), name
            no_decay = p.ndim == 1 or name in ("pos_embed", "cls_token")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
            seen.add(name)
    assert seen == {n for n, p in vit.named_parameters() if p.requires_grad}
    assert expected["patch_embed"] == pytest.approx(0.75**5)  # decay^(L+1) for L = 4 blocks


def test_layer_decay_follows_the_backbone_wherever_it_sits():
    # The backbone contract: param_groups finds the module with layer_id, under any name, and puts
    # everything else (heads, necks) at full lr; a backbone of another kind brings its own rule.
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0)
    model = nn.ModuleDict({"neck": nn.Linear(32, 8), "encoder": vit})
    scales = {n: g["lr_scale"] for g in param_groups(model, 0.05, 0.75) for n in g["param_names"]}
    alone = {n: g["lr_scale"] for g in param_groups(vit, 0.05, 0.75) for n in g["param_names"]}
    assert all(scales["encoder." + n] == pytest.approx(v) for n, v in alone.items())
    assert scales["neck.weight"] == 1.0 and scales["encoder.blocks.0.attn.qkv.weight"] == pytest.approx(0.75**4)
    assert [f["reduction"] for f in vit.feature_info] == [8] * 4 and vit.feature_info[-1]["module"] == "blocks.3"

    class TwoStages(nn.Module):  # a hierarchical backbone: stage i is layer i + 1
        num_layer_ids = 4

        def __init__(self):
            super().__init__()
            self.stem, self.stages = nn.Conv2d(3, 4, 1), nn.ModuleList([nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)])

        def layer_id(self, name):
            return 0 if name.startswith("stem") else int(name.split(".")[1]) + 1

    other = nn.ModuleDict({"backbone": TwoStages(), "head": nn.Linear(4, 2)})
    scales = {n: g["lr_scale"] for g in param_groups(other, 0.05, 0.5) for n in g["param_names"]}
    assert (
        scales["backbone.stem.weight"] == 0.5**3
        and scales["backbone.stages.1.weight"] == 0.5
        and scales["head.weight"] == 1.0
    )


def test_cosine_schedule_matches_the_official_formula():
    # Official per-iteration rule (MAE-repo util/lr_sched.py), in fractional epochs.
    lr, min_lr, warmup_ep, epochs, spe = 1e-3, 1e-6, 5, 20, 7

    def official(epoch: float) -> float:
        if epoch < warmup_ep:
            return lr * epoch / warmup_ep
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_ep) / (epochs - warmup_ep)))

    s = Schedule(total_steps=epochs * spe, warmup_steps=warmup_ep * spe, peak_lr=lr, min_lr=min_lr)
    for step in range(epochs * spe):
        assert s.lr(step) == pytest.approx(official(step / spe), rel=1e-9, abs=1e-15)


def test_step_and_poly_schedules():
    s = Schedule(
        total_steps=100, warmup_steps=10, kind="step", peak_lr=1.0, milestones=(50, 80), warmup_start_factor=0.001
    )
    assert s.lr(0) == pytest.approx(0.001)
    assert s.lr(20) == 1.0 and s.lr(60) == pytest.approx(0.1) and s.lr(90) == pytest.approx(0.01)
    p = Schedule(total_steps=110, warmup_steps=10, kind="poly", peak_lr=1.0, power=1.0)
    assert p.lr(60) == pytest.approx(0.5) and p.lr(110) == pytest.approx(0.0)


@pytest.mark.parametrize("world,accum", [(1, 4), (2, 2), (4, 1)])
def test_sampler_gives_the_same_effective_batches_for_any_layout(world, accum):
    n, b = 103, 4
    reference = EpochBatchSampler(n, b * 4, 1, 0, 1, seed=3)  # one process, one big batch
    reference.set_epoch(2)
    ref_idx = list(reference)
    samplers = [EpochBatchSampler(n, b, world, r, accum, seed=3) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [list(s) for s in samplers]
    assert samplers[0].steps_per_epoch == reference.steps_per_epoch == 6
    for step in range(6):
        got = set()
        for r in range(world):
            got |= set(per_rank[r][step * accum * b : (step + 1) * accum * b])
        assert got == set(ref_idx[step * 16 : (step + 1) * 16])
    # Resuming mid-epoch continues with exactly the remaining micro-batches.
    s = EpochBatchSampler(n, b, world, 0, accum, seed=3)
    s.set_epoch(2, start_batch=3)
    assert list(s) == per_rank[0][3 * b :]


@pytest.mark.parametrize(
    "batch, effective, world, layout",
    [
        (8, 16, 1, (8, 2)),  # one process accumulates
        (8, 16, 4, (4, 1)),  # a toy recipe on 4 processes keeps its batch (and lr): 4 each
        (64, 64, 8, (8, 1)),
        (6, 64, 4, (4, 4)),  # 6 does not divide 16 per process: the largest share that does
        (96, 4096, 8, (64, 8)),  # 96 per GPU under 4096 on 8 GPUs: 64 x 8 accumulation steps
        (8, None, 4, (8, 1)),  # no effective batch: whatever the processes make
        (8, 16, 3, (8, 1)),  # 16 over 3 processes: impossible, the nearest multiple (24, said in the log)
        (8, 1016, 8, (8, 16)),  # only a share of 1 divides 127: nearest multiple, not 8x slower steps
    ],
)
def test_the_effective_batch_survives_any_process_count(batch, effective, world, layout):
    from mae_transfer.engine.trainer import batch_layout

    assert batch_layout(batch, effective, world) == layout


class Noisy(Dataset):
    def __init__(self, n=96):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class Regression(TrainTask):
    name = "regression"

    def __init__(self, width=16):
        self.width = width

    def signature(self):
        return {"width": self.width}

    def build_model(self):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, self.width), nn.GELU(), nn.Linear(self.width, 1))

    def build_train_dataset(self):
        return Noisy()

    def training_step(self, model, batch, device):
        loss = nn.functional.mse_loss(model(batch["x"].to(device)), batch["y"].to(device))
        return loss, {}


def run(tmp_path, task=None, **train):
    cfg = TrainConfig(
        **{
            "epochs": 4,
            "batch_size": 8,
            "effective_batch_size": 16,
            "log_every": 1,
            "num_workers": 0,
            "progress": False,
            **train,
        }
    )
    optim = OptimConfig(lr=0.05, warmup_epochs=1, weight_decay=0.01, betas=(0.9, 0.99))
    tr = Trainer(task or Regression(), cfg, optim, tmp_path, DistInfo(), config={"test": True})
    return tr, tr.fit()


def read_losses(path):
    import json

    return [json.loads(line)["loss"] for line in (path / "train.jsonl").read_text().splitlines()]


def test_training_reduces_the_loss_and_writes_its_files(tmp_path):
    tr, summary = run(tmp_path)
    losses = read_losses(tmp_path)
    assert summary["finished"] and summary["step"] == 4 * 6
    assert len(losses) == 24
    assert sum(losses[-4:]) < 0.3 * sum(losses[:4]), losses
    for name in ("config.yaml", "train.csv", "train.jsonl", "epochs.csv", "checkpoint-last.pth"):
        assert (tmp_path / name).is_file(), name
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)
    assert state["step"] == 24 and state["signature"] == {"width": 16}
    assert state["schedule"]["total_steps"] == 24 and state["schedule"]["warmup_steps"] == 6
    assert set(state) >= {"model", "optimizer", "scaler", "epoch", "config"}
    assert "derived" in (tmp_path / "config.yaml").read_text()


def test_resume_after_a_stop_is_exact(tmp_path):
    full, _ = run(tmp_path / "full")
    part, summary = run(tmp_path / "part", max_steps=9)  # stops mid-epoch 2
    assert summary["step"] == 9 and not summary["finished"]
    resumed, summary = run(tmp_path / "part")
    assert summary["step"] == 24
    for (n, a), (_, b) in zip(full.unwrapped.named_parameters(), resumed.unwrapped.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)
    # The resumed run's curve is one clean curve, equal to the uninterrupted one.
    assert read_losses(tmp_path / "part") == pytest.approx(read_losses(tmp_path / "full"), abs=1e-6)


def test_resuming_with_another_model_is_refused(tmp_path):
    run(tmp_path, max_steps=2)
    with pytest.raises(CheckpointError, match="different model.*width"):
        run(tmp_path, task=Regression(width=32))
    before = (tmp_path / "checkpoint-last.pth").read_bytes()
    with pytest.raises(CheckpointError):
        Trainer(
            Regression(),
            TrainConfig(epochs=1, batch_size=8, num_workers=0),
            OptimConfig(lr=0.01),
            tmp_path,
            DistInfo(),
            resume="never",
        ).fit()
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == before  # nothing overwritten


def test_too_small_a_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="fewer than one effective batch"):
        run(tmp_path, batch_size=64, effective_batch_size=512)


def test_nan_loss_stops_without_overwriting_the_checkpoint(tmp_path):
    class Exploding(Regression):
        def training_step(self, model, batch, device):
            loss, extra = super().training_step(model, batch, device)
            return loss * float("nan") if self.step_count() > 30 else loss, extra

        calls = 0

        def step_count(self):
            Exploding.calls += 1
            return Exploding.calls

    with pytest.raises(FloatingPointError, match="checkpoint"):
        run(tmp_path, task=Exploding())
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_overrides_parse_and_type_check():
    from mae_transfer.pretrain.config import build_config

    cfg = build_config(
        None,
        parse_overrides(["optim.blr=1e-3", "train.epochs=5", "model.norm_pix_loss=false", "optim.betas=[0.9, 0.999]"]),
    )
    assert cfg.optim.blr == 1e-3 and cfg.train.epochs == 5 and cfg.model.norm_pix_loss is False
    assert cfg.optim.betas == (0.9, 0.999)
    with pytest.raises(ConfigError, match="unknown option optim.bl"):
        build_config(None, parse_overrides(["optim.bl=1"]))
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        build_config(None, parse_overrides(["train.epochs=many"]))
    with pytest.raises(ConfigError, match="mask_ratio"):
        build_config(None, parse_overrides(["model.mask_ratio=1.5"]))


@pytest.mark.parametrize("cpus, threads, expected", [(2, 2, 0), (2, 1, 1), (16, 8, 2), (1, 1, 0)])
def test_cpu_workers_take_only_the_cores_the_compute_threads_leave(monkeypatch, cpus, threads, expected):
    from mae_transfer.engine import trainer

    monkeypatch.setattr(trainer.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(trainer.torch, "get_num_threads", lambda: threads)
    assert trainer.default_num_workers(None, torch.device("cpu")) == expected
    assert trainer.default_num_workers(3, torch.device("cpu")) == 3  # an explicit train.num_workers is kept
    with pytest.raises(ConfigError, match="train.num_workers"):
        TrainConfig(num_workers=-1).validate()


# ------------------------------------------------------------ evaluation results gathered on rank 0
from mae_transfer.engine.evaluator import DatasetEvaluator  # noqa: E402


class _PartsEvaluator(DatasetEvaluator):
    """State: the batches this process saw; metrics: every process's state as merged."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def reset(self):
        self.seen = []

    def process(self, inputs, outputs):
        self.seen.append(outputs)

    def state(self):
        return self.seen

    def merge(self, states):
        self.parts = states

    def evaluate(self):
        if self.fail:
            raise ValueError("no ground truth")
        return {"parts": self.parts}


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from mae_transfer.engine.distributed import broadcast_from_main, gather_to_main
    from mae_transfer.engine.evaluator import run_evaluator

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        batches = [rank * 10 + i for i in range(rank + 1)]  # rank 0: [0], rank 1: [10, 11]
        out = {
            "gathered": gather_to_main({"rank": rank, "data": list(range(rank + 2))}),
            "broadcast": broadcast_from_main(f"from rank {rank}"),
            "main_only": run_evaluator(_PartsEvaluator(), batches, lambda b: b, main=rank == 0, desc=None),
            "everywhere": run_evaluator(_PartsEvaluator(), batches, lambda b: b, everywhere=True, desc=None),
        }
        try:  # the main process fails: the others must stop too, not wait for metrics forever
            run_evaluator(_PartsEvaluator(fail=True), batches, lambda b: b, everywhere=True, desc=None)
        except (ValueError, RuntimeError) as exc:
            out["failure"] = f"{type(exc).__name__}: {exc}"
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluation_states_go_to_the_main_process_only(tmp_path):
    import torch.multiprocessing as mp

    from mae_transfer.engine.distributed import broadcast_from_main, gather_to_main
    from mae_transfer.engine.evaluator import run_evaluator

    # One process: its own object, and the metrics wherever asked.
    assert gather_to_main({"a": 1}) == [{"a": 1}] and broadcast_from_main("x") == "x"
    assert run_evaluator(_PartsEvaluator(), [1, 2], lambda b: b, desc=None) == {"parts": [[1, 2]]}
    assert run_evaluator(_PartsEvaluator(), [1, 2], lambda b: b, main=False, desc=None) == {}

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["gathered"] == [{"rank": 0, "data": [0, 1]}, {"rank": 1, "data": [0, 1, 2]}]
    assert r1["gathered"] == []  # nothing gathered on the other process
    assert r0["broadcast"] == r1["broadcast"] == "from rank 0"
    assert r0["main_only"] == {"parts": [[0], [10, 11]]} and r1["main_only"] == {}
    assert r0["everywhere"] == r1["everywhere"] == {"parts": [[0], [10, 11]]}
    assert r0["failure"] == "ValueError: no ground truth"
    assert r1["failure"] == "RuntimeError: evaluation failed on the main process (rank 0): ValueError: no ground truth"


# ---------------------------------------------------------------- issue 23 (items 8 and 9): engine
def test_the_loss_window_cut_by_a_stop_goes_on_after_resume(tmp_path, caplog):
    import json

    caplog.set_level("INFO", logger="mae_transfer")
    run(tmp_path / "full", epochs=2, log_every=4)
    assert "saved checkpoint at step 6 (end of epoch 1)" in caplog.text  # 1-based, as the bar and the logs
    run(tmp_path / "part", epochs=2, log_every=4, max_steps=9)  # stops 1 step into the third 4-step window
    assert "saved checkpoint at step 9 (epoch 2, step 3 of 6)" in caplog.text and "(epoch 1)" not in caplog.text
    state = torch.load(tmp_path / "part" / "checkpoint-last.pth", weights_only=False)
    assert state["epoch"] == 1 and state["loss_window"]["count"] == 2  # checkpoint fields keep their meaning
    run(tmp_path / "part", epochs=2, log_every=4)

    def smoothed(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "train.jsonl").read_text().splitlines())]

    full, part = smoothed(tmp_path / "full"), smoothed(tmp_path / "part")
    assert [s for s, _ in part] == [s for s, _ in full] == [4, 8, 12]  # no stray row at the stop
    assert [v for _, v in part] == pytest.approx([v for _, v in full], abs=1e-6)
    csv_steps = [line.split(",")[0] for line in (tmp_path / "part" / "train.csv").read_text().splitlines()[1:]]
    assert csv_steps == ["4", "8", "12"]


def test_warmup_longer_than_the_run_and_a_changed_schedule_on_resume_are_said(tmp_path, caplog):
    caplog.set_level("INFO", logger="mae_transfer")
    run(tmp_path / "short", epochs=1, max_steps=1)  # warmup_epochs=1 of run(): as long as the whole run
    assert (
        "the warmup (6 steps, optim.warmup_epochs 1) is not shorter than the run (6 steps, train.epochs 1)"
        in caplog.text
    )
    assert "never reaches its peak" in caplog.text
    caplog.clear()
    run(tmp_path / "r", max_steps=2)
    assert "the warmup" not in caplog.text and "another schedule" not in caplog.text
    run(tmp_path / "r", epochs=8, max_steps=3)
    lines = [r.getMessage() for r in caplog.records if "another schedule" in r.getMessage()]
    assert len(lines) == 1 and "train.epochs 4 -> 8 (24 -> 48 steps)" in lines[0] and "from step 2 on" in lines[0]


def test_progress_bars_are_finished_before_an_error_or_a_log_line(tmp_path, capsys):
    import logging
    import re
    import sys

    from tqdm.auto import tqdm

    from mae_transfer.engine.logger import close_progress_bars, setup_logging

    class Failing(Regression):
        calls = 0

        def training_step(self, model, batch, device):
            Failing.calls += 1
            if Failing.calls > 6:
                raise ValueError("boom")
            return super().training_step(model, batch, device)

    setup_logging(0)  # the console handler writes to this test's (captured) stderr
    try:
        with pytest.raises(ValueError, match="boom"):
            run(tmp_path, task=Failing(), progress=True, log_every=100)
        err = capsys.readouterr().err
        assert "step/s" in err and err.endswith("\n")  # the training bar's line is finished
        bar = tqdm(total=10, desc="evaluating", file=sys.stderr)  # a live bar (as an evaluation's)
        bar.update(3)
        logging.getLogger("mae_transfer.test").warning("a line while a bar is live")
        close_progress_bars()  # what the CLI does before its error message
        err = capsys.readouterr().err
        assert re.search(r"\r\d\d:\d\d:\d\d W mae_transfer\.test: a line while a bar is live\n", err), repr(err)
        assert err.endswith("\n") and bar.disable  # closed
    finally:
        setup_logging(0)


def test_files_written_in_place_never_follow_a_planted_link(tmp_path):
    from mae_transfer.engine.locks import FileLock
    from mae_transfer.engine.logger import setup_logging
    from mae_transfer.engine.results import ResultRow
    from mae_transfer.evaluation.store import ResultStore
    from mae_transfer.io import OutputPathError, atomic_write_text

    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("train.csv", "log.txt", "results.jsonl", ".lock", "config.yaml"):
        (run_dir / name).symlink_to(outside)
    with pytest.raises(OutputPathError, match="train.csv is a symbolic link"):
        run(run_dir, max_steps=1)
    with pytest.raises(OutputPathError, match="log.txt is a symbolic link"):
        setup_logging(0, run_dir / "log.txt")
    setup_logging(0)
    with pytest.raises(OutputPathError, match="results.jsonl is a symbolic link"):
        ResultStore(run_dir).append([ResultRow(task="knn", metric="top1", value=1.0)])
    with pytest.raises(OutputPathError, match=r"\.lock is a symbolic link"):
        FileLock(run_dir / ".lock").acquire()
    atomic_write_text(run_dir / "config.yaml", "new\n")  # a whole-file write replaces the link itself
    assert not (run_dir / "config.yaml").is_symlink() and (run_dir / "config.yaml").read_text() == "new\n"
    assert outside.read_text() == "precious\n"
