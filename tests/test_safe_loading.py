"""Loading is safe by default: a checkpoint whose pickle runs code is refused before it can run,
by every command that reads weights; `--trust-checkpoint` is the one explicit way to unpickle."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from mae_transfer.checkpoint import CheckpointError, export_mae_encoder, read_checkpoint
from mae_transfer.cli import main
from mae_transfer.models.vit import create_vit


class _Payload:
    """Pickles to a call of os.system: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    weights = create_vit("vit_micro_patch8", img_size=64, num_classes=0).state_dict()
    torch.save({"model": weights, "extra": _Payload(marker)}, path)
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    return path, pkl, marker


def test_a_malicious_pickle_is_refused_everywhere_by_default(tmp_path, cache, evil, capsys):
    path, pkl, marker = evil
    for source in (path, pkl):
        with pytest.raises(CheckpointError, match="--trust-checkpoint"):
            read_checkpoint(source)
    commands = [
        ["finetune", "--backbone", str(path), "--output", str(tmp_path / "ft"), "--epochs", "1"],
        ["knn", "--backbone", str(path), "--output", str(tmp_path / "knn")],
        ["pretrain", "--init", str(path), "--output", str(tmp_path / "pre"), "--epochs", "1"],
        ["coco", "--backbone", str(pkl), "--output", str(tmp_path / "coco"), "--epochs", "1"],
        ["coco", "--eval-only", "--weights", str(path), "--output", str(tmp_path / "cocoeval")],
        ["ade20k", "--eval-only", "--weights", str(path), "--output", str(tmp_path / "adeeval")],
        ["bench", "--backbone", f"evil={path}", "--tasks", "knn", "--results", str(tmp_path / "res")],
        ["export", str(path), "--to", "mae", "--output", str(tmp_path / "enc.pth")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("mae-transfer: error:") and "--trust-checkpoint" in last and "Traceback" not in err, (
            argv,
            err,
        )
    assert not marker.exists(), "the pickled payload ran"
    assert not (tmp_path / "enc.pth").exists()


def test_trust_is_explicit_and_our_files_never_need_it(tmp_path, evil):
    path, _, marker = evil
    read_checkpoint(path, trust=True)  # the switch really unpickles: the payload runs
    assert marker.exists()
    # Everything this toolkit writes loads with weights_only=True.
    enc = export_mae_encoder(
        create_vit("vit_micro_patch8", img_size=64, num_classes=0, global_pool="token"), tmp_path / "e.pth"
    )
    assert set(read_checkpoint(enc)) == {"model"}
    torch.load(enc, weights_only=True)
