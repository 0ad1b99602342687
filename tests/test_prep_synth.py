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
