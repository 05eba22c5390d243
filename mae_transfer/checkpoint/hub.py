"""Weights by name, as people name MAE weights: ``hf-hub:ORG/NAME`` (a Hugging Face Hub repository,
e.g. ``hf-hub:facebook/vit-mae-base``) and ``timm:ARCH.TAG`` (a timm pretrained config, e.g.
``timm:vit_base_patch16_224.mae``), next to plain paths.

Files come through ``huggingface_hub`` and its cache (``HF_HUB_CACHE`` / ``HF_HOME``); with
``HF_HUB_OFFLINE=1`` only the cache is used, and a name that is not cached is one clear error
naming the cache folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from mae_transfer.checkpoint.errors import CheckpointError

SCHEMES = ("hf-hub:", "timm:")
# What a model repository's weights are called (timm and transformers save these).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_named(source: object) -> bool:
    """Whether ``source`` is a weights name (``hf-hub:...``, ``timm:...``) rather than a path."""
    return isinstance(source, (str, os.PathLike)) and str(source).startswith(SCHEMES)


def _hub_options() -> dict:
    # Read at call time (huggingface_hub reads these variables once, when it is first imported).
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return {"cache_dir": os.environ.get("HF_HUB_CACHE") or None, "local_files_only": offline}


def _cache_dir() -> str:
    opts = _hub_options()
    if opts["cache_dir"]:
        return opts["cache_dir"]
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _download(repo: str, filename: str | None, source: str) -> Path:
    try:
        import huggingface_hub as hub
    except ImportError:  # pragma: no cover - comes with timm and transformers
        raise CheckpointError(
            f"{source}: reading weights by name needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    opts = _hub_options()
    try:
        if filename is None:
            return Path(hub.snapshot_download(repo, allow_patterns=["*.json", *WEIGHT_FILES], **opts))
        return Path(hub.hf_hub_download(repo, filename, **opts))
    except Exception as e:  # huggingface_hub raises many types (offline, not found, no network)
        name = f"{repo}/{filename}" if filename else repo
        if opts["local_files_only"]:
            problem = f"is not in the local cache {_cache_dir()}, and HF_HUB_OFFLINE is set ({type(e).__name__})"
            todo = "Download it once where the Hub is reachable"
        else:
            problem = f"could not be downloaded ({type(e).__name__}; the cache is {_cache_dir()})"
            todo = "Check the name and the network, or download it once where the Hub is reachable"
        raise CheckpointError(
            f"{source}: {name} {problem}. {todo} (huggingface-cli download {repo}), or pass a local file"
        ) from None


def resolve_weights(source: str | os.PathLike) -> Path:
    """The local file or folder of ``source``: a path as it is; ``hf-hub:ORG/NAME`` -> the cached
    repository folder; ``timm:ARCH.TAG`` -> the cached weights file of timm's pretrained config."""
    text = str(source)
    if text.startswith("hf-hub:"):
        repo = text[len("hf-hub:") :].strip("/")
        if repo.count("/") != 1:
            raise CheckpointError(f"{text}: give hf-hub:ORG/NAME (e.g. hf-hub:facebook/vit-mae-base)")
        return _download(repo, None, text)
    if text.startswith("timm:"):
        name = text[len("timm:") :]
        try:
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(name)
        except Exception:  # noqa: BLE001 - timm raises RuntimeError / KeyError for unknown names
            cfg = None
        if cfg is None or not getattr(cfg, "hf_hub_id", None):
            raise CheckpointError(
                f"{text}: timm has no pretrained weights of that name on the Hugging Face Hub "
                "(timm.list_pretrained('vit_*mae*') lists the MAE ones)"
            )
        repo = cfg.hf_hub_id
        last: CheckpointError | None = None
        for filename in WEIGHT_FILES:
            try:
                return _download(repo, filename, text)
            except CheckpointError as e:
                last = e
        raise last  # type: ignore[misc]
    return Path(source)


def weights_file(source: str | os.PathLike) -> Path:
    """The one file holding the weights of ``source`` (in a folder: its model.safetensors /
    pytorch_model.bin, or a run's encoder.pth / checkpoint-last.pth)."""
    path = resolve_weights(source)
    if path.is_dir():
        for name in (*WEIGHT_FILES, "encoder.pth", "checkpoint-last.pth"):
            if (path / name).is_file():
                return path / name
    return path


def weights_sha256(source: str | os.PathLike) -> str:
    """The identity of pretrained weights in result rows and benchmark jobs: the sha256 of their file."""
    from mae_transfer.io import file_sha256

    path = weights_file(source)
    if not path.is_file():
        raise CheckpointError(f"{source}: no such file (check the path)")
    return file_sha256(path)


__all__ = ["SCHEMES", "is_named", "resolve_weights", "weights_file", "weights_sha256"]
