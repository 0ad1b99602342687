"""One series -> its samples' uint8 stacks: the work of one Dask task, with no Dask in it.

Headers are indexed once (no pixels), each needed file is decoded at most once per task, and stacks shared by
several samples (the canal's five levels usually sit on one mid-sagittal slice) share their window bounds.
Every failure becomes an error record naming the file or sample and the reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from prep.config import PrepConfig
from prep.crop import CropBox, crop_box, crop_slice
from prep.dicom import DicomError, SliceHeader, check_pixel_data, pixels_of, read_pixels, read_slice
from prep.geometry import Stack, misfits, pixel_to_pixel, stack_around
from prep.samples import error
from prep.windows import apply_windows, clahe_channels, stack_bounds

Record = dict[str, Any]  # {"ok": True, **index columns} or {"ok": False, **errors columns}

# A crop box wider than this (pixels a side) is refused, not allocated: only a spacing near SPACING_MM's floor with a
# very large box gets there (the default 255 mm box is 5,100 px at 0.05 mm/px).
MAX_BOX_PX = 8192


class SampleError(Exception):
    """A sample that cannot be built; stage and reason go into the errors table."""

    def __init__(self, stage: str, reason: str, path: str = ""):
        super().__init__(reason)
        self.stage, self.reason, self.path = stage, reason, path


def data_root(series_dir: str | Path) -> Path:
    """The data folder a series folder ({split}_images/{study}/{series}) lies in: no file outside it is read."""
    return Path(series_dir).parents[2]


def _outside(path: str | Path, root: Path) -> str | None:
    """Where a path really leads when a link takes it out of `root` (its real path), else None."""
    real = Path(os.path.realpath(path))
    return None if real.is_relative_to(os.path.realpath(root)) else str(real)


def index_series(series_dir: Path, datasets: dict[str, Any] | None = None, within: Path | None = None
                 ) -> tuple[list[SliceHeader], dict[str, DicomError]]:
    """Headers of every *.dcm in the folder, and the files whose header failed, by path.

    ``datasets``, when given, is filled with each file's parsed dataset (pixel data deferred), by path, for
    SeriesReader: a file that is indexed and then decoded is parsed once. ``within``: the data folder; a file (or the
    series folder) that a symbolic link leads out of it is refused, never read. A second file of the same slice (the
    same instance number and position, e.g. a stray copy `6 (1).dcm`) is left out and reported, once.
    """
    headers: list[SliceHeader] = []
    failed: dict[str, DicomError] = {}
    if within is not None and (real := _outside(series_dir, within)):
        raise DicomError(series_dir, f"the series folder links outside the data folder (to {real}): refused")
    try:
        names = sorted(os.listdir(series_dir))
    except OSError as e:  # e.g. no permission: every sample of the series fails with the reason
        raise DicomError(series_dir, f"unreadable series folder ({os.strerror(e.errno) if e.errno else e})") from None
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() != ".dcm":
            continue
        if within is not None and (real := _outside(series_dir / name, within)):
            failed[str(series_dir / name)] = DicomError(series_dir / name, f"links outside the data folder (to "
                                                                           f"{real}): refused, not read")
            continue
        try:
            header, ds = read_slice(series_dir / name, int(stem) if stem.isdigit() else None)
        except DicomError as e:
            failed[e.path] = e
            continue
        headers.append(header)
        if datasets is not None and ds is not None:
            datasets[header.path] = ds
    return _without_copies(headers, failed, datasets), failed


def _without_copies(headers: list[SliceHeader], failed: dict[str, DicomError], datasets: dict[str, Any] | None
                    ) -> list[SliceHeader]:
    """One file per slice: of files with the same instance number and position, the one named by its number (else
    the first by name) is kept; each other is reported as a copy of it, so a stack never holds one slice twice."""
    def key(h: SliceHeader) -> tuple:
        return h.instance_number, None if h.position is None else tuple(round(v, 3) for v in h.position)

    by_slice: dict[tuple, list[SliceHeader]] = {}
    for h in headers:
        by_slice.setdefault(key(h), []).append(h)
    keep = []
    for same in by_slice.values():
        named = [h for h in same if Path(h.path).stem == str(h.instance_number)]
        kept = (named or sorted(same, key=lambda h: h.path))[0]
        keep.append(kept)
        for h in same:
            if h is not kept:
                failed[h.path] = DicomError(h.path, f"a copy of {Path(kept.path).name} (same instance number "
                                                    f"{h.instance_number} and position): left out, "
                                                    f"{Path(kept.path).name} used")
                if datasets is not None:
                    datasets.pop(h.path, None)
    kept = {id(h) for h in keep}
    return [h for h in headers if id(h) in kept]


class SeriesReader:
    """Decoded slices of one series, each file read at most once; files that fail are remembered and dropped.

    Every parsed file's pixel data is checked from its header first (check_pixel_data: no decode, no read), so a file
    that can never be decoded is dropped before any stack is taken, and reported even when no stack needs it.
    """

    def __init__(self, headers: list[SliceHeader], datasets: dict[str, Any] | None = None):
        self.datasets = datasets or {}  # from index_series: parsed once, pixels still on disk; dropped once decoded
        self.pixels: dict[str, np.ndarray] = {}
        self.failed: dict[str, DicomError] = {}
        for h in headers:
            if h.path in self.datasets:
                try:
                    check_pixel_data(self.datasets[h.path], h.path, read=False)
                except DicomError as e:
                    self.failed[h.path] = e
                    del self.datasets[h.path]
        self.headers = [h for h in headers if h.path not in self.failed]
        self._number = {h.path: h.instance_number for h in headers}

    def stack(self, instance_number: int, slices: int) -> tuple[Stack, dict[str, np.ndarray]]:
        """The stack around an instance with every slice decoded. A neighbour that fails to decode is dropped from
        the series (reported once) and the stack is taken again, so a bad file never becomes a black slice."""
        while True:
            # Dropped earlier as another sample's neighbour: still this file's decode error, not "not in series".
            dropped = [e for path, e in self.failed.items() if self._number[path] == instance_number]
            if dropped:
                raise SampleError("decode", f"labelled instance: {dropped[0].reason}", dropped[0].path)
            stack = stack_around(self.headers, instance_number, slices)
            bad = [h for h in dict.fromkeys(stack.slices) if not self.decode(h)]
            if not bad:
                return stack, {h.path: self.pixels[h.path] for h in stack.slices}
            self.headers = [h for h in self.headers if h not in bad]

    def decode(self, h: SliceHeader) -> bool:
        """Decode one slice's pixels into `pixels`, once; False, with the reason in `failed`, when it cannot be."""
        if h.path in self.pixels:
            return True
        if h.path in self.failed:
            return False
        try:
            ds = self.datasets.pop(h.path, None)
            img = read_pixels(h.path) if ds is None else pixels_of(ds, h.path)
            if img.shape != h.shape:
                raise DicomError(h.path, f"pixel array {img.shape} disagrees with Rows/Columns {h.shape}")
            self.pixels[h.path] = img
            return True
        except DicomError as e:
            self.failed[h.path] = e
            return False


def build_stack(stack: Stack, images: dict[str, np.ndarray], x: float, y: float, config: PrepConfig,
                bounds_cache: dict[tuple[str, ...], tuple[np.ndarray, float]]) -> tuple[np.ndarray, CropBox]:
    """Crop every slice with one mm-sized box on the labelled grid, window with the stack's bounds, CLAHE."""
    centre = stack.centre
    if centre.spacing is None:
        raise SampleError("crop", "labelled slice has no PixelSpacing: the crop cannot be sized in mm", centre.path)
    if not (0 <= x < centre.cols and 0 <= y < centre.rows):
        raise SampleError("crop", f"coordinate ({x:g}, {y:g}) outside the {centre.cols}x{centre.rows} image",
                          centre.path)
    unique = tuple(dict.fromkeys(h.path for h in stack.slices))
    if unique not in bounds_cache:
        try:
            bounds_cache[unique] = stack_bounds([images[p] for p in unique], config.windows, config.percentile_stride)
        except ValueError as e:  # a constant stack (e.g. all-black slices) has nothing to window
            raise SampleError("window", str(e), centre.path) from None
    bounds, pad = bounds_cache[unique]
    box = crop_box(x, y, centre.spacing, config.half_size_mm)
    if max(box.w, box.h) > MAX_BOX_PX:
        raise SampleError("crop", f"crop box {box.w}x{box.h} px ({2 * config.half_size_mm:g} mm at "
                                  f"{centre.spacing[1]:g}x{centre.spacing[0]:g} mm/px) is over {MAX_BOX_PX} px a side",
                          centre.path)
    crops: list[np.ndarray] = []  # one per distinct slice: a replicated edge slice is cropped and CLAHE'd once
    for path in unique:
        h = next(h for h in stack.slices if h.path == path)
        try:
            affine = pixel_to_pixel(h, centre)
        except ValueError as e:
            raise SampleError("geometry", str(e), h.path) from None
        crops.append(crop_slice(images[path], box, config.size, pad, affine))
    planes = clahe_channels(apply_windows(np.stack(crops), bounds), config.clahe_clip, config.clahe_tiles)
    if len(unique) == len(stack.slices):
        return planes, box
    return planes[[unique.index(h.path) for h in stack.slices]], box


def index_record(sample: dict, stack: Stack, box: CropBox, checksum: str) -> Record:
    spacing = stack.centre.spacing
    return dict(
        ok=True, **{k: sample[k] for k in ("row", "study_id", "series_id", "series_description", "condition", "level",
                                           "instance_number", "x", "y", "label")},
        center_x_px=box.centre[0], center_y_px=box.centre[1], half_size_px=box.half_size_px,
        half_size_mm=box.half_size_mm, pixel_spacing_row=spacing[0], pixel_spacing_col=spacing[1],
        slice_instances=[h.instance_number for h in stack.slices], slice_offsets_mm=list(stack.offsets_mm),
        replicated=list(stack.replicated), ordering=stack.ordering, checksum=checksum,
    )


def _absent(instance: int, headers: list[SliceHeader], path: str) -> SampleError:
    """No slice with this instance number: a gap in the series' numbering is a missing file, a number outside it
    is a coordinate pointing at the wrong instance."""
    numbers = [h.instance_number for h in headers]
    if numbers and min(numbers) < instance < max(numbers):
        return SampleError("read", f"missing file: instance {instance} lies inside the series' numbering "
                                   f"{min(numbers)}..{max(numbers)} but its file is absent", path)
    span = f"{min(numbers)}..{max(numbers)}" if numbers else "no readable slices"
    return SampleError("geometry", f"instance {instance} not in series (instances {span})", path)


def _sample_error(sample: dict, path: str, stage: str, reason: str) -> Record:
    return dict(ok=False, **error(path, None, reason, stage=stage, study_id=sample["study_id"],
                                  series_id=sample["series_id"], instance_number=sample["instance_number"],
                                  condition=sample["condition"], level=sample["level"]))


def process_series(series_dir: str | Path, samples: list[dict], config: PrepConfig,
                   write: Callable[[int, np.ndarray], str]) -> list[Record]:
    """Build and write every sample of one series -> one record per sample plus one per failed file."""
    series_dir = Path(series_dir)
    if not series_dir.is_dir():
        return [_sample_error(s, str(series_dir), "read", "missing series folder") for s in samples]
    datasets: dict[str, Any] = {}
    try:
        headers, header_failed = index_series(series_dir, datasets, within=data_root(series_dir))
    except DicomError as e:
        return [_sample_error(s, e.path, "read", e.reason) for s in samples]
    # Slices that fit no grid of the series are its bad files, like undecodable ones (geometry.misfits).
    unplaced = {path: DicomError(path, why) for path, why in misfits(headers).items()}
    headers = [h for h in headers if h.path not in unplaced]
    for path in unplaced:
        datasets.pop(path, None)
    reader = SeriesReader(headers, datasets)
    bounds_cache: dict[tuple[str, ...], tuple[np.ndarray, float]] = {}
    records: list[Record] = []
    for s in sorted(samples, key=lambda s: s["row"]):
        try:
            labelled_path = str(series_dir / f"{s['instance_number']}.dcm")
            for stage, failed in (("read", header_failed), ("geometry", unplaced)):
                if labelled_path in failed:
                    raise SampleError(stage, f"labelled instance: {failed[labelled_path].reason}", labelled_path)
            try:
                stack, images = reader.stack(s["instance_number"], config.slices)
            except KeyError:
                raise _absent(s["instance_number"], headers, labelled_path) from None
            planes, box = build_stack(stack, images, s["x"], s["y"], config, bounds_cache)
            records.append(index_record(s, stack, box, write(s["row"], planes)))
        except SampleError as e:
            records.append(_sample_error(s, e.path or str(series_dir), e.stage, e.reason))
    # Files that failed without failing a sample (a dropped neighbour, an unused file): still reported, once each.
    study, series = samples[0]["study_id"], samples[0]["series_id"]
    reported = {r["path"] for r in records if not r["ok"]}
    file_errors = [("read", e) for e in header_failed.values()] + [("geometry", e) for e in unplaced.values()] + \
        [("decode", e) for e in reader.failed.values()]
    for stage, e in file_errors:
        if e.path not in reported:
            records.append(dict(ok=False, **error(e.path, None, e.reason, stage=stage, study_id=study,
                                                  series_id=series, instance_number=Path(e.path).stem)))
    return records
