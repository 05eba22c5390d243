"""Weights by name (`hf-hub:ORG/NAME`, `timm:ARCH.TAG`) from a pre-filled local Hugging Face cache,
with the network off (HF_HUB_OFFLINE=1); a name that is not cached is one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from mae_transfer.checkpoint import read_checkpoint
from mae_transfer.checkpoint.hf_export import export_hf
from mae_transfer.checkpoint.hub import resolve_weights, weights_sha256
from mae_transfer.checkpoint.timm import export_timm
from mae_transfer.cli import main
from mae_transfer.models.vit import create_vit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo: str, folder) -> None:
    """Put ``folder``'s files into ``cache`` as huggingface_hub lays out a downloaded model repo."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    vit = create_vit("vit_micro_patch8", img_size=64, num_classes=0, global_pool="token")
    export_hf(vit.state_dict(), tmp_path / "hf")
    _cache_repo(cache, "someone/vit-mae-micro", tmp_path / "hf")
    export_timm(vit.state_dict(), tmp_path / "timm")
    # timm's pretrained config of this name points at the Hub repo timm/vit_base_patch16_224.mae.
    _cache_repo(cache, "timm/vit_base_patch16_224.mae", tmp_path / "timm")
    return vit, cache


def test_names_resolve_from_the_cache_offline_and_load_as_the_same_weights(tmp_path, cache, offline_cache, capsys):
    vit, hub_cache = offline_cache
    for name in ("hf-hub:someone/vit-mae-micro", "timm:vit_base_patch16_224.mae"):
        path = resolve_weights(name)
        assert str(path).startswith(str(hub_cache)) and len(weights_sha256(name)) == 64
        sd = read_checkpoint(name)
        assert sd  # a state dict in its own format; load_backbone converts it
    out = tmp_path / "knn"
    assert main(["knn", "--backbone", "hf-hub:someone/vit-mae-micro", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows and rows[0]["backbone"] == "hf-hub:someone/vit-mae-micro" and len(rows[0]["backbone_sha256"]) == 64
    res = tmp_path / "res"
    assert (
        main(
            [
                "bench",
                "--backbone",
                "mae=timm:vit_base_patch16_224.mae",
                "--tasks",
                "knn",
                "--results",
                str(res),
                "--in-process",
            ]
        )
        == 0
    )
    assert "knn" in capsys.readouterr().out


def test_a_name_not_in_the_cache_is_one_clear_line(tmp_path, cache, offline_cache, capsys):
    _, hub_cache = offline_cache
    assert main(["knn", "--backbone", "hf-hub:someone/not-cached", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not in the local cache" in err and str(hub_cache) in err and "Traceback" not in err
    assert main(["finetune", "--backbone", "timm:no_such_model.mae", "--output", str(tmp_path / "y")]) == 2
    assert "timm has no pretrained weights" in capsys.readouterr().err
