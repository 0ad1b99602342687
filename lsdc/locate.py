"""Training and running the localisers: the wiring above prep (volumes from DICOM) and train (the models).

    train_locator(volumes, out)                 one run per condition group in out/spinal, out/foraminal, ...
    locate(locator, data_dir, split="test")     DICOM folder -> volumes -> coords.csv (+ its log), no coordinates in

    predict_from_dicoms(graders, locator, data_dir)   locate -> crops at the found points -> grade -> submission

These are what `lsdc train-locator`, `lsdc locate` and `lsdc predict --locator` call, and what a notebook calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from cache.errors import InputError
from cache.io import atomic_write

TARGET_ORDER = ("spinal", "foraminal", "subarticular")  # subarticular last: `locate` places it from the others


@contextmanager
def timed(timings: dict[str, float] | None, stage: str) -> Iterator[None]:
    """Add the seconds a stage takes to `timings` (where the time goes: `lsdc bench predict`)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def train_locator(volumes: str | Path, out: str | Path, config_file: str | Path | None = None,
                  options: dict[str, Any] | None = None, overrides: Sequence[str] = (),
                  targets: Sequence[str] = TARGET_ORDER, resume: bool = False) -> dict[str, dict]:
    """Train a localiser per target on a volume cache into out/<target> (each a run of the one loop: config.json,
    metrics.jsonl, checkpoints, oof.parquet, locate_metrics.json, report.md). resume=True continues the runs."""
    from train.config import LocateConfig
    from train.loop import fit

    out = Path(out)
    results = {}
    for target in targets:
        run = out / target
        if resume and (run / "config.json").exists():
            results[target] = fit(volumes, run, resume=True)
            continue
        cfg = LocateConfig.resolve(config_file, {**(options or {}), "target": target}, overrides)
        results[target] = fit(volumes, run, cfg)
    return results


def side_files(out_csv: str | Path) -> tuple[Path, Path]:
    """Where `locate` keeps what it made besides coords.csv: its log and the volumes of the split."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}_log.csv"), out_csv.with_name(f"{out_csv.stem}_volumes")


def locate(locator: str | Path, data_dir: str | Path, split: str = "test", out_csv: str | Path = "coords.csv",
           volumes: str | Path | None = None, studies: int | None = None, workers: int = 2,
           scheduler: str | None = None, device: str = "auto", progress: bool | None = None,
           timings: dict[str, float] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Find every condition-level of every study of a split from its DICOMs alone.

    Builds (or reuses) the split's volume cache with the settings the localisers were trained on (`volumes`, default
    beside the CSV: coords_volumes/), runs them, and writes `out_csv` (train_label_coordinates.csv's columns plus
    confidence) and `<stem>_log.csv` (what is missing, and which series was chosen where there were several, with
    the reason). Returns both tables."""
    from cache.io import progress_enabled
    from cache.volumes import open_volumes
    from prep.config import VolumeConfig, Window
    from prep.volumes import build_volumes
    from train.locator import load_locator, locate_volumes, volume_settings

    with timed(timings, "load localisers"):
        loc = load_locator(locator, device)
    settings = volume_settings(loc)
    log_csv, default_volumes = side_files(out_csv)
    volumes = Path(volumes) if volumes is not None else default_volumes
    window = settings.get("window")
    config = VolumeConfig(split=split, studies=studies, grid=int(settings.get("grid", 256)),
                          window=Window(**window) if isinstance(window, dict) else VolumeConfig().window,
                          percentile_stride=int(settings.get("percentile_stride", 2)))
    with timed(timings, "volumes (DICOM decode, resample)"):
        built = build_volumes(data_dir, volumes, config, workers=workers, scheduler=scheduler,
                              progress=progress_enabled(progress))
    reader = open_volumes(volumes)
    split_studies = reader.manifest.get("prep", {}).get("split_studies") or sorted(set(reader.index["study_id"]))
    with timed(timings, "locate (localisers)"):
        coords, log = locate_volumes(loc, reader, split_studies, progress=progress_enabled(progress))
    failed = reader.errors.dropna(subset=["series_id"])
    log = pd.concat([log, pd.DataFrame({"study_id": failed["study_id"], "condition": None, "level": None,
                                        "series_id": failed["series_id"], "what": "volume error",
                                        "reason": failed["stage"] + ": " + failed["reason"]})], ignore_index=True)
    atomic_write(Path(out_csv), lambda tmp: coords.to_csv(tmp, index=False))
    atomic_write(log_csv, lambda tmp: log.to_csv(tmp, index=False))
    coords.attrs["volumes_built"] = built.built
    return coords, log


def work_dir(out_csv: str | Path) -> Path:
    """Where coordinate-free prediction keeps its intermediates: beside the submission, <stem>_work/."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}_work")


def predict_from_dicoms(graders: Sequence[str | Path], locator: str | Path, data_dir: str | Path,
                        out_csv: str | Path = "submission.csv", split: str = "test",
                        sample_submission: str | Path | None = None, device: str = "auto", workers: int = 2,
                        scheduler: str | None = None, tta: bool = False, progress: bool | None = None,
                        timings: dict[str, float] | None = None) -> pd.DataFrame:
    """A Kaggle submission from a DICOM folder alone: locate every condition-level, build the crops there with the
    graders' own crop settings (checked), grade them. The intermediates stay in <stem>_work/ (coords.csv and its
    log, the volumes, the crop cache), and a rerun reuses them. Condition-levels that could not be located get the
    prior, listed with the localiser's reason in <stem>_missing.csv."""
    from prep.build import build
    from prep.config import PrepConfig, Window
    from train.predict import checkpoint_config, predict, resolve_checkpoints

    work = work_dir(out_csv)
    coords_csv = work / "coords.csv"
    _, log = locate(locator, data_dir, split, coords_csv, workers=workers, scheduler=scheduler,
                    device=device, progress=progress, timings=timings)
    paths = resolve_checkpoints(graders)
    crops = [checkpoint_config(p)["_crop_settings"] for p in paths]
    if not crops[0] or any(c != crops[0] for c in crops):
        raise InputError(f"the graders {[str(p) for p in paths]} record no crop settings, or different ones: give "
                         "graders trained on one crop cache")
    s = crops[0]
    config = PrepConfig(split=split, coords=str(coords_csv.resolve()), slices=int(s["slices"]), size=int(s["size"]),
                        crop_scale=1.0, crop_base_mm=float(s["half_size_mm"]),
                        windows=tuple(Window(name, lo, hi) for name, (lo, hi) in zip(("soft", "wide", "full"),
                                                                                     s["windows"])),
                        clahe_clip=float(s["clahe_clip"]),
                        clahe_tiles=int(s["clahe_tiles"]), percentile_stride=int(s["percentile_stride"]))
    with timed(timings, "crops at the located points (DICOM decode, crop)"):
        build(data_dir, work / "crops", config, workers=workers, scheduler=scheduler, progress=progress)
    missing = log[log["what"] == "missing"]
    located = {(int(r.study_id), r.condition, r.level): f"not located: {r.reason}" for r in missing.itertuples()}
    with timed(timings, "grade (load graders, predict, write)"):
        return predict(graders, work / "crops", out_csv, sample_submission=sample_submission, tta=tta,
                       device=device, located=located)
