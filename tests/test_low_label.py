"""Low-label transfer (``--label-fraction`` / ``--shots``): a stratified, seeded subset of the training
labels, written into the run directory and named in the result rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mae_transfer.classification.config import build_config
from mae_transfer.classification.subsets import label_subset, subset_label
from mae_transfer.cli import main
from mae_transfer.config import ConfigError, config_hash


def _labels() -> np.ndarray:
    # Classes of 40, 3, 1 and 10 images, interleaved as a real list would be.
    labels = np.repeat([0, 1, 2, 3], [40, 3, 1, 10])
    return labels[np.random.default_rng(1).permutation(len(labels))]


def test_the_subset_is_stratified_seeded_and_keeps_every_class():
    labels = _labels()
    ten = label_subset(labels, fraction=0.1, seed=0)
    assert np.array_equal(ten, np.unique(ten))  # sorted, no repeats
    # round(0.1 * n) per class, at least one: 4 of 40, 1 of 3 (0.3), 1 of 1, 1 of 10.
    assert np.bincount(labels[ten], minlength=4).tolist() == [4, 1, 1, 1]
    two = label_subset(labels, shots=2, seed=0)
    assert np.bincount(labels[two], minlength=4).tolist() == [2, 2, 1, 2]  # a class of 1 keeps its one
    assert np.array_equal(label_subset(labels, fraction=0.1, seed=0), ten)  # same seed, same subset
    assert not np.array_equal(label_subset(labels, fraction=0.1, seed=1), ten)  # another seed, another
    assert len(label_subset(labels, fraction=1.0, seed=0)) == len(labels)
    # Each class draws from its own images only.
    for c in range(4):
        assert set(ten[labels[ten] == c]) <= set(np.flatnonzero(labels == c))
    with pytest.raises(ValueError):
        label_subset(labels, fraction=0.1, shots=2)
    assert (subset_label(0.1), subset_label(0.005), subset_label(shots=5), subset_label(1.0)) == (
        "10%",
        "0.5%",
        "5shot",
        None,
    )


def test_low_label_settings_are_checked_and_only_they_change_the_job_identity():
    plain = build_config("toy_finetune")
    assert config_hash(plain) == "96f767950e91"  # as before the option existed (tests/test_backbone.py)
    ten = build_config("toy_finetune", {"data": {"label_fraction": 0.1}})
    assert config_hash(ten) != config_hash(plain)
    for bad, match in (
        ({"label_fraction": 0.1, "shots": 2}, "both set"),
        ({"label_fraction": 0.0}, r"\(0, 1\]"),
        ({"shots": 0}, "at least 1"),
    ):
        with pytest.raises(ConfigError, match=match):
            build_config("toy_finetune", {"data": bad}).validate()


def test_ten_percent_fine_tuning_on_real_images_writes_its_subset_and_names_it(shared, tmp_path, capsys):
    data = shared / "data" / "tiny_imagenet10"
    out = tmp_path / "ft10"
    argv = ["finetune", "--data", str(data), "--label-fraction", "0.1", "--output", str(out)]
    small = ["--model", "vit_nano_patch8", "model.img_size=64", "train.epochs=1", "train.batch_size=20"]
    assert main([*argv, *small, "train.effective_batch_size=20", "train.num_workers=0"]) == 0
    assert "finetune@10%" in capsys.readouterr().out
    subset = json.loads((out / "label_subset.json").read_text())
    assert (subset["images"], subset["of_images"], subset["classes"], subset["seed"]) == (100, 1000, 10, 0)
    # Ten images of each of the ten classes, named by their files.
    wnids = [f.split("/")[0] for f in subset["files"]]
    assert sorted(set(wnids)) == sorted(p.name for p in (data / "train").iterdir()) and set(
        map(wnids.count, set(wnids))
    ) == {10}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["protocol"] for r in rows} == {"finetune@10%"} and rows[0]["split"] == "val"
    top1 = next(r["value"] for r in rows if r["metric"] == "top1")
    assert 0.0 <= top1 <= 100.0
    # The tables give it a table of its own, never a full-label column.
    from mae_transfer.evaluation.tables import build_tables

    (table,) = build_tables(rows, paper=True)
    assert table.title.endswith(", 10% of the labels") and "paper" not in table.blocks
    assert [c.value for c in table.blocks["ours"][0].cells] == [top1]

    # --shots and --label-fraction together: one clear error before anything runs.
    assert main([*argv, "--shots", "5", *small]) == 2
    assert "give one" in capsys.readouterr().err


def test_low_label_knn_searches_only_the_subset_and_names_it(tmp_path, capsys):
    """`knn --shots K` / `--label-fraction F`: the classification tasks' subset (seed 0), written to
    label_subset.json; the k-NN and sweep rows carry it in their protocol and get a table of their own."""
    from mae_transfer.data.toy import write_imagefolder
    from mae_transfer.evaluation.tables import build_tables

    data = write_imagefolder(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=2, image_size=32)
    base = ["knn", "--data", str(data), "--model", "vit_nano_patch8", "--img-size", "32", "--k", "1"]
    out = tmp_path / "knn2"
    assert main([*base, "--shots", "2", "--output", str(out)]) == 0
    subset = json.loads((out / "label_subset.json").read_text())
    assert (subset["images"], subset["of_images"], subset["classes"], subset["seed"]) == (6, 18, 3, 0)
    assert subset["indices"] == label_subset(np.repeat([0, 1, 2], 6), shots=2, seed=0).tolist()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["protocol"] for r in rows} == {"knn1@2shot", "linprobe_sweep@2shot"}
    (table,) = build_tables(rows, paper=True)
    assert table.title.endswith(", 2 labelled images per class") and "paper" not in table.blocks
    # Without a subset: all 18 images, the full-label protocols, no subset file.
    full = tmp_path / "knn"
    assert main([*base, "--output", str(full)]) == 0
    assert not (full / "label_subset.json").exists()
    assert {json.loads(line)["protocol"] for line in (full / "results.jsonl").read_text().splitlines()} == {
        "knn1",
        "linprobe_sweep",
    }
    capsys.readouterr()
    assert main([*base, "--shots", "2", "--label-fraction", "0.5", "--output", str(tmp_path / "both")]) == 2
    assert "give one" in capsys.readouterr().err
