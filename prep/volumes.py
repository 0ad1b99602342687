"""One series -> its volumes: every sub-stack, its slices in canonical order, each resampled onto one G x G grid.

The localiser's input (docs/locate.md). A volume is one sub-stack of one orientation (prep.geometry.sub_stacks);
its slices are ordered along the canonical normal and resampled onto the reference (middle) slice's pixel grid, then
onto the volume grid by cache.volume_geometry.GridMap (aspect kept, centred, flipped to the radiological view).
Intensities are one window of the volume's own percentiles (prep.windows), as the crop cache's, as uint8.

Every failure is an error record naming the file or series: a file that cannot be read or decoded is left out of its
volume (the volume records which instances it holds); a sub-stack without position/orientation/spacing tags cannot be
placed in the patient and is skipped with its reason.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from cache.io import progress_enabled
from cache.volume_geometry import GridMap, canonical_sign, plane_affine, slice_normal
from cache.rsna import CONDITIONS, LEVELS
from cache.volumes import TARGET_COLUMNS, VOLUME_COLUMNS, VolumeWriter, targets_on_volumes, volume_key
from cache.writer import build_lock
from prep.build import BuildResult, check_scheduler, run_tasks
from prep.config import VolumeConfig
from prep.dicom import DicomError, SliceHeader
from prep.geometry import GRID_TOLERANCE_PX, sub_stacks
from prep.samples import (COORD_COLUMNS, TableError, _bad_ids, _number, error, errors_frame, read_table,
                          series_table)
from prep.series import SeriesReader, data_root, index_series
from prep.windows import apply_windows, stack_bounds

log = logging.getLogger(__name__)

Record = dict[str, Any]


def order_stack(group: list[SliceHeader]) -> list[SliceHeader]:
    """Slices along the canonical normal (patient left, posterior or superior); ties by instance number."""
    n = slice_normal(group[len(group) // 2].orientation)
    return sorted(group, key=lambda h: (float(np.dot(h.position, n)), h.instance_number))


def _same_grid(affine: np.ndarray, rows: int, cols: int) -> bool:
    corner = np.array([cols, rows, 1.0])
    return float((np.abs(affine - np.array([[1.0, 0, 0], [0, 1.0, 0]])) @ corner).max()) < GRID_TOLERANCE_PX


def resample(img: np.ndarray, affine: np.ndarray | None, grid: GridMap, size: int, pad: float) -> np.ndarray:
    """One slice onto the volume grid. On the reference grid (the usual case): an area resize and a whole-cell paste
    (exactly the GridMap), then the flips; otherwise one bilinear warp through the slice's own affine."""
    if affine is None:
        rows, cols = img.shape
        h, w = GridMap.resized(rows, cols, grid.scale_x, grid.scale_y)
        px, py = GridMap.pads(rows, cols, grid.scale_x, grid.scale_y, size)
        small = cv2.resize(img, None, fx=abs(grid.scale_x), fy=abs(grid.scale_y), interpolation=cv2.INTER_AREA)
        out = np.full((size, size), pad, dtype=np.float32)
        out[py:py + h, px:px + w] = small[:h, :w]
        if grid.scale_x < 0 or grid.scale_y < 0:
            out = cv2.flip(out, 1 if grid.scale_y > 0 else (0 if grid.scale_x > 0 else -1))
        return out
    # grid cell (u, v) -> reference pixel -> this slice's pixel: the inverse map warpAffine wants
    to_ref = np.array([[1 / grid.scale_x, 0, -grid.offset_x / grid.scale_x],
                       [0, 1 / grid.scale_y, -grid.offset_y / grid.scale_y], [0, 0, 1.0]])
    inverse = np.vstack([affine, [0, 0, 1.0]]) @ to_ref
    return cv2.warpAffine(img, inverse[:2], (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=float(pad))


def stack_volume(group: list[SliceHeader], reader: SeriesReader, config: VolumeConfig
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """One sub-stack -> (uint8 (D, G, G), its geometry for the index). Slices that fail to decode are dropped."""
    ordered = [h for h in order_stack(group) if reader.decode(h)]
    if not ordered:
        raise ValueError("no slice of this sub-stack could be decoded")
    ref = ordered[len(ordered) // 2]
    grid = GridMap.fit(ref.rows, ref.cols, ref.spacing, config.grid, flip_x=canonical_sign(ref.orientation[:3]) < 0,
                       flip_y=canonical_sign(ref.orientation[3:]) < 0)
    images = [reader.pixels[h.path] for h in ordered]
    (bounds,), pad = stack_bounds(images, (config.window,), config.percentile_stride)
    planes = []
    for h, img in zip(ordered, images):
        affine = plane_affine(h.position, h.orientation, h.spacing, ref.position, ref.orientation, ref.spacing)
        planes.append(resample(img, None if _same_grid(affine, ref.rows, ref.cols) and h.shape == ref.shape
                               else affine, grid, config.grid, pad))
    volume = apply_windows(np.stack(planes), bounds[None])[:, 0]
    geometry = dict(
        n_slices=len(ordered), ref_slice=ordered.index(ref), ref_rows=ref.rows, ref_cols=ref.cols,
        instance_numbers=[h.instance_number for h in ordered],
        positions=[float(v) for h in ordered for v in h.position],
        orientations=[float(v) for h in ordered for v in h.orientation],
        spacings=[float(v) for h in ordered for v in h.spacing],
        scale_x=grid.scale_x, offset_x=grid.offset_x, scale_y=grid.scale_y, offset_y=grid.offset_y,
        window_lo=float(bounds[0]), window_hi=float(bounds[1]))
    return volume, geometry


def process_series_volumes(series_dir: str | Path, series: dict[str, Any], config: VolumeConfig,
                           write: Callable[[str, np.ndarray], str]) -> list[Record]:
    """Build and write every volume of one series -> one record per volume plus one per failed file or sub-stack."""
    series_dir = Path(series_dir)
    ids = dict(study_id=series["study_id"], series_id=series["series_id"])
    if not series_dir.is_dir():
        return [dict(ok=False, **error(str(series_dir), None, "missing series folder", stage="read", **ids))]
    datasets: dict[str, Any] = {}
    try:
        headers, header_failed = index_series(series_dir, datasets, within=data_root(series_dir))
    except DicomError as e:  # the folder itself cannot be listed
        return [dict(ok=False, **error(e.path, None, e.reason, stage="read", **ids))]
    reader = SeriesReader(headers, datasets)
    records: list[Record] = []
    if not headers:
        records.append(dict(ok=False, **error(str(series_dir), None, "no readable slice in the series", stage="read",
                                              **ids)))
    for stack, group in enumerate(sorted(sub_stacks(headers), key=lambda g: min(h.instance_number for h in g))):
        where = f"{series_dir} (sub-stack {stack}: instances {min(h.instance_number for h in group)}.." \
                f"{max(h.instance_number for h in group)})"
        if any(h.position is None or h.orientation is None or h.spacing is None for h in group):
            why = "lacks ImagePositionPatient/ImageOrientationPatient/PixelSpacing: it cannot be placed in the patient"
            records.append(dict(ok=False, **error(where, None, why, stage="geometry", **ids)))
            continue
        try:
            volume, geometry = stack_volume(group, reader, config)
        except ValueError as e:
            records.append(dict(ok=False, **error(where, None, str(e), stage="window", **ids)))
            continue
        key = volume_key(series["study_id"], series["series_id"], stack)
        records.append(dict(ok=True, key=key, **ids, series_description=series["series_description"], stack=stack,
                            **geometry, grid=config.grid, checksum=write(key, volume)))
    file_errors = [("read", e) for e in header_failed.values()] + [("decode", e) for e in reader.failed.values()]
    for stage, e in file_errors:
        records.append(dict(ok=False, **error(e.path, None, e.reason, stage=stage, instance_number=Path(e.path).stem,
                                              **ids)))
    return records


# ------------------------------------------------------------------------------------------------ the Dask build

def run_volume_task(task: dict[str, Any], out: str, config: dict[str, Any]) -> list[Record]:
    """Executed on a worker: build one series' volumes, write them, mark the series done, return small records."""
    cv2.setNumThreads(1)  # one core per worker (see prep.build.run_task)
    writer = VolumeWriter.open(out)
    records = process_series_volumes(task["series_dir"], task["series"], VolumeConfig.from_dict(config), writer.write)
    writer.save_task(task["key"], records)
    return records


def failed_volume_task(task: dict[str, Any], e: BaseException) -> list[Record]:
    """A task that crashed (a bug, a killed worker): one error for its series; not saved, so a rerun retries."""
    s = task["series"]
    return [dict(ok=False, **error(task["series_dir"], None, f"task failed: {type(e).__name__}: {e}", stage="worker",
                                   study_id=s["study_id"], series_id=s["series_id"]))]


def plan_volume_tasks(data_dir: Path, config: VolumeConfig) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """One task per series of the split's series table whose description is wanted; the table's bad rows."""
    errors: list[dict] = []
    good, bad = series_table(data_dir / f"{config.split}_series_descriptions.csv", errors)
    studies = sorted({study for study, _ in good})
    if config.studies:
        studies = studies[: config.studies]
    keep = set(studies)
    for (study, series), why in sorted(bad.items()):
        if study in keep:
            errors.append(error(f"{config.split}_series_descriptions.csv", None, why, study_id=study,
                                series_id=series))
    tasks = [{"key": f"{study}/{series}", "series_dir": str(data_dir / f"{config.split}_images" / str(study) /
                                                            str(series)),
              "series": {"study_id": study, "series_id": series, "series_description": desc}}
             for (study, series), desc in sorted(good.items()) if study in keep and desc in config.descriptions]
    return tasks, errors_frame(errors)


def read_coordinates(path: Path, studies: set[int], errors: list[dict]) -> pd.DataFrame:
    """The valid rows of a coordinates table (train_label_coordinates.csv columns) of the given studies; every other
    row becomes an error naming its line, as prep's crop build reports them."""
    rows, seen = [], {}
    for r in read_table(path, COORD_COLUMNS).itertuples(index=False):
        where = dict(study_id=r.study_id, series_id=r.series_id, instance_number=r.instance_number,
                     condition=r.condition if r.condition in CONDITIONS else None,
                     level=r.level if r.level in LEVELS else None)
        reason = _bad_ids(r, ("study_id", "series_id", "instance_number"))
        x, y = _number(r.x), _number(r.y)
        if reason is None and int(r.study_id) not in studies:
            continue  # another study (not selected, or not in this split's series table): neither target nor error
        if reason is None and (r.condition not in CONDITIONS or r.level not in LEVELS):
            reason = f"unknown condition or level {r.condition!r}, {r.level!r}"
        if reason is None and (x is None or y is None):
            reason = f"coordinate x={r.x!r}, y={r.y!r} is not a finite number"
        key = (r.study_id, r.condition, r.level)
        if reason is None and key in seen:
            reason = f"duplicate coordinate for {key}, first at line {seen[key]}"
        if reason is not None:
            errors.append(error(path.name, r.line, reason, **where))
            continue
        seen[key] = r.line
        rows.append(dict(study_id=int(r.study_id), series_id=int(r.series_id), instance_number=int(r.instance_number),
                         condition=r.condition, level=r.level, x=x, y=y, line=r.line))
    return pd.DataFrame(rows, columns=[*COORD_COLUMNS, "line"])


def _targets(index: pd.DataFrame, coords_path: Path | None, studies: set[int], errors: list[dict]
             ) -> pd.DataFrame | None:
    """The coordinates as targets on the built volumes; a coordinate on no volume is an error naming its line."""
    if coords_path is None:
        return None
    coords = read_coordinates(coords_path, studies, errors)
    if index.empty:
        return pd.DataFrame(columns=list(TARGET_COLUMNS))
    targets, missed = targets_on_volumes(index, coords)
    for r in missed.itertuples(index=False):
        errors.append(error(coords_path.name, r.line, r.reason, stage="targets", study_id=r.study_id,
                            series_id=r.series_id, instance_number=r.instance_number, condition=r.condition,
                            level=r.level))
    return targets


def build_volumes(data_dir: str | os.PathLike, out: str | os.PathLike, config: VolumeConfig | None = None, *,
                  workers: int = 2, scheduler: str | None = None, clean: bool = False, progress: bool | None = None,
                  stop_after: int | None = None) -> BuildResult:
    """Build (or resume) the volume cache of `data_dir`'s `config.split` into `out`: one Dask task per series, as
    the crop cache's build (prep.build.build: schedulers, resume, the build lock, errors) is."""
    start = time.perf_counter()
    config = config or VolumeConfig()
    data_dir, out = Path(data_dir), Path(out)
    if not data_dir.is_dir():
        raise TableError(data_dir, "no such folder (give the competition's data folder)")
    check_scheduler(workers, scheduler)
    tasks, table_errors = plan_volume_tasks(data_dir, config)
    coords_path = Path(config.coords) if config.coords else (
        data_dir / "train_label_coordinates.csv" if config.split == "train" else None)
    if coords_path is not None and not coords_path.is_file():
        raise TableError(coords_path, "missing file (the train split's points become the localiser's targets)")
    cfg = config.to_dict()
    with build_lock(out):
        writer = VolumeWriter.create(out, grid=config.grid, config=cfg, clean=clean, codec=config.codec)
        keys = {t["key"] for t in tasks}
        done = {k: v for k, v in writer.completed_tasks().items() if k in keys}
        lost = writer.lost_keys([r["key"] for recs in done.values() for r in recs if r["ok"]])
        if lost:  # volumes a power loss took from series marked done: those series run again
            log.warning("%s: %d volumes of finished series are missing; their series are built again", out, len(lost))
            done = {k: v for k, v in done.items() if not any(r["ok"] and r["key"] in lost for r in v)}
        pending = [t for t in tasks if t["key"] not in done]
        if stop_after is not None:
            pending = pending[:stop_after]
        records = [r for recs in done.values() for r in recs]
        for _, recs in run_tasks((run_volume_task, failed_volume_task), pending, str(out), cfg, workers, scheduler,
                                 progress_enabled(progress)) if pending else ():
            records += recs
        index = pd.DataFrame([{k: v for k, v in r.items() if k != "ok"} for r in records if r["ok"]],
                             columns=[c for c in VOLUME_COLUMNS if c != "row"])
        finalised = stop_after is None
        target_errors: list[dict] = []
        studies = {t["series"]["study_id"] for t in tasks}
        targets = _targets(index, coords_path, studies, target_errors) if finalised else None
        errors = pd.concat([table_errors, errors_frame([{k: v for k, v in r.items() if k != "ok"}
                                                        for r in records if not r["ok"]] + target_errors)],
                           ignore_index=True)
        if finalised:
            writer.finalise(index, errors, targets=targets, extra_manifest={"prep": {
                "data_dir": str(data_dir.resolve()), "tasks": len(tasks), "coords": str(coords_path),
                "split_studies": sorted(studies)}})
    return BuildResult(out, len(tasks), len(index), errors, len(tasks), len(done), time.perf_counter() - start,
                       finalised, unit="volumes")
