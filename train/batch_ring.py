"""Shared-memory batch slots that loader workers reuse, so a batch reaches the main process without fresh pages.

Why: by default a worker's batch travels in a new shared-memory block (torch's collate does this, and so did
`train.data._batch_buffer`). The worker faults in and zeroes every one of its ~4,000 pages, and the main process maps
and later unmaps them. On the VMs we measured, that costs several times the read itself: ~9 ms of the worker's time
and ~2.5 ms of the main process's per 16 MB batch, so extra workers added almost nothing (docs/benchmarks.md).

Here the main process maps one block of slots before the workers fork. Each worker owns a few slots and reads its
chunks straight into a free one; only the slot number and the small fields are pickled. The main process hands out a
view of the slot, and the pages stay resident from batch to batch.

A slot is free again when the last view of it dies (a finalizer on the numpy view the batch's tensor wraps). A batch
that is kept (`list(loader)`, a notebook cell) just keeps its slot. A worker whose slots are all held falls back to a
fresh block (counted in `fallbacks`), so it never overwrites a live batch and never waits. With pin_memory, the pin
thread copies the slot into pinned memory and frees it at once. A slot whose batch reached the main process but was
never handed out (an epoch abandoned midway: the DataLoader drops what its workers had already sent) is freed when
that message is dropped. Only the process that made the ring frees slots: a forked child inherits the finalizers and
the shared flags, and must not free what the parent still holds.

Needs the fork start method: the block is inherited by the workers, not pickled to them.
"""

from __future__ import annotations

import itertools
import mmap
import os
import weakref

import numpy as np
import torch

PAGE = mmap.PAGESIZE
_RINGS: weakref.WeakValueDictionary[int, BatchRing] = weakref.WeakValueDictionary()  # main process: id -> ring
_IDS = itertools.count()


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class BatchRing:
    """`workers x per_worker` slots of one uint8 batch each, plus a busy flag per slot, in one shared mapping."""

    def __init__(self, workers: int, per_worker: int, batch_shape: tuple[int, ...]):
        self.id = next(_IDS)
        self.workers, self.per_worker, self.batch_shape = workers, per_worker, tuple(batch_shape)
        self.slot_bytes = _round_up(int(np.prod(batch_shape)), PAGE)  # page-aligned slots: the fast copy path
        self.owner = os.getpid()  # the only process that frees slots
        n = workers * per_worker
        counters = _round_up(n, 8)
        header = _round_up(counters + 8 * workers, PAGE)
        # MAP_SHARED | MAP_ANONYMOUS: memory the forked workers share with this process, outside /dev/shm's quota.
        self._map = mmap.mmap(-1, header + n * self.slot_bytes)
        # Each flag has one writer at a time: the owning worker sets it (0 -> 1), the main process clears it (1 -> 0).
        # Plain byte stores suffice: the worker's slot data reach the main process through a pipe (a full barrier)
        # after its flag store, and the main process clears a flag only after the last reference to the slot's view
        # is dropped (an atomic refcount decrement in torch, which orders the reads before it).
        self.busy = np.frombuffer(self._map, np.uint8, count=n)
        self.fallbacks = np.frombuffer(self._map, np.uint64, count=workers, offset=counters)  # per worker
        self.slots = np.frombuffer(self._map, np.uint8, count=n * self.slot_bytes, offset=header).reshape(n, -1)
        _RINGS[self.id] = self

    def acquire(self, worker: int) -> int | None:
        """In worker `worker`: claim one of its free slots, or None (counted) when the consumer holds all of them."""
        for slot in range(worker * self.per_worker, (worker + 1) * self.per_worker):
            if self.busy[slot] == 0:
                self.busy[slot] = 1
                return slot
        self.fallbacks[worker] += 1
        return None

    def release(self, slot: int) -> None:
        if os.getpid() == self.owner:  # a forked child running an inherited finalizer frees nothing
            self.busy[slot] = 0

    def view(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        if int(np.prod(shape)) > self.slot_bytes:
            raise ValueError(f"a batch of shape {shape} does not fit a slot of {self.slot_bytes} bytes")
        return self.slots[slot, : int(np.prod(shape))].reshape(shape)


class RingBatch:
    """What a worker sends instead of a batch: where its image is, and the small fields by value."""

    def __init__(self, ring_id: int, slot: int, shape: tuple[int, ...], fields: dict[str, np.ndarray]):
        self.ring_id, self.slot, self.shape, self.fields = ring_id, slot, tuple(shape), fields
        self._holds_slot = False  # True once received: until handed out, this message is what keeps the slot

    def __setstate__(self, state: dict) -> None:  # unpickled in the main process
        self.__dict__.update(state, _holds_slot=True)

    def __del__(self) -> None:
        # Received but never handed out: the DataLoader dropped it (an epoch abandoned midway, its iterator reset).
        if self.__dict__.get("_holds_slot") and (ring := _RINGS.get(self.ring_id)) is not None:
            ring.release(self.slot)

    def _take_ring(self) -> BatchRing:
        ring = _RINGS.get(self.ring_id)
        if ring is None:  # the loader's worker_init_fn holds the ring while its workers can still send batches
            raise RuntimeError(f"batch slot {self.slot} of ring {self.ring_id}: that loader is gone")
        self._holds_slot = False  # from here the caller frees the slot
        return ring

    def to_batch(self) -> dict[str, torch.Tensor]:
        """In the main process: the batch as tensors; the image is a view of the slot, freed with its last view."""
        ring = self._take_ring()
        image = ring.view(self.slot, self.shape)
        weakref.finalize(image, ring.release, self.slot)  # torch.from_numpy keeps `image` alive while any view lives
        return {"image": torch.from_numpy(image), **{k: torch.from_numpy(v) for k, v in self.fields.items()}}

    def pin_memory(self, device=None) -> dict[str, torch.Tensor]:
        """Called by the DataLoader's pin-memory thread: copy into pinned memory and free the slot at once."""
        ring = self._take_ring()
        try:
            image = torch.from_numpy(ring.view(self.slot, self.shape)).pin_memory()
        finally:
            ring.release(self.slot)
        return {"image": image, **{k: torch.from_numpy(v).pin_memory() for k, v in self.fields.items()}}
