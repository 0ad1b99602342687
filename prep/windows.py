"""MRI windows from the stack's own intensity percentiles, and CLAHE on each window's channel.

One set of bounds per stack (never per slice), so the S slices of a sample share one intensity mapping and a
brighter neighbour stays brighter. CLAHE runs on each channel separately: the v8 notebook equalised a grey mix of
its windows and copied it three times, so its "3-window" input was one channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from prep.config import Window


def stack_bounds(images: Sequence[np.ndarray], windows: Sequence[Window], stride: int = 1) -> tuple[np.ndarray, float]:
    """-> (bounds (len(windows), 2) float32 intensity limits, stack minimum used as the crop's padding value).

    Percentiles are taken over every ``stride``-th pixel per axis of all distinct slices of the stack together.
    """
    pixels = np.concatenate([img[::stride, ::stride].ravel() for img in images])
    qs = sorted({q for w in windows for q in (w.lo, w.hi)} | {0.0})
    values = dict(zip(qs, np.percentile(pixels, qs)))
    bounds = np.array([[values[w.lo], values[w.hi]] for w in windows], dtype=np.float32)
    if values[qs[-1]] <= values[0.0]:
        raise ValueError(f"stack has one constant intensity ({values[0.0]:g}): nothing to window")
    return bounds, float(values[0.0])


def apply_windows(crops: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """(S, H, W) float32 -> (S, C, H, W) uint8, channel c = crops linearly mapped from bounds[c] to 0..255.

    A window whose percentiles coincide (e.g. half the stack is background at exactly 0) becomes a threshold at
    that value rather than a division by zero.
    """
    s, h, w = crops.shape
    out = np.empty((s, len(bounds), h, w), dtype=np.uint8)
    tmp = np.empty_like(crops)
    for c, (lo, hi) in enumerate(bounds):
        scale = np.float32(255.0 / max(float(hi - lo), 1e-6))
        np.subtract(crops, lo, out=tmp)
        tmp *= scale
        np.clip(tmp, 0.0, 255.0, out=tmp)
        np.rint(tmp, out=tmp)
        out[:, c] = tmp  # the float -> uint8 cast happens in this one assignment
    return out


def clahe_channels(stack: np.ndarray, clip: float, tiles: int) -> np.ndarray:
    """CLAHE every (slice, channel) image of an (S, C, H, W) uint8 stack in place; clip 0 disables it."""
    if clip <= 0:
        return stack
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles))
    for s in range(stack.shape[0]):
        for c in range(stack.shape[1]):
            stack[s, c] = clahe.apply(stack[s, c])
    return stack
