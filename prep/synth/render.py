"""Rendering: sample the phantom on a slice's pixel grid -> stored uint16 pixels (12 bits used).

Partial volume: each pixel averages a few samples across the slice thickness (a slab, as an MR slice is). In plane the
phantom is sampled at ~0.9 mm (or at twice the output resolution for small images) and resized to the output grid, so
edges are smooth and a 640-pixel image costs no more than a 330-pixel one. Then a smooth coil bias field, a
per-series gain and Rician noise (the magnitude of a complex signal with Gaussian noise in both channels).
"""

from __future__ import annotations

import cv2
import numpy as np

from prep.synth.phantom import Phantom
from prep.synth.series import Series, Slice

SLAB_SAMPLES = (-1 / 3, 0.0, 1 / 3)  # fractions of the slice thickness
RENDER_MM = 0.9  # finest in-plane sampling of the phantom


def grid(sl: Slice, offset: float, step: float, shape: tuple[int, int]) -> np.ndarray:
    """Patient points (H*W, 3) of a render grid covering the same field of view as the slice's pixels."""
    h, w = shape
    ps_r, ps_c = sl.spacing
    # Align the render grid's outer edges with the image's outer edges (pixel centres differ when step != ps).
    corner = sl.position - 0.5 * ps_c * sl.row_dir - 0.5 * ps_r * sl.col_dir + offset * sl.normal
    u = (np.arange(w) + 0.5) * (sl.cols * ps_c / w)
    v = (np.arange(h) + 0.5) * (sl.rows * ps_r / h)
    pts = corner + u[None, :, None] * sl.row_dir + v[:, None, None] * sl.col_dir
    return pts.reshape(-1, 3).astype(np.float32)


def render(ph: Phantom, series: Series, sl: Slice, rng: np.random.Generator, difficulty: float) -> np.ndarray:
    """Stored pixel values (uint16, rows x cols) of one slice."""
    ps = min(sl.spacing)
    step = max(ps / 2, RENDER_MM)  # finer than ~1 mm adds cost, not anatomy: upsample instead
    shape = (max(8, round(sl.rows * sl.spacing[0] / step)), max(8, round(sl.cols * sl.spacing[1] / step)))
    acc = np.zeros(shape[0] * shape[1], np.float32)
    for f in SLAB_SAMPLES:
        pts = grid(sl, f * series.thickness, step, shape)
        acc += ph.intensity(pts, series.contrast)
    acc *= np.float32(series.gain / len(SLAB_SAMPLES)) * ph.shading(pts)
    img = acc.reshape(shape)
    if shape != (sl.rows, sl.cols):
        up = shape[0] < sl.rows
        img = cv2.resize(img, (sl.cols, sl.rows), interpolation=cv2.INTER_CUBIC if up else cv2.INTER_AREA)
    sigma = np.float32(12.0 + 45.0 * difficulty)
    noise = rng.standard_normal((2, sl.rows, sl.cols), dtype=np.float32) * sigma
    img = np.sqrt((np.maximum(img, 0) + noise[0]) ** 2 + noise[1] ** 2)  # Rician
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)
