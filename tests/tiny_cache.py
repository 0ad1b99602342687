"""Tiny finalised caches for the train tests, written through the cache writer API.

The signal is learnable: a bright blob in the centre of every slice whose radius grows with the label
(Normal/Mild small, Moderate medium, Severe large), on a noisy background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

import cache
from cache.rsna import CONDITION_SERIES, LEVELS

RADIUS = (0.12, 0.25, 0.40)  # blob radius per label, as a fraction of the crop size


def sample_stack(label: int, slices: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2) / size
    blob = (r < RADIUS[label] * rng.uniform(0.9, 1.1)).astype(np.float32)
    stack = np.empty((slices, 3, size, size), np.uint8)
    for s in range(slices):
        fade = 1.0 - 0.3 * abs(s - slices // 2) / max(1, slices // 2)  # the labelled (centre) slice is brightest
        for w in range(3):
            img = 40 + 160 * fade * blob + rng.normal(0, 12, (size, size))
            stack[s, w] = np.clip(img, 0, 255).astype(np.uint8)
    return stack


def make_tiny_cache(path: str | Path, n_studies: int = 10, slices: int = 3, size: int = 32,
                    conditions: tuple[str, ...] = ("Spinal Canal Stenosis",), seed: int = 0,
                    label_probs: tuple[float, float, float] = (0.6, 0.25, 0.15), unlabelled: int = 0) -> Path:
    """n_studies x len(conditions) x 5 levels samples; the first `unlabelled` samples get no label."""
    rng = np.random.default_rng(seed)
    rows = [(1000 + s, c, lv) for s in range(n_studies) for c in conditions for lv in LEVELS]
    labels = rng.choice(3, size=len(rows), p=label_probs)
    labels[:3] = (0, 1, 2)  # every class present at least once
    writer = cache.CacheWriter.create(path, n_rows=len(rows), slices=slices, size=size,
                                      config={"tiny": True, "seed": seed, "size": size, "slices": slices})
    records = []
    for row, ((study, condition, level), label) in enumerate(zip(rows, labels)):
        digest = writer.write(row, sample_stack(int(label), slices, size, rng))
        series = study * 10 + list(CONDITION_SERIES.values()).index(CONDITION_SERIES[condition])
        records.append({
            "row": row, "study_id": study, "series_id": series, "series_description": CONDITION_SERIES[condition],
            "condition": condition, "level": level, "instance_number": 5, "x": 100.0, "y": 120.0,
            "label": None if row < unlabelled else int(label), "center_x_px": 100.0, "center_y_px": 120.0,
            "half_size_px": 48.0, "half_size_mm": 36.0, "pixel_spacing_row": 0.75, "pixel_spacing_col": 0.75,
            "slice_instances": list(range(5 - slices // 2, 5 - slices // 2 + slices)),
            "slice_offsets_mm": [3.0 * (k - slices // 2) for k in range(slices)], "replicated": [False] * slices,
            "ordering": "position", "checksum": digest})
    index = pd.DataFrame(records)
    index["label"] = index["label"].astype("Int8")
    writer.finalise(index, None, {})
    return Path(path)
