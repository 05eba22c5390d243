"""The cluster paths: bench through submitit (local processes; SLURM with stand-in commands),
preemption notices (SIGUSR1/SIGUSR2 -> checkpoint -> requeue -> resume), two nodes on localhost."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from mae_transfer.checkpoint import export_mae_encoder
from mae_transfer.cli import main
from mae_transfer.engine import trainer as trainer_module
from mae_transfer.evaluation import cluster
from mae_transfer.evaluation.store import ResultStore
from mae_transfer.models.vit import create_vit

submitit = pytest.importorskip(
    "submitit", reason="the cluster launchers need submitit (pip install 'mae-transfer[test]')"
)

# A nano MAE on 32 px toy images (as tests/test_pretrain_cli.py): 7 steps per epoch, about a second
# per step or less on one CPU core.
TINY_PRETRAIN = [
    "model.name=mae_vit_nano_patch8",
    "model.img_size=32",
    "data.toy_images_per_class=12",
    "train.batch_size=8",
    "train.effective_batch_size=16",
    "train.log_every=1",
    "train.num_workers=0",
    "train.progress=false",
    "vis.num_images=4",
    "vis.every_epochs=100",
    "optim.warmup_epochs=1",
]


@pytest.fixture
def encoder(tmp_path) -> Path:
    torch.manual_seed(0)
    return export_mae_encoder(
        create_vit("vit_nano_patch8", img_size=64, num_classes=0, global_pool="token"), tmp_path / "weights" / "enc.pth"
    )


@pytest.fixture
def children():
    """Pids of processes a test started through submitit's LocalExecutor (our children): stopped
    and reaped at the end, whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGINT)  # the controller stops its tasks (LocalJob.cancel does the same)
        except ProcessLookupError:
            continue
    for pid in pids:
        _reap(pid, timeout=30)


def _reap(pid: int, timeout: float) -> bool:
    """Wait for our child ``pid`` to end (True) or ``timeout`` to pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        time.sleep(0.1)
    return False


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------ options and errors
def test_slurm_without_sbatch_and_slurm_options_without_slurm_are_one_clear_error(
    tmp_path, encoder, monkeypatch, capsys
):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no sbatch here, whatever the machine has
    res = tmp_path / "res"
    base = ["bench", "--backbone", f"mae={encoder}", "--tasks", "knn", "--results", str(res)]

    assert main([*base, "--launcher", "slurm", "--slurm-partition", "gpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "SLURM is not available" in err and "no `sbatch` on PATH" in err
    for alternative in ("--launcher local", "--launcher print", "--launcher submitit-local"):
        assert alternative in err

    for argv, message in [
        (["--slurm-partition", "gpu"], "--slurm-partition only applies to --launcher slurm (this is --launcher local)"),
        (["--launcher", "submitit-local", "--slurm-account", "a"], "--slurm-account only applies to --launcher slurm"),
        (["--launcher", "print", "--slurm-time", "60"], "--slurm-time is the time limit of submitted jobs"),
        (["--launcher", "submitit-local", "--in-process"], "--in-process: only for --launcher local"),
    ]:
        assert main([*base, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not res.exists()  # nothing planned, nothing submitted


def _fake_slurm(bin_dir: Path, state_file: Path, calls: Path) -> None:
    """Stand-ins for sbatch / srun / sacct: sbatch keeps the script and answers job 4242 (submitit
    parses "job N"); sacct reports the state written in ``state_file``."""
    bin_dir.mkdir()
    scripts = {
        "sbatch": f'#!/bin/sh\necho "sbatch $*" >> {calls}\ncp "$1" {calls.parent}/job.sbatch\n'
        'echo "Submitted batch job 4242"\n',
        "srun": "#!/bin/sh\nexit 0\n",
        "sacct": f'#!/bin/sh\necho "sacct $*" >> {calls}\necho "JobID|State|NodeList"\n'
        f'echo "4242|$(cat {state_file})|node7"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def test_slurm_launcher_submits_once_reports_running_and_records_the_end(tmp_path, encoder, monkeypatch, capsys):
    calls, state = tmp_path / "calls.txt", tmp_path / "state.txt"
    _fake_slurm(tmp_path / "bin", state, calls)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    submitit.SlurmJob.watcher.clear()  # its cache is per process; job 4242 may be known from another test
    res = tmp_path / "res"
    argv = [
        "bench",
        "--backbone",
        f"mae={encoder}",
        "--tasks",
        "knn",
        "--results",
        str(res),
        "--launcher",
        "slurm",
        "--slurm-partition",
        "gpu",
        "--slurm-account",
        "vision",
        "--slurm-time",
        "30",
    ]

    assert main(argv) == 0
    out = capsys.readouterr().out
    run_dir = next((res / "runs" / "mae").glob("knn-*"))
    assert f"[1/1] knn · mae: submitted SLURM job 4242 (log: {run_dir / 'bench.log'})" in out
    script = (tmp_path / "job.sbatch").read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=vision",
        "#SBATCH --time=30",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --gpus-per-node=1",
        f"#SBATCH --output={res.resolve()}/slurm/%j/%j_0_log.out",
    ):
        assert line in script, line
    assert "srun --unbuffered" in script and "submitit.core._submit" in script
    record = json.loads((run_dir / "slurm_job.json").read_text())
    assert record["job_id"] == "4242" and record["launcher"] == "slurm" and record["recorded"] is None
    assert record["command"][-2:] == ["--output", str(run_dir)] and "knn" in record["command"]

    # Still in the queue: reported, not submitted twice.
    state.write_text("PENDING")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "SLURM job 4242 is pending, not submitted again" in out and "1 still queued or running" in out
    assert (
        calls.read_text().count("sbatch ") == 1
        and "sacct -o JobID,State,NodeList --parsable2 -j 4242" in calls.read_text()
    )

    # SLURM ended it without a result (cancelled): recorded as a failure, once, then submitted again.
    state.write_text("CANCELLED")
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "SLURM job 4242 FAILED: SLURM ended the job (CANCELLED) without a result" in out
    failed = [r for r in ResultStore(res).read() if r["metric"] == "job_failed"]
    assert (
        len(failed) == 1 and failed[0]["cluster_job"] == "SLURM 4242" and failed[0]["log"] == str(run_dir / "bench.log")
    )
    assert json.loads((run_dir / "slurm_job.json").read_text())["recorded"]
    assert main([*argv, "--no-retry"]) == 1
    assert "failed before, not retried" in capsys.readouterr().out
    assert calls.read_text().count("sbatch ") == 1
    assert main(argv) == 0
    assert "submitted SLURM job 4242" in capsys.readouterr().out
    assert calls.read_text().count("sbatch ") == 2
    assert len([r for r in ResultStore(res).read() if r["metric"] == "job_failed"]) == 1


# ------------------------------------------------------------------------ submitit's local processes
def test_submitit_local_bench_runs_records_and_never_submits_twice(tmp_path, encoder, cache, children, capsys):
    broken = tmp_path / "broken_inat"
    broken.mkdir()
    (broken / "train2018.json").write_text("{not json")
    res = tmp_path / "res"
    argv = [
        "bench",
        "--backbone",
        f"mae={encoder}",
        "--tasks",
        "knn,inat2018",
        "--data",
        f"inat2018={broken}",
        "--results",
        str(res),
        "--launcher",
        "submitit-local",
    ]

    assert main(argv) == 0
    out = capsys.readouterr().out
    ids = dict(re.findall(r"\] (\w+) · mae: submitted local job (\d+) \(log: ", out))
    assert set(ids) == {"knn", "inat2018"}, out
    pids = [int(i) for i in ids.values()]
    children.extend(pids)
    assert "2 submitted" in out and not (res / "results.jsonl").exists()

    # While a job's process lives it is running: reported, not submitted again. (Stopping the
    # controllers keeps them alive for as long as this check takes, however fast the jobs are.)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert main(argv) == 0
        out = capsys.readouterr().out
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    for job_id in ids.values():
        assert f"local job {job_id} is running, not submitted again" in out
    assert "submitted local job" not in out and "2 still queued or running" in out

    for pid in pids:
        assert _reap(pid, timeout=240), "a submitted job did not finish"
    assert main([*argv, "--no-retry"]) == 1  # records both: the k-NN rows and the failure
    out = capsys.readouterr().out
    assert f"knn · mae: local job {ids['knn']} finished, recorded: top-1 " in out
    assert f"inat2018 · mae: local job {ids['inat2018']} FAILED (exit 2): " in out and "train2018.json" in out
    assert "| mae" in out and "jobs: 0 run, 0 already done, 1 recorded, 1 failed" in out
    rows = ResultStore(res).read()
    good = [r for r in rows if r["metric"] != "job_failed"]
    failed = [r for r in rows if r["metric"] == "job_failed"]
    assert {r["task"] for r in good} == {"knn"} and good[0]["cluster_job"] == f"local {ids['knn']}"
    assert all(r["job_key"] and r["git_commit"] and r["hardware"] and r["wall_time_s"] > 0 for r in good)
    assert len(failed) == 1 and failed[0]["task"] == "inat2018" and failed[0]["returncode"] == 2
    assert "train2018.json" in failed[0]["error"] and failed[0]["log"].endswith("bench.log")
    knn_log = Path(good[0]["run_dir"]) / "bench.log"
    assert f"# job {ids['knn']} on " in knn_log.read_text() and "k-NN" in knn_log.read_text()
    assert (res / "slurm" / ids["knn"] / f"{ids['knn']}_0_log.out").exists()  # submitit's own logs

    # Third run: nothing new to record, nothing to submit.
    assert main([*argv, "--no-retry"]) == 1
    out = capsys.readouterr().out
    assert "submitted" not in out and "recorded:" not in out
    assert "knn · mae: done before, skipped" in out and "inat2018 · mae: failed before, not retried" in out
    assert ResultStore(res).read() == rows

    # Without --no-retry the failed job (only) is submitted again.
    assert main(argv) == 0
    out = capsys.readouterr().out
    again = re.findall(r"\] (\w+) · mae: submitted local job (\d+)", out)
    assert [t for t, _ in again] == ["inat2018"], out
    children.append(int(again[0][1]))


# ------------------------------------------------------------------------------- the job's callable
def test_job_command_runs_logs_and_stops_its_command_for_a_requeue(tmp_path, monkeypatch):
    import cloudpickle

    monkeypatch.setenv("MAE_TRANSFER_REQUEUE", "1")
    monkeypatch.delenv("PET_SIGNALS_TO_HANDLE", raising=False)
    log = tmp_path / "run" / "bench.log"
    show = (
        "import os; print('requeue', os.environ.get('MAE_TRANSFER_REQUEUE'), "
        "'torchrun', os.environ['PET_SIGNALS_TO_HANDLE'])"
    )
    result = cluster.JobCommand([sys.executable, "-c", show], log, provenance=False)()
    assert result["returncode"] == 0 and result["attempts"] == 1 and result["wall_time_s"] > 0
    # submitit requeues the job: the command must not (MAE_TRANSFER_REQUEUE dropped); torchrun's
    # agent passes the preemption notices on to its workers.
    assert "requeue None torchrun SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2" in log.read_text()
    with pytest.raises(cluster.JobCommandFailed, match=r"^exited 3 \(log: "):
        cluster.JobCommand([sys.executable, "-c", "raise SystemExit(3)"], log, provenance=False)()

    # checkpoint(), as submitit calls it: from its SIGUSR2 handler, in the thread that waits for the
    # command. The command is told to stop (SIGUSR2) and waited for; one that does not stop within
    # the grace time is killed. Either way the same command comes back for the requeue.
    saves = (
        "import signal, sys, time; signal.signal(signal.SIGUSR2, lambda *a: sys.exit(143)); "
        "print('re' + 'ady', flush=True); time.sleep(60)"
    )
    deaf = (
        "import signal, time; signal.signal(signal.SIGUSR2, signal.SIG_IGN); "
        "print('re' + 'ady', flush=True); time.sleep(60)"
    )
    for code, how, rc in [
        (saves, "the command saved and stopped (exit 143)", 143),
        (deaf, "the command did not stop within 1 s and was killed (its last checkpoint is kept)", -9),
    ]:
        log.write_text("")
        command = cluster.JobCommand([sys.executable, "-c", code], log, provenance=False, grace_s=1.0)
        delayed = []
        previous = signal.signal(
            signal.SIGUSR2, lambda *a, command=command, delayed=delayed: delayed.append(command.checkpoint())
        )
        notice = threading.Timer(
            0.0,
            lambda: (
                _wait_until(lambda: "\nready\n" in log.read_text(), 30, "the command to start"),
                os.kill(os.getpid(), signal.SIGUSR2),
            ),
        )
        notice.start()
        try:
            with pytest.raises(cluster.JobCommandFailed, match=rf"^exited {rc} "):
                command()  # without submitit nothing requeues: the stopped command is a failure here
        finally:
            notice.join(timeout=30)
            signal.signal(signal.SIGUSR2, previous)
        assert f"# time limit / preemption signal: {how}; the job is requeued, attempt 2 resumes" in log.read_text()
        again = cloudpickle.loads(cloudpickle.dumps(delayed[0]))  # what submitit writes for the requeued job
        assert again.function.command == command.command and again.function.attempt == 2
        assert again.function.seconds_before > 0 and again.function._child is None

    # SIGTERM to the whole job (scancel, or a preemption that SLURM requeues by itself): the command
    # saves and stops, and the job ends without a result (SystemExit: submitit writes none), so the
    # next `bench` asks SLURM instead of recording a failure for a job that will run again.
    log.write_text("")
    stops = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
        "print('re' + 'ady', flush=True); time.sleep(60)"
    )
    command = cluster.JobCommand([sys.executable, "-c", stops], log, provenance=False)
    seen = []  # stands for submitit's own SIGTERM handler, which must still be called
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append(1))

    def scancel():
        _wait_until(lambda: "\nready\n" in log.read_text(), 30, "the command to start")
        os.kill(command._child.pid, signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    notice = threading.Thread(target=scancel)
    notice.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            command()
    finally:
        notice.join(timeout=30)
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 143 and seen == [1]
    assert (
        "# the job got SIGTERM (scancel or preemption) and its command stopped (exit 143); no result" in log.read_text()
    )


# ------------------------------------------------------------------------------- preemption notices
def test_stop_signals_include_slurms_preemption_notices():
    old = {s: signal.getsignal(s) for s in trainer_module.STOP_SIGNALS}
    try:
        trainer_module._ignore_stop_signals(0)  # what a DataLoader worker runs first
        assert {s.name for s in trainer_module.STOP_SIGNALS if signal.getsignal(s) == signal.SIG_IGN} == {
            "SIGTERM",
            "SIGINT",
            "SIGUSR1",
            "SIGUSR2",
        }
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    # A notice repeated (SLURM signals every process, torchrun's agent passes it on) or followed by
    # SIGTERM keeps the graceful stop; the same for a SIGTERM that arrives twice at once.
    for first, then in [
        (signal.SIGUSR1, (signal.SIGUSR1, signal.SIGTERM)),
        (signal.SIGUSR2, (signal.SIGUSR2,)),
        (signal.SIGTERM, (signal.SIGTERM,)),
    ]:
        with trainer_module._StopSignals() as stop:
            stop.DUPLICATE_S = 600.0  # a slow machine must not turn the repeat into a kill of pytest
            os.kill(os.getpid(), first)
            for sig in then:
                os.kill(os.getpid(), sig)
            time.sleep(0.05)
            assert stop.requested == first.name
            assert stop.preempted == (first != signal.SIGTERM)
    assert cluster.REQUEUE_ENV == trainer_module.REQUEUE_ENV


def test_requeue_needs_the_switch_a_slurm_job_and_scontrol(tmp_path, monkeypatch, caplog):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.delenv("MAE_TRANSFER_REQUEUE", raising=False)
    assert trainer_module.requeue_slurm_job() is None and not caplog.records  # not asked for: silent
    monkeypatch.setenv("MAE_TRANSFER_REQUEUE", "1")
    assert trainer_module.requeue_slurm_job() is None
    assert [r.getMessage() for r in caplog.records] == [
        "MAE_TRANSFER_REQUEUE=1 but scontrol is not on PATH: SLURM job 777 is not requeued (resubmit it to resume)"
    ]
    caplog.clear()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    (bin_dir / "scontrol").chmod(0o755)
    assert trainer_module.requeue_slurm_job() is None
    assert "scontrol requeue 777 failed (exit 1): Invalid job id specified" in caplog.text


def test_sigusr1_saves_requeues_and_the_rerun_resumes_at_the_same_step(tmp_path, cache, monkeypatch, capsys):
    """A hand-written sbatch script (--signal=USR1@90, MAE_TRANSFER_REQUEUE=1): the notice saves the
    checkpoint, the main process runs `scontrol requeue $SLURM_JOB_ID`, the CLI exits 143; the
    requeued run resumes at the saved step and ends at the same step as an uninterrupted run."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4343")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("MAE_TRANSFER_REQUEUE", "1")
    run = tmp_path / "run"
    argv = ["pretrain", "--output", str(run), "--epochs", "3", *TINY_PRETRAIN]

    # The notice comes from outside the training loop's thread, as a scheduler's would. A handler of
    # our own makes a notice that came too late harmless (SIGUSR1 kills by default).
    late = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: late.append(1))

    def notify():
        _wait_until(lambda: _lines(run / "train.jsonl") >= 3, 120, "three training steps")
        os.kill(os.getpid(), signal.SIGUSR1)

    sender = threading.Thread(target=notify, daemon=True)
    sender.start()
    try:
        rc = main(argv)
    finally:
        sender.join(timeout=130)
        signal.signal(signal.SIGUSR1, previous)
    err = capsys.readouterr().err
    assert rc == 143 and not late, err[-2000:]
    stopped_at = torch.load(run / "checkpoint-last.pth", map_location="cpu", weights_only=False)["step"]
    assert 3 <= stopped_at < 21
    assert f"stopped by SIGUSR1 at step {stopped_at}" in err and "SLURM job 4343 is requeued and resumes from it" in err
    assert calls.read_text().splitlines() == ["requeue 4343"]

    # The requeued job runs the same command.
    monkeypatch.delenv("MAE_TRANSFER_REQUEUE")
    assert main(argv) == 0
    assert f"resuming from {run / 'checkpoint-last.pth'} at step {stopped_at} of 21" in (run / "log.txt").read_text()
    final = torch.load(run / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    assert final["step"] == 21  # 3 epochs x 7 steps, as an uninterrupted run
    assert [json.loads(line)["step"] for line in (run / "train.jsonl").read_text().splitlines()] == list(range(1, 22))
    assert calls.read_text().splitlines() == ["requeue 4343"]


def _children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the job's process through /proc (Linux)")
def test_submitit_requeues_a_preempted_job_and_it_resumes(tmp_path, cache, children):
    """submitit's checkpoint protocol with real processes: the time-limit / preemption signal
    (SIGUSR2) reaches the job's process; JobCommand.checkpoint has the command save and stop, the
    job is requeued, and the second attempt resumes from the checkpoint and finishes."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "mae_transfer", "pretrain", "--output", str(run), "--epochs", "1", *TINY_PRETRAIN]
    executor = submitit.AutoExecutor(folder=tmp_path / "slurm" / "%j", cluster="local")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(cluster.JobCommand(command, run / "bench.log", provenance=False))
    children.append(int(job.job_id))
    _wait_until(lambda: _lines(run / "train.jsonl") >= 2 or job.done(), 180, "two training steps")
    assert not job.done(), job.stdout()
    task = _children_of(int(job.job_id))  # the controller's one task: submitit's process running JobCommand
    assert len(task) == 1
    os.kill(task[0], signal.SIGUSR2)  # what submitit's controller (and SLURM) send before the time limit
    result = job.result()
    assert result["returncode"] == 0 and result["attempts"] == 2, result
    log = (run / "bench.log").read_text()
    stopped_at = int(re.search(r"stopped by SIGUSR2 at step (\d+)", log).group(1))
    assert 2 <= stopped_at < 7
    assert "# time limit / preemption signal: the command saved and stopped (exit 143); the job is requeued" in log
    assert f"resuming from {run / 'checkpoint-last.pth'} at step {stopped_at} of 7" in log
    assert log.count("$ ") == 2 and f"# job {job.job_id} on " in log and ", attempt 2" in log
    assert f"Requeued job {job.job_id}" in job.stdout()
    assert torch.load(run / "checkpoint-last.pth", map_location="cpu", weights_only=False)["step"] == 7


# ----------------------------------------------------------------------------- two nodes, one host
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train_and_evaluate(tmp_path):
    """Two torchrun agents (one per "node") meet through c10d rendezvous, fine-tune a nano ViT for
    one epoch and evaluate it, each process its half of the validation set."""
    from mae_transfer.data.toy import write_imagefolder

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun not found")
    data = write_imagefolder(tmp_path / "data", num_classes=4, train_per_class=8, val_per_class=3, image_size=32)
    out = tmp_path / "run"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    command = [
        torchrun,
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"localhost:{port}",
        "--rdzv-id",
        f"two-nodes-{port}",
        "-m",
        "mae_transfer",
        "finetune",
        "--data",
        str(data),
        "--preset",
        "toy_finetune",
        "--output",
        str(out),
        "--device",
        "cpu",
        "train.epochs=1",
        "train.progress=false",
        "train.num_workers=0",
        "model.name=vit_nano_patch8",
        "model.img_size=32",
        "train.batch_size=4",
        "train.effective_batch_size=16",
        "data.auto_augment=null",
        "data.reprob=0",
        "data.mixup=0",
        "data.cutmix=0",
    ]
    nodes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert sum("[rank 1]" in log for log in logs) == 1  # one node got rank 1, the other rank 0
    config = (out / "config.yaml").read_text()
    assert "world_size: 2" in config and "accum_steps: 2" in config  # 4 per process x 2 processes x 2 = 16
    assert "evaluated 12 samples" in "".join(logs)  # both halves of the validation set
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["metric"] for r in rows} >= {"top1", "top5"} and all(r["step"] == 2 for r in rows)  # 32 images / 16
