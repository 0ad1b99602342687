"""evaluate (score files, accuracy tables, temperature) and predict (row order, priors, missing log)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cache
from cache.rsna import CONDITIONS, LABEL_COLUMNS, LEVELS, PROB_COLUMNS, label_column, submission_row_ids
from train.evaluate import apply_temperature, evaluate, fit_temperature, read_temperature
from train.predict import (MISSING_LOG, PUBLISHED_MIX, assemble, checkpoint_config, condition_priors,
                           metric_optimal, predict, resolve_checkpoints, submission_rows)
from train.score import SCORE_KEYS, competition_score, labels_long, score_submission

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAMPLE = FIXTURES / "rsna_small" / "sample_submission.csv"
SAMPLE = SAMPLE if SAMPLE.exists() else FIXTURES / "sample_submission.csv"
PROBS = list(PROB_COLUMNS)
SPINAL, LEFT_FOR = CONDITIONS[0], CONDITIONS[1]


def oof_frame(n_studies: int = 40, seed: int = 0, sharpness: float = 3.0) -> pd.DataFrame:
    """Every condition-level of n studies; informative but overconfident probabilities (softmax(sharpness * z))."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame([(s, c, lv) for s in range(1000, 1000 + n_studies) for c in CONDITIONS for lv in LEVELS],
                      columns=["study_id", "condition", "level"])
    y = rng.choice(3, size=len(df), p=[0.7, 0.2, 0.1])
    z = 1.2 * np.eye(3)[y] + rng.normal(size=(len(df), 3))
    p = np.exp(sharpness * z)
    df[PROBS] = p / p.sum(axis=1, keepdims=True)
    df["label"] = pd.array(y, dtype="Int8")
    df["fold"] = df["study_id"] % 5
    df["row"] = np.arange(len(df))
    df["series_id"] = 7
    return df


def test_evaluate_writes_json_and_md(tmp_path):
    df = oof_frame()
    run = tmp_path / "run"
    run.mkdir()
    df.to_parquet(run / "oof.parquet")
    result = evaluate([run])  # a single run dir: the files go into it
    saved = json.loads((run / "score.json").read_text())
    expected = competition_score(df)
    for part in ("spinal", "foraminal", "subarticular", "any_severe_spinal", "score"):
        assert saved["score"][part] == pytest.approx(expected[part], rel=1e-12)
    md = (run / "score.md").read_text()
    for part in ("spinal", "foraminal", "subarticular", "any_severe_spinal"):
        assert f"| {part} | " in md
    assert f"{expected['score']:.4f}" in md
    # accuracy from the argmax, checked against a direct count
    spinal = df[df["condition"] == SPINAL]
    pred = spinal[PROBS].to_numpy().argmax(axis=1)
    y = spinal["label"].to_numpy(dtype=int)
    recall = [float((pred[y == k] == k).mean()) for k in range(3)]
    rep = result["per_condition"][SPINAL]
    assert list(rep["recall"].values()) == pytest.approx(recall)
    assert rep["balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert np.array(rep["confusion"]).sum() == len(spinal) and np.trace(rep["confusion"]) == (pred == y).sum()
    assert set(result["per_level"]) == set(LEVELS) and sum(r["n"] for r in result["per_level"].values()) == len(df)
    assert set(saved["per_fold"]) == {str(k) for k in range(5)}
    assert not (run / "temperature.json").exists()


def test_evaluate_labels_csv_and_pooled_runs(tmp_path):
    df = oof_frame(n_studies=10, seed=1)
    df.loc[df.index[:7], "label"] = pd.NA  # truth lives in the labels table, not in the OOF file
    truth = oof_frame(n_studies=10, seed=1)
    wide = truth.assign(col=[c for c in LABEL_COLUMNS] * 10).pivot(index="study_id", columns="col", values="label")
    wide = wide[list(LABEL_COLUMNS)].apply(lambda col: col.map({0: "Normal/Mild", 1: "Moderate", 2: "Severe"}))
    wide.reset_index().to_csv(tmp_path / "labels.csv", index=False)
    # two runs: spinal only, the rest; pooled they make the full score
    spinal = df["condition"] == SPINAL
    df[spinal].drop(columns="label").to_parquet(tmp_path / "spinal.parquet")
    df[~spinal].drop(columns="label").to_parquet(tmp_path / "rest.parquet")
    with pytest.raises(ValueError, match="labels_csv"):
        evaluate([tmp_path / "spinal.parquet"])
    only = evaluate([tmp_path / "spinal.parquet"], labels_csv=tmp_path / "labels.csv")
    assert only["score"]["partial"] and only["score"]["missing_parts"] == ["foraminal", "subarticular"]
    assert only["n_labelled_without_prediction"] == 10 * 20
    both = evaluate([tmp_path / "spinal.parquet", tmp_path / "rest.parquet"], labels_csv=tmp_path / "labels.csv",
                    out_dir=tmp_path / "out")
    assert both["score"]["score"] == pytest.approx(competition_score(truth)["score"], rel=1e-12)
    assert both["n_labelled_without_prediction"] == 0
    assert (tmp_path / "out" / "score.json").exists() and (tmp_path / "out" / "score.md").exists()


def test_temperature_scaling_fixes_overconfidence(tmp_path):
    df = oof_frame(n_studies=60, seed=2, sharpness=3.0)
    assert apply_temperature(df, {"spinal": 1.0})[PROBS].to_numpy() == pytest.approx(df[PROBS].to_numpy())
    t2 = apply_temperature(df, {"spinal": 2.0})
    p = df[PROBS].to_numpy()
    sp = (df["condition"] == SPINAL).to_numpy()
    expected = np.sqrt(p[sp]) / np.sqrt(p[sp]).sum(axis=1, keepdims=True)  # p^(1/T), renormalised
    assert t2[PROBS].to_numpy()[sp] == pytest.approx(expected)
    assert t2[PROBS].to_numpy()[~sp] == pytest.approx(p[~sp])  # other groups untouched

    temps = fit_temperature(df)
    assert set(temps) == {"spinal", "foraminal", "subarticular"}
    assert all(t > 1.3 for t in temps.values())  # softmax(3 z) is overconfident: T must soften it
    result = evaluate([_write(df, tmp_path)], out_dir=tmp_path, calibrate=True)
    before, after = result["temperature"]["before"], result["temperature"]["after"]
    for group in ("spinal", "foraminal", "subarticular"):
        assert after[group] < before[group]
    assert read_temperature(tmp_path / "temperature.json") == pytest.approx(temps)
    assert "after temperature" in (tmp_path / "score.md").read_text()


def _write(df: pd.DataFrame, tmp_path: Path) -> Path:
    path = tmp_path / "oof.parquet"
    df.to_parquet(path)
    return path


def test_submission_rows_follow_the_sample(tmp_path):
    sample = pd.read_csv(SAMPLE)
    rows = submission_rows(SAMPLE, studies=[])
    assert rows["row_id"].tolist() == sample["row_id"].tolist()
    studies = sorted({int(r.split("_")[0]) for r in sample["row_id"]})
    assert rows["row_id"].tolist() == submission_row_ids(studies)  # the sample's order is the canonical one
    truth = labels_long(pd.DataFrame({"study_id": studies, **{c: ["Normal/Mild"] * len(studies)
                                                              for c in LABEL_COLUMNS}}))
    merged = rows.merge(truth, on="row_id", suffixes=("", "_t"))
    assert (merged["condition"] == merged["condition_t"]).all() and (merged["level"] == merged["level_t"]).all()
    sample.iloc[:-1].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match="all 25"):
        submission_rows(tmp_path / "short.csv", studies=[])
    sample.assign(row_id="x" + sample["row_id"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="is not"):
        submission_rows(tmp_path / "bad.csv", studies=[])
    assert submission_rows(None, [5, 3])["row_id"].tolist() == submission_row_ids([3, 5])


def test_missing_condition_levels_get_the_prior_and_are_logged():
    rows = submission_rows(None, [11, 12])
    predicted = pd.DataFrame([(11, SPINAL, "L1/L2", 0.2, 0.3, 0.5), (12, SPINAL, "L4/L5", 2.0, 1.0, 1.0),
                              (11, LEFT_FOR, "L1/L2", 0.6, 0.3, 0.1)],
                             columns=["study_id", "condition", "level", *PROBS])
    errors = pd.DataFrame([(12, 99, 3, SPINAL, "L5/S1", "x.dcm", "decode", "truncated pixel data")],
                          columns=["study_id", "series_id", "instance_number", "condition", "level", "path", "stage",
                                   "reason"])
    priors = {c: metric_optimal(np.array([0.6, 0.3, 0.1])) for c in CONDITIONS}
    assert priors[SPINAL] == pytest.approx([0.375, 0.375, 0.25])  # (0.6*1, 0.3*2, 0.1*4) / 1.6
    sub, missing = assemble(rows, predicted, errors, {SPINAL, LEFT_FOR}, priors)
    assert list(sub.columns) == ["row_id", *PROBS] and sub["row_id"].tolist() == rows["row_id"].tolist()
    assert np.allclose(sub[PROBS].sum(axis=1), 1.0)
    by_id = sub.set_index("row_id")
    assert by_id.loc["11_spinal_canal_stenosis_l1_l2"].tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert by_id.loc["12_spinal_canal_stenosis_l4_l5"].tolist() == pytest.approx([0.5, 0.25, 0.25])  # renormalised
    assert len(missing) == 50 - 3 and not set(missing["row_id"]) & {"11_spinal_canal_stenosis_l1_l2"}
    assert by_id.loc[missing["row_id"], PROBS].to_numpy() == pytest.approx(np.tile(priors[SPINAL], (47, 1)))
    reasons = missing.set_index("row_id")["reason"]
    assert reasons["12_spinal_canal_stenosis_l5_s1"] == "failed sample (decode): truncated pixel data"
    assert reasons["12_spinal_canal_stenosis_l1_l2"] == "no crop in the cache (no coordinate)"
    assert reasons["11_left_subarticular_stenosis_l1_l2"] == "no model trained on this condition"


def test_checkpoints_and_priors_from_a_run_dir(tmp_path):
    import torch

    from train.config import TrainConfig

    run = tmp_path / "run"
    for k in (0, 1):
        (run / f"fold{k}").mkdir(parents=True)
        torch.save({"config": TrainConfig(conditions=(SPINAL,)).to_dict(), "model": {"w": torch.zeros(2)}},
                   run / f"fold{k}" / "best.pt")
    paths = resolve_checkpoints([run])
    assert paths == [run / "fold0" / "best.pt", run / "fold1" / "best.pt"]
    configs = [checkpoint_config(p) for p in paths]
    assert configs[0]["conditions"] == [SPINAL]
    labels = [0] * 6 + [1] * 3 + [2]  # with one pseudo-count per grade: 7/13, 4/13, 2/13
    pd.DataFrame({"condition": SPINAL, "label": pd.array(labels, dtype="Int8")}).to_parquet(run / "oof.parquet")
    priors, source = condition_priors(paths, configs)
    assert priors[SPINAL] == pytest.approx([7 / 23, 8 / 23, 8 / 23]) and source[SPINAL].endswith("oof.parquet: labels")
    assert priors[LEFT_FOR] == pytest.approx(metric_optimal(np.array([0.778, 0.182, 0.040])))
    assert source[LEFT_FOR] == "published competition mix"
    with pytest.raises(FileNotFoundError, match="no fold"):
        resolve_checkpoints([tmp_path])


def test_prior_is_the_metric_optimal_constant():
    """No other constant scores better on a group with that label mix."""
    mix = np.array([0.7, 0.2, 0.1])
    y = np.repeat([0, 1, 2], (mix * 100).astype(int))

    def loss(p: np.ndarray) -> float:
        df = pd.DataFrame({"study_id": np.arange(len(y)), "condition": LEFT_FOR, "level": "L1/L2",
                           "label": pd.array(y, dtype="Int8")})
        df[PROBS] = p
        return competition_score(df)["foraminal"]

    best = loss(metric_optimal(mix))
    rng = np.random.default_rng(0)
    assert all(loss(q) >= best - 1e-12 for q in rng.dirichlet([5, 2, 2], size=50))
    assert best < loss(mix) and best < math.log(3)


def test_score_submission_accepts_assembled_submission(tmp_path):
    rows = submission_rows(SAMPLE, studies=[])
    studies = rows["study_id"].unique().tolist()
    sub, _ = assemble(rows, pd.DataFrame(columns=["study_id", "condition", "level", *PROBS]), pd.DataFrame(),
                      set(), {c: metric_optimal(np.array([0.8, 0.15, 0.05])) for c in CONDITIONS})
    sub.to_csv(tmp_path / "submission.csv", index=False)
    solution = pd.DataFrame({"study_id": studies, **{c: ["Moderate"] * len(studies) for c in LABEL_COLUMNS}})
    got = score_submission(solution, tmp_path / "submission.csv")
    p = metric_optimal(np.array([0.8, 0.15, 0.05]))
    assert got["spinal"] == pytest.approx(-math.log(p[1]))
    assert got["any_severe_spinal"] == pytest.approx(-math.log(1 - p[2]))


# ------------------------------------------------------------------ predict on a real (tiny) cache and checkpoints

def tiny_cache(path: Path, samples: list[tuple[int, str, str]], errors: pd.DataFrame, slices: int = 3,
               size: int = 32) -> None:
    """A finalised test-split cache (labels null) with random crops, built with the cache writer."""
    from cache.writer import CacheWriter

    rng = np.random.default_rng(0)
    w = CacheWriter.create(path, n_rows=len(samples), slices=slices, size=size, config={"test": "predict"})
    records = []
    for row, (study, condition, level) in enumerate(samples):
        digest = w.write(row, rng.integers(0, 256, size=(slices, 3, size, size), dtype=np.uint8))
        records.append({
            "row": row, "study_id": study, "series_id": study * 10, "series_description": "Sagittal T2/STIR",
            "condition": condition, "level": level, "instance_number": 5, "x": 10.0, "y": 12.0, "label": None,
            "center_x_px": 10.0, "center_y_px": 12.0, "half_size_px": 8.0, "half_size_mm": 6.0,
            "pixel_spacing_row": 0.75, "pixel_spacing_col": 0.75, "slice_instances": [4, 5, 6],
            "slice_offsets_mm": [-4.0, 0.0, 4.0], "replicated": [False] * 3, "ordering": "position",
            "checksum": digest})
    w.finalise(pd.DataFrame(records), errors)


def tiny_checkpoint(path: Path, conditions: tuple[str, ...], seed: int) -> None:
    import torch

    from train.config import TrainConfig
    from train.model import build_model

    torch.manual_seed(seed)
    cfg = TrainConfig(conditions=conditions, backbone="test_efficientnet", pretrained=False, slices=3,
                      level_emb=8, condition_emb=4, head_hidden=16, channels_last=False, device="cpu")
    model = build_model(cfg, pretrained=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "model": model.state_dict(), "epoch": 0}, path)


def test_predict_end_to_end_on_a_tiny_cache(tmp_path):
    import cache
    from train.infer import predict_cache

    studies = [501, 502]
    spinal_levels = [(s, SPINAL, lv) for s in studies for lv in LEVELS if (s, lv) != (502, "L5/S1")]
    samples = spinal_levels + [(501, LEFT_FOR, "L4/L5"), (502, CONDITIONS[4], "L4/L5")]  # + an untrained condition
    errors = pd.DataFrame([{"study_id": 502, "series_id": 5020, "instance_number": 9, "condition": SPINAL,
                            "level": "L5/S1", "path": "test_images/502/5020/9.dcm", "stage": "decode",
                            "reason": "truncated pixel data"}])
    tiny_cache(tmp_path / "cache", samples, errors)
    run_a = tmp_path / "run_spinal"
    for k in (0, 1):
        tiny_checkpoint(run_a / f"fold{k}" / "best.pt", (SPINAL,), seed=k)
    ckpt_b = tmp_path / "foraminal.pt"
    tiny_checkpoint(ckpt_b, (LEFT_FOR, CONDITIONS[2]), seed=7)

    out = tmp_path / "sub" / "submission.csv"
    sub = predict([run_a, ckpt_b], tmp_path / "cache", out, device="cpu")
    on_disk = pd.read_csv(out)
    assert list(on_disk.columns) == ["row_id", *PROBS]
    assert on_disk["row_id"].tolist() == submission_row_ids(studies) == sub["row_id"].tolist()
    assert np.allclose(on_disk[PROBS].sum(axis=1), 1.0, atol=1e-12)

    # spinal rows: the mean of the two folds; the foraminal row: model B alone
    reader = cache.open(tmp_path / "cache")
    folds = [predict_cache(run_a / f"fold{k}" / "best.pt", reader, device="cpu") for k in (0, 1)]
    spinal = pd.concat(folds).groupby(["study_id", "condition", "level"])[PROBS].mean()
    by_id = on_disk.set_index("row_id")
    for (study, condition, level), probs in spinal.iterrows():
        assert by_id.loc[f"{study}_{label_column(condition, level)}"].to_numpy() == pytest.approx(probs.to_numpy())
    b = predict_cache(ckpt_b, reader, device="cpu")
    assert len(b) == 1 and by_id.loc["501_left_neural_foraminal_narrowing_l4_l5"].to_numpy() == pytest.approx(
        b[PROBS].to_numpy()[0])

    missing = pd.read_csv(out.parent / MISSING_LOG).set_index("row_id")
    assert len(missing) == 50 - len(samples) + 1  # the right-subarticular sample has no model
    assert missing.loc["502_spinal_canal_stenosis_l5_s1", "reason"] == "failed sample (decode): truncated pixel data"
    assert missing.loc["502_right_subarticular_stenosis_l4_l5", "reason"] == "no model trained on this condition"
    assert missing.loc["502_left_neural_foraminal_narrowing_l4_l5", "reason"] == "no crop in the cache (no coordinate)"
    prior = metric_optimal(np.array(PUBLISHED_MIX[SPINAL]))
    assert by_id.loc["502_spinal_canal_stenosis_l5_s1"].to_numpy() == pytest.approx(prior)
    assert set(missing["prior_source"]) == {"published competition mix"}  # no oof.parquet, no stored prior

    # temperature: model rows change as apply_temperature says, prior rows do not
    hot = predict([run_a, ckpt_b], tmp_path / "cache", tmp_path / "hot.csv", device="cpu",
                  temperature={"spinal": 2.0}).set_index("row_id")
    p = by_id.loc["501_spinal_canal_stenosis_l1_l2"].to_numpy()
    assert hot.loc["501_spinal_canal_stenosis_l1_l2"].to_numpy() == pytest.approx(np.sqrt(p) / np.sqrt(p).sum())
    assert hot.loc["502_spinal_canal_stenosis_l5_s1"].to_numpy() == pytest.approx(prior)

    # with the sample submission's order (a reversed one here) and a study the cache never saw
    order = submission_row_ids([503, *studies])[::-1]
    pd.DataFrame({"row_id": order, **{c: 1 / 3 for c in PROBS}}).to_csv(tmp_path / "sample.csv", index=False)
    ordered = predict([run_a, ckpt_b], tmp_path / "cache", tmp_path / "o.csv",
                      sample_submission=tmp_path / "sample.csv", device="cpu")
    assert ordered["row_id"].tolist() == order
    unseen = pd.read_csv(tmp_path / "o_missing.csv").query("row_id.str.startswith('503_')")  # named after o.csv
    assert len(unseen) == 25 and set(unseen["reason"]) <= {"no crop in the cache (no coordinate)",
                                                           "no model trained on this condition"}
    assert ordered.set_index("row_id").loc[sub["row_id"], PROBS].to_numpy() == pytest.approx(sub[PROBS].to_numpy())


# ------------------------------------------------------------------ the whole path on the synthetic test split

@pytest.mark.slow
def test_synth_prep_train_predict_score(tmp_path):
    """synth -> prep (train, and test with a coordinates CSV) -> train -> evaluate -> predict -> score_submission."""
    from typer.testing import CliRunner

    from lsdc.cli import app
    from prep.synth import synth
    from train.config import TrainConfig
    from train.loop import fit

    data = tmp_path / "data"
    synth(data, studies=6, seed=0, image_size=(64, 96))
    coords = pd.read_csv(data / "test_label_coordinates.csv")
    first = int(coords["study_id"].min())
    dropped = (coords["study_id"] == first) & (coords["condition"] == SPINAL) & (coords["level"] == "L1/L2")
    assert dropped.sum() == 1
    stray = coords.iloc[[0]].assign(study_id=123)  # a row for a study that is not in the test set
    pd.concat([coords[~dropped], stray]).to_csv(tmp_path / "coords.csv", index=False)  # a localizer that missed a level

    runner = CliRunner()
    prep = ["prep", "--slices", "3", "--size", "32", "--workers", "1", "--scheduler", "synchronous", "--no-progress"]
    r = runner.invoke(app, [*prep, str(data), str(tmp_path / "train_cache")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*prep, str(data), str(tmp_path / "test_cache"), "--split", "test",
                            "--coords", str(tmp_path / "coords.csv")])
    assert r.exit_code == 0, r.output

    cfg = TrainConfig(conditions=(SPINAL, LEFT_FOR), backbone="test_efficientnet", pretrained=False, epochs=1,
                      folds=2, fold=None, batch_size=16, workers=0, freeze_epochs=0, swa_start=None,
                      channels_last=False, in_memory=False, device="cpu")
    run = tmp_path / "run"
    fit(tmp_path / "train_cache", run, cfg)

    r = runner.invoke(app, ["evaluate", str(run), "--calibrate"])
    assert r.exit_code == 0, r.output
    assert "score" in r.output and "(partial)" in r.output  # no subarticular model: a partial OOF score
    saved = json.loads((run / "score.json").read_text())
    assert saved["score"]["missing_parts"] == ["subarticular"] and (run / "temperature.json").exists()

    # a test cache of other crops (48 px) is refused, naming what differs; a train-split cache is only warned about
    r = runner.invoke(app, [*prep, str(data), str(tmp_path / "test48"), "--split", "test", "--size", "48",
                            "--coords", str(tmp_path / "coords.csv")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["predict", str(run), "--cache", str(tmp_path / "test48"), "--out", str(tmp_path / "x.csv"),
                            "--device", "cpu"])
    assert r.exit_code == 2 and "size 32 != 48" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.csv").exists()

    out = tmp_path / "sub" / "submission.csv"
    r = runner.invoke(app, ["predict", str(run), "--cache", str(tmp_path / "test_cache"), "--out", str(out),
                            "--sample-submission", str(data / "sample_submission.csv"), "--device", "cpu",
                            "--temperature", str(run / "temperature.json")])
    assert r.exit_code == 0, r.output
    sub, sample = pd.read_csv(out), pd.read_csv(data / "sample_submission.csv")
    assert list(sub.columns) == list(sample.columns) == ["row_id", *PROBS]
    assert sub["row_id"].tolist() == sample["row_id"].tolist()
    assert np.allclose(sub[PROBS].sum(axis=1), 1.0, atol=1e-12) and (sub[PROBS].to_numpy() > 0).all()

    n_test = coords["study_id"].nunique()
    missing = pd.read_csv(out.parent / MISSING_LOG).set_index("row_id")
    # spinal + left foraminal come from the models, except the level whose coordinate was dropped
    assert len(missing) == 25 * n_test - (10 * n_test - 1)
    assert missing.loc[f"{first}_spinal_canal_stenosis_l1_l2", "reason"] == "no crop in the cache (no coordinate)"
    assert missing.loc[f"{first}_right_neural_foraminal_narrowing_l1_l2", "reason"] == \
        "no model trained on this condition"
    # its fill-in value: the metric-optimal constant for fold 0's training mix (= fold 1's validation samples, with
    # one pseudo-count per grade), stored in fold 0's checkpoint
    oof = pd.read_parquet(run / "oof.parquet")
    counts = np.bincount(oof.loc[(oof["condition"] == SPINAL) & (oof["fold"] == 1), "label"].astype(int), minlength=3)
    assert sub.set_index("row_id").loc[f"{first}_spinal_canal_stenosis_l1_l2"].to_numpy() == pytest.approx(
        metric_optimal((counts + 1) / (counts.sum() + 3)))
    assert missing.loc[f"{first}_spinal_canal_stenosis_l1_l2", "prior_source"].endswith("fold0/best.pt: class_prior")

    got = score_submission(data / "test_labels.csv", out, details=True)
    assert not got["partial"] and all(math.isfinite(got[k]) and got[k] > 0 for k in SCORE_KEYS)
    assert got["n_spinal"] + got["n_foraminal"] + got["n_subarticular"] == \
        labels_long(data / "test_labels.csv")["label"].notna().sum()

    # the submission scored by `lsdc evaluate` against the synthetic solution: the same score, and the report files
    r = runner.invoke(app, ["evaluate", str(out), "--labels", str(data / "test_labels.csv"), "--out",
                            str(tmp_path / "scores")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "scores" / "score.json").read_text())["score"]["score"] == pytest.approx(
        got["score"], rel=1e-12)
    assert f"wrote score.json, score.md (recall, confusion, per level and fold) to {tmp_path / 'scores'}" in r.output
    r = runner.invoke(app, ["evaluate", str(out)])
    assert r.exit_code == 2 and "is a submission: pass --labels" in r.output

    # without the sample submission, on a GPU box without the data folder: the test set's studies as prep recorded
    # them, every one with its 25 rows, and none for the stray row's study (it is in the cache's errors table)
    test_studies = sorted(pd.read_csv(data / "test_series_descriptions.csv")["study_id"].unique())
    assert cache.open(tmp_path / "test_cache").manifest["prep"]["split_studies"] == test_studies
    assert 123 in set(cache.open(tmp_path / "test_cache").errors["study_id"])
    data.rename(tmp_path / "data_gone")
    bare = tmp_path / "bare.csv"
    r = runner.invoke(app, ["predict", str(run), "--cache", str(tmp_path / "test_cache"), "--out", str(bare),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert sorted(pd.read_csv(bare)["row_id"]) == sorted(sample["row_id"])


def test_split_studies_lists_every_study_of_the_split_even_without_coordinates(tmp_path):
    from train.predict import split_studies

    pd.DataFrame({"study_id": [7, 7, 9], "series_id": [1, 2, 3],
                  "series_description": ["Sagittal T1", "Axial T2", "Sagittal T1"]}).to_csv(
        tmp_path / "test_series_descriptions.csv", index=False)
    manifest = {"prep": {"data_dir": str(tmp_path)}, "config": {"split": "test"}}
    assert split_studies(manifest) == {7, 9}
    assert split_studies({"prep": {"data_dir": str(tmp_path / "gone")}, "config": {"split": "test"}}) == set()
    assert split_studies({}) == set()


def test_check_crops_refuses_other_crops_and_warns_on_a_train_split(caplog):
    from types import SimpleNamespace

    import cache
    from train.predict import check_crops

    built = {"size": 256, "slices": 7, "crop_scale": 0.75, "crop_base_mm": 170.0, "codec": "crc32c",
             "windows": [{"name": "soft", "lo": 50.0, "hi": 99.5}]}
    trained = [{"_crop_settings": cache.crop_settings({"config": built})}]  # what the checkpoint records
    assert trained[0]["_crop_settings"]["half_size_mm"] == 127.5

    def of(**config):
        return SimpleNamespace(path="t", manifest={"config": {**built, **config}})

    # split, conditions, codec, window names and the way the box is spelled may differ: the pixels are the same
    check_crops([Path("a.pt")], trained, of(split="test", conditions=["x"], codec="none", crop_scale=1.0,
                                            crop_base_mm=127.5, windows=[{"name": "w1", "lo": 50, "hi": 99.5}]))
    check_crops([Path("a.pt")], [{"_crop_settings": {}}], of(size=64))  # a checkpoint that records nothing
    with pytest.raises(ValueError, match=r"a.pt was trained on crops .*half_size_mm 127.5 != 25.0"):
        check_crops([Path("a.pt")], trained, of(crop_scale=1.0, crop_base_mm=25.0))
    with pytest.raises(ValueError, match=r"windows \[\[50.0, 99.5\]\] != \[\[0.5, 99.5\]\]"):
        check_crops([Path("a.pt")], trained, of(windows=[{"name": "soft", "lo": 0.5, "hi": 99.5}]))
    with caplog.at_level("WARNING"):
        check_crops([Path("a.pt")], trained, of(split="train"))
    assert "train split" in caplog.text
