"""Tiny synthetic caches for the cache tests (and importable by spawned worker processes)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

import cache
from cache.rsna import CONDITIONS, CONDITION_SERIES, LEVELS

SLICES, SIZE = 5, 32
CONFIG = {"slices": SLICES, "size": SIZE, "seed": 0, "windows": ["p1-p99", "p5-p95", "p20-p99.5"]}


def stack(row: int, slices: int = SLICES, size: int = SIZE) -> np.ndarray:
    """A deterministic, row-specific uint8 sample."""
    return np.random.default_rng(row).integers(0, 256, (slices, 3, size, size), dtype=np.uint8)


def index_record(row: int, digest: str, slices: int = SLICES) -> dict:
    condition = CONDITIONS[row % len(CONDITIONS)]
    half = slices // 2
    return {
        "row": row, "study_id": 1000 + row // 4, "series_id": 50_000 + row // 4 * 3 + row % 3,
        "series_description": CONDITION_SERIES[condition], "condition": condition, "level": LEVELS[row % 5],
        "instance_number": 10 + row, "x": 100.5 + row, "y": 120.25, "label": [0, 1, 2, None][row % 4],
        "center_x_px": 100.5 + row, "center_y_px": 120.25, "half_size_px": 48.0, "half_size_mm": 30.0,
        "pixel_spacing_row": 0.625, "pixel_spacing_col": 0.625,
        "slice_instances": [10 + row + k for k in range(-half, slices - half)],
        "slice_offsets_mm": [4.0 * k for k in range(-half, slices - half)],
        "replicated": [k == -half for k in range(-half, slices - half)],
        "ordering": "position", "checksum": digest,
    }


def errors_frame() -> pd.DataFrame:
    return pd.DataFrame([{"study_id": 1000, "series_id": 50_001, "instance_number": 7, "condition": None,
                          "level": None, "path": "train_images/1000/50001/7.dcm", "stage": "decode",
                          "reason": "truncated pixel data"}])


def write_rows(path: str, rows: list[int]) -> dict[int, str]:
    """Worker: write `rows` through a freshly opened writer, return their checksums."""
    w = cache.CacheWriter.open(path)
    return {row: w.write(row, stack(row)) for row in rows}


def build(path: Path | str, n: int = 8, config: dict | None = None, codec: str = cache.format.DEFAULT_CODEC,
          finalise: bool = True) -> cache.CacheWriter:
    w = cache.CacheWriter.create(path, n_rows=n, slices=SLICES, size=SIZE, config=config or CONFIG, codec=codec)
    digests = write_rows(os.fspath(path), list(range(n)))
    if finalise:
        index = pd.DataFrame([index_record(r, digests[r]) for r in range(n)])
        w.finalise(index, errors_frame(), {"window_names": ["soft", "wide", "bright"]})
    return w


def read_checksums(reader: cache.CacheReader, positions: list[int]) -> list[str]:
    """Worker: read samples through a reader that was pickled (spawn) or inherited (fork)."""
    return [cache.checksum(reader[i]) for i in positions]


FORKED_READER: cache.CacheReader | None = None


def read_checksums_inherited(positions: list[int]) -> list[str]:
    return read_checksums(FORKED_READER, positions)
