"""`mae-transfer speed all --tiny`: every workload's benchmark code path on micro models, one table
and one JSON; `speed coco|ade20k --data-only` times the real training pipelines. Numbers are not
asserted (timings belong in the benchmark output), only that every workload ran and reported."""

from __future__ import annotations

import json

import pytest

from mae_transfer.cli import main


def test_speed_all_tiny_runs_every_workload(tmp_path, cache, capsys):
    out = tmp_path / "speed.json"
    assert main(["speed", "all", "--tiny", "--device", "cpu", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["workload"].rsplit(" ", 1)[0] for r in rows] == [
        "MAE pretrain micro/8",
        "fine-tune micro/8",
        "Mask R-CNN micro",
        "UperNet micro",
    ]
    for r in rows:
        assert "error" not in r and r["images_per_s"] > 0 and r["step_ms"] > 0, r
        assert r["workload"] in table
    assert all(r["tflops"] > 0 for r in rows)  # FLOPs counted for every workload (detection: matmuls and convolutions)
    assert rows[1]["detail"]["flops_per_image"] > 0 and rows[3]["inference_images_per_s"] > 0
    # Which attention ran: CPU flash for the plain ViTs; the relative-position bias of ViTDet and
    # UperNet needs a gradient, so CPU SDPA falls back to the unfused math path (named, not "-").
    assert [r["attention"] for r in rows] == ["_scaled_dot_product_flash_attention_for_cpu"] * 2 + [
        "math (unfused SDPA)"
    ] * 2


def test_speed_all_tiny_bf16_runs_the_gpu_precision_paths_on_cpu(tmp_path, cache):
    out = tmp_path / "speed.json"
    assert (
        main(
            [
                "speed",
                "all",
                "--tiny",
                "--device",
                "cpu",
                "--precision",
                "bf16",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["precision"] == "bf16"
    for r in data["rows"]:
        assert "error" not in r and r["precision"] == "bf16" and r["images_per_s"] > 0, r
    assert data["rows"][2]["inference_images_per_s"] > 0  # Mask R-CNN inference + mask pasting under bf16 autocast


@pytest.mark.parametrize(
    "argv, message",
    [
        (["all", "--batch-size", "4"], "speed all does not use --batch-size"),
        (["finetune", "--img-size", "384"], "speed finetune does not use --img-size"),
        (["ade20k", "--compile"], "speed ade20k does not use --compile"),
        (["pretrain", "--tiny"], "speed pretrain does not use --tiny"),
        (["coco", "--data-only", "--steps", "3"], "speed coco --data-only does not use --steps"),
        (["pretrain", "--data-only"], "--data-only measures the data of coco, ade20k, inat or places"),
        (["places"], "speed places measures data only: add --data-only"),
        (["inat", "--data-only", "--workers", "-1"], "--workers must be 0 or more"),
        (["all", "--precision", "fp16"], "--precision fp16 is for speed coco"),
        (["coco", "--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_speed_refuses_options_it_would_ignore(argv, message, capsys):
    assert main(["speed", *argv]) == 2  # one line naming the option, before anything is built or measured
    assert message in capsys.readouterr().err


def test_data_only_times_the_training_pipelines(tmp_path, cache, shared, capsys):
    for task, data, split in (
        ("coco", shared / "data" / "coco_tiny", "train2017"),
        ("ade20k", shared / "data" / "ade20k_sample", "validation"),
    ):  # the sample has validation only
        out = tmp_path / f"{task}.json"
        assert (
            main(
                [
                    "speed",
                    task,
                    "--data-only",
                    "--data",
                    str(data),
                    "--split",
                    split,
                    "--samples",
                    "4",
                    "--json",
                    str(out),
                ]
            )
            == 0
        )
        r = json.loads(out.read_text())
        assert r["samples"] == 4 and r["samples_per_s"] > 0 and r["img_size"] in (1024, 512)
        assert "samples/s per worker" in capsys.readouterr().out
