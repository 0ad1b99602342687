"""The cache contract: round trip, missing/corrupted chunks, parallel writers, resume, refusals, lock, workers."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr

import cache
import cache_helpers as h
from cache import format as fmt


@pytest.fixture
def built(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    h.build(path, n=8)
    return path


def test_round_trip_values_index_manifest(built: Path) -> None:
    c = cache.open(built)
    assert len(c) == 8 and c.shape == (h.SLICES, 3, h.SIZE, h.SIZE)
    for i in range(len(c)):
        got = c[i]
        assert got.dtype == np.uint8 and np.array_equal(got, h.stack(int(c.index.row[i])))
    assert np.array_equal(c[-1], h.stack(7))
    # index: contract columns in order, canonical dtypes, nullable label, per-slice lists
    assert list(c.index.columns) == list(fmt.INDEX_COLUMNS)
    assert str(c.index.label.dtype) == "Int8" and c.index.label.isna().sum() == 2
    assert c.index.label.tolist()[:3] == [0, 1, 2]
    rec = c.index.iloc[2]
    assert list(rec.slice_instances) == [10, 11, 12, 13, 14] and list(rec.slice_offsets_mm) == [-8, -4, 0, 4, 8]
    assert list(rec.replicated) == [True, False, False, False, False]
    assert c.index.checksum[3] == cache.checksum(h.stack(3))
    assert c.errors.stage.tolist() == ["decode"] and str(c.errors.study_id.dtype) == "Int64"
    m = c.manifest
    assert m["format_version"] == cache.FORMAT_VERSION and m["finalised"] is True
    assert m["config"] == h.CONFIG and m["config_hash"] == cache.config_hash(h.CONFIG)
    assert m["counts"]["samples"] == 8 and m["counts"]["errors"] == 1
    assert m["counts"]["by_label"] == {"0": 2, "1": 2, "2": 2, "missing": 2}
    assert m["array"]["shape"] == [8, h.SLICES, 3, h.SIZE, h.SIZE] and m["array"]["codec"] == "crc32c"
    assert set(m["versions"]) >= {"numpy", "zarr", "pandas", "pyarrow", "python", "lsdc"}
    assert m["window_names"] == ["soft", "wide", "bright"]  # extra_manifest
    assert zarr.open_group(str(built), mode="r").attrs["manifest"] == m  # mirrored into the group


def test_readable_without_our_code(built: Path) -> None:
    """What docs/cache_format.md promises: zarr + pyarrow alone give the same pixels and index."""
    index = pq.read_table(built / "index.parquet").to_pandas()
    crops = zarr.open_group(str(built), mode="r")["crops"]
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["finalised"] and crops.shape == tuple(manifest["array"]["shape"])
    for rec in index.itertuples():
        assert np.array_equal(crops[rec.row], h.stack(rec.row))


def test_file_url_and_select_and_repr(built: Path) -> None:
    c = cache.open(f"file://{built}")
    assert np.array_equal(c[4], h.stack(4))
    spinal = c.select(condition="Spinal Canal Stenosis")
    assert set(spinal.index.condition) == {"Spinal Canal Stenosis"} and len(spinal) == 2
    assert np.array_equal(spinal[1], h.stack(int(spinal.index.row[1])))
    assert len(c.select(study_id=1001, label=[1, 2])) == 2
    assert len(c.select(level="L1/L2", study_id=1000)) == 1
    assert len(c.select(series_description="Axial T2")) == 2
    text = repr(spinal)
    assert "view: 2 of 8 samples" in text and "Spinal Canal Stenosis" in text and c.manifest["config_hash"] in text
    assert "<table" in c._repr_html_()
    assert c.summary()["compression_ratio"] > 0.9  # random pixels do not compress


def test_show_grid(built: Path) -> None:
    fig = cache.open(built).show(2)
    assert len(fig.axes) == 3 * h.SLICES
    assert "study 1000" in fig._suptitle.get_text() and "label Severe" in fig._suptitle.get_text()
    assert fig.axes[0].get_ylabel() == "soft" and "edge copy" in fig.axes[0].get_title()
    assert np.array_equal(fig.axes[h.SLICES + 1].images[0].get_array(), h.stack(2)[1, 1])


def test_package_level_show_selects_by_ids(built: Path) -> None:
    c = cache.open(built)
    rec = c.index.iloc[2]
    fig = cache.show(built, study_id=int(rec.study_id), condition=rec.condition, level=rec.level)
    assert np.array_equal(fig.axes[h.SLICES + 1].images[0].get_array(), h.stack(2)[1, 1])
    with pytest.raises(IndexError, match="no sample 5 among the 1 that match study_id="):
        cache.show(c, 5, study_id=int(rec.study_id), condition=rec.condition, level=rec.level)
    # names as the CLI takes them: snake_case and 'L3-L4'; a typo is an error, not an empty selection
    fig = cache.show(c, study_id=int(rec.study_id), condition=rec.condition.lower().replace(" ", "_"),
                     level=rec.level.replace("/", "-"))
    assert np.array_equal(fig.axes[h.SLICES + 1].images[0].get_array(), h.stack(2)[1, 1])
    with pytest.raises(ValueError, match="unknown condition 'Spinal Canal Stenoss'"):
        c.select(condition="Spinal Canal Stenoss")
    with pytest.raises(ValueError, match="unknown level"):
        c.select(level="L6/S1")
    assert len(c.select(condition="foraminal")) == len(c.index[c.index.condition.str.contains("Foraminal")])
    with pytest.raises(IndexError, match="no sample matches study_id=4242"):
        cache.show(c, study_id=4242)


def test_all_zero_sample_is_stored(tmp_path: Path) -> None:
    """zarr skips chunks equal to the fill value by default; ours must be stored, else they read as 'missing'."""
    w = cache.CacheWriter.create(tmp_path / "c", n_rows=1, slices=h.SLICES, size=h.SIZE, config=h.CONFIG)
    zeros = np.zeros((h.SLICES, 3, h.SIZE, h.SIZE), np.uint8)
    w.finalise(pd.DataFrame([h.index_record(0, w.write(0, zeros))]))
    assert np.array_equal(cache.open(tmp_path / "c")[0], zeros)


def test_missing_chunk_found_and_raises(built: Path) -> None:
    (built / "crops" / "c.3.0.0.0.0").unlink()
    bad = cache.verify(built)
    assert bad[["row", "problem"]].values.tolist() == [[3, "missing"]]
    c = cache.open(built)
    with pytest.raises(cache.MissingChunkError, match=r"row 3 .*c\.3\.0\.0\.0\.0"):
        c.read_row(3)
    assert np.array_equal(c[2], h.stack(2))  # the others still read


@pytest.mark.parametrize("codec", ["crc32c", "zstd-3"])  # both checksum every chunk on read
def test_corrupted_chunk_found_and_raises(tmp_path: Path, codec: str) -> None:
    built = tmp_path / "cache"
    h.build(built, n=8, codec=codec)
    chunk = built / "crops" / "c.5.0.0.0.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    truncated = built / "crops" / "c.6.0.0.0.0"
    truncated.write_bytes(truncated.read_bytes()[:100])
    bad = cache.verify(built)
    assert bad[["row", "problem"]].values.tolist() == [[5, "corrupt"], [6, "corrupt"]]
    with pytest.raises(cache.ChecksumError, match="row 5"):
        cache.open(built).read_row(5)


def test_uncompressed_corruption_needs_checksum(tmp_path: Path) -> None:
    """With codec 'none' (no chunk checksum) a flipped byte decodes fine: verify and verify_checksums=True catch it."""
    path = tmp_path / "c"
    h.build(path, n=3, codec="none")
    chunk = path / "crops" / "c.1.0.0.0.0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert cache.verify(path)[["row", "problem"]].values.tolist() == [[1, "checksum"]]
    assert not np.array_equal(cache.open(path)[1], h.stack(1))  # documented: plain reads do not hash
    with pytest.raises(cache.ChecksumError, match="row 1"):
        cache.open(path, verify_checksums=True)[1]


def test_parallel_writers_spawn_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c"
    n = 12
    w = cache.CacheWriter.create(path, n_rows=n, slices=h.SLICES, size=h.SIZE, config=h.CONFIG)
    parts = [list(range(k, n, 3)) for k in range(3)]  # interleaved rows: neighbours written by different processes
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(h.write_rows, [(str(path), p) for p in parts])
    digests = {r: d for part in results for r, d in part.items()}
    assert w.written_rows() == set(range(n))
    w.finalise(pd.DataFrame([h.index_record(r, digests[r]) for r in range(n)]))
    c = cache.open(path)
    assert all(np.array_equal(c.read_row(r), h.stack(r)) for r in range(n))
    assert cache.verify(c).empty


def test_resume_same_config_keeps_work_other_config_raises(tmp_path: Path) -> None:
    path = tmp_path / "c"
    w = cache.CacheWriter.create(path, n_rows=6, slices=h.SLICES, size=h.SIZE, config=h.CONFIG)
    digests = h.write_rows(str(path), [0, 1, 2])
    w.save_task("study 1000/series 50000", [{"row": r, "checksum": digests[r]} for r in (0, 1, 2)])
    w.save_task("study 1000_series 50000", [])  # a key that slugs the same must not overwrite the first

    again = cache.CacheWriter.create(path, n_rows=6, slices=h.SLICES, size=h.SIZE, config=dict(h.CONFIG))
    done = again.completed_tasks()
    assert done["study 1000/series 50000"] == [{"row": r, "checksum": digests[r]} for r in (0, 1, 2)]
    assert done["study 1000_series 50000"] == [] and again.written_rows() == {0, 1, 2}

    other = {**h.CONFIG, "size": 64}
    with pytest.raises(cache.CacheConfigMismatch) as err:
        cache.CacheWriter.create(path, n_rows=6, slices=h.SLICES, size=h.SIZE, config=other)
    assert cache.config_hash(h.CONFIG) in str(err.value) and cache.config_hash(other) in str(err.value)
    assert f"size {h.CONFIG['size']!r} -> 64" in str(err.value) and "lsdc prep --clean" in str(err.value)
    with pytest.raises(cache.CacheConfigMismatch, match="shape"):
        cache.CacheWriter.create(path, n_rows=7, slices=h.SLICES, size=h.SIZE, config=h.CONFIG)

    fresh = cache.CacheWriter.create(path, n_rows=6, slices=h.SLICES, size=h.SIZE, config=other, clean=True)
    assert fresh.completed_tasks() == {} and fresh.written_rows() == set()
    assert fresh.build_info["config_hash"] == cache.config_hash(other)


def test_a_cache_without_a_sample_gives_way_to_other_settings(tmp_path: Path) -> None:
    # e.g. a test-split prep given the train coordinates: every row failed, so nothing is lost by replacing it
    path = tmp_path / "c"
    first = cache.CacheWriter.create(path, n_rows=2, slices=h.SLICES, size=h.SIZE, config=h.CONFIG)
    first.save_task("series 1", [{"row": 0, "ok": False}])
    again = cache.CacheWriter.create(path, n_rows=2, slices=h.SLICES, size=h.SIZE, config=h.CONFIG)
    assert "series 1" in again.completed_tasks()  # the same build, even without a sample, resumes as usual
    other = {**h.CONFIG, "size": 64}
    with pytest.raises(ValueError, match="unknown codec"):  # checked before anything is deleted
        cache.CacheWriter.create(path, n_rows=3, slices=h.SLICES, size=h.SIZE, config=other, codec="zip")
    assert "series 1" in again.completed_tasks()
    w = cache.CacheWriter.create(path, n_rows=3, slices=h.SLICES, size=h.SIZE, config=other)
    assert w.build_info["config_hash"] == cache.config_hash(other) and w.build_info["shape"][0] == 3
    h.write_rows(str(path), [0])  # one sample written: from now on it is refused as before
    with pytest.raises(cache.CacheConfigMismatch, match="--clean"):
        cache.CacheWriter.create(path, n_rows=3, slices=h.SLICES, size=h.SIZE, config=h.CONFIG)


def test_finalised_cache_reopens_for_same_config(built: Path) -> None:
    w = cache.CacheWriter.create(built, n_rows=8, slices=h.SLICES, size=h.SIZE, config=h.CONFIG)
    assert w.written_rows() == set(range(8)) and len(cache.open(built)) == 8


def test_create_never_deletes_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(cache.CacheError, match="not an lsdc cache"):
        cache.CacheWriter.create(tmp_path, n_rows=2, config=h.CONFIG, clean=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_unfinalised_cache_refused(tmp_path: Path) -> None:
    h.build(tmp_path / "c", n=4, finalise=False)
    with pytest.raises(cache.CacheNotFinalised, match="was not finalised.*rerun `lsdc prep`"):
        cache.open(tmp_path / "c")
    with pytest.raises(cache.CacheError, match="no cache at .*nothing: the folder does not exist"):
        cache.open(tmp_path / "nothing")
    (tmp_path / "data").mkdir()
    with pytest.raises(cache.CacheError, match="no cache at .*data: it holds no zarr.json, so it is not a crop cache"):
        cache.open(tmp_path / "data")


def test_unknown_format_version_refused(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    (built / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(cache.CacheFormatError, match=r"format_version 99.*versions \[1, 2\]"):
        cache.open(built)


def test_format_1_cache_still_verifies(built: Path) -> None:
    """Version 1 wrote blake2b-128 index checksums and no manifest field naming them: still read and verified."""
    import hashlib

    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["array"]["checksum"] == "sha256-128"
    assert manifest["format_version"] == 2
    del manifest["array"]["checksum"]
    (built / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    index = pq.read_table(built / "index.parquet")
    old = [hashlib.blake2b(h.stack(r).tobytes(), digest_size=16).hexdigest() for r in index["row"].to_pylist()]
    pq.write_table(index.set_column(index.schema.get_field_index("checksum"), "checksum", [old]),
                   built / "index.parquet")
    assert cache.verify(built).empty
    assert np.array_equal(cache.open(built, verify_checksums=True)[4], h.stack(4))
    pq.write_table(index, built / "index.parquet")  # sha256 digests in a version-1 cache: every row is flagged
    assert set(cache.verify(built)["problem"]) == {"checksum"}


def test_unfinished_build_of_another_format_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    h.build(path, n=2, finalise=False)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["build"] = {**group.attrs["build"], "format_version": 1}
    with pytest.raises(cache.CacheConfigMismatch, match="cache format 1, this one writes format 2.*--clean"):
        cache.CacheWriter.create(path, n_rows=2, slices=h.SLICES, size=h.SIZE, config=h.CONFIG)


def test_finalise_checks_index(tmp_path: Path) -> None:
    path = tmp_path / "c"
    w = cache.CacheWriter.create(path, n_rows=4, slices=h.SLICES, size=h.SIZE, config=h.CONFIG)
    digests = h.write_rows(str(path), [0, 1])
    records = [h.index_record(r, digests.get(r, "0" * 32)) for r in range(3)]
    with pytest.raises(cache.MissingChunkError, match=r"never written, e.g. rows \[2\]"):
        w.finalise(pd.DataFrame(records))
    bad_label = pd.DataFrame(records[:2]).assign(label=[0, 5])
    with pytest.raises(cache.CacheFormatError, match=r"label must be 0, 1, 2 or null \(table rows \[1\]\)"):
        w.finalise(bad_label)
    with pytest.raises(cache.CacheFormatError, match="missing columns.*checksum"):
        w.finalise(pd.DataFrame(records[:2]).drop(columns="checksum"))
    short = pd.DataFrame(records[:2])
    short.at[0, "replicated"] = [False]
    with pytest.raises(cache.CacheFormatError, match="replicated.*list of 5"):
        w.finalise(short)
    assert not (path / "manifest.json").exists()  # nothing half-finalised
    with pytest.raises(ValueError, match=r"row 3 needs a uint8 array of shape \(5, 3, 32, 32\), got float64"):
        w.write(3, h.stack(3).astype(float))


def test_build_lock_refuses_second_holder_takes_over_stale(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with cache.build_lock(path) as lock:
        assert json.loads(lock.read_text())["pid"] > 0
        with pytest.raises(cache.CacheLocked, match="another build holds"):
            with cache.build_lock(path):
                pass
        # clean=True inside a held lock wipes the old cache but not the lock
        h.build(path, n=2, finalise=False)
        cache.CacheWriter.create(path, n_rows=2, config={"other": 1}, clean=True)
        assert lock.exists()
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "earlier"}))
    with cache.build_lock(path):  # the dead build's lock is taken over
        assert json.loads(lock.read_text())["pid"] != int(dead.stdout)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_in_worker_processes(built: Path, method: str) -> None:
    c = cache.open(built)
    want = [cache.checksum(c[i]) for i in range(len(c))]  # the parent's zarr handle is open before the fork
    h.FORKED_READER = c
    ctx = mp.get_context(method)
    with ctx.Pool(2) as pool:
        if method == "fork":
            got = pool.map(h.read_checksums_inherited, [[0, 1, 2, 3], [4, 5, 6, 7]])
        else:
            got = pool.starmap(h.read_checksums, [(c, [0, 1, 2, 3]), (c, [4, 5, 6, 7])])
    assert got[0] + got[1] == want


def test_import_cache_stays_light() -> None:
    code = ("import sys, cache; heavy = [m for m in ('torch', 'pydicom', 'dask', 'cv2', 'matplotlib', 'timm') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_select_refuses_an_empty_condition(built: Path) -> None:
    with pytest.raises(ValueError, match="no condition named"):
        cache.open(built).select(condition="")


def test_progress_bars_redraw_rarely_into_a_log_file(monkeypatch) -> None:
    import io

    from cache.io import progress_enabled, progress_interval

    monkeypatch.setattr("sys.stderr", io.StringIO())  # `lsdc train ... 2> log`: every redraw would be kept
    assert progress_interval() == 30.0
    monkeypatch.setitem(sys.modules, "ipykernel", object())  # Jupyter renders bars in place
    assert progress_interval() == 0.1
    monkeypatch.setenv("LSDC_NO_PROGRESS", "1")
    assert not progress_enabled() and progress_enabled(True)


# ---------------------------------------------------------- a damaged cache is one named CacheFormatError (issue 15)
def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


DAMAGE = {
    "index.parquet cut to 1000 bytes": (lambda p: _cut(p / "index.parquet", 1000), "index.parquet"),
    "index.parquet emptied": (lambda p: _cut(p / "index.parquet", 0), "index.parquet"),
    "errors.parquet cut": (lambda p: _cut(p / "errors.parquet", 100), "errors.parquet"),
    "index.parquet of another table": (lambda p: pq.write_table(pq.read_table(p / "errors.parquet"),
                                                                p / "index.parquet"), "index.parquet"),
    "manifest.json a JSON list": (lambda p: (p / "manifest.json").write_text("[1, 2]"), "manifest.json"),
    "manifest.json not JSON": (lambda p: (p / "manifest.json").write_bytes(b"\xff{oops"), "manifest.json"),
    "manifest.json without the array": (lambda p: (p / "manifest.json").write_text(json.dumps(
        {**json.loads((p / "manifest.json").read_text()), "array": "?"})), "manifest.json"),
    "zarr.json garbage": (lambda p: (p / "zarr.json").write_text("garbage{"), "zarr.json"),
    "zarr.json a JSON list": (lambda p: (p / "zarr.json").write_text("[]"), "zarr.json"),
    "crops/zarr.json garbage": (lambda p: (p / "crops" / "zarr.json").write_text("garbage{"), "crops/zarr.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_one_named_format_error(built: Path, damage: str) -> None:
    """Never a pyarrow, json or zarr traceback: cache.open and cache.verify raise CacheFormatError (a UserError), in
    one line naming the cache and the file."""
    spoil, name = DAMAGE[damage]
    spoil(built)
    with pytest.raises(cache.CacheFormatError) as e:
        cache.verify(cache.open(built))  # open, or (the array's own metadata) verify
    message = str(e.value)
    assert isinstance(e.value, cache.UserError) and "\n" not in message and len(message) < 400, message
    assert str(built) in message and name in message, message


def test_finalise_writes_strict_json_manifest(built: Path) -> None:
    """No NaN or Infinity literal ever reaches manifest.json (strict JSON readers refuse them)."""
    def refuse(literal: str) -> None:
        raise AssertionError(f"{literal} literal in manifest.json")

    json.loads((built / "manifest.json").read_text(), parse_constant=refuse)
    w = cache.CacheWriter.create(built.parent / "nan", n_rows=1, slices=h.SLICES, size=h.SIZE,
                                 config={**h.CONFIG, "bad": float("nan")})
    w.write(0, h.stack(0))
    with pytest.raises(ValueError, match="not JSON compliant"):  # a bug upstream, loud: never a NaN literal
        w.finalise(pd.DataFrame([h.index_record(0, cache.checksum(h.stack(0)))]))
    assert not (built.parent / "nan" / "manifest.json").exists()


# ------------------------------------------------- a cache that cannot be written is one CacheWriteError (issue 15)
def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_write_error_and_the_writer_resumes(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c"
    w = cache.CacheWriter.create(path, n_rows=4, slices=h.SLICES, size=h.SIZE, config=h.CONFIG)
    digests = {0: w.write(0, h.stack(0))}
    with monkeypatch.context() as m:
        m.setattr(cache.writer, "write_chunk", _full_disk)  # the chunk file's own write fails
        with pytest.raises(cache.format.CacheWriteError, match=r"cannot write the cache at .*: No space left on "
                                                               r"device \(disk full\); free space .* resumes"):
            w.write(1, h.stack(1))
        m.setattr(cache.writer, "atomic_write_json", _full_disk)  # the progress file
        with pytest.raises(cache.format.CacheWriteError, match="disk full"):
            w.save_task("t", [])
        m.setattr(cache.writer, "atomic_write", _full_disk)  # the index while finalising
        index = pd.DataFrame([h.index_record(0, digests[0])])
        with pytest.raises(cache.format.CacheWriteError, match=r"cannot finalise the cache at .*disk full.*rerun"):
            w.finalise(index)
    assert not (path / "manifest.json").exists() and not list(path.glob("crops/*.partial"))
    with pytest.raises(cache.CacheNotFinalised):
        cache.open(path)
    w.finalise(index)  # space freed: the same writer finishes
    assert len(cache.open(path)) == 1


def test_a_file_or_read_only_output_is_one_write_error(tmp_path: Path, monkeypatch) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for make in (lambda: cache.CacheWriter.create(a_file, n_rows=1), lambda: cache.build_lock(a_file).__enter__()):
        with pytest.raises(cache.format.CacheWriteError, match="is a file, not a folder"):
            make()
    out = tmp_path / "ro"
    out.mkdir()
    real = os.open

    def read_only(path, flags, *args, **kwargs):  # root ignores permissions: simulate the read-only filesystem
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(cache.writer.os, "open", read_only)
    with pytest.raises(cache.format.CacheWriteError, match="cannot write to .*ro: Read-only file system"), \
            cache.build_lock(out):
        pass
