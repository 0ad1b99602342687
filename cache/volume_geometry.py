"""Where a voxel of a series volume lies: volume (slice k, u, v) <-> source (instance, x, y) <-> patient (mm).

A volume is one sub-stack of a series (slices of one orientation), its slices ordered along a canonical normal and
each resampled onto one G x G grid: first onto the reference slice's pixel grid (an orthogonal projection, as
prep.geometry does for a crop's neighbours), then scaled by the same factor in mm on both axes (aspect kept),
centred and padded, and flipped where needed so every volume shows the patient the same way round:

    slices  ordered along +x (to the patient's left) for sagittal stacks, +z (superior) for axial, +y for coronal
    u       increases towards +y (posterior) on sagittal, +x (patient left) on axial images: the radiological view
    v       increases towards -z (inferior) on sagittal, +y (posterior) on axial images

So a model never sees a mirrored patient, and "left" is the same image side in every axial volume; the flips are
part of the stored affine, so points map back exactly. Numpy only: prep builds with it, train and notebooks read.

Conventions: (x, y) = (column, row) in pixels, pixel centres at integers, as in the competition's coordinates;
PixelSpacing = (between rows, between columns) mm; positions are DICOM patient coordinates (LPS, mm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The canonical direction of each patient axis (x: left, y: posterior, z: superior) on screen: +x, +y and -z, the
# way radiologists view sagittal and axial images. A slice axis is flipped when it points the other way.
CANONICAL_SIGN = np.array([1.0, 1.0, -1.0])


def canonical_sign(direction: np.ndarray) -> float:
    """+1 when a direction already points the canonical way along its dominant patient axis, else -1."""
    d = np.asarray(direction, dtype=np.float64)
    axis = int(np.argmax(np.abs(d)))
    return float(np.sign(d[axis]) * CANONICAL_SIGN[axis]) or 1.0


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """The unit normal of a slice, pointed along +x, +y or +z (whichever it is closest to): the volume's order."""
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    n /= np.linalg.norm(n)
    return n if n[int(np.argmax(np.abs(n)))] > 0 else -n


def plane_affine(src_position, src_orientation, src_spacing, dst_position, dst_orientation, dst_spacing
                 ) -> np.ndarray:
    """2x3 affine taking a pixel (x, y) of the destination slice to the pixel of the source slice seen at the same
    in-plane place (an orthogonal projection through patient space):
    P = IPP_dst + x dx_dst row_dst + y dy_dst col_dst, then x' = (P - IPP_src).row_src / dx_src, y' likewise."""
    rs, cs = np.asarray(src_orientation[:3], float), np.asarray(src_orientation[3:], float)
    rd, cd = np.asarray(dst_orientation[:3], float), np.asarray(dst_orientation[3:], float)
    (dy_d, dx_d), (dy_s, dx_s) = dst_spacing, src_spacing
    d = np.asarray(dst_position, float) - np.asarray(src_position, float)
    return np.array([
        [dx_d * rd @ rs / dx_s, dy_d * cd @ rs / dx_s, d @ rs / dx_s],
        [dx_d * rd @ cs / dy_s, dy_d * cd @ cs / dy_s, d @ cs / dy_s],
    ])


@dataclass(frozen=True)
class GridMap:
    """Reference-slice pixels (x, y) -> volume grid (u, v): u = scale_x x + offset_x, v = scale_y y + offset_y.
    A negative scale is a flip."""

    scale_x: float
    offset_x: float
    scale_y: float
    offset_y: float

    @classmethod
    def fit(cls, rows: int, cols: int, spacing: tuple[float, float], grid: int, flip_x: bool = False,
            flip_y: bool = False) -> GridMap:
        """The whole slice inside the grid at one mm scale on both axes, within half a cell of centred.

        The map is exactly the one of an area resize by (scale_x, scale_y) (pixel centres: u = s (x + 0.5) - 0.5)
        pasted at a whole-cell offset (`pads`), so prep can resample with cv2.resize and a copy."""
        dy, dx = spacing
        mm_per_cell = max(cols * dx, rows * dy) / grid
        sx, sy = dx / mm_per_cell, dy / mm_per_cell
        px, py = cls.pads(rows, cols, sx, sy, grid)
        ox, oy = 0.5 * sx - 0.5 + px, 0.5 * sy - 0.5 + py
        if flip_x:  # u -> (grid - 1) - u
            sx, ox = -sx, grid - 1 - ox
        if flip_y:
            sy, oy = -sy, grid - 1 - oy
        return cls(sx, ox, sy, oy)

    @staticmethod
    def resized(rows: int, cols: int, sx: float, sy: float) -> tuple[int, int]:
        """(height, width) of a slice resized by (sx, sy): what cv2.resize(fx=sx, fy=sy) makes of it."""
        return max(1, int(round(rows * abs(sy)))), max(1, int(round(cols * abs(sx))))

    @classmethod
    def pads(cls, rows: int, cols: int, sx: float, sy: float, grid: int) -> tuple[int, int]:
        """Whole cells left of and above the resized slice in the grid."""
        h, w = cls.resized(rows, cols, sx, sy)
        return (grid - w) // 2, (grid - h) // 2

    @property
    def matrix(self) -> np.ndarray:
        """The 2x3 affine (x, y, 1) -> (u, v), e.g. for cv2.warpAffine."""
        return np.array([[self.scale_x, 0.0, self.offset_x], [0.0, self.scale_y, self.offset_y]])

    def to_grid(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        return self.scale_x * np.asarray(x, float) + self.offset_x, self.scale_y * np.asarray(y, float) + self.offset_y

    def to_pixel(self, u, v) -> tuple[np.ndarray, np.ndarray]:
        u, v = np.asarray(u, float), np.asarray(v, float)
        return (u - self.offset_x) / self.scale_x, (v - self.offset_y) / self.scale_y


@dataclass(frozen=True)
class VolumeGeometry:
    """Everything needed to map a volume's voxels back to the source DICOMs and to the patient.

    Per slice k (volume order): its instance number, ImagePositionPatient, ImageOrientationPatient and PixelSpacing.
    `ref` is the reference slice whose pixel grid every slice was resampled onto; `grid` maps its pixels to (u, v).
    """

    instance_numbers: np.ndarray  # (D,) int
    positions: np.ndarray  # (D, 3) ImagePositionPatient
    orientations: np.ndarray  # (D, 6) ImageOrientationPatient
    spacings: np.ndarray  # (D, 2) PixelSpacing (rows, columns)
    ref: int
    grid: GridMap
    size: int  # G

    @property
    def normal(self) -> np.ndarray:
        return slice_normal(self.orientations[self.ref])

    @property
    def depths(self) -> np.ndarray:
        """Each slice's position along the volume's normal (mm), ascending."""
        return self.positions @ self.normal

    def _affine(self, k: int) -> np.ndarray:
        """Reference pixel -> slice k's own pixel (identity when slice k shares the reference's grid in-plane)."""
        return plane_affine(self.positions[k], self.orientations[k], self.spacings[k], self.positions[self.ref],
                            self.orientations[self.ref], self.spacings[self.ref])

    def slice_of(self, instance_number: int) -> int:
        hits = np.flatnonzero(self.instance_numbers == int(instance_number))
        if not len(hits):
            raise KeyError(f"instance {instance_number} is not in this volume ({self.instance_numbers.tolist()})")
        return int(hits[0])

    # --- volume <-> source pixels ---
    def to_source(self, k: int, u, v) -> tuple[int, np.ndarray, np.ndarray]:
        """(k, u, v) -> (instance number, x, y) on that slice's own pixels."""
        xr, yr = self.grid.to_pixel(u, v)
        a = self._affine(k)
        return int(self.instance_numbers[k]), a[0, 0] * xr + a[0, 1] * yr + a[0, 2], a[1, 0] * xr + a[1, 1] * yr + a[
            1, 2]

    def to_volume(self, instance_number: int, x, y) -> tuple[int, np.ndarray, np.ndarray]:
        """(instance, x, y) on its own pixels -> (k, u, v)."""
        k = self.slice_of(instance_number)
        a = self._affine(k)
        inv = np.linalg.inv(np.vstack([a, [0.0, 0.0, 1.0]]))
        x, y = np.asarray(x, float), np.asarray(y, float)
        xr, yr = inv[0, 0] * x + inv[0, 1] * y + inv[0, 2], inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]
        u, v = self.grid.to_grid(xr, yr)
        return k, u, v

    # --- patient space ---
    def patient(self, k: int, u, v) -> np.ndarray:
        """(k, u, v) -> patient points (N, 3), on slice k's plane."""
        _, x, y = self.to_source(k, u, v)
        o, (dy, dx) = self.orientations[k], self.spacings[k]
        x, y = np.atleast_1d(x), np.atleast_1d(y)
        return self.positions[k] + np.outer(x * dx, o[:3]) + np.outer(y * dy, o[3:])

    def nearest(self, point) -> tuple[int, float, float, float]:
        """The slice whose plane is nearest a patient point -> (k, signed distance mm, u, v of its projection)."""
        p = np.asarray(point, float)
        k = int(np.argmin(np.abs(self.depths - p @ self.normal)))
        o, (dy, dx) = self.orientations[k], self.spacings[k]
        d = p - self.positions[k]
        x, y = d @ o[:3] / dx, d @ o[3:] / dy
        _, u, v = self.to_volume(int(self.instance_numbers[k]), x, y)
        return k, float(d @ np.cross(o[:3], o[3:])), float(u), float(v)

    def mm_per_cell(self) -> float:
        """Millimetres per grid cell (the same on both axes)."""
        return float(self.spacings[self.ref][1] / abs(self.grid.scale_x))
