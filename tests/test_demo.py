"""`lsdc demo` wiring: every stage runs, the report and the submission hold real figures (tiny settings)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from cache.io import read_jsonl
from cache.rsna import PROB_COLUMNS
from lsdc.cli import app
from lsdc.demo import DemoConfig, DemoSettingsDiffer, run_demo


TINY_LOC = dict(volume_grid=32, locator_backbone="test_efficientnet", locator_epochs=1)  # seconds, not minutes


def test_demo_runs_every_stage_and_reports_real_figures(tmp_path):
    # small but learnable: 16 clean studies (difficulty 0), 10 epochs of a tiny backbone, ~30 s on 2 cores
    # (v8's training: the slice-shift training learns more slowly than 10 epochs allow; the rerun test below runs it)
    cfg = DemoConfig(**TINY_LOC, studies=16, epochs=10, image_size=(64, 96), crop_size=32,
                     backbone="test_efficientnet", workers=1, difficulty=0.0, lr=3e-3, slice_shift=0, jitter_mm=0.0)
    figures = run_demo(tmp_path, cfg)

    assert [t["stage"] for t in figures["timings"]] == [
        "synth", "prep (train split)", "prep-volumes (train split)", "train", "train localisers", "evaluate",
        "predict (located points)", "prep (test split, true points)", "predict (true points)"]
    # it really learns: chance is 1/3 (a model that predicts only Normal/Mild scores exactly 1/3), the first epoch
    # is near it, and the last three epochs are all well above it (not one lucky epoch)
    bas = [r["ba"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "epoch"]
    assert figures["best_ba"] >= 0.7 and bas[0] < 0.5 and min(bas[-3:]) >= 0.6, bas
    assert figures["oof_score"] > 0
    sub = pd.read_csv(tmp_path / "submission.csv")
    sample = pd.read_csv(tmp_path / "data" / "sample_submission.csv")
    assert sub["row_id"].tolist() == sample["row_id"].tolist() and len(sub) == figures["submission_rows"]
    assert (sub[list(PROB_COLUMNS)].sum(axis=1) - 1).abs().max() < 1e-6
    report = (tmp_path / "demo_report.md").read_text()
    assert f"{figures['best_ba']:.3f}" in report and "nan" not in report
    assert f"{figures['oracle_gap']:+.4f}" in report and figures["oracle_gap"] == pytest.approx(
        figures["test_score"] - figures["oracle_score"])
    assert "| spinal |" in report and figures["localisation"]["n_true"] > 0
    assert not (tmp_path / "submission_work" / "coords.csv").read_text().count("test_label")  # located, not read
    assert (tmp_path / "locator" / "spinal" / "fold0" / "best.pt").exists()
    assert json.loads((tmp_path / "demo_config.json").read_text())["studies"] == 16
    assert (tmp_path / "run" / "report.md").exists() and (tmp_path / "run" / "plots" / "confusion.png").exists()


def test_demo_rerun_continues_and_other_settings_are_refused(tmp_path):
    cfg = DemoConfig(**TINY_LOC, studies=5, epochs=1, image_size=(48, 64), crop_size=32,
                     backbone="test_efficientnet", workers=1)
    first = run_demo(tmp_path, cfg)
    # the demo's grader is trained for located points: 9-slice crops, 7 read around a centre moved by up to 1, mm jitter
    assert json.loads((tmp_path / "cache_train" / "manifest.json").read_text())["config"]["slices"] == 9
    trained = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (trained["slices"], trained["aug_slice_shift"], trained["aug_jitter_mm"]) == (7, 1, 2.0)
    dicom = next((tmp_path / "data" / "train_images").rglob("*.dcm"))
    checkpoint = tmp_path / "run" / "fold0" / "last.pt"
    stamps = dicom.stat().st_mtime_ns, checkpoint.stat().st_mtime_ns

    # `make demo` twice: the data is reused, the finished run is not retrained, the figures are the same.
    again = run_demo(tmp_path, DemoConfig(**{**cfg.__dict__, "workers": 2}))
    assert (dicom.stat().st_mtime_ns, checkpoint.stat().st_mtime_ns) == stamps
    assert again["timings"][0] == {"stage": "synth", "seconds": 0.0, "reused": True}
    assert again["best_ba"] == first["best_ba"] and again["oof_score"] == first["oof_score"]
    assert "| synth | reused |" in (tmp_path / "demo_report.md").read_text()

    with pytest.raises(DemoSettingsDiffer, match="epochs differ"):
        run_demo(tmp_path, DemoConfig(**{**cfg.__dict__, "epochs": 3}))
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--studies", "6"])
    assert res.exit_code == 2 and "other settings" in res.output and "studies" in res.output


def test_demo_rerun_with_another_spelling_of_out_and_after_an_early_failure(tmp_path, monkeypatch):
    cfg = DemoConfig(**TINY_LOC, studies=5, epochs=1, image_size=(48, 64), crop_size=32,
                     backbone="test_efficientnet", workers=1)
    monkeypatch.chdir(tmp_path)
    run_demo("demo", cfg)
    again = run_demo(tmp_path / "demo", cfg)  # the same folder, spelled absolute: its caches still match
    assert again["timings"][0]["reused"]

    # a demo that failed before writing anything does not pin its settings on the folder
    with pytest.raises(ValueError, match="studies"):
        run_demo(tmp_path / "early", DemoConfig(**TINY_LOC, studies=0))
    assert [p.name for p in (tmp_path / "early").iterdir()] == ["demo_config.json"]
    with pytest.raises(ValueError, match="image_size"):  # a new setting is taken, and fails on its own terms
        run_demo(tmp_path / "early", DemoConfig(**TINY_LOC, studies=1, image_size=(8, 8)))
