"""The competition score against hand computations (explicit formulas, never sklearn called the same way)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.rsna import CONDITIONS, LABEL_COLUMNS, LABELS, LEVELS, PROB_COLUMNS, label_column, submission_row_ids
from train.score import SCORE_KEYS, competition_score, labels_long, score_submission

SPINAL, LEFT_FOR, RIGHT_FOR, LEFT_SUB, _ = CONDITIONS
EPS = np.finfo(np.float64).eps
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def frame(rows: list[tuple]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["study_id", "condition", "level", "label", *PROB_COLUMNS])
    df["label"] = df["label"].astype("Int8")
    return df


def hand_case() -> pd.DataFrame:
    return frame([
        (1, SPINAL, "L1/L2", 0, 0.7, 0.2, 0.1),
        (1, SPINAL, "L2/L3", 2, 0.2, 0.3, 0.5),
        (2, SPINAL, "L1/L2", 1, 0.1, 0.6, 0.3),
        (2, SPINAL, "L2/L3", None, 0.0, 0.0, 1.0),  # unlabelled: would make study 2's max P(severe) 1.0 if counted
        (1, LEFT_FOR, "L1/L2", 1, 2.0, 6.0, 2.0),  # sums to 10: renormalised to (0.2, 0.6, 0.2)
        (2, RIGHT_FOR, "L1/L2", 0, 0.5, 0.25, 0.25),
        (1, LEFT_SUB, "L1/L2", 2, 0.25, 0.25, 0.5),
    ])


def test_hand_computed_case():
    got = competition_score(hand_case(), details=True)
    ln = math.log
    spinal = (1 * -ln(0.7) + 4 * -ln(0.5) + 2 * -ln(0.6)) / (1 + 4 + 2)
    foraminal = (2 * -ln(0.6) + 1 * -ln(0.5)) / (2 + 1)
    subarticular = -ln(0.5)
    # study 1: a Severe level -> label 1, pred max(0.1, 0.5), weight 4; study 2: label 0, pred 0.3, weight 2.
    any_severe = (4 * -ln(0.5) + 2 * -ln(1 - 0.3)) / (4 + 2)
    assert got["spinal"] == pytest.approx(spinal, rel=1e-12)
    assert got["foraminal"] == pytest.approx(foraminal, rel=1e-12)
    assert got["subarticular"] == pytest.approx(subarticular, rel=1e-12)
    assert got["any_severe_spinal"] == pytest.approx(any_severe, rel=1e-12)
    assert got["score"] == pytest.approx((spinal + foraminal + subarticular + any_severe) / 4, rel=1e-12)
    assert (got["n_spinal"], got["n_foraminal"], got["n_subarticular"], got["n_any_severe_spinal"]) == (3, 2, 1, 2)
    assert got["partial"] is False and got["missing_parts"] == []


def full_grid(n_studies: int, seed: int) -> pd.DataFrame:
    """Every study x condition x level with random labels (a few missing)."""
    rng = np.random.default_rng(seed)
    rows = [(s, c, lv) for s in range(100, 100 + n_studies) for c in CONDITIONS for lv in LEVELS]
    df = pd.DataFrame(rows, columns=["study_id", "condition", "level"])
    label = pd.array(rng.choice(3, size=len(df), p=[0.7, 0.2, 0.1]), dtype="Int8")
    label[rng.random(len(df)) < 0.05] = pd.NA
    df["label"] = label
    return df


def test_perfect_predictions_score_zero():
    df = full_grid(8, seed=1)
    df[list(PROB_COLUMNS)] = np.eye(3)[df["label"].fillna(0).to_numpy(dtype=int)]
    got = competition_score(df)
    assert set(got) == set(SCORE_KEYS)
    for key in SCORE_KEYS:
        # sklearn clips a prediction of 1 to 1 - eps: the loss is -log(1 - eps) ~ 2.2e-16, not exactly 0
        assert 0 <= got[key] < 1e-12


def test_uniform_predictions_known_value():
    df = full_grid(12, seed=2)
    df[list(PROB_COLUMNS)] = 1 / 3
    got = competition_score(df)
    for group in ("spinal", "foraminal", "subarticular"):
        assert got[group] == pytest.approx(math.log(3), rel=1e-12)  # -log(1/3) whatever the weights
    # any_severe_spinal: pred = 1/3 for every study, so the loss is ln 3 for a severe study and ln 1.5 otherwise,
    # weighted by the study's largest class weight among its labelled spinal levels.
    lab = df[(df["condition"] == SPINAL) & df["label"].notna()]
    per_study = lab.groupby("study_id")["label"].agg(lambda s: (int((s == 2).any()), {0: 1, 1: 2, 2: 4}[int(s.max())]))
    y = np.array([v[0] for v in per_study])
    w = np.array([v[1] for v in per_study], dtype=float)
    expected = float((w * np.where(y == 1, math.log(3), math.log(1.5))).sum() / w.sum())
    assert 0 < y.sum() < len(y)  # both kinds of study are present, so the check means something
    assert got["any_severe_spinal"] == pytest.approx(expected, rel=1e-12)
    assert got["score"] == pytest.approx((3 * math.log(3) + expected) / 4, rel=1e-12)


def test_unlabelled_rows_are_ignored():
    df = full_grid(6, seed=3)
    rng = np.random.default_rng(0)
    df[list(PROB_COLUMNS)] = rng.dirichlet([1, 1, 1], size=len(df))
    base = competition_score(df)
    changed = df.copy()
    # wild predictions on the unlabelled rows, including P(severe) = 1 on spinal rows (the any-severe max)
    changed.loc[changed["label"].isna(), list(PROB_COLUMNS)] = [0.0, 0.0, 1.0]
    assert competition_score(changed) == base
    assert competition_score(df[df["label"].notna()]) == base


def test_rows_are_renormalised():
    df = full_grid(6, seed=4)
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([2, 1, 1], size=len(df))
    df[list(PROB_COLUMNS)] = probs
    scaled = df.copy()
    scaled[list(PROB_COLUMNS)] = probs * rng.uniform(0.1, 10, size=(len(df), 1))
    base, got = competition_score(df), competition_score(scaled)
    for key in SCORE_KEYS:
        assert got[key] == pytest.approx(base[key], rel=1e-10)


def test_zero_probability_is_clipped_like_sklearn():
    df = frame([(1, SPINAL, "L1/L2", 2, 1.0, 0.0, 0.0)])  # the true class predicted impossible
    got = competition_score(df)
    assert got["spinal"] == pytest.approx(-math.log(EPS), rel=1e-9)  # clipped to eps, finite
    assert got["any_severe_spinal"] == pytest.approx(-math.log(EPS), rel=1e-9)


def test_missing_group_is_nan_and_flagged():
    df = hand_case()
    only_spinal = df[df["condition"] == SPINAL]
    got = competition_score(only_spinal, details=True)
    assert math.isnan(got["foraminal"]) and math.isnan(got["subarticular"])
    assert got["missing_parts"] == ["foraminal", "subarticular"] and got["partial"] is True
    assert got["score"] == pytest.approx((got["spinal"] + got["any_severe_spinal"]) / 2, rel=1e-12)
    nothing = competition_score(df[df["label"].isna()])
    assert all(math.isnan(nothing[k]) for k in SCORE_KEYS)


@pytest.mark.parametrize("probs,message", [((-0.1, 0.6, 0.5), "negative"), ((np.nan, 0.5, 0.5), "NaN"),
                                           ((0.0, 0.0, 0.0), "sum to zero")])
def test_bad_predictions_raise(probs, message):
    with pytest.raises(ValueError, match=message):
        competition_score(frame([(1, SPINAL, "L1/L2", 0, *probs)]))


def test_bad_strings_raise():
    with pytest.raises(ValueError, match="unknown condition"):
        competition_score(frame([(1, "spinal_canal_stenosis", "L1/L2", 0, 1.0, 0.0, 0.0)]))
    with pytest.raises(ValueError, match="labels must be"):
        competition_score(frame([(1, SPINAL, "L1/L2", 3, 1.0, 0.0, 0.0)]))


def wide_labels(long: pd.DataFrame) -> pd.DataFrame:
    """Long (study, condition, level, label code) -> train.csv format with the label strings."""
    wide = pd.DataFrame({"study_id": sorted(long["study_id"].unique())})
    for col in LABEL_COLUMNS:
        wide[col] = ""
    for r in long.itertuples():
        if pd.notna(r.label):
            wide.loc[wide["study_id"] == r.study_id, label_column(r.condition, r.level)] = LABELS[int(r.label)]
    return wide


def test_score_submission_matches_long_form():
    df = full_grid(5, seed=5)
    df[list(PROB_COLUMNS)] = np.random.default_rng(2).dirichlet([3, 1, 1], size=len(df))
    solution = wide_labels(df)
    truth = labels_long(solution)
    assert truth["label"].isna().sum() == df["label"].isna().sum()
    ids = submission_row_ids(solution["study_id"].tolist())
    sub = truth[["row_id"]].join(df[list(PROB_COLUMNS)]).set_index("row_id").loc[ids].reset_index()
    assert score_submission(solution, sub) == competition_score(df)

    with pytest.raises(ValueError, match="1 missing"):
        score_submission(solution, sub.iloc[1:])
    with pytest.raises(ValueError, match="columns"):
        score_submission(solution, sub.rename(columns={"severe": "p_severe"}))
    with pytest.raises(ValueError, match="unknown label"):
        score_submission(solution.assign(**{LABEL_COLUMNS[0]: "Sever"}), sub)


def test_score_submission_reads_csv_files(tmp_path):
    """The fixture sample submission (25 uniform rows of one study) against an all-Normal/Mild truth."""
    sample = pd.read_csv(FIXTURES / "sample_submission.csv")
    study = int(sample["row_id"].iloc[0].split("_")[0])
    solution = pd.DataFrame({"study_id": [study], **{c: ["Normal/Mild"] for c in LABEL_COLUMNS}})
    solution.to_csv(tmp_path / "solution.csv", index=False)
    got = score_submission(tmp_path / "solution.csv", FIXTURES / "sample_submission.csv")
    # every group ln 3; one non-severe study predicted 1/3 severe -> ln 1.5
    assert got["score"] == pytest.approx((3 * math.log(3) + math.log(1.5)) / 4, rel=1e-12)


def test_the_oracle_gap_is_the_score_difference_with_a_paired_interval_over_studies(tmp_path):
    from train.score import oracle_gap

    rng = np.random.default_rng(0)
    studies = [11, 22, 33, 44, 55, 66]
    cols = [c for c in LABEL_COLUMNS]
    grades = ["Normal/Mild", "Moderate", "Severe"]
    labels = pd.DataFrame([{"study_id": s, **{c: grades[rng.integers(0, 3)] for c in cols}} for s in studies])
    labels.to_csv(tmp_path / "labels.csv", index=False)
    ids = [f"{s}_{c}" for s in studies for c in cols]
    p = rng.dirichlet([2, 2, 2], len(ids))
    good = pd.DataFrame(p, columns=list(PROB_COLUMNS)).assign(row_id=ids)[["row_id", *PROB_COLUMNS]]
    good.to_csv(tmp_path / "oracle.csv", index=False)

    same = oracle_gap(tmp_path / "labels.csv", tmp_path / "oracle.csv", tmp_path / "oracle.csv", resamples=50)
    assert same["gap"] == 0 and same["low"] == 0 and same["high"] == 0 and same["studies"] == 6

    worse = good.copy()  # one study graded from points far off: uniform probabilities there
    worse.loc[worse["row_id"].str.startswith("33_"), list(PROB_COLUMNS)] = 1 / 3
    worse.to_csv(tmp_path / "located.csv", index=False)
    gap = oracle_gap(tmp_path / "labels.csv", tmp_path / "located.csv", tmp_path / "oracle.csv", resamples=200)
    assert gap["gap"] == pytest.approx(score_submission(tmp_path / "labels.csv", tmp_path / "located.csv")["score"]
                                       - score_submission(tmp_path / "labels.csv", tmp_path / "oracle.csv")["score"])
    assert gap["low"] <= gap["gap"] <= gap["high"] and gap["low"] < gap["high"]

    from typer.testing import CliRunner

    from lsdc.cli import app

    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "located.csv"), "--labels", str(tmp_path / "labels.csv"),
                                   "--oracle", str(tmp_path / "oracle.csv")])
    assert res.exit_code == 0, res.output
    assert f"the price of locating them: {gap['gap']:+.4f} (90 % interval over 6 studies: " in res.output
