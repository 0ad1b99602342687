"""Valid DICOM Part-10 MR files: file meta, MR Image Storage, UIDs derived from the seed, no timestamps."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from prep.synth.series import Series, Slice

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.1"  # under pydicom's root, fixed so files do not change by version
SEQUENCE = {"T1": ("SE", 550.0, 10.0), "T2": ("SE", 3500.0, 100.0), "STIR": ("IR", 4000.0, 40.0)}  # (seq, TR, TE)


def uid(seed: int, *parts: object) -> str:
    """A UID that is a pure function of the seed and the object it names: same arguments, same files."""
    return generate_uid(entropy_srcs=["lsdc-synth", str(seed), *map(str, parts)])


def window(pixels: np.ndarray) -> tuple[float, float]:
    """WindowCenter/Width a scanner would store: the 1st-99th percentile range of the image."""
    lo, hi = np.percentile(pixels[::4, ::4], [1, 99])
    return float(round((lo + hi) / 2)), float(max(round(hi - lo), 1))


def dataset(seed: int, study_id: int, series: Series, series_number: int, sl: Slice, pixels: np.ndarray) -> Dataset:
    """The dataset of one slice (pixels: uint16 stored values, 12 bits used)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uid(seed, study_id, series.series_id, sl.instance_number)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "LSDC_SYNTH_1"
    ds = Dataset()
    ds.file_meta = meta
    seq, tr, te = SEQUENCE[series.contrast]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Manufacturer = "lsdc synth"
    ds.BodyPartExamined = "LSPINE"
    ds.PatientID = str(study_id)
    ds.PatientName = ""
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uid(seed, study_id)
    ds.SeriesInstanceUID = uid(seed, study_id, series.series_id)
    ds.FrameOfReferenceUID = uid(seed, study_id, "frame")
    ds.StudyID = str(study_id)[-8:]
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series.description
    ds.InstanceNumber = sl.instance_number
    ds.ScanningSequence = seq
    ds.SequenceVariant = "SK"
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = tr
    ds.EchoTime = te
    ds.MagneticFieldStrength = 1.5
    ds.SliceThickness = round(series.thickness, 4)
    ds.SpacingBetweenSlices = round(series.spacing, 4)
    ds.ImagePositionPatient = [round(float(v), 4) for v in sl.position]
    ds.ImageOrientationPatient = [round(v, 6) for v in sl.orientation]
    ds.SliceLocation = round(float(sl.position @ sl.normal), 4)
    ds.PixelSpacing = [round(sl.spacing[0], 6), round(sl.spacing[1], 6)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter, ds.WindowWidth = window(pixels)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def encode(ds: Dataset) -> bytes:
    """Part-10 bytes (preamble, DICM, file meta) of a dataset."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
