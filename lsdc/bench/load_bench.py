"""`lsdc bench load CACHE`: train.data's real loader against a raw read of the same chunks and the v8-style loader.

  raw_chunk   each chunk read as the format defines it and nothing more: its file's bytes, plus its CRC-32C check
              with the default codec (zarr itself for compressed codecs); the floor a loader is judged against
  raw_file    the bytes alone, nothing checked (the CRC costs ~0.05 ms of a ~0.14 ms read)
  raw_batch   raw_chunk, but into the slots of a new batch array each batch (what a loader must do at the least)
  raw_zarr    plain `zarr` array[row] over the samples, one process (what a reader without lsdc gets)
  reader      cache.open(...)[i] (chunk read into a new array, size and CRC-32C checked; a lost file is an error)
  loader_wK   train.data.CacheDataset + make_loader (shuffled, batches, K worker processes), steady-state epoch
  in_memory   the same loader after CacheDataset.load_into_memory (train's 'auto' mode when the samples fit in RAM)
  v8_wK       lsdc.bench.v8_loader.V8Dataset in a DataLoader with K workers (decodes 7 DICOM files per sample)

All read the same samples in the same shuffled order; ratios are formed within one run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from cache.errors import InputError
from lsdc.bench.common import log, machine_info, ratio, spread

TARGETS = {"loader_over_raw": (">=", 0.8), "cached_over_v8": (">=", 30.0)}


def raw_file_read(path: str, rows: np.ndarray, check_crc: bool = False) -> dict[str, Any]:
    """Each chunk file's bytes into new memory (`f.read()`); with ``check_crc`` also the chunk's CRC-32C checked,
    which is what reading a `crc32c` chunk means in the Zarr spec. No loader, no batch, no tensors."""
    from cache.chunks import CRC_BYTES, chunk_path, crc_trailer

    array_dir = Path(path) / "crops"
    t0, bad = time.perf_counter(), 0
    for r in rows:
        with open(chunk_path(array_dir, int(r)), "rb") as f:
            data = f.read()
        if check_crc:
            body = np.frombuffer(data, np.uint8, len(data) - CRC_BYTES)
            bad += crc_trailer(body) != data[-CRC_BYTES:]
    if bad:
        raise InputError(f"bench load: {bad} chunks of {path} fail their CRC; run `lsdc cache verify {path}`")
    return _rate(len(rows), time.perf_counter() - t0)


def raw_batch_read(path: str, rows: np.ndarray, batch_size: int, shape: tuple[int, ...]) -> dict[str, Any]:
    """The chunks' bytes read straight into the slots of a new batch array, CRC checked, no loader: what a loader
    must do at the least. Unlike `raw_chunk` (one recycled 1.4 MB buffer that stays in the CPU cache), every batch
    is 16 MB of new memory, as a loader's batches are."""
    from cache.chunks import chunk_path, read_chunk_into

    array_dir = Path(path) / "crops"
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        batch = np.empty((len(part), *shape), np.uint8)
        for k, r in enumerate(part):
            read_chunk_into(chunk_path(array_dir, int(r)), batch[k], "crc32c")
    return _rate(len(rows), time.perf_counter() - t0)


def raw_read(path: str, rows: np.ndarray) -> dict[str, Any]:
    import zarr

    crops = zarr.open_array(str(path), path="crops", mode="r")
    crops[int(rows[0])]  # the first read of a fresh handle sets up zarr's codec pipeline: not a per-sample cost
    t0, total = time.perf_counter(), 0
    for r in rows:
        total += int(crops[int(r)][0, 0, 0, 0])  # touch the result so nothing is optimised away
    return _rate(len(rows), time.perf_counter() - t0)


def reader_read(reader, positions: np.ndarray) -> dict[str, Any]:
    t0 = time.perf_counter()
    for i in positions:
        reader[int(i)]
    return _rate(len(positions), time.perf_counter() - t0)


def loader_epochs(dataset, batch_size: int, workers: int, epochs: int = 2) -> dict[str, Any]:
    """Iterate train's real DataLoader; the first epoch pays the worker start-up, the best later one is the steady
    state (best of several: on a shared machine the slow epochs measure the neighbours, not the loader)."""
    from train.data import make_loader

    loader = make_loader(dataset, batch_size, workers, train=True, seed=0)
    times = [_epoch(loader, epoch)[1] for epoch in range(epochs)]
    fallbacks = loader.ring_fallbacks
    del loader  # persistent workers end here
    out = _rate(len(dataset), min(times[1:] or times))
    out.update(first_epoch_s=times[0], workers=workers, epochs=epochs, ring_fallbacks=fallbacks)
    return out


def _epoch(loader, epoch: int) -> tuple[int, float]:
    loader.sampler.set_epoch(epoch)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["image"])
    return n, time.perf_counter() - t0


def interleaved(reader, dataset, path: str, rows: np.ndarray, order: np.ndarray, batch_size: int,
                passes: int) -> dict[str, Any]:
    """Raw zarr, the cache reader and the 0-worker train loader, pass after pass, so a burst of load from a
    neighbour hits all three alike; each keeps its best pass."""
    from train.data import make_loader

    loader = make_loader(dataset, batch_size, 0, train=True, seed=0)
    _epoch(loader, 0)  # warm the page cache and every code path once
    best: dict[str, dict[str, Any]] = {}
    codec = reader.manifest["array"].get("codec")
    for p in range(passes):
        n, seconds = _epoch(loader, p + 1)
        measured = {"raw_chunk": raw_file_read(path, rows, check_crc=True) if codec == "crc32c" else
                    raw_file_read(path, rows) if codec == "none" else raw_read(path, rows),
                    "raw_file": raw_file_read(path, rows), "raw_zarr": raw_read(path, rows),
                    **({"raw_batch": raw_batch_read(path, rows, batch_size, tuple(reader.shape))}
                       if codec == "crc32c" else {}),
                    "reader": reader_read(reader, order),
                    "loader_w0": {**_rate(n, seconds), "workers": 0}}
        for key, m in measured.items():
            if key not in best or m["samples_per_s"] > best[key]["samples_per_s"]:
                best[key] = {**m, "passes": passes}
    return best


def v8_epoch(data_dir: Path, index, split: str, batch_size: int, workers: int) -> dict[str, Any]:
    """One epoch of the v8-style Dataset through a torch DataLoader (its notebook used 2 workers)."""
    from torch.utils.data import DataLoader

    from lsdc.bench.v8_loader import V8Dataset

    loader = DataLoader(V8Dataset(data_dir, index, split), batch_size=batch_size, shuffle=True, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["image"])
    out = _rate(n, time.perf_counter() - t0)  # includes worker start-up: the notebook paid it every epoch too
    out["workers"] = workers
    return out


def bench_load(cache_path: str | Path, *, workers: tuple[int, ...] = (0, 1, 2), batch_size: int = 12,
               samples: int | None = None, v8_samples: int | None = 48, v8_workers: tuple[int, ...] | None = None,
               data_dir: str | Path | None = None, repeat: int = 1, passes: int = 3, in_memory: bool = True,
               command: str | None = None) -> dict[str, Any]:
    """Run the loader benchmark on an existing cache; the v8 part needs the DICOM folder the cache was built from
    (``data_dir``, default the one in the manifest). ``samples``/``v8_samples`` limit how many are read; each
    cached figure is the best of ``passes`` passes."""
    import torch

    import cache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader's job is I/O and decoding; keep the comparison to one core per process
    try:
        return _bench_load(cache.open(cache_path), cache_path, workers, batch_size, samples, v8_samples, v8_workers,
                           data_dir, repeat, passes, in_memory, command)
    finally:
        torch.set_num_threads(threads)


def _bench_load(reader, cache_path, workers, batch_size, samples, v8_samples, v8_workers, data_dir, repeat, passes,
                in_memory, command) -> dict[str, Any]:
    from cache.rsna import CONDITIONS
    from train.data import CacheDataset

    rng = np.random.default_rng(0)
    n = len(reader) if samples is None else min(samples, len(reader))
    positions = np.sort(rng.permutation(len(reader))[:n])
    conditions = tuple(c for c in CONDITIONS if c in set(reader.index["condition"]))
    order = rng.permutation(positions)
    rows = reader.index["row"].to_numpy()[order]
    result: dict[str, Any] = {"bench": "load", "command": command, "machine": machine_info(),
                              "cache": str(Path(cache_path).resolve()), "samples": n, "batch_size": batch_size,
                              "sample_shape": list(reader.shape), "codec": reader.manifest["array"].get("codec"),
                              "disk": reader.disk_usage()}
    data_dir = Path(data_dir) if data_dir else _data_dir_of(reader)
    v8_workers = tuple(workers if v8_workers is None else v8_workers)
    runs = []
    for r in range(repeat):
        run: dict[str, Any] = {}
        dataset = CacheDataset(reader, positions, conditions)
        log(f"bench load: repeat {r + 1}/{repeat}: raw reads, reader and 0-worker loader, interleaved")
        run.update(interleaved(reader, dataset, reader.path, rows, order, batch_size, passes))
        for w in workers:
            if w > 0:
                log(f"bench load: repeat {r + 1}/{repeat}: train loader, {w} workers")
                run[f"loader_w{w}"] = loader_epochs(dataset, batch_size, w, epochs=1 + passes)
        if in_memory:
            t0 = time.perf_counter()
            dataset.load_into_memory()
            load_s = time.perf_counter() - t0
            run["in_memory"] = loader_epochs(dataset, batch_size, 0, epochs=1 + passes)
            run["in_memory"]["load_s"] = load_s
        if data_dir is not None and v8_samples:
            sub = reader.index.iloc[order[:v8_samples]]
            for w in v8_workers:
                log(f"bench load: repeat {r + 1}/{repeat}: v8-style loader, {w} workers, {len(sub)} samples")
                split = reader.manifest["config"].get("split", "train")
                epochs = [v8_epoch(data_dir, sub, split, batch_size, w) for _ in range(passes)]
                run[f"v8_w{w}"] = {**max(epochs, key=lambda d: d["samples_per_s"]), "passes": passes}
        run["ratios"] = _ratios(run, workers, v8_workers)
        runs.append(run)
    result["v8_data_dir"] = str(data_dir) if data_dir else None
    result["runs"] = runs
    keys = dict.fromkeys(k for run in runs for k in run["ratios"])
    result["ratios"] = {k: spread(run["ratios"][k] for run in runs) for k in keys}
    result["targets"] = _targets(result, workers, v8_workers)
    result["machine_end"] = {"load_avg": machine_info()["load_avg"]}
    return result


def _data_dir_of(reader) -> Path | None:
    d = (reader.manifest.get("prep") or {}).get("data_dir")
    return Path(d) if d and Path(d).is_dir() else None


def _rate(n: int, seconds: float) -> dict[str, Any]:
    return {"samples": n, "seconds": seconds, "samples_per_s": n / seconds if seconds > 0 else float("nan")}


def _ratios(run: dict, workers: tuple[int, ...], v8_workers: tuple[int, ...]) -> dict[str, float]:
    raw = run["raw_chunk"]["samples_per_s"]
    out = {"reader_over_raw": ratio(run["reader"]["samples_per_s"], raw),
           "raw_zarr_over_raw": ratio(run["raw_zarr"]["samples_per_s"], raw),
           "raw_file_over_raw": ratio(run["raw_file"]["samples_per_s"], raw),
           "loader_w0_over_raw_file": ratio(run["loader_w0"]["samples_per_s"], run["raw_file"]["samples_per_s"])}
    if "raw_batch" in run:
        out["raw_batch_over_raw"] = ratio(run["raw_batch"]["samples_per_s"], raw)
        out["loader_w0_over_raw_batch"] = ratio(run["loader_w0"]["samples_per_s"], run["raw_batch"]["samples_per_s"])
    for w in sorted({0, *workers}):
        out[f"loader_w{w}_over_raw"] = ratio(run[f"loader_w{w}"]["samples_per_s"], raw)
    if "in_memory" in run:
        out["in_memory_over_raw"] = ratio(run["in_memory"]["samples_per_s"], raw)
    # An epoch as each side would run it: our fastest loader setting against v8's fastest (on a 2-core machine our
    # loader is fastest without worker processes, v8's with them).
    ours = {k: run[k]["samples_per_s"] for k in run if k.startswith("loader_w")}
    v8 = {k: run[k]["samples_per_s"] for k in run if k.startswith("v8_w")}
    if ours and v8:
        out["cached_over_v8_best"] = ratio(max(ours.values()), max(v8.values()))
    for w in v8_workers:  # a cached epoch against a v8 epoch with the same number of loader workers
        if f"v8_w{w}" in run and f"loader_w{w}" in run:
            out[f"cached_over_v8_w{w}"] = ratio(run[f"loader_w{w}"]["samples_per_s"], run[f"v8_w{w}"]["samples_per_s"])
        if f"v8_w{w}" in run and "in_memory" in run:  # train's default ('auto') when the samples fit in RAM
            out[f"in_memory_over_v8_w{w}"] = ratio(run["in_memory"]["samples_per_s"], run[f"v8_w{w}"]["samples_per_s"])
    return out


def _targets(result: dict, workers: tuple[int, ...], v8_workers: tuple[int, ...]) -> dict[str, Any]:
    from lsdc.bench.prep_bench import _verdict

    r = result["ratios"]
    out = {}
    # the loader's own overhead, without worker processes to hide it
    out["loader_over_raw"] = _verdict(r["loader_w0_over_raw"]["median"], *TARGETS["loader_over_raw"])
    if "cached_over_v8_best" in r:
        out["cached_over_v8"] = _verdict(r["cached_over_v8_best"]["median"], *TARGETS["cached_over_v8"])
    return out
