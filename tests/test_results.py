"""The append-only results store: provenance on every row, safe against a crash mid-write."""

from __future__ import annotations

import json
import math

import pytest

from mae_transfer.results import COLUMNS, ResultStore


def test_rows_carry_provenance_and_read_back_in_order(tmp_path):
    store = ResultStore(tmp_path / "res")
    assert store.read() == []
    n = store.append([{"metric": "mIoU", "value": 48.1}, {"metric": "mAcc", "value": float("nan")}],
                     task="ade20k", dataset="ade20k", split="validation", protocol="upernet_ss", backbone="mae",
                     backbone_sha256="ab" * 32, config_hash="123456789abc", wall_time_s=3.5)
    assert n == 2
    store.append([{"metric": "bbox_AP", "value": 50.3}], task="coco", backbone="mae")
    rows = store.read()
    assert [r["metric"] for r in rows] == ["mIoU", "mAcc", "bbox_AP"]
    assert set(COLUMNS) <= set(rows[0])
    assert rows[0]["versions"]["torch"] and rows[0]["hardware"] and rows[0]["date"].endswith("+00:00")
    assert rows[1]["value"] is None  # NaN is not JSON: an undefined metric is stored as null
    assert store.has(task="coco", backbone="mae") and not store.has(task="coco", backbone="random")
    assert [r["value"] for r in store.find(task="ade20k", metric="mIoU")] == [48.1]


def test_a_write_cut_off_by_a_crash_loses_nothing_else(tmp_path, caplog):
    store = ResultStore(tmp_path)
    store.append([{"metric": "top1", "value": 83.6}], task="finetune")
    with open(store.path, "ab") as f:  # what a kill in the middle of a write leaves behind
        f.write(b'{"metric": "top5", "val')
    assert [r["metric"] for r in store.read()] == ["top1"]
    assert "unreadable" in caplog.text
    store.append([{"metric": "top5", "value": 96.5}], task="finetune")
    assert [r["metric"] for r in store.read()] == ["top1", "top5"]
    lines = store.path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["value"] == 96.5


def test_pandas_reads_the_store_as_a_table(tmp_path):
    pd = pytest.importorskip("pandas")
    store = ResultStore(tmp_path)
    store.append([{"metric": "AP", "value": 1.5}, {"metric": "AP50", "value": 3.0}], task="coco", backbone="b")
    frame = pd.read_json(store.path, lines=True)
    assert list(frame["metric"]) == ["AP", "AP50"] and math.isclose(frame["value"].sum(), 4.5)


def test_rows_without_a_metric_are_refused(tmp_path):
    with pytest.raises(ValueError, match="metric"):
        ResultStore(tmp_path).append([{"value": 1.0}])
