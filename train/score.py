"""The RSNA 2024 competition score, torch-free (numpy, pandas, scikit-learn).

Definition (the competition's evaluation page; docs/metric.md): per condition group (spinal; foraminal = left + right;
subarticular = left + right) a sample-weighted log loss with weights 1, 2, 4 for a true Normal/Mild, Moderate,
Severe; plus `any_severe_spinal`, a binary log loss per study of "any spinal level is Severe" predicted by the
largest P(severe) over its spinal levels, weighted by the largest sample weight among those levels. The score is the
mean of the four. Rows without a label are dropped before anything else, exactly as the Kaggle metric drops them
from its solution, so they count neither in the group losses nor in a study's any-severe max.

The log loss itself is scikit-learn's (its clipping to [eps, 1 - eps] included), never re-implemented here.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss

from cache.errors import InputError
from cache.rsna import (CLASS_WEIGHTS, CONDITION_GROUP, CONDITIONS, LABEL_COLUMNS, LEVELS, PROB_COLUMNS, label_code,
                        row_id)

GROUPS: tuple[str, ...] = ("spinal", "foraminal", "subarticular")
PARTS: tuple[str, ...] = GROUPS + ("any_severe_spinal",)
SCORE_KEYS: tuple[str, ...] = PARTS + ("score",)
SEVERE = 2


def normalise_probs(probs: np.ndarray, what: str = "predictions") -> np.ndarray:
    """Divide each row by its sum; refuse what the Kaggle metric refuses (non-finite, negative) and all-zero rows."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(PROB_COLUMNS):
        raise InputError(f"{what}: expected an (N, 3) array of probabilities, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise InputError(f"{what}: {int((~np.isfinite(p)).any(axis=1).sum())} rows hold NaN or inf")
    if (p < 0).any():
        raise InputError(f"{what}: {int((p < 0).any(axis=1).sum())} rows hold negative probabilities")
    s = p.sum(axis=1, keepdims=True)
    if (s <= 0).any():
        raise InputError(f"{what}: {int((s <= 0).sum())} rows sum to zero; cannot renormalise them")
    return p / s


def scored_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows the metric scores: labelled, with `group`, `weight` and renormalised probability columns added."""
    need = {"study_id", "condition", "level", "label", *PROB_COLUMNS}
    if missing := need - set(df.columns):
        raise InputError(f"score input lacks columns {sorted(missing)}; it has {list(df.columns)}")
    if bad := sorted(set(df["condition"]) - set(CONDITIONS)):
        raise InputError(f"unknown condition strings {bad}; expected the competition's {CONDITIONS}")
    if bad := sorted(set(df["level"]) - set(LEVELS)):
        raise InputError(f"unknown level strings {bad}; expected {LEVELS}")
    rows = df.loc[df["label"].notna(), ["study_id", "condition", "level", "label", *PROB_COLUMNS]].copy()
    label = rows["label"].to_numpy(dtype=np.float64)
    if not np.isin(label, (0, 1, 2)).all():
        raise InputError(f"labels must be 0, 1, 2 or NA; found {sorted(set(label) - {0.0, 1.0, 2.0})}")
    rows["label"] = label.astype(np.int64)
    rows["group"] = rows["condition"].map(CONDITION_GROUP)
    rows["weight"] = np.asarray(CLASS_WEIGHTS, dtype=np.float64)[rows["label"].to_numpy()]
    rows[list(PROB_COLUMNS)] = normalise_probs(rows[list(PROB_COLUMNS)].to_numpy(), "score input")
    return rows.reset_index(drop=True)


def any_severe_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per study (from `scored_rows`): label = any labelled spinal level Severe, pred = max P(severe), weight = max."""
    spinal = rows[rows["group"] == "spinal"]
    return (
        spinal.assign(any_severe=(spinal["label"] == SEVERE).astype(np.int64))
        .groupby("study_id")
        .agg(label=("any_severe", "max"), pred=("severe", "max"), weight=("weight", "max"))
        .reset_index()
    )


def group_log_loss(rows: pd.DataFrame) -> float:
    """Sample-weighted 3-class log loss of scored rows; NaN when there are none."""
    # a group whose truth lacks a class (e.g. no Severe) is still scored over three columns
    return weighted_log_loss(rows["label"].to_numpy(), rows[list(PROB_COLUMNS)].to_numpy(), CLASS_WEIGHTS)


def weighted_log_loss(y_true: np.ndarray, probs: np.ndarray, weights: tuple[float, ...]) -> float:
    """Sample-weighted multi-class log loss with weights per true class: the metric's per-group form (validation
    loss of a training epoch); probabilities renormalised; NaN when there are no rows."""
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) == 0:
        return float("nan")
    p = normalise_probs(probs, "weighted log loss input")
    return float(log_loss(y_true, p, sample_weight=np.asarray(weights, dtype=np.float64)[y_true],
                          labels=list(range(p.shape[1]))))


def binary_log_loss(table: pd.DataFrame) -> float:
    """Weighted binary log loss of an `any_severe_table`; NaN when empty."""
    if table.empty:
        return float("nan")
    p = table["pred"].to_numpy(dtype=np.float64)
    # Two explicit columns rather than a 1-D vector, so a fold with no severe study is still a 2-class problem.
    return float(log_loss(table["label"], np.stack([1.0 - p, p], axis=1), sample_weight=table["weight"],
                          labels=[0, 1]))


def competition_score(df: pd.DataFrame, details: bool = False) -> dict[str, Any]:
    """The official score and its four parts (lower is better).

    `df`: one row per (study, condition, level) with columns study_id, condition (competition string), level,
    label (0/1/2 or NA) and normal_mild, moderate, severe. A part with no scored rows (e.g. a run trained on spinal
    only has no foraminal rows) is NaN and `score` is the mean of the parts that exist; it is NaN only when none
    does. With `details=True` the dict also holds `n_<part>` (rows, or studies for any_severe_spinal), `missing_parts`
    (the NaN parts) and `partial` (True when the score is not the full four-part mean, i.e. not the Kaggle number).
    """
    rows = scored_rows(df)
    severe = any_severe_table(rows)
    out: dict[str, Any] = {g: group_log_loss(rows[rows["group"] == g]) for g in GROUPS}
    out["any_severe_spinal"] = binary_log_loss(severe)
    parts = np.array([out[p] for p in PARTS])
    out["score"] = float(np.nanmean(parts)) if np.isfinite(parts).any() else float("nan")
    if details:
        out.update({f"n_{g}": int((rows["group"] == g).sum()) for g in GROUPS})
        out["n_any_severe_spinal"] = len(severe)
        out["missing_parts"] = [p for p in PARTS if not np.isfinite(out[p])]
        out["partial"] = bool(out["missing_parts"])
    return out


# ---------------------------------------------------------------- the Kaggle-format entry point (CSV in, score out)

def read_csv(path: str | os.PathLike, **kwargs: Any) -> pd.DataFrame:
    """A CSV the user gave (labels, a submission, a sample submission); what cannot be read is an InputError naming
    the file: missing, not a regular file, empty, not CSV."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not p.is_file():
        raise InputError(f"{p}: not a regular file (a folder, FIFO or device): not read")
    try:
        return pd.read_csv(p, **kwargs)
    except pd.errors.EmptyDataError:
        raise InputError(f"{p}: empty file (no header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{p}: not a readable CSV ({' '.join(str(e).split())[:200]})") from None


def labels_long(labels: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """train.csv format (study_id + 25 label columns of label strings) -> one row per (study, condition, level).

    Columns: study_id, condition, level, row_id, label (Int8, <NA> for an empty cell). Unknown strings raise.
    """
    wide = read_csv(labels, dtype={"study_id": np.int64}) if not isinstance(labels, pd.DataFrame) else labels
    if missing := [c for c in ("study_id", *LABEL_COLUMNS) if c not in wide.columns]:
        raise InputError(f"labels table lacks train.csv columns {missing[:5]}{'...' if len(missing) > 5 else ''}")
    records = []
    for study, *cells in wide[["study_id", *LABEL_COLUMNS]].itertuples(index=False):
        names = iter(cells)
        for condition in CONDITIONS:
            for level in LEVELS:
                value = next(names)
                try:
                    code = label_code(value)
                except ValueError as e:
                    raise InputError(f"study {study}, {condition} {level}: {e}") from None
                records.append((int(study), condition, level, row_id(study, condition, level), code))
    out = pd.DataFrame(records, columns=["study_id", "condition", "level", "row_id", "label"])
    out["label"] = out["label"].astype("Int8")
    return out


def read_submission(submission: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """A submission CSV/DataFrame checked for exactly the Kaggle columns and unique row ids."""
    sub = read_csv(submission) if not isinstance(submission, pd.DataFrame) else submission
    expected = ["row_id", *PROB_COLUMNS]
    if list(sub.columns) != expected:
        raise InputError(f"submission columns are {list(sub.columns)}; expected exactly {expected}")
    if dup := sub.loc[sub["row_id"].duplicated(), "row_id"].tolist():
        raise InputError(f"submission repeats row ids, e.g. {dup[:3]}")
    return sub


def score_submission(solution: pd.DataFrame | str | os.PathLike,
                     submission: pd.DataFrame | str | os.PathLike, details: bool = False) -> dict[str, Any]:
    """Score a Kaggle submission (row_id, normal_mild, moderate, severe) against train.csv-format labels.

    Like Kaggle, every row id of the solution's studies must be in the submission and nothing else may be; the
    synthetic test split's `test_labels.csv` is such a solution.
    """
    return competition_score(match_submission(solution, submission), details=details)


def match_submission(solution: pd.DataFrame | str | os.PathLike,
                     submission: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """The solution's rows (study_id, condition, level, row_id, label) with the submission's probabilities; its row
    ids must be exactly the solution's, as on Kaggle."""
    truth = labels_long(solution)
    sub = read_submission(submission)
    missing = sorted(set(truth["row_id"]) - set(sub["row_id"]))
    extra = sorted(set(sub["row_id"]) - set(truth["row_id"]))
    if missing or extra:
        raise InputError(f"submission row ids do not match the solution: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:3]})")
    return truth.merge(sub, on="row_id", how="left", validate="one_to_one")


def oracle_gap(solution: pd.DataFrame | str | os.PathLike, located: pd.DataFrame | str | os.PathLike,
               oracle: pd.DataFrame | str | os.PathLike, resamples: int = 200, seed: int = 0) -> dict[str, Any]:
    """The price of not knowing the points: score(located) - score(oracle) on the same studies, with a paired
    bootstrap over studies (both submissions resampled with the same studies) for a 90 % interval.

    A few confident misses on Severe rows (weight 4) dominate the score, so on a handful of studies the gap moves by
    tenths from one split to the next; the interval says how far to trust it.
    """
    a, b = match_submission(solution, located), match_submission(solution, oracle)
    score_a, score_b = competition_score(a)["score"], competition_score(b)["score"]
    studies = a["study_id"].unique()
    by_a, by_b = dict(tuple(a.groupby("study_id"))), dict(tuple(b.groupby("study_id")))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        pick = rng.choice(studies, len(studies))
        # a study drawn twice counts twice, as a different study: give each draw its own id (any_severe is per study)
        ra = pd.concat([by_a[s].assign(study_id=i) for i, s in enumerate(pick)], ignore_index=True)
        rb = pd.concat([by_b[s].assign(study_id=i) for i, s in enumerate(pick)], ignore_index=True)
        draws.append(competition_score(ra)["score"] - competition_score(rb)["score"])
    low, high = np.nanpercentile(draws, [5, 95]) if draws else (float("nan"), float("nan"))
    return {"gap": score_a - score_b, "low": float(low), "high": float(high), "studies": len(studies),
            "located": score_a, "oracle": score_b}
