"""The series-volume cache: the second kind of cache in the contract, the localiser's input (docs/cache_format.md).

Layout (the crop cache's, with volumes in place of crops):

    PATH/zarr.json              Zarr v3 group; attributes: build (kind 'volumes'), then the manifest once finalised
    PATH/volumes/{key}/         one uint8 array (D, G, G) per volume, one chunk: volumes/{key}/c.0.0.0
    PATH/index.parquet          one row per volume (VOLUME_SCHEMA): ids, slices, geometry, grid map, checksum
    PATH/errors.parquet         one row per file, sub-stack or series that failed (the crop cache's ERRORS_SCHEMA)
    PATH/manifest.json          written LAST by finalise (kind 'volumes')
    PATH/_progress/*.json       finished series, so a killed build resumes

A volume is one sub-stack of a series; `key` = '{study_id}_{series_id}_{stack}'. Slices are in canonical order and
every voxel maps back to its DICOM pixel and to the patient through `VolumeReader.geometry(i)`
(cache.volume_geometry). Numpy, zarr, pandas and pyarrow only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from cache import format as fmt
from cache.format import CacheConfigMismatch, CacheFormatError, MissingChunkError, WrongCacheKind
from cache.io import atomic_write, atomic_write_json
from cache.reader import _get_bytes, _read_parquet, _store_of
from cache.volume_geometry import GridMap, VolumeGeometry
from cache.writer import CacheWriter, writing

KIND = "volumes"
GROUP = "volumes"
CHUNK = "c.0.0.0"  # the one chunk of a (D, G, G) array, chunk key encoding 'default' with '.'

VOLUME_SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("key", pa.string()),
    ("study_id", pa.int64()),
    ("series_id", pa.int64()),
    ("series_description", pa.string()),
    ("stack", pa.int64()),  # sub-stack of the series (one orientation), by lowest instance number
    ("n_slices", pa.int64()),
    ("grid", pa.int64()),  # G: the volume is (n_slices, G, G)
    ("instance_numbers", pa.list_(pa.int64())),  # per slice k, in volume order
    ("positions", pa.list_(pa.float64())),  # ImagePositionPatient per slice, flattened (3 per slice)
    ("orientations", pa.list_(pa.float64())),  # ImageOrientationPatient per slice, flattened (6 per slice)
    ("spacings", pa.list_(pa.float64())),  # PixelSpacing (rows, columns) per slice, flattened (2 per slice)
    ("ref_slice", pa.int64()),  # the slice whose pixel grid every slice was resampled onto
    ("ref_rows", pa.int64()),
    ("ref_cols", pa.int64()),
    ("scale_x", pa.float64()),  # u = scale_x * x_ref + offset_x (negative scale: flipped)
    ("offset_x", pa.float64()),
    ("scale_y", pa.float64()),  # v = scale_y * y_ref + offset_y
    ("offset_y", pa.float64()),
    ("window_lo", pa.float64()),  # the intensity window (scanner units) mapped to 0..255
    ("window_hi", pa.float64()),
    ("checksum", pa.string()),
])
VOLUME_COLUMNS: tuple[str, ...] = tuple(VOLUME_SCHEMA.names)

# The labelled points on the volumes (train split, or a test split built with --coords): one row per coordinate row
# that lands on a volume. (k, u, v) are the volume's slice and grid cell (cache.volume_geometry).
TARGETS_FILE = "targets.parquet"
TARGET_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("study_id", pa.int64()),
    ("series_id", pa.int64()),
    ("condition", pa.string()),
    ("level", pa.string()),
    ("instance_number", pa.int64()),
    ("x", pa.float64()),  # the coordinate as given: source pixels of that instance
    ("y", pa.float64()),
    ("k", pa.int64()),
    ("u", pa.float64()),
    ("v", pa.float64()),
])
TARGET_COLUMNS: tuple[str, ...] = tuple(TARGET_SCHEMA.names)


def volume_key(study_id: int, series_id: int, stack: int) -> str:
    return f"{int(study_id)}_{int(series_id)}_{int(stack)}"


def geometry_of(row: pd.Series | dict[str, Any]) -> VolumeGeometry:
    """The voxel <-> DICOM pixel <-> patient mapping of one index row."""
    d = int(row["n_slices"])
    return VolumeGeometry(
        instance_numbers=np.asarray(row["instance_numbers"], dtype=np.int64),
        positions=np.asarray(row["positions"], dtype=np.float64).reshape(d, 3),
        orientations=np.asarray(row["orientations"], dtype=np.float64).reshape(d, 6),
        spacings=np.asarray(row["spacings"], dtype=np.float64).reshape(d, 2),
        ref=int(row["ref_slice"]), grid=GridMap(float(row["scale_x"]), float(row["offset_x"]), float(row["scale_y"]),
                                                float(row["offset_y"])), size=int(row["grid"]))


class VolumeWriter(CacheWriter):
    """A volume cache being built: create or resume, write volumes by key from many processes, finalise last.
    Progress files, the build lock and resume checks are the crop cache's."""

    @classmethod
    def create(cls, path: str | os.PathLike, grid: int, config: dict[str, Any] | None = None, clean: bool = False,
               codec: str = fmt.DEFAULT_CODEC) -> VolumeWriter:
        return cls._create(path, config, clean, codec, {"kind": KIND, "grid": int(grid)})

    @classmethod
    def _new(cls, root: Path, build: dict[str, Any]) -> None:
        zarr.create_group(str(root), attributes={"build": build}).create_group(GROUP)

    @classmethod
    def _holds_data(cls, root: Path) -> bool:
        group = root / GROUP
        return group.is_dir() and any(p.is_dir() for p in group.iterdir())

    def write(self, key: str, volume: np.ndarray) -> str:
        """Store one volume (uint8 (D, G, G)) under `key`; return its checksum for the index."""
        grid = self.build_info["grid"] if not hasattr(self, "_grid") else self._grid
        self._grid = grid
        if not isinstance(volume, np.ndarray) or volume.dtype != np.uint8 or volume.ndim != 3 \
                or volume.shape[1:] != (grid, grid) or volume.shape[0] < 1:
            got = f"{volume.dtype} {volume.shape}" if isinstance(volume, np.ndarray) else type(volume).__name__
            raise ValueError(f"volume cache {self.root}: {key} needs a uint8 (D, {grid}, {grid}) array, got {got}")
        with writing(f"cannot write the volume cache at {self.root}"):  # a full disk stops the build, resumable
            array = zarr.create_array(str(self.root), name=f"{GROUP}/{key}", shape=volume.shape, chunks=volume.shape,
                                      dtype="uint8", fill_value=0, compressors=fmt.CODECS[self.build_info["codec"]],
                                      chunk_key_encoding=fmt.CHUNK_KEY_ENCODING, dimension_names=("slice", "y", "x"),
                                      overwrite=True, config={"write_empty_chunks": True})
            array[...] = volume
        return fmt.checksum(volume)

    def lost_keys(self, keys: list[str]) -> set[str]:
        """Keys whose chunk file is missing or empty (what a power loss can leave of a finished series)."""
        lost = set()
        for key in keys:
            chunk = self.root / GROUP / key / CHUNK
            if not chunk.is_file() or chunk.stat().st_size == 0:
                lost.add(key)
        return lost

    def finalise(self, index_df: pd.DataFrame, errors_df: pd.DataFrame | None = None,
                 extra_manifest: dict[str, Any] | None = None, targets: pd.DataFrame | None = None) -> dict[str, Any]:
        """Check the index (every volume written), write index, errors and targets, then the manifest LAST."""
        build = self.build_info
        index = index_df.reindex(columns=list(VOLUME_COLUMNS)).sort_values(["study_id", "series_id", "stack"])
        index["row"] = np.arange(len(index), dtype=np.int64)
        index = index.reset_index(drop=True)
        if lost := self.lost_keys(index["key"].tolist()):
            raise MissingChunkError(f"volume cache {self.root}: {len(lost)} volumes were never written, e.g. "
                                    f"{sorted(lost)[:5]}")
        errors = fmt.normalise_errors(errors_df)
        manifest = {
            "kind": KIND, "format_version": fmt.FORMAT_VERSION, "finalised": True,
            "created": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"), "config": build["config"],
            "config_hash": fmt.config_hash(build["config"]), "versions": fmt.package_versions(),
            "array": {"group": GROUP, "chunk_key": f"{GROUP}/{{key}}/{CHUNK}", "dtype": "uint8", "grid": build["grid"],
                      "dimension_names": ["slice", "y", "x"], "codec": build["codec"], "checksum": fmt.CHECKSUM},
            "files": {"index": fmt.INDEX_FILE, "errors": fmt.ERRORS_FILE,
                      **({"targets": TARGETS_FILE} if targets is not None else {})},
            "counts": {"volumes": len(index), "slices": int(index["n_slices"].sum()),
                       "targets": None if targets is None else len(targets),
                       "studies": int(index["study_id"].nunique()), "series": int(index["series_id"].nunique()),
                       "by_series_description": {str(k): int(v) for k, v in
                                                 index["series_description"].value_counts().sort_index().items()},
                       "errors": len(errors)},
            **(extra_manifest or {}),
        }
        if manifest["config_hash"] != build["config_hash"]:
            raise CacheConfigMismatch(f"volume cache at {self.root}: the stored config no longer hashes to "
                                      f"{build['config_hash']}")
        tables = [(fmt.INDEX_FILE, index, VOLUME_SCHEMA), (fmt.ERRORS_FILE, errors, fmt.ERRORS_SCHEMA)]
        if targets is not None:
            tables.append((TARGETS_FILE, targets.reindex(columns=list(TARGET_COLUMNS)), TARGET_SCHEMA))
        with writing(f"cannot finalise the volume cache at {self.root}", "free space (or make the folder writable), "
                     "then rerun the same command: it finalises"):
            for name, df, schema in tables:
                table = fmt.to_table(df, schema)
                atomic_write(self.root / name, lambda tmp, t=table: pq.write_table(t, tmp))
            zarr.open_group(str(self.root), mode="r+").attrs.update({"build": {**build, "finalised": True},
                                                                     "manifest": manifest})
            atomic_write_json(self.root / fmt.MANIFEST_FILE, manifest, allow_nan=False)
        return manifest


class VolumeReader:
    """A finalised volume cache: `index` (one row per volume), `errors`, `manifest`, `len`, `reader[i]` -> uint8
    (D, G, G), `geometry(i)` -> VolumeGeometry, `select(...)` -> a view. Picklable (zarr opened lazily)."""

    def __init__(self, path: str, manifest: dict[str, Any], index: pd.DataFrame, errors: pd.DataFrame,
                 targets: pd.DataFrame | None = None):
        self.path, self.manifest, self.index, self.errors = path, manifest, index.reset_index(drop=True), errors
        self.targets = targets if targets is not None else pd.DataFrame(columns=list(TARGET_COLUMNS))
        self._group: zarr.Group | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("path", "manifest", "index", "errors", "targets")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def grid(self) -> int:
        return int(self.manifest["array"]["grid"])

    def _volumes(self) -> zarr.Group:
        if self._group is None or self._pid != os.getpid():
            store, prefix = _store_of(self.path)
            self._group = zarr.open_group(store, path=f"{prefix}{GROUP}", mode="r")
            self._pid = os.getpid()
        return self._group

    def __getitem__(self, i: int) -> np.ndarray:
        key = self.index["key"].iat[int(i)]
        try:
            volume = self._volumes()[key][...]
        except (KeyError, FileNotFoundError) as e:
            raise MissingChunkError(f"volume cache {self.path}: volume {key} is missing ({e})") from None
        return np.asarray(volume)

    def geometry(self, i: int) -> VolumeGeometry:
        return geometry_of(self.index.iloc[int(i)])

    def select(self, **where: Any) -> VolumeReader:
        """A view of the volumes whose columns equal the given values (a list: any of them)."""
        keep = np.ones(len(self.index), dtype=bool)
        for column, value in where.items():
            values = value if isinstance(value, (list, tuple, set)) else [value]
            keep &= self.index[column].isin(list(values)).to_numpy()
        index = self.index[keep]
        return VolumeReader(self.path, self.manifest, index, self.errors,
                            self.targets[self.targets["key"].isin(set(index["key"]))])

    def __repr__(self) -> str:
        counts = self.manifest.get("counts", {})
        return (f"VolumeReader({self.path!r}: {len(self)} volumes, {counts.get('slices')} slices of "
                f"{self.grid}x{self.grid}, {counts.get('errors')} errors)")


def open_volumes(path: str | os.PathLike) -> VolumeReader:
    """Open a finalised volume cache; a crop cache, an unfinalised build or an unknown format is a clear error."""
    where = os.fspath(path)
    store, prefix = _store_of(where)
    raw = _get_bytes(store, f"{prefix}{fmt.MANIFEST_FILE}")
    if raw is None:
        raise fmt.CacheNotFinalised(fmt.not_finalised_message(where))
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CacheFormatError(f"volume cache at {where}: {fmt.MANIFEST_FILE} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CacheFormatError(f"volume cache at {where}: {fmt.MANIFEST_FILE} is not a JSON object")
    if manifest.get("kind") != KIND:
        raise WrongCacheKind(f"{where} is a crop cache, not a volume cache: the localiser trains on volumes "
                             "(lsdc prep-volumes DATA OUT)", "crops")
    fmt.check_manifest(manifest, where)
    index = _read_parquet(store, f"{prefix}{fmt.INDEX_FILE}", where)
    errors = _read_parquet(store, f"{prefix}{fmt.ERRORS_FILE}", where)
    targets = _read_parquet(store, f"{prefix}{TARGETS_FILE}", where) if "targets" in manifest.get("files", {}) \
        else None
    return VolumeReader(where, manifest, index, errors, targets)


def targets_on_volumes(index: pd.DataFrame, coords: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Coordinate rows (study_id, series_id, instance_number, condition, level, x, y; valid values) -> (targets on
    the volumes (TARGET_COLUMNS), the rows that land on no volume with the reason)."""
    where: dict[tuple[int, int], list[tuple[int, Any]]] = {}
    for i, row in index.iterrows():
        for k, n in enumerate(row["instance_numbers"]):
            where.setdefault((int(row["series_id"]), int(n)), []).append((i, k))
    out, missed = [], []
    for r in coords.itertuples(index=False):
        hits = where.get((int(r.series_id), int(r.instance_number)))
        if not hits:
            missed.append((r, f"instance {r.instance_number} of series {r.series_id} is in no volume (a missing or "
                              "failed file, or a series not built)"))
            continue
        i, _ = hits[0]
        k, u, v = geometry_of(index.loc[i]).to_volume(int(r.instance_number), float(r.x), float(r.y))
        out.append(dict(key=index.at[i, "key"], study_id=int(r.study_id), series_id=int(r.series_id),
                        condition=r.condition, level=r.level, instance_number=int(r.instance_number), x=float(r.x),
                        y=float(r.y), k=int(k), u=float(u), v=float(v)))
    return pd.DataFrame(out, columns=list(TARGET_COLUMNS)), pd.DataFrame(
        [{**r._asdict(), "reason": why} for r, why in missed])


def verify_volumes(reader: VolumeReader, on_row: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Every index row has its volume and its checksum matches -> the bad rows (key, problem, detail)."""
    bad = []
    for i, key in enumerate(reader.index["key"]):
        if on_row:
            on_row(i + 1)
        try:
            got = fmt.checksum(reader[i])
        except Exception as e:  # noqa: BLE001 - a missing or undecodable volume is the finding, not a crash
            bad.append({"key": key, "problem": "missing or corrupt", "detail": f"{type(e).__name__}: {e}"})
            continue
        if got != reader.index["checksum"].iat[i]:
            bad.append({"key": key, "problem": "checksum", "detail": f"expected {reader.index['checksum'].iat[i]}"})
    return pd.DataFrame(bad, columns=["key", "problem", "detail"])
