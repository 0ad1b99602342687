"""Tiny DICOM writers for the prep tests: MR slices with chosen geometry, instance numbers and pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows run anterior->posterior, columns head->feet; normal = +x
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_slice(path: Path, pixels: np.ndarray, *, instance: int, position: tuple | None = (0.0, 0.0, 0.0),
                orientation: tuple | None = SAGITTAL, spacing: tuple | None = (1.0, 1.0), slope: float = 1.0,
                intercept: float = 0.0, monochrome1: bool = False, series_uid: str = "1.2.3",
                description: str = "Sagittal T2/STIR") -> Path:
    """Write one uint16 MR slice (stored values = pixels) with the given tags; None leaves a tag out."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = "MR", series_uid, description
    ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    if spacing is not None:
        ds.PixelSpacing = [float(v) for v in spacing]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(series_dir: Path, images: list[np.ndarray], instances: list[int], *, gap_mm: float = 4.0,
                 orientation: tuple = SAGITTAL, spacing: tuple = (1.0, 1.0), origin=(0.0, 0.0, 0.0),
                 **kw) -> list[Path]:
    """Slice k sits at origin + k * gap along the orientation's normal and is written as instances[k].dcm."""
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    return [write_slice(series_dir / f"{inst}.dcm", img, instance=inst, orientation=orientation, spacing=spacing,
                        position=tuple(np.asarray(origin) + k * gap_mm * normal), **kw)
            for k, (img, inst) in enumerate(zip(images, instances))]


def phantom(size: int = 64, seed: int = 0, value: int | None = None) -> np.ndarray:
    """A smooth MR-like slice: background ~0, a bright blob and tissue of mid intensity, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    img = 300 + 900 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.45) ** 2) / 0.02) + 400 * (xx > 0.3) * (xx < 0.7)
    img[: size // 8] = 0  # a band of background air
    img = img + rng.normal(0, 20, img.shape)
    if value is not None:
        img = img * 0 + value
    return np.clip(img, 0, 4095).astype(np.uint16)


def read_instance(path: Path) -> int:
    return int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber)


def write_dataset(root: Path, studies: int = 2, slices: int = 9, size: int = 64) -> Path:
    """A tiny competition-layout dataset: per study one Sagittal T2/STIR series with spinal coordinates."""
    from cache.rsna import LABEL_COLUMNS, LEVELS, label_column

    labels, series, coords = [], [], []
    for s in range(studies):
        study, ser = 1000 + s, 5000 + s
        instances = [int(i) for i in np.random.default_rng(s).permutation(slices) + 1 + 10 * s]
        write_series(root / "train_images" / str(study) / str(ser), [phantom(size, seed=10 * s + k)
                                                                        for k in range(slices)], instances,
                     spacing=(0.9, 0.9))
        cells = {c: "" for c in LABEL_COLUMNS}
        for k, level in enumerate(LEVELS):
            cells[label_column("Spinal Canal Stenosis", level)] = ("Normal/Mild", "Moderate", "Severe")[k % 3]
            coords.append(f"{study},{ser},{instances[slices // 2 + k % 3 - 1]},Spinal Canal Stenosis,{level},"
                          f"{20 + 5 * k},{15 + 7 * k}")
        labels.append({"study_id": study, **cells})
        series.append(f"{study},{ser},Sagittal T2/STIR")
    import pandas as pd

    pd.DataFrame(labels, columns=["study_id", *LABEL_COLUMNS]).to_csv(root / "train.csv", index=False)
    (root / "train_series_descriptions.csv").write_text("study_id,series_id,series_description\n"
                                                        + "\n".join(series) + "\n")
    (root / "train_label_coordinates.csv").write_text("study_id,series_id,instance_number,condition,level,x,y\n"
                                                      + "\n".join(coords) + "\n")
    return root
