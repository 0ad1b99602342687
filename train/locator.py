"""Finding every condition-level of a study from its volumes alone: the trained localisers, chained.

    Sagittal T2/STIR volume -> the spinal localiser -> the canal's point and slice at each level
    Sagittal T1 volume      -> the foraminal localiser -> left and right foramen at each level, each weighted
        towards its level's canal point (the canal's level identity is the most reliable: `level_prior`)
    each level's canal point, in the patient -> the nearest Axial T2 slice (any axial series or sub-stack, the one
        whose plane is nearest) -> the subarticular localiser on it -> left and right recess

A locator directory holds one run per condition group (`spinal/`, `foraminal/`, `subarticular/`, each a run of the
one training loop); every fold's best.pt of a run is used, their probabilities averaged. Works on a volume cache
(train never reads DICOM): `lsdc locate` builds the volumes first (prep), then calls `locate_volumes`.

Output: the rows of train_label_coordinates.csv (study_id, series_id, instance_number, condition, level, x, y, in
source pixels) plus `confidence`; and a log of what could not be found, and of which series was used where a study
has several, each with its reason. Left and right come from the heatmap channel of each side on volumes shown the
radiological way round (cache.volume_geometry), and are checked against the patient's x axis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cache.errors import InputError, MissingInput
from cache.rsna import CONDITION_SIDE, CONDITIONS, LEVELS
from cache.volumes import geometry_of
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import LOCATE_TARGETS, LocateConfig
from train.locate import DESCRIPTION, POINTS, points_to_rows
from train.locate_net import decode, masked_log_softmax, neighbours

log = logging.getLogger(__name__)
COORD_COLUMNS = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y", "confidence"]
LOG_COLUMNS = ["study_id", "condition", "level", "series_id", "what", "reason"]
# A level whose canal point lies further than this from every axial slice is not covered by the axial series.
AXIAL_REACH_SLICES = 1.5
# Foramina are anchored on the canal's levels: each foramen's heatmap is weighted by a Gaussian of this width (mm)
# along the spine around its level's canal point. Discs lie ~30-40 mm apart, so a foramen one level off costs ~5 nats
# while the foramen's own offset from its disc (a few mm) costs almost nothing.
LEVEL_PRIOR_MM = 10.0


class Localisers:
    """The models of one target (every fold's best checkpoint) and their config."""

    def __init__(self, run_dir: Path, device: torch.device):
        paths = sorted(run_dir.glob("fold*/best.pt"))
        if not paths:
            raise MissingInput(f"{run_dir} holds no fold*/best.pt: train the localisers first (lsdc train-locator)")
        ckpts = [load_checkpoint(p) for p in paths]
        if any(c.get("kind") != "localiser" for c in ckpts):
            raise InputError(f"{run_dir}: not a localiser run (its checkpoints hold a {ckpts[0].get('kind')})")
        self.cfg = LocateConfig.from_dict(ckpts[0]["config"])
        self.models = [model_from_checkpoint(c).to(device) for c in ckpts]
        self.volume_settings: dict[str, Any] = ckpts[0].get("volume_settings") or {}
        self.device = device

    @torch.no_grad()
    def predict(self, stack: np.ndarray, axial: bool = False, prior: np.ndarray | None = None
                ) -> tuple[np.ndarray, ...]:
        """uint8 (D, G, G) sagittal volume, or (1, 3, G, G) axial slice with its neighbours -> per point k, u, v
        (grid cells of the volume) and confidence; the fold models' probabilities averaged. `prior`: a log-prior
        (C, D, G, G) added to each point's log-probabilities before decoding (see `level_prior`)."""
        x = torch.from_numpy(stack).to(self.device).float().div_(255)
        grid, size = x.shape[-1], self.cfg.image_size or x.shape[-1]
        if size != grid:
            flat = x.reshape(-1, 1, grid, grid)
            x = torch.nn.functional.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False,
                                                antialias=True).view(*x.shape[:-2], size, size)
        x = x[None] if axial else neighbours(x[None])
        mask = torch.ones(1, x.shape[1], dtype=torch.bool, device=self.device)
        masked = [masked_log_softmax(m(x), mask).exp() for m in self.models]
        logp = torch.stack(masked).mean(0).clamp_min(1e-30).log()
        if prior is not None:
            extra = torch.from_numpy(prior).to(self.device).float()  # volume grid -> the heatmap's cells
            extra = torch.nn.functional.interpolate(extra, size=tuple(logp.shape[-2:]), mode="bilinear",
                                                    align_corners=False, antialias=True)
            logp = logp + extra[None]
        k, u, v, conf = (t[0].cpu().numpy() for t in decode(logp, mask, shared_slice=self.cfg.target == "spinal"))
        f = grid / size
        return k, (u + 0.5) * f - 0.5, (v + 0.5) * f - 0.5, conf


def load_locator(locator_dir: str | Path, device: str = "auto") -> dict[str, Localisers]:
    """The localisers of a locator directory, by target (any of spinal, foraminal, subarticular may be missing)."""
    root = Path(locator_dir)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    found = {t: Localisers(root / t, dev) for t in LOCATE_TARGETS if (root / t / "config.json").exists()}
    if not found:
        raise MissingInput(f"{root} holds no localiser run ({', '.join(f'{t}/' for t in LOCATE_TARGETS)}): train "
                           "them with lsdc train-locator VOLUMES OUT")
    return found


def volume_settings(locator: dict[str, Localisers]) -> dict[str, Any]:
    """The volume cache settings the localisers were trained on (they must agree): new volumes are built alike."""
    keep = ("grid", "window", "percentile_stride")
    settings = {t: {k: v for k, v in loc.volume_settings.items() if k in keep} for t, loc in locator.items()}
    first = next(iter(settings.values()))
    if any(s != first for s in settings.values()):
        raise InputError(f"the localisers were trained on volume caches of different settings: {settings}")
    return first


def choose_volume(index: pd.DataFrame, study: int, description: str) -> tuple[int | None, str]:
    """The study's volume of one description, and a note: with several (two series, or sub-stacks), the one with the
    most slices (then the lowest series id)."""
    rows = index[(index["study_id"] == study) & (index["series_description"] == description)]
    if rows.empty:
        return None, f"no {description} series"
    best = rows.sort_values(["n_slices", "series_id", "stack"], ascending=[False, True, True]).index[0]
    note = ""
    if len(rows) > 1:
        note = (f"{len(rows)} {description} volumes ({', '.join(rows['key'])}); used {rows.at[best, 'key']}, the one "
                "with the most slices")
    return int(best), note


def _canal_points(rows: list[dict], index: pd.DataFrame, vol: int | None) -> dict[str, np.ndarray]:
    """The patient position of each level's predicted canal point."""
    if vol is None:
        return {}
    geo = geometry_of(index.loc[vol])
    out = {}
    for r in rows:
        k, u, v = geo.to_volume(r["instance_number"], r["x"], r["y"])
        out[r["level"]] = geo.patient(k, u, v)[0]
    return out


def _foraminal_midpoints(rows: list[dict], index: pd.DataFrame, vol: int | None) -> dict[str, np.ndarray]:
    """Without a canal point: the middle of the two foramina of a level (the canal lies between them)."""
    if vol is None:
        return {}
    geo = geometry_of(index.loc[vol])
    by_level: dict[str, list[np.ndarray]] = {}
    for r in rows:
        k, u, v = geo.to_volume(r["instance_number"], r["x"], r["y"])
        by_level.setdefault(r["level"], []).append(geo.patient(k, u, v)[0])
    return {lv: np.mean(ps, axis=0) for lv, ps in by_level.items() if len(ps) == 2}


def level_prior(geo: Any, canal: dict[str, np.ndarray], channels: list[tuple[str, str]],
                sigma_mm: float = LEVEL_PRIOR_MM) -> np.ndarray | None:
    """A log-prior (C, D, G, G) over a sagittal volume: for each channel's level, -1/2 (d / sigma)^2 with d the
    distance along the spine (the direction between the neighbouring canal points) from the level's canal point.
    None without the five canal points (nothing to anchor on). The canal's level identity is the localisers' most
    reliable figure (docs/locate.md), so the foramina borrow it instead of counting discs again."""
    if not all(lv in canal for lv in LEVELS):
        return None
    points = np.stack([canal[lv] for lv in LEVELS])
    g, d = geo.size, len(geo.depths)
    v, u = np.meshgrid(np.arange(g, dtype=float), np.arange(g, dtype=float), indexing="ij")
    cells = np.stack([geo.patient(k, u.ravel(), v.ravel()) for k in range(d)])  # (D, G*G, 3)
    out = np.zeros((len(channels), d, g, g), dtype=np.float32)
    for c, (_, level) in enumerate(channels):
        i = LEVELS.index(level)
        axis = points[min(i + 1, len(LEVELS) - 1)] - points[max(i - 1, 0)]
        axis = axis / max(float(np.linalg.norm(axis)), 1e-6)
        along = (cells - points[i]) @ axis
        out[c] = (-0.5 * (along / sigma_mm) ** 2).reshape(d, g, g)
    return out


def nearest_axial(index: pd.DataFrame, study: int, point: np.ndarray) -> tuple[int, int, float] | None:
    """(volume, slice, distance mm) of the study's axial slice nearest a patient point whose projection lies inside
    the slice, or None."""
    best = None
    axial = index[(index["study_id"] == study) & (index["series_description"] == "Axial T2")]
    for vol, row in axial.iterrows():
        geo = geometry_of(row)
        k, dist, u, v = geo.nearest(point)
        if not (-0.5 <= u <= geo.size - 0.5 and -0.5 <= v <= geo.size - 0.5):
            continue
        spacing = float(np.median(np.diff(geo.depths))) if geo.depths.size > 1 else 5.0
        if abs(dist) > AXIAL_REACH_SLICES * spacing:
            continue
        if best is None or abs(dist) < best[2]:
            best = (int(vol), int(k), abs(dist))
    return best


def _side_checked(rows: list[dict], index: pd.DataFrame, vol: int) -> list[dict]:
    """Left must lie to the patient's left (+x) of right: a swap is never silent (it is logged and the points
    exchanged, as the image orientation guarantees unless the slice's tags are wrong)."""
    geo = geometry_of(index.loc[vol])
    x = {}
    for r in rows:
        k, u, v = geo.to_volume(r["instance_number"], r["x"], r["y"])
        x[CONDITION_SIDE[r["condition"]]] = geo.patient(k, u, v)[0][0]
    if {"left", "right"} <= set(x) and x["left"] < x["right"]:
        log.warning("study %s: the left and right points of %s came out mirrored in the patient; exchanged",
                    rows[0]["study_id"], rows[0]["level"])
        for r in rows:
            other = "Right" if r["condition"].startswith("Left") else "Left"
            r["condition"] = other + r["condition"][len(r["condition"].split()[0]):]
    return rows


def locate_volumes(locator: dict[str, Localisers], reader: Any, studies: Iterable[int] | None = None,
                   progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Coordinates of every condition-level of every study of a volume cache -> (coords, log)."""
    from tqdm.auto import tqdm

    from cache.io import progress_options

    index = reader.index
    studies = sorted(set(index["study_id"]) if studies is None else studies)
    coords: list[dict] = []
    notes: list[dict] = []

    def missing(study: int, conditions: Iterable[str], reason: str, levels: Iterable[str] = LEVELS) -> None:
        for c in conditions:
            for lv in levels:
                notes.append(dict(study_id=study, condition=c, level=lv, series_id=None, what="missing",
                                  reason=reason))

    for study in tqdm(studies, desc="locate", unit="study", **progress_options(progress)):
        sagittal: dict[str, tuple[int | None, list[dict]]] = {}
        canal: dict[str, np.ndarray] = {}
        for target in ("spinal", "foraminal"):
            conditions = sorted({c for c, _ in POINTS[target]}, key=CONDITIONS.index)
            if target not in locator:
                missing(study, conditions, f"no {target} localiser in the locator")
                sagittal[target] = (None, [])
                continue
            vol, note = choose_volume(index, study, DESCRIPTION[target])
            if vol is None:
                missing(study, conditions, note)
                sagittal[target] = (None, [])
                continue
            if note:
                notes.append(dict(study_id=study, condition=None, level=None, series_id=int(index.at[vol, "series_id"]),
                                  what="chosen", reason=note))
            prior = None
            if target == "foraminal" and canal:  # anchored on the canal's levels
                prior = level_prior(geometry_of(index.loc[vol]), canal, POINTS["foraminal"])
            k, u, v, conf = locator[target].predict(reader[vol], prior=prior)
            rows = points_to_rows(index.loc[vol], target, None, k, u, v, conf)
            coords += rows
            sagittal[target] = (vol, rows)
            if target == "spinal":
                canal = _canal_points(rows, index, vol)  # each level's canal point in the patient
        if "subarticular" not in locator:
            missing(study, [c for c, _ in POINTS["subarticular"]], "no subarticular localiser in the locator")
            continue
        levels = canal or _foraminal_midpoints(*_args(sagittal["foraminal"], index))
        for level in LEVELS:
            sub = [c for c, _ in POINTS["subarticular"]]
            if level not in levels:
                missing(study, sub, "no sagittal point to place this level in the patient", [level])
                continue
            hit = nearest_axial(index, study, levels[level])
            if hit is None:
                missing(study, sub, "no Axial T2 slice reaches this level", [level])
                continue
            vol, k, _ = hit
            volume = reader[vol]  # the level's slice with its two neighbours as channels
            stack = volume[[max(k - 1, 0), k, min(k + 1, len(volume) - 1)]][None]
            _, u, v, conf = locator["subarticular"].predict(stack, axial=True)
            rows = points_to_rows(index.loc[vol], "subarticular", level, np.full(len(u), k), u, v, conf)
            coords += _side_checked(rows, index, vol)
    out = pd.DataFrame(coords, columns=COORD_COLUMNS)
    if len(out):
        order = out.assign(_c=out["condition"].map(CONDITIONS.index), _l=out["level"].map(LEVELS.index))
        out = out.loc[order.sort_values(["study_id", "_c", "_l"]).index].reset_index(drop=True)
    return out, pd.DataFrame(notes, columns=LOG_COLUMNS)


def _args(found: tuple[int | None, list[dict]], index: pd.DataFrame) -> tuple[list[dict], pd.DataFrame, int | None]:
    vol, rows = found
    return rows, index, vol
