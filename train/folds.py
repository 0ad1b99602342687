"""Cross-validation folds: StratifiedGroupKFold grouped by study (all levels of a patient in one fold, else the
validation score leaks), stratified by label, seeded. Stored with the run as folds.parquet (study_id, fold)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from cache.errors import InputError
from cache.io import atomic_write

log = logging.getLogger(__name__)


def make_folds(index: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """One row per study: study_id, fold. Unlabelled samples form their own stratum (label -1); `index` needs
    study_id, and label to stratify by (absent: one stratum)."""
    studies = index["study_id"].to_numpy(dtype=np.int64)
    n_studies = len(np.unique(studies))
    if n_studies < n_folds:
        raise InputError(f"{n_folds} folds need at least {n_folds} studies; the cache selection has {n_studies}")
    # sort first: the assignment must not depend on the order the cache happened to be written in
    # (study, condition, level) for crops; a task whose samples are other things (series) sorts by study only
    keys = [index[c].astype(str).to_numpy() for c in ("level", "condition") if c in index.columns]
    order = np.lexsort((*keys, studies))
    label = index["label"] if "label" in index.columns else pd.Series(pd.NA, index=index.index)
    y = label.astype("Int64").fillna(-1).to_numpy(dtype=np.int64)[order]
    groups = studies[order]
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of: dict[int, int] = {}
    with warnings.catch_warnings():
        # sklearn warns, with its own source line, when a label has fewer samples than folds: say it once, plainly
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(splitter.split(np.zeros(len(y)), y, groups))
    counts = {int(v): int(n) for v, n in zip(*np.unique(y, return_counts=True))}
    rare = {v: n for v, n in counts.items() if n < n_folds and v >= 0}
    if rare:
        log.warning("labels %s have fewer samples than the %d folds (%s): some folds validate without them",
                    sorted(rare), n_folds, ", ".join(f"{v}: {n}" for v, n in sorted(rare.items())))
    for k, (_, val) in enumerate(splits):
        fold_of.update({int(s): k for s in np.unique(groups[val])})
    out = pd.DataFrame({"study_id": sorted(fold_of)}).astype({"study_id": "int64"})
    out["fold"] = out["study_id"].map(fold_of).astype("int64")
    return out


def save_folds(folds: pd.DataFrame, path: str | Path) -> None:
    atomic_write(path, lambda tmp: folds.to_parquet(tmp, index=False))


def load_folds(path: str | Path) -> pd.DataFrame:
    folds = pd.read_parquet(path)
    if list(folds.columns) != ["study_id", "fold"] or folds["study_id"].duplicated().any():
        raise InputError(f"{path}: expected unique study_id and a fold column, got {list(folds.columns)}")
    return folds


def fold_of_samples(index: pd.DataFrame, folds: pd.DataFrame, positions: np.ndarray | None = None) -> np.ndarray:
    """The fold of every index row, -1 for a study the fold table leaves out. The folds are made from the samples a
    run trains on, so a cache can hold other studies (one with no labelled sample of the trained conditions, or whose
    crops all failed); only a trained row (``positions``, default all) without a fold is an error: another cache?"""
    fold = index["study_id"].astype("int64").map(folds.set_index("study_id")["fold"])
    rows = np.arange(len(index)) if positions is None else np.asarray(positions, dtype=np.int64)
    unfolded = rows[fold.isna().to_numpy()[rows]]
    if len(unfolded):
        studies = pd.unique(index["study_id"].to_numpy()[unfolded])[:5].tolist()
        raise InputError(f"studies {studies} are not in folds.parquet: was the run made on another cache?")
    return fold.fillna(-1).to_numpy(dtype=np.int64)
