"""The ``mae-transfer`` command. Task packages are imported only when their command runs."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

log = logging.getLogger("mae_transfer.cli")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what schedulers expect from a preempted job


def _add_task_command(sub, command: str, specs: list) -> None:
    """One task command from the registry: the shared options of its family (an argparse parent
    parser, built once per family from the flag table) and the task's own options."""
    from mae_transfer.evaluation.front import option_names
    from mae_transfer.evaluation.options import FAMILY_OPTIONS

    spec = specs[0]
    names = tuple(dict.fromkeys(n for s in specs for n in option_names(s)))
    own = tuple(n for n in names if n in spec.option_help or n not in FAMILY_OPTIONS[spec.family])
    p = sub.add_parser(
        command,
        help=spec.help,
        description=spec.description or spec.help,
        epilog=spec.epilog or None,
        parents=[_family_parent(spec.family, frozenset(own))],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_flags(p, own, spec.option_help)
    if spec.trains:
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="KEY=VALUE",
            help="config overrides, e.g. train.epochs=10 optim.layer_decay=0.8",
        )
    p.set_defaults(func=_run_task, command_name=command, option_names=names)


def _add_flags(parser: argparse.ArgumentParser, names, help_texts: dict[str, str] | None = None) -> None:
    """Add the options ``names`` from the one flag table (pairs in ``EXCLUSIVE`` as exclusive groups)."""
    from mae_transfer.evaluation.options import EXCLUSIVE, FLAGS

    groups: dict = {}
    for name in names:
        flag = FLAGS[name]
        kwargs = {**flag.kwargs, **({"help": help_texts[name]} if help_texts and name in help_texts else {})}
        pair = next((g for g in EXCLUSIVE if name in g), None)
        if pair and pair not in groups:
            groups[pair] = parser.add_mutually_exclusive_group()
        target = groups[pair] if pair else parser
        target.add_argument(*flag.flags, dest=name, **kwargs)


def _family_parent(family: str, leave_out: frozenset) -> argparse.ArgumentParser:
    """The parent parser holding a family's shared options (those a command words its own way are left out)."""
    from mae_transfer.evaluation.options import FAMILY_OPTIONS

    parent = argparse.ArgumentParser(add_help=False)
    _add_flags(parent, [n for n in FAMILY_OPTIONS[family] if n not in leave_out])
    return parent


def _run_task(args) -> int:
    """Every task command: the parsed options go to the task front (evaluation.front.run)."""
    from mae_transfer.evaluation import front
    from mae_transfer.evaluation.registry import spec_for

    options = {n: getattr(args, n, None) for n in args.option_names}
    options["overrides"] = list(getattr(args, "overrides", None) or [])
    return front.run(spec_for(args.command_name, options), options)


def _add_speed(sub) -> None:
    p = sub.add_parser(
        "speed",
        help="measure training speed (images/s, step time, memory, TFLOP/s)",
        description=textwrap.dedent(
            """\
            Measure the speed of a training step on synthetic data created on the device (so data
            loading does not hide the model's speed): images/s, step time, peak memory and achieved
            TFLOP/s over a steady-state window after warm-up steps.

            FLOPs are counted for matrix multiplications (2 per multiply-add) of one training step,
            taken as 3 x the forward pass; for MAE the encoder runs on the visible tokens only
            (ViT-B/16 at 224 px, 75 %% masking: about 58.7 GFLOP per image per step).

            `speed coco` times Mask R-CNN training steps (synthetic images with 8 boxes and masks
            each) and inference of a detection preset, e.g. ViTDet ViT-B at 1024 px:
              mae-transfer speed coco --preset vitdet_mask_rcnn_b --batch-size 4 --json det.json"""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "what",
        choices=_speed_choices(),
        help="which workload to measure; all: every workload in one table (and one --json); "
        "inat / places (2018 / 365) and the other dataset names: --data-only only",
    )
    p.add_argument(
        "--tiny", action="store_true", help="all: micro models, a few steps (the code paths on a CPU, under a minute)"
    )
    p.add_argument(
        "--data-only",
        action="store_true",
        help="coco / ade20k / inat / places: the data instead of the model: dataset build time and memory, "
        "one pass over the index in --workers DataLoader workers (their private memory before and "
        "after), and samples/s of the training pipeline (decode + transforms) per worker",
    )
    p.add_argument("--data", metavar="DIR", help="--data-only: the dataset (default: the built-in toy data)")
    p.add_argument(
        "--full-size",
        action="store_true",
        help="--data-only: annotation files with the official counts (COCO 2017, iNat 2018, Places365, "
        "ADE20K) pointing at a few real images, written once into the cache "
        "(or give --data DIR written by `mae-transfer toy-data --full-size KIND DIR`)",
    )
    p.add_argument("--workers", type=int, default=4, help="--data-only: DataLoader workers of the index pass (0: none)")
    p.add_argument("--samples", type=int, default=16, help="--data-only: samples to time")
    p.add_argument(
        "--split", metavar="NAME", help="--data-only: the split whose images go through the training transforms"
    )
    p.add_argument("--model", help="pretrain: the MAE model (default mae_vit_base_patch16)")
    p.add_argument(
        "--preset",
        help="coco / ade20k / finetune: the task preset (default vitdet_mask_rcnn_b, upernet_vit_b, finetune_vit_base)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="default: 256 on GPU, 8 on CPU (pretrain); 4 / 1 (coco); 8 (ade20k); 128 (finetune)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="timed steps (default 20 for pretrain and coco, 10 for ade20k and finetune; all: each workload's own)",
    )
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5, 3 for ade20k and finetune)")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="auto: bf16 on a GPU, fp32 on the CPU (all: for every workload; --tiny --precision bf16 runs "
        "the GPU's bf16 code paths on a CPU); fp16 (coco, GPU only) is ViTDet's AMP with loss scaling",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--compile", action="store_true", help="pretrain / finetune: torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true", help="pretrain / coco")
    p.add_argument("--img-size", type=int, help="pretrain / coco")
    p.add_argument("--peak-tflops", type=float, help="pretrain: device peak for the MFU column")
    p.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    # Every option's default, to tell which ones were given (_check_speed_options).
    defaults = {k: v for k, v in vars(p.parse_args(["all"])).items() if k != "what"}
    p.set_defaults(func=_run_speed, speed_defaults=defaults)


def _speed_choices() -> list[str]:
    """What ``speed`` measures, from the registry: all, every task with a speed workload (its
    ``SpeedPlan``), then the data-only ones (the short command names, then the tasks)."""
    from mae_transfer.evaluation.speed import data_aliases, data_workloads, workloads

    return list(dict.fromkeys(["all", *workloads(), *data_aliases(), *data_workloads()]))


# Which `speed` options `all` and `--data-only` take; a task's workload declares its own
# (SpeedPlan.options). The rest would be silently ignored: refused instead.
_SPEED_OPTIONS = {
    "all": {"tiny", "precision", "device", "json", "steps", "warmup"},
    "data_only": {"data", "samples", "split", "preset", "json", "workers", "full_size"},
}


def _check_speed_options(args) -> None:
    """One clear error for an option the chosen measurement does not use, instead of ignoring it."""
    from mae_transfer.config import ConfigError
    from mae_transfer.evaluation.registry import TASKS
    from mae_transfer.evaluation.speed import data_aliases, data_workloads, workloads

    tasks = workloads()
    if args.data_only and args.what not in (*data_aliases(), *data_workloads()):
        commands = list(dict.fromkeys(TASKS[t].command for t in data_workloads()))
        raise ConfigError(
            f"--data-only measures the data of {', '.join(commands[:-1])} or {commands[-1]}, not {args.what}"
        )
    if not args.data_only and args.what not in ("all", *tasks):
        raise ConfigError(f"speed {args.what} measures data only: add --data-only")
    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    kind = "data_only" if args.data_only else args.what
    takes_options = _SPEED_OPTIONS[kind] if kind in _SPEED_OPTIONS else set(tasks[kind].speed.options)
    unused = [
        f"--{name.replace('_', '-')}"
        for name, default in args.speed_defaults.items()
        if getattr(args, name) != default and name not in takes_options and name != "data_only"
    ]
    if unused:
        what = f"speed {args.what}" + (" --data-only" if args.data_only else "")
        takes = ", ".join(f"--{n.replace('_', '-')}" for n in sorted(takes_options))
        raise ConfigError(f"{what} does not use {', '.join(unused)}; it takes {takes}")
    if args.precision == "fp16" and (args.what not in tasks or tasks[args.what].speed.fp16 is None):
        fp16 = " / ".join(f"speed {s.name} ({s.speed.fp16})" for s in tasks.values() if s.speed.fp16)
        raise ConfigError(f"--precision fp16 is for {fp16}; speed {args.what} takes auto, bf16 or fp32")
    for name in ("steps", "batch_size", "samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup is not None and args.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {args.warmup}")


def _run_speed(args) -> int:
    import torch

    from mae_transfer.engine.logger import setup_logging

    setup_logging(0)
    _check_speed_options(args)
    on_gpu = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    steps = {} if args.steps is None else {"steps": args.steps}
    steps.update({} if args.warmup is None else {"warmup": args.warmup})
    if args.data_only:
        from mae_transfer.evaluation.data_speed import format_data_speed, run_data_speed

        r = run_data_speed(
            args.what,
            args.data,
            workers=args.workers,
            samples=args.samples,
            split=args.split,
            preset=args.preset,
            full_size=args.full_size,
        )
        print(format_data_speed(r))
        if args.json:
            from mae_transfer.io import atomic_write_json

            atomic_write_json(args.json, r)
        return 0
    if args.what == "all":
        from mae_transfer.evaluation.speed import format_speed_table, run_speed_all

        print(f"mae-transfer speed all{' --tiny' if args.tiny else ''}:")
        rows = run_speed_all(tiny=args.tiny, device=args.device, json_path=args.json, precision=args.precision, **steps)
        print(format_speed_table(rows))
        if args.json:
            print(f"written to {args.json}")
        return 1 if any("error" in r for r in rows) else 0
    return _run_speed_workload(args, on_gpu)


def _run_speed_workload(args, on_gpu: bool) -> int:
    """``speed NAME``: the task's speed function (its ``SpeedPlan``) with the options given, over
    the plan's defaults; the result printed by the plan's report (else as JSON) and written to --json."""
    import json

    from mae_transfer.evaluation.speed import workloads
    from mae_transfer.spec import resolve

    plan = workloads()[args.what].speed
    kwargs = {**plan.defaults, **({} if on_gpu else plan.cpu_defaults)}
    for name in plan.options:
        value = getattr(args, name)
        if value is None or value is False or value == "" or (name == "json" and not plan.writes_json):
            continue  # not given (the function's or the plan's default), or the result is written here
        kwargs["json_path" if name == "json" else name] = value
    result = resolve(plan.run)(**kwargs)
    print(resolve(plan.report)(result) if plan.report else json.dumps(result, indent=1, default=str))
    if args.json and plan.writes_json:
        print(f"written to {args.json}")
    elif args.json:
        from mae_transfer.io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


BENCH_HELP = """\
Benchmark backbones on the MAE paper's transfer protocols and tabulate the results.

Every (backbone, task) pair is one job: the ordinary `mae-transfer <task>` command with its own run
directory under RESULTS/runs/. Jobs run one after another (under torchrun with --nproc-per-node),
or are printed (--launcher print) or submitted to SLURM through submitit (--launcher slurm). Every
metric lands in RESULTS/results.jsonl with its provenance (backbone sha256, config hash, git commit,
package versions, hardware, wall time, date); pandas reads it with read_json(path, lines=True).

Launchers:
  local           run the jobs here, one after another (the default)
  print           print their commands, to run elsewhere; `bench` afterwards records them
  slurm           submit each job as a SLURM job through submitit (pip install 'mae-transfer[slurm]');
                  needs `sbatch` (a login node). Job ids are kept in RUN_DIR/slurm_job.json and
                  submitit's logs in RESULTS/slurm/JOBID/. Run the same `bench` again to record the
                  finished jobs (a failed one as a job_failed row, submitted again unless
                  --no-retry); pending or running jobs are reported, never submitted twice. A job
                  gets SIGUSR2 90 s before its time limit: it saves its checkpoint, is requeued
                  and resumes from it.
  submitit-local  the slurm path with real local processes (submitit's LocalExecutor): the same
                  records, logs, time limit and requeue, a rehearsal without a cluster.

Running the same command again does no work for jobs already recorded (same backbone weights and
the same resolved config), records jobs that finished outside the runner, retries failed jobs,
and resumes a job that was interrupted from its checkpoint. A failing job is recorded with its
error and the benchmark goes on. At the end the tables (Markdown, LaTeX, CSV) and plots are
written to RESULTS/ and the Markdown tables printed.

{tasks}
"""


def _bench_help() -> str:
    """BENCH_HELP with the registry's tasks (plug-in tasks included) and their shared --data keys."""
    from mae_transfer.evaluation.registry import TASKS, benchmark_tasks

    tasks = benchmark_tasks()
    shared: dict[str, list[str]] = {}
    for name in tasks:
        if TASKS[name].data_group:
            shared.setdefault(TASKS[name].data_group, []).append(name)
    groups = "".join(f"({', '.join(names)} read --data {key}=DIR.) " for key, names in shared.items())
    text = (
        f"Tasks: {', '.join(tasks)}. {groups}With no --data for a task it runs on the built-in toy data in "
        "that dataset's format with the task's toy preset."
    )
    return BENCH_HELP.format(tasks=textwrap.fill(text, 99, break_on_hyphens=False))


BENCH_EPILOG = """\
examples:
  mae-transfer bench --backbone mae=runs/pretrain-toy/encoder.pth --backbone scratch=random --tasks all
  mae-transfer bench --backbone mae=mae_pretrain_vit_base.pth --tasks coco,ade20k \\
      --data coco=/datasets/coco --data ade20k=/datasets/ADEChallengeData2016 \\
      --preset coco=vitdet_mask_rcnn_b --preset ade20k=upernet_vit_b --nproc-per-node 8
  mae-transfer bench ... --set coco:train.epochs=25 --set '*:train.device=cuda'
  mae-transfer bench ... --launcher print        # the torchrun commands, to run elsewhere
  mae-transfer bench ... --launcher slurm --slurm-partition learnfair --slurm-time 4320
  mae-transfer bench ... --launcher submitit-local   # the same, as local processes
  mae-transfer table --results results/          # the tables again, in any format

Figure 9 of the MAE paper (partial fine-tuning: top-1 vs the number of last blocks fine-tuned):
  mae-transfer bench --backbone mae=mae_pretrain_vit_base.pth --data imagenet=/datasets/imagenet \\
      --trainable-blocks figure9                # ViT-B: 0 (linear probe), 1, 2, 4, 6, 12 (full)
  mae-transfer bench --backbone mae=runs/pretrain-toy/encoder.pth --backbone scratch=random \\
      --trainable-blocks 0,1,2,full --set '*:train.epochs=5'   # toy data, micro ViT (4 blocks)
  k = 0 is the linprobe job, k = all blocks the finetune job (each run once, also when --tasks names
  it); the others fine-tune the last k blocks. Table "Figure 9: partial fine-tuning" and the plot
  RESULTS/plots/partial_finetuning.png show one line per backbone.
"""


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run backbones x transfer tasks and tabulate the results (resumable)",
        description=_bench_help(),
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--backbone",
        action="append",
        default=[],
        metavar="NAME=CKPT",
        help="a backbone to evaluate (repeatable); NAME=random for random weights of the same architecture",
    )
    p.add_argument(
        "--tasks",
        help="comma-separated tasks or 'all' (default; with --trainable-blocks: finetune, the grid's task)",
    )
    p.add_argument("--results", default="results", metavar="DIR", help="results directory (default: results/)")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK=DIR",
        help="dataset root of a task (imagenet=DIR for finetune/linprobe/knn)",
    )
    p.add_argument(
        "--preset",
        action="append",
        default=[],
        metavar="TASK=NAME",
        help="recipe preset of a task (see `mae-transfer presets`)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TASK:KEY=VALUE",
        help="config override of a task ('*' for all tasks)",
    )
    p.add_argument(
        "--random-model",
        metavar="NAME",
        help="architecture of random-init backbones (default: that of the first checkpoint)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run every training job N times, with train.seed S, S+1, ..., S+N-1 (S: its config's seed, 0 by "
        "default; the first is the job of a bench without --seeds); each seed is a job of its own (skipped "
        "when done) and the tables show mean ± std (n). k-NN trains nothing with a seed: it runs once",
    )
    p.add_argument(
        "--trainable-blocks",
        metavar="K,K,...",
        help="the MAE paper's Figure 9: run the finetune task as a grid over how many of the last blocks are "
        "fine-tuned (comma-separated; 0: the linear probe, i.e. the linprobe job; full: all blocks, i.e. the "
        "finetune job; figure9: the paper's 0,1,2,4,6,12,18,24 up to the network's depth, and its depth). "
        "Each k is a job of its own; the table 'Figure 9: partial fine-tuning' and "
        "plots/partial_finetuning.png show top-1 against k",
    )
    _add_flags(p, ["trust_checkpoint"])
    p.add_argument(
        "--launcher",
        choices=["local", "print", "slurm", "submitit-local"],
        default="local",
        help="local: run the jobs here (default); print: print their commands; slurm: submit them to SLURM "
        "through submitit; submitit-local: the slurm path with local processes (see above)",
    )
    p.add_argument(
        "--nproc-per-node", type=int, default=1, help="processes (GPUs) per job; > 1 runs jobs under torchrun"
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="--launcher local: run jobs inside this process (faster for tiny jobs; no torchrun)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="--launcher local: show the jobs' own output instead of writing it to their bench.log",
    )
    p.add_argument("--no-retry", action="store_true", help="do not run (or submit) failed jobs again")
    p.add_argument(
        "--baseline", metavar="NAME", help="backbone the deltas refer to (default: one named random/scratch)"
    )
    p.add_argument("--slurm-partition", metavar="NAME", help="--launcher slurm: the partition")
    p.add_argument("--slurm-account", metavar="NAME", help="--launcher slurm: the account to charge")
    p.add_argument("--slurm-qos", metavar="NAME", help="--launcher slurm: the quality of service")
    p.add_argument(
        "--slurm-time",
        type=int,
        metavar="MIN",
        help="--launcher slurm / submitit-local: time limit of each job in minutes (default 4320); the job is "
        "signalled before it (SLURM: 90 s, local: 30 s), saves, and is requeued",
    )
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    from mae_transfer.config import ConfigError
    from mae_transfer.engine.logger import setup_logging
    from mae_transfer.evaluation import cluster
    from mae_transfer.evaluation import runner as bench
    from mae_transfer.evaluation.registry import TASKS, benchmark_tasks, data_keys
    from mae_transfer.evaluation.report import write_report

    setup_logging(0)
    slurm = {
        "partition": args.slurm_partition,
        "account": args.slurm_account,
        "qos": args.slurm_qos,
        "time": args.slurm_time,
    }
    cluster.check_options(args.launcher, slurm)  # before anything is planned: one line if the launcher can't run
    if args.launcher != "local":
        given = [f for f, on in (("--in-process", args.in_process), ("--verbose", args.verbose)) if on]
        if given:
            raise ConfigError(f"{', '.join(given)}: only for --launcher local (this is --launcher {args.launcher})")
    from mae_transfer.io import check_output_path

    check_output_path(args.results, "--results")  # before the backbones are read and hashed
    backbones = bench.parse_backbones(args.backbone)
    grid = bench.parse_trainable_blocks(args.trainable_blocks)
    tasks = bench.parse_tasks(args.tasks or ("finetune" if grid is not None else "all"))
    data = bench.parse_task_map(args.data, "--data", data_keys())
    presets = bench.parse_task_map(args.preset, "--preset", [t for t in benchmark_tasks() if TASKS[t].trains])
    overrides = bench.parse_overrides(args.set)
    if args.nproc_per_node < 1:
        raise ConfigError("--nproc-per-node must be at least 1")
    if args.in_process and args.nproc_per_node > 1:
        raise ConfigError("--in-process runs jobs in this one process; it cannot use --nproc-per-node > 1")
    if args.baseline and args.baseline not in [b.name for b in backbones]:
        raise ConfigError(
            f"--baseline {args.baseline!r} is not one of the backbones: {', '.join(b.name for b in backbones)}"
        )
    results = Path(args.results)
    jobs = bench.plan_jobs(
        backbones,
        tasks,
        results,
        data,
        presets,
        overrides,
        args.random_model,
        trust=args.trust_checkpoint,
        seeds=args.seeds,
        trainable_blocks=grid,
    )
    seeds = f", {args.seeds} seeds of each training job" if args.seeds > 1 else ""
    if grid is not None:
        ks: dict[str, set[int]] = {}
        for j in jobs:
            if j.trainable_blocks is not None:
                ks.setdefault(j.backbone.name, set()).add(j.trainable_blocks)
        shown = {",".join(map(str, sorted(k))) for k in ks.values()}
        seeds += (
            f"; finetune as a grid over {' / '.join(sorted(shown))} blocks fine-tuned "
            "(0: the linprobe job, all blocks: the finetune job; Figure 9)"
        )
    print(
        f"{len(jobs)} jobs: {len(backbones)} backbone(s) x {len(tasks)} task(s){seeds}; "
        f"results: {results / 'results.jsonl'}"
    )
    once = [t for t in tasks if args.seeds > 1 and not any(j.task == t and j.seed is not None for j in jobs)]
    if once:
        print(
            f"--seeds {args.seeds}: {', '.join(once)}: no training seed (frozen features, a fixed evaluation): "
            "run once, a single number in the tables"
        )
    if args.launcher == "print":
        bench.print_commands(jobs, results, args.nproc_per_node)
        return 0
    if args.launcher in cluster.LAUNCHERS:
        outcomes = cluster.submit_jobs(
            jobs, results, args.launcher, args.nproc_per_node, slurm, retry_failed=not args.no_retry
        )
        waiting = sum(o.status in ("submitted", "running") for o in outcomes)
        if waiting:
            counts = {
                s: sum(o.status == s for o in outcomes)
                for s in ("submitted", "running", "recorded", "cached", "failed")
            }
            print(
                f"\njobs: {counts['submitted']} submitted, {counts['running']} still queued or running, "
                f"{counts['recorded']} recorded, {counts['cached']} already done, {counts['failed']} failed; "
                "run the same `mae-transfer bench` again when they have finished to record them "
                f"(submitit logs: {results / 'slurm'})"
            )
            note = bench.elsewhere_note(outcomes, bench.latest_rows(results, jobs))
            if note:
                print(note)
            return 1 if counts["failed"] else 0
    else:
        try:
            outcomes = bench.run_jobs(
                jobs,
                results,
                nproc=args.nproc_per_node,
                in_process=args.in_process,
                verbose=args.verbose,
                retry_failed=not args.no_retry,
            )
        except bench.BenchInterrupted as e:
            print(f"mae-transfer bench: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
    rows = bench.latest_rows(results, jobs)
    markdown, tables, plots = write_report(rows, results, args.baseline)
    print()
    print(markdown)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "cached", "recorded", "failed")}
    print(
        f"\njobs: {counts['done']} run, {counts['cached']} already done, "
        f"{counts['recorded']} recorded, {counts['failed']} failed"
    )
    note = bench.elsewhere_note(outcomes, rows)  # jobs another bench into this store still runs
    if note:
        print(note)
    if tables:
        print(f"tables: {', '.join(str(p) for p in tables.values())}")
    if plots:
        print(f"plots: {', '.join(str(p) for p in plots)}")
    for o in outcomes:
        if o.status == "failed":
            print(f"FAILED {o.job.label}: {o.error} (log: {o.job.run_dir / 'bench.log'})")
    return 1 if counts["failed"] else 0


def _add_table(sub) -> None:
    p = sub.add_parser(
        "table",
        help="the paper's tables (Markdown, LaTeX, CSV) from a results directory",
        description="Render the results store as the MAE paper's tables: Table 4 (COCO APbox/APmask), Table 5 (ADE20K "
        "mIoU), Table 6 (iNaturalist/Places top-1) and ImageNet-style fine-tune / linear probe / k-NN top-1, "
        "with the paper's numbers in their own rows, deltas to a baseline backbone, and the best of your "
        "backbones in each column in bold (never a paper row).",
        epilog="examples:\n  mae-transfer table --results results/\n"
        "  mae-transfer table --results results/ --format latex > tables.tex\n"
        "  mae-transfer table --results results/ --output paper/ --paper-sizes B,L",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--results", default="results", metavar="DIR", help="results directory (holds results.jsonl)")
    p.add_argument(
        "--format", choices=["markdown", "latex", "csv"], default="markdown", help="what to print (default markdown)"
    )
    p.add_argument(
        "--output", metavar="DIR", help="also write tables.md, tables.tex (standalone document) and table_*.csv here"
    )
    p.add_argument(
        "--baseline",
        metavar="NAME",
        help="backbone the deltas refer to (default: one named random/scratch; 'none' for no deltas)",
    )
    p.add_argument("--backbones", metavar="A,B", help="only these backbones, in this order")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper's rows")
    p.add_argument(
        "--paper-sizes",
        metavar="B,L",
        help="ViT sizes of the paper rows (default: the sizes of your backbones, else B)",
    )
    p.add_argument("--full", action="store_true", help="keep columns without results")
    p.set_defaults(func=_run_table)


def _table_rows(args) -> list:
    from mae_transfer.config import ConfigError
    from mae_transfer.evaluation.store import ResultStore

    store = ResultStore(args.results)
    if not store.path.exists():
        raise ConfigError(
            f"--results {args.results}: no {store.path.name} there; "
            f"run `mae-transfer bench --results {args.results} ...` first"
        )
    rows = store.read()
    if args.backbones:
        order = [b.strip() for b in args.backbones.split(",") if b.strip()]
        known = list(dict.fromkeys(r.get("backbone") for r in rows))
        missing = [b for b in order if b not in known]
        if missing:
            raise ConfigError(
                f"--backbones: {', '.join(missing)} not in {store.path} (it has: {', '.join(map(str, known))})"
            )
        rows = sorted((r for r in rows if r.get("backbone") in order), key=lambda r: order.index(r["backbone"]))
    return rows


def _run_table(args) -> int:
    from mae_transfer.evaluation.tables import render, write_tables
    from mae_transfer.io import check_output_path

    if args.output:
        check_output_path(args.output, "--output")
    rows = _table_rows(args)
    kw = {
        "baseline": None if (args.baseline or "").lower() == "none" else (args.baseline or "auto"),
        "paper": not args.no_paper,
        "full": args.full,
        "paper_sizes": [s.strip().upper() for s in args.paper_sizes.split(",")] if args.paper_sizes else None,
    }
    try:
        print(render(rows, args.format, **kw))
    except ValueError as e:
        from mae_transfer.config import ConfigError

        raise ConfigError(str(e)) from None
    if args.output:
        paths = write_tables(rows, Path(args.output), **kw)
        print(f"written: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="training curves and per-task comparison bars (PNG) from a results directory",
        description="Draw the training-loss curves of every job (one panel per task, one line per backbone) "
        "and a bar chart of the headline metric of every task per backbone.",
    )
    p.add_argument("--results", default="results", metavar="DIR")
    p.add_argument("--output", metavar="DIR", help="where the PNGs go (default: RESULTS/plots)")
    p.add_argument("--pretrain", metavar="RUN_DIR", help="also plot this MAE pretraining run's loss")
    p.add_argument("--backbones", metavar="A,B", help="only these backbones")
    p.set_defaults(func=_run_plot)


def _run_plot(args) -> int:
    from mae_transfer.io import check_output_path

    if args.output:
        check_output_path(args.output, "--output")  # before matplotlib is imported
    from mae_transfer.evaluation.plots import plot_all

    rows = _table_rows(args)
    out = Path(args.output or Path(args.results) / "plots")
    paths = plot_all(rows, out, pretrain_dir=Path(args.pretrain) if args.pretrain else None)
    if not paths:
        print("nothing to plot yet")
    for path in paths:
        print(path)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole toolkit on built-in toy data: pretrain, every transfer task, tables (no data needed)",
        description="Pretrain a tiny MAE on the built-in toy data, then run every transfer task (COCO Mask R-CNN, "
        "ADE20K UperNet, iNaturalist, Places, fine-tuning, linear probing, k-NN) on toy data in each "
        "dataset's real format, once from the MAE encoder and once from random weights, and print the "
        "paper-style tables. About 10-15 minutes on 2 CPU cores (--quick: under 3, shorter schedules "
        "whose numbers mean little). Run it again to continue or to see the tables; nothing is redone.",
    )
    p.add_argument("--output", default="runs/demo", metavar="DIR", help="where everything goes (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a 2-3 minute smoke run")
    p.add_argument("--verbose", action="store_true", help="show every job's own output")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from mae_transfer.evaluation.demo import run_demo
    from mae_transfer.io import check_output_path

    return run_demo(check_output_path(args.output, "--output"), quick=args.quick, verbose=args.verbose)


CHECK_DATA_HELP = """\
Check a real dataset before a long run, with the same readers as the run: counts per split, files
listed but missing, annotations the run would skip (by reason), images that do not decode (a random
sample, or --full), and the host memory the data side of the run needs for --gpus ranks x --workers
DataLoader workers per node. Exits 1 when a run with these settings would stop on the data.

examples:
  mae-transfer check-data --task coco --data /datasets/coco
  mae-transfer check-data --task inat2018 --data /datasets/inat2018 --full --gpus 8 --workers 10
"""


def _add_check_data(sub) -> None:
    from mae_transfer.evaluation.check_data import DATA_TASKS

    p = sub.add_parser(
        "check-data",
        help="pre-flight check of a dataset before a long run (counts, missing and "
        "unreadable files, skipped annotations, host memory)",
        description=CHECK_DATA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--task", required=True, choices=DATA_TASKS, help="whose dataset (imagenet: an ImageNet-style folder)"
    )
    p.add_argument("--data", metavar="DIR", help="the dataset root (default: the built-in toy data)")
    p.add_argument("--preset", help="the task preset whose data settings are used (default: the task's)")
    p.add_argument("--full", action="store_true", help="decode every image instead of a random sample")
    p.add_argument("--sample", type=int, default=200, metavar="N", help="images decoded per split without --full")
    p.add_argument("--gpus", type=int, default=8, help="ranks per node, for the memory estimate")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank, for the memory estimate")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=_run_check_data)


def _run_check_data(args) -> int:
    from mae_transfer.config import ConfigError
    from mae_transfer.engine.logger import setup_logging
    from mae_transfer.evaluation.check_data import format_check_data, run_check_data

    for name in ("sample", "gpus"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    setup_logging(0)
    r = run_check_data(
        args.task,
        args.data,
        full=args.full,
        sample=args.sample,
        gpus=args.gpus,
        workers=args.workers,
        preset=args.preset,
    )
    text, stops = format_check_data(r)
    print(text)
    if args.json:
        from mae_transfer.io import atomic_write_json

        atomic_write_json(args.json, r)
    return 1 if stops else 0


def _add_toy_data(sub) -> None:
    from mae_transfer.evaluation.registry import toy_datasets

    kinds = list(toy_datasets())
    p = sub.add_parser(
        "toy-data",
        help="write a built-in toy dataset in a real on-disk format",
        description="Write one of the built-in toy datasets (deterministic) in the exact on-disk format of the "
        "real dataset, to look at or to test a pipeline.",
    )
    p.add_argument("kind", choices=kinds)
    p.add_argument("dir", nargs="?", metavar="DIR", help="where to write (same as --output)")
    p.add_argument("--output", metavar="DIR", help="where to write (default: the toolkit's cache)")
    p.add_argument(
        "--full-size",
        action="store_true",
        help="coco, inat2018, places365, ade20k: annotation files with the official counts (COCO 2017: "
        "118,287 + 5,000 images, 860,001 + 36,781 annotations; iNat 2018: 437,513 + 24,426 images; "
        "Places365: 1,803,460 + 36,500 lines; ADE20K: 20,210 + 2,000 pairs) pointing at a few real "
        "images, to rehearse index build time and memory at full size (`mae-transfer speed KIND "
        "--data-only --data DIR`); needs an empty DIR; COCO takes a few minutes and ~450 MB",
    )
    p.add_argument(
        "--images-from",
        metavar="DIR",
        help="--full-size: a dataset of the same kind whose images are linked (default: the toy dataset's)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="--full-size: shrink every count by this factor (0..1]")
    p.set_defaults(func=_run_toy_data)


def _run_toy_data(args) -> int:
    from mae_transfer.config import ConfigError
    from mae_transfer.data.toy import ensure_toy_dataset
    from mae_transfer.evaluation.registry import toy_datasets

    toys = toy_datasets()
    toy = toys[args.kind]
    if args.dir and args.output and args.dir != args.output:
        raise ConfigError(f"give the folder once: DIR {args.dir} or --output {args.output}")
    out = args.dir or args.output
    if out:
        from mae_transfer.io import check_output_path

        check_output_path(out, "--output" if args.output else "DIR")
    if not args.full_size:
        if args.images_from or args.scale != 1.0:
            raise ConfigError("--images-from and --scale go with --full-size")
        root = ensure_toy_dataset(**toy.arguments(), root=Path(out) if out else None)
        print(root)
        return 0
    from mae_transfer.evaluation.data_speed import full_size_kinds, write_full_size

    if args.kind not in full_size_kinds():
        raise ConfigError(f"--full-size writes {', '.join(full_size_kinds())}, not {args.kind}")
    if not out:
        raise ConfigError("--full-size needs the folder to write: mae-transfer toy-data --full-size KIND DIR")
    if not 0 < args.scale <= 1:
        raise ConfigError(f"--scale must be in (0, 1], got {args.scale}")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target} is not an empty folder; choose a new one for the full-size data")
    print(f"writing full-size {args.kind} annotation files into {target} ...", flush=True)
    root = write_full_size(args.kind, target, images_from=args.images_from, scale=args.scale)
    print(root)
    return 0


EXPORT_HELP = """\
Write weights in another project's format, atomically, and check the file by reading it back.

  --to mae          the ViT encoder as the official MAE release ({'model': encoder}, official names),
                    from a pretraining checkpoint (ours, official full MAE, Hugging Face ViTMAE).
  --to timm         a folder with model.safetensors + config.json that timm opens:
                    timm.create_model('local-dir:FOLDER', pretrained=True), or
                    timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=0,
                    pretrained_cfg_overlay=dict(file='FOLDER/model.safetensors')) for a ViT-B.
                    From any checkpoint with a plain ViT (pretraining, fine-tuning runs, official MAE,
                    Hugging Face, timm files; a run directory too). A fine-tuned classifier keeps its
                    head (timm.create_model(..., num_classes=N, global_pool=...) loads it strictly);
                    a linear probe's BatchNorm + Linear head has no place in timm's ViT: refused.
  --to hf           a folder transformers.ViTMAEModel.from_pretrained opens (model.safetensors in the
                    Hub's names + config.json, mask_ratio 0); from an encoder with its final norm
                    (a classifier's head has no place in it: refused, --to timm keeps it).

Weights that are not floating point, whole models with tensors missing and tensors the target has
no place for are refused before anything is written (exit 2, one line naming them).
  --to detectron2   a trained detector (detector.pth or checkpoint-last.pth of a `coco` run, or a
                    detectron2 model-zoo .pkl) as detectron2's DetectionCheckpointer writes it:
                    {'model': state_dict, 'iteration': 0}, loadable by detectron2's ViTDet
                    LazyConfig (train.init_checkpoint / MODEL.WEIGHTS) and by torch.load(weights_only=True).
  --to mmseg        a trained segmenter (segmenter.pth or checkpoint-last.pth of an `ade20k` run) as
                    mmsegmentation writes it: {'meta': {'dataset_meta': classes}, 'state_dict': ...}
                    with its MAE backbone names, for its configs/mae UperNet (load_checkpoint, init_model).
"""


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write weights in another format (official MAE, timm, Hugging Face, detectron2 ViTDet, mmsegmentation)",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint")
    p.add_argument(
        "--to", required=True, choices=["mae", "timm", "hf", "detectron2", "mmseg"], help="the format to write"
    )
    p.add_argument(
        "--num-heads", type=int, help="attention heads of a ViT of no standard size (timm, hf; not stored in weights)"
    )
    p.add_argument("--output", required=True, metavar="PATH")
    _add_flags(p, ["trust_checkpoint"])
    p.set_defaults(func=_run_export)
    p = sub.add_parser(
        "export-encoder",
        help="write the encoder of a pretraining checkpoint in the official MAE format (= export --to mae)",
        description="Read a pretraining checkpoint (ours, official full MAE, Hugging Face ViTMAE) and write "
        "{'model': encoder} with the official parameter names.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--output", required=True, metavar="PATH")
    p.set_defaults(func=_run_export, to="mae", trust_checkpoint=False, num_heads=None)


def _run_export(args) -> int:
    from mae_transfer.io import check_output_path

    check_output_path(args.output, "--output", folder=args.to in ("timm", "hf"))  # before the checkpoint is read
    if args.to == "mmseg":
        from mae_transfer.checkpoint.mmseg import save_mmseg
        from mae_transfer.segmentation.task import read_segmenter_file, segmenter_class_names, segmenter_weights

        contents = read_segmenter_file(args.checkpoint, trust=args.trust_checkpoint)
        state, _ = segmenter_weights(contents, args.checkpoint)
        names, palette = segmenter_class_names(contents)
        path = save_mmseg(state, args.output, names, palette)
        print(f"{path}: {len(state)} tensors in mmsegmentation's MAE-UperNet layout (read back and checked)")
        return 0
    if args.to == "detectron2":
        from mae_transfer.checkpoint.detectron2 import save_vitdet
        from mae_transfer.detection.task import read_detector_weights

        state, _ = read_detector_weights(args.checkpoint, trust=args.trust_checkpoint)
        path = save_vitdet(state, args.output)
        print(f"{path}: {len(state)} tensors in detectron2's ViTDet layout (read back and checked)")
        return 0
    from mae_transfer.checkpoint import export_mae_encoder, read_checkpoint, to_vit_state_dict

    state = to_vit_state_dict(read_checkpoint(args.checkpoint, trust=args.trust_checkpoint))
    if args.to in ("timm", "hf"):
        if args.to == "timm":
            from mae_transfer.checkpoint.timm import export_timm as export
        else:
            from mae_transfer.checkpoint.hf_export import export_hf as export
        folder = export(state, args.output, num_heads=args.num_heads)
        print(
            f"{folder}: model.safetensors + config.json for "
            f"{'timm' if args.to == 'timm' else 'transformers ViTMAEModel'} (read back and checked)"
        )
        return 0
    path = export_mae_encoder(state, args.output)
    print(path)
    return 0


def _add_presets(sub) -> None:
    p = sub.add_parser("presets", help="list the recipe presets")
    p.set_defaults(func=_run_presets)


def _run_presets(args) -> int:
    import importlib

    from mae_transfer.evaluation.registry import TASKS

    by_module: dict[str, list[str]] = {}
    for spec in sorted(TASKS.values(), key=lambda t: t.benchmark):  # pretraining first, as in --help
        if spec.config:
            commands = by_module.setdefault(spec.config.partition(":")[0], [])
            if spec.command not in commands:
                commands.append(spec.command)
    for module_name, commands in by_module.items():
        module = importlib.import_module(module_name)
        print(f"mae-transfer {' / '.join(commands)} --preset NAME:")
        for name in module.available_presets():
            first = (module.PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
            print(f"  {name:24s} {first}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mae_transfer import __version__

    parser = argparse.ArgumentParser(
        prog="mae-transfer",
        description="Pretrain MAE ViT backbones and measure how well they transfer (MAE paper protocols).",
        epilog="Run `mae-transfer COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"mae-transfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    from mae_transfer.evaluation.registry import commands

    tasks = commands()  # pretraining first, then the transfer tasks in the registry's order
    for command, specs in sorted(tasks.items(), key=lambda kv: kv[1][0].benchmark):
        _add_task_command(sub, command, specs)
    _add_bench(sub)
    _add_table(sub)
    _add_plot(sub)
    _add_speed(sub)
    _add_toy_data(sub)
    _add_check_data(sub)
    _add_export(sub)
    _add_presets(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ImportError as e:  # a MAE_TRANSFER_TASKS module that is nowhere (registry.PluginError)
        if type(e).__name__ != "PluginError":
            raise
        print(f"mae-transfer: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    # KEY=VALUE overrides may come anywhere (also after options): argparse's positional list ends
    # at the first option, so later overrides arrive as "unknown" and are put back here.
    args, unknown = parser.parse_known_args(argv)
    stray = [u for u in unknown if u.startswith("-") or "=" not in u]
    if stray or (unknown and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or unknown)}")
    if unknown:
        args.overrides = list(args.overrides or []) + unknown
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    from mae_transfer.checkpoint import CheckpointError
    from mae_transfer.config import ConfigError
    from mae_transfer.engine.trainer import TrainingInterrupted
    from mae_transfer.io import OutputPathError

    user_errors: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, OutputPathError, FloatingPointError)
    try:
        from mae_transfer.data.errors import DataError

        user_errors += (DataError,)
    except ImportError:  # pragma: no cover
        pass
    from mae_transfer.engine.logger import close_progress_bars

    try:
        return args.func(args)
    except TrainingInterrupted as e:
        close_progress_bars()  # a bar left on screen would hold the start of the message
        print(f"mae-transfer: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors as e:
        close_progress_bars()
        print(f"mae-transfer: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BaseException:
        close_progress_bars()  # a traceback, too, starts on its own line
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
