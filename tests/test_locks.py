"""One process per run directory and per results store: the lock utility, two benchmarks into one
store, two pretraining runs into one directory."""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO
from test_bench import encoder  # noqa: F401 - a fixture: a nano MAE encoder checkpoint
from test_pretrain_cli import TINY

from mae_transfer.engine import locks
from mae_transfer.engine.locks import ENV, FileLock, LockHeld, dir_lock, read_holder
from mae_transfer.engine.results import ResultRow
from mae_transfer.evaluation import runner as bench
from mae_transfer.evaluation.store import ResultStore

FORK = multiprocessing.get_context("fork")


def _hold(path: str, ready) -> None:  # in a forked child: take the lock, say so, wait to be killed
    locks._HELD.clear()
    FileLock(path).acquire()
    ready.send(True)
    time.sleep(120)


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds ``tmp_path/run/.lock``; yields (process, lock path)."""
    path = tmp_path / "run" / ".lock"
    receive, send = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=_hold, args=(str(path), send), daemon=True)
    proc.start()
    assert receive.poll(30), "the holder never took the lock"
    yield proc, path
    if proc.is_alive():
        proc.kill()
    proc.join(10)


def test_second_acquire_names_the_holder_and_a_killed_holder_frees_it(holder, caplog):
    proc, path = holder
    lock = FileLock(path, "the run directory X", "wait for it to finish, or use another --output")
    with pytest.raises(LockHeld) as e:
        lock.acquire()
    assert e.value.holder.pid == proc.pid and e.value.holder.host == socket.gethostname()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the run directory X is in use by another process")
    assert f"pid {proc.pid}" in msg and "since " in msg and "wait for it to finish, or use another --output" in msg
    t0 = time.monotonic()
    with pytest.raises(LockHeld):
        lock.acquire(wait=0.5)  # waits, then gives up
    assert time.monotonic() - t0 >= 0.5

    os.kill(proc.pid, signal.SIGKILL)  # no clean-up runs: the kernel drops its flock
    proc.join(10)
    with caplog.at_level(logging.WARNING, logger="mae_transfer.engine.locks"):
        lock.acquire()
    assert lock.previous.pid == proc.pid and "stale: that process no longer exists" in caplog.text
    assert read_holder(path).pid == os.getpid()
    lock.release()
    assert not path.exists()


def test_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = tmp_path / ".lock"
    path.write_text(
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": dead.pid,
                "command": "mae-transfer pretrain",
                "since": "2020-01-01T00:00:00+00:00",
                "token": "x",
            }
        )
    )
    with caplog.at_level(logging.WARNING, logger="mae_transfer.engine.locks"):
        with dir_lock(tmp_path).acquire() as lock:
            assert lock.previous.pid == dead.pid
            assert read_holder(path).pid == os.getpid()
    assert f"pid {dead.pid}" in caplog.text and "stale" in caplog.text
    assert not path.exists()


def test_a_holder_on_another_host_is_named_and_its_workers_share_the_lock(holder):
    proc, path = holder
    # What a process on another node of a shared file system wrote (its flock is held).
    path.write_text(
        json.dumps({"host": "node042", "pid": 4242, "command": "mae-transfer bench", "since": "today", "token": "t0"})
    )
    with pytest.raises(LockHeld) as e:
        FileLock(path).acquire()
    assert "host node042, pid 4242" in str(e.value) and f"delete {path}" in str(e.value)
    # A process started by the holder with its token (a bench's job, torchrun's workers) works under it.
    os.environ[ENV] = "t0"
    try:
        lock = FileLock(path).acquire()
        assert lock.held and lock.borrowed.host == "node042"
        lock.release()
        assert path.exists()  # a borrowed lock stays with its holder
    finally:
        del os.environ[ENV]


def test_the_store_writes_a_jobs_rows_once(tmp_path):
    store = ResultStore(tmp_path)
    rows = [ResultRow(task="knn", metric="top1", value=1.0, job_key="k1")]
    done = lambda stored: bench.job_done(stored, "k1")  # noqa: E731
    assert store.append(rows, unless=done) == 1
    assert store.append(rows, unless=done) == 0
    assert len(store.read()) == 1 and not (tmp_path / ResultStore.LOCK_FILE).exists()


def test_bench_leaves_a_job_held_elsewhere_to_its_holder(tmp_path, encoder, cache):  # noqa: F811
    res = tmp_path / "res"
    [job] = bench.plan_jobs(bench.parse_backbones([f"mae={encoder}"]), ["knn"], res)
    lines: list[str] = []
    with dir_lock(job.run_dir).acquire():
        os.environ.pop(ENV, None)
        locks._HELD.clear()  # as if another process held it
        outcomes = bench.run_jobs(jobs=[job], results_dir=res, in_process=True, echo=lines.append)
    assert [o.status for o in outcomes] == ["elsewhere"]
    assert lines == [
        f"[1/1] knn · mae: running in another process ({socket.gethostname()}, pid {os.getpid()}); not run here"
    ]
    assert "1 job(s) running in another bench or process are not in these tables yet" in bench.elsewhere_note(
        outcomes, []
    )
    assert not (res / "results.jsonl").exists() and not (job.run_dir / "bench.log").exists()


def _env(tmp_path: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MAE_TRANSFER_CACHE": str(tmp_path / "cache"),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("RANK", "WORLD_SIZE", ENV):
        env.pop(name, None)
    return env


def test_two_benchmarks_into_one_store_run_each_job_once(tmp_path, encoder):  # noqa: F811
    res = tmp_path / "res"
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
        "linprobe:train.epochs=3",
        "--results",
        str(res),
        # The jobs run inside the two benchmark processes: the job locks are the same either way,
        # and two interpreter starts per benchmark fewer.
        "--in-process",
    ]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp_path))
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    logs = sorted(res.glob("runs/mae/*/bench.log"))
    assert len(logs) == 2
    for log in logs:  # each job ran once (one command line in its log), by one of the two
        assert sum(line.startswith("$ ") for line in log.read_text().splitlines()) == 1, log.read_text()
    rows = [json.loads(line) for line in (res / "results.jsonl").read_text().splitlines()]
    keys = Counter((r["job_key"], r["metric"], r.get("protocol")) for r in rows)
    assert {r["task"] for r in rows} == {"knn", "linprobe"} and max(keys.values()) == 1, keys
    ran = [out.count(": done in ") for out in outs]
    assert sum(ran) == 2, outs
    for out in outs:  # a bench that left a job to the other and tabulated before it finished says so once
        assert out.count("not in these tables yet") <= ("running in another bench" in out), out


def test_a_second_pretraining_into_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "mae_transfer", "pretrain", "--output", str(out), "--epochs", "200", *TINY]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp_path))

    def wait_for(condition, what: str) -> None:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not condition():
            time.sleep(0.2)
        assert first.poll() is None and condition(), (
            f"{what}: {first.communicate()[0] if first.poll() is not None else ''}"
        )

    try:
        wait_for(
            lambda: getattr(read_holder(out / ".lock", tries=1), "pid", None) == first.pid, "the first run never locked"
        )
        second = subprocess.run(argv, capture_output=True, text=True, env=_env(tmp_path), timeout=120)
        wait_for(
            lambda: (out / "train.csv").exists() and len((out / "train.csv").read_text().splitlines()) > 2,
            "the first run stopped or never trained",
        )
    finally:
        first.send_signal(signal.SIGTERM)  # while training: it saves and stops
        first_out = first.communicate(timeout=60)[0]
    assert second.returncode == 2, second.stderr
    err = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(err) == 1, second.stderr
    assert err[0].startswith(f"mae-transfer: error: the run directory {out} is in use by another process")
    assert f"pid {first.pid}" in err[0] and "since" in err[0] and "pretrain" in err[0]
    assert err[0].endswith("wait for it to finish, or use another --output")
    assert first.returncode == 143, first_out
    assert (out / "log.txt").read_text().count(
        "WARNING mae_transfer.cli: no --data given"
    ) == 1  # the second wrote nothing
    with open(out / "train.csv", newline="") as f:
        steps = [row["step"] for row in csv.DictReader(f)]
    assert steps and len(steps) == len(set(steps))  # one writer
