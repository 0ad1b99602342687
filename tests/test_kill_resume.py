"""Kill proofs (issue 7, item 6): `kill -9` a build while planning, mid-build (Dask workers included), before and
while finalising, and `lsdc train` mid-epoch; each rerun gives exactly what an uninterrupted run gives. A second
build on a busy output is refused.

Every kill point is exact, never a sleep: the build is paused at a fault point, LSDC_FAULT_POINT
(prep/faultpoints.py, docs/reliability.md), or by a wrapper in the subprocess's own code, which touches a marker file
and sleeps; the test waits for the marker, then kills the subprocess's whole process group (it runs in its own
session), so worker processes die with it, as they do when a node is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import cache
from lsdc.cli import app
from prep.build import build
from prep.config import PrepConfig
from prep_fixtures import write_dataset
from tiny_cache import make_tiny_cache

CFG = PrepConfig(size=32, crop_scale=1.0, crop_base_mm=20.0)
STUDIES = 6  # one task (series) per study, 5 samples each
TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------- helpers
def content(path: Path) -> tuple:
    """What makes two caches equal: every index row (checksums included), the errors, the config and the pixels."""
    c = cache.open(path)
    return (c.index.astype(str).values.tolist(), c.errors.astype(str).values.tolist(), c.manifest["config_hash"],
            [c[i].tobytes() for i in range(len(c))])


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live (not zombie) process, from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended while we looked
            continue
        if fields[0] != "Z":
            out[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
    return out


def family(pid: int) -> set[int]:
    """A process and all its live descendants."""
    table, found = processes(), {pid}
    while grown := {p for p, (parent, _) in table.items() if parent in found} - found:
        found |= grown
    return found & (set(table) | {pid})


def group_members(pgid: int) -> list[int]:
    return [p for p, (_, group) in processes().items() if group == pgid]


def start_paused(argv: list[str], marker: Path, env: dict[str, str] | None = None,
                 timeout: float = 180) -> subprocess.Popen:
    """Start argv in its own session (process group) and return once it touched `marker` (it is then asleep)."""
    env = {**os.environ, "LSDC_NO_PROGRESS": "1", "LSDC_FAULT_POINT_FILE": str(marker), **(env or {})}
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=TESTS.parent)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"never reached the pause point (exit {proc.poll()}):\n{proc.communicate()[0].decode()}")
        time.sleep(0.02)
    return proc


def kill_9(proc: subprocess.Popen) -> set[int]:
    """SIGKILL the whole group; return once neither it nor any descendant is alive. Returns the processes killed."""
    victims = family(proc.pid) | set(group_members(proc.pid))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while victims & set(processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not victims & set(processes()), victims & set(processes())
    return victims


def prep_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["prep", str(data), str(out), "--size", "32", "--crop-scale", "1", "--crop-base-mm", "20", "--no-progress",
            *extra]


def progress_files(out: Path) -> list[Path]:
    return sorted((out / "_progress").glob("*.json"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), studies=STUDIES)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("ref") / "cache"
    result = build(data, out, CFG, scheduler="synchronous")
    assert result.built == 5 * STUDIES and result.errors.empty
    return content(out)


# ------------------------------------------------------------------------------------------------------- prep
def test_kill_9_while_planning_refuses_a_second_build_then_resumes(data, reference, tmp_path):
    out, marker = tmp_path / "c", tmp_path / "paused"
    proc = start_paused([sys.executable, "-m", "lsdc", *prep_argv(data, out, "--scheduler", "synchronous")], marker,
                        {"LSDC_FAULT_POINT": "plan"})
    # paused with the lock held and the store created, before any task ran
    holder = json.loads((out / "_build.lock").read_text())
    assert holder["pid"] == proc.pid and (out / "zarr.json").is_file() and progress_files(out) == []
    second = CliRunner().invoke(app, prep_argv(data, out, "--scheduler", "synchronous"))
    assert second.exit_code == 2 and "another build holds" in second.output and f"pid {proc.pid}" in second.output
    with pytest.raises(cache.CacheLocked):
        build(data, out, CFG, scheduler="synchronous")
    kill_9(proc)
    assert (out / "_build.lock").exists()  # a dead build leaves its lock: the rerun takes it over
    rerun = CliRunner().invoke(app, prep_argv(data, out, "--scheduler", "synchronous"))
    assert rerun.exit_code == 0, rerun.output
    assert f"{5 * STUDIES} of {5 * STUDIES} samples built" in rerun.output and "0 resumed" in rerun.output
    assert content(out) == reference and not (out / "_build.lock").exists()


def test_kill_9_mid_build_kills_the_dask_workers_and_resumes(data, reference, tmp_path):
    out, marker = tmp_path / "c", tmp_path / "paused"
    # `lsdc prep` on its default dask.distributed LocalCluster: 2 worker processes, one thread each
    proc = start_paused([sys.executable, "-m", "lsdc", *prep_argv(data, out, "--workers", "2")], marker,
                        {"LSDC_FAULT_POINT": "task"})
    workers = family(proc.pid) - {proc.pid}
    assert len(workers) >= 2 and workers <= set(group_members(proc.pid))  # Dask's processes, in the build's group
    assert kill_9(proc) >= workers  # ... and they died with it
    # finished tasks, a task that wrote its chunks but was never marked done, untouched tasks; nothing finalised
    done = progress_files(out)
    marked = {r["row"] for f in done for r in json.loads(f.read_text())["records"]}
    written = cache.CacheWriter.open(out).written_rows()
    assert 1 <= len(done) < STUDIES and written > marked and len(written) < 5 * STUDIES
    assert not (out / "manifest.json").exists()
    with pytest.raises(cache.CacheNotFinalised):
        cache.open(out)
    resumed = build(data, out, CFG, scheduler="synchronous")
    assert resumed.resumed == len(done) and resumed.built == 5 * STUDIES and resumed.finalised
    assert content(out) == reference


def _python_build(data: Path, out: Path, pause_on_manifest: Path | None = None) -> list[str]:
    """`python -c build(...)`; with pause_on_manifest, the driver sleeps when it is about to write manifest.json,
    i.e. with index.parquet and errors.parquet already written (the last step of finalise)."""
    code = f"""
import time
from pathlib import Path
import cache.writer
from prep.build import build
from prep.config import PrepConfig
marker = {str(pause_on_manifest) if pause_on_manifest else None!r}
real = cache.writer.atomic_write_json
def atomic_write_json(path, obj, **kwargs):
    if marker and Path(path).name == "manifest.json":
        Path(marker).touch()
        time.sleep(3600)
    real(path, obj, **kwargs)
cache.writer.atomic_write_json = atomic_write_json
build({str(data)!r}, {str(out)!r}, PrepConfig.from_dict({CFG.to_dict()!r}), scheduler="synchronous")
"""
    return [sys.executable, "-c", code]


def test_kill_9_before_finalising_resumes_every_task(data, reference, tmp_path):
    out, marker = tmp_path / "c", tmp_path / "paused"
    proc = start_paused(_python_build(data, out), marker, {"LSDC_FAULT_POINT": "finalise"})
    kill_9(proc)
    assert len(progress_files(out)) == STUDIES and len(cache.CacheWriter.open(out).written_rows()) == 5 * STUDIES
    assert not (out / "index.parquet").exists() and not (out / "manifest.json").exists()
    resumed = build(data, out, CFG, scheduler="synchronous")
    assert resumed.resumed == STUDIES and resumed.finalised
    assert content(out) == reference


def test_kill_9_while_writing_the_manifest_resumes(data, reference, tmp_path):
    out, marker = tmp_path / "c", tmp_path / "paused"
    proc = start_paused(_python_build(data, out, pause_on_manifest=marker), marker)
    kill_9(proc)
    # index and errors written, the manifest (written last) not: the cache must still read as unfinished
    assert (out / "index.parquet").exists() and (out / "errors.parquet").exists()
    assert not (out / "manifest.json").exists()
    with pytest.raises(cache.CacheNotFinalised):
        cache.open(out)
    resumed = build(data, out, CFG, scheduler="synchronous")
    assert resumed.resumed == STUDIES and resumed.finalised
    assert content(out) == reference


# ------------------------------------------------------------------------------------------------------ train
TRAIN_SET = {"pretrained": "false", "folds": "3", "workers": "2", "in_memory": "false", "deterministic": "true",
             "freeze_epochs": "0", "swa_start": "null", "ema_decay": "0.9", "warmup_epochs": "0.5",
             "lr_backbone": "1e-3", "lr_head": "1e-3", "channels_last": "false"}
TIMING = ("samples_per_s",)


def train_argv(cache_path: Path, run: Path) -> list[str]:
    sets = [a for k, v in TRAIN_SET.items() for a in ("--set", f"{k}={v}")]
    return ["train", str(cache_path), str(run), "--epochs", "2", "--fold", "0", "--device", "cpu", "--backbone",
            "test_efficientnet", "--batch-size", "8", *sets]


# Runs `lsdc train` unchanged, except that the training loader of epoch 1 stops for good after 2 batches (2 optimiser
# steps taken since last.pt was written at the end of epoch 0): a kill exactly mid-epoch.
PAUSE_MID_EPOCH = """
import sys, time
from pathlib import Path
import train.loop as loop
real = loop.train_one_epoch
class Pausing:
    def __init__(self, loader):
        self.loader = loader
    def __len__(self):
        return len(self.loader)
    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 2:
                Path(sys.argv[1]).touch()
                time.sleep(3600)
            yield batch
def train_one_epoch(task, model, training, loader, *args, desc, **kwargs):
    return real(task, model, training, Pausing(loader) if desc.endswith("epoch 1") else loader, *args, desc=desc,
                **kwargs)
loop.train_one_epoch = train_one_epoch
from lsdc.cli import app
app(sys.argv[2:], prog_name="lsdc")
"""


def _epochs(run: Path) -> list[dict]:
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if r["type"] == "epoch"]


def _lsdc(*args: str) -> str:
    """Run `python -m lsdc` to the end (same interpreter settings as the killed run: numerics match bit for bit)."""
    env = {**os.environ, "LSDC_NO_PROGRESS": "1"}
    res = subprocess.run([sys.executable, "-m", "lsdc", *args], env=env, capture_output=True, text=True,
                         cwd=TESTS.parent, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_kill_9_train_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    import torch

    tiny = make_tiny_cache(tmp_path / "cache", n_studies=12, unlabelled=2)
    full, cut, marker = tmp_path / "full", tmp_path / "cut", tmp_path / "paused"
    _lsdc(*train_argv(tiny, full))

    proc = start_paused([sys.executable, "-c", PAUSE_MID_EPOCH, str(marker), *train_argv(tiny, cut)], marker)
    assert len(family(proc.pid) - {proc.pid}) >= 2  # the trainer's loader worker processes
    assert torch.load(cut / "fold0" / "last.pt", weights_only=True)["epoch"] == 0
    assert [e["epoch"] for e in _epochs(cut)] == [0]
    kill_9(proc)
    assert not (cut / "oof.parquet").exists()
    out = _lsdc("train", "--resume", str(cut))
    assert f"resumed from {cut / 'fold0' / 'last.pt'} at epoch 1" in out

    assert _epochs(cut) == _epochs(full) and [e["epoch"] for e in _epochs(full)] == [0, 1]
    pd.testing.assert_frame_equal(pd.read_parquet(cut / "oof.parquet"), pd.read_parquet(full / "oof.parquet"))
    a, b = (torch.load(r / "fold0" / "last.pt", weights_only=True) for r in (full, cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]) for k in a["ema"]["module"])
    assert np.isfinite([e["score"] for e in _epochs(full)]).all()
