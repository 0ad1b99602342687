"""prep.samples: the competition tables -> samples in a fixed order; bad rows -> named error rows; bad tables raise."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from cache.rsna import LABEL_COLUMNS, label_column
from prep.config import PrepConfig, parse_conditions, parse_windows
from prep.samples import TableError, read_samples

SCS, LNF = "Spinal Canal Stenosis", "Left Neural Foraminal Narrowing"
COORD_HEADER = "study_id,series_id,instance_number,condition,level,x,y"


def _tables(tmp: Path, coords: list[str], labels: dict[int, dict[str, str]] | None = None,
            series: list[str] | None = None) -> Path:
    labels = labels if labels is not None else {10: {}, 20: {}}
    rows = [{"study_id": s, **{c: cells.get(c, "") for c in LABEL_COLUMNS}} for s, cells in labels.items()]
    pd.DataFrame(rows, columns=["study_id", *LABEL_COLUMNS]).to_csv(tmp / "train.csv", index=False)
    if series is None:
        series = ["10,100,Sagittal T2/STIR", "10,101,Sagittal T1", "20,200,Sagittal T2/STIR"]
    (tmp / "train_series_descriptions.csv").write_text(
        "study_id,series_id,series_description\n" + "\n".join(series) + "\n")
    (tmp / "train_label_coordinates.csv").write_text(COORD_HEADER + "\n" + "\n".join(coords) + "\n")
    return tmp


def test_samples_in_deterministic_order_with_labels(tmp_path):
    d = _tables(tmp_path, ["20,200,3,Spinal Canal Stenosis,L1/L2,5,6", f"10,101,2,{LNF},L5/S1,1.5,2.5",
                           "10,100,7,Spinal Canal Stenosis,L4/L5,30,40"],
                labels={10: {label_column(SCS, "L4/L5"): "Severe", label_column(LNF, "L5/S1"): "Moderate"}, 20: {}})
    samples, errors = read_samples(d, PrepConfig())
    assert errors.empty
    assert samples[["study_id", "condition", "level"]].values.tolist() == [
        [10, SCS, "L4/L5"], [10, LNF, "L5/S1"], [20, SCS, "L1/L2"]]
    assert samples.row.tolist() == [0, 1, 2] and samples.label.tolist()[:2] == [2, 1]
    assert pd.isna(samples.label[2])  # an empty label cell: a sample without a label, not an error
    assert samples.series_description.tolist() == ["Sagittal T2/STIR", "Sagittal T1", "Sagittal T2/STIR"]
    only = read_samples(d, PrepConfig(conditions=(LNF,), studies=1))[0]
    assert only[["study_id", "condition"]].values.tolist() == [[10, LNF]]


def test_bad_rows_become_error_rows_naming_file_and_line(tmp_path):
    d = _tables(tmp_path, [
        "10,100,7,Spinal Canal Stenosis,L4/L5,30,40",   # line 2: good
        "../10,100,7,Spinal Canal Stenosis,L3/L4,1,1",  # 3: path-like id
        "10,100,7.5,Spinal Canal Stenosis,L3/L4,1,1",   # 4: non-integer instance
        "10,100,7,Spinal Stenosis,L3/L4,1,1",           # 5: unknown condition
        "10,100,7,Spinal Canal Stenosis,L6/L7,1,1",     # 6: unknown level
        "10,100,7,Spinal Canal Stenosis,L2/L3,nan,1",   # 7: NaN coordinate
        "10,100,7,Spinal Canal Stenosis,L4/L5,31,41",   # 8: duplicate of line 2
        "99,100,7,Spinal Canal Stenosis,L4/L5,1,1",     # 9: study not in train.csv
        "10,555,7,Spinal Canal Stenosis,L1/L2,1,1",     # 10: series not in the descriptions
        "20,201,7,Spinal Canal Stenosis,L1/L2,1,1",     # 11: series with an unknown description
    ], labels={10: {label_column(LNF, "L5/S1"): "Moderate", label_column(SCS, "L2/L3"): "Severe",
                    label_column(SCS, "L1/L2"): "Severe"},
               20: {label_column(SCS, "L1/L2"): "Sometimes"}},
        series=["10,100,Sagittal T2/STIR", "20,201,Sagittal T3"])
    samples, errors = read_samples(d, PrepConfig())
    assert samples[["study_id", "level"]].values.tolist() == [[10, "L4/L5"]]
    got = dict(zip(errors.path, errors.reason))
    c = "train_label_coordinates.csv"
    assert "'../10' not a non-negative integer id" in got[f"{c}:3"]
    assert "instance_number '7.5'" in got[f"{c}:4"]
    assert got[f"{c}:5"] == "unknown condition 'Spinal Stenosis'"
    assert got[f"{c}:6"] == "unknown level 'L6/L7'"
    assert "not a finite number" in got[f"{c}:7"]
    assert got[f"{c}:8"].startswith("duplicate coordinate") and "line 2" in got[f"{c}:8"]
    assert got[f"{c}:9"] == "study 99 is not in train.csv"
    assert "not in train_series_descriptions.csv" in got[f"{c}:10"]
    assert got[f"{c}:11"].startswith("unknown series description 'Sagittal T3'")
    # train.csv line 2 = study 10: its foraminal L5/S1 label has no coordinate row; canal L2/L3 has a bad one and
    # canal L1/L2 is explained by the row with an unknown level (line 6): both reported once, by their rows
    assert got["train.csv:2"] == "label 'Moderate' without coordinates"
    assert (errors.stage == "tables").all() and len(errors) == 10
    assert errors.loc[errors.path == f"{c}:3", "study_id"].isna().all()  # an invalid id is never coerced


def test_unknown_label_string_is_an_error_row(tmp_path):
    d = _tables(tmp_path, ["20,200,3,Spinal Canal Stenosis,L1/L2,5,6"],
                labels={10: {}, 20: {label_column(SCS, "L1/L2"): "Mild"}})
    samples, errors = read_samples(d, PrepConfig())
    assert samples.empty and errors.path.tolist() == ["train.csv:3"] and "unknown label 'Mild'" in errors.reason[0]


@pytest.mark.parametrize("breakage, message", [("empty", "empty file"), ("header", "wrong header"),
                                               ("missing", "missing file")])
def test_broken_tables_raise_naming_the_file(tmp_path, breakage, message):
    d = _tables(tmp_path, ["10,100,7,Spinal Canal Stenosis,L4/L5,30,40"])
    coords = d / "train_label_coordinates.csv"
    if breakage == "empty":
        coords.write_text("")
    elif breakage == "header":
        coords.write_text("study,series,instance,condition,level,x,y\n1,2,3,a,b,1,1\n")
    else:
        coords.unlink()
    with pytest.raises(TableError, match=message) as e:
        read_samples(d, PrepConfig())
    assert e.value.path.endswith("train_label_coordinates.csv")


def test_test_split_uses_the_users_coordinates(tmp_path):
    (tmp_path / "test_series_descriptions.csv").write_text("study_id,series_id,series_description\n7,70,Axial T2\n")
    coords = tmp_path / "mine.csv"
    coords.write_text(COORD_HEADER + "\n7,70,4,Left Subarticular Stenosis,L4/L5,10,11\n"
                      "8,80,4,Left Subarticular Stenosis,L4/L5,10,11\n")
    with pytest.raises(TableError, match="coordinates"):
        read_samples(tmp_path, PrepConfig(split="test"))
    samples, errors = read_samples(tmp_path, PrepConfig(split="test", coords=str(coords)))
    assert samples[["study_id", "series_description"]].values.tolist() == [[7, "Axial T2"]]
    assert samples.label.isna().all()
    assert errors.reason.tolist() == ["series 80 of study 8 is not in test_series_descriptions.csv"]
    from prep.samples import split_studies
    assert split_studies(tmp_path, "test") == [7]  # the test set, as predict needs it: from the series table


def test_a_wrong_data_folder_is_named_as_such(tmp_path):
    with pytest.raises(TableError, match="no such folder"):
        read_samples(tmp_path / "dta", PrepConfig())
    (tmp_path / "zarr.json").write_text("{}")  # a crop cache given where the data folder goes
    with pytest.raises(TableError, match="this is an lsdc crop cache"):
        read_samples(tmp_path, PrepConfig())


def test_config_round_trip_and_parsing():
    cfg = PrepConfig(conditions=parse_conditions("foraminal,spinal_canal_stenosis"),
                     windows=parse_windows("a:10:90,b:1:99,c:0:100"), crop_base_mm=25.0, crop_scale=1.0)
    assert cfg.conditions == (SCS, LNF, "Right Neural Foraminal Narrowing")
    assert PrepConfig.from_dict(cfg.to_dict()) == cfg and cfg.half_size_mm == 25.0
    assert replace(cfg, slices=5).to_dict() != cfg.to_dict()
    with pytest.raises(ValueError, match="unknown condition"):
        parse_conditions("knee")
    with pytest.raises(ValueError, match="percentiles"):
        parse_windows("a:90:10,b:1:99,c:0:100")
    with pytest.raises(ValueError, match="odd"):
        PrepConfig(slices=4)
