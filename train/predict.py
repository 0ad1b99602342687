"""`lsdc predict`: fold-ensemble inference on a test cache -> a Kaggle submission CSV.

Every study x 25 condition-levels gets a row, in the sample submission's order. A condition-level the models could
not see (no coordinate, a sample that failed in prep, a condition no model was trained on) gets the metric-optimal
constant and is listed in `submission_missing.csv` next to the CSV, never dropped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cache.errors import InputError, MissingInput
from cache.io import atomic_write
from cache.rsna import CLASS_WEIGHTS, CONDITIONS, LABEL_COLUMNS, LEVELS, PROB_COLUMNS, label_column, submission_row_ids
from train.evaluate import apply_temperature, read_temperature
from train.metrics import smoothed_mix
from train.score import read_submission

log = logging.getLogger(__name__)
KEY = ["study_id", "condition", "level"]
PROBS = list(PROB_COLUMNS)
MISSING_LOG = "submission_missing.csv"  # the log of the default submission.csv; see missing_log()


def missing_log(out_csv: str | os.PathLike) -> Path:
    """The CSV listing the rows filled with the prior, beside its submission: sub2.csv -> sub2_missing.csv."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}_missing.csv")
# The competition's label mix per condition (Normal/Mild, Moderate, Severe; from its train.csv): the last
# resort when neither a checkpoint nor its run's labels say what the training mix was.
PUBLISHED_MIX: dict[str, tuple[float, float, float]] = dict(zip(CONDITIONS, (
    (0.878, 0.075, 0.048), (0.778, 0.182, 0.040), (0.781, 0.180, 0.039), (0.714, 0.191, 0.095), (0.714, 0.190, 0.096),
)))
_ROW_ID = re.compile(r"^(\d+)_(.+)$")


# ------------------------------------------------------------------------------------------------ checkpoints

def resolve_checkpoints(items: list[str | os.PathLike]) -> list[Path]:
    """Checkpoint files as given; a run directory -> all its fold*/best.pt."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("fold*/best.pt"))
            if not found:
                raise MissingInput(f"run directory {p} holds no fold*/best.pt checkpoint")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise MissingInput(f"no checkpoint or run directory at {p}")
    return out


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The TrainConfig dict saved in a checkpoint (tensors and plain types only: weights_only=True)."""
    from train.checkpoint import checkpoint_kind, load_checkpoint

    ckpt = load_checkpoint(path)
    if checkpoint_kind(ckpt) != "grader":
        raise InputError(f"{path} holds a {checkpoint_kind(ckpt)}, not a grader: predict grades with grader "
                         "checkpoints (the localiser's run goes with --locator)")
    cfg = ckpt.get("config")
    cfg = json.loads(cfg) if isinstance(cfg, str) else cfg
    if not isinstance(cfg, dict) or not cfg.get("conditions"):
        raise InputError(f"{path}: checkpoint has no config with the trained conditions")
    bad = sorted(set(cfg["conditions"]) - set(CONDITIONS))
    if bad:
        raise InputError(f"{path}: checkpoint trained on unknown conditions {bad}")
    return {**cfg, "_class_prior": ckpt.get("class_prior", cfg.get("extra", {}).get("class_prior")),
            "_crop_settings": ckpt.get("crop_settings") or {}}


def check_crops(checkpoints: list[Path], configs: list[dict[str, Any]], reader: Any) -> None:
    """Refuse a cache whose crops were made with other settings than a model's training cache (a model trained on
    50 mm boxes reads 340 mm ones without an error, and predicts nonsense). Checkpoints that do not record their
    training cache's settings (other tools, older lsdc) are not checked."""
    import cache

    given = cache.crop_settings(reader.manifest)
    for path, cfg in zip(checkpoints, configs):
        diff = cache.crop_differences(cfg.get("_crop_settings") or {}, given)
        if diff:
            raise InputError(f"{path} was trained on crops made with other settings than {reader.path}: "
                             f"{'; '.join(diff)} (trained != this cache). Build the cache with the training "
                             "cache's settings (`lsdc cache info` shows them)")
    if (reader.manifest.get("config") or {}).get("split") == "train":
        log.warning("%s was built from the train split: predicting on training studies (for a submission, build "
                    "the test split: lsdc prep --split test --coords ...)", reader.path)


# ------------------------------------------------------------------------------------------------ priors

def metric_optimal(mix: np.ndarray) -> np.ndarray:
    """The constant that minimises the expected weighted log loss for a label mix: p_k proportional to w_k * mix_k."""
    p = np.asarray(CLASS_WEIGHTS, dtype=np.float64) * np.asarray(mix, dtype=np.float64)
    return p / p.sum()


def label_mix(labels: pd.Series) -> np.ndarray | None:
    return smoothed_mix(np.bincount(labels.dropna().to_numpy(dtype=np.int64), minlength=3))


def condition_priors(checkpoints: list[Path], configs: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], dict]:
    """Metric-optimal fill-in value per condition, and where each one's training mix came from.

    The training mix is taken from a checkpoint's stored class prior (lsdc's checkpoints store their fold's training
    mix per condition), else from the labels in its run's oof.parquet (its folds' validation samples), else from the
    competition's published mix.
    """
    priors, source = {}, {}
    for path, cfg in zip(checkpoints, configs):
        stored = cfg.get("_class_prior")
        oof = path.parent.parent / "oof.parquet"
        oof_df = pd.read_parquet(oof, columns=["condition", "label"]) if oof.is_file() else None
        for c in cfg["conditions"]:
            if c in priors:
                continue
            mix = None
            if isinstance(stored, dict) and c in stored:
                mix, source[c] = np.asarray(stored[c], dtype=np.float64), f"{path}: class_prior"
            elif stored is not None and not isinstance(stored, dict):
                mix, source[c] = np.asarray(stored, dtype=np.float64), f"{path}: class_prior"
            elif oof_df is not None and (mix := label_mix(oof_df.loc[oof_df["condition"] == c, "label"])) is not None:
                source[c] = f"{oof}: labels"
            if mix is not None:
                priors[c] = metric_optimal(mix / mix.sum())
    for c in CONDITIONS:
        if c not in priors:
            priors[c], source[c] = metric_optimal(np.asarray(PUBLISHED_MIX[c])), "published competition mix"
    return priors, source


# ------------------------------------------------------------------------------------------------ rows

def parse_row_id(rid: str) -> tuple[int, str]:
    m = _ROW_ID.match(str(rid))
    if not m or m.group(2) not in LABEL_COLUMNS:
        raise InputError(f"sample submission row id {rid!r} is not '<study_id>_<condition>_<level>'")
    return int(m.group(1)), m.group(2)


def split_studies(manifest: dict[str, Any]) -> set[int]:
    """Every study of the split the cache was built from, so a study without a single coordinate still gets its 25
    rows: as prep recorded them (`prep.split_studies`), else per the data folder's `{split}_series_descriptions.csv`
    (a cache from before that record, with its data folder still there); empty when neither is known."""
    if "split_studies" in manifest.get("prep", {}):
        return {int(s) for s in manifest["prep"]["split_studies"]}
    data_dir, split = manifest.get("prep", {}).get("data_dir"), manifest.get("config", {}).get("split")
    table = Path(data_dir) / f"{split}_series_descriptions.csv" if data_dir and split else None
    if table is None or not table.exists():
        return set()
    return {int(s) for s in pd.read_csv(table, usecols=["study_id"])["study_id"]}


def submission_rows(sample_submission: str | os.PathLike | None, studies: list[int]) -> pd.DataFrame:
    """row_id, study_id, condition, level in the submission's order: the sample submission's when given."""
    names = {label_column(c, lv): (c, lv) for c in CONDITIONS for lv in LEVELS}
    if sample_submission is not None:
        ids = read_submission(sample_submission)["row_id"].astype(str).tolist()
        if not ids:
            raise InputError(f"{sample_submission}: a header and no rows; a sample submission lists every row id "
                             "(study x 25 condition-levels) to predict")
        parsed = [parse_row_id(r) for r in ids]
        sample_studies = list(dict.fromkeys(s for s, _ in parsed))
        if set(ids) != set(submission_row_ids(sample_studies)):
            raise InputError(f"{sample_submission}: not every study has all 25 condition-levels")
        if extra := sorted(set(studies) - set(sample_studies)):
            log.warning("%d cached studies are not in the sample submission; left out: %s", len(extra), extra[:5])
    else:
        ids = submission_row_ids(sorted(set(studies)))
        parsed = [parse_row_id(r) for r in ids]
    cond_level = [names[name] for _, name in parsed]
    return pd.DataFrame({"row_id": ids, "study_id": [s for s, _ in parsed],
                         "condition": [c for c, _ in cond_level], "level": [lv for _, lv in cond_level]})


# ------------------------------------------------------------------------------------------------ inference

def model_predictions(checkpoints: list[Path], configs: list[dict[str, Any]], reader: Any, device: str,
                      tta: bool) -> pd.DataFrame:
    """Mean probabilities per (study, condition, level), each condition averaged over the models trained on it.

    Every checkpoint counts once per sample (a condition-level cropped twice is first averaged within the model).
    """
    import torch

    from train.checkpoint import model_from_checkpoint
    from train.infer import predict_cache

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cached = set(reader.index["condition"])
    frames = []
    for path, cfg in zip(checkpoints, configs):
        if not cached & set(cfg["conditions"]):
            log.warning("%s: the cache holds none of its conditions %s; skipped", path, cfg["conditions"])
            continue
        pred = predict_cache(model_from_checkpoint(path), reader, device=device, tta=tta)  # its conditions only
        frames.append(pred.groupby(KEY, as_index=False)[PROBS].mean())
    if not frames:
        return pd.DataFrame(columns=KEY + PROBS)
    return pd.concat(frames, ignore_index=True).groupby(KEY, as_index=False)[PROBS].mean()


def missing_reason(rows: pd.DataFrame, predicted: pd.DataFrame, errors: pd.DataFrame,
                   trained: set[str], located: dict[tuple, str] | None = None) -> pd.Series:
    """Why a submission row has no model prediction ('' when it has one). `located`: why the localiser found no
    point, by (study, condition, level), for rows that have no crop."""
    keys = rows[KEY].astype({"study_id": np.int64})
    have = keys.merge(predicted[KEY].astype({"study_id": np.int64}).drop_duplicates(), on=KEY, how="left",
                      indicator=True)["_merge"].eq("both").to_numpy()
    failed: dict[tuple, str] = {}
    if len(errors) and set(KEY) <= set(errors.columns):
        for r in errors.dropna(subset=KEY).itertuples(index=False):
            failed.setdefault((int(r.study_id), r.condition, r.level), f"failed sample ({r.stage}): {r.reason}")
    reasons = []
    for ok, (study, condition, level) in zip(have, keys.itertuples(index=False, name=None)):
        if ok:
            reasons.append("")
        elif condition not in trained:
            reasons.append("no model trained on this condition")
        else:
            reasons.append(failed.get((study, condition, level), (located or {}).get(
                (study, condition, level), "no crop in the cache (no coordinate)")))
    return pd.Series(reasons, index=rows.index)


def assemble(rows: pd.DataFrame, predicted: pd.DataFrame, errors: pd.DataFrame, trained: set[str],
             priors: dict[str, np.ndarray], located: dict[tuple, str] | None = None
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Submission rows (row_id + probabilities, in `rows`' order) and the log of rows filled with the prior."""
    predicted = predicted.astype({"study_id": np.int64})
    sub = rows.merge(predicted[KEY + PROBS], on=KEY, how="left", validate="one_to_one")
    sub["reason"] = missing_reason(sub, predicted, errors, trained, located)
    miss = sub["reason"] != ""
    if miss.any():
        sub.loc[miss, PROBS] = np.stack([priors[c] for c in sub.loc[miss, "condition"]])
    p = sub[PROBS].to_numpy(dtype=np.float64)
    sub[PROBS] = p / p.sum(axis=1, keepdims=True)  # exact unit rows whatever the models or T did
    return sub[["row_id", *PROBS]].reset_index(drop=True), sub.loc[miss, ["row_id", "condition", "reason"]]


def predict(checkpoints: list[str | os.PathLike], cache_path: str | os.PathLike, out_csv: str | os.PathLike,
            sample_submission: str | os.PathLike | None = None, tta: bool = False, device: str = "auto",
            temperature: str | os.PathLike | dict[str, float] | None = None,
            located: dict[tuple, str] | None = None) -> pd.DataFrame:
    """Write a Kaggle submission (row_id, normal_mild, moderate, severe) and return it.

    `temperature`: a temperature.json from `lsdc evaluate --calibrate` (or {group: T}) applied to model outputs.
    `located`: why the localiser found no point, by (study_id, condition, level) (coordinate-free prediction).
    Rows without a model prediction get the metric-optimal prior and are listed in `submission_missing.csv`
    (row_id, condition, reason, prior_source) next to `out_csv`.
    """
    import cache

    paths = resolve_checkpoints(checkpoints)
    configs = [checkpoint_config(p) for p in paths]
    reader = cache.open(cache_path)
    check_crops(paths, configs, reader)
    errors = reader.errors
    known = split_studies(reader.manifest)  # every study of the test set, even one with no coordinates at all
    studies = {int(s) for s in reader.index["study_id"]} | known
    if "study_id" in errors.columns:  # a study whose every crop failed is still a study of the test set, but not
        failed = {int(s) for s in errors["study_id"].dropna()}  # one that only a stray coordinate row names
        studies |= (failed & known) if known else failed
    rows = submission_rows(sample_submission, sorted(studies))
    predicted = model_predictions(paths, configs, reader, device, tta)
    if temperature is not None:
        temps = temperature if isinstance(temperature, dict) else read_temperature(temperature)
        predicted = apply_temperature(predicted, temps)

    priors, prior_source = condition_priors(paths, configs)
    trained = {c for cfg in configs for c in cfg["conditions"]}
    submission, missing = assemble(rows, predicted, errors, trained, priors, located)
    missing = missing.assign(prior_source=missing["condition"].map(prior_source))

    out_csv = Path(out_csv)
    atomic_write(out_csv, lambda tmp: submission.to_csv(tmp, index=False))
    atomic_write(missing_log(out_csv), lambda tmp: missing.to_csv(tmp, index=False))
    log.info("wrote %s: %d rows, %d from models, %d filled with the prior (listed in %s)", out_csv, len(submission),
             len(submission) - len(missing), len(missing), missing_log(out_csv).name)
    return submission
