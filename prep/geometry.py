"""Slice geometry: spatial order, orientation sub-stacks, the S-slice stack around a labelled slice, and the affine
that maps a neighbour's pixels onto the labelled slice's pixel grid.

Instance numbers are not positions (v8 bug 3): slices are ordered by ImagePositionPatient projected on the slice
normal, and instance order is only a recorded fallback when the tags are missing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from prep.dicom import SliceHeader

# Two slices belong to one sub-stack when their row and column directions agree within ~1 degree.
ORIENTATION_TOLERANCE = float(np.cos(np.deg2rad(1.0)))
# A neighbour whose grid is off the labelled one by less than this (pixels) is used as is, without resampling.
GRID_TOLERANCE_PX = 0.05
# Parallel blocks of one tilt (e.g. an L3/L4 and an L5/S1 block) are apart by more than this many times the median
# slice spacing; a single missing slice (2x) keeps its block whole.
GAP_FACTOR = 2.5
# Slices closer than this (mm) repeat one position (a re-acquisition); MR slices are at least ~1 mm thick.
DUPLICATE_MM = 0.5


@dataclass(frozen=True)
class Stack:
    """S slices around a labelled one: indices into the ordered sub-stack, in spatial order."""

    slices: tuple[SliceHeader, ...]
    offsets_mm: tuple[float, ...]  # along the stack normal, relative to the labelled slice (NaN when unknown)
    replicated: tuple[bool, ...]  # slice copied from the edge because the sub-stack ended
    ordering: str  # 'position' or 'instance_number'

    @property
    def centre(self) -> SliceHeader:
        return self.slices[len(self.slices) // 2]


def placed(h: SliceHeader) -> bool:
    """Whether a slice carries the tags that place its pixels in the patient (pixel_to_pixel needs all three)."""
    return h.orientation is not None and h.position is not None and h.spacing is not None


def misfits(headers: list[SliceHeader]) -> dict[str, str]:
    """Slices no neighbour can be mapped onto, or from: path -> why.

    A slice of another size than most of its series cannot be resampled onto their grid when geometry tags are
    missing (on it, or on the slices of the common size). Such a slice is the bad file, not the samples around it:
    it is dropped from the series like an undecodable neighbour, and only a sample labelled on it fails. Slices of
    one size, or with full geometry, all fit (pixel_to_pixel never refuses them).
    """
    shapes = Counter(h.shape for h in headers)
    if len(shapes) < 2 or all(placed(h) for h in headers):
        return {}
    first = {s: min(h.instance_number for h in headers if h.shape == s) for s in shapes}
    common = max(shapes, key=lambda s: (shapes[s], -first[s]))  # most slices; a tie goes to the lowest instance
    common_unplaced = any(not placed(h) for h in headers if h.shape == common)
    return {h.path: f"{h.cols}x{h.rows} slice among {common[1]}x{common[0]} ones, and geometry tags are missing to "
                    "map one onto the other"
            for h in headers if h.shape != common and (common_unplaced or not placed(h))}


def normal(h: SliceHeader) -> np.ndarray:
    o = np.asarray(h.orientation, dtype=np.float64)
    return np.cross(o[:3], o[3:])


def _same_orientation(a: SliceHeader, b: SliceHeader) -> bool:
    oa, ob = np.asarray(a.orientation), np.asarray(b.orientation)
    return bool(np.dot(oa[:3], ob[:3]) > ORIENTATION_TOLERANCE and np.dot(oa[3:], ob[3:]) > ORIENTATION_TOLERANCE)


def sub_stacks(headers: list[SliceHeader]) -> list[list[SliceHeader]]:
    """Split a series into groups of one orientation (axial series often hold several angled blocks).

    When any slice lacks IPP/IOP the series stays one group: it can only be ordered by instance number.
    """
    if any(h.orientation is None or h.position is None for h in headers):
        return [list(headers)]
    groups: list[list[SliceHeader]] = []
    for h in sorted(headers, key=lambda h: h.instance_number):
        for g in groups:
            if _same_orientation(g[0], h):
                g.append(h)
                break
        else:
            groups.append([h])
    return groups


def order_slices(group: list[SliceHeader]) -> tuple[list[SliceHeader], list[float], str]:
    """Spatial order of one sub-stack -> (slices, positions along the normal in mm, ordering used).

    Position = IPP . normal of the group's first slice; ties (repeated positions) fall back to instance number so
    the order is deterministic. Without IPP/IOP on every slice the instance number is all there is: positions are
    NaN and ordering says so.
    """
    if any(h.orientation is None or h.position is None for h in group):
        ordered = sorted(group, key=lambda h: h.instance_number)
        return ordered, [float("nan")] * len(ordered), "instance_number"
    n = normal(group[0])
    pos = {id(h): float(np.dot(np.asarray(h.position), n)) for h in group}
    ordered = sorted(group, key=lambda h: (pos[id(h)], h.instance_number))
    return ordered, [pos[id(h)] for h in ordered], "position"


def block_of(positions: list[float], k: int) -> tuple[int, int]:
    """The contiguous block [start, stop) of ordered slice ``k``: split where two neighbours are more than
    GAP_FACTOR x the median spacing apart, so a parallel block across a gap never lends its slices as neighbours."""
    gaps = np.diff(np.asarray(positions, dtype=np.float64))
    steps = gaps[gaps > DUPLICATE_MM]  # repeated slices are not a spacing
    if len(steps) < 2 or not np.isfinite(steps).all():
        return 0, len(positions)
    breaks = np.flatnonzero(gaps > GAP_FACTOR * float(np.median(steps))) + 1  # first slice of each later block
    start = int(breaks[breaks <= k].max()) if (breaks <= k).any() else 0
    stop = int(breaks[breaks > k].min()) if (breaks > k).any() else len(positions)
    return start, stop


def stack_around(headers: list[SliceHeader], instance_number: int, slices: int) -> Stack:
    """The S slices centred on ``instance_number`` in spatial order, replicating the edge slice where its block
    ends (the sub-stack's end, or a gap before a parallel block). Raises KeyError when the instance is not in the
    series."""
    labelled = [h for h in headers if h.instance_number == instance_number]
    if not labelled:
        raise KeyError(f"instance {instance_number} not in series")
    group = next(g for g in sub_stacks(headers) if labelled[0] in g)
    ordered, positions, ordering = order_slices(group)
    k = ordered.index(labelled[0])
    if ordering == "position":
        start, stop = block_of(positions, k)
        ordered, positions, k = ordered[start:stop], positions[start:stop], k - start
    half = slices // 2
    idx = [k + d for d in range(-half, half + 1)]
    clipped = [min(max(i, 0), len(ordered) - 1) for i in idx]
    return Stack(
        slices=tuple(ordered[i] for i in clipped),
        offsets_mm=tuple(positions[i] - positions[k] for i in clipped),
        replicated=tuple(i != j for i, j in zip(idx, clipped)),
        ordering=ordering,
    )


def pixel_to_pixel(src: SliceHeader, dst: SliceHeader) -> np.ndarray | None:
    """2x3 affine taking a pixel (x, y) of ``dst`` (the labelled grid) to the pixel of ``src`` seen at the same
    in-plane place, or None when ``src`` already shares ``dst``'s grid.

    Through patient space: P = IPP_dst + x*dx*row_dst + y*dy*col_dst, then x' = (P - IPP_src).row_src / dx_src and
    y' = (P - IPP_src).col_src / dy_src. This handles a neighbour of another size, spacing or in-plane origin (and a
    small tilt, as an orthogonal projection). Used with cv2.warpAffine(WARP_INVERSE_MAP), it resamples the neighbour
    onto the labelled slice's pixels. Without geometry tags, slices of one shape are assumed to share a grid; a
    neighbour of another shape then cannot be placed and raises ValueError.
    """
    if src.orientation is None or src.position is None or dst.orientation is None or dst.position is None \
            or src.spacing is None or dst.spacing is None:
        if src.shape == dst.shape:
            return None
        raise ValueError(f"neighbour instance {src.instance_number} is {src.cols}x{src.rows}, the labelled slice "
                         f"{dst.cols}x{dst.rows}, and geometry tags are missing to map one onto the other")
    rs, cs = np.asarray(src.orientation[:3]), np.asarray(src.orientation[3:])
    rd, cd = np.asarray(dst.orientation[:3]), np.asarray(dst.orientation[3:])
    (dy_d, dx_d), (dy_s, dx_s) = dst.spacing, src.spacing
    d = np.asarray(dst.position) - np.asarray(src.position)
    m = np.array([
        [dx_d * rd @ rs / dx_s, dy_d * cd @ rs / dx_s, d @ rs / dx_s],
        [dx_d * rd @ cs / dy_s, dy_d * cd @ cs / dy_s, d @ cs / dy_s],
    ])
    # Same grid: the identity within a small fraction of a pixel over the whole image -> no resampling blur.
    corner = np.array([dst.cols, dst.rows, 1.0])
    err = np.abs(m - np.array([[1.0, 0, 0], [0, 1.0, 0]])) @ corner
    if src.shape == dst.shape and float(err.max()) < GRID_TOLERANCE_PX:
        return None
    return m
