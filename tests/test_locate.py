"""The localisers: they really learn (through the one loop), `lsdc locate` writes train_label_coordinates.csv's columns
from DICOMs alone, a study without Sagittal T1 gets no foraminal rows and a logged reason, one with two series of a
description says which it used, axial levels find their sub-stack, and left/right is never swapped silently."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from cache.volumes import open_volumes
from prep.config import VolumeConfig
from prep.synth import synth
from prep.volumes import build_volumes
from train.config import LocateConfig
from train.loop import fit

TINY = dict(backbone="test_efficientnet", pretrained=False, device="cpu", workers=0, channels_last=False,
            batch_size=4, folds=3, fold=0, lr_backbone=3e-3, lr_head=3e-3, warmup_epochs=0.5)


@pytest.fixture(scope="module")
def locator(tmp_path_factory):
    """A tiny dataset, its volumes and three localisers trained for a few epochs (~40 s on 2 cores)."""
    root = tmp_path_factory.mktemp("locate")
    synth(root / "d", studies=12, seed=21, image_size=(64, 96), difficulty=0.1, workers=1, progress=False)
    build_volumes(root / "d", root / "v", VolumeConfig(grid=64), workers=1, scheduler="synchronous", progress=False)
    torch.set_num_threads(2)
    for target, epochs in (("spinal", 15), ("foraminal", 2), ("subarticular", 2)):
        fit(root / "v", root / "loc" / target, LocateConfig(target=target, epochs=epochs, **TINY))
    return root


def test_a_short_run_really_learns(locator):
    records = [json.loads(ln) for ln in (locator / "loc" / "spinal" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(epochs) == 15  # 8 training volumes of 64 cells, 15 epochs: ~10 s
    assert epochs[-1]["val_loss"] < 0.6 * epochs[0]["val_loss"]
    assert epochs[-1]["train_loss"] < 0.6 * epochs[0]["train_loss"]
    assert max(e["point_mm_median"] for e in epochs[-2:]) < 0.6 * epochs[0]["point_mm_median"]  # the points close in
    assert min(e["level_identity"] for e in epochs[-2:]) > epochs[0]["level_identity"] + 0.2
    metrics = json.loads((locator / "loc" / "spinal" / "locate_metrics.json").read_text())
    assert metrics["spinal"]["n"] > 0 and 0 <= metrics["spinal"]["slice_within_1"] <= 1
    assert "| spinal |" in (locator / "loc" / "spinal" / "report.md").read_text()
    oof = pd.read_parquet(locator / "loc" / "spinal" / "oof.parquet")
    assert list(oof.columns[:8]) == ["study_id", "series_id", "instance_number", "condition", "level", "x", "y",
                                     "confidence"]


def test_locate_from_dicoms_alone(locator, tmp_path):
    from lsdc.locate import locate

    data = tmp_path / "d"
    shutil.copytree(locator / "d", data)
    (data / "test_label_coordinates.csv").unlink()  # no coordinates anywhere: only the images
    series = pd.read_csv(data / "test_series_descriptions.csv")
    studies = sorted(series["study_id"].unique())
    assert len(studies) >= 1
    # the first test study loses its Sagittal T1; a copy of its Sagittal T2/STIR becomes a second such series
    s0 = series[series["study_id"] == studies[0]]
    t1 = s0[s0["series_description"] == "Sagittal T1"].iloc[0]
    t2 = s0[s0["series_description"] == "Sagittal T2/STIR"].iloc[0]
    shutil.rmtree(data / "test_images" / str(studies[0]) / str(t1.series_id))
    series = series[series["series_id"] != t1.series_id]
    copy = data / "test_images" / str(studies[0]) / "1"
    shutil.copytree(data / "test_images" / str(studies[0]) / str(t2.series_id), copy)
    for f in list(copy.glob("*.dcm"))[:3]:  # fewer slices: the original (more slices) is the one to use
        f.unlink()
    series = pd.concat([series, pd.DataFrame([{"study_id": studies[0], "series_id": 1,
                                               "series_description": "Sagittal T2/STIR"}])])
    series.to_csv(data / "test_series_descriptions.csv", index=False)

    coords, log = locate(locator / "loc", data, "test", tmp_path / "coords.csv", workers=1, scheduler="synchronous",
                         device="cpu", progress=False)
    written = pd.read_csv(tmp_path / "coords.csv")
    assert list(written.columns) == ["study_id", "series_id", "instance_number", "condition", "level", "x", "y",
                                     "confidence"]
    assert len(written) == len(coords) and written["confidence"].between(0, 1).all()
    first = written[written["study_id"] == studies[0]]
    assert not first["condition"].str.contains("Foraminal").any()
    assert set(first.loc[first["condition"] == "Spinal Canal Stenosis", "series_id"]) == {t2.series_id}
    missing = log[(log["study_id"] == studies[0]) & (log["what"] == "missing")]
    assert len(missing) == 10 and (missing["reason"] == "no Sagittal T1 series").all()
    chosen = log[(log["study_id"] == studies[0]) & (log["what"] == "chosen")]
    assert len(chosen) == 1 and f"used {studies[0]}_{t2.series_id}_0" in chosen["reason"].iat[0]
    for study in studies[1:]:  # complete studies: all 25 condition-levels, each on its own series' instances
        rows = written[written["study_id"] == study]
        assert len(rows) == 25 and not rows.duplicated(["condition", "level"]).any()
    # every point is a real pixel of a real slice of the series it names
    volumes = open_volumes(tmp_path / "coords_volumes")
    for r in written.itertuples():
        vol = volumes.index[volumes.index["series_id"] == r.series_id]
        assert any(r.instance_number in list(n) for n in vol["instance_numbers"])
        assert 0 <= r.x < vol["ref_cols"].max() + 1 and 0 <= r.y < vol["ref_rows"].max() + 1
    # a rerun reuses the volumes
    chunk = next((tmp_path / "coords_volumes" / "volumes").rglob("c.0.0.0"))
    stamp = chunk.stat().st_mtime_ns
    again, _ = locate(locator / "loc", data, "test", tmp_path / "coords.csv", workers=1, scheduler="synchronous",
                      device="cpu", progress=False)
    assert chunk.stat().st_mtime_ns == stamp and again.equals(coords)


def test_each_level_finds_its_axial_sub_stack():
    from train.locator import nearest_axial
    from prep_fixtures import AXIAL

    def row(key, series, z0, tilt, n=5):
        o = np.array([1.0, 0, 0, 0, np.cos(tilt), np.sin(tilt)])
        normal = np.cross(o[:3], o[3:])
        pos = [np.array([-20.0, -20.0, z0]) + k * 4.0 * normal for k in range(n)]
        return dict(key=key, study_id=1, series_id=series, series_description="Axial T2", stack=0, n_slices=n,
                    grid=64, instance_numbers=list(range(1, n + 1)), positions=[float(v) for p in pos for v in p],
                    orientations=list(o) * n, spacings=[0.6, 0.6] * n, ref_slice=n // 2, ref_rows=64, ref_cols=64,
                    scale_x=1.0, offset_x=0.0, scale_y=1.0, offset_y=0.0)

    assert AXIAL[:3] == (1.0, 0.0, 0.0)
    index = pd.DataFrame([row("1_7_0", 7, 0.0, 0.0), row("1_7_1", 7, 60.0, np.deg2rad(15))])
    vol, k, dist = nearest_axial(index, 1, np.array([0.0, -5.0, 8.5]))
    assert (vol, k) == (0, 2) and dist == pytest.approx(0.5)
    tilted = np.array([-20.0, -20.0, 60.0]) + 3 * 4.0 * np.cross([1, 0, 0], [0, np.cos(0.26), np.sin(0.26)])
    vol, k, _ = nearest_axial(index, 1, tilted + np.array([0, 2.0, 0]))
    assert (vol, k) == (1, 3)
    assert nearest_axial(index, 1, np.array([0.0, 0.0, 200.0])) is None  # no axial slice reaches this level


def test_left_and_right_are_never_swapped_silently(caplog):
    from train.locator import _side_checked

    row = dict(key="1_2_0", study_id=1, series_id=2, series_description="Axial T2", stack=0, n_slices=1, grid=32,
               instance_numbers=[1], positions=[0.0, 0.0, 0.0], orientations=[1.0, 0, 0, 0, 1.0, 0],
               spacings=[1.0, 1.0],
               ref_slice=0, ref_rows=32, ref_cols=32, scale_x=1.0, offset_x=0.0, scale_y=1.0, offset_y=0.0)
    index = pd.DataFrame([row])
    left = dict(study_id=1, series_id=2, instance_number=1, condition="Left Subarticular Stenosis", level="L4/L5",
                x=5.0, y=10.0, confidence=0.9)  # x = 5 mm: to the patient's right of x = 25 mm
    right = dict(left, condition="Right Subarticular Stenosis", x=25.0)
    with caplog.at_level("WARNING"):
        rows = _side_checked([dict(left), dict(right)], index, 0)
    assert [r["condition"] for r in rows] == ["Right Subarticular Stenosis", "Left Subarticular Stenosis"]
    assert "mirrored" in caplog.text
    rows = _side_checked([dict(left, x=25.0), dict(right, x=5.0)], index, 0)
    assert [r["condition"] for r in rows] == ["Left Subarticular Stenosis", "Right Subarticular Stenosis"]


def test_predict_from_dicoms_alone_matches_the_sample_submission(locator, tmp_path):
    from lsdc.locate import predict_from_dicoms, work_dir
    from prep.build import build
    from prep.config import PrepConfig
    from train.config import TrainConfig
    from train.predict import missing_log

    build(locator / "d", tmp_path / "crops", PrepConfig(size=32, crop_scale=1.0, crop_base_mm=20.0), workers=1,
          scheduler="synchronous", progress=False)
    fit(tmp_path / "crops", tmp_path / "grader", TrainConfig(
        conditions=("all",), backbone="test_efficientnet", pretrained=False, epochs=1, folds=3, fold=0, batch_size=16,
        workers=0, swa_start=None, freeze_epochs=0, channels_last=False, device="cpu", in_memory=False))
    data = tmp_path / "d"
    shutil.copytree(locator / "d", data)
    (data / "test_label_coordinates.csv").unlink()
    series = pd.read_csv(data / "test_series_descriptions.csv")
    study = int(series["study_id"].min())
    t1 = series[(series["study_id"] == study) & (series["series_description"] == "Sagittal T1")].iloc[0]
    shutil.rmtree(data / "test_images" / str(study) / str(t1.series_id))  # its folder gone, still in the table

    out = tmp_path / "sub.csv"
    sub = predict_from_dicoms([tmp_path / "grader"], locator / "loc", data, out, "test",
                              data / "sample_submission.csv", "cpu", workers=1, scheduler="synchronous",
                              progress=False)
    sample = pd.read_csv(data / "sample_submission.csv")
    assert pd.read_csv(out)["row_id"].tolist() == sample["row_id"].tolist() == sub["row_id"].tolist()
    missing = pd.read_csv(missing_log(out))
    foraminal = missing[missing["row_id"].str.startswith(f"{study}_") & missing["condition"].str.contains("Foraminal")]
    assert len(foraminal) == 10 and foraminal["reason"].str.startswith("not located: no Sagittal T1").all()
    assert {"coords.csv", "coords_log.csv", "coords_volumes", "crops"} <= {p.name for p in work_dir(out).iterdir()}
    chunk = next((work_dir(out) / "crops" / "crops").glob("c.*"))
    stamp = chunk.stat().st_mtime_ns
    again = predict_from_dicoms([tmp_path / "grader"], locator / "loc", data, out, "test",
                                data / "sample_submission.csv", "cpu", workers=1, scheduler="synchronous",
                                progress=False)
    assert chunk.stat().st_mtime_ns == stamp and again.equals(sub)  # the intermediates were reused


def test_docs_list_every_localiser_setting_as_the_dataclass_says():
    from pathlib import Path

    from train.config import settings_markdown

    docs = (Path(__file__).resolve().parents[1] / "docs" / "locate.md").read_text()
    assert f"<!-- settings:start -->\n{settings_markdown(LocateConfig)}<!-- settings:end -->" in docs, \
        "docs/locate.md's settings table is stale: paste train.config.settings_markdown(LocateConfig) there"


def _sagittal_row(n: int = 3, grid: int = 32, mm: float = 4.0) -> dict:
    """A sagittal volume's index row: columns run posterior (+y), rows run down (-z), slices 10 mm apart in x."""
    o = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    return dict(key="1_3_0", study_id=1, series_id=3, series_description="Sagittal T1", stack=0, n_slices=n,
                grid=grid, instance_numbers=list(range(1, n + 1)),
                positions=[float(v) for k in range(n) for v in (10.0 * (k - 1), 0.0, 0.0)], orientations=o * n,
                spacings=[mm, mm] * n, ref_slice=n // 2, ref_rows=grid, ref_cols=grid, scale_x=1.0, offset_x=0.0,
                scale_y=1.0, offset_y=0.0)


def test_the_foramina_are_anchored_on_the_canal_levels():
    # a foraminal heatmap that prefers the disc above (the off-by-one level error) is pulled back to its own level
    # by the canal points, which the spinal localiser places with the most reliable level identity
    from cache.rsna import LEVELS
    from cache.volumes import geometry_of
    from train.locate import POINTS
    from train.locator import LEVEL_PRIOR_MM, Localisers, level_prior

    geo = geometry_of(pd.Series(_sagittal_row()))
    canal = {lv: np.array([0.0, 64.0, -16.0 - 24.0 * i]) for i, lv in enumerate(LEVELS)}  # discs 24 mm apart
    channels = POINTS["foraminal"]
    prior = level_prior(geo, canal, channels)
    c = channels.index(("Left Neural Foraminal Narrowing", "L3/L4"))
    k, _, u, v = geo.nearest(canal["L3/L4"])
    assert prior[c, k, round(v), round(u)] == pytest.approx(0, abs=1e-3)
    k, _, u, v = geo.nearest(canal["L2/L3"])  # one level up: -1/2 (24 / sigma)^2
    assert prior[c, k, round(v), round(u)] == pytest.approx(-0.5 * (24 / LEVEL_PRIOR_MM) ** 2, rel=0.02)
    assert level_prior(geo, {lv: p for lv, p in canal.items() if lv != "L5/S1"}, channels) is None

    class Heatmaps(torch.nn.Module):  # stride-4 logits of a 32-cell volume: 8 x 8 cells per slice
        def forward(self, x):
            out = torch.zeros(1, len(channels), 3, 8, 8)
            out[0, c, 1, 2, 4] = 6.0  # the disc above (pixel row ~9.5): the stronger peak
            out[0, c, 1, 4, 4] = 4.5  # its own disc (pixel row ~17.5)
            return out

    loc = Localisers.__new__(Localisers)
    loc.cfg, loc.models, loc.device = LocateConfig(target="foraminal"), [Heatmaps()], torch.device("cpu")
    volume = np.zeros((3, 32, 32), np.uint8)
    _, _, v_plain, _ = loc.predict(volume)
    _, _, v_anchored, _ = loc.predict(volume, prior=prior)
    assert v_plain[c] == pytest.approx(9.5, abs=1) and v_anchored[c] == pytest.approx(17.5, abs=1)
