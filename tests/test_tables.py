"""Paper tables from result rows: cell placement, last-row-wins, deltas, bold, failures, the paper's
numbers, and the Markdown / LaTeX / CSV renderers (plus a pdflatex build when pdflatex exists)."""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mae_transfer.evaluation.tables import (
    NO_RESULTS,
    TOY_NOTE,
    build_tables,
    latex_document,
    load_paper,
    render,
    size_of,
    to_csv,
    to_latex,
    to_markdown,
    write_tables,
)


def row(backbone, job, protocol, metric, value, dataset, model="vit_micro_patch8"):
    return {
        "task": job,
        "backbone": backbone,
        "model": model,
        "dataset": dataset,
        "protocol": protocol,
        "metric": metric,
        "value": value,
        "git_commit": "abc",
        "wall_time_s": 1.0,
    }


def failure(backbone, job, model="vit_micro_patch8"):
    return {
        "task": job,
        "backbone": backbone,
        "model": model,
        "metric": "job_failed",
        "value": None,
        "error": "CUDA out of memory",
    }


@pytest.fixture
def toy_rows():
    """Two toy-data backbones: "mae" beats "random init" everywhere except a tie on COCO APmask."""
    rows = []
    for bb, ap, mask, miou, inat, ft, knn in (
        ("mae", 31.25, 20.0, 15.0, 40.0, 60.0, 33.0),
        ("random init", 12.5, 20.0, 5.0, 30.0, 50.0, 23.0),
    ):
        rows += [
            row(bb, "coco", "mask_rcnn_toy", "bbox_AP", ap, "coco (toy)"),
            row(bb, "coco", "mask_rcnn_toy", "segm_AP", mask, "coco (toy)"),
            row(bb, "coco", "mask_rcnn_toy", "bbox_AP50", 99.0, "coco (toy)"),
            row(bb, "ade20k", "toy_ss", "mIoU", miou, "ade20k (toy)"),
            row(bb, "inat2018", "finetune", "top1", inat, "inat2018 (toy)"),
            row(bb, "finetune", "finetune", "top1", ft, "imagefolder (toy)"),
            row(bb, "knn", "knn20", "top1", knn, "imagefolder (toy)"),
            row(bb, "knn", "knn10", "top1", knn - 10, "imagefolder (toy)"),
        ]
    return rows


@pytest.fixture
def real_rows():
    return [
        row("mae-800ep", "coco", "mask_rcnn_vitdet", "bbox_AP", 49.0, "coco", "vit_base_patch16"),
        row("mae-800ep", "coco", "mask_rcnn_vitdet", "segm_AP", 43.5, "coco", "vit_base_patch16"),
        row("mae-800ep", "ade20k", "upernet_ss", "mIoU", 47.0, "ade20k", "vit_base_patch16"),
    ]


def table(tables, key):
    return next(t for t in tables if t.key == key)


def csv_cells(t):
    """The table's CSV read back: {method: {column: text}}."""
    return {r["method"]: r for r in csv.DictReader(io.StringIO(to_csv(t)))}


def md_row(md, label):
    return next(line for line in md.splitlines() if line.startswith(f"| {label} |"))


def test_size_of():
    assert size_of("vit_base_patch16") == "B"
    assert size_of("vit_large_patch16") == "L"
    assert size_of("vit_huge_patch14") == "H"
    assert size_of("mae_vit_large_patch16") == "L"
    assert size_of("vit_micro_patch8") == "micro"
    assert size_of("vit_small_patch16") == "small"
    assert size_of(None) is None


def test_paper_yaml_numbers():
    t = load_paper()["tables"]
    mae = {r["method"]: r for r in t["coco"]["rows"]}["MAE"]["values"]
    assert mae["B"] == {"APbox": 50.3, "APmask": 44.9} and mae["L"] == {"APbox": 53.3, "APmask": 47.2}
    assert {r["method"]: r for r in t["ade20k"]["rows"]}["BEiT"]["values"]["L"]["mIoU"] == 53.3
    assert t["transfer"]["rows"][0]["values"]["H448"]["inat2019"] == 88.3
    assert {r["method"]: r for r in t["imagenet_linprobe"]["rows"]}["MoCo v3"]["values"]["L"]["linprobe"] == 77.6
    assert all("Table" in tab["source"] and "2111.06377" in tab["source"] for tab in t.values())


def test_tables_order_and_values_land_in_their_cells(toy_rows):
    tables = build_tables(toy_rows)
    assert [t.key for t in tables] == ["coco", "ade20k", "transfer", "imagenet"]
    coco = table(tables, "coco")
    assert coco.columns == ["APbox", "APmask"]
    cells = csv_cells(coco)
    assert cells["mae"]["APbox"] == "31.25" and cells["mae"]["APmask"] == "20.0"
    assert cells["random init"]["APbox"] == "12.5"
    assert (cells["mae"]["block"], cells["mae"]["size"], cells["mae"]["data"]) == ("ours", "micro", "toy")
    assert list(csv_cells(table(tables, "ade20k")))[:2] == ["mae", "random init"]  # first-appearance order
    assert csv_cells(table(tables, "ade20k"))["mae"]["mIoU"] == "15.0"
    imagenet = csv_cells(table(tables, "imagenet"))
    assert imagenet["mae"]["fine-tune"] == "60.0" and imagenet["mae"]["k-NN"] == "33.0"  # knn20 preferred


def test_last_row_wins(toy_rows):
    toy_rows.append(row("mae", "coco", "mask_rcnn_toy", "bbox_AP", 7.5, "coco (toy)"))
    cells = csv_cells(table(build_tables(toy_rows), "coco"))
    assert cells["mae"]["APbox"] == "7.5" and cells["mae"]["APbox_delta"] == "-5.0"


def test_deltas_against_auto_baseline(toy_rows):
    coco = table(build_tables(toy_rows), "coco")
    cells = csv_cells(coco)
    assert float(cells["mae"]["APbox_delta"]) == pytest.approx(31.25 - 12.5)
    assert float(cells["mae"]["APmask_delta"]) == 0.0
    assert cells["random init"]["APbox_delta"] == ""  # the baseline itself
    assert "(±x.x): difference to random init" in coco.caption
    assert "| **31.2** (+18.8) | **20.0** (+0.0) |" in md_row(to_markdown(coco), "mae")
    assert r"{\scriptsize(+18.8)}" in to_latex(coco)


def test_explicit_and_no_baseline(toy_rows):
    cells = csv_cells(table(build_tables(toy_rows, baseline="mae"), "coco"))
    assert float(cells["random init"]["APbox_delta"]) == pytest.approx(-18.75) and cells["mae"]["APbox_delta"] == ""
    assert r"\scriptsize($-$18.8)" in to_latex(table(build_tables(toy_rows, baseline="mae"), "coco"))
    coco = table(build_tables(toy_rows, baseline=None), "coco")
    assert all(c.delta is None for r in coco.blocks["ours"] for c in r.cells)
    assert "difference to" not in coco.caption
    with pytest.raises(ValueError, match="'mae', 'random init'"):
        build_tables(toy_rows, baseline="nope")


def test_bold_is_our_best_per_column_never_a_paper_row(toy_rows):
    # README: "the best of your backbones in each column is in bold"; the paper's rows are
    # reference numbers, not compared (here the paper's 50.3 APbox beats our 31.2, and ours is bold).
    coco = table(build_tables(toy_rows), "coco")
    mae, rnd = coco.blocks["ours"]
    assert mae.cells[0].bold and not rnd.cells[0].bold
    assert mae.cells[1].bold and rnd.cells[1].bold  # 20.0 == 20.0: both bold
    assert not any(c.bold for r in coco.blocks["paper"] for c in r.cells)
    md = to_markdown(coco)
    assert "| **20.0** |" in md_row(md, "random init") and "| 12.5 |" in md_row(md, "random init")
    assert "| **31.2** (+18.8) |" in md_row(md, "mae") and "**50.3**" not in md
    assert r"\textbf{31.2}" in to_latex(coco) and r"\textbf{50.3}" not in to_latex(coco)
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())
    assert (
        "in each column the best of your backbones is in bold (the paper's rows are reference numbers: never bold"
        in readme
    )


def test_failed_and_missing(toy_rows):
    toy_rows += [
        failure("mae", "ade20k"),
        failure("random init", "linprobe"),
        failure("random init", "coco"),
        row("random init", "coco", "mask_rcnn_toy", "bbox_AP", 1.0, "coco (toy)"),
    ]
    tables = build_tables(toy_rows)
    ade = table(tables, "ade20k")
    assert csv_cells(ade)["mae"]["mIoU"] == "failed"  # failure newer than the result
    assert "| failed |" in md_row(to_markdown(ade), "mae")
    assert "mae & micro & toy & failed" in to_latex(ade)
    assert csv_cells(table(tables, "coco"))["random init"]["APbox"] == "1.0"  # success newer than the failure
    imagenet = table(tables, "imagenet")
    assert imagenet.columns == ["fine-tune", "linear probe", "k-NN"]  # a failure keeps its column
    cells = csv_cells(imagenet)
    assert cells["random init"]["linear probe"] == "failed" and cells["mae"]["linear probe"] == ""
    line = md_row(to_markdown(imagenet), "mae")
    assert line.split("|")[5].strip() == "–"  # never ran
    assert "mae & micro & toy & " in to_latex(imagenet) and "& -- &" in to_latex(imagenet)


def test_only_failures_still_make_a_table():
    t = build_tables([failure("mae", "coco")])
    assert [x.key for x in t] == ["coco"] and csv_cells(t[0])["mae"]["APbox"] == "failed"


def test_columns_dropped_unless_full(toy_rows):
    transfer = table(build_tables(toy_rows), "transfer")
    assert transfer.columns == ["iNat 2018"]
    assert [r.label for r in transfer.blocks["paper"]] == ["MAE (paper)", "previous best (paper)"]
    full = table(build_tables(toy_rows, full=True), "transfer")
    assert full.columns == ["iNat 2017", "iNat 2018", "iNat 2019", "Places205", "Places365"]
    assert csv_cells(full)["mae"]["Places205"] == ""
    assert table(build_tables(toy_rows), "ade20k").columns == ["mIoU"]
    toy_rows.append(row("mae", "ade20k", "toy_ms+flip", "mIoU", 16.0, "ade20k (toy)"))
    ade = table(build_tables(toy_rows), "ade20k")
    assert ade.columns == ["mIoU", "mIoU (ms+flip)"] and csv_cells(ade)["mae"]["mIoU (ms+flip)"] == "16.0"
    assert csv_cells(ade)["MAE (paper)"]["mIoU (ms+flip)"] == ""


def test_knn_falls_back_to_smallest_k():
    rows = [
        row("mae", "knn", "knn100", "top1", 40.0, "imagefolder (toy)"),
        row("mae", "knn", "knn10", "top1", 30.0, "imagefolder (toy)"),
    ]
    t = table(build_tables(rows), "imagenet")
    assert t.columns == ["k-NN"] and csv_cells(t)["mae"]["k-NN"] == "30.0"
    assert any("k=10" in n for n in t.notes)


def test_paper_rows_for_requested_sizes(real_rows):
    tables = build_tables(real_rows)  # vit_base -> paper rows of ViT-B only
    coco = csv_cells(table(tables, "coco"))
    assert coco["MAE (paper)"]["APbox"] == "50.3" and coco["MAE (paper)"]["APmask"] == "44.9"
    assert coco["supervised (paper)"]["data"] == "IN1K w/ labels" and coco["BEiT (paper)"]["data"] == "IN1K+DALLE"
    assert {r.size for r in table(tables, "coco").blocks["paper"]} == {"B"}
    ade = csv_cells(table(build_tables(real_rows, paper_sizes=["L"]), "ade20k"))
    assert ade["MAE (paper)"]["mIoU"] == "53.6" and ade["MAE (paper)"]["size"] == "L"
    rows = real_rows + [row("mae-h", "places365", "finetune", "top1", 59.0, "places365", "vit_huge_patch14")]
    transfer = table(build_tables(rows, paper_sizes=["H", "H448"]), "transfer")
    paper = [r for r in transfer.blocks["paper"]]
    assert [(r.label, r.size, r.cells[0].value) for r in paper] == [
        ("MAE (paper)", "H", 59.8),
        ("MAE (paper)", "H448", 60.3),
        ("previous best (paper)", None, 58.0),
    ]
    assert any("WSL, 3.5B images" in n for n in transfer.notes)
    assert "Table 6" in transfer.caption
    assert build_tables(real_rows, paper=False)[0].blocks.keys() == {"ours"}


def test_default_paper_sizes(toy_rows, real_rows):
    assert {r.size for r in table(build_tables(toy_rows), "coco").blocks["paper"]} == {"B"}  # micro -> B
    rows = real_rows + [row("big", "coco", "mask_rcnn_vitdet", "bbox_AP", 52.0, "coco", "vit_large_patch16")]
    assert [r.size for r in table(build_tables(rows), "coco").blocks["paper"]] == ["B", "L"] * 4
    imagenet = table(
        build_tables([row("m", "linprobe", "linprobe", "top1", 70.0, "imagenet", "vit_large_patch16")]), "imagenet"
    )
    paper = csv_cells(imagenet)
    assert paper["MAE (paper)"]["linear probe"] == "75.8" and paper["MoCo v3 (paper)"]["linear probe"] == "77.6"
    assert imagenet.columns == ["linear probe"]


def test_imagenet_paper_finetune_and_knn_dash(toy_rows):
    t = table(build_tables(toy_rows, paper_sizes=["B", "H"], full=True), "imagenet")
    by = {(r.label, r.size): r for r in t.blocks["paper"]}
    assert [c.value for c in by[("MAE (paper)", "B")].cells] == [83.6, 68.0, None]
    assert [c.value for c in by[("DINO (paper)", "B")].cells] == [82.8, None, None]
    assert (
        by[("MAE (paper)", "H")].cells[0].value == 86.9
        and by[("scratch (our impl.) (paper)", "H")].cells[0].value == 83.1
    )
    assert by[("MAE (paper)", "B")].cells[2].status == "–"


def test_toy_note(toy_rows, real_rows):
    assert all(TOY_NOTE in t.notes for t in build_tables(toy_rows))
    assert TOY_NOTE in to_markdown(build_tables(toy_rows)[0]).replace("\\", "")
    assert all(TOY_NOTE not in t.notes for t in build_tables(real_rows))
    assert csv_cells(build_tables(real_rows)[0])["mae-800ep"]["data"] == "coco"


def test_markdown_is_a_valid_pipe_table(toy_rows):
    toy_rows.append(row("weird|name*", "coco", "mask_rcnn_toy", "bbox_AP", 3.0, "coco (toy)"))
    md = render(toy_rows)
    assert md.startswith("**Table 4: COCO object detection and instance segmentation (Mask R-CNN)**")
    blocks = [b for b in md.split("\n\n") if b.startswith("|")]
    assert len(blocks) == 4
    for b in blocks:
        counts = {len(re.findall(r"(?<!\\)\|", line)) for line in b.splitlines()}
        assert len(counts) == 1, b
    assert r"weird\|name\*" in md


def test_latex_escapes_and_structure(toy_rows):
    toy_rows.append(row("random_init 100% & #1 {x} ~^$\\", "coco", "mask_rcnn_toy", "bbox_AP", 3.0, "coco (toy)"))
    tex = render(toy_rows, "latex")
    assert r"random\_init 100\% \& \#1 \{x\} \textasciitilde{}\textasciicircum{}\$\textbackslash{}" in tex
    stripped = re.sub(r"\\[{}]", "", tex)
    assert stripped.count("{") == stripped.count("}")
    coco = to_latex(build_tables(toy_rows)[0])
    assert coco.index(r"\toprule") < coco.index(r"\midrule") < coco.index(r"\bottomrule")
    assert coco.count(r"\midrule") == 2 and r"\begin{tabular}{lllrr}" in coco and r"\caption{" in coco
    assert r"\par\footnotesize" in coco and "Table 4" in coco


def test_csv_render_and_no_results(toy_rows):
    out = render(toy_rows, "csv")
    assert out.startswith("# Table 4:") and "\n\n# Table 5:" in out
    assert next(csv.reader(io.StringIO(out.splitlines()[1]))) == [
        "block",
        "method",
        "size",
        "data",
        "APbox",
        "APbox_delta",
        "APmask",
        "APmask_delta",
    ]
    assert build_tables([]) == [] and render([]) == NO_RESULTS and "\n" not in render([], "latex")
    assert build_tables([row("mae", "pretrain", None, "loss", 0.1, "x")]) == []
    with pytest.raises(ValueError):
        render(toy_rows, "html")


def test_write_tables(toy_rows, tmp_path):
    paths = write_tables(toy_rows, tmp_path / "report")
    assert set(paths) == {
        "tables.md",
        "tables.tex",
        "table_coco.csv",
        "table_ade20k.csv",
        "table_transfer.csv",
        "table_imagenet.csv",
    }
    assert all(p.is_file() for p in paths.values())
    assert paths["tables.md"].read_text() == render(toy_rows)
    assert paths["tables.tex"].read_text().startswith(r"\documentclass{article}")
    assert paths["table_coco.csv"].read_text() == to_csv(build_tables(toy_rows)[0])
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(paths)  # no temp files left
    assert write_tables([], tmp_path / "empty")["tables.md"].read_text().strip() == NO_RESULTS


def test_latex_document_compiles(toy_rows, tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed (apt-get install texlive-latex-base texlive-latex-recommended)")
    toy_rows += [row("random_init & co", "coco", "mask_rcnn_toy", "bbox_AP", 3.0, "coco (toy)"), failure("mae", "knn")]
    for name, tables in (("full", build_tables(toy_rows, full=True)), ("empty", [])):
        (tmp_path / f"{name}.tex").write_text(latex_document(tables))
        proc = subprocess.run(
            ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"{name}.tex"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert (tmp_path / f"{name}.pdf").stat().st_size > 0


def test_other_data_in_a_benchmark_layout_gets_its_own_table_without_paper_rows(real_rows):
    from mae_transfer.engine.results import dataset_name, is_custom_dataset
    from mae_transfer.evaluation.registry import TASKS

    ade20k, coco, imagenet = (TASKS[t].num_classes for t in ("ade20k", "coco", "finetune"))  # the specs' counts
    assert (ade20k, coco, imagenet) == (150, 80, 1000)
    name = dataset_name("ade20k", "/data/mydata", 11, benchmark_classes=ade20k)
    assert name == "ade20k-layout:mydata (11 classes)" and is_custom_dataset(name)
    assert dataset_name("ade20k", "/data/ADEChallengeData2016", 150, benchmark_classes=ade20k) == "ade20k"
    assert dataset_name("ade20k", None, 11, benchmark_classes=ade20k) == "ade20k (toy)"
    shapes = dataset_name("coco", "/d/shapes", 3, "categories", benchmark_classes=coco)
    assert shapes == "coco-layout:shapes (3 categories)"
    assert dataset_name("imagefolder", "/d/in100", 100, benchmark_classes=imagenet) == "imagefolder:in100 (100 classes)"
    rows = real_rows + [row("mae-800ep", "ade20k", "upernet_ss", "mIoU", 71.0, name, "vit_base_patch16")]
    tables = build_tables(rows)
    ade = table(tables, "ade20k")  # the benchmark's table: the ADE20K-150 row beside the paper's
    assert [r.cells[0].value for r in ade.blocks["ours"]] == [47.0] and ade.blocks["paper"]
    own = table(tables, "ade20k_ade20k_layout_mydata_11_classes")
    assert set(own.blocks) == {"ours"} and [r.cells[0].value for r in own.blocks["ours"]] == [71.0]
    assert own.title == "ADE20K semantic segmentation (UperNet), on ade20k-layout:mydata (11 classes)"
    md = to_markdown(own)
    assert "(paper)" not in md and "not the benchmark's dataset" in md and "| ade20k-layout:mydata (11 classes) |" in md
    assert "Table 5" not in md and "(paper)" not in to_csv(own)
