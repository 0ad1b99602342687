"""DICOM files -> slice headers (cheap, no pixels) and float32 intensities (rescaled, MONOCHROME1 inverted).

Every failure is a DicomError naming the file and the reason: the v8 notebook turned any exception into a silent
black image, which trained the model on nothing. Every value the pixels depend on (geometry, rescale, pixel format
and size) is checked from the header, before anything is decoded: a bad value is an error, never a guess, and an
unused bad file is found without reading its pixels (docs/reliability.md).
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

# The tags the geometry and the intensities need: parsing stops before PixelData, so indexing a series reads a few KB
# per file, and every value the pixels depend on is checked before any file is decoded.
HEADER_TAGS = ("InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
               "RescaleSlope", "RescaleIntercept")

# What a usable header holds (header_of). Outside these a value is an error, never a guess: a spacing of 1e-4 mm would
# make a crop box of millions of pixels, a zero orientation a stack ordered by noise, a NaN slope a slice of NaN.
SPACING_MM = (0.05, 10.0)  # PixelSpacing: clinical MR is ~0.2-2 mm
MAX_SIDE = 8192  # Rows, Columns (pixels); MR is <= 1024
MAX_POSITION_MM = 1e6  # |ImagePositionPatient|: any patient fits in 1 km
UNIT_TOLERANCE = 0.01  # ImageOrientationPatient: |row|, |col| within 1 % of 1, row . col within 0.01 (~0.6 degrees)
MAX_RESCALE = 1e20  # |RescaleSlope|, |RescaleIntercept|: any stored value (< 2^32) rescaled stays finite in float32


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


# Tags stored as binary integers (US): their value is read through pydicom; every other tag here is text (DS, IS, CS).
BINARY_TAGS = frozenset({"Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation"})


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    """A tag's value as written in the file ('0.5\\0.5'), without pydicom's conversion (which raises on 'abc' and
    lets 'nan' through); None when the tag is absent or empty, which is a missing tag, not a bad one."""
    if keyword in BINARY_TAGS:
        try:
            value = ds.get(keyword)
        except (ValueError, TypeError, KeyError):  # a binary value of the wrong length
            return "unreadable"
    else:
        elem = ds.get_item(keyword, keep_deferred=True)
        value = None if elem is None else elem.value
    if isinstance(value, bytes):
        text = value.decode("ascii", errors="replace")
    elif isinstance(value, (list, tuple, MultiValue)):
        text = "\\".join(str(v) for v in value)
    else:
        text = "" if value is None else str(value)
    text = text.strip(" \0")
    return text or None


def _numbers(text: str, n: int) -> tuple[float, ...] | None:
    """``n`` finite numbers from a backslash-separated DICOM value, else None."""
    parts = text.split("\\")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        return None
    return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def _geometry(ds: pydicom.Dataset, path: str | Path, keyword: str, n: int, ok: Callable[[tuple[float, ...]], bool],
              what: str) -> tuple[float, ...] | None:
    """A geometry tag's ``n`` numbers; None when the tag is missing; DicomError when it is there but unusable."""
    text = _text(ds, keyword)
    if text is None:
        return None
    values = _numbers(text, n)
    if values is None or not ok(values):
        raise DicomError(path, f"{keyword} '{text}' is not {what}")
    return values


def _orthonormal(o: tuple[float, ...]) -> bool:
    row, col = o[:3], o[3:]  # plain floats: numpy costs ~10 us a file here, for six numbers
    dot = row[0] * col[0] + row[1] * col[1] + row[2] * col[2]
    return abs(math.hypot(*row) - 1) <= UNIT_TOLERANCE and abs(math.hypot(*col) - 1) <= UNIT_TOLERANCE \
        and abs(dot) <= UNIT_TOLERANCE


def rescale_of(ds: pydicom.Dataset, path: str | Path) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), (1, 0) where a tag is missing; a non-numeric, non-finite, zero (slope) or
    huge value is a DicomError: it would make every pixel NaN, infinite or one value."""
    out = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        text = _text(ds, keyword)
        value = default if text is None else _numbers(text, 1)
        value = value[0] if isinstance(value, tuple) else value
        if value is None or abs(value) > MAX_RESCALE or (keyword == "RescaleSlope" and value == 0):
            need = "finite, non-zero" if keyword == "RescaleSlope" else "finite"
            raise DicomError(path, f"{keyword} '{text}' is not a usable number ({need}, |value| <= "
                                   f"{MAX_RESCALE:.0e})")
        out.append(value)
    return out[0], out[1]


def _whole(text: str | None) -> int | None:
    """A whole number from a tag's text (US, or IS: '7' or '7.0'); None when missing or not a whole number."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return int(value) if value is not None and math.isfinite(value) and value == int(value) else None


def _not_empty(path: str | Path) -> None:
    """A 0-byte file (an interrupted copy) gets its own reason instead of pydicom's 'missing DICM prefix'; something
    that is not a regular file (a FIFO would block the reader forever) is refused unread."""
    st = Path(path).stat()
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise DicomError(path, f"not a regular file ({kind}): not read")
    if st.st_size == 0:
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
    """The slice header of a parsed file, every geometry and intensity value checked. ``instance_number`` (from the
    file name) is used when the tag is missing. A missing position, orientation or spacing is None (the build
    falls back, and says so); one that is present but unusable is a DicomError naming the tag and its value."""
    number_text, rows_text, cols_text = (_text(ds, k) for k in ("InstanceNumber", "Rows", "Columns"))
    if (number_text is None and instance_number is None) or rows_text is None or cols_text is None:
        raise DicomError(path, "header lacks InstanceNumber/Rows/Columns")
    number = instance_number if number_text is None else _whole(number_text)
    if number is None:
        raise DicomError(path, f"InstanceNumber '{number_text}' is not a whole number")
    # Coordinates name a slice by its file name: a header claiming another number would put it in the wrong place.
    if instance_number is not None and number != instance_number:
        raise DicomError(path, f"InstanceNumber {number} in the header disagrees with the file name")
    rows, cols = _whole(rows_text), _whole(cols_text)
    if rows is None or cols is None or not (1 <= rows <= MAX_SIDE and 1 <= cols <= MAX_SIDE):
        raise DicomError(path, f"Rows x Columns {rows_text} x {cols_text} is not an image size (1..{MAX_SIDE} pixels "
                               "a side)")
    lo, hi = SPACING_MM
    spacing = _geometry(ds, path, "PixelSpacing", 2, lambda v: all(lo <= x <= hi for x in v),
                        f"2 spacings of {lo:g}..{hi:g} mm")
    position = _geometry(ds, path, "ImagePositionPatient", 3, lambda v: all(abs(x) <= MAX_POSITION_MM for x in v),
                         "3 finite coordinates in mm")
    orientation = _geometry(ds, path, "ImageOrientationPatient", 6, _orthonormal,
                            "two perpendicular unit directions (6 numbers)")
    rescale_of(ds, path)  # checked with the header, so an unused file with a bad value is reported too
    return SliceHeader(path=str(path), instance_number=number, rows=rows, cols=cols,
                       position=position, orientation=orientation, spacing=spacing)  # type: ignore[arg-type]


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
    if ds is None:
        return read_header(path, instance_number), None
    return header_of(ds, path, instance_number), ds


ENCAPSULATED = 0xFFFFFFFF  # PixelData's length when it holds compressed fragments
DEFLATED = "1.2.840.10008.1.2.1.99"  # the whole dataset is deflated: offsets are not file offsets


def _pixel_bytes(ds: pydicom.Dataset, path: str | Path, read: bool) -> tuple[int | None, int | None]:
    """(bytes PixelData declares, bytes the file holds of it), without reading it when it is deferred: the file's
    size past the value's offset is what a read would return. None where that cannot be known without ``read``."""
    raw = ds.get_item("PixelData", keep_deferred=True)
    declared = getattr(raw, "length", None)
    if getattr(raw, "value", None) is not None:
        return declared, len(raw.value)
    if not read and ds.file_meta.get("TransferSyntaxUID") != DEFLATED and getattr(raw, "value_tell", None) \
            and declared != ENCAPSULATED:  # elements may follow PixelData: a read returns at most what it declares
        return declared, min(max(os.stat(path).st_size - raw.value_tell, 0), declared)
    if not read:
        return declared, None
    try:
        return declared, len(ds.get_item("PixelData").value or b"")
    except (OSError, EOFError, ValueError) as e:
        raise DicomError(path, f"unreadable pixel data ({type(e).__name__}: {e})") from None


def check_pixel_data(ds: pydicom.Dataset, path: str | Path, read: bool = True) -> None:
    """Everything about a file's pixel data that its header tells, without decoding it: present, not cut short, one
    grayscale frame, a bit depth that holds a slice, and (uncompressed) exactly Rows x Columns values. Cheap enough
    for every file of a series, so a bad file no stack needs is reported too. ``read=False`` never reads the pixel
    bytes (a deflated file's length is then checked only when it is decoded)."""
    if "PixelData" not in ds:
        raise DicomError(path, "no pixel data")
    declared, held = _pixel_bytes(ds, path, read)
    if declared not in (None, ENCAPSULATED) and held is not None and declared != held:
        raise DicomError(path, f"unreadable pixel data: file truncated (PixelData declares {declared} bytes, "
                               f"the file holds {held})")
    text = {k: _text(ds, k) for k in ("SamplesPerPixel", "NumberOfFrames", "PhotometricInterpretation",
                                       "BitsAllocated", "BitsStored", "Rows", "Columns")}
    if text["SamplesPerPixel"] is not None and _whole(text["SamplesPerPixel"]) != 1:
        raise DicomError(path, f"not a grayscale image (SamplesPerPixel={text['SamplesPerPixel']})")
    frames = _whole(text["NumberOfFrames"])
    if frames is None and text["NumberOfFrames"] is not None:
        raise DicomError(path, f"NumberOfFrames '{text['NumberOfFrames']}' is not a whole number")
    if frames is not None and frames != 1:
        raise DicomError(path, f"multi-frame image ({frames} frames) is not a single slice")
    photometric = text["PhotometricInterpretation"]
    if photometric is not None and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(path, f"not a grayscale image (PhotometricInterpretation '{photometric}')")
    bits, stored = _whole(text["BitsAllocated"]), _whole(text["BitsStored"])
    if (text["BitsAllocated"], text["BitsStored"]) != (None, None) and \
            (bits not in (8, 16, 32) or stored is None or not 1 <= stored <= bits):
        raise DicomError(path, f"BitsAllocated {text['BitsAllocated']} / BitsStored {text['BitsStored']} cannot hold "
                               "a grayscale slice")
    rows, cols = _whole(text["Rows"]), _whole(text["Columns"])
    if declared != ENCAPSULATED and held is not None and bits and rows and cols:
        need = rows * cols * bits // 8
        if held not in (need, need + need % 2):  # an odd length carries one pad byte
            raise DicomError(path, f"pixel data holds {held} bytes, Rows x Columns x BitsAllocated "
                                   f"({rows}x{cols}x{bits}) need {need}")


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
    check_pixel_data(ds, path)
    slope, intercept = rescale_of(ds, path)
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
    if slope != 1.0:
        img *= np.float32(slope)
    if intercept != 0.0:
        img += np.float32(intercept)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        np.negative(img, out=img)
    return img
