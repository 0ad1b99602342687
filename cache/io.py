"""Small filesystem helpers every stage shares: atomic writes and a build lock."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Callable

from cache.errors import InputError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], durable: bool = True) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``.

    A reader sees either the old file or the complete new one, never half of it: rename is atomic on POSIX
    within one filesystem, so the temp file is made in the target's own directory. That holds whenever the process
    dies (kill -9, out of memory). ``durable`` also fsyncs the file before the rename, so it survives a power loss or
    an OS crash; files written by the thousand (a build's progress files, synthetic DICOMs) skip it: an fsync per
    series made a build 1-8 % slower on ext4 (docs/benchmarks.md), and their readers cope with a lost file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), durable)


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = True) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), durable)


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, recursively: what strict JSON (and every reader of it) accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, durable: bool = True, allow_nan: bool = True) -> None:
    """``allow_nan=False`` for files other tools read (a manifest): strict JSON has no NaN/Infinity literal, so a
    non-finite number raises ValueError here instead of writing a file that strict readers reject."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=allow_nan)
    atomic_write_text(path, text + "\n", durable)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of an append-only JSON-lines file. A process killed mid-append leaves at most its last line torn: that
    line is dropped (its epoch is redone on resume); a broken line anywhere else is real corruption and raises."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    records = []
    for i, ln in enumerate(lines):
        try:
            records.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise InputError(f"{path}:{i + 1}: not a JSON record ({e})") from None
    return records


def progress_interval() -> float:
    """Seconds between progress-bar redraws: tqdm's 0.1 s on a terminal or in Jupyter; 30 s when stderr goes to a
    file (`nohup lsdc train ... > log`), where every redraw is kept and would bury the epoch lines."""
    import sys

    interactive = getattr(sys.stderr, "isatty", lambda: False)() or "ipykernel" in sys.modules
    return 0.1 if interactive else 30.0


def progress_options(progress: bool | None = None) -> dict[str, Any]:
    """tqdm's on/off and redraw interval for every lsdc progress bar: `tqdm(..., **progress_options(progress))`."""
    return {"disable": not progress_enabled(progress), "mininterval": progress_interval()}


def progress_enabled(progress: bool | None = None) -> bool:
    """Progress bars on unless switched off by the caller or by LSDC_NO_PROGRESS=1/true/yes (tests set it)."""
    if progress is not None:
        return progress
    return os.environ.get("LSDC_NO_PROGRESS", "").strip().lower() not in ("1", "true", "yes")
