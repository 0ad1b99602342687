"""The competition tables -> one sample per labelled point, plus an error row for every row that cannot be one.

A broken table (missing, empty, wrong header) is a TableError naming the file; a bad row (non-integer or path-like
id, unknown condition/level/description, NaN coordinate, duplicate, label without coordinates, coordinate for an
unknown study) becomes an error row naming the file and line, and the build goes on without it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cache.errors import InputError
from cache.format import ERRORS_COLUMNS
from cache.rsna import CONDITIONS, LABEL_COLUMNS, LEVELS, SERIES_DESCRIPTIONS, label_code, label_column
from prep.config import PrepConfig

COORD_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
SERIES_COLUMNS = ("study_id", "series_id", "series_description")
SAMPLE_COLUMNS = ("row", "study_id", "series_id", "series_description", "condition", "level", "instance_number",
                  "x", "y", "label")
_INT = re.compile(r"[0-9]{1,19}")  # a plain non-negative integer: no sign, dots, slashes, spaces or newline


def is_id(text: object) -> bool:
    """An id we may turn into a path component: ASCII digits only (fullmatch, as '$' also matches before a final
    newline) and within int64, the index's type."""
    return _INT.fullmatch(str(text)) is not None and int(str(text)) < 2**63


class TableError(InputError):
    """A table that cannot be read at all (missing, empty, wrong header)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """Every cell as a string (ids are validated, not coerced), with the file's line number of each row."""
    if not path.exists():
        raise TableError(path, "missing file")
    if not path.is_file():
        raise TableError(path, "not a regular file (a folder, FIFO or device): not read")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise TableError(path, "empty file (no header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise TableError(path, f"not a readable CSV ({e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TableError(path, f"wrong header: missing columns {missing} (found {list(df.columns)[:8]})")
    df["line"] = np.arange(len(df)) + 2  # 1-based, after the header line
    return df


def error(path: Path | str, line: int | None, reason: str, *, stage: str = "tables", study_id: object = None,
          series_id: object = None, instance_number: object = None, condition: str | None = None,
          level: str | None = None) -> dict:
    """One errors-table row; ids are kept only when they are valid integers."""
    def as_id(v: object) -> int | None:
        return int(v) if v is not None and is_id(v) else None

    where = f"{path}:{line}" if line is not None else str(path)
    return dict(study_id=as_id(study_id), series_id=as_id(series_id), instance_number=as_id(instance_number),
                condition=condition, level=level, path=where, stage=stage, reason=reason)


def _bad_ids(row: tuple, names: tuple[str, ...]) -> str | None:
    bad = [f"{n} {getattr(row, n)!r}" for n in names if not is_id(getattr(row, n))]
    return f"{', '.join(bad)} not a non-negative integer id" if bad else None


def series_table(path: Path, errors: list[dict]) -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], str]]:
    """-> ((study, series) -> description, (study, series) -> why that series is unusable, e.g. an unknown
    description; it is reported on every sample that points at the series)."""
    good: dict[tuple[int, int], str] = {}
    bad: dict[tuple[int, int], str] = {}
    first: dict[tuple[int, int], tuple[int, str]] = {}  # (study, series) -> (line, description) as first listed
    for r in read_table(path, SERIES_COLUMNS).itertuples(index=False):
        reason = _bad_ids(r, ("study_id", "series_id"))
        key = (int(r.study_id), int(r.series_id)) if reason is None else None
        if key in first:  # listed again: the same row is harmless; another description cannot both be true
            line, desc = first[key]
            if desc != r.series_description:
                good.pop(key, None)
                bad[key] = (f"series listed twice with different descriptions: {desc!r} ({path.name}:{line}) and "
                            f"{r.series_description!r} ({path.name}:{r.line})")
            continue
        if key is not None:
            first[key] = (r.line, r.series_description)
        if reason is not None:
            errors.append(error(path.name, r.line, reason, study_id=r.study_id, series_id=r.series_id))
        elif r.series_description not in SERIES_DESCRIPTIONS:
            bad[int(r.study_id), int(r.series_id)] = f"unknown series description {r.series_description!r} " \
                                                     f"({path.name}:{r.line})"
        else:
            good[int(r.study_id), int(r.series_id)] = r.series_description
    return good, bad


def split_studies(data_dir: str | Path, split: str) -> list[int]:
    """Every study of a split: those with a series in ``{split}_series_descriptions.csv`` (an unknown description
    included), so a test study without any usable coordinate still gets its submission rows."""
    good, bad = series_table(Path(data_dir) / f"{split}_series_descriptions.csv", [])
    return sorted({study for study, _ in (*good, *bad)})


def _labels_table(path: Path, errors: list[dict]) -> dict[int, tuple[int, tuple]]:
    """study -> (line, row) of train.csv, with invalid ids and unknown label strings reported."""
    df = read_table(path, ("study_id", *LABEL_COLUMNS))
    out: dict[int, tuple[int, tuple]] = {}
    for r in df.itertuples(index=False):
        reason = _bad_ids(r, ("study_id",))
        if reason is not None:
            errors.append(error(path.name, r.line, reason, study_id=r.study_id))
            continue
        if int(r.study_id) in out:
            errors.append(error(path.name, r.line, f"duplicate study, first at line {out[int(r.study_id)][0]}",
                                study_id=r.study_id))
            continue
        out[int(r.study_id)] = (int(r.line), r)
    return out


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # as a CSV writes a number: no '1_70.49', no 'nan'


def _number(text: str) -> float | None:
    """A finite decimal number written plainly; Python's float() would also take '1_70.49' (as 170.49) or ' 5 '."""
    if _NUMBER.fullmatch(str(text)) is None:
        return None
    v = float(text)
    return v if np.isfinite(v) else None


def _label(r: tuple, condition: str, level: str) -> int | None:
    return label_code(getattr(r, label_column(condition, level)))


def read_samples(data_dir: str | Path, config: PrepConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """-> (samples with SAMPLE_COLUMNS in row order, table errors with cache.format.ERRORS_COLUMNS).

    Row order is deterministic: study, then condition and level in the competition's order.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TableError(data_dir, "no such folder (give the competition's data folder: train.csv, "
                         "train_series_descriptions.csv, train_images/ ...)")
    if (data_dir / "zarr.json").is_file():
        raise TableError(data_dir, "this is an lsdc crop cache; prep reads the competition's data folder (train.csv, "
                         "train_series_descriptions.csv, train_images/ ...)")
    split = config.split
    errors: list[dict] = []
    series, bad_series = series_table(data_dir / f"{split}_series_descriptions.csv", errors)
    labels = _labels_table(data_dir / "train.csv", errors) if split == "train" else {}
    known_studies = sorted(labels) if split == "train" else sorted({s for s, _ in series})
    known = set(known_studies)
    studies = set(known_studies[: config.studies] if config.studies else known_studies)
    if config.coords:
        coords_path = Path(config.coords)
    elif split == "train":
        coords_path = data_dir / "train_label_coordinates.csv"
    else:
        raise TableError(data_dir / "test_images", "the test split has no coordinates: pass a coordinates CSV")
    coords = read_table(coords_path, COORD_COLUMNS)
    name = coords_path.name

    samples: list[dict] = []
    first_line: dict[tuple[int, str, str], int] = {}
    # Keys some coordinate row stands for, even a bad one: its error explains a missing label, which is not reported
    # a second time (a row with an unknown level stands for every level of its study and condition).
    claimed: set[tuple[int, str, str]] = set()
    for r in coords.itertuples(index=False):
        where = dict(study_id=r.study_id, series_id=r.series_id, instance_number=r.instance_number,
                     condition=r.condition if r.condition in CONDITIONS else None,
                     level=r.level if r.level in LEVELS else None)
        reason = _bad_ids(r, ("study_id", "series_id", "instance_number"))
        if reason is None and r.condition not in CONDITIONS:
            reason = f"unknown condition {r.condition!r}"
            claimed.update((int(r.study_id), c, r.level) for c in CONDITIONS)  # its label is explained by this row
        if reason is None and r.level not in LEVELS:
            reason = f"unknown level {r.level!r}"
            claimed.update((int(r.study_id), r.condition, lv) for lv in LEVELS)
        if reason is None:
            study, ser = int(r.study_id), int(r.series_id)
            if r.condition not in config.conditions or (study in known and study not in studies):
                continue  # not selected: neither a sample nor an error
            key = (study, r.condition, r.level)
            claimed.add(key)
            x, y = _number(r.x), _number(r.y)
            if x is None or y is None:
                reason = f"coordinate x={r.x!r}, y={r.y!r} is not a finite number"
            elif split == "train" and study not in labels:
                reason = f"study {study} is not in train.csv"
            elif (study, ser) in bad_series:
                reason = bad_series[study, ser]
            elif (study, ser) not in series:
                reason = f"series {ser} of study {study} is not in {split}_series_descriptions.csv"
            elif key in first_line:
                reason = f"duplicate coordinate for {key}, first at line {first_line[key]}"
        if reason is not None:
            errors.append(error(name, r.line, reason, **where))
            continue
        first_line[key] = int(r.line)
        label = None
        if split == "train":
            line, lab = labels[study]
            try:
                label = _label(lab, r.condition, r.level)
            except ValueError as e:
                errors.append(error("train.csv", line, str(e), **where))
                continue
        samples.append(dict(study_id=study, series_id=ser, series_description=series[study, ser],
                            condition=r.condition, level=r.level, instance_number=int(r.instance_number),
                            x=float(x), y=float(y), label=label))

    if split == "train":  # a label nobody can crop: the user should know it is missing from the cache
        for study in sorted(studies):
            line, lab = labels[study]
            for c in config.conditions:
                for lv in LEVELS:
                    cell = getattr(lab, label_column(c, lv))
                    if cell != "" and (study, c, lv) not in claimed:
                        errors.append(error("train.csv", line, f"label {cell!r} without coordinates",
                                            study_id=study, condition=c, level=lv))
    return _samples_frame(samples), errors_frame(errors)


def _samples_frame(samples: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(samples, columns=[c for c in SAMPLE_COLUMNS if c != "row"])
    order = df.assign(_c=df.condition.map(CONDITIONS.index), _l=df.level.map(LEVELS.index))
    df = df.loc[order.sort_values(["study_id", "_c", "_l"], kind="stable").index].reset_index(drop=True)
    df.insert(0, "row", np.arange(len(df), dtype=np.int64))
    df["label"] = df["label"].astype("Int8")
    return df.astype({"study_id": "int64", "series_id": "int64", "instance_number": "int64",
                      "x": "float64", "y": "float64"})


def errors_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(ERRORS_COLUMNS))
    return df.astype({"study_id": "Int64", "series_id": "Int64", "instance_number": "Int64",
                      "condition": "string", "level": "string", "path": "string", "stage": "string",
                      "reason": "string"})
