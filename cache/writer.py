"""Writing a cache (used by prep): create or resume, write samples by row from many processes, finalise last.

Every sample is its own chunk, so two tasks writing different rows never touch the same file, and zarr's local
store (or cache.chunks, for the plain codecs) writes each chunk by temp-file-and-rename: a killed writer leaves the
old chunk or the new one, never half.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from datetime import datetime, UTC
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import zarr

from cache import format as fmt
from cache.chunks import CRC_BYTES, chunk_path, plain_layout, write_chunk
from cache.format import CacheConfigMismatch, CacheError, CacheLocked, CacheWriteError, MissingChunkError, os_reason
from cache.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["CacheWriter", "build_lock", "CacheConfigMismatch", "CacheLocked", "CacheWriteError"]

RESUME_HINT = ("free space (or make the folder writable), then rerun the same command: the build resumes where it "
               "stopped")


@contextmanager
def writing(what: str, then: str = RESUME_HINT) -> Iterator[None]:
    """Turn an OSError while writing the cache (a full or read-only disk, no permission) into one CacheWriteError
    naming ``what`` was being written and what to do; an error row per sample would hide it behind exit code 0."""
    try:
        yield
    except CacheError:
        raise
    except OSError as e:
        raise CacheWriteError(f"{what}: {os_reason(e)}; {then}") from e


def _not_a_file(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise CacheWriteError(f"{root} is a file, not a folder: choose another output path for the cache")


def local_path(path: str | os.PathLike) -> Path:
    """The writer (and its lock) work on local directories; 'file://' URLs are accepted."""
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if "://" in text:
        raise ValueError(f"the cache writer writes to local paths only, got {text!r}; build locally, then copy")
    return Path(text)


def _is_cache(root: Path) -> bool:
    return (root / "zarr.json").is_file()


def _holds_samples(root: Path) -> bool:
    """Has any chunk been written? A cache without one (e.g. a build whose every sample failed) loses nothing when a
    build with other settings replaces it."""
    crops = root / fmt.ARRAY
    return crops.is_dir() and any(p.name != "zarr.json" for p in crops.iterdir())


def _clear(root: Path) -> None:
    """Delete an old cache's contents but keep the build lock (held by the caller of create(clean=True))."""
    for child in root.iterdir():
        if child.name == fmt.LOCK_FILE:
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


class CacheWriter:
    """Handle on a cache being built. Holds only its path, so it pickles cheaply to Dask workers."""

    def __init__(self, path: str | os.PathLike):
        self.root = local_path(path)
        self._array: zarr.Array | None = None
        self._plain: str | None = None  # 'crc32c' / 'none': chunks are written as files directly (cache.chunks)
        self._pid = -1

    # --- opening -------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, n_rows: int, slices: int = 7, size: int = 256,
               config: dict[str, Any] | None = None, clean: bool = False,
               codec: str = fmt.DEFAULT_CODEC) -> CacheWriter:
        """A new store of shape (n_rows, slices, 3, size, size), or a resumable one built with the same config.

        An existing cache with another config hash or shape raises CacheConfigMismatch unless clean=True, which
        deletes it first, or it holds no sample at all (nothing to lose). A directory that is not a cache is never
        deleted.
        """
        shape = [int(n_rows), int(slices), 3, int(size), int(size)]
        return cls._create(path, config, clean, codec, {"shape": shape})

    @classmethod
    def _create(cls, path: str | os.PathLike, config: dict[str, Any] | None, clean: bool, codec: str,
                layout: dict[str, Any]) -> CacheWriter:
        """Create, resume or (clean / nothing to lose) replace the store at `path`. `layout`: what besides the config
        must match for a resume (the crops' array shape; the volumes' grid), as stored in the build attributes."""
        config = json.loads(json.dumps(config or {}, default=str))  # stored exactly as hashed (tuples -> lists)
        root = local_path(path)
        _not_a_file(root)
        want_hash = fmt.config_hash(config)
        leftovers = [p for p in root.iterdir() if p.name != fmt.LOCK_FILE] if root.is_dir() else []
        if leftovers and not _is_cache(root):
            raise CacheError(f"{root} exists and is not an lsdc cache ({leftovers[0].name} inside); "
                             "choose another output path")
        if codec not in fmt.CODECS:  # before anything is deleted
            raise ValueError(f"unknown codec {codec!r}; choose one of {list(fmt.CODECS)}")
        build = zarr.open_group(str(root), mode="r").attrs.get("build", {}) if leftovers and not clean else {}
        same = (build.get("format_version"), build.get("config_hash"), *(build.get(k) for k in layout)) == (
            fmt.FORMAT_VERSION, want_hash, *layout.values())
        if build and not same and not cls._holds_data(root):
            log.warning("%s holds no sample (built with other settings): replaced by this build", root)
            clean = True  # (the same build, even with no sample yet, resumes as usual)
        if leftovers and clean:
            with writing(f"cannot replace the cache at {root}", "make the folder writable or choose another path"):
                _clear(root)
        elif leftovers:
            have_hash = build.get("config_hash")
            if build.get("format_version") != fmt.FORMAT_VERSION:
                raise CacheConfigMismatch(
                    f"cache at {root} was started by an lsdc writing cache format {build.get('format_version')}, "
                    f"this one writes format {fmt.FORMAT_VERSION}; rebuild it (`lsdc prep --clean`, clean=True in "
                    "Python) or choose another output path")
            if have_hash != want_hash:
                raise CacheConfigMismatch(
                    f"cache at {root} was built with config {have_hash}, this build's config is {want_hash} "
                    f"({_config_diff(build.get('config', {}), config)}); rebuild it (`lsdc prep --clean`, "
                    "clean=True in Python) or choose another output path")
            for key, want in layout.items():
                if build.get(key) != want:
                    raise CacheConfigMismatch(
                        f"cache at {root} (config {have_hash}) has {key} {build.get(key)}, this build wants {want} "
                        "(did the input data change?); rebuild it (`lsdc prep --clean`, clean=True in Python) or "
                        "use another path")
            return cls(root)
        build = {"format_version": fmt.FORMAT_VERSION, "finalised": False, "config_hash": want_hash, "config": config,
                 **layout, "codec": codec}
        with writing(f"cannot create the cache at {root}", "choose a writable output path with free space"):
            root.mkdir(parents=True, exist_ok=True)
            cls._new(root, build)
            (root / fmt.PROGRESS_DIR).mkdir(exist_ok=True)
        return cls(root)

    @classmethod
    def _holds_data(cls, root: Path) -> bool:
        """Has any chunk been written? A cache without one (e.g. a build whose every sample failed) loses nothing
        when a build with other settings replaces it."""
        return _holds_samples(root)

    @classmethod
    def _new(cls, root: Path, build: dict[str, Any]) -> None:
        shape = build["shape"]
        group = zarr.create_group(str(root), attributes={"build": build})  # overwrite would delete the lock
        group.create_array(fmt.ARRAY, shape=shape, chunks=(1, *shape[1:]), dtype="uint8", fill_value=0,
                           compressors=fmt.CODECS[build["codec"]], chunk_key_encoding=fmt.CHUNK_KEY_ENCODING,
                           dimension_names=fmt.DIMENSIONS)

    @classmethod
    def open(cls, path: str | os.PathLike) -> CacheWriter:
        """In a worker process: no I/O until the first write."""
        return cls(path)

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])

    @property
    def array(self) -> zarr.Array:
        # Opened per process: a handle inherited through fork would share zarr's event loop with the parent.
        if self._array is None or self._pid != os.getpid():
            if not _is_cache(self.root):
                raise CacheError(f"no cache at {self.root}: call CacheWriter.create first")
            array = zarr.open_array(str(self.root), path=fmt.ARRAY, mode="r+")
            # An all-zero sample must still be stored, else a reader could not tell it from a missing one.
            self._array = array.with_config({"write_empty_chunks": True})
            self._plain = plain_layout(self.root / fmt.ARRAY)
            self._pid = os.getpid()
        return self._array

    @property
    def build_info(self) -> dict[str, Any]:
        return dict(zarr.open_group(str(self.root), mode="r").attrs["build"])

    # --- writing -------------------------------------------------------------------------------------------------
    def write(self, row: int, stack: np.ndarray) -> str:
        """Store one sample (uint8 (S, 3, H, W)) at `row`; return its checksum for the index."""
        array = self.array
        if not isinstance(stack, np.ndarray) or stack.dtype != np.uint8 or stack.shape != array.shape[1:]:
            got = f"{stack.dtype} {stack.shape}" if isinstance(stack, np.ndarray) else type(stack).__name__
            raise ValueError(f"cache {self.root}: row {row} needs a uint8 array of shape {array.shape[1:]}, got {got}")
        if not 0 <= int(row) < array.shape[0]:
            raise IndexError(f"cache {self.root}: row {row} outside 0..{array.shape[0] - 1}")
        with writing(f"cannot write the cache at {self.root}"):
            if self._plain:  # the bytes zarr would write, without its event loop (~2x faster per sample)
                write_chunk(chunk_path(self.root / fmt.ARRAY, row), stack, self._plain)
            else:
                array[int(row)] = stack
        return fmt.checksum(stack)

    def save_task(self, key: str, records: list[dict[str, Any]]) -> None:
        """Record that a task (one series) is done, with its small per-sample records; atomic, after its chunks.

        Not fsynced (one per series cost 1-8 % of a build): a power loss may lose or empty this file, or the chunks it
        vouches for. completed_tasks and lost_rows catch both, and the task is simply done again.
        """
        with writing(f"cannot write the cache at {self.root}"):
            atomic_write_json(self.root / fmt.PROGRESS_DIR / f"{fmt.safe_key(key)}.json",
                              {"key": key, "records": records}, durable=False)

    def completed_tasks(self) -> dict[str, list[dict[str, Any]]]:
        """{task key: its records} of the tasks marked done. A progress file that cannot be read (what a power loss
        can leave) marks nothing: its task is done again, and its rerun replaces the file."""
        done: dict[str, list[dict[str, Any]]] = {}
        for f in sorted((self.root / fmt.PROGRESS_DIR).glob("*.json")):
            try:
                entry = json.loads(f.read_text())
                done[entry["key"]] = entry["records"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                log.warning("progress file %s is unreadable (%s): its task will be done again", f, e)
        return done

    def lost_rows(self, rows: Iterable[int]) -> set[int]:
        """The rows among ``rows`` whose chunk file is missing, empty, or (plain codecs) not its exact size: what a
        power loss can leave of chunks a progress file calls written. One stat per row."""
        array = self.array
        exact = None
        if self._plain:
            exact = int(np.prod(array.shape[1:])) + (CRC_BYTES if self._plain == "crc32c" else 0)
        lost = set()
        for row in rows:
            try:
                size = os.stat(chunk_path(self.root / fmt.ARRAY, row)).st_size
            except FileNotFoundError:
                size = 0
            if size == 0 or (exact is not None and size != exact):
                lost.add(int(row))
        return lost

    def written_rows(self) -> set[int]:
        """Rows whose chunk exists on disk (one directory listing)."""
        rows = (fmt.chunk_row(name) for name in os.listdir(self.root / fmt.ARRAY))
        return {r for r in rows if r is not None}

    # --- finishing -----------------------------------------------------------------------------------------------
    def finalise(self, index_df: pd.DataFrame, errors_df: pd.DataFrame | None = None,
                 extra_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check the index, write index and errors, then the manifest LAST; return the manifest.

        Refuses an index that points at rows with no data, so a finalised cache never reads as zeros.
        """
        array, build = self.array, self.build_info
        index = fmt.normalise_index(index_df, n_rows=array.shape[0], slices=array.shape[1])
        errors = fmt.normalise_errors(errors_df)
        absent = sorted(set(index["row"].tolist()) - self.written_rows())
        if absent:
            raise MissingChunkError(f"cache {self.root}: {len(absent)} index rows were never written, e.g. rows "
                                    f"{absent[:10]}; write them or list them in the errors table")
        array_info = {
            "name": fmt.ARRAY, "shape": list(array.shape), "chunks": list(array.chunks), "dtype": "uint8",
            "dimension_names": list(fmt.DIMENSIONS), "codec": build["codec"],
            "codecs": [c.to_dict() for c in array.metadata.codecs],
            "chunk_key": f"{fmt.ARRAY}/{fmt.CHUNK_NAME}", "raw_bytes_per_sample": int(np.prod(array.shape[1:])),
            "checksum": fmt.CHECKSUM,
        }
        manifest = fmt.build_manifest(build["config"], array_info, index, errors, extra_manifest)
        if manifest["config_hash"] != build["config_hash"]:
            raise CacheConfigMismatch(f"cache at {self.root}: the stored config no longer hashes to "
                                      f"{build['config_hash']}")
        tables = ((fmt.INDEX_FILE, index, fmt.INDEX_SCHEMA), (fmt.ERRORS_FILE, errors, fmt.ERRORS_SCHEMA))
        # Nothing here is half-written (temp + rename) and the manifest goes last: a failure leaves the cache
        # unfinalised, every finished task kept, and the same command finalises it.
        with writing(f"cannot finalise the cache at {self.root}", "free space (or make the folder writable), then "
                     "rerun the same command: every finished series is kept and the cache is finalised"):
            for name, df, schema in tables:
                table = fmt.to_table(df, schema)
                atomic_write(self.root / name, lambda tmp, t=table: pq.write_table(t, tmp))
            group = zarr.open_group(str(self.root), mode="r+")
            group.attrs.update({"build": {**build, "finalised": True}, "manifest": manifest})
            atomic_write_json(self.root / fmt.MANIFEST_FILE, manifest, allow_nan=False)  # strict JSON for any reader
        return manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(lock: Path) -> dict[str, Any]:
    """Who holds a lock file; {} when it is gone or half-written (a holder writes it right after creating it)."""
    try:
        return json.loads(lock.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@contextmanager
def build_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold PATH/_build.lock for the duration of a build; a second build on the same output raises CacheLocked.

    A lock left by a dead process on this host is taken over; one from another host must be removed by hand.
    """
    root = local_path(path)
    _not_a_file(root)
    lock = root / fmt.LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now(UTC).isoformat()}
    with writing(f"cannot write to {root}", "choose a writable output path"):
        root.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            stale = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                and not _pid_alive(holder["pid"])
            if stale and attempt == 0:
                lock.unlink(missing_ok=True)
                continue
            who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
            raise CacheLocked(f"another build holds {lock} ({who}); wait for it, or delete the file if that build "
                              "is dead") from None
        except OSError as e:  # a read-only disk or folder: nothing can be built there
            raise CacheWriteError(f"cannot write to {root}: {os_reason(e)}; choose a writable output path") from e
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError as e:  # a full disk: a lock without its holder would block every later build
            lock.unlink(missing_ok=True)
            raise CacheWriteError(f"cannot write to {root}: {os_reason(e)}; free space, then rerun") from e
        break
    try:
        yield lock
    finally:
        if _holder(lock).get("pid") == me["pid"]:  # never remove a lock someone else has taken over since
            lock.unlink(missing_ok=True)


def _config_diff(have: dict[str, Any], want: dict[str, Any], limit: int = 4) -> str:
    """'size 64 -> 96, codec ...': the settings that make two configs differ, for the mismatch message."""
    want = json.loads(json.dumps(want, default=str))  # tuples -> lists, as the stored config was written
    keys = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    shown = [f"{k} {have.get(k)!r} -> {want.get(k)!r}" for k in keys[:limit]]
    return "differs in " + ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
