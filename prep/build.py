"""The Dask build: tables -> one task per series -> workers write their own chunks -> finalise.

The driver reads the tables, assigns every sample its row up front (deterministic order, so any scheduler and any
resume give the same cache), and submits one task per series. A worker opens the cache writer itself, holds one
series at a time (one thread per worker), decodes only the slices its samples need, writes their chunks, marks the
task done and returns small records; pixels never travel back. A killed build resumes from the finished tasks.

Paths must be visible to every worker at the same place (a local disk for local processes, a shared filesystem
for a cluster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

import cache
from cache.errors import InputError, SettingError, UserError
from cache.io import progress_enabled, progress_options
from cache.format import INDEX_COLUMNS
from prep import faultpoints
from prep.config import PrepConfig
from prep.samples import errors_frame, read_samples, split_studies
from prep.series import Record, process_series

log = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("processes", "threads", "synchronous")  # dask's own schedulers; anything else is an address
# 'tcp://host:8786' (any dask protocol) or 'host:8786'
_ADDRESS = re.compile(r"[a-z][a-z0-9+]*://\S+|[\w.\-]+:\d+")
# Dask's default is 30 s of retries; an unreachable address should be named sooner, a live scheduler answers in ms.
SCHEDULER_TIMEOUT_S = 10


class SchedulerUnreachable(InputError):
    """The dask.distributed scheduler address given cannot be reached."""


SUMMARY_KINDS = 12  # kinds of error listed in a build's summary; errors.parquet holds every one


@dataclass
class BuildResult:
    out: Path
    candidates: int  # samples that passed the table checks (each has a row in the array)
    built: int  # samples in the index
    errors: pd.DataFrame
    tasks: int
    resumed: int  # tasks found finished by an earlier, interrupted run
    seconds: float
    finalised: bool
    unit: str = "samples"  # what `candidates` and `built` count: crop samples, or series volumes

    def exit_code(self, strict: bool = False) -> int:
        """Non-zero only when nothing was built, or with strict when anything failed."""
        return 1 if self.built == 0 or (strict and len(self.errors) > 0) else 0

    def summary(self) -> str:
        rate = (self.built / self.seconds) if self.seconds > 0 else float("nan")
        what = (f"{self.built} of {self.candidates} samples" if self.unit == "samples"
                else f"{self.built} {self.unit} of {self.candidates} series")
        lines = [f"prep: {what} built into {self.out} ({self.tasks} series tasks, {self.resumed} resumed) in "
                 f"{self.seconds:.1f} s ({rate:.1f} {self.unit}/s)"]
        if len(self.errors):
            lines.append(f"{len(self.errors)} errors (errors.parquet):")
            # one line per kind: a trailing "(...)" dropped and numbers as N, so "series 80 of study 8 ..." and
            # "series 90 of study 9 ..." count together
            why = (self.errors["reason"].astype(str).str.replace(r"\s*\([^()]*\)$", "", regex=True)
                   .str.replace(r"\d+(?:\.\d+)?", "N", regex=True).str.strip())
            kinds = self.errors.assign(why=why).groupby(["stage", "why"]).size().sort_values(ascending=False)
            for (stage, kind), n in kinds.head(SUMMARY_KINDS).items():
                lines.append(f"  {n:6d}  {stage:9s} {kind}")
            if len(kinds) > SUMMARY_KINDS:
                rest = kinds.iloc[SUMMARY_KINDS:]
                lines.append(f"  ... and {len(rest)} more kinds ({int(rest.sum())} errors): see errors.parquet")
        if not self.finalised:
            lines.append("build stopped before finalising: rerun the same command to resume")
        return "\n".join(lines)


def plan_tasks(samples: pd.DataFrame, data_dir: Path, split: str) -> list[dict[str, Any]]:
    """One task per (study, series): its folder and its samples as plain dicts (a few hundred bytes each).

    The key carries a digest of the samples, so a resumed build never reuses a task whose inputs changed.
    """
    # One conversion of the whole table, then plain grouping: a pandas round trip per series costs ~6 ms, which is
    # ~40 s of planning for the competition's 6,000 series.
    rows_of: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in samples.astype(object).where(samples.notna(), None).to_dict("records"):
        rows_of.setdefault((row["study_id"], row["series_id"]), []).append(row)
    tasks = []
    for (study, series), rows in sorted(rows_of.items()):
        digest = hashlib.sha1(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:10]
        tasks.append({"key": f"{study}/{series}/{digest}", "samples": rows,
                      "series_dir": str(data_dir / f"{split}_images" / str(study) / str(series))})
    return tasks


def run_task(task: dict[str, Any], out: str, config: dict[str, Any]) -> list[Record]:
    """Executed on a worker: build one series, write its chunks, mark it done, return small records."""
    import cv2

    # A worker is one core (one thread per worker): OpenCV's own thread pool would oversubscribe the machine's cores
    # and make N workers scale worse than N x one.
    cv2.setNumThreads(1)
    writer = cache.CacheWriter.open(out)
    records = process_series(task["series_dir"], task["samples"], PrepConfig.from_dict(config), writer.write)
    faultpoints.reached("task", Path(out))
    writer.save_task(task["key"], records)
    return records


def _failed_task(task: dict[str, Any], e: BaseException) -> list[Record]:
    """A task that crashed (a bug, a killed worker): every sample gets an error; not saved, so a rerun retries.
    Never a UserError (a full disk, a read-only cache): that stops the whole build instead (run_tasks)."""
    return [dict(ok=False, study_id=s["study_id"], series_id=s["series_id"], instance_number=s["instance_number"],
                 condition=s["condition"], level=s["level"], path=task["series_dir"], stage="worker",
                 reason=f"task failed: {type(e).__name__}: {e}") for s in task["samples"]]


# glibc malloc settings for build workers (docs/benchmarks.md). Arrays below 64 MB come from the heap and freed
# heap stays with the process: a worker reuses the same few hundred MB for every series instead of mmap'ing,
# page-faulting and unmapping each MB-sized slice, crop and sample (0.4-1.4 M minor faults per 500 samples, ~15 % of
# a worker's time). Either variable, once set, switches off glibc's dynamic thresholds, so both are set together.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
_USER_MALLOC = {k: os.environ.get(k) for k in WORKER_MALLOC_ENV}  # before any nanny of this process sets them


def local_cluster(workers: int):
    """A LocalCluster of ``workers`` processes, one thread each: a worker holds exactly one series at a time.

    Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which switches off glibc's dynamic mmap threshold:
    every MB-sized array is then mmap'd and page-faulted afresh (15x the page faults, ~1.5x the time per sample,
    docs/benchmarks.md). The workers here get WORKER_MALLOC_ENV instead, unless the user set either variable. The
    variable dask's nanny put in this process's environment is removed, so spawned workers never inherit it.
    """
    import dask
    from dask.distributed import LocalCluster

    # Dask's nanny writes the variables it hands to workers into this process's environment too: drop them (unless
    # the user set them before lsdc was imported), so they are never taken for the user's choice next time.
    for key, value in _USER_MALLOC.items():
        if value is None:
            os.environ.pop(key, None)
    user_set = any(v is not None for v in _USER_MALLOC.values())
    environ = {k: None for k in WORKER_MALLOC_ENV} if user_set else WORKER_MALLOC_ENV
    settings: dict[str, Any] = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environ.items()}
    # Dask samples every worker's stack every 10 ms for its dashboard profile: ~3 % of a build worker's time, taken
    # with the GIL from the thread that does the work.
    settings["distributed.worker.profile.enabled"] = False
    # The driver's and workers' periodic chores, at rates a build needs: the event-loop tick (default 20 ms), the
    # resource monitor (500 ms) and the nanny's memory check (100 ms, per worker, in the driver). Measured on 2 cores:
    # the driver's CPU during a build falls by a third (docs/benchmarks.md).
    settings.update({"distributed.admin.tick.interval": "200ms", "distributed.admin.system-monitor.interval": "2s",
                     "distributed.worker.memory.monitor-interval": "500ms"})
    # On a GPU box every worker's resource monitor would also poll the GPU through NVML, which no build worker uses.
    # Set for the workers only: in this process dask's NVML switch, once read, holds for the process's lifetime.
    with dask.config.set(settings):
        # the nanny merges this over the config only one level deep: hand it the whole config, changed
        worker_config = dask.config.merge(dask.config.config, {"distributed": {"diagnostics": {"nvml": False}}})
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, config=worker_config,
                            dashboard_address=":0")  # any free port: two builds (or Jupyter) never collide on 8787


# What a build runs: the worker's function for one task, and the records of a task that crashed. The crop cache's is
# (run_task, _failed_task); the volume cache's is prep.volumes' (run_volume_task, failed_volume_task).
Job = tuple[Callable[[dict[str, Any], str, dict[str, Any]], list[Record]], Callable[[dict[str, Any], BaseException],
                                                                                  list[Record]]]


def run_tasks(job: Job, tasks: list[dict], out: str, config: dict, workers: int, scheduler: str | None,
              progress: bool) -> Iterator[tuple[dict, list[Record]]]:
    """(task, records) for every task as it finishes, on dask's local schedulers or a dask.distributed cluster.

    A task that crashes becomes error rows (``job[1]``) and the others go on; a UserError raised in a task (the
    cache cannot be written: disk full, read-only) is the same for every task, so it stops the build and is raised
    here, leaving the finished tasks marked done for the rerun.
    """
    run = _run_local if scheduler in LOCAL_SCHEDULERS else _run_distributed
    yield from run(job, tasks, out, config, workers, scheduler, progress)


def check_scheduler(workers: int, scheduler: str | None) -> None:
    """Refuse run-time settings that cannot work, before anything is read or written."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SettingError(f"workers must be a whole number >= 1, got {workers!r} (a build needs a process to run "
                           "its tasks; --scheduler synchronous runs them in this one)")
    if scheduler is not None and scheduler not in LOCAL_SCHEDULERS and not _ADDRESS.fullmatch(str(scheduler)):
        raise SettingError(f"scheduler {scheduler!r} is neither one of {list(LOCAL_SCHEDULERS)} nor a dask scheduler "
                           "address such as tcp://host:8786")


def _connect(address: str):
    from dask.distributed import Client

    try:
        return Client(address, timeout=f"{SCHEDULER_TIMEOUT_S}s")
    except (OSError, TimeoutError) as e:  # dask: "Timed out trying to connect to ... after 10 s"
        raise SchedulerUnreachable(f"cannot reach the dask scheduler at {address} within {SCHEDULER_TIMEOUT_S} s "
                                   f"({' '.join(str(e).split()) or type(e).__name__}); start it (`dask scheduler`) or "
                                   "check the address, or leave --scheduler out for a local cluster") from None


def _run_distributed(job: Job, tasks: list[dict], out: str, config: dict, workers: int, address: str | None,
                     progress: bool) -> Iterator[tuple[dict, list[Record]]]:
    from dask.distributed import Client, as_completed
    from tqdm.auto import tqdm

    if address:
        client, cluster = _connect(address), None
    else:
        cluster = local_cluster(workers)
        client = Client(cluster)
    try:
        futures = client.map(job[0], tasks, out=out, config=config, pure=False,
                             key=[f"lsdc-prep-{t['key']}-{i}" for i, t in enumerate(tasks)])
        task_of = {f.key: t for f, t in zip(futures, tasks)}
        for future in tqdm(as_completed(futures), total=len(futures), desc="prep", unit="series",
                           **progress_options(progress)):
            task = task_of[future.key]
            try:
                records = future.result()
            except UserError:  # the user's to fix and the same for every task (a full disk): stop the build
                raise
            except Exception as e:  # KilledWorker, a worker's exception: reported per sample, never lost
                records = job[1](task, e)
            future.release()
            yield task, records
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _run_local(job: Job, tasks: list[dict], out: str, config: dict, workers: int, scheduler: str,
               progress: bool) -> Iterator[tuple[dict, list[Record]]]:
    import dask
    from dask.diagnostics import ProgressBar

    def safe(task: dict) -> list[Record]:
        try:
            return job[0](task, out, config)
        except UserError:  # the user's to fix and the same for every task (a full disk): stops the build
            raise
        except Exception as e:  # a crashed task: reported per sample, retried by the next run
            return job[1](task, e)

    graph = [dask.delayed(safe, pure=False)(t) for t in tasks]
    bar = ProgressBar() if progress else None
    if bar:
        bar.register()
    try:
        results = dask.compute(*graph, scheduler=scheduler, num_workers=workers)
    finally:
        if bar:
            bar.unregister()
    yield from zip(tasks, results)


def _frames(records: list[Record], table_errors: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    ok = [{k: v for k, v in r.items() if k != "ok"} for r in records if r["ok"]]
    index = pd.DataFrame(ok, columns=list(INDEX_COLUMNS))
    if len(index):
        index = index.sort_values("row", kind="stable").reset_index(drop=True)
        index["label"] = index["label"].astype("Int8")
    errors = pd.concat([table_errors, errors_frame([{k: v for k, v in r.items() if k != "ok"}
                                                    for r in records if not r["ok"]])], ignore_index=True)
    key = ["study_id", "series_id", "instance_number", "condition", "level", "stage", "path", "reason"]
    errors = errors.sort_values(key, na_position="first", kind="stable").reset_index(drop=True)
    return index, errors


def build(data_dir: str | os.PathLike, out: str | os.PathLike, config: PrepConfig | None = None, *, workers: int = 2,
          scheduler: str | None = None, clean: bool = False, progress: bool | None = None,
          stop_after: int | None = None) -> BuildResult:
    """Build (or resume) the crop cache of ``data_dir``'s ``config.split`` into ``out``.

    scheduler: None = a local dask.distributed cluster of ``workers`` processes, one thread each; 'processes',
    'threads' or 'synchronous' = dask's local schedulers; anything else = the address of a running
    dask.distributed scheduler ('tcp://host:8786'). ``stop_after`` runs only that many pending tasks and returns
    without finalising (an interrupted build, for tests and dry runs).

    Every failure the user must fix is a cache.errors.UserError with a one-line message: SettingError for workers
    < 1 or a scheduler that is no scheduler, TableError for a broken table, cache.CacheConfigMismatch when ``out``
    holds a cache of another config (unless clean), CacheLocked when another build is writing ``out``,
    SchedulerUnreachable, and cache.format.CacheWriteError when ``out`` is a file or cannot be written (read-only,
    disk full, also mid-build or while finalising: the build stops unfinalised, and the same call resumes it).
    """
    start = time.perf_counter()
    check_scheduler(workers, scheduler)
    config = config or PrepConfig()
    data_dir, out = Path(data_dir), Path(out)
    progress = progress_enabled(progress)
    samples, table_errors = read_samples(data_dir, config)
    tasks = plan_tasks(samples, data_dir, config.split)
    cfg = config.to_dict()
    with cache.build_lock(out):
        writer = cache.CacheWriter.create(out, n_rows=max(len(samples), 1), slices=config.slices, size=config.size,
                                          config=cfg, clean=clean, codec=config.codec)
        keys = {t["key"] for t in tasks}
        done = {k: v for k, v in writer.completed_tasks().items() if k in keys}
        lost = writer.lost_rows(r["row"] for recs in done.values() for r in recs if r["ok"])
        if lost:  # chunks a power loss took from tasks marked done: those tasks run again
            log.warning("%s: %d chunks of finished series are missing or cut short (e.g. rows %s); their series are "
                        "built again", out, len(lost), sorted(lost)[:5])
            done = {k: v for k, v in done.items() if not any(r["ok"] and r["row"] in lost for r in v)}
        pending = [t for t in tasks if t["key"] not in done]
        if stop_after is not None:
            pending = pending[:stop_after]
        faultpoints.reached("plan", out)
        records = [r for recs in done.values() for r in recs]
        if pending:
            for _, recs in run_tasks((run_task, _failed_task), pending, str(out), cfg, workers, scheduler, progress):
                records += recs
        index, errors = _frames(records, table_errors)
        finalised = stop_after is None
        if finalised:
            faultpoints.reached("finalise", out)
            writer.finalise(index, errors,
                            extra_manifest={"prep": _prep_info(data_dir, config.split, samples, index, tasks)})
    return BuildResult(out, len(samples), len(index), errors, len(tasks), len(done), time.perf_counter() - start,
                       finalised)


def _prep_info(data_dir: Path, split: str, samples: pd.DataFrame, index: pd.DataFrame, tasks: list
               ) -> dict[str, Any]:
    """What a user auditing the cache wants beside the config: where it came from and how often we fell back; and
    the split's studies, so predict knows the test set after the data folder is gone."""
    info: dict[str, Any] = {"data_dir": str(data_dir.resolve()), "candidates": len(samples), "tasks": len(tasks),
                            "split_studies": split_studies(data_dir, split)}
    if len(index):
        info["ordering_by_instance_number"] = int((index["ordering"] == "instance_number").sum())
        info["samples_with_replicated_slices"] = int(index["replicated"].map(any).sum())
    return info
