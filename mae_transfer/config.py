"""Typed configs: dataclasses, YAML presets and ``key.sub=value`` command-line overrides.

A run's config is a tree of dataclasses. Presets are YAML files holding a partial tree; overrides
are dotted paths. Values are checked against the field types so that a typo or a wrong type ends
in one clear message, and the resolved config (derived values included) is saved beside the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """An impossible or misspelt config value; the message names the option."""


def to_dict(cfg: Any) -> Any:
    """Dataclass tree -> plain dict (tuples become lists, Paths strings)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``where``."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where} cannot be empty (null)")
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _section_error(where, value, tp)
        return from_dict(tp, value, prefix=where + ".")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} = {value!r} does not match {tp}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where} needs {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(number):  # nan / inf: no rate, weight or size of a recipe is one
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (partial) dict, type-checking every value."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown option {prefix}{sorted(unknown)[0]}; valid options under "
            f"{prefix.rstrip('.') or 'the config'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], prefix + f.name)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def deep_update(into: dict, new: dict) -> dict:
    """Put the (nested, partial) dict ``new`` into ``into``, section by section; returns ``into``."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_update(into[k], v)
        else:
            into[k] = v
    return into


def merge(cfg: T, updates: dict[str, Any]) -> T:
    """Return a copy of ``cfg`` with a (nested, partial) dict of updates applied and checked."""
    return from_dict(type(cfg), deep_update(to_dict(cfg), updates))


def _section_error(where: str, value: Any, section: Any) -> ConfigError:
    keys = [f.name for f in dataclasses.fields(section)]
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    return ConfigError(
        f"{where}={value}: {where} is a section of options, not a value; set its keys as "
        f"{where}.KEY=VALUE (its keys: {shown})"
    )


def check_sections(cfg: Any, overrides: dict[str, Any], prefix: str = "") -> None:
    """Refuse an override that gives a whole section of ``cfg`` (a dataclass of options, e.g.
    ``train``) one value (``train=5``): merged with other overrides of that section it would be
    dropped without a word. Unknown keys are left to :func:`from_dict`, which names them."""
    for key, value in overrides.items():
        sub = getattr(cfg, key, None) if dataclasses.is_dataclass(cfg) else None
        if dataclasses.is_dataclass(sub) and not isinstance(sub, type):
            if not isinstance(value, dict):
                raise _section_error(prefix + key, value, sub)
            check_sections(sub, value, f"{prefix}{key}.")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.blr=1e-3", "model.name=mae_vit_large_patch16"]`` -> nested dict.

    Values are read as YAML scalars (``1e-3`` -> float, ``true`` -> bool, ``[1, 2]`` -> list).
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has no key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads "1e-3" as a string; numbers are what people mean.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options")
    return data


def save_config(cfg: Any, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the resolved config (plus derived values in ``extra``) as YAML."""
    from mae_transfer.io import atomic_write_text

    data = to_dict(cfg)
    if extra:
        data = {**data, "derived": to_dict(extra)}
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


# What changes no number of a run, left out of its identity (the benchmark's job key and the
# config_hash of result rows): where files are (the weights are identified by their sha256, the data
# by the dataset name), how results are shown, and trust. One list for every task and hash.
IDENTITY_EXCLUDE = frozenset(
    {
        "backbone",  # pretrained weights: their sha256 is in the identity instead
        "init",  # pretraining's starting weights (a path; pretraining is no benchmark job)
        "path",  # a data section's folder (any depth)
        "output",
        "overrides",  # already applied to the config
        "visualize",
        "visualize_score",
        "trust_checkpoint",
        "eval_backend",  # pycocotools and faster-coco-eval give the same numbers
    }
)


# Fields added after job keys were first published, with the value that means "as before": left
# out of the identity while they hold it, so the jobs of earlier stores keep their keys.
IDENTITY_SINCE = {
    "label_fraction": None,  # low-label transfer (classification data section)
    "shots": None,
    "protocol": "upernet",  # ADE20K: UperNet (the default) or the frozen linear protocols (segmentation)
    "linear": None,  # ADE20K linear protocols: their section (segmentation config)
    "attentive_heads": None,  # attentive probe (classification): its heads, lr sweep, per-head clipping
    "lr_sweep": None,
    "head_clip_grad": None,
}


def identity(cfg: Any) -> Any:
    """``cfg`` (a config or a mapping of options) without what changes no number: the keys in
    :data:`IDENTITY_EXCLUDE` at any depth, ``data`` when it is a folder rather than a section, and
    the keys of :data:`IDENTITY_SINCE` at their old value."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: strip(v)
                for k, v in value.items()
                if k not in IDENTITY_EXCLUDE
                and not (k == "data" and (v is None or isinstance(v, str)))
                and not (k in IDENTITY_SINCE and v == IDENTITY_SINCE[k])
            }
        return value

    return strip(to_dict(cfg))


def config_hash(cfg: Any) -> str:
    """Short stable hash of a config's :func:`identity`."""
    blob = json.dumps(identity(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def preset_names(preset_dir: Path) -> list[str]:
    """The presets (YAML files) in a task package's preset folder."""
    return sorted(p.stem for p in Path(preset_dir).glob("*.yaml"))


def build_with_preset(default: T, preset_dir: Path, preset: str | None, overrides: dict[str, Any] | None) -> T:
    """``default`` <- preset (a name in ``preset_dir`` or a YAML path) <- overrides, each checked."""
    cfg = default
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = Path(preset_dir) / f"{preset}.yaml"
            if not path.is_file():
                raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(preset_names(preset_dir))}")
        data = load_yaml(path)
        # A run's config.yaml records values derived at run time under "derived" (the peak lr, the
        # steps per epoch ...); the run recomputes them, so that file reproduces the run as a preset.
        data.pop("derived", None)
        cfg = merge(cfg, data)
    if overrides:
        cfg = merge(cfg, overrides)
    return cfg
