"""`lsdc synth`: competition layout and strings, DICOM validity, geometry against the phantom, visible severity,
determinism, the fault corpus, --from-tables and the CLI. Tiny images (48-96 px) keep it to a few seconds each."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from typer.testing import CliRunner

from cache.rsna import CONDITION_GROUP, CONDITION_SERIES, CONDITIONS, LABEL_COLUMNS, LABELS, LEVELS, \
    SERIES_DESCRIPTIONS, submission_row_ids
from prep.synth import SynthConfig, load_phantom, plan, synth
from prep.synth.phantom import FIRST_LEVEL, SIDES
from prep.synth.render import render
from prep.synth.series import Slice

FIXTURE = Path(__file__).parent / "fixtures" / "rsna_small"
SIZE = (64, 96)
TABLES = ("train.csv", "train_series_descriptions.csv", "train_label_coordinates.csv", "sample_submission.csv",
          "test_series_descriptions.csv")
TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription", "InstanceNumber",
        "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
        "BitsAllocated", "BitsStored", "HighBit", "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept",
        "WindowCenter", "WindowWidth", "Rows", "Columns", "PixelData")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synth(out, studies=3, seed=7, image_size=SIZE)
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _slice(ds: pydicom.Dataset) -> Slice:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return Slice(np.array([float(v) for v in ds.ImagePositionPatient]), iop[:3], iop[3:], int(ds.Rows),
                 int(ds.Columns), (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])))


def _path(root: Path, split: str, r) -> Path:
    return root / f"{split}_images" / str(r.study_id) / str(r.series_id) / f"{r.instance_number}.dcm"


def test_tables_match_the_competition_layout(data: Path, shared_csv: Path | None):
    references = [FIXTURE] + ([shared_csv] if shared_csv is not None else [])
    for ref in references:
        for name in TABLES:
            assert pd.read_csv(data / name, nrows=0).columns.tolist() == \
                pd.read_csv(ref / name, nrows=0).columns.tolist(), name
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    assert set(coords.condition) <= set(CONDITIONS) and set(coords.level) <= set(LEVELS)
    if shared_csv is not None:  # the strings themselves, against the real tables (not only against cache.rsna)
        real = pd.read_csv(shared_csv / "train_label_coordinates.csv", usecols=["condition", "level"])
        assert set(coords.condition) <= set(real.condition) and set(coords.level) <= set(real.level)
        real_desc = set(pd.read_csv(shared_csv / "train_series_descriptions.csv").series_description)
        assert set(pd.read_csv(data / "train_series_descriptions.csv").series_description) <= real_desc
        real_cells = set(pd.read_csv(shared_csv / "train.csv").iloc[:, 1:].stack().unique())
        ours = set(pd.read_csv(data / "train.csv").iloc[:, 1:].stack().unique())
        assert ours <= real_cells
    assert set(pd.read_csv(data / "train_series_descriptions.csv").series_description) == set(SERIES_DESCRIPTIONS)
    assert pd.read_csv(data / "test_label_coordinates.csv", nrows=0).columns.tolist() == coords.columns.tolist()
    for name in ("train.csv", "test_labels.csv"):
        labels = pd.read_csv(data / name)
        assert labels.columns.tolist() == ["study_id", *LABEL_COLUMNS]
        cells = labels[list(LABEL_COLUMNS)].to_numpy().ravel()
        assert all(v in LABELS or (isinstance(v, float) and np.isnan(v)) for v in cells)
    test_ids = sorted(pd.read_csv(data / "test_series_descriptions.csv").study_id.unique())
    sub = pd.read_csv(data / "sample_submission.csv")
    assert sub.row_id.tolist() == submission_row_ids(test_ids)
    assert np.allclose(sub[["normal_mild", "moderate", "severe"]].to_numpy(), 1 / 3)
    # Every study has its three series kinds, and train/test ids never overlap.
    series = pd.read_csv(data / "train_series_descriptions.csv")
    assert (series.groupby("study_id").series_description.nunique() == 3).all()
    assert not set(test_ids) & set(series.study_id)


def test_coordinates_name_existing_files_inside_the_image(data: Path):
    for split in ("train", "test"):
        coords = pd.read_csv(data / f"{split}_label_coordinates.csv")
        series = pd.read_csv(data / f"{split}_series_descriptions.csv").set_index("series_id").series_description
        assert len(coords) > 0
        for r in coords.itertuples():
            ds = pydicom.dcmread(_path(data, split, r))
            assert 0 <= r.x < ds.Columns and 0 <= r.y < ds.Rows
            assert series[r.series_id] == CONDITION_SERIES[r.condition] == ds.SeriesDescription
        # One row per labelled (study, condition, level), none for an empty cell.
        labels = pd.read_csv(data / ("train.csv" if split == "train" else "test_labels.csv")).set_index("study_id")
        assert not coords.duplicated(["study_id", "condition", "level"]).any()
        assert len(coords) == labels.notna().to_numpy().sum()


def test_every_file_is_valid_dicom_with_the_tags(data: Path):
    files = sorted(data.rglob("*.dcm"))
    assert len(files) > 150
    uids = set()
    for p in files:
        ds = pydicom.dcmread(p)  # no force: a Part-10 file with a preamble and file meta
        for tag in TAGS:
            assert tag in ds, (p, tag)
        assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        assert (ds.BitsAllocated, ds.BitsStored, ds.PhotometricInterpretation) == (16, 12, "MONOCHROME2")
        assert int(p.stem) == ds.InstanceNumber and p.parent.parent.name == ds.PatientID
        img = ds.pixel_array
        assert img.shape == (ds.Rows, ds.Columns) and SIZE[0] <= ds.Rows <= SIZE[1]
        assert 100 < np.percentile(img, 99) < 4096  # MR-like magnitudes, not a blank image
        uids.add(ds.SOPInstanceUID)
    assert len(uids) == len(files)


def test_series_geometry_is_realistic(data: Path):
    manifest = json.loads((data / "synth_manifest.json").read_text())
    for study in manifest["studies"].values():
        for s in study["series"]:
            n = s["slices"]
            fov = s["pixel_spacing"][0] * max(s["rows"], s["cols"])
            if s["description"] == "Axial T2":
                assert 20 <= n <= 60 and 150 <= fov <= 220
            else:
                assert 15 <= n <= 20 and 250 <= fov <= 350
    # Instance numbers are not positions: some series run against the slice normal or start above 1.
    modes = [s["numbering"] for st in manifest["studies"].values() for s in st["series"]]
    assert {"ascending"} != set(modes)


def test_coordinates_land_in_the_named_structure_on_the_right_side(data: Path):
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    for r in coords.itertuples():
        ph = load_phantom(data, r.study_id)
        p = _slice(pydicom.dcmread(_path(data, "train", r), stop_before_pixels=True)).to_patient(r.x, r.y)
        assert ph.inside(r.condition, r.level, p).all(), r
        others = [lv for lv in LEVELS if lv != r.level]
        assert not any(ph.inside(r.condition, lv, p).any() for lv in others), r
        mirror = r.condition.replace("Left", "@").replace("Right", "Left").replace("@", "Right")
        if mirror != r.condition:
            assert not ph.inside(mirror, r.level, p).any(), r


def test_sagittal_and_axial_agree_in_3d(data: Path):
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    checked = 0
    for (study, level), g in coords.groupby(["study_id", "level"]):
        ph = load_phantom(data, study)
        pts = {r.condition: _slice(pydicom.dcmread(_path(data, "train", r), stop_before_pixels=True))
               .to_patient(r.x, r.y)[0] for r in g.itertuples()}
        canal, left, right = (pts.get(c) for c in ("Spinal Canal Stenosis", "Left Subarticular Stenosis",
                                                   "Right Subarticular Stenosis"))
        if canal is None or left is None or right is None:
            continue
        # Both recesses (axial) and the canal centre (sagittal) sit on the same disc, left and right of the canal.
        s_c, b_c, x_c = ph.to_spine(canal[None])
        s_l, _, x_l = ph.to_spine(left[None])
        s_r, _, x_r = ph.to_spine(right[None])
        assert abs(s_l[0] - s_c[0]) < 4.5 and abs(s_r[0] - s_c[0]) < 4.5
        assert x_r[0] < x_c[0] < x_l[0] and abs((x_l[0] + x_r[0]) / 2) < 3.0
        assert abs(x_c[0]) < 5.0  # the mid-sagittal slice: within half a slice + obliquity of the midline
        k = FIRST_LEVEL + LEVELS.index(level)
        assert abs(s_c[0] - ph.disc_s[k]) < 2.5
        checked += 1
    assert checked >= 5


def _window_mean(img: np.ndarray, sl: Slice, p: np.ndarray, mm: float) -> float:
    x, y, _ = sl.to_pixel(p)
    r = max(1, int(round(mm / sl.spacing[0])))
    return float(img[int(round(y)) - r:int(round(y)) + r + 1, int(round(x)) - r:int(round(x)) + r + 1].mean())


@pytest.mark.parametrize("condition", ["Spinal Canal Stenosis", "Left Neural Foraminal Narrowing",
                                       "Right Subarticular Stenosis"])
def test_severity_is_drawn_physically(condition: str):
    """Mean signal of the structure's bright content (CSF on T2, foraminal fat on T1) in a ~4 mm window around the
    labelled point falls with the grade, at every level; a 1-pixel marker could not do that over a window."""
    train, _ = plan(SynthConfig(studies=1, seed=3, image_size=(256, 256), difficulty=0.0))
    study = train[0]
    ph, group = study["phantom"], CONDITION_GROUP[condition]
    want = CONDITION_SERIES[condition]
    series = next(s for s in study["series_geom"] if s.description == want)  # CSF is bright on T2 and STIR
    for level in LEVELS:
        k = FIRST_LEVEL + LEVELS.index(level)
        p = ph.centre(condition, level)
        sl = series.nearest(p)[0]
        means = []
        for g in (0.08, 0.5, 0.85):
            if group == "spinal":
                ph.g_canal[k] = g
            else:
                side = SIDES.index("left" if condition.startswith("Left") else "right")
                (ph.g_foramen if group == "foraminal" else ph.g_recess)[k][side] = g
            img = render(ph, series, sl, np.random.default_rng(0), 0.0).astype(float)
            means.append(_window_mean(img, sl, p, 2.0))
        assert means[0] > means[1] > means[2], (level, means)
        assert means[0] > 1.3 * means[2], (level, means)


def test_same_seed_same_bytes_whatever_the_workers(data: Path, tmp_path: Path):
    again = tmp_path / "again"
    synth(again, studies=3, seed=7, image_size=SIZE, workers=2)
    assert _hashes(again) == _hashes(data)
    other = tmp_path / "other"
    synth(other, studies=1, seed=8, image_size=SIZE)
    assert pd.read_csv(other / "train.csv").study_id.tolist() != pd.read_csv(data / "train.csv").study_id.tolist()[:1]


def test_from_tables_reuses_the_real_ids_labels_and_rows(tmp_path: Path):
    out = tmp_path / "real"
    synth(out, studies=6, seed=1, image_size=(48, 64), from_tables=FIXTURE)
    real_train = pd.read_csv(FIXTURE / "train.csv")
    ours = pd.read_csv(out / "train.csv")
    pd.testing.assert_frame_equal(ours, real_train)  # ids, labels and empty cells, byte for byte in meaning
    pd.testing.assert_frame_equal(pd.read_csv(out / "train_series_descriptions.csv"),
                                  pd.read_csv(FIXTURE / "train_series_descriptions.csv"))
    key = ["study_id", "series_id", "condition", "level"]
    real_c = pd.read_csv(FIXTURE / "train_label_coordinates.csv")
    our_c = pd.read_csv(out / "train_label_coordinates.csv")
    merged = real_c.merge(our_c, on=key, suffixes=("_real", "_ours"), validate="one_to_one")
    assert len(merged) == len(real_c) == len(our_c)
    manifest = json.loads((out / "synth_manifest.json").read_text())
    repointed = sum(len(manifest["studies"][str(s)]["repointed"]) for s in real_train.study_id)
    kept = (merged.instance_number_real == merged.instance_number_ours).sum()
    assert kept + repointed == len(merged) and kept > 0
    for r in our_c.itertuples():  # and every row still names a real file at a point inside the image
        ds = pydicom.dcmread(_path(out, "train", r), stop_before_pixels=True)
        assert 0 <= r.x < ds.Columns and 0 <= r.y < ds.Rows


def test_faults_are_exactly_what_the_manifest_lists(tmp_path: Path):
    out = tmp_path / "faulty"
    clean = tmp_path / "clean"
    synth(out, studies=1, seed=5, image_size=(48, 64), faults=True)
    synth(clean, studies=1, seed=5, image_size=(48, 64))
    faults = json.loads((out / "faults.json").read_text())["faults"]
    kinds = {f["kind"]: f for f in faults}
    assert len(kinds) == len(faults) >= 20
    # The clean studies are untouched: same files, same bytes as a run without --faults.
    clean_hashes, fault_hashes = _hashes(clean / "train_images"), _hashes(out / "train_images")
    assert all(fault_hashes[k] == v for k, v in clean_hashes.items())
    coords = pd.read_csv(out / "train_label_coordinates.csv", dtype=str, keep_default_na=False)
    labels = pd.read_csv(out / "train.csv", dtype=str, keep_default_na=False)
    series = pd.read_csv(out / "train_series_descriptions.csv", dtype=str)
    for f in faults:
        assert f["expect"] in ("ok", "error") and f["rows"] and (f["expect"] == "ok") == (f["stage"] is None)
    p = {k: out / f["path"] for k, f in kinds.items()}
    assert p["zero_byte_file"].stat().st_size == 0
    assert not p["missing_instance"].exists() and not p["missing_series_folder"].exists()
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(p["non_dicom_file"])
    ds = pydicom.dcmread(p["truncated_file"])
    assert len(ds.PixelData) < ds.Rows * ds.Columns * 2
    assert "PixelData" not in pydicom.dcmread(p["no_pixel_data"])
    ds = pydicom.dcmread(p["pixel_data_too_short"])
    assert len(ds.PixelData) < ds.Rows * ds.Columns * 2
    with pytest.raises(Exception):  # noqa: B017 - whatever pydicom raises for a syntax it cannot decode
        _ = pydicom.dcmread(p["undecodable_transfer_syntax"]).pixel_array
    assert all("PixelSpacing" not in pydicom.dcmread(q) for q in p["missing_pixel_spacing"].glob("*.dcm"))
    assert "Coronal T2" in set(series.series_description)
    # Valid encodings decode to exactly the pixels that were rendered (re-rendered here from the plan).
    for kind in ("rle_lossless", "jpeg2000_lossless", "deflated", "jpeg_ls_lossless", "implicit_vr",
                 "monochrome1", "rescale_slope", "missing_position_orientation", "mixed_sizes"):
        if kind in kinds:
            files = sorted(p[kind].glob("*.dcm"))
            assert files, kind
            for q in files[:3]:
                ds = pydicom.dcmread(q)
                img = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                assert img.shape == (ds.Rows, ds.Columns) and np.percentile(img, 99) > 100, kind
    assert pydicom.dcmread(next(p["rle_lossless"].glob("*.dcm"))).file_meta.TransferSyntaxUID.is_compressed
    assert pydicom.dcmread(next(p["monochrome1"].glob("*.dcm"))).PhotometricInterpretation == "MONOCHROME1"
    assert "ImagePositionPatient" not in pydicom.dcmread(next(p["missing_position_orientation"].glob("*.dcm")))
    sizes = {pydicom.dcmread(q, stop_before_pixels=True).Rows for q in p["mixed_sizes"].glob("*.dcm")}
    assert len(sizes) == 2
    # Table faults.
    sid = lambda k: str(kinds[k]["study_id"])  # noqa: E731
    row = lambda k: coords[(coords.study_id == sid(k)) & (coords.condition == kinds[k]["rows"][0][0])]  # noqa: E731
    assert (row("coordinate_outside_image").x.astype(float) > 64).any()
    assert (row("nan_coordinate").y == "").any()
    dup = coords[(coords.study_id == sid("duplicated_coordinate_row"))]
    assert dup.duplicated().sum() == 1
    assert "L4-L5" in set(coords.level) and "Spinal Stenosis" in set(coords.condition)
    assert "1234" in set(coords.study_id) and "1234" not in set(labels.study_id)
    assert "../../etc" in set(coords.series_id)
    lbl = labels.set_index("study_id")
    assert lbl.loc[sid("empty_label_cell"), "left_neural_foraminal_narrowing_l2_l3"] == ""
    assert lbl.loc[sid("unknown_label_string"), "left_neural_foraminal_narrowing_l3_l4"] == "Mild"
    g = coords[(coords.study_id == sid("label_without_coordinates"))]
    assert not ((g.condition == "Left Neural Foraminal Narrowing") & (g.level == "L1/L2")).any()
    assert lbl.loc[sid("label_without_coordinates"), "left_neural_foraminal_narrowing_l1_l2"] in LABELS


def test_cli_synth(tmp_path: Path):
    from lsdc.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["synth", str(out), "--studies", "1", "--seed", "2", "--image-size", "48,64",
                                      "--difficulty", "0.3"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["train_studies"] == 1 and summary["test_studies"] == 1
    assert summary["files"] == len(list(out.rglob("*.dcm")))
    manifest = json.loads((out / "synth_manifest.json").read_text())
    assert manifest["config"]["difficulty"] == 0.3 and manifest["config"]["image_size"] == [48, 64]
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--image-size", "64,32"])
    assert bad.exit_code != 0 and "LO,HI" in bad.output


def test_refuses_to_mix_datasets_unless_overwrite(tmp_path):
    from prep.synth import synth

    out = tmp_path / "data"
    synth(out, studies=1, image_size=(32, 48), progress=False)
    synth(out, studies=1, image_size=(32, 48), progress=False)  # same settings: the same bytes again
    with pytest.raises(ValueError, match="other settings"):
        synth(out, studies=2, image_size=(32, 48), progress=False)
    summary = synth(out, studies=2, image_size=(32, 48), progress=False, overwrite=True)
    assert summary["train_studies"] == 2 and len(list((out / "train_images").iterdir())) == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="not empty"):
        synth(tmp_path / "mine", studies=1, image_size=(32, 48), progress=False, overwrite=True)
