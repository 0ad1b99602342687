"""prep.dicom: every transfer syntax decodes to the reference pixels; rescale, MONOCHROME1, named errors."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from prep.dicom import DicomError, read_header, read_pixels
from prep_fixtures import phantom, write_slice


def _file(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, name
    return path


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_bigendian.dcm"])
def test_compressed_mr_small_decodes_to_the_uncompressed_pixels(name):
    ref = read_pixels(_file("MR_small.dcm"))
    got = read_pixels(_file(name))
    assert got.dtype == np.float32 and got.shape == (64, 64)
    np.testing.assert_array_equal(got, ref)
    assert ref.std() > 100  # a real image, not a blank one


def test_jpeg2000_mr2_equals_uncompressed_with_rescale_applied():
    # MR2_UNCR is the uncompressed twin of the reversible J2KR ('UNCI' pairs with the irreversible J2KI)
    ref, got = read_pixels(_file("MR2_UNCR.dcm")), read_pixels(_file("MR2_J2KR.dcm"))
    np.testing.assert_array_equal(got, ref)
    ds = pydicom.dcmread(_file("MR2_UNCR.dcm"))
    expected = ds.pixel_array.astype(np.float32) * np.float32(float(ds.RescaleSlope)) + np.float32(
        float(ds.RescaleIntercept))
    np.testing.assert_allclose(ref, expected, rtol=1e-6)
    assert float(ds.RescaleSlope) != 1.0


def test_jpeg_lossless_process14_matches_pydicom_reference_values():
    arr = read_pixels(_file("JPEG-LL.dcm"))  # pydicom's own pixel reference for this file
    assert arr.shape == (1024, 256)
    assert tuple(arr[400, 124:132]) == (60, 58, 61, 68, 59, 65, 64, 67)
    assert tuple(arr[600, 124:132]) == (3, 1, 2, 0, 2, 1, 2, 0)


def test_rescale_and_monochrome1(tmp_path):
    img = phantom(32, seed=1)
    plain = read_pixels(write_slice(tmp_path / "a.dcm", img, instance=1))
    np.testing.assert_array_equal(plain, img.astype(np.float32))
    # stored s with slope 2, intercept -100 is the same picture as stored 2s - 100
    scaled = read_pixels(write_slice(tmp_path / "b.dcm", img // 2, instance=1, slope=2.0, intercept=-100.0))
    np.testing.assert_array_equal(scaled, (img // 2).astype(np.float32) * 2 - 100)
    # MONOCHROME1 stores 4095 - v: reading negates, i.e. v - 4095, the same picture up to a constant
    inverted = read_pixels(write_slice(tmp_path / "c.dcm", 4095 - img, instance=1, monochrome1=True))
    np.testing.assert_array_equal(inverted, img.astype(np.float32) - 4095)
    assert np.corrcoef(inverted.ravel(), plain.ravel())[0, 1] > 0.999


def test_header_reads_geometry_without_pixels(tmp_path):
    path = write_slice(tmp_path / "7.dcm", phantom(16), instance=7, position=(1, 2, 3), spacing=(0.5, 0.25))
    h = read_header(path)
    assert (h.instance_number, h.rows, h.cols) == (7, 16, 16)
    assert h.position == (1.0, 2.0, 3.0) and h.spacing == (0.5, 0.25) and len(h.orientation) == 6
    h2 = read_header(write_slice(tmp_path / "8.dcm", phantom(16), instance=8, position=None, spacing=None))
    assert h2.position is None and h2.spacing is None


def test_errors_name_the_file_and_reason(tmp_path):
    with pytest.raises(DicomError, match="missing file") as e:
        read_pixels(tmp_path / "nope.dcm")
    assert e.value.path.endswith("nope.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not a dicom file" * 20)
    with pytest.raises(DicomError, match="not a DICOM file"):
        read_header(junk)
    good = write_slice(tmp_path / "good.dcm", phantom(32), instance=1)
    truncated = tmp_path / "trunc.dcm"
    truncated.write_bytes(good.read_bytes()[:-700])
    with pytest.raises(DicomError, match="undecodable|unreadable") as e:
        read_pixels(truncated)
    assert e.value.path == str(truncated)
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(DicomError, match="no pixel data"):
        read_pixels(tmp_path / "nopix.dcm")


@pytest.mark.parametrize("bits,stored,signed,syntax", [
    (16, 12, 0, "explicit"), (16, 16, 0, "explicit"), (16, 12, 1, "explicit"), (16, 16, 1, "implicit"),
    (8, 8, 0, "explicit"), (8, 6, 1, "implicit")])
def test_native_fast_path_equals_pydicom(tmp_path, bits, stored, signed, syntax):
    """Uncompressed little-endian slices skip pydicom's pixel handler; the values must be pydicom's, garbage in
    the unused high bits included (masked when unsigned, sign-extended when signed)."""
    from pydicom.uid import ImplicitVRLittleEndian

    from prep.dicom import _native_pixels, pixels_of

    path = write_slice(tmp_path / "1.dcm", phantom(24, seed=3), instance=1)
    ds = pydicom.dcmread(path)
    rng = np.random.default_rng(bits + stored + signed)
    raw = rng.integers(0, 1 << bits, (24, 24), dtype=np.uint64).astype(f"<u{bits // 8}")  # high bits set too
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, signed
    ds.PixelData = raw.tobytes()
    if syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(tmp_path / "2.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(tmp_path / "2.dcm")
    fast = _native_pixels(ds)
    assert fast is not None
    np.testing.assert_array_equal(fast, ds.pixel_array)
    np.testing.assert_array_equal(pixels_of(ds, tmp_path / "2.dcm"), ds.pixel_array.astype(np.float32))
    assert _native_pixels(pydicom.dcmread(_file("MR_small_bigendian.dcm"))) is None  # left to pydicom
    assert _native_pixels(pydicom.dcmread(_file("MR_small_RLE.dcm"))) is None


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG-LL.dcm",
                                  "MR2_J2KR.dcm", "image_dfl.dcm"])
def test_header_checks_pass_real_files_without_reading_their_pixels(name, monkeypatch):
    """The index-time checks accept real files of every layout (a deflated file's offsets are not file offsets, so
    its length is checked only when decoded) and never read the deferred pixel bytes."""
    from prep.dicom import DEFER_BYTES, check_pixel_data, header_of

    ds = pydicom.dcmread(_file(name), defer_size=DEFER_BYTES)
    header_of(ds, _file(name), instance_number=int(ds.get("InstanceNumber") or 1))  # as its file name would say
    monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element",
                        lambda *a, **k: pytest.fail("the pixel bytes were read"))
    check_pixel_data(ds, _file(name), read=False)
    monkeypatch.undo()
    assert read_pixels(_file(name)).ndim == 2


def test_a_cut_file_is_found_from_its_size_before_decoding(tmp_path):
    """Truncation is seen from the file's size past PixelData's offset: no read, same reason as when decoding."""
    from prep.dicom import DEFER_BYTES, check_pixel_data

    good = write_slice(tmp_path / "good.dcm", phantom(64), instance=1)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-1000])
    ds = pydicom.dcmread(cut, defer_size=DEFER_BYTES)
    with pytest.raises(DicomError, match=r"file truncated \(PixelData declares 8192 bytes, the file holds 7192\)"):
        check_pixel_data(ds, cut, read=False)
    with pytest.raises(DicomError, match=r"file truncated \(PixelData declares 8192 bytes, the file holds 7192\)"):
        read_pixels(cut)
