"""A stand-in for the v8 notebook's Dataset, kept ONLY as the baseline of `lsdc bench`. Never train on it.

It reproduces what the notebook did on every sample of every epoch (README: What v8 got wrong), bugs included,
because the benchmark's question is "how much faster is reading the cache than doing this every epoch":

- the 7 files instance_number - 3 .. + 3 are decoded with pydicom (instance numbers taken as positions, bug 3);
- raw stored values, no RescaleSlope/Intercept, no MONOCHROME1 handling, CT windows soft 50/350 and bone 400/2000
  plus the file's own WindowCenter/WindowWidth (else min-max) (bug 2);
- a grey mix of the three windows is CLAHE'd (clip 2, 8x8) and copied to 3 channels (bug 1);
- a 192 px half-size box around (x, y), clipped at the border and stretched to 256 x 256 (bug 4);
- any exception while reading a file gives a black slice (bug 6).

Its output is uint8 (7, 3, 256, 256), like a cache sample; the notebook also normalised to float32 on the CPU,
which is left out so the baseline is, if anything, faster than the original.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

V8_SLICES = 7
V8_HALF_SIZE_PX = 192  # 0.75 x 256
V8_SIZE = 256
V8_CT_WINDOWS = ((50.0, 350.0), (400.0, 2000.0))  # (centre, width) in Hounsfield units, applied to MRI
V8_CLAHE = (2.0, 8)


def _window(img: np.ndarray, centre: float, width: float) -> np.ndarray:
    lo, hi = centre - width / 2, centre + width / 2
    return np.clip((img - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)


def _first(value: object) -> float:
    """WindowCenter/WindowWidth may be multi-valued: v8 took the first."""
    try:
        return float(value[0])  # type: ignore[index]
    except TypeError:
        return float(value)  # type: ignore[arg-type]


def v8_slice(path: Path, x: float, y: float) -> np.ndarray:
    """One file -> (3, 256, 256) uint8 as the notebook made it; a black slice on ANY failure (its bug 6)."""
    import cv2
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        img = ds.pixel_array.astype(np.float32)  # stored values: no rescale, no MONOCHROME1 (bug 2)
        channels = [_window(img, c, w) for c, w in V8_CT_WINDOWS]
        if "WindowCenter" in ds and "WindowWidth" in ds:
            channels.append(_window(img, _first(ds.WindowCenter), _first(ds.WindowWidth)))
        else:
            channels.append(_window(img, (img.max() + img.min()) / 2, img.max() - img.min()))
        grey = np.mean(channels, axis=0).astype(np.uint8)
        grey = cv2.createCLAHE(clipLimit=V8_CLAHE[0], tileGridSize=(V8_CLAHE[1], V8_CLAHE[1])).apply(grey)  # bug 1
        h, w = grey.shape
        x0, x1 = max(0, int(x) - V8_HALF_SIZE_PX), min(w, int(x) + V8_HALF_SIZE_PX)  # clipped ... (bug 4)
        y0, y1 = max(0, int(y) - V8_HALF_SIZE_PX), min(h, int(y) + V8_HALF_SIZE_PX)
        crop = cv2.resize(grey[y0:y1, x0:x1], (V8_SIZE, V8_SIZE))  # ... and stretched to a square
        return np.repeat(crop[None], 3, axis=0)
    except Exception:  # noqa: BLE001 - deliberately the notebook's behaviour, which this module exists to measure
        return np.zeros((3, V8_SIZE, V8_SIZE), np.uint8)


class V8Dataset:
    """The notebook's per-epoch work over samples given as rows with study_id, series_id, instance_number, x, y.

    Works as a torch Dataset (DataLoader collates its numpy arrays) without importing torch itself.
    """

    def __init__(self, data_dir: str | Path, samples, split: str = "train"):
        cols = ["study_id", "series_id", "instance_number", "x", "y"]
        self.images_dir = Path(data_dir) / f"{split}_images"
        self.rows = samples[cols].to_numpy(dtype=np.float64)
        self.label = samples["label"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64) \
            if "label" in samples else np.full(len(samples), -1, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        study, series, instance, x, y = self.rows[i]
        series_dir = self.images_dir / str(int(study)) / str(int(series))
        k = V8_SLICES // 2
        image = np.stack([v8_slice(series_dir / f"{int(instance) + d}.dcm", x, y) for d in range(-k, k + 1)])
        return {"image": image, "label": np.int64(self.label[i])}
