"""How well points were found: predicted coordinates against true ones, per condition group, in millimetres.

Both tables have train_label_coordinates.csv's columns (study_id, series_id, instance_number, condition, level, x,
y); the volume cache of their series places every point in the patient (cache.volume_geometry), so errors are in mm
whatever the pixel spacing. Torch-free (numpy, pandas): the localiser's validation, `lsdc evaluate` and the demo's
report all use these, the one implementation.

    slice_exact / slice_within_1   the predicted instance is the true one / at most one slice away (same series)
    point_mm                       median, 95th percentile and max of the in-plane error: the predicted point seen on
                                   the true slice's plane, to the true point
    level_identity                 the predicted point is nearer the true point of its own level than to that of any
                                   other level of the condition (an off-by-one level is the commonest error)
    axial_assignment               subarticular: the predicted axial slice is the true one (exact), as chosen from
                                   the sagittal level through geometry
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cache.rsna import CONDITION_GROUP
from cache.volumes import geometry_of

KEY = ["study_id", "condition", "level"]


def _place(points: pd.DataFrame, index: pd.DataFrame) -> pd.DataFrame:
    """Add k (slice in its volume), vol (index position), the patient point (px, py, pz) and the slice normal."""
    where: dict[tuple[int, int], tuple[int, int]] = {}
    for i, row in index.iterrows():
        for k, n in enumerate(row["instance_numbers"]):
            where.setdefault((int(row["series_id"]), int(n)), (i, k))
    geos: dict[int, Any] = {}
    out = []
    for r in points.itertuples(index=False):
        hit = where.get((int(r.series_id), int(r.instance_number)))
        if hit is None:
            out.append((-1, -1, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan))
            continue
        i, k = hit
        geo = geos.setdefault(i, geometry_of(index.loc[i]))
        _, u, v = geo.to_volume(int(r.instance_number), float(r.x), float(r.y))
        p = geo.patient(k, u, v)[0]
        o = geo.orientations[k]
        n = np.cross(o[:3], o[3:])
        out.append((i, k, *p, *n))
    placed = pd.DataFrame(out, columns=["vol", "k", "px", "py", "pz", "nx", "ny", "nz"], index=points.index)
    return pd.concat([points, placed], axis=1)


def pair_points(pred: pd.DataFrame, truth: pd.DataFrame, index: pd.DataFrame) -> pd.DataFrame:
    """One row per true point with its prediction (inner join on study, condition, level): slice offset, in-plane
    error (mm) and whether the prediction is nearest its own level."""
    t = _place(truth.reset_index(drop=True), index)
    p = _place(pred.reset_index(drop=True), index)
    both = t.merge(p, on=KEY, suffixes=("", "_pred"))
    if both.empty:
        return both.assign(same_series=pd.Series(dtype=bool), slice_offset=pd.Series(dtype=float),
                           point_mm=pd.Series(dtype=float), level_ok=pd.Series(dtype=bool))
    d = both[["px_pred", "py_pred", "pz_pred"]].to_numpy() - both[["px", "py", "pz"]].to_numpy()
    n = both[["nx", "ny", "nz"]].to_numpy()
    in_plane = d - (d * n).sum(axis=1, keepdims=True) * n
    both["same_series"] = (both["series_id"] == both["series_id_pred"]) & (both["vol"] == both["vol_pred"])
    both["slice_offset"] = np.where(both["same_series"], both["k_pred"] - both["k"], np.nan)
    both["point_mm"] = np.linalg.norm(in_plane, axis=1)
    both["level_ok"] = _level_ok(both, t)
    return both


def _level_ok(both: pd.DataFrame, t: pd.DataFrame) -> np.ndarray:
    """Nearest true level of each prediction (same study and condition) is its own."""
    true_pts = {key: g[["level", "px", "py", "pz"]] for key, g in t.groupby(["study_id", "condition"])}
    ok = []
    for r in both.itertuples(index=False):
        g = true_pts[(r.study_id, r.condition)]
        dist = np.linalg.norm(g[["px", "py", "pz"]].to_numpy() - np.array([r.px_pred, r.py_pred, r.pz_pred]), axis=1)
        ok.append(bool(np.isfinite(dist).any()) and g["level"].iloc[int(np.nanargmin(dist))] == r.level)
    return np.asarray(ok, dtype=bool)


def summarise(pairs: pd.DataFrame) -> dict[str, Any]:
    """The figures of one group of pairs (JSON-ready)."""
    if pairs.empty:
        return {"n": 0}
    offset = pairs["slice_offset"].to_numpy(dtype=float)
    mm = pairs["point_mm"].to_numpy(dtype=float)
    out = {
        "n": int(len(pairs)),
        "slice_exact": float(np.mean(offset == 0)),
        "slice_within_1": float(np.mean(np.abs(offset) <= 1)),  # NaN (another series) counts as a miss
        "point_mm_median": float(np.nanmedian(mm)),
        "point_mm_p95": float(np.nanpercentile(mm, 95)),
        "point_mm_max": float(np.nanmax(mm)),
        "level_identity": float(pairs["level_ok"].mean()),
    }
    return out


def localisation_metrics(pred: pd.DataFrame, truth: pd.DataFrame, index: pd.DataFrame,
                         axial_slice_given: bool = False) -> dict[str, Any]:
    """Figures per condition group (spinal, foraminal, subarticular), and how many true points had no prediction.

    `index`: the volume cache's index holding every series both tables name. `axial_slice_given`: the subarticular
    points were found on the true axial slices (the localiser's own validation), so its slice figures measure
    nothing and are left out, marked `slice_given`."""
    pairs = pair_points(pred, truth, index)
    groups = pairs["condition"].map(CONDITION_GROUP) if len(pairs) else pd.Series(dtype=str)
    out: dict[str, Any] = {g: summarise(pairs[groups == g]) for g in ("spinal", "foraminal", "subarticular")}
    sub = pairs[groups == "subarticular"]
    if len(sub) and axial_slice_given:
        for k in ("slice_exact", "slice_within_1"):
            out["subarticular"].pop(k)
        out["subarticular"]["slice_given"] = True
    elif len(sub):
        out["subarticular"]["axial_assignment"] = float(np.mean(sub["slice_offset"].to_numpy(dtype=float) == 0))
    out["n_true"] = int(len(truth))
    out["n_missing"] = int(len(truth) - len(pairs))
    return out


def metrics_markdown(m: dict[str, Any]) -> list[str]:
    """The figures as a Markdown table (the run's report, `lsdc evaluate`, the demo's report)."""
    lines = ["| group | n | slice exact | slice ±1 | point mm median | p95 | max | level identity | axial level |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in ("spinal", "foraminal", "subarticular"):
        s = m.get(g, {"n": 0})
        if not s.get("n"):
            lines.append(f"| {g} | 0 | | | | | | | |")
            continue
        if s.get("slice_given"):
            exact = within = axial = "given"
        else:
            exact, within = f"{s['slice_exact']:.3f}", f"{s['slice_within_1']:.3f}"
            axial = f"{s['axial_assignment']:.3f}" if "axial_assignment" in s else "–"
        lines.append(f"| {g} | {s['n']} | {exact} | {within} | "
                     f"{s['point_mm_median']:.2f} | {s['point_mm_p95']:.2f} | {s['point_mm_max']:.2f} | "
                     f"{s['level_identity']:.3f} | {axial} |")
    if m.get("subarticular", {}).get("slice_given"):
        lines.append("\n*given*: the points were found on the true axial slices (the localiser's validation); the "
                     "slice is chosen by geometry only when locating (`lsdc locate`, `lsdc evaluate coords.csv`).")
    if m.get("n_missing"):
        lines.append(f"\n{m['n_missing']} of {m['n_true']} true points have no prediction (not in these figures).")
    return lines


# ------------------------------------------------------------------------------------------------ `lsdc evaluate`

def is_locator(path: Path) -> bool:
    """A localiser run (its locate_metrics.json) or a locator directory of such runs."""
    return path.is_dir() and ((path / "locate_metrics.json").exists() or any(path.glob("*/locate_metrics.json")))


def is_coordinates(path: Path) -> bool:
    """A coordinates CSV (train_label_coordinates.csv's columns), not a submission."""
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    with open(path) as f:
        header = f.readline().strip().split(",")
    return {"instance_number", "x", "y", "condition", "level"} <= set(header)


def run_metrics(path: Path) -> dict[str, dict[str, Any]]:
    """The out-of-fold localisation figures a run (or each run of a locator directory) wrote, by run name."""
    import json

    files = [path / "locate_metrics.json"] if (path / "locate_metrics.json").exists() else sorted(
        path.glob("*/locate_metrics.json"))
    return {f.parent.name: json.loads(f.read_text()) for f in files}


def score_coordinates(coords_csv: Path, truth_csv: Path, volumes: Path | None = None) -> dict[str, Any]:
    """Located coordinates against true ones (e.g. synthetic test_label_coordinates.csv), placed through the volume
    cache `lsdc locate` built beside them (<stem>_volumes/) or the one given."""
    from cache.volumes import open_volumes

    volumes = volumes or coords_csv.with_name(f"{coords_csv.stem}_volumes")
    index = open_volumes(volumes).index
    truth = pd.read_csv(truth_csv)
    pred = pd.read_csv(coords_csv)
    truth = truth[truth["study_id"].isin(set(index["study_id"]))]
    return localisation_metrics(pred, truth, index)
