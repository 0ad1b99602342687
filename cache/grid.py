"""A sample as a picture: windows (rows) x slices (columns), titled with its ids, label and crop size.

matplotlib is imported inside `show` so `import cache` stays light on a training box.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cache.rsna import LABELS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cache.reader import CacheReader


def title(rec: pd.Series, size: int) -> str:
    label = "no label" if pd.isna(rec["label"]) else f"label {LABELS[int(rec['label'])]}"
    return (f"study {rec['study_id']} · series {rec['series_id']} ({rec['series_description']}) · row {rec['row']}\n"
            f"{rec['condition']} {rec['level']} · {label} · crop {2 * rec['half_size_mm']:.0f} mm = "
            f"{2 * rec['half_size_px']:.0f} px -> {size} px")


def show(source: CacheReader | str, i: int = 0, *, study_id: int | None = None, condition: str | None = None,
         level: str | None = None, windows: list[str] | None = None, scale: float = 1.6) -> Figure:
    """`cache.show(path_or_cache, study_id=..., condition=..., level=...)`: the i-th matching sample as a grid.

    Without a selection, i is the position in the cache (or view) itself.
    """
    from cache.reader import CacheReader, open as open_cache

    reader = source if isinstance(source, CacheReader) else open_cache(source)
    if (study_id, condition, level) != (None, None, None):
        reader = reader.select(study_id=study_id, condition=condition, level=level)
        if not 0 <= i < len(reader):
            what = ", ".join(f"{k}={v!r}" for k, v in (("study_id", study_id), ("condition", condition),
                                                         ("level", level)) if v is not None)
            raise IndexError(f"no sample {i} among the {len(reader)} that match {what}" if len(reader) else
                             f"no sample matches {what} in this cache (no coordinate there, or it failed: "
                             "see .errors)")
    return draw(reader, i, windows, scale)


def draw(reader: CacheReader, i: int = 0, windows: list[str] | None = None, scale: float = 1.6) -> Figure:
    """Sample i of `reader` (a cache or a view) as a matplotlib Figure: one column per slice, one row per window.

    Columns are titled with the slice's offset along the stack (mm) and instance number; the labelled slice
    (offset 0) is framed in red and slices copied from the stack's edge are marked "edge copy".
    """
    try:
        from matplotlib.figure import Figure  # not pyplot: no global figure state, works with any backend
    except ImportError as e:  # the base and prep installs have no matplotlib; the CLI names the role to install
        raise ModuleNotFoundError("drawing a sample needs matplotlib: pip install '.[notebook]' in lsdc's clone (or "
                                  "pip install matplotlib)", name="matplotlib") from e

    stack = reader[i]
    rec = reader.index.iloc[int(i)]
    n_slices, n_windows = stack.shape[:2]
    windows = windows or reader.manifest.get("window_names") or _config_window_names(reader.manifest, n_windows)
    fig = Figure(figsize=(scale * n_slices, scale * n_windows + 0.9), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_windows, n_slices))
    offsets, instances, replicated = rec["slice_offsets_mm"], rec["slice_instances"], rec["replicated"]
    for w in range(n_windows):
        for s in range(n_slices):
            ax = axes[w, s]
            ax.imshow(stack[s, w], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            centre = abs(float(offsets[s])) < 1e-6
            for spine in ax.spines.values():
                spine.set_color("red" if centre else "none")
                spine.set_linewidth(2)
            if w == 0:
                edge = " edge copy" if bool(replicated[s]) else ""
                ax.set_title(f"{float(offsets[s]):+.1f} mm\n#{int(instances[s])}{edge}", fontsize=8)
            if s == 0:
                ax.set_ylabel(windows[w], fontsize=8)
    fig.suptitle(title(rec, stack.shape[-1]), fontsize=9)
    return fig


def _config_window_names(manifest: dict, n_windows: int) -> list[str]:
    """Row labels from the build config's windows (prep records name and percentiles), else 'window k'."""
    specs = manifest.get("config", {}).get("windows") or []
    if len(specs) == n_windows and all(isinstance(w, dict) and "name" in w for w in specs):
        return [f"{w['name']} (p{w.get('lo', '?')}-{w.get('hi', '?')})" for w in specs]
    return [f"window {w + 1}" for w in range(n_windows)]
