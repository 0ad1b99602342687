"""Reading a cache (train, notebooks): `cache.open(path)` -> CacheReader; `verify(path)` -> the bad rows.

Zarr returns the fill value for a chunk that is absent, so every read first checks that its chunk exists: a lost
file raises MissingChunkError instead of giving a black sample. A corrupted chunk fails its CRC-32C (or zstd's frame
checksum) and raises ChecksumError. Local caches with the plain codecs are read file by file (cache.chunks), straight
into the caller's buffer, with the same checks. Comparing pixels with the index checksum costs ~1.5 ms per sample, so
reads skip it unless `verify_checksums=True`; `verify()` / `lsdc cache verify` check every row.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from cache import format as fmt
from cache.chunks import aligned_empty, chunk_path, plain_layout, read_chunk_into
from cache.format import CacheError, CacheFormatError, CacheNotFinalised, ChecksumError, MissingChunkError
from cache.rsna import LABELS, expand_conditions, parse_level

__all__ = ["open", "CacheReader", "verify"]


def _store_of(path: str) -> tuple[Any, str]:
    """(zarr store, key prefix) of the cache group at a path or URL."""
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.BaseZarrError) as e:
        local = "://" not in str(path)
        why = ("the folder does not exist" if local and not os.path.exists(path) else
               "it holds no zarr.json, so it is not a crop cache (lsdc prep makes one)"
               if local and not os.path.isfile(os.path.join(path, "zarr.json")) else f"{type(e).__name__}: {e}")
        raise CacheError(f"no cache at {path}: {why}") from e
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:  # a zarr.json that is not Zarr metadata
        raise CacheFormatError(f"cache at {path}: zarr.json is not valid Zarr metadata ({_short(e)})") from None
    prefix = group.store_path.path
    return group.store, f"{prefix}/" if prefix else ""


def _short(e: BaseException, limit: int = 160) -> str:
    """An exception as one short line for a message (pyarrow's and zarr's own texts run over several lines)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _get_bytes(store: Any, key: str) -> bytes | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _read_parquet(store: Any, key: str, where: str) -> pd.DataFrame:
    data = _get_bytes(store, key)
    if data is None:
        raise CacheError(f"cache at {where} is finalised but {key} is missing")
    try:
        return pq.read_table(io.BytesIO(data)).to_pandas()
    except (pa.ArrowException, ValueError, OSError) as e:  # cut short, emptied, or another file's bytes
        raise CacheFormatError(f"cache at {where}: {key} is not a readable Parquet table ({len(data)} bytes; "
                               f"{_short(e)}); rebuild the cache (`lsdc prep --clean`)") from None


def _require_columns(table: pd.DataFrame, columns: tuple[str, ...], name: str, where: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CacheFormatError(f"cache at {where}: {name} lacks the columns {missing}; it is not this cache's "
                               "table (rebuild the cache)")


def _chunk_key(row: int) -> str:
    return f"{fmt.ARRAY}/{fmt.chunk_name(row)}"


def _label_names(labels: pd.Series) -> pd.Series:
    return labels.map(lambda v: "missing" if pd.isna(v) else LABELS[int(v)])


class CacheReader:
    """A finalised cache, or a view over part of it (`select`). Picklable; opens zarr lazily in each process."""

    def __init__(self, path: str, manifest: dict[str, Any], index: pd.DataFrame, errors: pd.DataFrame,
                 verify_checksums: bool = False, n_total: int | None = None):
        self.path = path
        self.manifest = manifest
        self.index = index
        self.errors = errors
        self.verify_checksums = verify_checksums
        self.n_total = len(index) if n_total is None else n_total
        self._reset()

    def _reset(self) -> None:
        self._array: zarr.Array | None = None
        self._store: Any = None
        self._prefix = ""
        self._pid = -1
        self._n_rows = 0
        self._sample_shape: tuple[int, ...] | None = None
        self._plain: tuple[str, str] | None = None  # (array dir, codec) when chunks are read as files (cache.chunks)
        self._checksums: dict[int, str] | None = None
        self._checksum_algorithm = fmt.CHECKSUM
        self._disk: dict[str, int] | None = None
        self._rows: np.ndarray | None = None  # the index's row column as numpy: a pandas lookup per read costs ~5 %

    # Workers (DataLoader with fork or spawn) get the tables and path only; zarr is reopened on first access.
    def __getstate__(self) -> dict[str, Any]:
        keep = ("path", "manifest", "index", "errors", "verify_checksums", "n_total")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _open(self) -> None:
        if self._pid != os.getpid():
            self._store, self._prefix = _store_of(self.path)
            try:
                self._array = zarr.open_array(self._store, path=f"{self._prefix}{fmt.ARRAY}", mode="r")
            except (FileNotFoundError, zarr.errors.BaseZarrError, ValueError, TypeError, KeyError) as e:
                raise CacheFormatError(f"cache at {self.path}: {fmt.ARRAY}/zarr.json is missing or not valid Zarr "
                                       f"array metadata ({_short(e)})") from None
            self._n_rows = int(self._array.shape[0])
            self._plain = None
            if isinstance(self._store, LocalStore):
                array_dir = Path(self._store.root) / self._prefix / fmt.ARRAY
                codec = plain_layout(array_dir)
                self._plain = (str(array_dir), codec) if codec else None
            self._pid = os.getpid()

    @property
    def array(self) -> zarr.Array:
        self._open()
        return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample: (slices, windows, H, W)."""
        if self._sample_shape is None:
            self._sample_shape = tuple(self.manifest["array"]["shape"][1:])
        return self._sample_shape

    # --- reading -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def _row(self, i: int) -> int:
        n = len(self.index)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        if self._rows is None:
            self._rows = self.index["row"].to_numpy(dtype=np.int64)
        return int(self._rows[i])

    def __getitem__(self, i: int) -> np.ndarray:
        """The i-th sample of this (view's) index: uint8 (S, 3, H, W)."""
        return self.read_row(self._row(i))

    def read_into(self, i: int, out: np.ndarray) -> np.ndarray:
        """The i-th sample written into ``out`` (uint8, C-contiguous, one sample's shape, e.g. a slot of a batch
        array): with the plain codecs the file is read straight into it, with no intermediate copy."""
        return self.read_row(self._row(i), out)

    def _missing(self, row: int, key: str) -> MissingChunkError:
        return MissingChunkError(f"cache {self.path}: row {row} has no data (chunk {key} is missing); "
                                 f"run `lsdc cache verify {self.path}` and rebuild the cache")

    def _chunk_exists(self, key: str) -> bool:
        if isinstance(self._store, LocalStore):  # a stat, ~100x cheaper than a trip through zarr's event loop
            return (Path(self._store.root) / key).is_file()
        return bool(sync(self._store.exists(key)))

    def read_row(self, row: int, out: np.ndarray | None = None) -> np.ndarray:
        """The sample stored at data row `row` (the index's `row` column), in ``out`` when given."""
        self._open()
        if out is not None and (out.dtype != np.uint8 or out.shape != self.shape or not out.flags.c_contiguous):
            raise ValueError(f"reading into a buffer needs a C-contiguous uint8 array of shape {self.shape}, got "
                             f"{out.dtype} {out.shape}")
        if not 0 <= row < self._n_rows:
            raise IndexError(f"cache {self.path}: row {row} outside 0..{self._n_rows - 1}")
        if self._plain is not None:  # the loader's path: kept free of per-read overhead (pathlib, zarr properties)
            array_dir, codec = self._plain
            stack = aligned_empty(self.shape) if out is None else out
            try:
                read_chunk_into(chunk_path(array_dir, row), stack, codec)
            except FileNotFoundError:
                raise self._missing(row, f"{self._prefix}{_chunk_key(row)}") from None
            except ChecksumError as e:
                raise ChecksumError(f"cache {self.path}: row {row}: {e}") from None
        else:
            key = f"{self._prefix}{_chunk_key(row)}"
            if not self._chunk_exists(key):
                raise self._missing(row, key)
            try:
                stack = self._array[row]
            except Exception as e:  # any decode failure means the bytes on disk are not what was written
                raise ChecksumError(f"cache {self.path}: row {row}: chunk {key} cannot be decoded, it is corrupted "
                                    f"({type(e).__name__}: {e})") from e
            if out is not None:
                out[...] = stack
                stack = out
        if self.verify_checksums:
            self._check(row, stack, f"{self._prefix}{_chunk_key(row)}")
        return stack

    def _check(self, row: int, stack: np.ndarray, key: str) -> None:
        if self._checksums is None:
            self._checksums = dict(zip(self.index["row"].tolist(), self.index["checksum"].tolist(), strict=True))
            self._checksum_algorithm = fmt.checksum_algorithm(self.manifest)
        want = self._checksums.get(row)
        if want is not None and fmt.checksum(stack, self._checksum_algorithm) != want:
            raise ChecksumError(f"cache {self.path}: row {row}: pixels of chunk {key} do not match the index "
                                f"checksum {want}; the chunk is corrupted")

    # --- views ---------------------------------------------------------------------------------------------------
    def select(self, study_id: int | Iterable[int] | None = None, condition: str | Iterable[str] | None = None,
               level: str | Iterable[str] | None = None, label: int | Iterable[int] | None = None,
               series_description: str | Iterable[str] | None = None,
               series_id: int | Iterable[int] | None = None) -> CacheReader:
        """A view over the samples matching every given filter (a value or a list of values).

        Conditions and levels are read as everywhere in lsdc: 'spinal_canal_stenosis', a group ('foraminal') or
        'all'; 'l4_l5' or 'L4-L5'. An unknown one raises (a typo must not look like an empty selection).
        """
        if condition is not None:
            condition = list(expand_conditions(condition))
        if level is not None:
            level = [parse_level(lv) for lv in ([level] if isinstance(level, str) else level)]
        mask = np.ones(len(self.index), bool)
        for col, want in (("study_id", study_id), ("condition", condition), ("level", level), ("label", label),
                          ("series_description", series_description), ("series_id", series_id)):
            if want is None:
                continue
            values = [want] if isinstance(want, (str, int, np.integer)) else list(want)
            mask &= self.index[col].isin(values).to_numpy(dtype=bool, na_value=False)
        view = CacheReader(self.path, self.manifest, self.index[mask].reset_index(drop=True), self.errors,
                           self.verify_checksums, n_total=self.n_total)
        return view

    def show(self, i: int = 0, **kwargs: Any):
        """Draw sample i as a grid of slices x windows (a matplotlib Figure)."""
        from cache.grid import draw

        return draw(self, i, **kwargs)

    # --- summary -------------------------------------------------------------------------------------------------
    def disk_usage(self) -> dict[str, int]:
        """Bytes on disk of the whole cache and of its crop chunks, and the number of chunk files."""
        if self._disk is None:
            self._open()
            chunk_prefix = f"{self._prefix}{fmt.ARRAY}/c."
            if isinstance(self._store, LocalStore):
                root = Path(self._store.root) / self._prefix
                sizes = {str(p.relative_to(self._store.root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
            else:
                keys = sync(_collect(self._store.list_prefix(self._prefix)))
                sizes = {k: int(sync(self._store.getsize(k))) for k in keys}
            chunks = [v for k, v in sizes.items() if k.startswith(chunk_prefix) and fmt.chunk_row(k) is not None]
            self._disk = {"total": sum(sizes.values()), "crops": sum(chunks), "chunks": len(chunks)}
        return self._disk

    def counts(self) -> pd.DataFrame:
        """Samples by condition x label (with a total column)."""
        if len(self.index) == 0:
            return pd.DataFrame()
        table = pd.crosstab(self.index["condition"], _label_names(self.index["label"]))
        table = table[[c for c in (*LABELS, "missing") if c in table.columns]]
        table["total"] = table.sum(axis=1)
        return table

    def summary(self) -> dict[str, Any]:
        disk = self.disk_usage()
        raw = disk["chunks"] * int(self.manifest["array"]["raw_bytes_per_sample"])
        return {
            "path": self.path, "samples": len(self), "samples_in_cache": self.n_total,
            "studies": int(self.index["study_id"].nunique()), "sample_shape": list(self.shape),
            "codec": self.manifest["array"]["codec"], "config_hash": self.manifest["config_hash"],
            "format_version": self.manifest["format_version"], "created": self.manifest["created"],
            "bytes_on_disk": disk["total"], "compression_ratio": raw / disk["crops"] if disk["crops"] else None,
            "errors": len(self.errors),
        }

    def _headline(self) -> str:
        s = self.summary()
        view = f" [view: {s['samples']} of {s['samples_in_cache']} samples]" if s["samples"] != s["samples_in_cache"] \
            else ""
        ratio = f"x{s['compression_ratio']:.2f}" if s["compression_ratio"] else "n/a"
        return (f"{s['samples']} samples of {tuple(s['sample_shape'])} uint8, {s['studies']} studies, "
                f"{s['errors']} errors · {s['bytes_on_disk'] / 1e6:.1f} MB on disk ({s['codec']}, compression "
                f"{ratio}) · config {s['config_hash']} · format {s['format_version']}{view}")

    def __repr__(self) -> str:
        return f"CacheReader({self.path!r})\n{self._headline()}\n{self.counts().to_string()}"

    def _repr_html_(self) -> str:
        return (f"<b>CacheReader</b> <code>{self.path}</code><br>{self._headline()}"
                f"{self.counts().to_html()}")


async def _collect(iterator: Any) -> list[str]:
    return [k async for k in iterator]


def open(path: str | os.PathLike, verify_checksums: bool = False) -> CacheReader:
    """Open a finalised cache (local path or a URL zarr understands, e.g. file://)."""
    where = os.fspath(path)
    store, prefix = _store_of(where)
    raw = _get_bytes(store, f"{prefix}{fmt.MANIFEST_FILE}")
    if raw is None:
        raise CacheNotFinalised(fmt.not_finalised_message(where))
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"cache at {where}: {fmt.MANIFEST_FILE} is not valid JSON ({_short(e)})") from None
    if isinstance(manifest, dict) and manifest.get("kind") == "volumes":
        raise fmt.WrongCacheKind(f"{where} is a volume cache (the localisers' input), not a crop cache: train "
                                 "localisers on it with lsdc train-locator; in Python, cache.volumes.open_volumes",
                                 "volumes")
    fmt.check_manifest(manifest, where)
    _check_array_info(manifest, where)
    index = _read_parquet(store, f"{prefix}{fmt.INDEX_FILE}", where)
    errors = _read_parquet(store, f"{prefix}{fmt.ERRORS_FILE}", where)
    _require_columns(index, fmt.INDEX_COLUMNS, fmt.INDEX_FILE, where)
    _require_columns(errors, fmt.ERRORS_COLUMNS, fmt.ERRORS_FILE, where)
    return CacheReader(where, manifest, index, errors, verify_checksums)


def _check_array_info(manifest: dict[str, Any], where: str) -> None:
    """The manifest's description of the crops array, which every read relies on: a 5-d shape of whole numbers."""
    array = manifest.get("array")
    shape = array.get("shape") if isinstance(array, dict) else None
    if not (isinstance(shape, list) and len(shape) == 5 and all(type(n) is int and n >= 0 for n in shape)):
        raise CacheFormatError(f"cache at {where}: {fmt.MANIFEST_FILE} lacks the crops array's shape (array.shape "
                               f"of 5 whole numbers, got {shape!r}); it is not an lsdc crop cache manifest")


def verify(path: str | os.PathLike | CacheReader, on_row: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Check that every index row has its chunk and that its pixels match the index checksum.

    Returns the bad rows (empty when the cache is sound): row, study_id, condition, level, chunk, problem
    ('missing' | 'corrupt' | 'checksum'), detail. `on_row(n)` is called after each row (for a progress bar).
    """
    reader = path if isinstance(path, CacheReader) else open(path)
    reader._open()
    store, prefix = reader._store, reader._prefix
    existing = set(sync(_collect(store.list_prefix(f"{prefix}{fmt.ARRAY}/"))))
    algorithm = fmt.checksum_algorithm(reader.manifest)
    bad = []
    for n, rec in enumerate(reader.index[["row", "study_id", "condition", "level", "checksum"]].itertuples(), 1):
        key = f"{prefix}{_chunk_key(rec.row)}"
        problem, detail = None, ""
        if key not in existing:
            problem, detail = "missing", "chunk file is absent"
        else:
            try:
                stack = reader.array[int(rec.row)]
            except Exception as e:  # a decode failure is the finding we report, not a crash of verify
                problem, detail = "corrupt", f"{type(e).__name__}: {e}"
            else:
                got = fmt.checksum(stack, algorithm)
                if got != rec.checksum:
                    problem, detail = "checksum", f"expected {rec.checksum}, got {got}"
        if problem:
            bad.append({"row": int(rec.row), "study_id": int(rec.study_id), "condition": rec.condition,
                        "level": rec.level, "chunk": key, "problem": problem, "detail": detail})
        if on_row:
            on_row(n)
    return pd.DataFrame(bad, columns=["row", "study_id", "condition", "level", "chunk", "problem", "detail"])
