"""The cache's on-disk format: names, version, codecs, the index/errors schemas, the manifest and the errors.

Layout of a cache directory (see docs/cache_format.md):

    PATH/zarr.json              Zarr v3 group; its attributes mirror the manifest once finalised
    PATH/crops/                 uint8 array (N, S, 3, H, W), one sample per chunk: crops/c.{row}.0.0.0.0
    PATH/index.parquet          one row per sample (INDEX_SCHEMA)
    PATH/errors.parquet         one row per sample or file that failed (ERRORS_SCHEMA)
    PATH/manifest.json          written LAST by finalise; its presence (finalised: true) makes the cache readable
    PATH/_progress/*.json       finished build tasks, so a killed build can resume
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
from datetime import datetime, UTC
from importlib import metadata
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from cache.errors import UserError
from cache.rsna import CONDITIONS, LEVELS, SERIES_DESCRIPTIONS

# v2: the index checksum is sha256-128 (v1: blake2b-128); chunks and tables are unchanged.
FORMAT_VERSION = 2
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2)

ARRAY = "crops"
DIMENSIONS = ("sample", "slice", "window", "y", "x")
INDEX_FILE = "index.parquet"
ERRORS_FILE = "errors.parquet"
MANIFEST_FILE = "manifest.json"
PROGRESS_DIR = "_progress"
LOCK_FILE = "_build.lock"
# '.' keeps every chunk a plain file in crops/ (the default '/' makes 5 nested directories per sample).
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}
CHUNK_NAME = "c.{row}.0.0.0.0"  # a sample's chunk file in crops/, by that encoding


def chunk_name(row: int) -> str:
    return CHUNK_NAME.format(row=int(row))

# Compressor presets (zarr v3 bytes-to-bytes codecs). The default was chosen by measurement, see docs/cache_format.md:
# CLAHE'd crops are close to incompressible (x1.25-1.5 with zstd), so compression buys little disk for 2.5x slower
# reads and 4x slower writes. 'crc32c' stores the raw bytes plus a CRC-32C that zarr checks on every read, so a
# corrupted chunk still fails loudly instead of returning wrong pixels (what zstd's frame checksum gave us).
CODECS: dict[str, list] = {
    "crc32c": [Crc32cCodec()],
    "none": [],
    "zstd-1": [ZstdCodec(level=1, checksum=True)],
    "zstd-3": [ZstdCodec(level=3, checksum=True)],
    "lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=1)],
}
DEFAULT_CODEC = "crc32c"

ORDERINGS = ("position", "instance_number")

# Index columns in file order (docs/architecture.md). `label` is nullable: test samples have none.
INDEX_SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("study_id", pa.int64()),
    ("series_id", pa.int64()),
    ("series_description", pa.string()),
    ("condition", pa.string()),
    ("level", pa.string()),
    ("instance_number", pa.int64()),
    ("x", pa.float64()),
    ("y", pa.float64()),
    ("label", pa.int8()),
    ("center_x_px", pa.float64()),
    ("center_y_px", pa.float64()),
    ("half_size_px", pa.float64()),
    ("half_size_mm", pa.float64()),
    ("pixel_spacing_row", pa.float64()),
    ("pixel_spacing_col", pa.float64()),
    ("slice_instances", pa.list_(pa.int64())),
    ("slice_offsets_mm", pa.list_(pa.float64())),
    ("replicated", pa.list_(pa.bool_())),
    ("ordering", pa.string()),
    ("checksum", pa.string()),
])
INDEX_COLUMNS: tuple[str, ...] = tuple(INDEX_SCHEMA.names)
LIST_COLUMNS = ("slice_instances", "slice_offsets_mm", "replicated")

# A file can fail before we know its condition or level, so everything but path/stage/reason may be null.
ERRORS_SCHEMA = pa.schema([
    ("study_id", pa.int64()),
    ("series_id", pa.int64()),
    ("instance_number", pa.int64()),
    ("condition", pa.string()),
    ("level", pa.string()),
    ("path", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
])
ERRORS_COLUMNS: tuple[str, ...] = tuple(ERRORS_SCHEMA.names)


class CacheError(UserError):
    """Base of every cache problem (a UserError: the CLI reports it in one line)."""


class CacheNotFinalised(CacheError):
    """The build was interrupted or is still running."""


class WrongCacheKind(CacheError):
    """A cache of the other kind (a volume cache given where a crop cache is read, or the other way round)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class CacheFormatError(CacheError):
    """Unknown format version, or an index/errors table that breaks the schema."""


class CacheConfigMismatch(CacheError):
    """PATH holds a cache built with another prep config (or shape)."""


class CacheLocked(CacheError):
    """Another build holds the build lock."""


class MissingChunkError(CacheError):
    """An index row has no data in the store."""


class ChecksumError(CacheError):
    """A chunk cannot be decoded or its pixels do not match the index checksum."""


class CacheWriteError(CacheError):
    """The cache cannot be written: the disk is full or read-only, permission is denied, OUT is a file. A build stops
    at the first one (never an error row per sample) and stays resumable."""


def os_reason(e: OSError) -> str:
    """An OSError in a few words: the OS's text for its errno (pyarrow's own wording is a paragraph), and the path."""
    text = os.strerror(e.errno) if e.errno else (e.strerror or " ".join(str(e).split()))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (disk full)"
    return f"{text}: {e.filename}" if e.filename else text


# The index's content digest of a sample, 32 hex digits. sha256 runs on the CPU's SHA extensions where it has them:
# 0.78 ms per 7x3x256x256 sample here, against 1.5 ms for blake2b, which format version 1 used.
CHECKSUMS: dict[str, Any] = {
    "sha256-128": lambda data: hashlib.sha256(data).hexdigest()[:32],
    "blake2b-128": lambda data: hashlib.blake2b(data, digest_size=16).hexdigest(),
}
CHECKSUM = "sha256-128"


def checksum(stack: np.ndarray, algorithm: str = CHECKSUM) -> str:
    """Content digest of a sample: `algorithm` of its raw C-order uint8 bytes (the first 128 bits, as hex)."""
    return CHECKSUMS[algorithm](np.ascontiguousarray(stack).data)


def checksum_algorithm(manifest: dict[str, Any]) -> str:
    """The algorithm behind a cache's index checksums (version 1 caches predate the manifest field)."""
    named = (manifest.get("array") or {}).get("checksum")
    if named:
        if named not in CHECKSUMS:
            raise CacheFormatError(f"unknown checksum algorithm {named!r}; this lsdc knows {list(CHECKSUMS)}")
        return named
    return "blake2b-128" if manifest.get("format_version") == 1 else CHECKSUM


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a config (sorted keys, no spaces), first 12 hex digits."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# What decides a sample's pixels, from a cache's build config. Caches that agree on these hold comparable crops whatever
# split, studies, conditions or codec each was built from, so a model trained on one can read the other. The box is
# its half side in mm (crop_scale x crop_base_mm), a window its percentiles (not its name).
CROP_SETTINGS = ("slices", "size", "half_size_mm", "windows", "clahe_clip", "clahe_tiles", "percentile_stride")


def crop_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The CROP_SETTINGS of a cache's build config (those it records; {} for a cache without a config)."""
    config = dict(manifest.get("config") or {})
    if "crop_scale" in config and "crop_base_mm" in config:
        config["half_size_mm"] = round(float(config["crop_scale"]) * float(config["crop_base_mm"]), 6)
    if isinstance(config.get("windows"), list):
        config["windows"] = [[w.get("lo"), w.get("hi")] if isinstance(w, dict) else w for w in config["windows"]]
    return {k: config[k] for k in CROP_SETTINGS if k in config}


def crop_differences(trained: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """'size 64 != 96'-style lines for the crop settings both record and that differ."""
    return [f"{k} {trained[k]} != {given[k]}" for k in CROP_SETTINGS
            if k in trained and k in given and json.loads(json.dumps(trained[k])) != json.loads(json.dumps(given[k]))]


def safe_key(key: str) -> str:
    """A task key as a file name: readable part + short hash, so 'a/b' and 'a_b' never collide."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80]
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("numpy", "zarr", "pandas", "pyarrow", "lsdc"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _bad(what: str, df: pd.DataFrame, mask: Any, reason: str) -> CacheFormatError:
    rows = df.index[np.asarray(mask, bool)][:5].tolist()
    return CacheFormatError(f"{what}: {reason} (table rows {rows})")


def _as_int(df: pd.DataFrame, col: str, what: str, nullable: bool) -> pd.Series:
    s = pd.to_numeric(df[col], errors="coerce")
    bad = (s.isna() & df[col].notna()) | (s.notna() & (s != s.round()))
    if not nullable:
        bad |= s.isna()
    if bad.any():
        raise _bad(what, df, bad, f"column {col!r} must hold integers{'' if nullable else ' (no nulls)'}")
    return s.astype("Int64" if nullable else "int64")


def normalise_index(index: pd.DataFrame, n_rows: int, slices: int) -> pd.DataFrame:
    """Check the index against INDEX_SCHEMA and the array shape; return it with canonical dtypes.

    Extra columns are kept (after the contract columns); missing ones, wrong types, bad labels, rows out of range,
    duplicate rows and per-slice lists of the wrong length raise CacheFormatError naming the rows.
    """
    what = "index"
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise CacheFormatError(f"{what}: missing columns {missing}")
    df = index.reset_index(drop=True).copy()
    for col in ("row", "study_id", "series_id", "instance_number"):
        df[col] = _as_int(df, col, what, nullable=False)
    df["label"] = _as_int(df, "label", what, nullable=True)
    if (~df["label"].isin([0, 1, 2]) & df["label"].notna()).any():
        raise _bad(what, df, ~df["label"].isin([0, 1, 2]) & df["label"].notna(), "label must be 0, 1, 2 or null")
    df["label"] = df["label"].astype("Int8")
    for field in INDEX_SCHEMA:
        col = field.name
        if pa.types.is_floating(field.type):
            s = pd.to_numeric(df[col], errors="coerce")
            if s.isna().any():
                raise _bad(what, df, s.isna(), f"column {col!r} must hold numbers (no nulls)")
            df[col] = s.astype("float64")
        elif pa.types.is_string(field.type):
            if df[col].isna().any():
                raise _bad(what, df, df[col].isna(), f"column {col!r} has nulls")
            df[col] = df[col].astype(str)
    for col, allowed in (("condition", CONDITIONS), ("level", LEVELS), ("series_description", SERIES_DESCRIPTIONS),
                         ("ordering", ORDERINGS)):
        bad = ~df[col].isin(allowed)
        if bad.any():
            raise _bad(what, df, bad, f"column {col!r} must be one of {list(allowed)}")
    bad = (df["row"] < 0) | (df["row"] >= n_rows)
    if bad.any():
        raise _bad(what, df, bad, f"row outside the array's 0..{n_rows - 1}")
    if df["row"].duplicated().any():
        raise _bad(what, df, df["row"].duplicated(keep=False), "the same data row appears twice")
    for col in LIST_COLUMNS:
        bad = df[col].map(lambda v: v is None or np.ndim(v) != 1 or len(v) != slices)
        if bad.any():
            raise _bad(what, df, bad, f"column {col!r} must hold a list of {slices} values per sample")
    bad = ~df["checksum"].str.fullmatch(r"[0-9a-f]{32}")
    if bad.any():
        raise _bad(what, df, bad, "checksum must be the 32-hex digest returned by CacheWriter.write")
    extra = [c for c in df.columns if c not in INDEX_COLUMNS]
    return df[list(INDEX_COLUMNS) + extra]


def normalise_errors(errors: pd.DataFrame | None) -> pd.DataFrame:
    """Check the errors table against ERRORS_SCHEMA; None means no errors."""
    if errors is None or len(errors) == 0:
        errors = pd.DataFrame({c: pd.Series([], dtype=object) for c in ERRORS_COLUMNS})
    missing = [c for c in ERRORS_COLUMNS if c not in errors.columns]
    if missing:
        raise CacheFormatError(f"errors: missing columns {missing}")
    df = errors.reset_index(drop=True).copy()
    for col in ("study_id", "series_id", "instance_number"):
        df[col] = _as_int(df, col, "errors", nullable=True)
    for col in ("condition", "level", "path", "stage", "reason"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
        df[col] = df[col].map(lambda v: None if v is None else str(v))
    for col in ("stage", "reason"):
        if df[col].isna().any():
            raise _bad("errors", df, df[col].isna(), f"column {col!r} has nulls")
    extra = [c for c in df.columns if c not in ERRORS_COLUMNS]
    return df[list(ERRORS_COLUMNS) + extra]


def to_table(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """DataFrame -> Arrow table with the contract schema for the contract columns (extras inferred)."""
    extra = [c for c in df.columns if c not in schema.names]
    fields = list(schema) + [pa.field(c, pa.Table.from_pandas(df[[c]], preserve_index=False).schema.field(c).type)
                             for c in extra]
    return pa.Table.from_pandas(df, schema=pa.schema(fields), preserve_index=False)


def counts(index: pd.DataFrame, errors: pd.DataFrame) -> dict[str, Any]:
    label = index["label"].astype("Int8").astype(object).where(index["label"].notna(), "missing")
    return {
        "samples": int(len(index)),
        "by_condition": {str(k): int(v) for k, v in index["condition"].value_counts().sort_index().items()},
        "by_label": {str(k): int(v) for k, v in label.astype(str).value_counts().sort_index().items()},
        "by_series_description": {
            str(k): int(v) for k, v in index["series_description"].value_counts().sort_index().items()},
        "studies": int(index["study_id"].nunique()),
        "errors": int(len(errors)),
        "errors_by_stage": {str(k): int(v) for k, v in errors["stage"].value_counts().sort_index().items()},
    }


def build_manifest(config: dict[str, Any], array: dict[str, Any], index: pd.DataFrame, errors: pd.DataFrame,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest: everything needed to trust and read the cache without our code."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "finalised": True,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "config_hash": config_hash(config),
        "versions": package_versions(),
        "array": array,
        "files": {"index": INDEX_FILE, "errors": ERRORS_FILE},
        "counts": counts(index, errors),
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise CacheFormatError(f"extra_manifest key {key!r} would overwrite a manifest field")
        manifest[key] = value
    return manifest


def check_manifest(manifest: dict[str, Any], where: str) -> None:
    """Refuse a manifest that is not a JSON object, an unfinalised cache and a format version this code does not
    know."""
    if not isinstance(manifest, dict):
        raise CacheFormatError(f"cache at {where}: {MANIFEST_FILE} holds a JSON {type(manifest).__name__}, not an "
                               "object: it is not an lsdc manifest")
    if not manifest.get("finalised"):
        raise CacheNotFinalised(not_finalised_message(where))
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise CacheFormatError(
            f"cache at {where} has format_version {version!r}; this lsdc reads versions {list(SUPPORTED_VERSIONS)}. "
            "Rebuild the cache with this lsdc (`lsdc prep`) or install the lsdc version that wrote it.")


def not_finalised_message(where: str) -> str:
    return (f"cache at {where} was not finalised: the build was interrupted or is still running; "
            "rerun `lsdc prep` with the same settings to finish it")


def chunk_row(name: str) -> int | None:
    """The row of a crop chunk file name 'c.{row}.0.0.0.0'; None for anything else (e.g. zarr's '*.partial' temp
    files left by a killed write, which are not data)."""
    parts = name.rsplit("/", 1)[-1].split(".")
    if len(parts) == 6 and parts[0] == "c" and all(p.isdigit() for p in parts[1:]):
        return int(parts[1])
    return None
