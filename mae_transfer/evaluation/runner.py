"""The evaluation runner behind ``mae-transfer bench``: backbones x tasks -> the results store.

A benchmark is a list of *jobs*, one per (backbone, task of the registry). Each job is one run of
the task's front (``evaluation.front``, what the task's ``mae-transfer`` command runs) with its own
run directory, so everything the task commands do (resume after a kill, clear errors, pictures,
per-run ``results.jsonl``) holds for every job. The runner adds:

* **planning**: the job's identity (``job_key``) hashes the task, the fully resolved config (from
  ``front.prepare``, minus paths of the weights), the data path and the backbone's sha256, so the same
  weights under another file name are the same job, and another preset,
  override or checkpoint is a new one;
* **seeds**: ``seeds=N`` plans every training job N times, with ``train.seed`` S, S+1, ..., S+N-1
  (S: the seed of its resolved config, 0 by default). The seed is part of the config, so each
  seeded run is a job of its own (key, run directory, skip, resume), and the first is the very job
  planned without seeds: a benchmark run before keeps its run and adds N-1. The rows of a seeded
  benchmark carry ``seed``, ``seed_group`` (the key of the job's first seed, shared by its seeds) and
  ``seed_base`` (S), which the tables and plots use to show mean ± std over the seeds. Frozen-feature
  evaluations (k-NN and its linear-probe sweep) train nothing with a seed of ours: they run once;
* **partial fine-tuning** (the MAE paper's Figure 9): ``trainable_blocks=[0, 1, 2, 4, ...]`` turns the
  ``finetune`` task into a grid over the number of last blocks fine-tuned, per backbone. k = 0 is the
  ``linprobe`` task's job and k = depth the ``finetune`` task's job, planned exactly as without the
  grid (same key: a benchmark that ran them keeps them; asked for twice, e.g. with ``linprobe`` in
  the tasks too, they are one job); 0 < k < depth is a ``finetune --trainable-blocks k`` job
  (protocol ``partial``, run directory ``finetune-partial<k>-<key>``). The rows of the grid's jobs
  carry ``trainable_blocks`` (k) and ``model_depth``, from which the tables and plots draw Figure 9;
* **skipping**: a job whose rows are already in ``<results>/results.jsonl`` is not run again; a job
  whose run directory already holds its final ``results.jsonl`` (run by hand from the printed
  commands, or killed between finishing and recording) is only recorded;
* **surviving failures**: a job that fails is recorded as a ``job_failed`` row with the error and
  its log, and the runner goes on; the next ``bench`` tries it again;
* **resuming**: a benchmark killed in the middle of a job stops that job cleanly (the job saves its
  checkpoint) and the next ``bench`` redoes only that job, from its checkpoint;
* **sharing**: a job's run directory is locked while the bench runs it (``engine.locks``; the job's
  command works under that lock), so two benchmarks into one store share the jobs: one that finds a
  job locked leaves it to the other and goes on, and a job's rows are written once (the store
  checks under its own lock).

Jobs run one after another on this machine, each in a child process (``--nproc-per-node N`` runs
it under ``torchrun``), or inside the runner's process (``in_process=True``; faster for many tiny
jobs, used by the demo). ``launcher="print"`` prints the commands instead; ``"slurm"`` (and its
local rehearsal ``"submitit-local"``) submits one job per task through submitit
(``evaluation.cluster``), and running ``bench`` again afterwards records what they produced.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from mae_transfer.config import ConfigError
from mae_transfer.engine.locks import FileLock, LockHeld, dir_lock
from mae_transfer.engine.results import FAILED, ResultRow, read_run_results
from mae_transfer.evaluation import front
from mae_transfer.evaluation.registry import TASKS, TaskSpec, benchmark_tasks
from mae_transfer.evaluation.store import ResultStore
from mae_transfer.spec import preferred_knn_protocol

log = logging.getLogger(__name__)

RANDOM = ("random", "none", "scratch", "")


class BenchInterrupted(RuntimeError):
    """The benchmark was stopped (SIGTERM/SIGINT); the running job saved its state."""


@dataclass(frozen=True)
class Backbone:
    name: str
    path: str | None  # None: random initialisation (the from-scratch baseline)
    sha256: str | None = None

    @property
    def random(self) -> bool:
        return self.path is None


@dataclass
class Job:
    backbone: Backbone
    task: str
    options: dict[str, Any]  # the task's options (evaluation.options), without the output
    preset: str | None
    data: str | None
    model: str | None
    key: str = ""
    run_dir: Path = Path()
    # A seeded benchmark (plan_jobs(seeds=N > 1)): this run's train.seed, the key of the job's first
    # seed (the job planned without seeds), shared by all its seeds, and that first seed. None otherwise.
    seed: int | None = None
    seed_group: str | None = None
    seed_base: int | None = None
    # A job of a partial fine-tuning grid (plan_jobs(trainable_blocks=...)): the number of last blocks
    # fine-tuned (0: the linear probe, the depth: full fine-tuning); None for a job of no grid.
    trainable_blocks: int | None = None
    depth: int | None = None  # the blocks of the backbone's network (grid jobs only)

    @property
    def partial(self) -> bool:
        """A partial fine-tuning job (0 < k < depth: only the last k blocks train)."""
        return self.task == "finetune" and bool(self.options.get("trainable_blocks"))

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    @property
    def argv(self) -> list[str]:
        """The ``mae-transfer`` command line of the job, without ``--output``."""
        return front.command_line(self.spec, self.options)

    @property
    def parallel(self) -> bool:  # may run under torchrun
        return self.spec.parallel

    @property
    def label(self) -> str:
        k = self.options.get("trainable_blocks")
        blocks = f" · last {k} block{'s' if k != 1 else ''}" if self.partial else ""
        return f"{self.task} · {self.backbone.name}{blocks}" + (f" · seed {self.seed}" if self.seed is not None else "")


@dataclass
class JobOutcome:
    job: Job
    # "done" (ran now), "cached" (results already in the store), "recorded" (finished outside the runner
    # or as a cluster job), "failed", "elsewhere" (another bench or process holds its run directory);
    # cluster launchers also: "submitted" (now), "running" (submitted before)
    status: str
    wall_time_s: float | None = None
    error: str | None = None
    rows: list[ResultRow] = field(default_factory=list)
    cluster_job: str | None = None  # the SLURM / local submitit job id (cluster launchers)


def parse_backbones(specs: Iterable[str]) -> list[Backbone]:
    """``NAME=PATH`` (or a bare PATH, named after the file; ``NAME=random`` for random weights)."""
    from mae_transfer.io import file_sha256

    out: list[Backbone] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = (spec, "") if spec.lower() in RANDOM else (Path(spec).stem, spec)
        name = name.strip()
        if not name:
            raise ConfigError(
                f"--backbone {spec!r}: give NAME=PATH (e.g. mae=runs/pretrain/encoder.pth or scratch=random)"
            )
        if any(b.name == name for b in out):
            raise ConfigError(f"--backbone: the name {name!r} is given twice; every backbone needs its own name")
        if path.strip().lower() in RANDOM:
            out.append(Backbone(name, None))
            continue
        from mae_transfer.checkpoint.hub import is_named, weights_sha256

        if is_named(
            path.strip()
        ):  # hf-hub:ORG/NAME, timm:ARCH.TAG: resolved (and cached) now, identified by their file
            out.append(Backbone(name, path.strip(), weights_sha256(path.strip())))
            continue
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(
                f"--backbone {name}={path}: no such file (give a checkpoint, or {name}=random for random weights)"
            )
        out.append(Backbone(name, str(p.resolve()), file_sha256(p)))
    if not out:
        raise ConfigError("give at least one --backbone NAME=PATH")
    return out


def parse_tasks(text: str | Iterable[str]) -> list[str]:
    """Task names of the registry (``all``: every benchmark task, in the registry's order)."""
    tasks = benchmark_tasks()
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if items == ["all"]:
        return tasks
    bad = [t for t in items if t not in tasks]
    if bad or not items:
        raise ConfigError(
            f"--tasks: unknown task(s) {', '.join(bad) or '(none)'}; choose from {','.join(tasks)} or all"
        )
    return list(dict.fromkeys(items))


def parse_task_map(specs: Iterable[str], option: str, keys: Iterable[str]) -> dict[str, str]:
    """``TASK=VALUE`` pairs (``--data coco=/datasets/coco``, ``--preset ade20k=upernet_vit_b``)."""
    allowed = set(keys)
    out = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        key = key.strip().lower()
        if not sep or key not in allowed:
            raise ConfigError(f"{option} {spec!r}: expected TASK=VALUE with TASK one of {', '.join(sorted(allowed))}")
        out[key] = value
    return out


def parse_overrides(specs: Iterable[str]) -> dict[str, list[str]]:
    """``TASK:KEY=VALUE`` (``*:`` for every task) -> {task: ["KEY=VALUE", ...]}."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        task, sep, kv = spec.partition(":")
        task = task.strip().lower()
        if not sep or "=" not in kv or (task != "*" and task not in benchmark_tasks()):
            raise ConfigError(
                f"--set {spec!r}: expected TASK:KEY=VALUE (e.g. coco:train.epochs=10, *:train.device=cpu)"
            )
        out.setdefault(task, []).append(kv)
    return out


def _infer_model(path: str, trust: bool = False) -> tuple[str | None, int | None]:
    from mae_transfer.checkpoint import describe_checkpoint

    info = describe_checkpoint(path, trust=trust)
    return info.get("name"), info.get("img_size")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "backbone"


def seed_of(cfg: Any) -> int | None:
    """The training seed of a resolved config (``train.seed``); None for a run without one (a
    frozen-feature evaluation: nothing of ours to seed)."""
    seed = getattr(getattr(cfg, "train", None), "seed", None)
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


# The x axis of the MAE paper's Figure 9 (partial fine-tuning of ViT-L, 24 blocks): 0 (linear probe),
# 1, 2, 4, 6, 12, 18, 24 (full fine-tuning) blocks fine-tuned. ``figure9`` takes those below a
# network's depth, and the depth: ViT-B (12 blocks) 0,1,2,4,6,12; the toy micro ViT (4) 0,1,2,4.
FIGURE9_BLOCKS = (0, 1, 2, 4, 6, 12, 18, 24)
_GRID_WORDS = ("figure9", "full")


def parse_trainable_blocks(text: str | None) -> list[int | str] | None:
    """``--trainable-blocks`` of ``bench``: comma-separated block counts (``0``: the linear probe),
    ``full`` (all blocks: full fine-tuning) and ``figure9`` (the paper's grid up to the depth); None
    when not given. The depth each word stands for is the backbone's (:func:`grid_blocks`)."""
    if text is None:
        return None
    items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if not items or any(not (t.isdigit() or t in _GRID_WORDS) for t in items):
        raise ConfigError(
            f"--trainable-blocks {text!r}: give how many of the last blocks to fine-tune, comma-separated "
            "(0: the linear probe, full: all blocks), e.g. 0,1,2,4,6,full; or figure9 for the paper's "
            "0,1,2,4,6,12,18,24 up to the network's depth"
        )
    return list(dict.fromkeys(int(t) if t.isdigit() else t for t in items))


def grid_blocks(grid: Iterable[int | str], depth: int) -> list[int]:
    """The block counts of a ``--trainable-blocks`` grid for a network of ``depth`` blocks, ascending."""
    ks: set[int] = set()
    for item in grid:
        if item == "figure9":
            ks.update(k for k in FIGURE9_BLOCKS if k < depth)
        ks.add(depth if item in _GRID_WORDS else int(item))
    return sorted(ks)


def block_count(model: Any) -> int | None:
    """The blocks of the network a task config's ``model`` section builds (those partial fine-tuning
    counts from the end); None when its size cannot be told."""
    try:
        if getattr(model, "family", "vit") == "vit":
            return int(model.size()["depth"])
        if model.family == "convnet":
            from mae_transfer.models.convnet import convnet_size

            return sum(convnet_size(model.name).depths)
    except (AttributeError, ValueError, KeyError):
        pass
    return None


def plan_jobs(
    backbones: list[Backbone],
    tasks: list[str],
    results_dir: str | os.PathLike,
    data: dict[str, str] | None = None,
    presets: dict[str, str] | None = None,
    overrides: dict[str, list[str]] | None = None,
    random_model: str | None = None,
    trust: bool = False,
    seeds: int = 1,
    trainable_blocks: Iterable[int | str] | None = None,
) -> list[Job]:
    """One job per (backbone, task), in backbone-major order, each with its key and run directory.

    Random-init backbones get the architecture of the first checkpoint backbone (or
    ``random_model``), so that "MAE vs from scratch" compares the same network. ``trust``: the
    backbones may need full unpickling (``--trust-checkpoint``, passed on to every job).
    ``seeds`` N > 1: every job that trains with a seed is planned N times, with ``train.seed``
    S, S+1, ..., S+N-1 (S: its config's seed), right after each other; the first is the job planned
    without seeds (same key and run directory). A job without a training seed (k-NN) is planned once.
    ``trainable_blocks`` (:func:`parse_trainable_blocks`): the ``finetune`` task becomes the
    partial fine-tuning grid of Figure 9, in place of the one ``finetune`` job: per backbone and block
    count k (ascending), k = 0 the ``linprobe`` task's job, k = depth the ``finetune`` task's job,
    others ``finetune --trainable-blocks k``; a job asked for twice (``linprobe`` in ``tasks`` too) is
    planned once, where it comes first. Without it, the jobs are exactly those planned before the grid."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1 (the number of runs of every training job)")
    data, presets, overrides = data or {}, presets or {}, overrides or {}
    grid = list(trainable_blocks) if trainable_blocks is not None else None
    allowed = list(tasks)
    if grid is not None:
        if "finetune" not in tasks:
            raise ConfigError(
                f"--trainable-blocks: the grid runs the finetune task (partial fine-tuning, the paper's "
                f"Figure 9), which is not among the tasks run: {','.join(tasks)}; add finetune to --tasks"
            )
        if any(
            o.partition("=")[0].strip() == "model.trainable_blocks"
            for t in ("*", "finetune")
            for o in overrides.get(t, [])
        ):
            raise ConfigError(
                "--set ...:model.trainable_blocks=...: --trainable-blocks sets it for each job of the grid; "
                "leave that --set out"
            )
        if "figure9" in grid or 0 in grid:  # k = 0 is the linprobe job: its --set / --preset apply
            allowed.append("linprobe")
    for option, sep, given in (("--set", ":", overrides), ("--preset", "=", presets)):
        stray = [t for t in given if t != "*" and t not in allowed]
        if stray:  # it would be ignored without a word
            raise ConfigError(
                f"{option} {stray[0]}{sep}...: {stray[0]} is not among the tasks run: {','.join(tasks)}; "
                f"add it to --tasks or leave the {option} out"
            )
    models: dict[str, tuple[str | None, int | None]] = {}
    for b in backbones:
        if b.path:
            models[b.name] = _infer_model(b.path, trust)
    reference = random_model and (random_model, None)
    if not reference:
        reference = next(iter(models.values()), (None, None))
    jobs = []
    for b in backbones:
        model, img = models.get(b.name, reference)

        def plan(task: str, extra: dict[str, Any] | None = None) -> tuple[Job, Any]:
            spec = TASKS[task]
            options: dict[str, Any] = {"trust_checkpoint": True} if trust else {}
            dpath = data.get(task, data.get(spec.data_group or "", None))
            if dpath:
                options["data"] = str(Path(dpath).expanduser().resolve())
            if b.path:
                options["backbone"] = b.path
            elif model:
                options["model"] = model
                if spec.native_resolution and img:
                    options["img_size"] = img
            if spec.trains:
                if presets.get(task):
                    options["preset"] = presets[task]
                options["overrides"] = overrides.get("*", []) + overrides.get(task, [])
            elif overrides.get(task) or presets.get(task):
                raise ConfigError(f"--set/--preset {task}:...: the {task} job has no config (it trains nothing)")
            options.update(extra or {})
            return _plan_job(Job(b, task, options, presets.get(task), dpath, model), results_dir)

        planned: dict[str, tuple[Job, Any]] = {}  # key -> (job, config): a job asked for twice runs once
        for task in tasks:
            if task != "finetune" or grid is None:
                job, cfg = plan(task)
                planned.setdefault(job.key, (job, cfg))
                continue
            full, full_cfg = plan(task)
            depth = block_count(full_cfg.model)
            if depth is None:
                raise ConfigError(
                    f"--trainable-blocks: the depth of {b.name}'s network ({full.model}) is unknown; "
                    "give it a size name (--set finetune:model.name=...)"
                )
            for k in grid_blocks(grid, depth):
                if k > depth:
                    raise ConfigError(
                        f"--trainable-blocks {k}: {b.name}'s {full.model} has {depth} blocks; give k from 0 "
                        f"(the linear probe) to {depth} (full fine-tuning), or full / figure9"
                    )
                if k == 0:
                    job, cfg = plan("linprobe")
                elif k == depth:
                    job, cfg = full, full_cfg
                else:
                    job, cfg = plan("finetune", {"trainable_blocks": k})
                job, cfg = planned.setdefault(job.key, (job, cfg))
                job.trainable_blocks, job.depth = k, depth
        for job, cfg in planned.values():
            jobs.append(job)
            base = seed_of(cfg)
            if seeds == 1 or base is None:
                continue
            job.seed, job.seed_group, job.seed_base = base, job.key, base
            for seed in range(base + 1, base + seeds):
                # In place of a --set train.seed=S (S, the first seed, stays that job's).
                kept = [o for o in job.options["overrides"] if o.partition("=")[0].strip() != "train.seed"]
                opts = {**job.options, "overrides": [*kept, f"train.seed={seed}"]}
                other, _ = _plan_job(Job(b, job.task, opts, job.preset, job.data, model), results_dir)
                other.seed, other.seed_group, other.seed_base = seed, job.key, base
                other.trainable_blocks, other.depth = job.trainable_blocks, job.depth
                jobs.append(other)
    return jobs


def _plan_job(job: Job, results_dir: str | os.PathLike) -> tuple[Job, Any]:
    """``job`` with its model, key and run directory from its resolved options; and its config."""
    try:
        prepared = front.prepare(job.spec, job.options)
    except ConfigError as e:
        raise ConfigError(f"{job.task} job of {job.backbone.name}: {e}") from None
    if prepared.cfg is not None:
        job.model = (getattr(prepared.cfg, "model", None) and getattr(prepared.cfg.model, "name", None)) or job.model
    blob = json.dumps(
        {"task": job.task, "config": prepared.identity(), "data": job.data, "backbone": job.backbone.sha256},
        sort_keys=True,
        default=str,
    )
    job.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    name = f"{job.task}-partial{job.options['trainable_blocks']}" if job.partial else job.task
    job.run_dir = Path(results_dir) / "runs" / _slug(job.backbone.name) / f"{name}-{job.key[:8]}"
    return job, prepared.cfg


def _backbone_format(job: Job) -> str | None:
    """The layout the job's backbone file was read as (``mae_encoder``, ``dino``, ``mocov3``...;
    None for random weights or a file that no longer reads), from the description the planning
    already made (``describe_checkpoint`` reads a file once per process)."""
    if job.backbone.path is None:
        return None
    from mae_transfer.checkpoint import CheckpointError, describe_checkpoint

    try:
        info = describe_checkpoint(job.backbone.path, trust=bool(job.options.get("trust_checkpoint")))
    except (CheckpointError, OSError):
        return None
    return info.get("format")


def _tag_rows(job: Job, rows: list[ResultRow], wall: float | None) -> list[ResultRow]:
    """The job's own rows, named after the benchmark's backbone and job, with the layout its
    weights were read as (``backbone_format``)."""
    model = job.model
    cfg_path = job.run_dir / "config_resolved.json"
    if cfg_path.exists():
        with contextlib.suppress(ValueError, OSError, AttributeError):
            model = (json.loads(cfg_path.read_text()).get("model") or {}).get("name") or model
    from mae_transfer.data.toy import is_toy_data

    toy = bool(job.data and is_toy_data(job.data))  # toy data passed as --data (e.g. larger toy splits)
    seeded = {}
    if job.seed is not None:  # a seeded benchmark: which seed, and the runs it is one of
        seeded = {"seed": job.seed, "seed_group": job.seed_group, "seed_base": job.seed_base}
    if job.trainable_blocks is not None:  # a job of a partial fine-tuning grid: its point on Figure 9's x axis
        seeded.update(trainable_blocks=job.trainable_blocks, model_depth=job.depth)
    fmt = _backbone_format(job)
    if fmt is not None:
        seeded["backbone_format"] = fmt
    out = []
    for r in rows:
        dataset = r.dataset
        if toy and dataset and "(toy)" not in dataset:
            dataset += " (toy)"
        out.append(
            r.replace(
                # A failure row of a partial job names its protocol: the tables keep it out of fine-tuning's.
                protocol=r.protocol or ("partial" if job.partial else None),
                dataset=dataset,
                backbone=job.backbone.name,
                backbone_path=job.backbone.path,
                backbone_sha256=job.backbone.sha256,
                model=model,
                preset=job.preset,
                job_key=job.key,
                run_dir=str(job.run_dir),
                wall_time_s=wall,
                extra={**r.extra, **seeded},
            )
        )
    return out


def job_done(store_rows: list[dict], key: str) -> bool:
    """Whether the store holds results (not only failures) of the job ``key``."""
    return any(r.get("job_key") == key and r.get("metric") != FAILED for r in store_rows)


def shell_command(job: Job, nproc: int = 1, python: str | None = None) -> list[str]:
    """The command line that runs ``job`` (under torchrun when ``nproc`` > 1)."""
    py = python or sys.executable
    tail = ["-m", "mae_transfer", *job.argv, "--output", str(job.run_dir)]
    if nproc > 1 and job.parallel:
        return [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *tail]
    return [py, *tail]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # Linux: the job gets SIGTERM (and saves its checkpoint) if the runner is killed, even by SIGKILL,
    # instead of living on and racing the next run on the same directory.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _last_error(log_path: Path) -> str:
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if "error" in ln.lower() or "Error" in ln:
            return ln.strip()[-500:]
    return (lines[-1].strip() if lines else "no output")[-500:]


class _StopRequest:
    """SIGTERM/SIGINT while a child job runs: pass it on, let the job save, then stop the benchmark."""

    def __init__(self):
        self.signum: int | None = None
        self.child: subprocess.Popen | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signal.SIGTERM)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _run_subprocess(
    job: Job, nproc: int, log_path: Path, verbose: bool, stop: _StopRequest, env: dict[str, str] | None = None
) -> int:
    cmd = shell_command(job, nproc)
    from mae_transfer.io import open_output

    with open_output(log_path, "ab") as logf:
        logf.write(f"$ {shlex.join(cmd)}\n".encode())
        logf.flush()
        out = None if verbose else logf
        child = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        stop.child = child
        try:
            while True:
                try:
                    return child.wait()
                except KeyboardInterrupt:  # pragma: no cover - handled by _StopRequest normally
                    stop.signum = signal.SIGINT
        finally:
            stop.child = None


def run_in_process(spec: TaskSpec, options: dict[str, Any], log_path: Path, verbose: bool = False) -> int:
    """Run ``spec`` with ``options`` through the task front inside this process, its output going to
    ``log_path``; the exit code (2: a user error, 130/143: interrupted, 1: a crash)."""
    from mae_transfer.checkpoint import CheckpointError
    from mae_transfer.data.errors import DataError
    from mae_transfer.engine.logger import setup_logging
    from mae_transfer.engine.trainer import TrainingInterrupted
    from mae_transfer.io import OutputPathError, open_output

    try:
        with open_output(log_path, "a") as logf:
            logf.write(f"$ mae-transfer {shlex.join(front.command_line(spec, options))}\n")
            logf.flush()
            redirect = contextlib.nullcontext() if verbose else contextlib.ExitStack()
            if not verbose:
                redirect.enter_context(contextlib.redirect_stdout(logf))
                redirect.enter_context(contextlib.redirect_stderr(logf))
            with redirect:
                try:
                    return front.run(spec, options)
                except TrainingInterrupted as e:
                    print(f"mae-transfer: {e}", file=sys.stderr)
                    return 143
                except KeyboardInterrupt:
                    return 130
                except (ConfigError, CheckpointError, DataError, OutputPathError, FloatingPointError) as e:
                    print(f"mae-transfer: error: {e}", file=sys.stderr)
                    return 2
                except Exception:  # noqa: BLE001 - a failing job must not end the benchmark
                    import traceback

                    traceback.print_exc()
                    print(f"mae-transfer: error: the job crashed: {sys.exc_info()[1]!r}", file=sys.stderr)
                    return 1
    finally:
        setup_logging(0)  # the job pointed the console handler at its log file


def run_jobs(
    jobs: list[Job],
    results_dir: str | os.PathLike,
    nproc: int = 1,
    in_process: bool = False,
    verbose: bool = False,
    retry_failed: bool = True,
    echo: Callable[[str], None] = print,
) -> list[JobOutcome]:
    """Run the jobs that have no results yet, one after another, recording every outcome.

    Raises :class:`BenchInterrupted` after a SIGTERM/SIGINT (the job in progress saved its state)."""
    store = ResultStore(results_dir)
    outcomes: list[JobOutcome] = []
    with _StopRequest() as stop:
        for i, job in enumerate(jobs, 1):
            head = f"[{i}/{len(jobs)}] {job.label}"
            cached = cached_outcome(job, store.read(), store, head, echo)
            if cached is not None:
                outcomes.append(cached)
                continue
            lock = claim_run_dir(job, head, echo, "run")
            if lock is None:
                outcomes.append(JobOutcome(job, "elsewhere"))
                continue
            with lock:
                # Another bench may have finished it between our look at the store and the lock.
                cached = cached_outcome(job, store.read(), store, head, echo)
                settled = cached or settled_outcome(job, store, head, echo, retry_failed)
                if settled is not None:
                    outcomes.append(settled)
                    continue
                job.run_dir.mkdir(parents=True, exist_ok=True)
                log_path = job.run_dir / "bench.log"
                resuming = (job.run_dir / "checkpoint-last.pth").exists()
                echo(f"{head}: {'resuming' if resuming else 'running'} (log: {log_path})")
                t0 = time.perf_counter()
                if in_process:
                    rc = run_in_process(job.spec, {**job.options, "output": str(job.run_dir)}, log_path, verbose)
                else:
                    rc = _run_subprocess(job, nproc, log_path, verbose, stop, lock.child_env())
                wall = time.perf_counter() - t0
                # In-process jobs catch the signal themselves (the trainer saves and returns 143/130).
                if stop.signum is not None or (in_process and rc in (130, 143)):
                    raise BenchInterrupted(
                        f"stopped during {job.label} after {wall:.0f} s; its run directory {job.run_dir} keeps its "
                        "checkpoint: run the same command again to resume (finished jobs are not run again)"
                    )
                rows = read_run_results(job.run_dir) if rc == 0 else []
                if rc == 0 and rows:
                    rows = _tag_rows(job, rows, wall)
                    store.append(rows, unless=lambda stored: job_done(stored, job.key))
                    outcomes.append(JobOutcome(job, "done", wall, rows=rows))
                    echo(f"{head}: done in {wall:.0f} s: {headline(rows)}")
                    continue
                error = _last_error(log_path) if rc != 0 else f"exited 0 but wrote no {job.run_dir / 'results.jsonl'}"
                if rc in (130, 143):
                    error = f"interrupted by a signal from outside the runner (exit {rc}); {error}"
                failure = ResultRow(
                    task=job.task,
                    metric=FAILED,
                    value=None,
                    extra={"error": error, "returncode": rc, "log": str(log_path)},
                )
                store.append(_tag_rows(job, [failure], wall))
                outcomes.append(JobOutcome(job, "failed", wall, error=error))
                echo(f"{head}: FAILED after {wall:.0f} s (exit {rc}): {error}\n    log: {log_path}")
    return outcomes


def claim_run_dir(
    job: Job, head: str, echo: Callable[[str], None], verb: str = "run", wait: float = 0.0
) -> FileLock | None:
    """The lock of ``job``'s run directory, taken for this bench; None after saying in one line who
    holds it (another bench running the job: this one leaves it to that one)."""
    lock = dir_lock(job.run_dir, f"the run directory {job.run_dir}")
    try:
        return lock.acquire(wait)
    except LockHeld as e:
        h = e.holder
        who = (
            f"another {'bench' if h and ' bench ' in f' {h.command} ' else 'process'} "
            f"({h.short if h else 'details not readable'})"
        )
        echo(f"{head}: running in {who}; not {verb} here")
        return None


def elsewhere_note(outcomes: list[JobOutcome], rows: list[dict]) -> str | None:
    """One line on the jobs left to other benches that have no results in ``rows`` (the store's rows
    the tables were made from) yet; None when there is none."""
    n = sum(o.status == "elsewhere" and not job_done(rows, o.job.key) for o in outcomes)
    if not n:
        return None
    return (
        f"{n} job(s) running in another bench or process are not in these tables yet; run the same "
        "`mae-transfer bench` again when they have finished"
    )


def cached_outcome(
    job: Job, stored: list[dict], store: ResultStore, head: str, echo: Callable[[str], None]
) -> JobOutcome | None:
    """The outcome of a job whose rows are already in the store (said in one line), else None."""
    if not job_done(stored, job.key):
        return None
    rows = [ResultRow.from_dict(r) for r in stored if r.get("job_key") == job.key and r.get("metric") != FAILED]
    echo(f"{head}: done before, skipped (results in {store.path})")
    return JobOutcome(job, "cached", rows=rows)


def settled_outcome(
    job: Job, store: ResultStore, head: str, echo: Callable[[str], None], retry_failed: bool
) -> JobOutcome | None:
    """The outcome of a job that needs no run although the store has no rows for it: its run
    directory holds results (it ran to the end by hand, or the launcher stopped before recording
    them: recorded now), or it failed before and ``retry_failed`` is off. Else None."""
    finished = read_run_results(job.run_dir)
    if finished:
        rows = _tag_rows(job, finished, None)
        store.append(rows, unless=lambda stored: job_done(stored, job.key))
        echo(f"{head}: finished in {job.run_dir}, recorded")
        return JobOutcome(job, "recorded", rows=rows)
    if not retry_failed and any(r.get("job_key") == job.key for r in store.read()):
        echo(f"{head}: failed before, not retried")
        return JobOutcome(job, "failed", error="failed before (--no-retry)")
    return None


def headline(rows: list[ResultRow]) -> str:
    """The main numbers of a job's rows (its task's headline columns), e.g. ``APbox 19.8, APmask 22.7``."""
    if not rows:
        return "no metric"
    parts = []
    for col in TASKS[rows[0].task].headline if rows[0].task in TASKS else ():
        hits = [
            r
            for r in rows
            # A partial fine-tuning (the Figure 9 grid) reports its top-1 under the fine-tuning's heading.
            if r.metric == col.metric
            and (col.matches(r.protocol or "") or r.protocol == "partial")
            and r.value is not None
        ]
        if col.prefer == "knn":
            want = preferred_knn_protocol(r.protocol for r in hits)
            hits = [r for r in hits if r.protocol == want]
        if hits:
            parts.append(f"{col.bar} {hits[-1].value:.2f}")
    return ", ".join(parts) or "no metric"


def print_commands(
    jobs: list[Job], results_dir: str | os.PathLike, nproc: int, echo: Callable[[str], None] = print
) -> int:
    """``launcher="print"``: the commands of the jobs that have no results yet."""
    stored = ResultStore(results_dir).read()
    todo = [j for j in jobs if not job_done(stored, j.key) and not read_run_results(j.run_dir)]
    echo(
        f"# {len(todo)} of {len(jobs)} jobs to run; "
        "afterwards run the same `mae-transfer bench` to record and tabulate them"
    )
    for j in todo:
        echo(f"# {j.label}")
        echo(shlex.join(shell_command(j, nproc, python="python")))
    return len(todo)


def latest_rows(results_dir: str | os.PathLike, jobs: list[Job] | None = None) -> list[dict]:
    """The store's rows, restricted to the keys of ``jobs`` when given (the current benchmark)."""
    rows = ResultStore(results_dir).read()
    if jobs is not None:
        keys = {j.key for j in jobs}
        rows = [r for r in rows if r.get("job_key") in keys]
    return rows


__all__ = [
    "Backbone",
    "Job",
    "JobOutcome",
    "BenchInterrupted",
    "parse_backbones",
    "parse_tasks",
    "parse_task_map",
    "parse_overrides",
    "plan_jobs",
    "seed_of",
    "parse_trainable_blocks",
    "grid_blocks",
    "block_count",
    "FIGURE9_BLOCKS",
    "run_jobs",
    "claim_run_dir",
    "elsewhere_note",
    "cached_outcome",
    "run_in_process",
    "print_commands",
    "shell_command",
    "latest_rows",
    "headline",
]
