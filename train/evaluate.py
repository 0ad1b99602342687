"""`lsdc evaluate`: the official score of out-of-fold predictions, per-condition/level accuracy, temperature scaling.

Torch-free (numpy, pandas, scipy, scikit-learn). Inputs are run directories (their `oof.parquet`) or OOF Parquet
files; several inputs are pooled (e.g. one run per condition), and a (study, condition, level) predicted by more
than one input gets the mean of their probabilities (an ensemble).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from cache.errors import InputError, MissingInput
from cache.io import atomic_write_json, atomic_write_text, json_safe
from cache.rsna import CONDITION_GROUP, CONDITIONS, LABELS, LEVELS, PROB_COLUMNS
from train.metrics import balanced_accuracy, confusion_matrix, per_class_recall
from train.score import (GROUPS, PARTS, competition_score, group_log_loss, labels_long, match_submission,
                         normalise_probs, scored_rows)

KEY = ["study_id", "condition", "level"]
PROBS = list(PROB_COLUMNS)
T_BOUNDS = (0.05, 20.0)  # a temperature outside this range means the predictions are broken, not miscalibrated


# ------------------------------------------------------------------------------------------------ loading

def oof_path(item: str | os.PathLike) -> Path:
    """A run directory -> its oof.parquet; a Parquet file -> itself."""
    p = Path(item)
    if not p.exists():
        raise MissingInput(f"{p} does not exist (give a run directory, an OOF .parquet or a submission .csv)")
    if p.is_dir():
        p = p / "oof.parquet"
    if not p.is_file():
        raise MissingInput(f"no OOF predictions at {p} (give a run directory holding oof.parquet, or a .parquet)")
    return p


def load_predictions(inputs: list[str | os.PathLike], labels_csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """Pool OOF predictions (run directories, .parquet files) or Kaggle submissions (.csv, scored against
    `labels_csv`): one row per (study, condition, level) with label, probabilities and fold (if known)."""
    frames = []
    for item in inputs:
        if Path(item).suffix.lower() == ".csv":
            frames.append(submission_predictions(item, labels_csv))
            continue
        path = oof_path(item)
        df = pd.read_parquet(path)
        if missing := [c for c in (*KEY, *PROBS) if c not in df.columns]:
            raise InputError(f"{path}: lacks columns {missing} (oof.parquet contract: docs/architecture.md)")
        df[PROBS] = normalise_probs(df[PROBS].to_numpy(), str(path))
        frames.append(df.assign(source=str(path)))
    pooled = pd.concat(frames, ignore_index=True)
    pooled["study_id"] = pooled["study_id"].astype(np.int64)
    agg: dict[str, Any] = {c: "mean" for c in PROBS}
    for col in ("label", "fold"):
        if col in pooled.columns:
            agg[col] = "first"
    out = pooled.groupby(KEY, sort=True).agg(agg).reset_index()
    if labels_csv is not None:  # the labels table is the truth: it overrides whatever the OOF file carried
        truth = labels_long(labels_csv)[[*KEY, "label"]]
        out = out.drop(columns="label", errors="ignore").merge(truth, on=KEY, how="left")
    if "label" not in out.columns:
        raise InputError("the OOF predictions carry no label column: pass labels_csv (train.csv format)")
    out["label"] = out["label"].astype("Int8")
    return out


def submission_predictions(path: str | os.PathLike, labels_csv: str | os.PathLike | None) -> pd.DataFrame:
    """A submission CSV as predictions of the labels' rows: its row ids must be exactly theirs, as on Kaggle."""
    if not Path(path).is_file():
        raise MissingInput(f"no submission at {path}")
    if labels_csv is None:
        raise InputError(f"{path} is a submission: pass --labels with its solution (train.csv format, e.g. the "
                         "synthetic test_labels.csv)")
    df = match_submission(labels_csv, path)
    df[PROBS] = normalise_probs(df[PROBS].to_numpy(), str(path))
    return df[[*KEY, *PROBS, "label"]].assign(source=str(path))


# ------------------------------------------------------------------------------------------------ accuracy

def class_report(rows: pd.DataFrame) -> dict[str, Any]:
    """Confusion matrix (true x predicted, argmax), per-class recall and balanced accuracy of scored rows, from
    train.metrics (the one implementation): balanced accuracy is the mean recall over the classes present in the
    truth (sklearn's definition); a class absent from the truth has recall None."""
    y = rows["label"].to_numpy(dtype=np.int64)
    cm = confusion_matrix(y, rows[PROBS].to_numpy().argmax(axis=1))
    recall = [None if np.isnan(r) else float(r) for r in per_class_recall(cm)]
    ba = balanced_accuracy(cm)
    return {
        "n": int(len(rows)),
        "balanced_accuracy": None if np.isnan(ba) else ba,
        "recall": dict(zip(LABELS, recall)),
        "support": dict(zip(LABELS, cm.sum(axis=1).tolist())),
        "predicted": dict(zip(LABELS, cm.sum(axis=0).tolist())),
        "confusion": cm.tolist(),
    }


def breakdown(rows: pd.DataFrame, column: str, values: tuple[str, ...]) -> dict[str, Any]:
    return {v: class_report(rows[rows[column] == v]) for v in values if (rows[column] == v).any()}


# ------------------------------------------------------------------------------------------------ temperature

def apply_temperature(df: pd.DataFrame, temperatures: dict[str, float]) -> pd.DataFrame:
    """p -> p^(1/T) renormalised, with T chosen by the row's condition group (softmax(logits / T) on probabilities).

    Groups without a temperature are left as they are.
    """
    out = df.copy()
    for group, t in temperatures.items():
        sel = out["condition"].map(CONDITION_GROUP) == group
        if sel.any():
            logp = np.log(np.clip(out.loc[sel, PROBS].to_numpy(dtype=np.float64), 1e-15, 1.0)) / float(t)
            p = np.exp(logp - logp.max(axis=1, keepdims=True))
            out.loc[sel, PROBS] = p / p.sum(axis=1, keepdims=True)
    return out


def fit_temperature(df: pd.DataFrame) -> dict[str, float]:
    """One T per condition group minimising that group's weighted log loss (a bounded 1-D search on log T)."""
    rows = scored_rows(df)
    temps = {}
    for group in GROUPS:
        g = rows[rows["group"] == group]
        if g.empty:
            continue

        def loss(log_t: float, g: pd.DataFrame = g, group: str = group) -> float:
            return group_log_loss(apply_temperature(g, {group: math.exp(log_t)}))

        res = minimize_scalar(loss, bounds=tuple(math.log(b) for b in T_BOUNDS), method="bounded",
                              options={"xatol": 1e-4})
        temps[group] = float(math.exp(res.x))
    return temps


def read_temperature(path: str | os.PathLike) -> dict[str, float]:
    """temperature.json (written by evaluate) -> {group: T}."""
    data = json.loads(Path(path).read_text())
    temps = data.get("temperature", data)
    if bad := set(temps) - set(GROUPS):
        raise InputError(f"{path}: unknown condition groups {sorted(bad)}; expected some of {GROUPS}")
    return {g: float(t) for g, t in temps.items()}


# ------------------------------------------------------------------------------------------------ evaluate

def evaluate(inputs: list[str | os.PathLike], labels_csv: str | os.PathLike | None = None,
             out_dir: str | os.PathLike | None = None, calibrate: bool = False) -> dict[str, Any]:
    """Score OOF predictions; write score.json + score.md (and temperature.json when calibrating) into `out_dir`.

    `inputs`: run directories or OOF .parquet files, or submission .csv files scored against `labels_csv` (as
    Kaggle scores them). `out_dir` defaults to the run directory when exactly one run directory is given; otherwise
    nothing is written unless it is set.
    """
    inputs = [Path(i) for i in inputs]
    if not inputs:
        raise InputError("evaluate needs at least one run directory or OOF parquet")
    df = load_predictions(inputs, labels_csv)
    rows = scored_rows(df)
    result: dict[str, Any] = {
        "inputs": [str(i) for i in inputs],
        "labels_csv": str(labels_csv) if labels_csv else None,
        "n_predictions": int(len(df)),
        "n_scored": int(len(rows)),
        "score": competition_score(df, details=True),
        "overall": class_report(rows),
        "per_group": breakdown(rows, "group", GROUPS),
        "per_condition": breakdown(rows, "condition", CONDITIONS),
        "per_level": breakdown(rows, "level", LEVELS),
    }
    if labels_csv is not None:  # labelled cells the models never saw (no coordinate, failed crop, untrained condition)
        truth = labels_long(labels_csv)
        have = truth[KEY].merge(df[KEY], on=KEY, how="left", indicator=True)["_merge"] == "both"
        result["n_labelled_without_prediction"] = int((truth["label"].notna() & ~have.to_numpy()).sum())
    if "fold" in df.columns and df["fold"].notna().any():
        result["per_fold"] = {int(k): competition_score(g)["score"] for k, g in df.groupby("fold")}
    if calibrate:
        temps = fit_temperature(df)
        after = competition_score(apply_temperature(df, temps), details=True)
        result["temperature"] = {"temperature": temps, "before": result["score"], "after": after}
    if out_dir is None and len(inputs) == 1 and inputs[0].is_dir():
        out_dir = inputs[0]
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
        result["written_to"] = str(out_dir)
    return result


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    atomic_write_json(out_dir / "score.json", json_safe(result))
    atomic_write_text(out_dir / "score.md", markdown(result))
    if "temperature" in result:
        t = result["temperature"]
        atomic_write_json(out_dir / "temperature.json", json_safe({
            "temperature": t["temperature"], "score_before": t["before"]["score"], "score_after": t["after"]["score"],
            "fitted_on": result["inputs"],
        }))


# ------------------------------------------------------------------------------------------------ markdown

def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _accuracy_table(title: str, reports: dict[str, Any]) -> list[str]:
    lines = [f"## {title}", "", "| | n | balanced acc. | " + " | ".join(f"recall {c}" for c in LABELS) + " |",
             "|---|---:|---:|" + "---:|" * len(LABELS)]
    for name, r in reports.items():
        recalls = " | ".join(_num(r["recall"][c], 3) for c in LABELS)
        lines.append(f"| {name} | {r['n']} | {_num(r['balanced_accuracy'], 3)} | {recalls} |")
    return lines + [""]


def _confusion(name: str, r: dict[str, Any]) -> list[str]:
    lines = [f"**{name}** (rows: truth, columns: argmax prediction)", "", "| | " + " | ".join(LABELS) + " |",
             "|---|" + "---:|" * len(LABELS)]
    lines += [f"| {LABELS[k]} | " + " | ".join(str(v) for v in row) + " |" for k, row in enumerate(r["confusion"])]
    return lines + [""]


def markdown(result: dict[str, Any]) -> str:
    s = result["score"]
    lines = ["# Evaluation", "", f"Inputs: {', '.join(result['inputs'])}  ", f"Scored rows: {result['n_scored']} of "
             f"{result['n_predictions']} predictions (rows without a label are not scored).", ""]
    if s["partial"]:
        lines += [f"**Partial score**: no scored rows for {', '.join(s['missing_parts'])}; the score is the mean of "
                  "the other parts and is not comparable with the competition's number.", ""]
    if result.get("n_labelled_without_prediction"):
        lines += [f"{result['n_labelled_without_prediction']} labelled cells of the labels table have no prediction "
                  "and are not in this score.", ""]
    lines += ["## Competition score (weighted log loss, lower is better)", ""]
    t = result.get("temperature")
    if t:
        lines += ["| part | n | before | after temperature | T |", "|---|---:|---:|---:|---:|"]
        for p in (*PARTS, "score"):
            n = s.get(f"n_{p}", "")
            temp = _num(t["temperature"].get(p), 3) if p in GROUPS and p in t["temperature"] else ""
            lines.append(f"| {p} | {n} | {_num(s[p])} | {_num(t['after'][p])} | {temp} |")
        lines += ["", "Temperatures are fitted on these same predictions, so the 'after' column is optimistic.", ""]
    else:
        lines += ["| part | n | log loss |", "|---|---:|---:|"]
        lines += [f"| {p} | {s.get(f'n_{p}', '')} | {_num(s[p])} |" for p in (*PARTS, "score")]
        lines.append("")
    if "per_fold" in result:
        lines += ["Per fold: " + ", ".join(f"fold {k} {_num(v)}" for k, v in result["per_fold"].items()), ""]
    lines += _accuracy_table("Per condition", result["per_condition"])
    lines += _accuracy_table("Per level", result["per_level"])
    lines += _accuracy_table("Per condition group", result["per_group"])
    lines += ["## Confusion matrices", ""]
    for name, r in result["per_condition"].items():
        lines += _confusion(name, r)
    return "\n".join(lines)
