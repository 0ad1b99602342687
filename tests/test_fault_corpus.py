"""The fault corpus (issue 7, item 5): every bad input gives its own named error, every good sample is bit-identical.

Two sources, each case its own test:
- `lsdc synth --faults` (prep/synth/faults.py, faults.json): one synth run shared by the module. The clean files of
  the very same studies are copied just before the faults are applied, so every sample - in the fault studies too -
  has a clean twin to compare with (checksum, index row and pixels).
- `EXTRA`: faults the synth corpus does not hold, each applied to a copy of a tiny clean dataset
  (tests/prep_fixtures.write_dataset) and compared with that dataset's clean build.
docs/reliability.md lists them all with the stage and reason each one gives.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.tag import Tag
from pydicom.uid import JPEG2000Lossless

import cache
import prep.synth.faults as synth_faults
from cache.rsna import LABEL_COLUMNS, LEVELS
from prep.build import build
from prep.config import PrepConfig
from prep.samples import TableError
from prep.synth import synth
from prep_fixtures import SAGITTAL, phantom, write_dataset, write_slice

SYNTH_CFG = PrepConfig(size=32)
SMALL_CFG = PrepConfig(size=32, crop_scale=1.0, crop_base_mm=20.0)
SCS = "Spinal Canal Stenosis"
TABLES = ("train.csv", "train_series_descriptions.csv", "train_label_coordinates.csv")


def without_row(index: pd.DataFrame) -> pd.DataFrame:
    """Index rows keyed by sample: `row` numbers shift when other samples fail, everything else must not."""
    return index.drop(columns="row").set_index(["study_id", "condition", "level"]).sort_index()


def assert_same_sample(c: cache.CacheReader, ref: cache.CacheReader, key: tuple) -> None:
    """Bit-identical: the whole index row (checksum included) and the pixels read back."""
    a, b = without_row(c.index).loc[key], without_row(ref.index).loc[key]
    assert a.astype(str).tolist() == b.astype(str).tolist(), key
    row_a = int(c.index.set_index(["study_id", "condition", "level"]).loc[key, "row"])
    row_b = int(ref.index.set_index(["study_id", "condition", "level"]).loc[key, "row"])
    assert np.array_equal(c.read_row(row_a), ref.read_row(row_b)), key


def pixels(c: cache.CacheReader, key: tuple) -> np.ndarray:
    return c.read_row(int(c.index.set_index(["study_id", "condition", "level"]).loc[key, "row"])).astype(np.int16)


# ================================================================================================ the synth corpus
@dataclass
class Corpus:
    data: Path  # with faults
    clean: Path  # the same studies before the faults were applied
    faults: dict[str, dict]  # kind -> faults.json entry
    cache: cache.CacheReader
    ref: cache.CacheReader


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    apply = synth_faults.apply_faults

    def keep_clean_copy(out, studies, cfg):
        shutil.copytree(out, root / "clean")  # files and tables written, no fault applied yet
        return apply(out, studies, cfg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth_faults, "apply_faults", keep_clean_copy)
        synth(root / "data", studies=2, seed=5, image_size=(64, 96), faults=True, progress=False)
    clean = build(root / "clean", root / "clean_cache", SYNTH_CFG, scheduler="synchronous")
    assert clean.errors.empty
    build(root / "data", root / "cache", SYNTH_CFG, scheduler="synchronous")
    faults = {f["kind"]: f for f in json.loads((root / "data" / "faults.json").read_text())["faults"]}
    return Corpus(root / "data", root / "clean", faults, cache.open(root / "cache"), cache.open(root / "clean_cache"))


# kind -> (stage, the reason it must give, the token the named CSV line must hold for a table fault)
SYNTH_ERRORS: dict[str, tuple[str, str, str | None]] = {
    "truncated_file": ("decode", r"labelled instance: unreadable pixel data: file truncated \(PixelData declares "
                                 r"\d+ bytes, the file holds \d+\)", None),
    "zero_byte_file": ("read", r"labelled instance: empty file \(0 bytes\)", None),
    "non_dicom_file": ("read", r"labelled instance: not a DICOM file \(.*DICM", None),
    "no_pixel_data": ("decode", r"labelled instance: no pixel data$", None),
    "pixel_data_too_short": ("decode", r"labelled instance: pixel data holds \d+ bytes, Rows x Columns x "
                                       r"BitsAllocated \(\d+x\d+x16\) need \d+$", None),
    "undecodable_transfer_syntax": ("decode", r"labelled instance: undecodable pixel data \(MPEG2 .*not supported",
                                    None),
    "missing_instance": ("read", r"missing file: instance \d+ lies inside the series' numbering \d+\.\.\d+ but its "
                                 r"file is absent", None),
    "instance_not_in_series": ("geometry", r"instance \d+ not in series \(instances \d+\.\.\d+\)", None),
    "missing_series_folder": ("read", r"missing series folder$", None),
    "missing_pixel_spacing": ("crop", r"labelled slice has no PixelSpacing: the crop cannot be sized in mm", None),
    "unknown_series_description": ("tables", r"unknown series description 'Coronal T2' "
                                             r"\(train_series_descriptions\.csv:\d+\)", None),
    "coordinate_outside_image": ("crop", r"coordinate \(\S+, \S+\) outside the \d+x\d+ image", None),
    "nan_coordinate": ("tables", r"coordinate x='[^']+', y='' is not a finite number", ","),
    "duplicated_coordinate_row": ("tables", r"duplicate coordinate for .*, first at line \d+", None),
    "unknown_level": ("tables", r"unknown level 'L4-L5'", "L4-L5"),
    "unknown_condition": ("tables", r"unknown condition 'Spinal Stenosis'", "Spinal Stenosis"),
    "label_without_coordinates": ("tables", r"label '[^']+' without coordinates", None),
    "unknown_label_string": ("tables", r"unknown label 'Mild'", "Mild"),
    "coordinate_for_unknown_study": ("tables", r"study 1234 is not in train\.csv", "1234,"),
    "invalid_series_id": ("tables", r"series_id '\.\./\.\./etc' not a non-negative integer id", "../../etc"),
}
# kind -> how its samples must compare with the clean twins
SYNTH_OK = {
    "rle_lossless": "identical", "jpeg2000_lossless": "identical", "jpeg_ls_lossless|deflated": "identical",
    "implicit_vr": "identical", "missing_position_orientation": "same pixels", "empty_label_cell": "same pixels",
    "monochrome1": "rounding", "rescale_slope": "lost bit", "mixed_sizes": "resampled",
}


def fault_errors(corpus: Corpus, kind: str) -> pd.DataFrame:
    """The error rows a fault gave: its study (1234 for the unknown one) and its reason."""
    f, (_, pattern, _) = corpus.faults[kind], SYNTH_ERRORS[kind]
    e = corpus.cache.errors
    return e[(e.study_id == f["study_id"]) & e.reason.str.contains(pattern, regex=True)]


def test_the_synth_corpus_holds_every_documented_fault(corpus):
    errors = {k for k, f in corpus.faults.items() if f["expect"] == "error"}
    assert errors == set(SYNTH_ERRORS)
    assert {k for k, f in corpus.faults.items() if f["expect"] == "ok"} == \
        {"rle_lossless", "jpeg2000_lossless", "implicit_vr", "missing_position_orientation", "empty_label_cell",
         "monochrome1", "rescale_slope", "mixed_sizes"} | ({"jpeg_ls_lossless", "deflated"} & set(corpus.faults))
    for kind, (stage, _, _) in SYNTH_ERRORS.items():
        assert corpus.faults[kind]["stage"] == stage, kind


@pytest.mark.parametrize("kind", list(SYNTH_ERRORS))
def test_synth_fault_gives_its_named_error(corpus, kind):
    f, (stage, _, token) = corpus.faults[kind], SYNTH_ERRORS[kind]
    hits = fault_errors(corpus, kind)
    # one row per sample the fault touches, at the documented stage, naming that sample
    assert len(hits) == len(f["rows"]) and (hits.stage == stage).all(), hits[["stage", "reason"]].values.tolist()
    named = {(c if pd.notna(c) else None, lv if pd.notna(lv) else None) for c, lv in zip(hits.condition, hits.level)}
    for condition, level in f["rows"]:  # an unknown condition/level string is left out of the row, never guessed
        assert {(condition, level), (None, level), (condition, None)} & named, (condition, level)
    # ... and naming the file (and line, for a table) it comes from
    for path in hits.path:
        if stage == "tables":
            name, line = path.rsplit(":", 1)
            text = (corpus.data / name).read_text().splitlines()[int(line) - 1]
            assert name in TABLES and (token is None or token in text), (path, text)
            if name == "train.csv":
                assert text.startswith(f"{f['study_id']},")
        else:
            assert path.endswith(f["path"]) or f["path"] in path, path
    built = set(zip(corpus.cache.index.study_id, corpus.cache.index.condition, corpus.cache.index.level))
    keys = {(f["study_id"], c, lv) for c, lv in f["rows"]}
    if kind in ("duplicated_coordinate_row", "invalid_series_id"):  # an added copy: the original row is built
        for key in keys:
            assert_same_sample(corpus.cache, corpus.ref, key)
    else:  # none of its samples is in the cache
        assert not keys & built


def test_every_error_row_is_exactly_one_named_fault(corpus):
    """Distinct faults give distinct errors: no row is claimed by two faults, none is unexplained."""
    owners = {i: [] for i in range(len(corpus.cache.errors))}
    for kind in SYNTH_ERRORS:
        for i in fault_errors(corpus, kind).index:
            owners[i].append(kind)
    assert all(len(o) == 1 for o in owners.values()), {i: o for i, o in owners.items() if len(o) != 1}


@pytest.mark.parametrize("kind", list(SYNTH_OK))
def test_synth_valid_but_unusual_input_builds(corpus, kind):
    how = SYNTH_OK[kind]
    kind = next(k for k in kind.split("|") if k in corpus.faults)  # JPEG-LS only where its encoder is installed
    f = corpus.faults[kind]
    c, ref = corpus.cache, corpus.ref
    idx, ref_idx = without_row(c.index), without_row(ref.index)
    for condition, level in f["rows"]:
        key = (f["study_id"], condition, level)
        assert key in idx.index, key
        assert list(idx.loc[key, "slice_instances"]) == list(ref_idx.loc[key, "slice_instances"])
        a, b = pixels(c, key), pixels(ref, key)
        if how == "identical":  # lossless encodings decode to the very same values
            assert_same_sample(c, ref, key)
        elif how == "same pixels":  # the index records the quirk, the pixels are unchanged
            assert np.array_equal(a, b)
        elif how == "rounding":  # MONOCHROME1 is negated: windows are shift-invariant up to float rounding
            assert (a != b).mean() < 0.005
        elif how == "lost bit":  # stored (v + 100) // 2 loses the lowest bit
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99 and np.abs(a - b).mean() < 3
        else:  # mixed sizes: larger neighbours re-rendered (other noise) and resampled onto the labelled grid
            for s in range(a.shape[0]):
                assert np.corrcoef(a[s].ravel(), b[s].ravel())[0, 1] > 0.9 and a[s].std() > 10, (key, s)
    if kind == "missing_position_orientation":
        assert (idx.loc[[(f["study_id"], c_, lv) for c_, lv in f["rows"]], "ordering"] == "instance_number").all()
    if kind == "empty_label_cell":
        assert idx.loc[(f["study_id"], *f["rows"][0]), "label"] is pd.NA
        assert ref_idx.loc[(f["study_id"], *f["rows"][0]), "label"] is not pd.NA


def _changed_files(clean: Path, data: Path) -> set[str]:
    """Image files (relative paths) that differ between the clean and the faulty dataset, or exist in one only."""
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in (root / "train_images").rglob("*.dcm")}

    a, b = files(clean), files(data)
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def test_every_good_sample_is_bit_identical_to_the_clean_build(corpus):
    changed = _changed_files(corpus.clean, corpus.data)
    touched = {(f["study_id"], c, lv) for f in corpus.faults.values() for c, lv in f["rows"]}
    c, ref = corpus.cache, corpus.ref
    built, failed = set(without_row(c.index).index), {(f["study_id"], cnd, lv) for f in corpus.faults.values()
                                                       if f["expect"] == "error" for cnd, lv in f["rows"]}
    good = neighbours = 0
    for r in ref.index.itertuples():
        key = (r.study_id, r.condition, r.level)
        files = {f"train_images/{r.study_id}/{r.series_id}/{i}.dcm" for i in r.slice_instances}
        if key in touched:
            continue
        if files & changed:  # a broken neighbour: dropped and reported, the stack taken again without it
            assert key in built, key
            assert not {f"train_images/{r.study_id}/{r.series_id}/{i}.dcm"
                        for i in without_row(c.index).loc[key, "slice_instances"]} & changed
            neighbours += 1
            continue
        assert_same_sample(c, ref, key)
        good += 1
    assert good >= len(ref) // 3 and neighbours >= 1  # both cases are exercised on a good share of the data
    assert built <= set(without_row(ref.index).index)  # no sample invented (duplicates, unknown studies)
    assert set(without_row(ref.index).index) - built <= failed  # whatever is missing is a named error


# ====================================================================== extra faults on copies of a tiny dataset
S0, S1, S2 = 1000, 1001, 1002  # write_dataset: study 100s has series 500s, 9 sagittal slices, 5 canal points


@dataclass
class Expect:
    """What a fault must give. errors: (stage, reason regex, study or None, level or None), one row each."""

    errors: list[tuple[str, str, int | None, str | None]] = field(default_factory=list)
    changed: set[tuple[int, str]] = field(default_factory=set)  # built samples allowed to differ from the clean ones
    dropped: set[tuple[int, int]] = field(default_factory=set)  # (study, instance): a bad file no built sample holds
    table: str | None = None  # a broken table: build raises TableError naming this file, and writes nothing
    check: Callable[[cache.CacheReader, Path], None] | None = None


def _series(d: Path, study: int) -> Path:
    return d / "train_images" / str(study) / str(study + 4000)


def _coords(d: Path) -> pd.DataFrame:
    return pd.read_csv(d / "train_label_coordinates.csv", dtype=str, keep_default_na=False)


def _edit_coords(d: Path, study: int, level: str, **values: str) -> None:
    df = _coords(d)
    m = (df.study_id == str(study)) & (df.level == level)
    assert m.sum() == 1
    for k, v in values.items():
        df.loc[m, k] = v
    df.to_csv(d / "train_label_coordinates.csv", index=False)


def _labelled(d: Path, study: int, level: str) -> Path:
    df = _coords(d)
    inst = df.loc[(df.study_id == str(study)) & (df.level == level), "instance_number"].item()
    return _series(d, study) / f"{inst}.dcm"


def _rewrite(path: Path, edit: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path, enforce_file_format=True)


def _levels_on(d: Path, study: int, path: Path) -> list[str]:
    df = _coords(d)
    return df.loc[(df.study_id == str(study)) & (df.instance_number == path.stem), "level"].tolist()


def _others(study: int, *failing: str) -> set[tuple[int, str]]:
    return {(study, lv) for lv in LEVELS if lv not in failing}


def one_slice_series(d: Path) -> Expect:
    """A series of one slice: every slice of the stack is the edge slice, replicated and recorded."""
    keep = _labelled(d, S1, "L2/L3")
    for p in _series(d, S1).iterdir():
        if p != keep:
            p.unlink()
    for lv in LEVELS:
        _edit_coords(d, S1, lv, instance_number=keep.stem)

    def check(c: cache.CacheReader, _: Path) -> None:
        rows = c.index[c.index.study_id == S1]
        assert len(rows) == 5
        for r in rows.itertuples():
            assert list(r.slice_instances) == [int(keep.stem)] * 7 and list(r.slice_offsets_mm) == [0.0] * 7
            assert list(r.replicated) == [True] * 3 + [False] + [True] * 3
            stack = c.read_row(r.row)
            assert all(np.array_equal(stack[s], stack[3]) for s in range(7)) and stack.std() > 10  # never black
        assert c.manifest["prep"]["samples_with_replicated_slices"] == 5

    return Expect(changed=_others(S1), check=check)


def corrupt_compressed_bytes(d: Path) -> Expect:
    """JPEG 2000 whose codestream is cut in half: the decoder's own error, never a partial image."""
    path = _labelled(d, S0, "L1/L2")

    def cut(ds):
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        frame = list(generate_fragments(ds.PixelData))[1]  # [0] is the basic offset table
        ds.PixelData = encapsulate([frame[: len(frame) // 2]])

    _rewrite(path, cut)
    failing = _levels_on(d, S0, path)
    return Expect([("decode", r"labelled instance: undecodable pixel data \(JPEG 2000 Image Compression "
                              r"\(Lossless Only\); RuntimeError", S0, lv) for lv in failing],
                  changed=_others(S0, *failing), dropped={(S0, int(path.stem))})  # the others lose that neighbour


def rgb_image(d: Path) -> Expect:
    path = _labelled(d, S0, "L2/L3")

    def rgb(ds):
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()

    _rewrite(path, rgb)
    failing = _levels_on(d, S0, path)
    return Expect([("decode", r"labelled instance: not a grayscale image \(SamplesPerPixel=3\)", S0, lv)
                   for lv in failing], changed=_others(S0, *failing), dropped={(S0, int(path.stem))})


def multi_frame(d: Path) -> Expect:
    path = _labelled(d, S0, "L3/L4")

    def frames(ds):
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    _rewrite(path, frames)
    failing = _levels_on(d, S0, path)
    return Expect([("decode", r"labelled instance: multi-frame image \(2 frames\)", S0, lv) for lv in failing],
                  changed=_others(S0, *failing), dropped={(S0, int(path.stem))})


def header_without_rows(d: Path) -> Expect:
    path = _labelled(d, S2, "L1/L2")
    _rewrite(path, lambda ds: delattr(ds, "Rows"))
    failing = _levels_on(d, S2, path)
    return Expect([("read", r"labelled instance: header lacks InstanceNumber/Rows/Columns", S2, lv)
                   for lv in failing], changed=_others(S2, *failing), dropped={(S2, int(path.stem))})


def instance_number_disagrees_with_file_name(d: Path) -> Expect:
    """7.dcm whose header says it is instance 4: where would it go? Neither - it is reported, never guessed."""
    path, other = _labelled(d, S1, "L1/L2"), _labelled(d, S1, "L2/L3")
    _rewrite(path, lambda ds: setattr(ds, "InstanceNumber", int(other.stem)))
    failing = _levels_on(d, S1, path)
    return Expect([("read", rf"labelled instance: InstanceNumber {other.stem} in the header disagrees with the file "
                            r"name$", S1, lv) for lv in failing], changed=_others(S1, *failing),
                  dropped={(S1, int(path.stem))})


def empty_instance_number_tag(d: Path) -> Expect:
    """An empty InstanceNumber: the file name gives the number, the cache is unchanged."""
    for p in _series(d, S1).iterdir():
        _rewrite(p, lambda ds: setattr(ds, "InstanceNumber", ""))
    return Expect()


def other_size_without_geometry(d: Path) -> Expect:
    """No position/orientation tags and one slice of another size: it cannot be placed on the series' grid. It is the
    bad file, not the samples around it: dropped and reported once; only a sample labelled on it fails."""
    files = sorted(_series(d, S2).iterdir(), key=lambda p: int(p.stem))  # no geometry: instance-number order
    odd = files[0]
    for p in files:
        _rewrite(p, lambda ds: (delattr(ds, "ImagePositionPatient"), delattr(ds, "ImageOrientationPatient")))

    def bigger(ds):
        ds.Rows = ds.Columns = 80
        ds.PixelData = phantom(80, seed=3).astype("<u2").tobytes()

    _rewrite(odd, bigger)
    reason = r"80x80 slice among 64x64 ones, and geometry tags are missing to map one onto the other$"
    failing = _levels_on(d, S2, odd)
    errors = [("geometry", f"labelled instance: {reason}", S2, lv) for lv in failing]
    return Expect(errors or [("geometry", f"^{reason}", S2, None)], changed=_others(S2, *failing),
                  dropped={(S2, int(odd.stem))})


def constant_stack(d: Path) -> Expect:
    """Every slice one value (e.g. a blank series): nothing to window - an error, never a grey sample."""
    for p in _series(d, S2).iterdir():
        _rewrite(p, lambda ds: setattr(ds, "PixelData", phantom(64, value=500).astype("<u2").tobytes()))
    return Expect([("window", r"stack has one constant intensity \(500\): nothing to window", S2, lv)
                   for lv in LEVELS])


def negative_coordinate(d: Path) -> Expect:
    _edit_coords(d, S0, "L5/S1", x="-3.5")
    return Expect([("crop", r"coordinate \(-3\.5, \S+\) outside the 64x64 image", S0, "L5/S1")])


def infinite_coordinate(d: Path) -> Expect:
    _edit_coords(d, S1, "L4/L5", y="inf")
    return Expect([("tables", r"coordinate x='\S+', y='inf' is not a finite number", S1, "L4/L5")])


def underscored_coordinate(d: Path) -> Expect:
    """Python's float() reads '1_70.49' as 170.49: a table's number is taken only as a CSV writes one."""
    _edit_coords(d, S1, "L4/L5", x="1_70.49")
    return Expect([("tables", r"coordinate x='1_70\.49', y='\S+' is not a finite number", S1, "L4/L5")])


def fifo_in_series(d: Path) -> Expect:
    """A FIFO named like a slice would block a reader forever: refused unread, reported once."""
    os.mkfifo(_series(d, S0) / "99.dcm")
    return Expect([("read", r"^not a regular file \(a FIFO\): not read$", S0, None)])


def non_integer_instance(d: Path) -> Expect:
    inst = _labelled(d, S1, "L1/L2").stem
    _edit_coords(d, S1, "L1/L2", instance_number=f"{inst}.0")
    return Expect([("tables", rf"instance_number '{inst}\.0' not a non-negative integer id", S1, "L1/L2"),
                   ("tables", r"label '[^']+' without coordinates", S1, "L1/L2")])  # and its label is unbuilt


def path_like_study_id(d: Path) -> Expect:
    _edit_coords(d, S2, "L3/L4", study_id="1/2")
    return Expect([("tables", r"study_id '1/2' not a non-negative integer id", None, "L3/L4"),
                   ("tables", r"label '[^']+' without coordinates", S2, "L3/L4")])


def duplicate_study_in_train_csv(d: Path) -> Expect:
    df = pd.read_csv(d / "train.csv", dtype=str, keep_default_na=False)
    twin = df[df.study_id == str(S1)].copy()
    twin[list(LABEL_COLUMNS)] = "Severe"
    pd.concat([df, twin]).to_csv(d / "train.csv", index=False)  # the first row wins: labels unchanged
    return Expect([("tables", r"duplicate study, first at line 3", S1, None)])


def series_missing_from_series_table(d: Path) -> Expect:
    lines = (d / "train_series_descriptions.csv").read_text().splitlines()
    (d / "train_series_descriptions.csv").write_text("\n".join(ln for ln in lines if not ln.startswith(f"{S2},"))
                                                     + "\n")
    return Expect([("tables", rf"series {S2 + 4000} of study {S2} is not in train_series_descriptions\.csv", S2, lv)
                   for lv in LEVELS])


def series_listed_twice_with_other_descriptions(d: Path) -> Expect:
    """Which description is right cannot be known: the series is unusable, named on every sample, never guessed."""
    with open(d / "train_series_descriptions.csv", "a") as f:
        f.write(f"{S1},{S1 + 4000},Axial T2\n")
    return Expect([("tables", r"series listed twice with different descriptions: 'Sagittal T2/STIR' "
                              r"\(train_series_descriptions\.csv:3\) and 'Axial T2' "
                              r"\(train_series_descriptions\.csv:5\)",
                    S1, lv) for lv in LEVELS])


def series_listed_twice_alike(d: Path) -> Expect:
    """The same row twice is harmless: the cache is unchanged."""
    with open(d / "train_series_descriptions.csv", "a") as f:
        f.write(f"{S1},{S1 + 4000},Sagittal T2/STIR\n")
    return Expect()


def stray_copy_of_a_slice(d: Path) -> Expect:
    """`6 (1).dcm`, a copy of the labelled 6.dcm: one file per slice is used, the copy is reported once, and every
    stack is exactly the clean build's (never [.., 6, 6, ..])."""
    path = _labelled(d, S0, "L2/L3")
    copy = path.with_name(f"{path.stem} (1).dcm")
    shutil.copy(path, copy)
    return Expect([("read", rf"^a copy of {path.name} \(same instance number {path.stem} and position\): left out, "
                            rf"{path.name} used$", S0, None)])


def file_linked_outside_the_data_folder(d: Path) -> Expect:
    """A slice that is a symbolic link to a file outside the data folder is refused, not read: its samples fail,
    neighbouring stacks are built without it."""
    path = _labelled(d, S2, "L1/L2")
    outside = d.parent / "elsewhere" / path.name
    outside.parent.mkdir()
    shutil.move(path, outside)
    path.symlink_to(outside)
    failing = _levels_on(d, S2, path)
    return Expect([("read", r"labelled instance: links outside the data folder \(to .*elsewhere.*\): refused, not "
                            r"read$", S2, lv) for lv in failing], changed=_others(S2, *failing),
                  dropped={(S2, int(path.stem))})


def series_folder_linked_outside_the_data_folder(d: Path) -> Expect:
    series = _series(d, S1)
    outside = d.parent / "elsewhere_series"
    shutil.move(series, outside)
    series.symlink_to(outside, target_is_directory=True)
    return Expect([("read", r"the series folder links outside the data folder \(to .*elsewhere_series\): refused",
                    S1, lv) for lv in LEVELS])


def stray_files_in_series(d: Path) -> Expect:
    """Not every file in a series folder is a slice: other names are ignored, the cache is unchanged."""
    series = _series(d, S0)
    (series / ".DS_Store").write_bytes(b"\0\1junk")
    (series / "notes.txt").write_text("scanner notes")
    (series / "3.dcm.bak").write_bytes(b"old")
    (series / "sub").mkdir()
    return Expect()


# ------------------------------------------------- a bad value in a geometry or intensity tag, or a size that lies
def _raw(keyword: str, text: str) -> Callable[[pydicom.Dataset], None]:
    """Set a text tag (DS, IS, CS) to exactly these bytes, which pydicom itself would refuse to write ('abc', 'nan')."""
    def edit(ds: pydicom.Dataset) -> None:
        value = text.encode() + (b" " if len(text) % 2 else b"")
        tag = Tag(tag_for_keyword(keyword))
        ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True, True, False)

    return edit


def _set(**values: object) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: [setattr(ds, k, v) for k, v in values.items()]


def _unused_slice(d: Path, study: int) -> Path:
    """A tenth slice of the series, 4 mm beyond the last one: in the series, in no sample's stack (the stacks of
    write_dataset's labelled slices, the 4th-6th of 9, end at the 9th)."""
    return write_slice(_series(d, study) / "99.dcm", phantom(64, seed=99), instance=99, spacing=(0.9, 0.9),
                       position=(-4.0 * 9, 0.0, 0.0), orientation=SAGITTAL)  # write_series' 10th place (normal -x)


_SPACING, _POSITION, _ORIENTATION = (r"is not 2 spacings of 0\.05\.\.10 mm", r"is not 3 finite coordinates in mm",
                                     r"is not two perpendicular unit directions \(6 numbers\)")
_SLOPE, _INTERCEPT = (r"is not a usable number \(finite, non-zero, \|value\| <= 1e\+20\)",
                      r"is not a usable number \(finite, \|value\| <= 1e\+20\)")
# name -> (edit, stage, reason): every tag the geometry or the intensities read, non-numeric, non-finite, out of
# range or degenerate; sizes that disagree with the pixel data; pixel formats that are no grayscale slice.
BAD_VALUES: dict[str, tuple[Callable[[pydicom.Dataset], None], str, str]] = {
    "PixelSpacing=abc": (_raw("PixelSpacing", "abc\\0.9"), "read", rf"PixelSpacing 'abc\\0\.9' {_SPACING}"),
    "PixelSpacing=nan": (_raw("PixelSpacing", "nan\\0.9"), "read", rf"PixelSpacing 'nan\\0\.9' {_SPACING}"),
    "PixelSpacing=0.01": (_raw("PixelSpacing", "0.01\\0.01"), "read", rf"PixelSpacing '0\.01\\0\.01' {_SPACING}"),
    "PixelSpacing=20": (_raw("PixelSpacing", "20\\20"), "read", rf"PixelSpacing '20\\20' {_SPACING}"),
    "PixelSpacing=negative": (_raw("PixelSpacing", "-0.9\\0.9"), "read", rf"PixelSpacing '-0\.9\\0\.9' {_SPACING}"),
    "PixelSpacing=one_value": (_raw("PixelSpacing", "0.9"), "read", rf"PixelSpacing '0\.9' {_SPACING}"),
    "ImagePositionPatient=nan": (_raw("ImagePositionPatient", "nan\\0\\0"), "read",
                                 rf"ImagePositionPatient 'nan\\0\\0' {_POSITION}"),
    "ImagePositionPatient=abc": (_raw("ImagePositionPatient", "x\\0\\0"), "read",
                                 rf"ImagePositionPatient 'x\\0\\0' {_POSITION}"),
    "ImagePositionPatient=1e300": (_raw("ImagePositionPatient", "1e300\\0\\0"), "read",
                                   rf"ImagePositionPatient '1e300\\0\\0' {_POSITION}"),
    "ImagePositionPatient=two_values": (_raw("ImagePositionPatient", "0\\0"), "read",
                                        rf"ImagePositionPatient '0\\0' {_POSITION}"),
    "ImageOrientationPatient=zero": (_raw("ImageOrientationPatient", "0\\0\\0\\0\\0\\0"), "read",
                                     rf"ImageOrientationPatient '0\\0\\0\\0\\0\\0' {_ORIENTATION}"),
    "ImageOrientationPatient=parallel": (_raw("ImageOrientationPatient", "0\\1\\0\\0\\1\\0"), "read",
                                         rf"ImageOrientationPatient '0\\1\\0\\0\\1\\0' {_ORIENTATION}"),
    "ImageOrientationPatient=not_unit": (_raw("ImageOrientationPatient", "0\\2\\0\\0\\0\\-2"), "read",
                                         rf"ImageOrientationPatient '0\\2\\0\\0\\0\\-2' {_ORIENTATION}"),
    "ImageOrientationPatient=nan": (_raw("ImageOrientationPatient", "0\\1\\0\\0\\0\\nan"), "read",
                                    rf"ImageOrientationPatient '0\\1\\0\\0\\0\\nan' {_ORIENTATION}"),
    "ImageOrientationPatient=five_values": (_raw("ImageOrientationPatient", "0\\1\\0\\0\\0"), "read",
                                            rf"ImageOrientationPatient '0\\1\\0\\0\\0' {_ORIENTATION}"),
    "RescaleSlope=abc": (_raw("RescaleSlope", "abc"), "read", rf"RescaleSlope 'abc' {_SLOPE}"),
    "RescaleSlope=nan": (_raw("RescaleSlope", "nan"), "read", rf"RescaleSlope 'nan' {_SLOPE}"),
    "RescaleSlope=inf": (_raw("RescaleSlope", "inf"), "read", rf"RescaleSlope 'inf' {_SLOPE}"),
    "RescaleSlope=0": (_raw("RescaleSlope", "0"), "read", rf"RescaleSlope '0' {_SLOPE}"),
    "RescaleSlope=1e30": (_raw("RescaleSlope", "1e30"), "read", rf"RescaleSlope '1e30' {_SLOPE}"),
    "RescaleIntercept=nan": (_raw("RescaleIntercept", "nan"), "read", rf"RescaleIntercept 'nan' {_INTERCEPT}"),
    "RescaleIntercept=-inf": (_raw("RescaleIntercept", "-inf"), "read", rf"RescaleIntercept '-inf' {_INTERCEPT}"),
    "RescaleIntercept=abc": (_raw("RescaleIntercept", "abc"), "read", rf"RescaleIntercept 'abc' {_INTERCEPT}"),
    "InstanceNumber=abc": (_raw("InstanceNumber", "abc"), "read", r"InstanceNumber 'abc' is not a whole number"),
    "InstanceNumber=4.5": (_raw("InstanceNumber", "4.5"), "read", r"InstanceNumber '4\.5' is not a whole number"),
    "Rows=0": (_set(Rows=0), "read", r"Rows x Columns 0 x 64 is not an image size \(1\.\.8192 pixels a side\)"),
    "Rows=32_data_64": (_set(Rows=32), "decode", (r"pixel data holds 8192 bytes, Rows x Columns x BitsAllocated "
                                                  r"\(32x64x16\) need 4096$")),
    "Columns=128_data_64": (_set(Columns=128), "decode", (r"pixel data holds 8192 bytes, Rows x Columns x "
                                                          r"BitsAllocated \(64x128x16\) need 16384$")),
    "BitsAllocated=12": (_set(BitsAllocated=12), "decode", r"BitsAllocated 12 / BitsStored 12 cannot hold a grayscale"),
    "BitsStored=20": (_set(BitsStored=20), "decode", r"BitsAllocated 16 / BitsStored 20 cannot hold a grayscale"),
    "PhotometricInterpretation=PALETTE_COLOR": (_set(PhotometricInterpretation="PALETTE COLOR"), "decode",
                                                r"not a grayscale image \(PhotometricInterpretation 'PALETTE COLOR'\)"),
    "NumberOfFrames=abc": (_raw("NumberOfFrames", "abc"), "decode", r"NumberOfFrames 'abc' is not a whole number"),
}


def _bad_value(edit: Callable[[pydicom.Dataset], None], stage: str, reason: str) -> Callable[[Path], Expect]:
    """The value in two files: a labelled slice (its samples fail; it is also the neighbour of the other samples of
    its series, which are built without it) and a slice no stack needs (reported once, nothing else changes)."""
    def fault(d: Path) -> Expect:
        labelled, unused = _labelled(d, S0, "L2/L3"), _unused_slice(d, S1)
        _rewrite(labelled, edit)
        _rewrite(unused, edit)
        failing = _levels_on(d, S0, labelled)
        return Expect([(stage, f"labelled instance: {reason}", S0, lv) for lv in failing]
                      + [(stage, f"^{reason}", S1, None)], changed=_others(S0, *failing),
                      dropped={(S0, int(labelled.stem)), (S1, 99)})

    return fault


def _table(name: str, write: Callable[[Path], None], reason: str) -> Callable[[Path], Expect]:
    def fault(d: Path) -> Expect:
        write(d / name)
        return Expect([("table", reason, None, None)], table=name)

    return fault


EXTRA: dict[str, Callable[[Path], Expect]] = {
    "one_slice_series": one_slice_series,
    "corrupt_compressed_bytes": corrupt_compressed_bytes,
    "rgb_image": rgb_image,
    "multi_frame": multi_frame,
    "header_without_rows": header_without_rows,
    "instance_number_disagrees_with_file_name": instance_number_disagrees_with_file_name,
    "empty_instance_number_tag": empty_instance_number_tag,
    "other_size_without_geometry": other_size_without_geometry,
    "constant_stack": constant_stack,
    "negative_coordinate": negative_coordinate,
    "infinite_coordinate": infinite_coordinate,
    "non_integer_instance": non_integer_instance,
    "path_like_study_id": path_like_study_id,
    "duplicate_study_in_train_csv": duplicate_study_in_train_csv,
    "series_missing_from_series_table": series_missing_from_series_table,
    "stray_files_in_series": stray_files_in_series,
    "series_listed_twice_with_other_descriptions": series_listed_twice_with_other_descriptions,
    "series_listed_twice_alike": series_listed_twice_alike,
    "stray_copy_of_a_slice": stray_copy_of_a_slice,
    "underscored_coordinate": underscored_coordinate,
    "fifo_in_series": fifo_in_series,
    "file_linked_outside_the_data_folder": file_linked_outside_the_data_folder,
    "series_folder_linked_outside_the_data_folder": series_folder_linked_outside_the_data_folder,
    **{f"bad_value[{name}]": _bad_value(*case) for name, case in BAD_VALUES.items()},
    **{f"empty_csv[{t}]": _table(t, lambda p: p.write_text(""), r"empty file \(no header\)") for t in TABLES},
    **{f"wrong_header[{t}]": _table(t, lambda p: p.write_text(p.read_text().replace("study_id", "studyid", 1)),
                                    r"wrong header: missing columns \['study_id'\]") for t in TABLES},
    "missing_csv": _table("train_label_coordinates.csv", lambda p: p.unlink(), r"missing file$"),
    "binary_csv": _table("train.csv", lambda p: p.write_bytes(b"\xff\xfe\x00\x81" * 64), r"not a readable CSV"),
}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, cache.CacheReader]:
    root = tmp_path_factory.mktemp("small")
    write_dataset(root / "data", studies=3)
    result = build(root / "data", root / "cache", SMALL_CFG, scheduler="synchronous")
    assert result.built == 15 and result.errors.empty
    return root / "data", cache.open(root / "cache")


@pytest.mark.parametrize("kind", list(EXTRA))
def test_extra_fault_gives_its_named_error(small, kind, tmp_path):
    clean, ref = small
    data = tmp_path / "data"
    shutil.copytree(clean, data)
    expect = EXTRA[kind](data)
    out = tmp_path / "cache"
    if expect.table is not None:  # a table that cannot be read stops the build, naming the file
        with pytest.raises(TableError, match=expect.errors[0][1]) as e:
            build(data, out, SMALL_CFG, scheduler="synchronous")
        assert Path(e.value.path).name == expect.table and expect.table in str(e.value)
        assert not out.exists()  # refused before anything was written
        return
    build(data, out, SMALL_CFG, scheduler="synchronous")
    c = cache.open(out)
    rows = [(r.stage, r.reason, None if pd.isna(r.study_id) else int(r.study_id), None if pd.isna(r.level) else r.level,
             r.path) for r in c.errors.itertuples()]
    assert len(rows) == len(expect.errors), rows
    for stage, pattern, study, level in expect.errors:
        hits = [r for r in rows if (r[0], r[2], r[3]) == (stage, study, level) and re.search(pattern, r[1])]
        assert len(hits) == 1, (stage, pattern, study, level, rows)
        where = hits[0][4]
        assert (re.fullmatch(r"(train|train_series_descriptions|train_label_coordinates)\.csv:\d+", where)
                if stage == "tables" else where.startswith(str(data))), where
    failing = {(s, lv) for _, _, s, lv in expect.errors}
    built = set(zip(c.index.study_id, c.index.level))
    for r in ref.index.itertuples():
        if (r.study_id, r.level) in failing:
            assert (r.study_id, r.level) not in built
        elif (r.study_id, r.level) in expect.changed:
            assert (r.study_id, r.level) in built
        else:  # untouched by the fault: bit-identical to the clean build
            assert_same_sample(c, ref, (r.study_id, r.condition, r.level))
    for study, instance in expect.dropped:  # a neighbour's stack is taken again without the bad file
        held = [list(r.slice_instances) for r in c.index.itertuples() if r.study_id == study]
        assert held and not any(instance in h for h in held), (study, instance, held)
    if expect.check is not None:
        expect.check(c, data)

