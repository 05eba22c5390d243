"""`mae-transfer speed all --tiny`: every workload's benchmark code path on micro models, one table
and one JSON; `speed coco|ade20k --data-only` times the real training pipelines. Numbers are not
asserted (timings belong in the benchmark output), only that every workload ran and reported."""

from __future__ import annotations

import json

from mae_transfer.cli import main


def test_speed_all_tiny_runs_every_workload(tmp_path, cache, capsys):
    out = tmp_path / "speed.json"
    assert main(["speed", "all", "--tiny", "--device", "cpu", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["workload"].rsplit(" ", 1)[0] for r in rows] == ["MAE pretrain micro/8", "fine-tune micro/8", "Mask R-CNN micro",
                                                               "UperNet micro"]
    for r in rows:
        assert "error" not in r and r["images_per_s"] > 0 and r["step_ms"] > 0, r
        assert r["workload"] in table
    assert all(r["tflops"] > 0 for r in rows)  # FLOPs counted for every workload (detection: matmuls and convolutions)
    assert rows[1]["detail"]["flops_per_image"] > 0 and rows[3]["inference_images_per_s"] > 0


def test_data_only_times_the_training_pipelines(tmp_path, cache, shared, capsys):
    for task, data, split in (("coco", shared / "data" / "coco_tiny", "train2017"),
                              ("ade20k", shared / "data" / "ade20k_sample", "validation")):  # the sample has validation only
        out = tmp_path / f"{task}.json"
        assert main(["speed", task, "--data-only", "--data", str(data), "--split", split, "--samples", "4", "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["samples"] == 4 and r["samples_per_s"] > 0 and r["img_size"] in (1024, 512)
        assert "samples/s per worker" in capsys.readouterr().out
