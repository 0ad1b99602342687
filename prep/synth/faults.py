"""`--faults`: a corpus of bad (and merely unusual) inputs, each written into a few dedicated studies.

The clean studies are untouched (same ids, same bytes as without --faults), so a prep test can check that every good
sample equals the clean build's and that each fault below gives exactly what its manifest entry says:
``expect`` 'error' (prep writes an error row with that ``stage``; ``reason`` says what it should be about) or 'ok'
(prep must build the samples correctly: valid DICOM that real scanners write, or a table quirk it must absorb).
``rows`` lists the (condition, level) samples the fault touches; ``path`` is relative to the data directory.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, \
    RLELossless

from cache.io import atomic_write, atomic_write_bytes
from cache.rsna import LEVELS, label_column
from prep.synth.series import Series, Slice

N_FAULT_STUDIES = 6
STREAM = 3  # rng stream of the fault studies (train 1, test 2)


def plan_fault_studies(cfg, existing: list[dict]) -> list[dict]:
    """Six extra train studies, each with exactly one Sagittal T1, one Sagittal T2 (not STIR) and one block-style
    axial series numbered in spatial order, so each fault has a predictable target."""
    from prep.synth import _study_rng
    from prep.synth.study import new_ids, plan_study
    from prep.synth.tables import draw_labels

    taken = {s["study_id"] for s in existing} | {sid for s in existing for sid, _ in s["series"]}
    ids_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, STREAM]))
    out = []
    for j, sid in enumerate(new_ids(ids_rng, N_FAULT_STUDIES, taken)):
        rng = _study_rng(cfg.seed, STREAM, j)
        labels = {k: (v or "Normal/Mild") for k, v in draw_labels(rng).items()}  # no accidental empty cells
        study = plan_study(rng, sid, new_ids(rng, 3, taken), cfg.image_size, cfg.difficulty, labels,
                           axial_style="block", contrast_t2="T2", numbering="ascending")
        study["split"] = "train"
        out.append(study)
    return out


# --- helpers -------------------------------------------------------------------------------------------------------
def _series(study: dict, description: str) -> Series:
    return next(s for s in study["series_geom"] if s.description == description)


def _rel(study: dict, series: Series, instance: int | None = None) -> str:
    base = f"train_images/{study['study_id']}/{series.series_id}"
    return base if instance is None else f"{base}/{instance}.dcm"


def _rows(study: dict, series_id: int, instance: int | None = None) -> list[list[str]]:
    return [[r["condition"], r["level"]] for r in study["coords"]
            if r["series_id"] == series_id and (instance is None or r["instance_number"] == instance)]


def _labelled(study: dict, condition: str, level: str) -> dict:
    return next(r for r in study["coords"] if r["condition"] == condition and r["level"] == level)


def _entry(kind: str, study: dict, series: Series | None, instance: int | None, rows: list, expect: str,
           stage: str | None, reason: str, path: str | None = None) -> dict:
    if path is None and series is not None:
        path = _rel(study, series, instance)
    return dict(kind=kind, study_id=study["study_id"], series_id=series.series_id if series else None,
                instance_number=instance, path=path, rows=rows, expect=expect, stage=stage, reason=reason)


def _rewrite(out: Path, rel: str, edit) -> None:
    """Read a file we wrote, let ``edit`` change the dataset, write it back (atomically)."""
    ds = pydicom.dcmread(out / rel)
    ds = edit(ds) or ds
    atomic_write(out / rel, lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def _each_file(out: Path, study: dict, series: Series, edit) -> None:
    for sl in series.slices:
        _rewrite(out, _rel(study, series, sl.instance_number), edit)


# --- file and series faults ------------------------------------------------------------------------------------------
def _file_faults(out: Path, st: list[dict]) -> list[dict]:
    f: list[dict] = []
    a, b, c, d, e, g = st
    t1, t2, ax = (_series(a, "Sagittal T1"), _series(a, "Sagittal T2/STIR"), _series(a, "Axial T2"))
    canal = _labelled(a, "Spinal Canal Stenosis", "L1/L2")["instance_number"]
    rel = _rel(a, t2, canal)
    data = (out / rel).read_bytes()
    atomic_write_bytes(out / rel, data[: len(data) * 3 // 5])  # header intact, pixel data cut
    f.append(_entry("truncated_file", a, t2, canal, _rows(a, t2.series_id, canal), "error", "decode",
                    "pixel data shorter than Rows x Columns (file truncated)"))
    right = _labelled(a, "Right Neural Foraminal Narrowing", "L1/L2")["instance_number"]
    atomic_write_bytes(out / _rel(a, t1, right), b"")
    f.append(_entry("zero_byte_file", a, t1, right, _rows(a, t1.series_id, right), "error", "read", "empty file"))
    left = _labelled(a, "Left Neural Foraminal Narrowing", "L1/L2")["instance_number"]
    atomic_write_bytes(out / _rel(a, t1, left), b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    f.append(_entry("non_dicom_file", a, t1, left, _rows(a, t1.series_id, left), "error", "read",
                    "not a DICOM file"))
    ax_inst = {lv: _labelled(a, "Left Subarticular Stenosis", lv)["instance_number"] for lv in LEVELS}

    def no_pixels(ds):
        del ds.PixelData

    _rewrite(out, _rel(a, ax, ax_inst["L1/L2"]), no_pixels)
    f.append(_entry("no_pixel_data", a, ax, ax_inst["L1/L2"], _rows(a, ax.series_id, ax_inst["L1/L2"]), "error",
                    "decode", "no pixel data"))

    def short_pixels(ds):
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    _rewrite(out, _rel(a, ax, ax_inst["L2/L3"]), short_pixels)
    f.append(_entry("pixel_data_too_short", a, ax, ax_inst["L2/L3"], _rows(a, ax.series_id, ax_inst["L2/L3"]),
                    "error", "decode", "pixel data length does not match Rows x Columns"))

    def mpeg(ds):
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: declared, but the bytes are raw
        ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True

    _rewrite(out, _rel(a, ax, ax_inst["L3/L4"]), mpeg)
    f.append(_entry("undecodable_transfer_syntax", a, ax, ax_inst["L3/L4"], _rows(a, ax.series_id, ax_inst["L3/L4"]),
                    "error", "decode", "undecodable pixel data (MPEG2 transfer syntax, no decoder)"))
    (out / _rel(a, ax, ax_inst["L4/L5"])).unlink()
    f.append(_entry("missing_instance", a, ax, ax_inst["L4/L5"], _rows(a, ax.series_id, ax_inst["L4/L5"]), "error",
                    "read", "missing file: the coordinate points at an instance whose file is absent"))

    # Study b: whole-series faults.
    t1, t2, ax = (_series(b, "Sagittal T1"), _series(b, "Sagittal T2/STIR"), _series(b, "Axial T2"))
    shutil.rmtree(out / _rel(b, t2))
    f.append(_entry("missing_series_folder", b, t2, None, _rows(b, t2.series_id), "error", "read",
                    "missing series folder"))

    def no_spacing(ds):
        del ds.PixelSpacing

    _each_file(out, b, t1, no_spacing)
    f.append(_entry("missing_pixel_spacing", b, t1, None, _rows(b, t1.series_id), "error", "crop",
                    "no PixelSpacing: the crop cannot be sized in mm"))
    f.append(_entry("unknown_series_description", b, ax, None, _rows(b, ax.series_id), "error", "tables",
                    "unknown series description 'Coronal T2'"))  # applied to the CSV in _table_faults

    # Study c: valid but unusual encodings of the image values (prep must give the clean pixels).
    t1, t2, ax = (_series(c, "Sagittal T1"), _series(c, "Sagittal T2/STIR"), _series(c, "Axial T2"))

    def monochrome1(ds):
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PixelData = (4095 - ds.pixel_array).astype("<u2").tobytes()  # bright = low value
        ds.WindowCenter = 4095 - float(ds.WindowCenter)

    _each_file(out, c, t2, monochrome1)
    f.append(_entry("monochrome1", c, t2, None, _rows(c, t2.series_id), "ok", None,
                    "MONOCHROME1 (inverted): after inversion the image equals the MONOCHROME2 one up to an offset"))

    def rescale(ds):
        ds.RescaleSlope, ds.RescaleIntercept = 2.0, -100.0  # stored = (value + 100) / 2
        ds.PixelData = ((ds.pixel_array.astype(np.int32) + 100) // 2).astype("<u2").tobytes()

    _each_file(out, c, t1, rescale)
    f.append(_entry("rescale_slope", c, t1, None, _rows(c, t1.series_id), "ok", None,
                    "RescaleSlope 2 / RescaleIntercept -100: prep must apply them (values agree up to rounding)"))

    def no_geometry(ds):
        del ds.ImagePositionPatient
        del ds.ImageOrientationPatient

    _each_file(out, c, ax, no_geometry)
    f.append(_entry("missing_position_orientation", c, ax, None, _rows(c, ax.series_id), "ok", None,
                    "no ImagePositionPatient/ImageOrientationPatient: order by InstanceNumber "
                    "(numbered in spatial order here), ordering = 'instance_number'"))

    # Study d: lossless compressed transfer syntaxes (decode to the exact clean pixels).
    t1, t2, ax = (_series(d, "Sagittal T1"), _series(d, "Sagittal T2/STIR"), _series(d, "Axial T2"))
    for series, syntax, kind in ((t2, RLELossless, "rle_lossless"), (t1, JPEG2000Lossless, "jpeg2000_lossless")):
        _each_file(out, d, series, lambda ds, s=syntax: ds.compress(s, encoding_plugin="pylibjpeg" if s ==
                                                                    JPEG2000Lossless else ""))
        f.append(_entry(kind, d, series, None, _rows(d, series.series_id), "ok", None,
                        f"{syntax.name}: decodes to exactly the clean pixels"))
    if _jpeg_ls_available():
        _each_file(out, d, ax, lambda ds: ds.compress(JPEGLSLossless))
        f.append(_entry("jpeg_ls_lossless", d, ax, None, _rows(d, ax.series_id), "ok", None,
                        "JPEG-LS Lossless: decodes to exactly the clean pixels"))
    else:  # the JPEG-LS encoder (pyjpegls) is optional; deflate is always available
        _each_file(out, d, ax, lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", DeflatedExplicitVRLittleEndian))
        f.append(_entry("deflated", d, ax, None, _rows(d, ax.series_id), "ok", None,
                        "Deflated Explicit VR Little Endian: decodes to exactly the clean pixels"))

    # Study e: implicit VR and a series whose unlabelled slices have another size.
    t1, t2, ax = (_series(e, "Sagittal T1"), _series(e, "Sagittal T2/STIR"), _series(e, "Axial T2"))
    _each_file(out, e, t2, lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", ImplicitVRLittleEndian))
    f.append(_entry("implicit_vr", e, t2, None, _rows(e, t2.series_id), "ok", None,
                    "Implicit VR Little Endian: decodes to exactly the clean pixels"))
    resized = _mixed_sizes(out, e, ax)
    f.append(_entry("mixed_sizes", e, ax, None, _rows(e, ax.series_id), "ok", None,
                    f"unlabelled slices {resized} are larger (same field of view, finer PixelSpacing): prep maps "
                    "them onto the labelled slice's grid"))
    return f


def _jpeg_ls_available() -> bool:
    from pydicom.pixels.encoders import JPEGLSLosslessEncoder

    return bool(JPEGLSLosslessEncoder.is_available)


def _mixed_sizes(out: Path, study: dict, series: Series) -> list[int]:
    """Re-render every other unlabelled slice 1.25x larger over the same field of view."""
    from prep.synth.dicom_writer import dataset, encode
    from prep.synth.render import render

    labelled = {r["instance_number"] for r in study["coords"] if r["series_id"] == series.series_id}
    number = [s.series_id for s in study["series_geom"]].index(series.series_id) + 1
    done = []
    for i, sl in enumerate(series.slices):
        if i % 2 or sl.instance_number in labelled:
            continue
        rows, cols = int(sl.rows * 1.25), int(sl.cols * 1.25)
        ps = (sl.spacing[0] * sl.rows / rows, sl.spacing[1] * sl.cols / cols)
        # Same outer edges of the field of view: move the first pixel's centre by half the change in pixel size.
        pos = sl.position - 0.5 * (sl.spacing[1] - ps[1]) * sl.row_dir - 0.5 * (sl.spacing[0] - ps[0]) * sl.col_dir
        big: Slice = replace(sl, position=pos, rows=rows, cols=cols, spacing=ps)
        rng = np.random.default_rng(np.random.SeedSequence([7, study["study_id"], sl.instance_number]))
        pixels = render(study["phantom"], series, big, rng, 0.5)
        atomic_write_bytes(out / _rel(study, series, sl.instance_number),
                           encode(dataset(0, study["study_id"], series, number, big, pixels)))
        done.append(sl.instance_number)
    return done


# --- table faults ---------------------------------------------------------------------------------------------------
def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)  # strings as written: edits change nothing else


def _write(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, lineterminator="\n"))


def _table_faults(out: Path, st: list[dict]) -> list[dict]:
    f: list[dict] = []
    a, b, c, d, e, g = st
    coords, labels = _read(out / "train_label_coordinates.csv"), _read(out / "train.csv")
    series_csv = _read(out / "train_series_descriptions.csv")

    def row_index(study: dict, condition: str, level: str) -> int:
        m = (coords.study_id == str(study["study_id"])) & (coords.condition == condition) & (coords.level == level)
        return int(np.flatnonzero(m)[0])

    # unknown_series_description (study b's axial series; its entry is written with the file faults)
    ax_b = _series(b, "Axial T2")
    series_csv.loc[series_csv.series_id == str(ax_b.series_id), "series_description"] = "Coronal T2"

    ax_a = _series(a, "Axial T2")
    for cond in ("Left Subarticular Stenosis", "Right Subarticular Stenosis"):
        coords.loc[row_index(a, cond, "L5/S1"), "instance_number"] = str(len(ax_a.slices) + 100)
    f.append(_entry("instance_not_in_series", a, ax_a, len(ax_a.slices) + 100,
                    [[c_, "L5/S1"] for c_ in ("Left Subarticular Stenosis", "Right Subarticular Stenosis")],
                    "error", "geometry", "instance not in series"))

    t2, t1 = _series(g, "Sagittal T2/STIR"), _series(g, "Sagittal T1")
    sp = "Spinal Canal Stenosis"
    inst = _labelled(g, sp, "L1/L2")["instance_number"]
    coords.loc[row_index(g, sp, "L1/L2"), "x"] = str(t2.slices[0].cols + 40.5)
    f.append(_entry("coordinate_outside_image", g, t2, inst, [[sp, "L1/L2"]], "error", "crop",
                    "coordinate outside the image"))
    coords.loc[row_index(g, sp, "L2/L3"), "y"] = ""  # an empty cell reads back as NaN
    f.append(_entry("nan_coordinate", g, t2, inst, [[sp, "L2/L3"]], "error", "tables",
                    "coordinate is not a finite number"))
    dup = coords.loc[[row_index(g, sp, "L3/L4")]]
    f.append(_entry("duplicated_coordinate_row", g, t2, inst, [[sp, "L3/L4"]], "error", "tables",
                    "duplicate coordinate row (the first copy is built, the second reported)"))
    coords.loc[row_index(g, sp, "L4/L5"), "level"] = "L4-L5"
    f.append(_entry("unknown_level", g, t2, inst, [[sp, "L4/L5"]], "error", "tables", "unknown level 'L4-L5'"))
    coords.loc[row_index(g, sp, "L5/S1"), "condition"] = "Spinal Stenosis"
    f.append(_entry("unknown_condition", g, t2, inst, [[sp, "L5/S1"]], "error", "tables",
                    "unknown condition 'Spinal Stenosis'"))

    lf = "Left Neural Foraminal Narrowing"
    sid = str(g["study_id"])
    gone = coords.loc[[row_index(g, lf, "L1/L2")]]
    f.append(_entry("label_without_coordinates", g, t1, int(gone.instance_number.iloc[0]), [[lf, "L1/L2"]],
                    "error", "tables", "label without coordinates", path="train.csv"))
    labels.loc[labels.study_id == sid, label_column(lf, "L2/L3")] = ""
    f.append(_entry("empty_label_cell", g, t1, _labelled(g, lf, "L2/L3")["instance_number"], [[lf, "L2/L3"]], "ok",
                    None, "empty label cell with a coordinate: the sample is built with label <NA>"))
    labels.loc[labels.study_id == sid, label_column(lf, "L3/L4")] = "Mild"
    f.append(_entry("unknown_label_string", g, t1, _labelled(g, lf, "L3/L4")["instance_number"], [[lf, "L3/L4"]],
                    "error", "tables", "unknown label 'Mild'", path="train.csv"))
    stranger = coords.loc[[row_index(g, lf, "L4/L5")]].copy()
    stranger["study_id"] = "1234"  # never drawn: ids are >= 1,000,000
    f.append(dict(_entry("coordinate_for_unknown_study", g, t1, int(stranger.instance_number.iloc[0]),
                         [[lf, "L4/L5"]], "error", "tables", "study 1234 is not in train.csv",
                         path="train_label_coordinates.csv"), study_id=1234))
    bad_id = coords.loc[[row_index(g, lf, "L5/S1")]].copy()
    bad_id["series_id"] = "../../etc"
    f.append(_entry("invalid_series_id", g, t1, int(bad_id.instance_number.iloc[0]), [[lf, "L5/S1"]], "error",
                    "tables", "series_id '../../etc' is not a non-negative integer id",
                    path="train_label_coordinates.csv"))

    coords = coords.drop(index=gone.index)
    coords = pd.concat([coords, dup, stranger, bad_id], ignore_index=True)
    _write(out / "train_label_coordinates.csv", coords)
    _write(out / "train.csv", labels)
    _write(out / "train_series_descriptions.csv", series_csv)
    return f


def apply_faults(out: Path, studies: list[dict], cfg) -> list[dict]:
    """Break the fault studies on disk and in the tables; returns the faults.json entries."""
    faults = _file_faults(Path(out), studies) + _table_faults(Path(out), studies)
    kinds = [x["kind"] for x in faults]
    if len(kinds) != len(set(kinds)):
        raise RuntimeError(f"fault kinds must be distinct: {kinds}")
    return faults
