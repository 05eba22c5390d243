"""Input a user can get wrong ends in ONE line `mae-transfer: error: ...` and exit 2, before anything
is read, built, trained or written (issue 23, items 5 and 7). One table per command family; a case is
(argv, exit code, a piece of the error line). The list grows here.

Placeholders in an argv, filled in per test: {file} an existing file, {dir} an existing folder, {out}
a fresh run directory, {proc} a place nothing can be created in (/proc, also as root), {tmp} the
test's folder. Every case fails in the checks before any work (the device check sees no GPU, also on
a machine that has one), so each takes milliseconds once the modules are imported.
"""

from __future__ import annotations

import pytest

from mae_transfer.cli import main

# The same three unusable --output paths for every command that writes a run directory or tables.
BAD_OUTPUTS = [
    (["--output", "{file}"], "is a file, not a folder"),
    (["--output", "{file}/sub"], "is a file, so nothing can be written inside it"),
    (["--output", "{proc}"], "cannot write in /proc"),
]


def _outputs(*commands: str) -> list:
    return [([c, *argv], 2, msg) for c in commands for argv, msg in BAD_OUTPUTS]


PRETRAIN = [
    *_outputs("pretrain"),
    (["pretrain", "--blr", "nan"], 2, "--blr nan: must be a finite number greater than 0"),
    (["pretrain", "--blr", "inf"], 2, "--blr inf: must be a finite number greater than 0"),
    (["pretrain", "--blr", "-0.5"], 2, "--blr -0.5: must be a finite number greater than 0"),
    (["pretrain", "optim.lr=nan"], 2, "optim.lr must be a finite number"),
    (
        ["pretrain", "--model", "vit_gigantic_patch3"],
        2,
        "--model vit_gigantic_patch3: unknown model; choose one of mae_vit_base_patch16",
    ),
    (
        ["pretrain", "model=5"],
        2,
        "model=5: model is a section of options, not a value; set its keys as model.KEY=VALUE (its keys: name",
    ),
    (["pretrain", "train=5"], 2, "train=5: train is a section of options"),
    (["pretrain", "data=/path"], 2, "data=/path: data is a section of options"),
    (["pretrain", "train.epoch=5"], 2, "unknown option train.epoch"),
    (["pretrain", "nosuch.key=5"], 2, "unknown option nosuch"),
    (["pretrain", "--device", "cuda"], 2, "--device cuda: no CUDA device is available here"),
    (
        ["pretrain", "--max-steps", "-5"],
        2,
        "--max-steps -5: must be at least 1; leave --max-steps out for the whole schedule",
    ),
    (["pretrain", "--max-steps", "0"], 2, "--max-steps 0: must be at least 1"),
    (["pretrain", "train.max_steps=0"], 2, "train.max_steps must be at least 1"),
    (["pretrain", "--epochs", "0"], 2, "--epochs 0: must be at least 1"),
    (["pretrain", "--batch-size", "0"], 2, "--batch-size 0: must be at least 1"),
    (["pretrain", "--effective-batch-size", "-8"], 2, "--effective-batch-size -8: must be at least 1"),
]

CLASSIFICATION = [
    *_outputs("finetune", "linprobe", "inat", "places"),
    (["finetune", "--blr", "inf"], 2, "--blr inf: must be a finite number greater than 0"),
    (["linprobe", "--blr", "nan"], 2, "--blr nan: must be a finite number greater than 0"),
    (
        ["finetune", "--trainable-blocks", "99"],
        2,
        "--trainable-blocks 99: vit_micro_patch8 has 4 blocks; give k from 1 to 4",
    ),
    (["finetune", "--trainable-blocks", "99", "--model", "vit_base_patch16"], 2, "vit_base_patch16 has 12 blocks"),
    (["finetune", "--trainable-blocks", "-1"], 2, "--trainable-blocks -1: must be at least 1"),
    (["finetune", "--trainable-blocks", "0"], 2, "--trainable-blocks 0: must be at least 1"),
    (
        ["finetune", "--model", "vit_gigantic_patch3"],
        2,
        "--model vit_gigantic_patch3: unknown model; choose one of vit_tiny_patch16",
    ),
    (["inat", "--model", "vit_gigantic_patch3"], 2, "--model vit_gigantic_patch3: unknown model"),
    (["finetune", "model=5"], 2, "model=5: model is a section of options"),
    (["finetune", "train=5"], 2, "train=5: train is a section of options"),
    (["places", "data=/path"], 2, "data=/path: data is a section of options"),
    (["linprobe", "nosuch.key=5"], 2, "unknown option nosuch"),
    (
        ["finetune", "--device", "cuda"],
        2,
        "--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); use --device cpu",
    ),
    (["finetune", "train.device=cuda"], 2, "train.device cuda: no CUDA device is available here"),
    (["finetune", "--max-steps", "-5"], 2, "--max-steps -5: must be at least 1"),
    (["linprobe", "--max-steps", "0"], 2, "--max-steps 0: must be at least 1"),
    (["inat", "--epochs", "0"], 2, "--epochs 0: must be at least 1"),
    (["finetune", "--batch-size", "0"], 2, "--batch-size 0: must be at least 1"),
    (["places", "--effective-batch-size", "0"], 2, "--effective-batch-size 0: must be at least 1"),
]

DENSE = [
    *_outputs("coco", "ade20k"),
    (["coco", "--lr", "nan"], 2, "--lr nan: must be a finite number greater than 0"),
    (["coco", "--lr", "inf"], 2, "--lr inf: must be a finite number greater than 0"),
    (["ade20k", "--lr", "-0.5"], 2, "--lr -0.5: must be a finite number greater than 0"),
    (["ade20k", "--lr", "0"], 2, "--lr 0.0: must be a finite number greater than 0"),
    (["coco", "optim.lr=inf"], 2, "optim.lr must be a finite number"),
    (["coco", "--model", "vit_gigantic_patch3"], 2, "--model vit_gigantic_patch3: unknown model"),
    (["ade20k", "model=5"], 2, "model=5: model is a section of options"),
    (["coco", "data=/path"], 2, "data=/path: data is a section of options"),
    (["ade20k", "optim=1"], 2, "optim=1: optim is a section of options"),
    (["coco", "nosuch.key=5"], 2, "unknown option nosuch"),
    (["coco", "--device", "cuda"], 2, "--device cuda: no CUDA device is available here"),
    (["coco", "--max-steps", "-5"], 2, "--max-steps -5: must be at least 1"),
    (["ade20k", "--max-steps", "0"], 2, "--max-steps 0: must be at least 1"),
    (["coco", "--epochs", "0"], 2, "--epochs 0: must be at least 1"),
    (["ade20k", "--batch-size", "0"], 2, "--batch-size 0: must be at least 1"),
    (["ade20k", "--effective-batch-size", "-4"], 2, "--effective-batch-size -4: must be at least 1"),
    (["coco", "--img-size", "0"], 2, "--img-size 0: must be at least 1"),
    (["coco", "--visualize", "-1"], 2, "--visualize -1: must be at least 0"),
    (["ade20k", "--visualize", "-3"], 2, "--visualize -3: must be at least 0"),
]

FROZEN = [
    *_outputs("knn"),
    (["knn", "--k", "0"], 2, "--k 0: give neighbour counts as whole numbers of at least 1"),
    (["knn", "--k", "-3"], 2, "--k -3: give neighbour counts"),
    (["knn", "--k", "10,-1"], 2, "--k 10,-1: give neighbour counts"),
    (["knn", "--k", "2.5"], 2, "--k 2.5: give neighbour counts"),
    (["knn", "--k", "ten"], 2, "--k ten: give neighbour counts"),
    (["knn", "--k", ""], 2, "--k '': give neighbour counts"),
    (["knn", "--k", "10,,20"], 2, "--k 10,,20: give neighbour counts"),
    (
        ["knn", "--model", "vit_gigantic_patch3"],
        2,
        "--model vit_gigantic_patch3: unknown model; choose one of vit_tiny_patch16",
    ),
    (["knn", "--img-size", "0"], 2, "--img-size 0: must be at least 1"),
    (["knn", "--device", "cuda"], 2, "--device cuda: no CUDA device is available here"),
]

# The checkpoint does not exist: the --output check comes before it is read.
TOOLS = [
    (["table", "--results", "{tmp}", "--output", "{file}"], 2, "--output {file}: is a file, not a folder"),
    (["table", "--results", "{tmp}", "--output", "{file}/sub"], 2, "is a file, so nothing can be written inside it"),
    (["table", "--results", "{tmp}", "--output", "{proc}"], 2, "cannot write in /proc"),
    (["plot", "--results", "{tmp}", "--output", "{file}"], 2, "--output {file}: is a file, not a folder"),
    (["demo", "--output", "{file}"], 2, "--output {file}: is a file, not a folder"),
    (["toy-data", "imagefolder", "{file}"], 2, "DIR {file}: is a file, not a folder"),
    (
        ["export", "{tmp}/none.pth", "--to", "mae", "--output", "{dir}"],
        2,
        "--output {dir}: is a folder; give the path of the file",
    ),
    (["export", "{tmp}/none.pth", "--to", "detectron2", "--output", "{dir}"], 2, "--output {dir}: is a folder"),
    (["export", "{tmp}/none.pth", "--to", "mmseg", "--output", "{dir}"], 2, "--output {dir}: is a folder"),
    (["export-encoder", "{tmp}/none.pth", "--output", "{dir}"], 2, "--output {dir}: is a folder"),
    (
        ["export", "{tmp}/none.pth", "--to", "mae", "--output", "{file}/x.pth"],
        2,
        "is a file, so nothing can be written inside it",
    ),
    (["export", "{tmp}/none.pth", "--to", "timm", "--output", "{file}"], 2, "--output {file}: is a file, not a folder"),
    (["export", "{tmp}/none.pth", "--to", "hf", "--output", "{file}"], 2, "--output {file}: is a file, not a folder"),
    (["export", "{tmp}/none.pth", "--to", "hf", "--output", "{proc}"], 2, "cannot write in /proc"),
    (
        ["bench", "--backbone", "r=random", "--tasks", "knn", "--results", "{file}"],
        2,
        "--results {file}: is a file, not a folder",
    ),
    (["bench", "--backbone", "r=random", "--tasks", "knn", "--results", "{proc}"], 2, "cannot write in /proc"),
    (
        [
            "bench",
            "--backbone",
            "r=random",
            "--random-model",
            "vit_micro_patch8",
            "--tasks",
            "knn",
            "--results",
            "{out}",
            "--set",
            "coco:train.epochs=5",
            "--launcher",
            "print",
        ],
        2,
        "--set coco:...: coco is not among the tasks run: knn",
    ),
    (
        [
            "bench",
            "--backbone",
            "r=random",
            "--random-model",
            "vit_micro_patch8",
            "--tasks",
            "knn,linprobe",
            "--results",
            "{out}",
            "--preset",
            "ade20k=upernet_vit_b",
            "--launcher",
            "print",
        ],
        2,
        "--preset ade20k=...: ade20k is not among the tasks run: knn,linprobe",
    ),
    (
        [
            "bench",
            "--backbone",
            "r=random",
            "--random-model",
            "vit_micro_patch8",
            "--tasks",
            "linprobe",
            "--results",
            "{out}",
            "--set",
            "linprobe:train=5",
            "--launcher",
            "print",
        ],
        2,
        "train=5: train is a section of options",
    ),
    (
        [
            "bench",
            "--backbone",
            "r=random",
            "--random-model",
            "vit_micro_patch8",
            "--tasks",
            "linprobe",
            "--results",
            "{out}",
            "--set",
            "*:train.max_steps=0",
            "--launcher",
            "print",
        ],
        2,
        "train.max_steps must be at least 1",
    ),
]


@pytest.fixture
def refused(tmp_path, monkeypatch, capsys):
    """Run one case in-process; check the exit code, that stderr is exactly one line (no traceback)
    and that the line holds the expected text (placeholders filled in)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device cuda is refused on a GPU machine too
    (tmp_path / "file").write_text("not a folder\n")
    (tmp_path / "dir").mkdir()
    places = {
        "file": str(tmp_path / "file"),
        "dir": str(tmp_path / "dir"),
        "out": str(tmp_path / "run"),
        "proc": "/proc/mae-transfer-test/run",
        "tmp": str(tmp_path),
    }

    def check(argv: list[str], code: int, expected: str) -> None:
        argv = [a.format(**places) for a in argv]
        if (
            argv[0] in ("pretrain", "finetune", "linprobe", "inat", "places", "coco", "ade20k", "knn")
            and "--output" not in argv
        ):
            argv += ["--output", places["out"]]
        rc = main(argv)
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert rc == code and len(lines) == 1 and lines[0].strip(), (argv, rc, err)
        assert lines[0].startswith("mae-transfer: error: ") and expected.format(**places) in lines[0], (argv, lines[0])
        assert not (tmp_path / "run").exists(), f"{argv}: wrote its run directory before refusing"

    return check


def _ids(cases: list) -> list[str]:
    return [" ".join(argv) for argv, _, _ in cases]


@pytest.mark.parametrize("argv,code,expected", PRETRAIN, ids=_ids(PRETRAIN))
def test_pretrain_refuses(refused, argv, code, expected):
    refused(argv, code, expected)


@pytest.mark.parametrize("argv,code,expected", CLASSIFICATION, ids=_ids(CLASSIFICATION))
def test_classification_refuses(refused, argv, code, expected):
    refused(argv, code, expected)


@pytest.mark.parametrize("argv,code,expected", DENSE, ids=_ids(DENSE))
def test_dense_refuses(refused, argv, code, expected):
    refused(argv, code, expected)


@pytest.mark.parametrize("argv,code,expected", FROZEN, ids=_ids(FROZEN))
def test_frozen_refuses(refused, argv, code, expected):
    refused(argv, code, expected)


@pytest.mark.parametrize("argv,code,expected", TOOLS, ids=_ids(TOOLS))
def test_bench_table_export_refuse(refused, argv, code, expected):
    refused(argv, code, expected)


def test_an_existing_run_directory_and_a_new_file_path_pass_the_output_check(tmp_path):
    from mae_transfer.io import check_output_path

    (tmp_path / "run").mkdir()
    assert check_output_path(tmp_path / "run") == tmp_path / "run"  # a run directory to continue
    assert check_output_path(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert check_output_path(tmp_path / "new" / "model.pth", folder=False) == tmp_path / "new" / "model.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the probe leaves nothing behind
