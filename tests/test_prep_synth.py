"""prep on the project's synthetic data: every coordinate becomes a sample, the test split builds from its
coordinates CSV, and `--faults` data gives exactly the documented error rows with every good sample unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import cache
from prep.build import build
from prep.config import PrepConfig
from prep.synth import synth

CFG = PrepConfig(size=48)
SYNTH = dict(studies=2, seed=5, image_size=(64, 96), progress=False)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synth")
    synth(root / "data", **SYNTH)
    build(root / "data", root / "cache", CFG, scheduler="synchronous")
    return root / "data", root / "cache"


def test_every_synthetic_coordinate_becomes_a_sample(clean):
    data, out = clean
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    c = cache.open(out)
    assert len(c) == len(coords) and c.errors.empty
    got = set(zip(c.index.study_id, c.index.condition, c.index.level, c.index.instance_number))
    assert got == set(zip(coords.study_id, coords.condition, coords.level, coords.instance_number))
    assert (c.index.ordering == "position").all()
    assert c.index.half_size_mm.eq(CFG.half_size_mm).all()
    # crops of different pixel spacings cover the same millimetres
    px_mm = c.index.half_size_px * c.index.pixel_spacing_col
    assert ((px_mm - CFG.half_size_mm).abs() <= c.index.pixel_spacing_col).all()


def test_synthetic_test_split_builds_from_its_coordinates(clean, tmp_path):
    data, _ = clean
    coords = data / "test_label_coordinates.csv"
    result = build(data, tmp_path / "t", PrepConfig(size=48, split="test", coords=str(coords)),
                   scheduler="synchronous")
    c = cache.open(tmp_path / "t")
    assert result.built == len(pd.read_csv(coords)) == len(c) and c.index.label.isna().all()


def _matches(err, fault) -> bool:
    """An error row belongs to a fault when study and stage agree and it names one of the fault's samples (or,
    for a row about a file, the fault's file)."""
    if err.stage != fault["stage"] or (pd.notna(err.study_id) and int(err.study_id) != fault["study_id"]):
        return False
    if pd.isna(err.condition) and pd.isna(err.level):
        return fault["path"] is not None and (err.path.endswith(fault["path"]) or fault["path"] in err.path)
    if pd.isna(err.condition) or pd.isna(err.level):  # the table's value was invalid: the row quotes it
        return fault["reason"] in err.reason
    return any(err.condition == c and err.level == lv for c, lv in fault["rows"])


def test_faults_give_exactly_the_expected_errors_and_good_samples_are_unchanged(clean, tmp_path):
    _, clean_cache = clean
    synth(tmp_path / "data", **SYNTH, faults=True)
    faults = json.loads((tmp_path / "data" / "faults.json").read_text())["faults"]
    result = build(tmp_path / "data", tmp_path / "cache", CFG, scheduler="synchronous")
    c, ref = cache.open(tmp_path / "cache"), cache.open(clean_cache)
    errors = c.errors
    bad = [f for f in faults if f["expect"] == "error"]
    # every error row is explained by a documented fault, and every documented fault produced its rows
    owners = [[f["kind"] for f in bad if _matches(e, f)] for e in errors.itertuples()]
    assert all(len(o) == 1 for o in owners), [(e.reason, o) for e, o in zip(errors.itertuples(), owners) if len(o) != 1]
    for f in bad:  # one row per sample the fault touches, naming it
        hits = [e for e, o in zip(errors.itertuples(), owners) if o == [f["kind"]]]
        assert len(hits) == len(f["rows"]), (f["kind"], [h.reason for h in hits])
        named = {(e.condition if pd.notna(e.condition) else c, e.level if pd.notna(e.level) else lv)
                 for e, (c, lv) in zip(hits, f["rows"])}
        assert named == {tuple(r) for r in f["rows"]}, f["kind"]
    assert len(errors) == sum(len(f["rows"]) for f in bad)
    # faults that are valid DICOM or table quirks: every sample built
    built = set(zip(c.index.study_id, c.index.condition, c.index.level))
    for f in faults:
        if f["expect"] == "ok":
            assert {(f["study_id"], cnd, lv) for cnd, lv in f["rows"]} <= built, f["kind"]
    ordering = c.index.set_index(["study_id", "series_id"]).ordering
    geo = next(f for f in faults if f["kind"] == "missing_position_orientation")
    assert (ordering.loc[(geo["study_id"], geo["series_id"])] == "instance_number").all()
    empty = next(f for f in faults if f["kind"] == "empty_label_cell")
    assert c.index.set_index(["study_id", "condition", "level"]).label.loc[
        (empty["study_id"], *empty["rows"][0])] is pd.NA
    # the clean studies: bit-identical samples
    key = ["study_id", "condition", "level"]
    merged = ref.index.merge(c.index, on=key, suffixes=("_clean", "_faults"))
    assert len(merged) == len(ref) and (merged.checksum_clean == merged.checksum_faults).all()
    assert result.exit_code() == 0 and result.exit_code(strict=True) == 1
