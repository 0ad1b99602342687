"""Fault points: named places in a build where it can be made to stop dead, to prove what a kill there leaves.

A feature for testing (tests/test_kill_resume.py, tests/test_prep_build.py) and for rehearsing a crash by hand; a
no-op unless ``LSDC_FAULT_POINT`` is set. With ``LSDC_FAULT_POINT=POINT`` and ``LSDC_FAULT_POINT_FILE=PATH``, the
build touches PATH when it reaches POINT and then sleeps until it is killed: the caller waits for PATH, sends
``kill -9``, and checks what the rerun makes of the state left behind (docs/reliability.md, "Kill proofs").

The environment, not a callback, carries the choice: the point may be reached in a Dask worker process that the
build spawned, where nothing installed in the caller's process exists. Never set it in production: the build hangs
at that point by design.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import cache.format

ENV_POINT = "LSDC_FAULT_POINT"
ENV_FILE = "LSDC_FAULT_POINT_FILE"

# point -> the state a kill there leaves
POINTS = {
    "plan": "tables read, build lock held, cache store created; no task has run",
    "task": "in a worker, one task has written its chunks but is not marked done, and another task is marked done",
    "finalise": "every task done and marked; nothing of the finalise (index, errors, manifest) written",
}


def reached(point: str, out: Path) -> None:
    """Stop here for good when ``LSDC_FAULT_POINT`` names ``point``; return at once otherwise.

    'task' waits for a second task: the first task to reach it returns when no task is marked done yet, so a kill
    leaves finished, half-written and untouched tasks together.
    """
    assert point in POINTS, point
    if os.environ.get(ENV_POINT) != point:
        return
    if point == "task" and not any((Path(out) / cache.format.PROGRESS_DIR).glob("*.json")):
        return
    marker = os.environ.get(ENV_FILE)
    if not marker:
        raise RuntimeError(f"{ENV_POINT}={point} needs {ENV_FILE}=PATH: the file a test waits for")
    Path(marker).touch()
    time.sleep(3600)
