"""lsdc cache: the on-disk contract between prep (writes) and train/notebooks (read).

Depends on numpy, zarr, pandas and pyarrow only (matplotlib only inside `show`).

    w = cache.CacheWriter.create(path, n_rows=N, slices=7, size=256, config=cfg)   # prep
    c = cache.open(path); c.index; c[i]; c.select(condition=...); c.show(i)         # train, notebooks
    cache.show(path, study_id=..., condition=..., level=...)                        # a grid in Jupyter

Names are imported on first use (PEP 562): `import cache.rsna` or `cache.errors` (the competition's strings, the
error kinds) loads neither zarr nor pandas, so `lsdc --help` stays instant while its options read the configs.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    **dict.fromkeys(("CROP_SETTINGS", "FORMAT_VERSION", "CacheConfigMismatch", "CacheError", "CacheFormatError",
                     "CacheLocked", "CacheNotFinalised", "ChecksumError", "MissingChunkError", "checksum",
                     "config_hash", "crop_differences", "crop_settings"), "cache.format"),
    "show": "cache.grid",
    **dict.fromkeys(("CacheReader", "open", "verify"), "cache.reader"),
    **dict.fromkeys(("CacheWriter", "build_lock"), "cache.writer"),
    **dict.fromkeys(("UserError", "SettingError", "InputError", "MissingInput"), "cache.errors"),
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:  # a submodule reached as an attribute (cache.format.PROGRESS_DIR) before anything imported it
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise  # the submodule exists but lacks one of its own dependencies: say which
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
