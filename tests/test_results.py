"""The append-only results store: provenance on every row, safe against a crash mid-write."""

from __future__ import annotations

import json
import math

import pytest

from mae_transfer.engine.results import COLUMNS, ResultRow, read_run_results, write_run_results
from mae_transfer.evaluation.store import ResultStore


def test_rows_carry_provenance_and_read_back_in_order(tmp_path):
    store = ResultStore(tmp_path / "res")
    assert store.read() == []
    common = dict(
        task="ade20k",
        dataset="ade20k",
        split="validation",
        protocol="upernet_ss",
        backbone="mae",
        backbone_sha256="ab" * 32,
        config_hash="123456789abc",
        wall_time_s=3.5,
    )
    n = store.append(
        [ResultRow(metric="mIoU", value=48.1, **common), ResultRow(metric="mAcc", value=float("nan"), **common)]
    )
    assert n == 2
    store.append([ResultRow(task="coco", metric="bbox_AP", value=50.3, backbone="mae")])
    rows = store.read()
    assert [r["metric"] for r in rows] == ["mIoU", "mAcc", "bbox_AP"]
    assert set(COLUMNS) <= set(rows[0])
    assert rows[0]["versions"]["torch"] and rows[0]["hardware"] and rows[0]["date"].endswith("+00:00")
    assert rows[1]["value"] is None  # NaN is not JSON: an undefined metric is stored as null
    assert store.has(task="coco", backbone="mae") and not store.has(task="coco", backbone="random")
    assert [r["value"] for r in store.find(task="ade20k", metric="mIoU")] == [48.1]


def test_a_write_cut_off_by_a_crash_loses_nothing_else(tmp_path, caplog):
    store = ResultStore(tmp_path)
    store.append([ResultRow(task="finetune", metric="top1", value=83.6)])
    with open(store.path, "ab") as f:  # what a kill in the middle of a write leaves behind
        f.write(b'{"metric": "top5", "val')
    assert [r["metric"] for r in store.read()] == ["top1"]
    assert "unreadable" in caplog.text
    store.append([ResultRow(task="finetune", metric="top5", value=96.5)])
    assert [r["metric"] for r in store.read()] == ["top1", "top5"]
    lines = store.path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["value"] == 96.5


def test_pandas_reads_the_store_as_a_table(tmp_path):
    pd = pytest.importorskip("pandas")
    store = ResultStore(tmp_path)
    store.append(
        [
            ResultRow(task="coco", metric="AP", value=1.5, backbone="b"),
            ResultRow(task="coco", metric="AP50", value=3.0, backbone="b"),
        ]
    )
    frame = pd.read_json(store.path, lines=True)
    assert list(frame["metric"]) == ["AP", "AP50"] and math.isclose(frame["value"].sum(), 4.5)


def test_rows_without_a_metric_are_refused(tmp_path):
    with pytest.raises(ValueError, match="metric"):
        ResultRow(task="coco", metric="", value=1.0)
    with pytest.raises(TypeError, match="ResultRow"):
        ResultStore(tmp_path).append([{"task": "coco", "metric": "AP", "value": 1.0}])


def test_a_run_writes_and_reads_the_same_rows(tmp_path):
    rows = [ResultRow(task="knn", metric="top1", value=12.5, protocol="knn20", extra={"lr": 0.1})]
    path = write_run_results(tmp_path, rows, config={"model": {"name": "vit_micro_patch8"}})
    assert path.name == "results.jsonl" and (tmp_path / "config_resolved.json").exists()
    back = read_run_results(tmp_path)
    assert back[0].to_dict()["lr"] == 0.1
    # The same rows, with what the run adds: the model of its config and where, when, with what it ran.
    assert [r.replace(model=None, git_commit=None, versions=None, hardware=None, date=None) for r in back] == rows
    assert back[0].model == "vit_micro_patch8" and back[0].versions["torch"] and back[0].hardware and back[0].date
    assert read_run_results(tmp_path / "nothing") == []


def test_rows_on_other_data_in_a_benchmark_layout_name_it(tmp_path):
    # Issue 23, 9a: an 11-class dataset in the ADE layout is not "ade20k" (nor COCO-layout data with
    # other categories "coco", nor a 10-class ImageFolder ImageNet).
    from types import SimpleNamespace

    from mae_transfer.classification.config import build_config as cls_config
    from mae_transfer.classification.task import write_result_rows
    from mae_transfer.detection.config import build_config as det_config
    from mae_transfer.detection.task import DetectionTask
    from mae_transfer.segmentation.config import build_config as seg_config
    from mae_transfer.segmentation.task import SegmentationTask

    def dataset_of(out):
        return {r.dataset for r in read_run_results(out)}

    seg = seg_config(None, {"data": {"path": str(tmp_path / "mydata"), "num_classes": 11}})
    task = SimpleNamespace(name="ade20k", cfg=seg, backbone_sha256=None, evaluated=None)
    SegmentationTask.write_results(task, tmp_path / "seg", {"mIoU": 0.5, "mAcc": 0.6, "aAcc": 0.7}, 3)
    assert dataset_of(tmp_path / "seg") == {"ade20k-layout:mydata (11 classes)"}
    seg.data.num_classes = 150
    SegmentationTask.write_results(task, tmp_path / "seg", {"mIoU": 0.5}, 3)
    assert dataset_of(tmp_path / "seg") == {"ade20k"}

    det = det_config(None, {"data": {"path": str(tmp_path / "shapes")}})
    task = SimpleNamespace(name="coco", cfg=det, backbone_sha256=None, evaluated=None, num_classes=3)
    DetectionTask.write_results(task, tmp_path / "det", {"bbox": {"AP": 1.0}, "segm": {"AP": 2.0}}, 3)
    assert dataset_of(tmp_path / "det") == {"coco-layout:shapes (3 categories)"}

    cls = cls_config("toy_finetune", {"data": {"path": str(tmp_path / "tiny")}})
    metrics = {"top1": 1.0, "top5": 2.0, "mean_per_class": 3.0}
    write_result_rows(tmp_path / "cls", cls, metrics, 1.0, None, 3, num_classes=10)
    assert dataset_of(tmp_path / "cls") == {"imagefolder:tiny (10 classes)"}
    cls.data.path = None
    write_result_rows(tmp_path / "cls", cls, metrics, 1.0, None, 3, num_classes=10)
    assert dataset_of(tmp_path / "cls") == {"imagefolder (toy)"}
    # The toy data passed as --data (the demo's larger toy splits) is still the toy data, not other data.
    from mae_transfer.data.toy import ensure_toy_dataset, write_imagefolder

    cls.data.path = str(ensure_toy_dataset("imagefolder", write_imagefolder, root=tmp_path / "toy"))
    write_result_rows(tmp_path / "cls", cls, metrics, 1.0, None, 3, num_classes=10)
    assert dataset_of(tmp_path / "cls") == {"imagefolder (toy)"}
