"""The one front of every task command: options -> resolved config -> run (train or evaluate) -> report.

``prepare(spec, options)`` resolves what a run of ``spec`` would do (preset, overrides, weights,
config, output) without running anything: ``--print-config`` and the benchmark runner's job
identity use it. ``run(spec, options)`` then does the one sequence every command shares: distributed
setup, logging, the engine's ``Trainer`` (``fit`` or ``evaluate``), clean-up and the terminal
report. The CLI calls it with the parsed options, the runner with the options of a job (in this
process or, through :func:`command_line`, in a child process). What differs between tasks comes
from their ``TaskSpec``; the families differ only in how the preset and the output folder are chosen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mae_transfer.config import ConfigError, check_sections, deep_update, identity, parse_overrides, to_dict
from mae_transfer.evaluation.options import FAMILY_OPTIONS, FLAGS, defaults, to_argv, to_overrides
from mae_transfer.evaluation.registry import DenseRules, TaskSpec, resolve
from mae_transfer.io import check_output_path

log = logging.getLogger("mae_transfer.cli")


def option_names(spec: TaskSpec) -> tuple[str, ...]:
    """The command-line options of ``spec``'s command: its family's, then its own."""
    return tuple(dict.fromkeys((*FAMILY_OPTIONS[spec.family], *spec.options)))


def complete(spec: TaskSpec, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the command's defaults filled in and the task's fixed options applied."""
    return {
        **defaults(option_names(spec)),
        "overrides": [],
        **{k: v for k, v in options.items() if v is not None},
        **spec.fixed,
    }


def validate_options(spec: TaskSpec, opts: dict[str, Any]) -> None:
    """Every given option of ``spec``'s command against its own rule in the flag table
    (``Flag.check``: counts at least 1, finite positive rates, ``--k`` lists ...), before anything is
    read or built: one ConfigError naming the option, the value and what to give instead."""
    for name in option_names(spec):
        flag, value = FLAGS[name], opts.get(name)
        if flag.check is None or value is None or (flag.switch and not value):
            continue
        problem = flag.check(value)
        if problem:
            raise ConfigError(f"{flag.flags[0]} {value if str(value).strip() else repr(value)}: {problem}")


# The model names a family's --model (model.name) takes; the ``train`` family's tasks name their own.
_MODELS = {
    "pretrain": "mae_transfer.pretrain.model:MAE_PRESETS",
    "classification": "mae_transfer.models.vit:VIT_SIZES",
    "dense": "mae_transfer.models.vit:VIT_SIZES",
    "frozen": "mae_transfer.models.vit:VIT_SIZES",
}


def _check_model(spec: TaskSpec, name: str | None, trainable_blocks: int | None = None, family: str = "vit") -> None:
    """An unknown model name, or ``--trainable-blocks`` beyond the model's depth, ends the command
    here, before data is read or a model built (they would fail deep inside, or mid-run). Names of
    another backbone family are checked by its builder (``create_backbone``: one error, listing them)."""
    if name is None or spec.family not in _MODELS or family != "vit":
        return
    known = resolve(_MODELS[spec.family])
    if name not in known:
        raise ConfigError(f"--model {name}: unknown model; choose one of {', '.join(known)}")
    depth = getattr(known[name], "depth", None)
    if trainable_blocks is not None and depth and not 1 <= trainable_blocks <= depth:
        raise ConfigError(
            f"--trainable-blocks {trainable_blocks}: {name} has {depth} blocks; give k from 1 to {depth} "
            f"(the last k blocks are trained)"
        )


def _check_device(device: str | None, option: str = "--device") -> None:
    if device and str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"{option} {device}: no CUDA device is available here (torch.cuda.is_available() is False); "
                "use --device cpu, or --device auto to take a GPU when there is one"
            )


def _device_or_none(device: str | None) -> str | None:
    return None if device in (None, "auto") else device  # auto: cuda when available (the task's default)


def command_line(spec: TaskSpec, options: dict[str, Any]) -> list[str]:
    """The ``mae-transfer`` arguments that run ``spec`` with ``options`` (the runner's child jobs)."""
    return to_argv(spec.command, complete(spec, options), option_names(spec), always=tuple(spec.fixed))


@dataclass
class Prepared:
    """A resolved run: the config (None for frozen-feature evaluations), preset, output folder and,
    for ``--eval-only``, the weights read from ``--weights``."""

    spec: TaskSpec
    options: dict[str, Any]
    cfg: Any
    preset: str | None
    output: Path
    toy: bool
    weights: dict | None = None
    evaluated: dict | None = None  # --weights: path, sha256, format, saved config (engine.results.row_identity)

    def identity(self) -> Any:
        """What decides the numbers of this run besides the data and the backbone's bytes (the
        runner hashes it): the resolved config, or the options of a frozen evaluation, without paths
        and display options (``config.identity``, the one rule result rows use too)."""
        return identity(self.cfg if self.cfg is not None else self.options)


def _model_from_backbone(
    opts: dict, overrides: dict, rename: dict[str, str] | None = None, pos_size_key: str | None = None
) -> None:
    """Read the --backbone checkpoint before anything is written (a file that cannot be used, e.g.
    weights that are not floating point, ends the command here); without --model, take the ViT size
    from it (``rename`` maps sizes); with ``pos_size_key``, also the image size its position table
    was pretrained at (detection keeps that table and resizes it at every forward, as ViTDet does)."""
    if not opts.get("backbone"):
        return
    from mae_transfer.checkpoint import describe_checkpoint

    # Read (once per process and file: a benchmark plans every task of a backbone from one read).
    info = describe_checkpoint(opts["backbone"], trust=bool(opts.get("trust_checkpoint")))
    model = overrides.get("model", {})
    want_name = "name" not in model
    want_pos = pos_size_key is not None and pos_size_key not in model
    if not (want_name or want_pos):
        return
    if want_name and info.get("name"):
        overrides.setdefault("model", {})["name"] = (rename or {}).get(info["name"], info["name"])
    if want_pos and info.get("img_size"):
        overrides.setdefault("model", {})[pos_size_key] = int(info["img_size"])


def _overrides(spec: TaskSpec, opts: dict) -> dict:
    overrides = parse_overrides(opts["overrides"])
    check_sections(spec.load("config")(None, None), overrides)  # train=5 would be dropped below
    flags = to_overrides(opts, (*option_names(spec), *spec.fixed))
    return deep_update(overrides, flags)


def _trained_weights(spec: TaskSpec, opts: dict, overrides: dict) -> tuple[dict | None, dict | None]:
    """``--eval-only --weights``: the trained model's state dict; the sections of its saved config
    that build it go into ``overrides`` unless the command line sets them (the data path never)."""
    if spec.weights is None:
        if opts.get("eval_only") or opts.get("weights"):
            raise ConfigError(f"{spec.command} does not evaluate trained weights (no --eval-only / --weights)")
        return None, None
    if opts.get("eval_only") and not opts.get("weights"):
        raise ConfigError(
            f"--eval-only needs --weights PATH "
            f"(a {spec.weights.artifact} or checkpoint-last.pth of a {spec.command} run)"
        )
    if opts.get("weights") and not opts.get("eval_only"):
        raise ConfigError("--weights is for --eval-only; to start training from a pretrained ViT use --backbone")
    if not opts.get("weights"):
        return None, None
    from mae_transfer.checkpoint import weights_sha256
    from mae_transfer.checkpoint.hub import weights_file

    weights, saved = spec.load("read")(opts["weights"], trust=bool(opts.get("trust_checkpoint")))
    # What the result rows name: the file evaluated, its bytes, its format and the config it was
    # trained with. This toolkit's files carry their whole training config (with its train
    # section); for another project's file (detectron2, mmsegmentation) the reader gives only the
    # architecture it inferred from the tensors.
    ours = isinstance(saved, dict) and isinstance(saved.get("train"), dict)
    evaluated = {
        "path": str(weights_file(opts["weights"]).resolve()),
        "sha256": weights_sha256(opts["weights"]),
        "format": "mae-transfer" if ours else spec.weights.foreign,
        "config": saved if ours else None,
    }
    # Build and test the model as it was trained (architecture, test settings, resize scale),
    # unless the command line says otherwise; where the data is comes from the command line.
    for section in spec.weights.sections:
        if isinstance((saved or {}).get(section), dict):
            kept = {k: v for k, v in saved[section].items() if k != "path"}
            overrides[section] = {**kept, **overrides.get(section, {})}
    return weights, evaluated


def task_for_options(spec: TaskSpec, options: dict[str, Any]) -> TaskSpec:
    """The task of ``spec``'s command that ``options`` select by an option ``spec`` leaves free and
    another task of the command fixes: ``ade20k --protocol linear`` runs ``ade20k_linear``."""
    from mae_transfer.evaluation.registry import commands

    for other in commands().get(spec.command, ()):
        free = [k for k in other.fixed if k not in spec.fixed]
        if other is not spec and free and all(options.get(k) == other.fixed[k] for k in free):
            return other
    return spec


def prepare(spec: TaskSpec, options: dict[str, Any]) -> Prepared:
    """Resolve a run of ``spec`` with ``options`` (nothing is run or written): the task the options
    select (:func:`task_for_options`), the options checked, then the family's own resolution
    (:data:`PREPARE`)."""
    spec = task_for_options(spec, options)
    opts = complete(spec, options)
    validate_options(spec, opts)
    return PREPARE[spec.family](spec, opts, not opts.get("data"))


def _prepare_frozen(spec: TaskSpec, opts: dict, toy: bool) -> Prepared:
    """Frozen-feature evaluations: no config, the options are the run."""
    _check_model(spec, opts.get("model"))
    out = Path(opts.get("output") or f"runs/{spec.command}-{opts.get('dataset') or 'imagefolder'}")
    return Prepared(spec, opts, None, None, out, toy)


def _prepare_classification(spec: TaskSpec, opts: dict, toy: bool) -> Prepared:
    """The classification protocols: the protocol and its preset by the package's rule, trained
    weights for --eval-only, the ViT size from --backbone."""
    from mae_transfer.classification.spec import protocol_and_preset

    opts["protocol"], preset = protocol_and_preset(spec, opts, toy)
    overrides = _overrides(spec, opts)
    weights, evaluated = _trained_weights(spec, opts, overrides)
    _model_from_backbone(opts, overrides)
    cfg = spec.load("config")(preset, overrides)
    _check_model(spec, cfg.model.name, cfg.model.trainable_blocks, cfg.model.family)
    kind = "eval-" if opts.get("eval_only") else ""
    out = Path(opts.get("output") or f"runs/{spec.command}-{kind}{cfg.data.dataset}-{cfg.protocol}")
    return Prepared(spec, opts, cfg, preset, out, toy, weights, evaluated)


def _prepare_train(spec: TaskSpec, opts: dict, toy: bool) -> Prepared:
    """Any other TrainTask (plug-in tasks): its presets and the common options."""
    preset = opts.get("preset") or (spec.toy_preset if toy else spec.default_preset)
    overrides = _overrides(spec, opts)
    _model_from_backbone(opts, overrides)
    cfg = spec.load("config")(preset, overrides)
    out = Path(opts.get("output") or f"runs/{spec.command}-{Path(preset).stem if preset else spec.name}")
    return Prepared(spec, opts, cfg, preset, out, toy)


def _prepare_pretrain(spec: TaskSpec, opts: dict, toy: bool) -> Prepared:
    """Pretraining: the toy preset unless data is given (also as data.path=...), --init read first."""
    preset = opts.get("preset") or (spec.toy_preset if toy and not _given(opts, "data", "path") else None)
    cfg = spec.load("config")(preset, _overrides(spec, opts))
    _check_model(spec, cfg.model.name)
    if cfg.init:  # read before anything is written: a file that cannot be used ends the command here
        from mae_transfer.checkpoint import read_checkpoint

        read_checkpoint(cfg.init, trust=cfg.trust_checkpoint)
    out = Path(opts.get("output") or f"runs/{spec.command}-{Path(preset).stem if preset else cfg.model.name}")
    return Prepared(spec, opts, cfg, preset, out, toy and not cfg.data.path)


def _prepare_dense(spec: TaskSpec, opts: dict, toy: bool) -> Prepared:
    """Detection and segmentation: trained weights for --eval-only, sizes from --backbone by the
    task's DenseRules (renamed sizes, the position table's image size)."""
    dense = spec.dense or DenseRules(data=spec.title, pictures="pictures")
    preset = opts.get("preset") or (spec.toy_preset if toy else None)
    overrides = _overrides(spec, opts)
    weights, evaluated = _trained_weights(spec, opts, overrides)
    _model_from_backbone(opts, overrides, rename=dense.rename, pos_size_key=dense.pos_size_key)
    cfg = spec.load("config")(preset, overrides)
    # A dense task of a plug-in may name its model otherwise.
    model = getattr(cfg, "model", None)
    _check_model(spec, getattr(model, "name", None), family=getattr(model, "family", "vit"))
    name = Path(preset).stem if preset else spec.default_preset
    kind = "eval-" if opts.get("eval_only") else ""
    out = Path(opts.get("output") or f"runs/{spec.command}-{kind}{name}")
    return Prepared(spec, opts, cfg, preset, out, toy, weights, evaluated)


# family -> how a run of it is resolved (spec.FAMILIES names them).
PREPARE: dict[str, Callable[[TaskSpec, dict, bool], Prepared]] = {
    "frozen": _prepare_frozen,
    "classification": _prepare_classification,
    "train": _prepare_train,
    "pretrain": _prepare_pretrain,
    "dense": _prepare_dense,
}


def _given(opts: dict, *key: str) -> bool:
    """Whether a ``KEY=VALUE`` override sets this config key (``data.path=...`` counts as --data)."""
    node: Any = parse_overrides(opts.get("overrides") or [])
    for k in key:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return bool(node)


def run(spec: TaskSpec, options: dict[str, Any], echo: Callable[[str], None] = print) -> int:
    """Run ``spec`` with ``options`` (train, or evaluate with --eval-only) and report; the exit code.

    Raises ``TrainingInterrupted`` after SIGTERM/SIGINT (the state is saved) and ``ConfigError``,
    ``CheckpointError``, ``DataError`` for what the user can fix."""
    prep = prepare(spec, options)
    spec, opts = prep.spec, prep.options
    if opts.get("print_config"):
        import yaml

        echo(yaml.safe_dump(to_dict(prep.cfg), sort_keys=False).rstrip("\n"))
        return 0
    # What only a run needs (prepare also plans benchmark jobs for other machines): a run directory
    # that can be written and the device asked for, before any data is read or model built.
    check_output_path(prep.output, "--output")
    device = opts.get("device") if prep.cfg is None else prep.cfg.train.device
    _check_device(device, "--device" if opts.get("device") == device else "train.device")
    from mae_transfer.engine.distributed import cleanup, init_distributed
    from mae_transfer.engine.locks import LockHeld, hold_run_dir
    from mae_transfer.engine.logger import setup_logging

    # The run directory is this run's alone while it runs (a second command on it: one line, exit 2);
    # it is locked before anything is written there.

    if spec.family == "frozen":  # under torchrun, every process extracts its shard of the features
        dist_info = init_distributed(_device_or_none(opts.get("device")))
        setup_logging(dist_info.rank)
        try:
            with hold_run_dir(prep.output, dist_info):
                text = spec.load("task")(
                    dataset=opts.get("dataset") or "imagefolder",
                    data=opts.get("data"),
                    backbone=opts.get("backbone"),
                    model=opts.get("model"),
                    img_size=opts.get("img_size"),
                    ks=tuple(int(k) for k in str(opts["k"]).split(",")),
                    sweep=bool(opts.get("sweep")),
                    label_fraction=opts.get("label_fraction"),
                    shots=opts.get("shots"),
                    output=prep.output,
                    trust=bool(opts.get("trust_checkpoint")),
                    dist=dist_info,
                    task=spec.name,
                )
        finally:
            cleanup()
        if dist_info.is_main:
            echo(text)
        return 0

    dist_info = init_distributed(None if prep.cfg.train.device == "auto" else prep.cfg.train.device)
    try:
        run_lock = hold_run_dir(prep.output, dist_info)
    except LockHeld:
        cleanup()
        raise
    with run_lock:
        return _train_or_evaluate(spec, prep, dist_info, echo)


def _train_or_evaluate(spec: TaskSpec, prep: Prepared, dist_info: Any, echo: Callable[[str], None]) -> int:
    """The engine's ``Trainer`` (``fit``, or ``evaluate`` with --eval-only), clean-up and the report."""
    from mae_transfer.engine.distributed import cleanup
    from mae_transfer.engine.logger import setup_logging
    from mae_transfer.engine.trainer import Trainer

    opts, cfg, output = prep.options, prep.cfg, prep.output
    setup_logging(dist_info.rank, output / "log.txt")
    if not cfg.data.path:
        log.warning(
            "no --data given: using the built-in toy %s data%s (a demo, not a paper recipe); pass --data DIR for the "
            "real dataset",
            spec.title,
            f" and the {prep.preset!r} preset" if prep.preset else "",
        )
    resume = opts.get("resume") or ("never" if opts.get("no_resume") else "auto")
    task_cls = spec.load("task")
    try:
        if opts.get("eval_only"):
            task = task_cls(cfg, train=False)
            task.name = spec.name
            task.evaluated = prep.evaluated
            model = task.build_model(load_backbone=False)
            spec.load("load")(model, prep.weights, opts["weights"])
            trainer = Trainer(task, cfg.train, cfg.optim, output, dist_info, config=cfg)
            trainer.evaluate(model, final=True)
        else:
            task = task_cls(cfg)
            task.name = spec.name
            knn = getattr(cfg, "knn", None)
            if spec.family == "pretrain" and knn is not None and knn.data:  # pretraining's online k-NN
                from mae_transfer.classification.frozen import KnnMonitor

                task.knn_monitor = KnnMonitor(knn.data, knn.k, knn.batch_size, img_size=task.img_size)
            trainer = Trainer(task, cfg.train, cfg.optim, output, dist_info, config=cfg, resume=resume)
            summary = trainer.fit()
    finally:
        cleanup()
    if not dist_info.is_main:
        return 0
    if spec.family == "pretrain":
        echo(
            f"pretraining {'finished' if summary['finished'] else 'stopped'} at step {summary['step']} of "
            f"{summary['total_steps']}; run directory: {output}"
        )
        if (output / "encoder.pth").exists():
            echo(f"encoder (official MAE format): {output / 'encoder.pth'}")
        if (output / "reconstructions").is_dir():
            echo(f"reconstruction pictures: {output / 'reconstructions'}")
        return 0
    echo(
        spec.load("report")(task, cfg) if spec.report else "  ".join(f"{k} {v:.2f}" for k, v in task.last_eval.items())
    )
    line = f"results: {output / 'results.jsonl'}"
    if spec.family == "dense":
        line += f"; metrics: {output / 'metrics.json'}"
    if spec.weights and not opts.get("eval_only"):
        line += f"; weights: {output / spec.weights.artifact}"
    echo(line)
    if getattr(cfg, "visualize", None):
        echo(f"pictures ({spec.dense.pictures if spec.dense else 'pictures'}): {output / 'visualize'}")
    return 0


__all__ = ["Prepared", "prepare", "run", "complete", "command_line", "option_names"]
