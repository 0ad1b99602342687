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


HIST_BINS = 4096  # percentile resolution: 1/4096 of the stack's range, ~0.06 of the 255 grey levels of a window


def stack_bounds(images: Sequence[np.ndarray], windows: Sequence[Window], stride: int = 1) -> tuple[np.ndarray, float]:
    """-> (bounds (len(windows), 2) float32 intensity limits, stack minimum used as the crop's padding value).

    Percentiles of all distinct slices of the stack together (every ``stride``-th row), read off one histogram of
    HIST_BINS bins between the stack's exact minimum and maximum: linear interpolation inside a bin puts each bound
    within 1/4096 of the range of the sampled rows' percentile, and OpenCV's histogram costs a third of numpy's
    partial sort. Percentiles 0 and 100 are the exact minimum and maximum of every pixel.
    """
    images = [np.ascontiguousarray(img, dtype=np.float32) for img in images]
    lo = float(min(cv2.minMaxLoc(img)[0] for img in images))  # over every pixel: a lone extreme is never missed
    hi = float(max(cv2.minMaxLoc(img)[1] for img in images))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("stack holds non-finite intensities (NaN or inf): nothing to window")
    if hi <= lo:
        raise ValueError(f"stack has one constant intensity ({lo:g}): nothing to window")
    # OpenCV's upper range limit is exclusive and held as float32: the maximum must land in the last bin.
    top = float(np.nextafter(np.float32(hi + (hi - lo) * 1e-6), np.float32(np.inf)))
    hist = None
    for img in images:
        hist = cv2.calcHist([img[::stride]], [0], None, [HIST_BINS], [lo, top], hist=hist,  # a row stride is a view
                            accumulate=hist is not None)
    cdf = np.concatenate([[0.0], np.cumsum(hist.ravel(), dtype=np.float64)])
    sampled = sum(img[::stride].size for img in images)
    if cdf[-1] != sampled:  # every pixel lies in [lo, top); a miss would make every bound wrong, never silently
        raise ValueError(f"window histogram lost {sampled - int(cdf[-1])} of {sampled} pixels")
    cdf /= cdf[-1]
    edges = np.linspace(lo, top, HIST_BINS + 1)

    def percentile(q: float) -> float:
        if q <= 0.0:
            return lo
        if q >= 100.0:
            return hi
        return float(min(np.interp(q / 100.0, cdf, edges), hi))  # cdf is flat over empty bins: interp takes the left

    bounds = np.array([[percentile(w.lo), percentile(w.hi)] for w in windows], dtype=np.float32)
    return bounds, lo


def apply_windows(crops: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """(S, H, W) float32 -> (S, C, H, W) uint8, channel c = crops linearly mapped from bounds[c] to 0..255.

    One OpenCV pass per window (scale, shift, round, saturate to 0..255). A window whose percentiles coincide (e.g.
    half the stack is background at exactly 0) becomes a threshold at that value rather than a division by zero.
    """
    s, h, w = crops.shape
    flat = np.ascontiguousarray(crops, dtype=np.float32).reshape(s * h, w)
    out = np.empty((s, len(bounds), h, w), dtype=np.uint8)
    for c, (lo, hi) in enumerate(bounds):
        scale = 255.0 / max(float(hi - lo), 1e-6)
        out[:, c] = cv2.addWeighted(flat, scale, flat, 0.0, -float(lo) * scale, dtype=cv2.CV_8U).reshape(s, h, w)
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
