"""Direct file I/O for the cache's chunks when they are plain bytes (codec `crc32c` or `none`) on a local disk.

A chunk of such an array is, by the Zarr v3 spec, the sample's C-order bytes followed (with `crc32c`) by their
CRC-32C as 4 little-endian bytes. Zarr reads one through its async store, codec pipeline and an output copy, ~0.7 ms
per 1.4 MB sample; reading the file straight into the caller's batch buffer and checking the CRC costs ~0.3 ms, and
writing is likewise cheaper. The bytes are exactly zarr's (tests/test_cache_chunks.py reads what this writes with
plain zarr and the other way round), and any other codec, store or layout goes through zarr as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from cache.format import ChecksumError, chunk_name

CRC_BYTES = 4


def crc_trailer(data: np.ndarray | bytes) -> bytes:
    """The 4 bytes the `crc32c` codec appends to a chunk: CRC-32C of ``data``, little-endian (Zarr v3 spec)."""
    return int(google_crc32c.value(data)).to_bytes(CRC_BYTES, "little")


def plain_codec(codecs: list[dict[str, Any]]) -> str | None:
    """'crc32c' or 'none' when an array's codec chain (zarr.json's `codecs`) stores raw uint8 bytes, else None."""
    names = [c.get("name") for c in codecs]
    if not names or names[0] != "bytes":
        return None
    if names[1:] == ["crc32c"]:
        return "crc32c"
    return "none" if names[1:] == [] else None


PAGE = 4096


def aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array that starts on a page boundary, like the page cache the chunks are read from.

    Measured here (docs/benchmarks.md): the kernel copies a 1.4 MB chunk into a page-aligned buffer in ~0.09 ms, but
    into buffers at some other offsets (e.g. 16 or 96-160 bytes past a page, where malloc often puts them) in up to
    0.2-0.28 ms. Sample shapes are whole pages (7x3x256x256 = 336 pages), so every slot of a batch stays aligned.
    """
    n = int(np.prod(shape))
    raw = np.empty(n + PAGE, np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start:start + n].reshape(shape)


def chunk_path(array_dir: str | Path, row: int) -> str:
    """The chunk file of a sample (chunk key encoding 'default' with '.' as separator, cache.format)."""
    return f"{array_dir}/{chunk_name(row)}"  # a string: pathlib costs ~10 us per read on the loader's hot path


def write_chunk(path: str | Path, stack: np.ndarray, codec: str) -> None:
    """Write one sample's chunk atomically: a temp file (never taken for a chunk by format.chunk_row), then rename."""
    data = np.ascontiguousarray(stack)
    tmp = f"{path}.{uuid.uuid4().hex}.partial"  # unique per write, also between threads of one process
    try:
        with open(tmp, "wb") as f:
            f.write(data.data)
            if codec == "crc32c":
                f.write(crc_trailer(data))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_chunk_into(path: str | Path, out: np.ndarray, codec: str) -> None:
    """Fill ``out`` (a C-contiguous uint8 array of one sample's shape) from its chunk file.

    Raises FileNotFoundError for an absent chunk and ChecksumError for one of the wrong size or CRC (a torn or
    corrupted file): a reader must never hand out pixels the writer did not write.
    """
    crc = codec == "crc32c"
    want = out.nbytes + (CRC_BYTES if crc else 0)
    trailer = bytearray(CRC_BYTES if crc else 0)
    fd = os.open(path, os.O_RDONLY)  # raw fd and one readv: no Python file object, no second read call
    try:
        size = os.fstat(fd).st_size
        if size != want:
            raise ChecksumError(f"chunk {path} holds {size} bytes, a sample needs {want}: the file is truncated "
                                "or not this cache's")
        got = os.readv(fd, [out, trailer] if crc else [out])
    finally:
        os.close(fd)
    if got != want:
        raise ChecksumError(f"chunk {path}: short read ({got} of {want} bytes)")
    if crc and crc_trailer(out) != trailer:
        raise ChecksumError(f"chunk {path}: CRC-32C mismatch, the file is corrupted")


def plain_layout(array_dir: Path) -> str | None:
    """The plain codec of a local cache array whose chunks this module can read and write directly, else None.

    Checks the array's own zarr.json, so a cache written by another tool with another layout falls back to zarr.
    """
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    encoding = meta.get("chunk_key_encoding") or {}
    chunks = ((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
    shape = meta.get("shape") or []
    if (meta.get("data_type") != "uint8" or encoding.get("name") != "default"
            or (encoding.get("configuration") or {}).get("separator") != "."
            or chunks != [1, *shape[1:]] or meta.get("storage_transformers")):
        return None
    return plain_codec(meta.get("codecs") or [])
