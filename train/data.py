"""The cache as a torch Dataset, the loaders, and the uint8 -> float step that happens on the device.

Samples stay uint8 all the way to the GPU (4x less to copy than float32); the float conversion, augmentation and
normalisation happen there, so the CPU loader only reads Zarr chunks.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from cache.chunks import aligned_empty
from cache.rsna import LEVELS
from train.batch_ring import BatchRing, RingBatch


def select_samples(index: pd.DataFrame, conditions: tuple[str, ...], labelled: bool = True) -> np.ndarray:
    """Positions (into the reader) of the samples of `conditions`; only labelled ones when `labelled`."""
    keep = index["condition"].isin(conditions).to_numpy(dtype=bool, copy=True)
    if labelled:
        keep &= index["label"].notna().to_numpy()
    return np.flatnonzero(keep)


class CacheDataset(Dataset):
    """One item per selected sample: uint8 image (S, 3, H, W), label (-1 = none), level, condition, cache row."""

    ring: BatchRing | None = None  # set in each loader worker by make_loader (train.batch_ring)

    def __init__(self, reader, positions: np.ndarray, conditions: tuple[str, ...], in_memory: bool = False):
        self.reader = reader
        self.positions = np.asarray(positions, dtype=np.int64)
        idx = reader.index.iloc[self.positions]
        self.label = idx["label"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
        self.level = idx["level"].map(LEVELS.index).to_numpy(dtype=np.int64)
        self.condition = idx["condition"].map(conditions.index).to_numpy(dtype=np.int64)
        self.row = idx["row"].to_numpy(dtype=np.int64)
        self.shape = tuple(reader.shape) if len(self.positions) else None  # from the manifest: no read needed
        self.images: np.ndarray | None = None
        if in_memory:
            self.load_into_memory()

    def load_into_memory(self, threads: int = 8) -> None:
        """Read every selected sample once (threads: file reads and CRC checks release the GIL); later epochs index
        RAM."""
        images = np.empty((len(self), *self.shape), dtype=np.uint8)

        def read(i: int) -> None:
            self.reader.read_into(int(self.positions[i]), images[i])

        if len(self):
            read(0)  # opens the reader in this thread first, so the pool's threads share one handle
        with ThreadPoolExecutor(max(1, min(threads, os.cpu_count() or 1))) as pool:
            list(pool.map(read, range(1, len(self))))
        self.images = images

    def nbytes(self) -> int:
        return len(self) * int(np.prod(self.shape or (0,)))

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i], batched=False)

    def __getitems__(self, indices: list[int], batched: bool = True) -> dict[str, torch.Tensor]:
        """A whole batch in one go (the DataLoader calls this when it exists): every chunk is decoded straight into
        one uint8 array, with no per-sample tensors and no torch.stack copy of ~16 MB per batch at 256 px."""
        idx = np.asarray(indices, dtype=np.int64)
        fields = {"label": self.label[idx], "level": self.level[idx], "condition": self.condition[idx],
                  "row": self.row[idx]}
        worker = get_worker_info()
        slot = self.ring.acquire(worker.id) if self.ring is not None and worker is not None and batched else None
        if slot is not None:  # a reused shared slot: only its number and the small fields cross to the main process
            shape = (len(idx), *self.shape)
            try:
                self._read(idx, self.ring.view(slot, shape))
            except BaseException:
                self.ring.release(slot)
                raise
            return RingBatch(self.ring.id, slot, shape, fields)
        if self.images is not None:
            image = torch.from_numpy(self.images[idx])
        else:
            image = _batch_buffer((len(idx), *self.shape))
            self._read(idx, image.numpy())
        batch = {"image": image, **{k: torch.from_numpy(v) for k, v in fields.items()}}
        return batch if batched else {k: v[0] for k, v in batch.items()}

    def _read(self, idx: np.ndarray, out: np.ndarray) -> None:
        for k, i in enumerate(idx):
            self.reader.read_into(int(self.positions[i]), out[k])  # each chunk lands in its batch slot


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 batch. In a loader worker it is allocated in shared memory, as torch's default collate does:
    the batch crosses to the main process through shared memory anyway, and a plain tensor would be copied into it
    when sent (~10 ms per 16 MB batch), so the chunks are read straight into the shared pages instead."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # what default_collate uses; private API
    if get_worker_info() is None or new_shared is None:
        return torch.from_numpy(aligned_empty(shape))  # page-aligned: the kernel copies chunks in ~2x faster
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(int(np.prod(shape)))).view(shape)


def available_memory() -> int:
    """Bytes the OS says a new allocation can get without swapping (MemAvailable), else total physical memory."""
    if os.path.exists("/proc/meminfo"):  # Linux
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def want_in_memory(setting: str | bool, nbytes: int) -> bool:
    """'auto': load into RAM when the samples take under a third of the available memory."""
    if setting == "auto":
        return nbytes < available_memory() // 3
    return bool(setting)


def make_loader(dataset: Dataset, batch_size: int, workers: int, train: bool, seed: int, rank: int = 0,
                world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """The loader of every model lsdc trains. Training: shuffled, each rank its own shard, the order fixed by
    (seed, epoch) via `sampler.set_epoch`. Validation/prediction: in order, unsharded.

    A CacheDataset returns whole batches (its `__getitems__`) and, with worker processes, sends them through reused
    shared slots; samples already in RAM need no worker processes. Any other dataset is collated by torch.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False) if train else None
    batched = isinstance(dataset, CacheDataset)
    workers = 0 if getattr(dataset, "images", None) is not None else workers
    # Its own generator: each new iterator (and each epoch of persistent workers) draws a worker seed from it, which
    # from the global RNG would shift dropout's stream depending on when the workers were started (a resume).
    generator = torch.Generator().manual_seed(seed + rank)
    ring = None
    if batched and workers > 0 and dataset.shape is not None and _forks():
        # Reused shared slots (train.batch_ring): prefetch_factor batches in flight per worker, plus the one the
        # consumer holds and the one it is about to drop.
        ring = BatchRing(workers, PREFETCH + 2, (batch_size, *dataset.shape))
    return CacheLoader(dataset, ring, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                       pin_memory=pin_memory, persistent_workers=workers > 0, drop_last=False, generator=generator,
                       collate_fn=batch_as_is if batched else None, prefetch_factor=PREFETCH if workers > 0 else None,
                       worker_init_fn=partial(_attach_ring, ring) if ring is not None else None)


PREFETCH = 2  # batches each loader worker reads ahead (torch's default)


def _forks() -> bool:
    """Whether loader workers will be forked (the ring is inherited, not pickled): the start method the user set, else
    the platform's default (fork on Linux up to Python 3.13; 3.14 moved to forkserver, macOS and Windows spawn).
    Never forced: forking is the user's choice to make."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return method == "fork"


def _attach_ring(ring: BatchRing, worker_id: int) -> None:
    # The worker's own copy of the dataset, so other loaders are untouched; this partial, held by the loader, is also
    # what keeps the ring registered while its workers can still send batches.
    get_worker_info().dataset.ring = ring


class CacheLoader(DataLoader):
    """torch's DataLoader, turning the workers' slot numbers (train.batch_ring.RingBatch) back into batches."""

    def __init__(self, dataset: CacheDataset, ring: BatchRing | None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.ring = ring

    @property
    def ring_fallbacks(self) -> int | None:
        """Batches the workers sent in a fresh block because all their slots were held (None: no ring)."""
        return None if self.ring is None else int(self.ring.fallbacks.sum())

    def __iter__(self):
        for batch in super().__iter__():
            yield batch.to_batch() if isinstance(batch, RingBatch) else batch


def batch_as_is(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The collate step of a loader over CacheDataset: `__getitems__` already returns the finished batch."""
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device, image_size: int | None = None
              ) -> dict[str, torch.Tensor]:
    """Move a batch; the uint8 image becomes float in [0, 1] on the device (and is resized there if asked)."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    x = out["image"].float().div_(255)
    if image_size is not None and x.shape[-1] != image_size:
        b, s = x.shape[:2]
        x = F.interpolate(x.flatten(0, 1), size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=True).view(b, s, 3, image_size, image_size)
    out["image"] = x
    return out
