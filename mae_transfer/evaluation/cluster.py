"""Benchmark jobs as cluster jobs: SLURM through submitit, or submitit's local processes.

``bench --launcher slurm`` submits one SLURM job per (backbone, task) that has no results yet;
``bench --launcher submitit-local`` takes the same path with submitit's LocalExecutor (real
processes on this machine, the same logs, time limit, requeue and records): a rehearsal without a
cluster. Running ``bench`` again collects the jobs:

* a job still pending or running is reported and not submitted again (its id is kept in
  ``<run dir>/slurm_job.json``; its state comes from ``sacct`` through submitit, or for a local job
  from its process);
* a finished job's rows are recorded into ``<results>/results.jsonl``, with the provenance of the
  machine that ran it; a failed one is recorded as a ``job_failed`` row with its error and log, and
  is submitted again (unless ``--no-retry``), like a failed job of the local runner.

Each job runs :class:`JobCommand`: the job's ordinary command line (``runner.shell_command``) in a
child process whose output goes to ``<run dir>/bench.log``, holding the run directory's lock
(``engine.locks``) meanwhile, as the local runner does; a bench holds it while it submits the job, so
two benchmarks into one store submit each job once. On the scheduler's time-limit or
preemption notice (SIGUSR2 with submitit's ``#SBATCH --signal=USR2@90``) submitit calls
:meth:`JobCommand.checkpoint`: the command is told to stop (the trainer saves
``checkpoint-last.pth`` at the next step and exits), and the job is requeued with the same command,
which resumes from that checkpoint.

Only the standard library is imported at the top: a job's process unpickles :class:`JobCommand`
before anything else, and torch is the child's business.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

LAUNCHERS = ("slurm", "submitit-local")
RECORD_FILE = "slurm_job.json"  # in a job's run directory: the cluster job that runs it
LOG_FILE = "bench.log"  # in a job's run directory: the output of its command (as the local runner's)
DEFAULT_TIME_MIN = 4320
# How long a bench waits for a run directory that another bench holds while it submits (a moment),
# and how long a job's process waits for the bench that submitted it to let go of it.
SUBMIT_WAIT_S = 30.0
SLURM_ONLY = ("partition", "account", "qos")  # bench's --slurm-<name> options that only SLURM uses
# The preemption notice passed on to the command: the trainer saves and stops on SIGUSR1/SIGUSR2.
STOP_SIGNAL = getattr(signal, "SIGUSR2", signal.SIGTERM)
# = mae_transfer.engine.trainer.REQUEUE_ENV (not imported here: the engine imports torch).
REQUEUE_ENV = "MAE_TRANSFER_REQUEUE"
# torchrun's agent passes these on to its workers (its --signals-to-handle, read from this variable
# when not given). By default it leaves out SIGUSR1/2, which then kill the agent and not the workers.
TORCHRUN_SIGNALS = ("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2")
# SLURM states of a job that may still run (submitit's list, and COMPLETING / COMPLETED before the
# result file is visible on a shared file system).
_NOT_OVER = {
    "READY",
    "PENDING",
    "RUNNING",
    "UNKNOWN",
    "REQUEUED",
    "COMPLETING",
    "PREEMPTED",
    "CONFIGURING",
    "RESIZING",
    "SUSPENDED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
}


class JobCommandFailed(RuntimeError):
    """The command of a submitted job exited with an error (the message starts ``exited N``)."""


def _exited(pid: int) -> bool:
    """Whether our child ``pid`` has ended, without reaping it (safe inside a signal handler that
    interrupted ``Popen.wait``, which holds the Popen's lock)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True
    except (AttributeError, OSError):  # no waitid: signal 0 reaches zombies too, so this may wait out the grace
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _exit_code(pid: int) -> int | None:
    with_status = getattr(os, "waitid", None)
    try:
        info = with_status and os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, OSError):
        return None
    if not info:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _stop_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # Linux: whatever ends the job's process (SIGKILL included), the command gets the preemption
    # notice and saves, instead of running on unwatched and racing a requeued copy of itself.
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, STOP_SIGNAL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


class JobCommand:
    """What a submitted benchmark job runs: one command line, its output appended to ``log_path``.

    Returns ``{"returncode": 0, "wall_time_s", "attempts", "provenance"}``; raises
    :class:`JobCommandFailed` when the command fails. ``provenance``: also return the git commit,
    package versions and hardware of the machine that ran it (for jobs on another machine than the
    one recording their rows; it imports torch). Implements submitit's checkpoint protocol:
    :meth:`checkpoint` stops the command (it saves) and returns the same command for the requeued
    job, which resumes from the run directory's checkpoint. Picklable (the running child is not
    part of the state)."""

    def __init__(
        self,
        command: list[str],
        log_path: str | os.PathLike,
        cwd: str | os.PathLike | None = None,
        grace_s: float = 80.0,
        provenance: bool = True,
    ):
        self.command = [str(c) for c in command]
        self.log_path = str(log_path)
        self.cwd = str(cwd) if cwd is not None else None
        self.grace_s = grace_s  # how long a stopping command may take to save (SLURM signals 90 s ahead)
        self.provenance = provenance
        self.attempt = 1
        self.seconds_before = 0.0  # wall time of the attempts before requeues
        self._child: subprocess.Popen | None = None
        self._started: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_child"] = state["_started"] = None
        return state

    def _note(self, text: str) -> None:
        from mae_transfer.io import open_output

        with open_output(self.log_path, "a") as f:
            f.write(f"# {text}\n")

    def _lock_run_dir(self):
        """The run directory's lock (the folder of the log), held while the command runs; waits a
        moment for the bench that submitted the job. Held elsewhere: the job fails, saying by whom."""
        from mae_transfer.engine.locks import LockHeld, dir_lock

        run_dir = Path(self.log_path).parent
        try:
            return dir_lock(run_dir, f"the run directory {run_dir}").acquire(wait=SUBMIT_WAIT_S)
        except LockHeld as e:
            self._note(f"error: {e}")
            raise JobCommandFailed(f"exited 2 (log: {self.log_path})") from None

    def __call__(self) -> dict[str, Any]:
        env = dict(os.environ)
        env.pop(REQUEUE_ENV, None)  # submitit requeues this job; the command must not requeue it a second time
        env.setdefault(*TORCHRUN_SIGNALS)
        env.setdefault("PYTHONUNBUFFERED", "1")
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "?"
        lock = self._lock_run_dir()
        env.update(lock.child_env())  # the command works under this process's lock
        # SIGTERM reaches every process of a SLURM job (scancel, or a preemption SLURM requeues by
        # itself); the command saves and stops on it. Noted here (submitit only logs it) so that such
        # a stop leaves no result: a failure result would stand for a job that SLURM runs again.
        terminated: list[int] = []
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)

            def on_sigterm(signum, frame):
                terminated.append(signum)
                if callable(previous):
                    previous(signum, frame)

            signal.signal(signal.SIGTERM, on_sigterm)
        try:
            from mae_transfer.io import open_output

            with open_output(self.log_path, "ab") as logf:
                logf.write(
                    (
                        f"$ {shlex.join(self.command)}\n"
                        f"# job {job_id} on {socket.gethostname()}, attempt {self.attempt}\n"
                    ).encode()
                )
                logf.flush()
                self._started = time.monotonic()
                self._child = subprocess.Popen(
                    self.command,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    cwd=self.cwd,
                    env=env,
                    preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None,
                )
                rc = self._child.wait()
        finally:
            lock.release()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        seconds = self.seconds_before + time.monotonic() - self._started
        if rc != 0 and terminated:
            self._note(
                f"the job got SIGTERM (scancel or preemption) and its command stopped (exit {rc}); no result: "
                "a requeued job resumes from the checkpoint, a cancelled one is recorded as failed by the next `bench`"
            )
            raise SystemExit(143)  # not an Exception: submitit writes no result file for it
        if rc != 0:
            raise JobCommandFailed(f"exited {rc} (log: {self.log_path})")
        out: dict[str, Any] = {"returncode": 0, "wall_time_s": seconds, "attempts": self.attempt, "provenance": None}
        if self.provenance:
            from mae_transfer.engine.results import provenance

            out["provenance"] = provenance()
        return out

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's checkpoint protocol, called on the time-limit / preemption signal: tell the
        command to stop (it saves its checkpoint), wait for it, and hand back this same command for
        the requeued job."""
        from submitit.helpers import DelayedSubmission

        child = self._child
        how = "the command had ended"
        if child is not None and not _exited(child.pid):
            os.kill(child.pid, STOP_SIGNAL)
            deadline = time.monotonic() + self.grace_s
            while not _exited(child.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _exited(child.pid):
                code = _exit_code(child.pid)
                how = "the command saved and stopped" + (f" (exit {code})" if code is not None else "")
            else:
                os.kill(child.pid, signal.SIGKILL)
                how = (
                    f"the command did not stop within {self.grace_s:.0f} s and was killed (its last checkpoint is kept)"
                )
        if self._started is not None:
            self.seconds_before += time.monotonic() - self._started
        self.attempt += 1
        self._note(
            f"time limit / preemption signal: {how}; "
            f"the job is requeued, attempt {self.attempt} resumes from the checkpoint"
        )
        return DelayedSubmission(self, *args, **kwargs)


# ---------------------------------------------------------------------------------- the records
def read_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The cluster job recorded for a run directory (None: none, or unreadable)."""
    path = Path(run_dir) / RECORD_FILE
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("job_id") and rec.get("launcher") in LAUNCHERS else None


def _write_record(run_dir: Path, rec: dict[str, Any]) -> None:
    from mae_transfer.io import atomic_write_json

    atomic_write_json(run_dir / RECORD_FILE, rec)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _local_alive(pid: int) -> bool:
    """Whether the LocalExecutor job (its controller process ``pid``) still runs."""
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X") and b"submitit" in cmdline  # a reused pid is not our job
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_state(rec: dict[str, Any]) -> tuple[str, Any]:
    """``("running", STATE)``, ``("done", result)`` or ``("failed", message)`` of a recorded job."""
    import submitit

    cls = submitit.SlurmJob if rec["launcher"] == "slurm" else submitit.LocalJob
    job = cls(folder=rec["folder"], job_id=str(rec["job_id"]))
    result = job.paths.result_pickle
    # A local job id is a pid, which the system reuses: a result older than the submission is another job's.
    stale = (
        rec["launcher"] == "submitit-local"
        and result.exists()
        and result.stat().st_mtime < rec.get("submitted_at", 0) - 1
    )
    if result.exists() and not stale:
        try:
            return "done", job.result()
        except Exception as e:  # noqa: BLE001 - submitit's FailedJobError carries the job's traceback
            return "failed", str(e)
    if rec["launcher"] == "submitit-local":
        if _local_alive(int(rec["job_id"])):
            return "running", "RUNNING"
        return "failed", f"the job's processes ended without a result (killed?); submitit logs: {job.paths.folder}"
    state = (job.watcher.get_state(job.job_id, mode="force") or "UNKNOWN").split()[0].upper()
    if state in _NOT_OVER or state == "COMPLETED":  # COMPLETED: its result file is not visible yet
        return "running", state
    return "failed", f"SLURM ended the job ({state}) without a result; submitit logs: {job.paths.folder}"


def _failure_text(message: str, log_path: Path) -> tuple[str, int | None]:
    """(error, exit code) of a failed job, from its log as the local runner words it."""
    from mae_transfer.evaluation.runner import _last_error

    m = re.search(r"JobCommandFailed: exited (-?\d+)", message)
    if m:
        rc = int(m.group(1))
        error = _last_error(log_path)
        if rc in (130, 143):
            error = f"interrupted by a signal (exit {rc}); {error}"
        return error, rc
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.strip().startswith("-----")]
    # submitit's own errors end with a line naming the cause ("Job not requeued because: ...").
    cause = next(
        (ln for ln in reversed(lines) if "Error" in ln or "because" in ln), lines[-1] if lines else "no result"
    )
    return cause[-500:], None


# ---------------------------------------------------------------------------------- the launcher
def check_options(launcher: str, slurm: dict[str, Any]) -> None:
    """One clear error for a launcher that cannot run here and for options it does not use.

    ``slurm``: the ``--slurm-*`` options (``partition``, ``account``, ``qos``, ``time``; None when
    not given)."""
    from mae_transfer.config import ConfigError

    given = [f"--slurm-{k}" for k in SLURM_ONLY if slurm.get(k) is not None]
    if given and launcher != "slurm":
        raise ConfigError(f"{', '.join(given)} only applies to --launcher slurm (this is --launcher {launcher})")
    if slurm.get("time") is not None:
        if launcher not in LAUNCHERS:
            raise ConfigError(
                f"--slurm-time is the time limit of submitted jobs (--launcher slurm or submitit-local), "
                f"not of --launcher {launcher}"
            )
        if slurm["time"] < 1:
            raise ConfigError(f"--slurm-time must be at least 1 minute, got {slurm['time']}")
    if launcher not in LAUNCHERS:
        return
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError(
            "--launcher slurm: SLURM is not available on this machine (no `sbatch` on PATH); run bench on a SLURM "
            "login node, or use --launcher local (run the jobs here, the default), --launcher print (print their "
            "commands) or --launcher submitit-local (the same submission path with local processes, a rehearsal)"
        )
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--launcher {launcher} needs submitit: pip install 'mae-transfer[slurm]' (or pip install submitit)"
        ) from None


def _executor(launcher: str, results_dir: Path, nproc: int, slurm: dict[str, Any]):
    import submitit

    from mae_transfer.config import ConfigError

    folder = results_dir.resolve() / "slurm" / "%j"
    minutes = int(slurm.get("time") or DEFAULT_TIME_MIN)
    if launcher == "slurm":
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        except RuntimeError as e:  # sbatch without srun
            raise ConfigError(f"--launcher slurm: {e}") from None
        params: dict[str, Any] = {
            "nodes": 1,
            "tasks_per_node": 1,
            "gpus_per_node": nproc,
            "cpus_per_task": max(8, 8 * nproc),
            "timeout_min": minutes,
        }
        params.update({f"slurm_{k}": slurm[k] for k in SLURM_ONLY if slurm.get(k)})
    else:
        import torch

        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        # The local executor sets CUDA_VISIBLE_DEVICES to its GPUs: none on a machine without one.
        params = {
            "nodes": 1,
            "tasks_per_node": 1,
            "timeout_min": minutes,
            "gpus_per_node": min(nproc, torch.cuda.device_count()) if torch.cuda.is_available() else 0,
        }
    executor.update_parameters(**params)
    return executor


def submit_jobs(
    jobs: list,
    results_dir: str | os.PathLike,
    launcher: str,
    nproc: int = 1,
    slurm: dict[str, Any] | None = None,
    retry_failed: bool = True,
    echo: Callable[[str], None] = print,
) -> list:
    """``bench --launcher slurm / submitit-local``: record what finished, report what runs, submit
    the rest. Returns one ``runner.JobOutcome`` per job; its status is "cached", "recorded",
    "failed", "running" or "submitted" (``cluster_job`` names the job)."""
    from mae_transfer.config import ConfigError
    from mae_transfer.engine.results import FAILED, ResultRow, read_run_results
    from mae_transfer.evaluation.runner import (
        JobOutcome,
        _slug,
        _tag_rows,
        cached_outcome,
        claim_run_dir,
        job_done,
        settled_outcome,
        shell_command,
    )
    from mae_transfer.evaluation.store import ResultStore

    slurm = dict(slurm or {})
    check_options(launcher, slurm)
    results_dir = Path(results_dir)
    store = ResultStore(results_dir)
    kind = "SLURM" if launcher == "slurm" else "local"
    outcomes: list = []
    executor = None
    for i, job in enumerate(jobs, 1):
        head = f"[{i}/{len(jobs)}] {job.label}"
        stored = store.read()
        cached = cached_outcome(job, stored, store, head, echo)
        if cached is not None:
            outcomes.append(cached)
            continue
        log_path = job.run_dir / LOG_FILE
        rec = read_record(job.run_dir)
        if rec is not None and not rec.get("recorded"):
            what = f"{'SLURM' if rec['launcher'] == 'slurm' else 'local'} job {rec['job_id']}"  # e.g. "SLURM job 12345"
            state, info = job_state(rec)
            if state == "running":
                outcomes.append(JobOutcome(job, "running", cluster_job=str(rec["job_id"])))
                unknown = (
                    f"; sacct does not know it: if the job is gone, "
                    f"delete {job.run_dir / RECORD_FILE} to submit it again"
                    if info == "UNKNOWN"
                    else ""
                )
                echo(f"{head}: {what} is {info.lower()}, not submitted again (log: {log_path}{unknown})")
                continue
            rows = read_run_results(job.run_dir) if state == "done" else []
            if rows:
                rows = _tag_rows(job, rows, info.get("wall_time_s"))
                prov = info.get("provenance") or {}  # the machine that ran the job, not this one
                rows = [
                    r.replace(
                        **{k: v for k, v in prov.items() if getattr(r, k, None) is None},
                        extra={**r.extra, "cluster_job": what.replace(" job ", " ")},
                    )
                    for r in rows
                ]
                store.append(rows, unless=lambda stored: job_done(stored, job.key))  # once, if two benches record it
                _write_record(job.run_dir, {**rec, "recorded": _now(), "state": "done"})
                outcomes.append(
                    JobOutcome(job, "recorded", info.get("wall_time_s"), rows=rows, cluster_job=str(rec["job_id"]))
                )
                attempts = info.get("attempts", 1)
                echo(
                    f"{head}: {what} finished{f' after {attempts} attempts' if attempts > 1 else ''}, "
                    f"recorded: {_headline(rows)}"
                )
                continue
            if state == "done":
                error, rc = f"exited 0 but wrote no {job.run_dir / 'results.jsonl'}", 0
            else:
                error, rc = _failure_text(info, log_path)
            failure = ResultRow(
                task=job.task,
                metric=FAILED,
                value=None,
                extra={
                    "error": error,
                    "returncode": rc,
                    "log": str(log_path),
                    "cluster_job": what.replace(" job ", " "),
                },
            )
            store.append(
                _tag_rows(job, [failure], None),
                unless=lambda stored: any(
                    r.get("job_key") == job.key
                    and (r.get("extra") or {}).get("cluster_job") == failure.extra["cluster_job"]
                    for r in stored
                ),
            )
            _write_record(job.run_dir, {**rec, "recorded": _now(), "state": "failed"})
            outcomes.append(JobOutcome(job, "failed", error=error, cluster_job=str(rec["job_id"])))
            again = "not submitted again (--no-retry)" if not retry_failed else "the next `bench` submits it again"
            echo(
                f"{head}: {what} FAILED{f' (exit {rc})' if rc is not None else ''}: {error}"
                f"\n    log: {log_path}; {again}"
            )
            continue
        # Submitting: this bench holds the run directory meanwhile (another bench waits, then finds
        # the record); the job's JobCommand takes the lock over for the run.
        lock = claim_run_dir(job, head, echo, "submitted", wait=SUBMIT_WAIT_S)
        if lock is None:
            outcomes.append(JobOutcome(job, "elsewhere"))
            continue
        with lock:
            cached = cached_outcome(job, store.read(), store, head, echo)
            if cached is not None:
                outcomes.append(cached)
                continue
            now = read_record(job.run_dir)
            if now is not None and now != rec and not now.get("recorded"):
                outcomes.append(JobOutcome(job, "running", cluster_job=str(now["job_id"])))
                echo(f"{head}: another bench submitted it meanwhile (job {now['job_id']}), not submitted again")
                continue
            settled = settled_outcome(job, store, head, echo, retry_failed)
            if settled is not None:
                outcomes.append(settled)
                continue
            if executor is None:
                executor = _executor(launcher, results_dir, nproc, slurm)
            job.run_dir.mkdir(parents=True, exist_ok=True)
            command = shell_command(job, nproc)
            executor.update_parameters(name=f"mae-{job.task}-{_slug(job.backbone.name)}")
            started = time.time()
            try:
                # A local job runs on this machine: the store fills in the same provenance when recording.
                submitted = executor.submit(
                    JobCommand(command, log_path, cwd=os.getcwd(), provenance=launcher == "slurm")
                )
            except Exception as e:  # noqa: BLE001 - sbatch refused (unknown partition, account...)
                text = " ".join(str(e).split())[-500:]
                raise ConfigError(f"submitting the {job.label} job failed: {text}") from None
            _write_record(
                job.run_dir,
                {
                    "launcher": launcher,
                    "job_id": str(submitted.job_id),
                    "folder": str(executor.folder),
                    "submitted": _now(),
                    "submitted_at": started,
                    "command": command,
                    "log": str(log_path),
                    "recorded": None,
                },
            )
            resuming = " (resumes from its checkpoint)" if (job.run_dir / "checkpoint-last.pth").exists() else ""
            outcomes.append(JobOutcome(job, "submitted", cluster_job=str(submitted.job_id)))
            echo(f"{head}: submitted {kind} job {submitted.job_id}{resuming} (log: {log_path})")
    return outcomes


def _headline(rows) -> str:
    from mae_transfer.evaluation.runner import headline

    return headline(rows)


__all__ = [
    "LAUNCHERS",
    "RECORD_FILE",
    "JobCommand",
    "JobCommandFailed",
    "check_options",
    "submit_jobs",
    "read_record",
    "job_state",
]
