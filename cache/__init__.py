"""lsdc cache: the on-disk contract between prep (writes) and train/notebooks (read).

Depends on numpy, zarr, pandas and pyarrow only (matplotlib only inside `show`).

    w = cache.CacheWriter.create(path, n_rows=N, slices=7, size=256, config=cfg)   # prep
    c = cache.open(path); c.index; c[i]; c.select(condition=...); c.show(i)         # train, notebooks
    cache.show(path, study_id=..., condition=..., level=...)                        # a grid in Jupyter
"""

from cache.format import (
    CROP_SETTINGS,
    FORMAT_VERSION,
    CacheConfigMismatch,
    CacheError,
    CacheFormatError,
    CacheLocked,
    CacheNotFinalised,
    ChecksumError,
    MissingChunkError,
    checksum,
    config_hash,
    crop_differences,
    crop_settings,
)
from cache.grid import show
from cache.reader import CacheReader, open, verify
from cache.writer import CacheWriter, build_lock

__all__ = [
    "CROP_SETTINGS", "FORMAT_VERSION", "CacheConfigMismatch", "CacheError", "CacheFormatError", "CacheLocked",
    "CacheNotFinalised", "ChecksumError", "MissingChunkError", "checksum", "config_hash", "crop_differences",
    "crop_settings", "CacheReader", "open", "verify", "CacheWriter", "build_lock", "show",
]
