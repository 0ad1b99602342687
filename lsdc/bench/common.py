"""Small helpers every bench shares: the machine it ran on, peak memory of a process, summaries of repeats."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def total_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge a figure: CPU, cores this process may use, RAM, load, versions, GPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"time": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_model(),
                            "cores": cores, "ram_gb": round(total_memory_gb(), 1),
                            "load_avg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                            "platform": platform.platform(terse=True)}
    if "torch" in sys.modules:  # only when the bench already needed torch: prep's bench stays torch-free
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def peak_rss_mb() -> float:
    """This process's peak resident memory (the kernel's high-water mark), in MB."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes, Linux: KB


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def minor_faults() -> int:
    """Minor page faults of this process so far: each fresh page an allocation touches costs one."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def spread(values: Iterable[float]) -> dict[str, float]:
    """min / median / max of repeated measurements, and the max/min ratio (the noise the reader should assume)."""
    v = sorted(float(x) for x in values)
    return {"min": v[0], "median": statistics.median(v), "max": v[-1], "max_over_min": v[-1] / v[0] if v[0] else 0.0,
            "n": len(v)}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


class Clock:
    """Accumulates wall time per named stage: `with clock("decode"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, clock: Clock, name: str):
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.clock.seconds[self.name] = self.clock.seconds.get(self.name, 0.0) + time.perf_counter() - self.t0


def write_json(path: str | os.PathLike, result: dict[str, Any]) -> None:
    from cache.io import atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path), result)


def log(msg: str) -> None:
    """Bench progress on stderr (stdout carries the result summary)."""
    from cache.io import progress_enabled

    if progress_enabled():
        print(msg, file=sys.stderr, flush=True)


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, default=str)
