"""Planning one study: its phantom, its series, its labels, and the coordinate of every labelled structure.

Planning is cheap and runs in the parent process, so ids and geometry never depend on the number of workers; the
expensive part (rendering pixels) is a pure function of the plan and runs anywhere.
"""

from __future__ import annotations

import numpy as np

from cache.rsna import CONDITION_GROUP, CONDITION_SERIES, CONDITIONS, LABELS, LEVELS, label_column
from prep.synth.phantom import FIRST_LEVEL, SIDES, Phantom
from prep.synth.series import Series, axial, image_size, number, sagittal
from prep.synth.tables import LABEL_MIX

# Compression (0..1) at the centre of each grade; difficulty widens the spread so neighbouring grades overlap.
GRADE_CENTRE = (0.08, 0.5, 0.85)


def severity(rng: np.random.Generator, grade: int, difficulty: float) -> float:
    spread = 0.06 + 0.16 * difficulty
    return float(np.clip(GRADE_CENTRE[grade] + spread * rng.normal(), 0.0, 0.95))


def apply_labels(ph: Phantom, labels: dict[str, str | None], rng: np.random.Generator, difficulty: float) -> None:
    """Draw each labelled structure's compression from its grade (an empty cell gets a grade from the real mix)."""
    for c in CONDITIONS:
        group = CONDITION_GROUP[c]
        for i, lv in enumerate(LEVELS):
            value = labels[label_column(c, lv)]
            mix = np.array(LABEL_MIX[group]) / sum(LABEL_MIX[group])
            grade = LABELS.index(value) if value is not None else int(rng.choice(3, p=mix))
            g = severity(rng, grade, difficulty)
            k = FIRST_LEVEL + i
            if group == "spinal":
                ph.g_canal[k] = g
            else:
                side = SIDES.index("left" if c.startswith("Left") else "right")
                (ph.g_foramen if group == "foraminal" else ph.g_recess)[k][side] = g


def plan_series(ph: Phantom, rng: np.random.Generator, wanted: list[tuple[int, str]], size: tuple[int, int],
                axial_levels: dict[int, list[str]] | None = None, axial_style: str | None = None,
                contrast_t2: str | None = None) -> list[Series]:
    """Series for (series_id, description) pairs. Axial series split the levels between them when there are two."""
    axials = [sid for sid, d in wanted if d == "Axial T2"]
    if axial_levels is None:
        axial_levels = {}
        if len(axials) >= 2:  # the upper discs on one, the lower on the other, overlapping at L3/L4
            axial_levels = {axials[0]: list(LEVELS[:3]), axials[1]: list(LEVELS[2:])}
    out = []
    for sid, desc in wanted:
        sz = image_size(rng, *size)
        if desc == "Axial T2":
            levels = axial_levels.get(sid) or list(LEVELS)
            style = str(rng.choice(["block", "two", "per_level"], p=[0.5, 0.3, 0.2]))
            out.append(axial(ph, rng, sid, levels, axial_style or style, sz))
        else:
            contrast = "T1" if desc == "Sagittal T1" else ("STIR" if rng.random() < 0.2 else "T2")
            contrast = contrast_t2 if contrast_t2 and desc != "Sagittal T1" else contrast
            out.append(sagittal(ph, rng, sid, desc, contrast, sz))
    return out


def locate(ph: Phantom, series: list[Series], condition: str, level: str, series_id: int | None = None
           ) -> dict | None:
    """Coordinate row of a structure: the series that reads it (or the given one), the nearest slice, (x, y)."""
    if series_id is None:
        want = CONDITION_SERIES[condition]
        candidates = [s for s in series if s.description == want] or \
                     [s for s in series if s.description.startswith(want.split()[0])]
    else:
        candidates = [s for s in series if s.series_id == series_id]
    if not candidates:
        return None
    p = ph.centre(condition, level)
    s, sl, x, y, _ = min(((s, *s.nearest(p)) for s in candidates), key=lambda t: abs(t[4]))
    if CONDITION_GROUP[condition] == "spinal" and s.description != "Axial T2":
        # One mid-sagittal slice for all five levels, as a reader marks them: the slice nearest the canal midline.
        mid = np.mean([ph.centre(condition, lv) for lv in LEVELS], axis=0)
        sl = s.nearest(mid)[0]
        x, y, _ = sl.to_pixel(p)
    return dict(series_id=s.series_id, instance_number=sl.instance_number, condition=condition, level=level,
                x=x, y=y)


def new_ids(rng: np.random.Generator, n: int, taken: set[int]) -> list[int]:
    """Unique random ids in the competition's range (they look like 4003253 .. 4290709089)."""
    out = []
    while len(out) < n:
        v = int(rng.integers(1_000_000, 4_294_967_295))
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


def plan_study(rng: np.random.Generator, study_id: int, series_ids: list[int], size: tuple[int, int],
               difficulty: float, labels: dict[str, str | None], axial_style: str | None = None,
               contrast_t2: str | None = None, numbering: str | None = None) -> dict:
    """A synthetic study: sagittal T1, sagittal T2/STIR and one (sometimes two) axial T2 series."""
    ph = Phantom.random(rng)
    apply_labels(ph, labels, rng, difficulty)
    descs = ["Sagittal T1", "Sagittal T2/STIR", "Axial T2"] + (["Axial T2"] if len(series_ids) > 3 else [])
    wanted = sorted(zip(series_ids, descs))
    series = plan_series(ph, rng, wanted, size, axial_style=axial_style, contrast_t2=contrast_t2)
    numbering = {s.series_id: number(s, rng, numbering) for s in series}
    coords = []
    for c in CONDITIONS:
        for lv in LEVELS:
            if labels[label_column(c, lv)] is not None:
                row = locate(ph, series, c, lv)
                if row is not None:
                    coords.append(row)
    return dict(study_id=study_id, phantom=ph, series_geom=series, numbering=numbering, labels=labels,
                series=[(s.series_id, s.description) for s in series], coords=coords, repointed=[])


def plan_real_study(rng: np.random.Generator, real: dict, size: tuple[int, int], difficulty: float) -> dict:
    """A study that reuses a real study's ids, series descriptions, labels (empty cells too), coordinate rows and,
    where the phantom's geometry allows, their instance numbers. Geometry, pixels and x, y come from the phantom."""
    ph = Phantom.random(rng)
    apply_labels(ph, real["labels"], rng, difficulty)
    known = {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"}
    axial_levels: dict[int, list[str]] = {}
    for r in real["coords"]:
        axial_levels.setdefault(r["series_id"], [])
        if r["level"] not in axial_levels[r["series_id"]]:
            axial_levels[r["series_id"]].append(r["level"])
    axial_levels = {k: sorted(v, key=LEVELS.index) for k, v in axial_levels.items()}
    wanted = [(sid, d if d in known else "Axial T2") for sid, d in real["series"]]
    series = plan_series(ph, rng, wanted, size, axial_levels)
    for s, (_, d) in zip(series, real["series"]):
        s.description = d  # keep the real string even when it is not one we know
    coords, repointed, numbering = [], [], {}
    rows = [(r, locate(ph, series, r["condition"], r["level"], r["series_id"])) for r in real["coords"]]
    for s in series:  # number each series so that as many labelled slices as possible get their real number
        pairs = [(s.nearest(ph.centre(r["condition"], r["level"]))[0], r["instance_number"])
                 for r, row in rows if row is not None and r["series_id"] == s.series_id]
        numbering[s.series_id] = number_to_match(s, pairs, rng)
    for r, row in rows:
        if row is None:
            repointed.append(dict(r, why="series not in the series descriptions"))
            continue
        row = locate(ph, series, r["condition"], r["level"], r["series_id"])  # again, now numbered
        if row["instance_number"] != r["instance_number"]:
            repointed.append(dict(r, why=f"phantom slice is instance {row['instance_number']}"))
        coords.append(row)
    return dict(study_id=real["study_id"], phantom=ph, series_geom=series, numbering=numbering,
                labels=real["labels"], series=real["series"], coords=coords, repointed=repointed)


def number_to_match(series: Series, pairs: list, rng: np.random.Generator) -> str:
    """Ascending or descending numbering with the start that gives the most labelled slices their real number."""
    n = len(series.slices)
    index = {id(sl): i for i, sl in enumerate(series.slices)}
    best = (-1, "ascending", 1)
    for mode in ("ascending", "descending"):
        votes: dict[int, int] = {}
        for sl, inst in pairs:
            rank = index[id(sl)] if mode == "ascending" else n - 1 - index[id(sl)]
            if inst - rank >= 1:
                votes[inst - rank] = votes.get(inst - rank, 0) + 1
        for start, v in sorted(votes.items()):
            if v > best[0]:
                best = (v, mode, start)
    _, mode, start = best
    if not pairs:
        return number(series, rng)
    for i, sl in enumerate(series.slices):
        sl.instance_number = start + (i if mode == "ascending" else n - 1 - i)
    return mode
