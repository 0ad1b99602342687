"""The competition's CSV tables: drawing labels with the real per-condition mix, reading real tables, writing ours.

Every header and string comes from cache.rsna; row order follows the real files: studies ascending, series ascending
within a study, coordinates by (study, series, instance, condition, level), the submission in
cache.rsna.submission_row_ids order.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from cache.io import atomic_write
from cache.rsna import CONDITION_GROUP, CONDITIONS, LABEL_COLUMNS, LABELS, LEVELS, PROB_COLUMNS, label_column, \
    submission_row_ids

# Real per-condition label mix (Normal/Mild, Moderate, Severe), counted from the competition's train.csv.
LABEL_MIX: dict[str, tuple[float, float, float]] = {
    "spinal": (0.878, 0.075, 0.048),
    "foraminal": (0.780, 0.181, 0.039),
    "subarticular": (0.714, 0.191, 0.095),
}
# Degeneration is commonest at L4/L5 and L5/S1 (a latent score offset per level).
LEVEL_OFFSET = (-0.9, -0.5, 0.0, 0.6, 0.3)
# Latent score = 0.9 * study age + level offset + 0.6 * shared left/right term + 0.8 * noise.
_W_STUDY, _W_PAIR, _W_OWN = 0.9, 0.6, 0.8
EMPTY_STUDY_RATE = 0.09  # real: 185 of 1,975 studies have empty cells

COORD_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
SERIES_COLUMNS = ("study_id", "series_id", "series_description")


def _norm_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _thresholds(mix: tuple[float, float, float]) -> tuple[float, float]:
    """Score thresholds (moderate, severe) whose marginal over the five levels gives the mix."""
    sd = math.sqrt(_W_STUDY**2 + _W_PAIR**2 + _W_OWN**2)

    def above(t: float) -> float:
        return sum(1 - _norm_cdf((t - off) / sd) for off in LEVEL_OFFSET) / len(LEVEL_OFFSET)

    def solve(p: float) -> float:
        lo, hi = -10.0, 10.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if above(mid) > p else (lo, mid)
        return (lo + hi) / 2

    return solve(mix[1] + mix[2]), solve(mix[2])


THRESHOLDS = {g: _thresholds(m) for g, m in LABEL_MIX.items()}


def draw_labels(rng: np.random.Generator) -> dict[str, str | None]:
    """One study's 25 labels: correlated across levels and sides like real degeneration; a few empty cells."""
    age = rng.normal()
    pair = {(CONDITION_GROUP[c], lv): rng.normal() for c in CONDITIONS for lv in LEVELS}
    labels: dict[str, str | None] = {}
    for c in CONDITIONS:
        t_mod, t_sev = THRESHOLDS[CONDITION_GROUP[c]]
        for i, lv in enumerate(LEVELS):
            score = _W_STUDY * age + LEVEL_OFFSET[i] + _W_PAIR * pair[CONDITION_GROUP[c], lv] + _W_OWN * rng.normal()
            labels[label_column(c, lv)] = LABELS[int(score > t_mod) + int(score > t_sev)]
    if rng.random() < EMPTY_STUDY_RATE:  # real empties: mostly a whole condition (a series not read), else a few
        if rng.random() < 0.5:
            c = CONDITIONS[int(rng.integers(len(CONDITIONS)))]
            empty = [label_column(c, lv) for lv in LEVELS]
        else:
            empty = list(rng.choice(LABEL_COLUMNS, size=int(rng.integers(1, 4)), replace=False))
        for col in empty:
            labels[col] = None
    return labels


def read_real(directory: str | Path, n: int) -> list[dict]:
    """The first n studies of real competition tables: ids, series + descriptions, labels, coordinate rows."""
    d = Path(directory)
    train = pd.read_csv(d / "train.csv", dtype={c: "string" for c in LABEL_COLUMNS})
    series = pd.read_csv(d / "train_series_descriptions.csv")
    coords = pd.read_csv(d / "train_label_coordinates.csv")
    missing = [c for c in ("study_id", *LABEL_COLUMNS) if c not in train.columns]
    if missing:
        raise ValueError(f"{d / 'train.csv'}: missing columns {missing}")
    studies = []
    for _, row in train.head(n).iterrows():
        sid = int(row["study_id"])
        ser = series[series.study_id == sid].sort_values("series_id")
        studies.append(dict(
            study_id=sid,
            series=[(int(r.series_id), str(r.series_description)) for r in ser.itertuples()],
            labels={c: (None if pd.isna(row[c]) else str(row[c])) for c in LABEL_COLUMNS},
            coords=[dict(series_id=int(r.series_id), instance_number=int(r.instance_number), condition=r.condition,
                         level=r.level) for r in coords[coords.study_id == sid].itertuples()],
        ))
    return studies


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, lineterminator="\n"))


def labels_frame(studies: list[dict]) -> pd.DataFrame:
    rows = [{"study_id": s["study_id"], **{c: s["labels"][c] for c in LABEL_COLUMNS}} for s in studies]
    return pd.DataFrame(rows, columns=["study_id", *LABEL_COLUMNS]).sort_values("study_id", kind="stable")


def series_frame(studies: list[dict]) -> pd.DataFrame:
    rows = [(s["study_id"], sid, desc) for s in studies for sid, desc in s["series"]]
    return pd.DataFrame(rows, columns=list(SERIES_COLUMNS)).sort_values(["study_id", "series_id"], kind="stable")


def coords_frame(studies: list[dict]) -> pd.DataFrame:
    rows = [{"study_id": s["study_id"], **{k: r[k] for k in COORD_COLUMNS[1:]}} for s in studies for r in s["coords"]]
    df = pd.DataFrame(rows, columns=list(COORD_COLUMNS))
    order = {"condition": CONDITIONS.index, "level": LEVELS.index}
    df = df.sort_values(["study_id", "series_id", "instance_number", "condition", "level"], kind="stable",
                        key=lambda col: col.map(order[col.name]) if col.name in order else col)
    df[["x", "y"]] = df[["x", "y"]].astype(float).round(7)
    return df.reset_index(drop=True)


def write_tables(out: Path, train: list[dict], test: list[dict]) -> None:
    """All competition CSVs plus test_label_coordinates.csv (localizer output) and test_labels.csv (truth)."""
    _write_csv(out / "train.csv", labels_frame(train))
    _write_csv(out / "train_series_descriptions.csv", series_frame(train))
    _write_csv(out / "train_label_coordinates.csv", coords_frame(train))
    _write_csv(out / "test_series_descriptions.csv", series_frame(test))
    _write_csv(out / "test_label_coordinates.csv", coords_frame(test))
    _write_csv(out / "test_labels.csv", labels_frame(test))
    ids = submission_row_ids(sorted(s["study_id"] for s in test))
    sub = pd.DataFrame({"row_id": ids, **{c: [1 / 3] * len(ids) for c in PROB_COLUMNS}})
    _write_csv(out / "sample_submission.csv", sub)
