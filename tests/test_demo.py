"""`lsdc demo` wiring: every stage runs, the report and the submission hold real figures (tiny settings)."""

from __future__ import annotations

import json

import pandas as pd

from cache.rsna import PROB_COLUMNS
from lsdc.demo import DemoConfig, run_demo


def test_demo_runs_every_stage_and_reports_real_figures(tmp_path):
    cfg = DemoConfig(studies=5, epochs=2, image_size=(64, 96), crop_size=32, backbone="test_efficientnet", workers=1)
    figures = run_demo(tmp_path, cfg)

    assert [t["stage"] for t in figures["timings"]] == [
        "synth", "prep (train split)", "prep (test split)", "train", "evaluate", "predict"]
    assert 0.0 <= figures["best_ba"] <= 1.0 and figures["oof_score"] > 0
    sub = pd.read_csv(tmp_path / "submission.csv")
    sample = pd.read_csv(tmp_path / "data" / "sample_submission.csv")
    assert sub["row_id"].tolist() == sample["row_id"].tolist() and len(sub) == figures["submission_rows"]
    assert (sub[list(PROB_COLUMNS)].sum(axis=1) - 1).abs().max() < 1e-6
    report = (tmp_path / "demo_report.md").read_text()
    assert f"{figures['best_ba']:.3f}" in report and "nan" not in report
    assert json.loads((tmp_path / "demo_config.json").read_text())["studies"] == 5
    assert (tmp_path / "run" / "report.md").exists() and (tmp_path / "run" / "plots" / "confusion.png").exists()
