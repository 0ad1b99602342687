"""Slice planning: where each series' slices lie in patient space, how big they are, and how they are numbered.

A slice is a plane: ImagePositionPatient (centre of the first pixel), the row direction (along which the column
index grows), the column direction (along which the row index grows) and PixelSpacing (between rows, between
columns). Field of view is physical (~250-350 mm sagittal, ~150-220 mm axial), so pixel spacing follows the size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cache.rsna import LEVELS
from prep.synth.phantom import FIRST_LEVEL, Phantom


@dataclass
class Slice:
    position: np.ndarray  # ImagePositionPatient (3,)
    row_dir: np.ndarray  # ImageOrientationPatient[:3]
    col_dir: np.ndarray  # ImageOrientationPatient[3:]
    rows: int
    cols: int
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    instance_number: int = 0
    stack: int = 0  # sub-stack index within the series (different orientation)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    @property
    def orientation(self) -> list[float]:
        return [*map(float, self.row_dir), *map(float, self.col_dir)]

    def to_patient(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Pixel (column x, row y) -> patient points (N, 3)."""
        x, y = np.atleast_1d(x).astype(float), np.atleast_1d(y).astype(float)
        return self.position + np.outer(x * self.spacing[1], self.row_dir) + np.outer(y * self.spacing[0], self.col_dir)

    def to_pixel(self, p: np.ndarray) -> tuple[float, float, float]:
        """Patient point (3,) -> (column x, row y, signed distance from the plane in mm)."""
        d = np.asarray(p, float) - self.position
        return (float(d @ self.row_dir / self.spacing[1]), float(d @ self.col_dir / self.spacing[0]),
                float(d @ self.normal))

    def contains(self, x: float, y: float) -> bool:
        return 0 <= x <= self.cols - 1 and 0 <= y <= self.rows - 1


@dataclass
class Series:
    series_id: int
    description: str  # one of cache.rsna.SERIES_DESCRIPTIONS
    contrast: str  # key of phantom.CONTRASTS
    thickness: float
    spacing: float  # between slice centres
    slices: list[Slice] = field(default_factory=list)
    gain: float = 1.0  # scanner scaling of this series

    def nearest(self, p: np.ndarray) -> tuple[Slice, float, float, float]:
        """The slice whose plane is nearest to p, with p's pixel coordinates on it and the distance."""
        best = min(self.slices, key=lambda sl: abs(sl.to_pixel(p)[2]))
        x, y, d = best.to_pixel(p)
        return best, x, y, d


def rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: rotation matrix about a unit axis."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def image_size(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    """(rows, cols): mostly square, multiples of 32 as scanners use, sometimes a little narrower."""
    steps = [n for n in range(32 * -(-lo // 32), hi + 1, 32)] or [lo]
    rows = int(rng.choice(steps))
    cols = rows if rng.random() < 0.8 else max(lo, int(round(rows * 0.8 / 16)) * 16)
    return rows, cols


def stack(centre: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, n: int, spacing: float, size: tuple[int, int],
          fov: float, index: int = 0) -> list[Slice]:
    """n parallel slices centred on ``centre``, ``spacing`` apart along the normal, with a square physical FOV."""
    rows, cols = size
    ps = fov / max(rows, cols)
    normal = np.cross(row_dir, col_dir)
    out = []
    for i in range(n):
        c = centre + (i - (n - 1) / 2) * spacing * normal
        pos = c - (cols - 1) / 2 * ps * row_dir - (rows - 1) / 2 * ps * col_dir
        out.append(Slice(pos, row_dir.copy(), col_dir.copy(), rows, cols, (ps, ps), stack=index))
    return out


def sagittal(ph: Phantom, rng: np.random.Generator, series_id: int, description: str, contrast: str,
             size: tuple[int, int]) -> Series:
    """15-20 parasagittal slices across the canal and both foramina, slightly oblique like a real prescription."""
    n = int(rng.integers(15, 21))
    spacing = float(rng.uniform(3.3, 4.5))
    thickness = float(min(spacing, rng.uniform(3.0, 4.0)))
    rot = rotation([0, 0, 1], rng.normal(0, 0.03)) @ rotation([0, 1, 0], rng.normal(0, 0.03))
    row_dir, col_dir = rot @ np.array([0.0, 1.0, 0.0]), rot @ np.array([0.0, 0.0, -1.0])
    mid = ph.from_spine(ph.disc_s[FIRST_LEVEL + 2], float(ph.canal_b(FIRST_LEVEL + 2)), 0.0)
    centre = mid + rng.normal(0, 8, 3) * (0.3, 1.0, 1.0) - (0, 25.0, 0)  # FOV centred a little in front of the canal
    fov = float(rng.uniform(250.0, 350.0))
    s = Series(series_id, description, contrast, thickness, spacing,
               stack(centre, row_dir, col_dir, n, spacing, size, fov), gain=float(rng.uniform(0.8, 1.25)))
    return s


def axial(ph: Phantom, rng: np.random.Generator, series_id: int, levels: list[str], style: str,
          size: tuple[int, int]) -> Series:
    """Axial T2 slices through the given discs, perpendicular to the spine there.

    style 'block': one contiguous stack; 'two': two contiguous stacks of different tilt (upper / lower discs);
    'per_level': one short stack parallel to each disc (five orientations, like a real disc-by-disc prescription).
    """
    ks = [FIRST_LEVEL + LEVELS.index(lv) for lv in levels]
    spacing = float(rng.uniform(3.5, 4.8))
    thickness = float(min(spacing, rng.uniform(3.0, 4.0)))
    fov = float(rng.uniform(150.0, 220.0))
    groups = {"block": [ks], "two": [ks[: (len(ks) + 1) // 2], ks[(len(ks) + 1) // 2:]],
              "per_level": [[k] for k in ks]}[style]
    slices: list[Slice] = []
    for index, g in enumerate(x for x in groups if x):
        s_top, s_bot = ph.disc_s[g[0]], ph.disc_s[g[-1]]
        s_mid = (s_top + s_bot) / 2
        margin = 6.0 if style == "per_level" else 12.0
        n = max(int(np.ceil((s_bot - s_top + 2 * margin) / spacing)) + 1, 5)
        t = ph.tangent(s_mid)
        row_dir = rotation(t, rng.normal(0, 0.03)) @ np.array([1.0, 0.0, 0.0])
        col_dir = np.cross(-t, row_dir)  # normal = row x col = -t (superior), as in a standard axial
        centre = ph.from_spine(s_mid, 10.0 + rng.normal(0, 5), rng.normal(0, 6))
        # Step along the stack normal from the disc-centre midpoint; a normal of -t means index 0 is inferior.
        slices += stack(centre, row_dir, col_dir, n, spacing, size, fov, index)
    return Series(series_id, "Axial T2", "T2", thickness, spacing, slices, gain=float(rng.uniform(0.8, 1.25)))


def number(series: Series, rng: np.random.Generator, mode: str | None = None) -> str:
    """Give slices instance numbers: a random start (not always 1) and an order that is not always spatial."""
    n = len(series.slices)
    mode = mode or str(rng.choice(["ascending", "descending", "interleaved"], p=[0.6, 0.25, 0.15]))
    start = 1 if rng.random() < 0.7 else int(rng.integers(2, 60))
    order = list(range(n))  # slices are kept in acquisition order: sub-stack by sub-stack, along each normal
    if mode == "descending":
        order = order[::-1]
    elif mode == "interleaved":  # odd positions first, then even: a common 2-pass acquisition
        order = order[::2] + order[1::2]
    for rank, i in enumerate(order):
        series.slices[i].instance_number = start + rank
    return mode
