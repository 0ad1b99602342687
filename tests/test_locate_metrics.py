"""Localisation figures in millimetres: the true points score perfectly; a shift, a wrong slice and a swapped level
are each measured as what they are."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cache.volumes import open_volumes
from prep.config import VolumeConfig
from prep.synth import synth
from prep.volumes import build_volumes
from train.locate_metrics import localisation_metrics, metrics_markdown, pair_points


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("locate_metrics")
    synth(root / "d", studies=3, seed=11, image_size=(64, 96), workers=1, progress=False)
    build_volumes(root / "d", root / "v", VolumeConfig(grid=32), workers=1, scheduler="synchronous", progress=False)
    return open_volumes(root / "v"), pd.read_csv(root / "d" / "train_label_coordinates.csv")


def test_the_truth_scores_perfectly(data):
    volumes, truth = data
    m = localisation_metrics(truth, truth, volumes.index)
    for group in ("spinal", "foraminal", "subarticular"):
        s = m[group]
        assert s["n"] > 0 and s["slice_exact"] == 1 and s["point_mm_max"] < 1e-6 and s["level_identity"] == 1
    assert m["subarticular"]["axial_assignment"] == 1 and m["n_missing"] == 0


def test_a_given_axial_slice_reports_no_slice_figures(data):
    # the subarticular localiser is validated on the true axial slices: "slice exact 1.000" would be a fake figure
    volumes, truth = data
    m = localisation_metrics(truth, truth, volumes.index, axial_slice_given=True)
    s = m["subarticular"]
    assert s["slice_given"] and not {"slice_exact", "slice_within_1", "axial_assignment"} & set(s)
    assert s["point_mm_max"] < 1e-6 and m["spinal"]["slice_exact"] == 1
    row = next(line for line in metrics_markdown(m) if line.startswith("| subarticular"))
    assert row.split("|")[3:5] == [" given ", " given "] and row.split("|")[9] == " given "


def test_a_shift_a_slice_and_a_level_are_each_measured(data):
    volumes, truth = data
    spinal = truth["condition"].eq("Spinal Canal Stenosis")
    pred = truth.copy()
    pred.loc[spinal, "y"] += 3  # 3 px along the column direction
    pairs = pair_points(pred, truth, volumes.index)
    for r in pairs[pairs["condition"].eq("Spinal Canal Stenosis")].itertuples():
        geo = volumes.geometry(r.vol)
        assert r.point_mm == pytest.approx(3 * geo.spacings[r.k][0], rel=1e-6)  # 3 rows of PixelSpacing[0] mm
    m = localisation_metrics(pred, truth, volumes.index)
    assert m["foraminal"]["point_mm_max"] < 1e-6  # untouched groups stay perfect

    pred = truth.copy()
    row = truth.index[truth["condition"].eq("Left Neural Foraminal Narrowing")][0]
    series = volumes.index[volumes.index["series_id"] == truth.at[row, "series_id"]].iloc[0]
    numbers = list(series["instance_numbers"])
    k = numbers.index(truth.at[row, "instance_number"])
    pred.at[row, "instance_number"] = numbers[k + 1 if k + 1 < len(numbers) else k - 1]
    m = localisation_metrics(pred, truth, volumes.index)
    n = m["foraminal"]["n"]
    assert m["foraminal"]["slice_exact"] == pytest.approx((n - 1) / n) and m["foraminal"]["slice_within_1"] == 1

    pred = truth.copy()
    swap = {"L1/L2": "L2/L3", "L2/L3": "L1/L2"}
    pred.loc[spinal, "level"] = pred.loc[spinal, "level"].map(lambda lv: swap.get(lv, lv))
    m = localisation_metrics(pred, truth, volumes.index)
    assert m["spinal"]["level_identity"] == pytest.approx(3 / 5)  # two of five levels swapped in every study
    assert "| spinal |" in "\n".join(metrics_markdown(m))


def test_missing_predictions_are_counted_not_scored(data):
    volumes, truth = data
    m = localisation_metrics(truth.iloc[5:], truth, volumes.index)
    assert m["n_missing"] == 5 and np.isfinite(m["spinal"]["point_mm_median"])
