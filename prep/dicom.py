"""DICOM files -> slice headers (cheap, no pixels) and float32 intensities (rescaled, MONOCHROME1 inverted).

Every failure is a DicomError naming the file and the reason: the v8 notebook turned any exception into a silent
black image, which trained the model on nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

# Only the tags the geometry needs: parsing stops before PixelData, so indexing a series reads a few KB per file.
HEADER_TAGS = ("InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


class DicomError(Exception):
    """A file that cannot become a slice. ``reason`` is what goes into the errors table."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class SliceHeader:
    """What the geometry needs from one file; position/orientation/spacing are None when the tag is missing."""

    path: str
    instance_number: int
    rows: int
    cols: int
    position: tuple[float, float, float] | None  # ImagePositionPatient: centre of the first pixel, mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row direction (x), then column direction (y)
    spacing: tuple[float, float] | None  # PixelSpacing: (between rows = y, between columns = x), mm

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols


def _floats(ds: pydicom.Dataset, tag: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(tag)
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _not_empty(path: str | Path) -> None:
    """A 0-byte file (an interrupted copy) gets its own reason instead of pydicom's 'missing DICM prefix'."""
    if Path(path).stat().st_size == 0:
        raise DicomError(path, "empty file (0 bytes)")


DEFER_BYTES = 4096  # values larger than this (the pixel data) are read from the file only when asked for


def _dcmread(path: str | Path, what: str, **kwargs) -> pydicom.Dataset:
    """pydicom.dcmread with every failure turned into a DicomError naming the file; ``what`` names what was read."""
    try:
        _not_empty(path)
        return pydicom.dcmread(path, **kwargs)
    except FileNotFoundError:
        raise DicomError(path, "missing file") from None
    except InvalidDicomError as e:
        raise DicomError(path, f"not a DICOM file ({e})") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:  # truncated or garbled
        raise DicomError(path, f"unreadable {what} ({type(e).__name__}: {e})") from None


def header_of(ds: pydicom.Dataset, path: str | Path, instance_number: int | None = None) -> SliceHeader:
    """The slice header of a parsed file. ``instance_number`` (from the file name) is used when the tag is missing."""
    number = ds.get("InstanceNumber")
    number = instance_number if number is None or number == "" else number
    if number is None or ds.get("Rows") is None or ds.get("Columns") is None:
        raise DicomError(path, "header lacks InstanceNumber/Rows/Columns")
    # Coordinates name a slice by its file name: a header claiming another number would put it in the wrong place.
    if instance_number is not None and int(number) != instance_number:
        raise DicomError(path, f"InstanceNumber {int(number)} in the header disagrees with the file name")
    spacing = _floats(ds, "PixelSpacing", 2)
    return SliceHeader(
        path=str(path),
        instance_number=int(number),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        position=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        spacing=spacing if spacing and min(spacing) > 0 else None,  # type: ignore[arg-type]
    )


def read_header(path: str | Path, instance_number: int | None = None) -> SliceHeader:
    """Parse one file's header only (the geometry's tags; parsing stops before the pixel data)."""
    ds = _dcmread(path, "header", stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    return header_of(ds, path, instance_number)


def read_slice(path: str | Path, instance_number: int | None = None) -> tuple[SliceHeader, pydicom.Dataset | None]:
    """The header and the parsed file with its pixel data left on disk (deferred), for ``pixels_of`` later: a slice
    that is indexed and then decoded is parsed once, not twice (~0.5 ms per file). When the whole file does not
    parse (e.g. cut inside an element after the header), the header alone is read as ``read_header`` does and the
    dataset is None, so the decode step reads the file again and names its own error."""
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_BYTES) if Path(path).stat().st_size else None
    except Exception:  # noqa: BLE001 - any failure here is re-diagnosed, and named, by read_header below
        ds = None
    if ds is None or "PixelData" not in ds:
        return read_header(path, instance_number), None
    return header_of(ds, path, instance_number), ds


NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # Implicit / Explicit VR Little Endian


def _native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """The stored values of an uncompressed little-endian 8/16-bit slice, straight from its bytes; None for anything
    else (compressed, big-endian, odd layouts), which goes through pydicom.

    Exactly what pydicom's pixel_array returns (tests/test_prep_dicom.py compares them): unsigned values are masked
    to BitsStored bits, signed ones sign-extended from their high bit. ~0.4 ms less per 512 px slice.
    """
    if ds.file_meta.get("TransferSyntaxUID") not in NATIVE_LITTLE_ENDIAN:
        return None
    bits, stored, high = ds.get("BitsAllocated"), ds.get("BitsStored"), ds.get("HighBit")
    rows, cols, signed = ds.get("Rows"), ds.get("Columns"), ds.get("PixelRepresentation")
    if bits not in (8, 16) or stored is None or high != stored - 1 or not 0 < stored <= bits or signed not in (0, 1) \
            or not rows or not cols:
        return None
    data = ds.PixelData
    if len(data) != rows * cols * bits // 8:
        return None
    arr = np.frombuffer(data, dtype=f"<{'i' if signed else 'u'}{bits // 8}").reshape(rows, cols)
    if stored == bits:
        return arr
    if signed:  # move the sign bit to the top, then arithmetic-shift back
        shift = bits - stored
        return (arr << shift) >> shift
    return arr & ((1 << stored) - 1)


def read_pixels(path: str | Path) -> np.ndarray:
    """Decode one slice to float32 in the scanner's output units (see pixels_of)."""
    return pixels_of(_dcmread(path, "file"), path)


def pixels_of(ds: pydicom.Dataset, path: str | Path) -> np.ndarray:
    """A parsed slice's pixels as float32 in the scanner's output units (slope * stored + intercept).

    Compressed transfer syntaxes (JPEG lossless, JPEG-LS, JPEG 2000, RLE) decode through pydicom's pylibjpeg
    plugins. MONOCHROME1 (bright = low value) is negated rather than flipped around a per-slice max: windows are
    percentiles of the stack, which are shift-invariant, so -v gives exactly the MONOCHROME2 picture without a
    per-slice constant that would make neighbouring slices disagree.
    """
    if "PixelData" not in ds:
        raise DicomError(path, "no pixel data")
    # The raw element, before conversion: pydicom silently keeps the bytes a cut file still has. A deferred element
    # knows its declared length before its value is read.
    declared = getattr(ds.get_item("PixelData", keep_deferred=True), "length", None)
    try:
        held = len(ds.get_item("PixelData").value or b"")
    except (OSError, EOFError, ValueError) as e:
        raise DicomError(path, f"unreadable pixel data ({type(e).__name__}: {e})") from None
    if declared is not None and declared != 0xFFFFFFFF and declared != held:  # 0xFFFFFFFF: encapsulated
        raise DicomError(path, f"unreadable pixel data: file truncated (PixelData declares {declared} bytes, "
                               f"the file holds {held})")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomError(path, f"not a grayscale image (SamplesPerPixel={ds.SamplesPerPixel})")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomError(path, f"multi-frame image ({ds.NumberOfFrames} frames) is not a single slice")
    try:
        stored = _native_pixels(ds)
        if stored is None:
            stored = ds.pixel_array
    except Exception as e:  # decoders raise anything from RuntimeError to their own types: name it, never hide it
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        name = getattr(syntax, "name", syntax)
        raise DicomError(path, f"undecodable pixel data ({name}; {type(e).__name__}: {e})") from None
    if stored.ndim != 2:
        raise DicomError(path, f"pixel array has shape {stored.shape}, expected a 2-D slice")
    if stored.dtype.kind == "f" and not np.isfinite(stored).all():  # float pixel data; integers cannot be NaN
        raise DicomError(path, "pixel data holds NaN or infinite values")
    img = stored.astype(np.float32)  # the one copy: native-endian float32 from any stored dtype
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        img *= np.float32(slope)
    if intercept != 0.0:
        img += np.float32(intercept)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        np.negative(img, out=img)
    return img
