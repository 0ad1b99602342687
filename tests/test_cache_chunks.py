"""cache.chunks: the direct chunk I/O of the plain codecs writes and reads exactly what zarr does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

import cache
import cache_helpers as h
from cache.chunks import plain_codec, plain_layout, read_chunk_into, write_chunk


@pytest.mark.parametrize("codec", ["crc32c", "none"])
def test_direct_writes_are_zarr_chunks(tmp_path: Path, codec: str) -> None:
    """What the writer's file path writes, plain zarr reads back; what zarr writes, the file path reads back."""
    path = tmp_path / "c"
    h.build(path, n=4, codec=codec)
    assert plain_layout(path / "crops") == codec  # so the build above went through cache.chunks
    plain = zarr.open_array(str(path / "crops"), mode="r")
    for row in range(4):
        assert np.array_equal(plain[row], h.stack(row))

    # The other way round: zarr writes a new sample, the direct reader (and a batch slot) gets it exactly.
    other = np.random.default_rng(99).integers(0, 256, plain.shape[1:], dtype=np.uint8)
    zarr.open_array(str(path / "crops"), mode="r+")[2] = other
    batch = np.zeros((3, *plain.shape[1:]), np.uint8)
    reader = cache.open(path)
    reader.read_into(2, batch[1])
    assert np.array_equal(batch[1], other) and not batch[0].any() and not batch[2].any()
    assert reader._plain is not None and np.array_equal(reader[3], h.stack(3))


def test_zstd_falls_back_to_zarr(tmp_path: Path) -> None:
    path = tmp_path / "c"
    h.build(path, n=3, codec="zstd-3")
    assert plain_layout(path / "crops") is None
    reader = cache.open(path)
    out = np.empty(reader.shape, np.uint8)
    assert reader.read_into(1, out) is out and np.array_equal(out, h.stack(1))
    assert reader._plain is None


def test_plain_codec_recognises_only_raw_bytes() -> None:
    assert plain_codec([{"name": "bytes"}, {"name": "crc32c"}]) == "crc32c"
    assert plain_codec([{"name": "bytes", "configuration": {"endian": "little"}}]) == "none"
    assert plain_codec([{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}]) is None
    assert plain_codec([{"name": "bytes"}, {"name": "crc32c"}, {"name": "crc32c"}]) is None
    assert plain_codec([{"name": "transpose"}, {"name": "bytes"}]) is None


def test_torn_corrupt_and_missing_chunks(tmp_path: Path) -> None:
    path = tmp_path / "c"
    h.build(path, n=5)
    crops = path / "crops"
    flipped = bytearray((crops / "c.1.0.0.0.0").read_bytes())
    flipped[7] ^= 0x01  # one bit: the CRC catches it
    (crops / "c.1.0.0.0.0").write_bytes(bytes(flipped))
    (crops / "c.2.0.0.0.0").write_bytes((crops / "c.2.0.0.0.0").read_bytes()[:-1000])  # a torn write
    (crops / "c.3.0.0.0.0").unlink()
    reader = cache.open(path)
    with pytest.raises(cache.ChecksumError, match=r"row 1: .*CRC-32C mismatch"):
        reader[1]
    with pytest.raises(cache.ChecksumError, match=r"row 2: .*holds \d+ bytes"):
        reader[2]
    with pytest.raises(cache.MissingChunkError, match=r"row 3 has no data"):
        reader[3]
    assert np.array_equal(reader[4], h.stack(4))
    # verify, which reads through zarr, finds the same three rows.
    assert cache.verify(path)[["row", "problem"]].values.tolist() == [[1, "corrupt"], [2, "corrupt"], [3, "missing"]]


def test_write_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "c"
    w = h.build(path, n=2, finalise=False)
    assert sorted(p.name for p in (path / "crops").iterdir()) == ["c.0.0.0.0.0", "c.1.0.0.0.0", "zarr.json"]
    # A temp file left by a killed writer is never taken for a chunk.
    (path / "crops" / "c.1.0.0.0.0.123.partial").write_bytes(b"half")
    assert w.written_rows() == {0, 1}
    out = np.empty((h.SLICES, 3, h.SIZE, h.SIZE), np.uint8)
    write_chunk(path / "crops" / "c.0.0.0.0.0", h.stack(7), "crc32c")  # replaces in one rename
    read_chunk_into(path / "crops" / "c.0.0.0.0.0", out, "crc32c")
    assert np.array_equal(out, h.stack(7))


def test_read_into_refuses_a_wrong_buffer(tmp_path: Path) -> None:
    path = tmp_path / "c"
    h.build(path, n=2)
    reader = cache.open(path)
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        reader.read_into(0, np.empty((h.SLICES, 3, h.SIZE, h.SIZE), np.float32))
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        reader.read_into(0, np.empty((h.SLICES, 3, h.SIZE, 2 * h.SIZE), np.uint8)[..., ::2])


def test_buffers_start_on_a_page_boundary(tmp_path: Path) -> None:
    """Chunks are copied from the page cache into page-aligned memory (twice as fast as at some offsets here)."""
    from cache.chunks import PAGE, aligned_empty

    for shape in ((7, 3, 256, 256), (12, 7, 3, 256, 256), (3, 3, 32, 32)):
        a = aligned_empty(shape)
        assert a.shape == shape and a.dtype == np.uint8 and a.flags.c_contiguous and a.ctypes.data % PAGE == 0
    path = tmp_path / "c"
    h.build(path, n=2)
    sample = cache.open(path)[1]
    assert sample.ctypes.data % PAGE == 0 and np.array_equal(sample, h.stack(1))


def test_a_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    import errno

    import cache.chunks as cc

    def full(_data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cc.google_crc32c, "value", full)
    with pytest.raises(OSError, match="No space"):
        write_chunk(tmp_path / "c.0.0.0.0.0", h.stack(0), "crc32c")
    assert list(tmp_path.iterdir()) == []
