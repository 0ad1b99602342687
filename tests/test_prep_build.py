"""prep.build end to end on a tiny dataset: schedulers agree, resume and kill -9 give the same cache, failures are
named rows, exit codes, the CLI, and no torch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

import cache
from prep.build import build
from prep.config import PrepConfig
from prep_fixtures import write_dataset

CFG = PrepConfig(size=32, crop_scale=1.0, crop_base_mm=20.0)
TESTS = Path(__file__).resolve().parent


def _content(path: Path) -> tuple[list, list]:
    """What makes two caches equal: every index row (incl. checksums) and the pixels of every row."""
    c = cache.open(path)
    rows = c.index.astype(str).values.tolist()
    return rows, [c[i].tobytes() for i in range(len(c))]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), studies=3)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cache"
    result = build(data, out, CFG, scheduler="synchronous")
    assert result.built == 15 and result.errors.empty and result.exit_code() == 0
    return out


def test_reference_cache_contents(reference):
    c = cache.open(reference)
    assert len(c) == 15 and c[0].shape == (7, 3, 32, 32)
    assert c.manifest["config"] == CFG.to_dict()
    assert (c.index.half_size_mm == 20.0).all() and (c.index.ordering == "position").all()
    assert all(len(v) == 7 for v in c.index.slice_instances)


def test_local_schedulers_and_clusters_give_identical_caches(data, reference, tmp_path):
    from dask.distributed import LocalCluster

    build(data, tmp_path / "p", CFG, scheduler="processes", workers=2)
    build(data, tmp_path / "lc", CFG, workers=2)  # default: dask.distributed LocalCluster, 2 processes x 1 thread
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:  # "a running cluster"
        build(data, tmp_path / "addr", CFG, scheduler=cluster.scheduler_address)
    ref = _content(reference)
    assert _content(tmp_path / "p") == ref and _content(tmp_path / "lc") == ref and _content(tmp_path / "addr") == ref


def test_a_second_build_on_the_same_output_is_refused(data, tmp_path):
    with cache.build_lock(tmp_path / "c"):
        with pytest.raises(cache.CacheLocked):
            build(data, tmp_path / "c", CFG, scheduler="synchronous")


def test_interrupted_build_resumes_to_the_same_cache(data, reference, tmp_path):
    out = tmp_path / "c"
    part = build(data, out, CFG, scheduler="synchronous", stop_after=1)
    assert not part.finalised and part.built == 5
    with pytest.raises(cache.CacheNotFinalised):
        cache.open(out)
    with pytest.raises(cache.CacheConfigMismatch):
        build(data, out, replace(CFG, slices=5), scheduler="synchronous")
    rest = build(data, out, CFG, scheduler="synchronous")
    assert rest.resumed == 1 and rest.finalised
    assert _content(out) == _content(reference)
    rebuilt = build(data, out, replace(CFG, slices=5), scheduler="synchronous", clean=True)
    assert rebuilt.built == 15 and cache.open(out)[0].shape == (5, 3, 32, 32)


def test_resume_redoes_what_a_power_loss_took(data, reference, tmp_path, caplog):
    """Progress files are not fsynced: after a power loss one may be empty, or vouch for chunks that are missing or
    cut short. A rerun must build those series again and end with the clean build's cache."""
    out = tmp_path / "c"
    part = build(data, out, CFG, scheduler="synchronous", stop_after=3)  # 3 series of 3 studies x 1 series
    assert part.built == 15 and not part.finalised
    progress = sorted((out / cache.format.PROGRESS_DIR).glob("*.json"))
    assert len(progress) == 3
    progress[0].write_bytes(b"")  # the file's data never reached the disk
    writer = cache.CacheWriter.open(out)
    chunks = sorted((out / "crops").glob("c.*"), key=lambda p: int(p.name.split(".")[1]))
    chunks[5].write_bytes(chunks[5].read_bytes()[:1000])  # cut short
    chunks[12].unlink()  # gone
    rows = {int(p.name.split(".")[1]) for p in chunks}
    assert writer.lost_rows(rows) == {int(chunks[5].name.split(".")[1]), int(chunks[12].name.split(".")[1])}
    with caplog.at_level("WARNING"):
        again = build(data, out, CFG, scheduler="synchronous")
    assert again.finalised and again.resumed == 0  # each of the 3 series lost something (15 rows, 5 per series)
    assert "unreadable" in caplog.text and "missing or cut short" in caplog.text
    assert _content(out) == _content(reference)


def test_kill_9_mid_build_then_resume_gives_the_same_cache(tmp_path):
    data = write_dataset(tmp_path / "data", studies=6, slices=15, size=192)
    cfg = replace(CFG, size=64)
    code = (f"from prep.build import build; from prep.config import PrepConfig; "
            f"build({str(data)!r}, {str(tmp_path / 'c')!r}, PrepConfig.from_dict({cfg.to_dict()!r}), "
            f"scheduler='synchronous')")
    # The 'task' fault point (prep/faultpoints.py) pauses the build once a task is done and the next one has written
    # its chunks (exact, no race).
    marker = tmp_path / "paused"
    env = {**os.environ, "LSDC_NO_PROGRESS": "1", "LSDC_FAULT_POINT": "task", "LSDC_FAULT_POINT_FILE": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    progress = tmp_path / "c" / "_progress"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.01)
    assert marker.exists(), "the build never reached its pause point"
    os.killpg(proc.pid, signal.SIGKILL)  # the build and anything it started, mid-way
    proc.wait()
    done = len(list(progress.glob("*.json")))
    assert 1 <= done < 6 and not (tmp_path / "c" / "manifest.json").exists()
    resumed = build(data, tmp_path / "c", cfg, scheduler="synchronous")  # also takes over the dead build's lock
    assert resumed.resumed == done and resumed.built == 30
    build(data, tmp_path / "whole", cfg, scheduler="synchronous")
    assert _content(tmp_path / "c") == _content(tmp_path / "whole")


def test_failures_become_error_rows_and_good_samples_are_unchanged(data, reference, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    study0, study1, study2 = sorted(p.name for p in (bad / "train_images").iterdir())
    s0 = bad / "train_images" / study0 / next(p.name for p in (bad / "train_images" / study0).iterdir())
    by_pos = sorted(s0.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[0]))
    by_pos[0].write_bytes(by_pos[0].read_bytes()[:-500])  # truncated edge slice: dropped, reported, not black
    s1 = bad / "train_images" / study1
    for p in s1.iterdir():
        shutil.rmtree(p)  # a missing series folder
    coords = bad / "train_label_coordinates.csv"
    lines = coords.read_text().splitlines()
    fields = lines[-1].split(",")
    lines[-1] = ",".join(fields[:5] + ["500", fields[6]])  # the last sample: x outside the 64 px image
    coords.write_text("\n".join(lines) + "\n")
    result = build(bad, tmp_path / "c", CFG, scheduler="synchronous")
    reasons = result.errors.groupby("reason").size().to_dict()
    assert reasons.pop("missing series folder") == 5
    outside = [r for r in reasons if r.startswith("coordinate (500, ")]
    assert len(outside) == 1 and reasons.pop(outside[0]) == 1
    (trunc,) = reasons  # the truncated file, once, as a file error
    assert "undecodable" in trunc or "unreadable" in trunc
    assert result.built == 9 and result.exit_code() == 0 and result.exit_code(strict=True) == 1
    c, ref = cache.open(tmp_path / "c"), cache.open(reference)
    ref_rows = {r.row: r for r in ref.index.itertuples()}
    bad_instance = int(by_pos[0].stem)
    for row, checksum, inst in zip(c.index.row, c.index.checksum, c.index.slice_instances):
        assert bad_instance not in inst
        if bad_instance not in ref_rows[row].slice_instances:  # samples that never needed the bad file: identical
            assert checksum == ref_rows[row].checksum
        else:  # the neighbour beyond the bad file is replicated instead: never a black slice
            assert checksum != ref_rows[row].checksum and c.index.set_index("row").replicated[row].any()


def test_nothing_built_is_a_failure_and_cli_reports(data, tmp_path):
    from typer.testing import CliRunner

    from lsdc.cli import app

    runner = CliRunner()
    args = ["prep", str(data), str(tmp_path / "c"), "--size", "32", "--crop-base-mm", "20", "--crop-scale", "1",
            "--scheduler", "synchronous", "--no-progress", "--studies", "1"]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "5 of 5 samples built" in ok.output and len(cache.open(tmp_path / "c")) == 5
    clash = runner.invoke(app, args[:-2] + ["--slices", "5"])
    assert clash.exit_code == 2 and "--clean" in clash.output
    empty = runner.invoke(app, ["prep", str(data), str(tmp_path / "e"), "--conditions", "foraminal",
                                "--scheduler", "synchronous", "--no-progress"])
    assert empty.exit_code == 1 and "0 of 0 samples built" in empty.output  # no foraminal points in this data
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "train.csv").write_text("")
    table = runner.invoke(app, ["prep", str(broken), str(tmp_path / "b"), "--no-progress"])
    assert table.exit_code == 2 and "train.csv" in table.output and "empty file" in table.output


def test_prep_imports_no_torch():
    code = ("import sys, prep, prep.build, prep.series, prep.samples, prep.dicom, prep.geometry, prep.crop, "
            "prep.windows, prep.config, lsdc.commands.prep; "
            "bad = [m for m in ('torch', 'timm', 'train') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_local_cluster_workers_get_prep_malloc_settings(monkeypatch):
    """Dask's nanny would give workers MALLOC_TRIM_THRESHOLD_=65536 (every MB array mmap'd and faulted afresh);
    prep's workers get fixed heap thresholds instead, and a user's own setting is left alone."""
    import os

    import prep.build as pb
    from dask.distributed import Client

    def env_of(cluster):
        with Client(cluster) as client:
            return next(iter(client.run(lambda: {k: os.environ.get(k) for k in pb.WORKER_MALLOC_ENV}).values()))

    for key in pb.WORKER_MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(pb, "_USER_MALLOC", {k: None for k in pb.WORKER_MALLOC_ENV})
    for _ in range(2):  # the nanny writes them into this process's environment: the second cluster must not care
        with pb.local_cluster(1) as cluster:
            assert env_of(cluster) == pb.WORKER_MALLOC_ENV
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # the user's choice wins, and dask's 65536 stays out
    monkeypatch.setattr(pb, "_USER_MALLOC", {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": None})
    with pb.local_cluster(1) as cluster:
        assert env_of(cluster) == {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": None}


def test_local_cluster_workers_run_without_the_profiler_and_gpu_polling():
    """The settings reach the worker processes: no stack profiler, no NVML polling, slower chores."""
    import dask
    from dask.distributed import Client

    import prep.build as pb

    keys = ["distributed.worker.profile.enabled", "distributed.diagnostics.nvml", "distributed.admin.tick.interval",
            "distributed.admin.system-monitor.interval", "distributed.worker.memory.monitor-interval"]
    with pb.local_cluster(1) as cluster, Client(cluster) as client:
        seen = next(iter(client.run(lambda: [dask.config.get(k) for k in keys]).values()))
    assert seen == [False, False, "200ms", "2s", "500ms"]
    assert dask.config.get("distributed.admin.tick.interval") != "200ms"  # the caller's own config is left alone
    assert dask.config.get("distributed.diagnostics.nvml") is True  # and the driver may still watch its GPU


def test_the_summary_counts_each_kind_of_error_and_says_when_it_lists_only_some():
    import pandas as pd

    from prep.build import SUMMARY_KINDS, BuildResult

    reasons = [f"series {k} of study {k} is not in train_series_descriptions.csv" for k in range(5)]
    reasons += ["coordinate (200.5, 42.69) outside the 160x160 image"]
    reasons += [f"kind {chr(97 + k)} of trouble (details {k})" for k in range(SUMMARY_KINDS + 1)]
    errors = pd.DataFrame({"stage": "tables", "reason": reasons})
    text = BuildResult(Path("c"), 10, 4, errors, 2, 0, 1.0, True).summary()
    assert f"{len(reasons)} errors (errors.parquet):" in text
    assert "     5  tables    series N of study N is not in train_series_descriptions.csv" in text  # one kind
    assert "coordinate (N, N) outside the NxN image" in text  # only a trailing "(...)" is cut
    kinds = 2 + SUMMARY_KINDS + 1
    assert f"... and {kinds - SUMMARY_KINDS} more kinds ({kinds - SUMMARY_KINDS} errors): see errors.parquet" in text


# ----------------------------------------------------- refusals and a disk that fills up: one UserError (issue 15)
def _fill_disk_after(monkeypatch, chunks: int) -> None:
    """The cache's disk fills up once ``chunks`` more chunk files are written (in this process)."""
    import errno

    import cache.writer

    real, left = cache.writer.write_chunk, [chunks]

    def write_chunk(*args, **kwargs):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cache.writer, "write_chunk", write_chunk)


@pytest.mark.parametrize("scheduler", ["synchronous", "threads", "cluster"])
def test_a_full_disk_mid_build_stops_it_unfinalised_and_the_rerun_resumes(data, reference, tmp_path, monkeypatch,
                                                                           scheduler):
    """Never error rows and exit 0: the build stops at the first failed write with one CacheWriteError, keeps the
    finished series, and once there is space again the same call ends with the uninterrupted build's cache."""
    from dask.distributed import LocalCluster

    out = tmp_path / "c"
    _fill_disk_after(monkeypatch, 7)  # one series (5 samples) fits, the second does not
    with pytest.raises(cache.format.CacheWriteError) as e:
        if scheduler == "cluster":  # a dask.distributed cluster; its workers are threads here, and see the full disk
            with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
                build(data, out, CFG, scheduler=cluster.scheduler_address)
        else:
            build(data, out, CFG, scheduler=scheduler, workers=1)
    message = str(e.value)
    assert isinstance(e.value, cache.UserError) and "\n" not in message
    assert f"cannot write the cache at {out}: No space left on device (disk full)" in message and "rerun" in message
    assert not (out / "manifest.json").exists() and not (out / "_build.lock").exists()
    assert len(list((out / "_progress").glob("*.json"))) == 1  # the finished series is kept
    monkeypatch.undo()  # space freed
    again = build(data, out, CFG, scheduler="synchronous")
    assert again.resumed == 1 and again.finalised and again.errors.empty
    assert _content(out) == _content(reference)


def test_a_full_disk_while_finalising_is_one_error_and_the_rerun_finalises(data, reference, tmp_path, monkeypatch):
    import errno

    import cache.writer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    out = tmp_path / "c"
    monkeypatch.setattr(cache.writer, "atomic_write", full)  # pyarrow writing index.parquet
    with pytest.raises(cache.format.CacheWriteError, match=rf"^cannot finalise the cache at {out}: No space left on "
                                                           r"device \(disk full\); free space .* rerun") as e:
        build(data, out, CFG, scheduler="synchronous")
    assert "\n" not in str(e.value) and not (out / "manifest.json").exists()
    monkeypatch.undo()
    again = build(data, out, CFG, scheduler="synchronous")
    assert again.resumed == 3 and again.finalised and _content(out) == _content(reference)


def test_lsdc_prep_reports_a_full_disk_in_one_line(data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lsdc.cli import app

    _fill_disk_after(monkeypatch, 0)
    result = CliRunner().invoke(app, ["prep", str(data), str(tmp_path / "c"), "--size", "32", "--crop-base-mm", "20",
                                      "--crop-scale", "1", "--scheduler", "synchronous", "--no-progress"])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "No space left on device (disk full)" in lines[0], \
        result.output


def test_an_output_that_cannot_hold_a_cache_is_refused_in_one_line(data, reference, tmp_path, monkeypatch):
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    with pytest.raises(cache.format.CacheWriteError, match=rf"^{a_file} is a file, not a folder"):
        build(data, a_file, CFG, scheduler="synchronous")
    read_only = tmp_path / "ro"
    shutil.copytree(reference, read_only)
    real = os.open

    def open_read_only(path, flags, *args, **kwargs):  # tests may run as root, whom chmod does not stop
        if str(path).startswith(str(read_only)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            import errno

            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_read_only)
    with pytest.raises(cache.format.CacheWriteError, match=rf"^cannot write to {read_only}: Read-only file system"):
        build(data, read_only, CFG, scheduler="synchronous")
    monkeypatch.undo()
    assert _content(read_only) == _content(reference)  # untouched


@pytest.mark.parametrize("workers,scheduler,match", [
    (0, None, "workers must be a whole number >= 1, got 0"),
    (-2, "processes", "workers must be"),
    (2, "proceses", "scheduler 'proceses' is neither"),
    (2, "tcp//host", "scheduler 'tcp//host' is neither"),
])
def test_run_settings_that_cannot_work_are_refused_before_anything_is_written(data, tmp_path, workers, scheduler,
                                                                              match):
    from cache.errors import SettingError

    with pytest.raises(SettingError, match=match):
        build(data, tmp_path / "c", CFG, workers=workers, scheduler=scheduler)
    assert not (tmp_path / "c").exists()


def test_an_unreachable_scheduler_is_named_within_its_timeout(data, tmp_path, monkeypatch):
    import prep.build as pb

    assert pb.SCHEDULER_TIMEOUT_S <= 10  # dask's own default is 30 s
    monkeypatch.setattr(pb, "SCHEDULER_TIMEOUT_S", 2)
    start = time.monotonic()
    with pytest.raises(pb.SchedulerUnreachable, match=r"^cannot reach the dask scheduler at tcp://127\.0\.0\.1:1 "
                                                      r"within 2 s") as e:
        build(data, tmp_path / "c", CFG, scheduler="tcp://127.0.0.1:1")
    assert time.monotonic() - start < 10 and "\n" not in str(e.value) and isinstance(e.value, cache.UserError)
