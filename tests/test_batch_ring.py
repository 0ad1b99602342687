"""train.batch_ring: loader workers reuse shared batch slots; batches stay bit-exact and a kept batch is never
overwritten."""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

SPINAL = "Spinal Canal Stenosis"
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the ring needs the fork start method (Linux)")


def _dataset(tmp_path, n_studies=4):
    import cache
    from tiny_cache import make_tiny_cache
    from train.data import CacheDataset, select_samples

    reader = cache.open(make_tiny_cache(tmp_path / "c", n_studies=n_studies))
    return reader, CacheDataset(reader, select_samples(reader.index, (SPINAL,)), (SPINAL,))


def _expected(reader, batch) -> np.ndarray:
    """The batch's samples read by the main process, found by their cache rows."""
    position = {int(r): i for i, r in enumerate(reader.index["row"])}
    return np.stack([reader[position[r]] for r in batch["row"].tolist()])


@linux_only
def test_workers_send_slots_and_batches_equal_the_main_process_read(tmp_path):
    from train.data import make_loader

    reader, ds = _dataset(tmp_path)
    plain = [b for b in make_loader(ds, 3, workers=0, train=True, seed=7)]
    loader = make_loader(ds, 3, workers=2, train=True, seed=7)
    assert loader.ring is not None and loader.ring.busy.sum() == 0
    ringed = []
    for b in loader:
        # the image is a view of the ring's shared block, not a fresh shared-memory tensor
        base = loader.ring.slots.ctypes.data
        assert base <= b["image"].data_ptr() < base + loader.ring.slots.nbytes
        ringed.append({k: v.clone() for k, v in b.items()})
    assert len(ringed) == len(plain) == -(-len(ds) // 3) > 2
    for a, b in zip(plain, ringed):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same order, same bytes
        assert np.array_equal(b["image"].numpy(), _expected(reader, b))
    del b, ringed
    gc.collect()
    assert loader.ring.busy.sum() == 0  # every slot came back once its views died


@linux_only
def test_kept_batches_are_never_overwritten(tmp_path):
    """More batches kept alive than the ring has slots: the workers fall back to fresh blocks, nothing is reused."""
    from train.data import make_loader

    reader, ds = _dataset(tmp_path, n_studies=10)  # 50 samples -> 25 batches of 2, ring: 1 worker x 4 slots
    loader = make_loader(ds, 2, workers=1, train=True, seed=0)
    kept = list(loader)
    assert len(kept) == 25 and loader.ring.busy.sum() == loader.ring.per_worker  # the kept ones hold every slot
    assert loader.ring.fallbacks.sum() == 25 - loader.ring.per_worker  # the rest came in fresh blocks, counted
    for b in kept:
        assert np.array_equal(b["image"].numpy(), _expected(reader, b))
    kept.clear()
    gc.collect()
    assert loader.ring.busy.sum() == 0
    second = list(loader)  # the next epoch reuses the freed slots and is right again
    assert all(np.array_equal(b["image"].numpy(), _expected(reader, b)) for b in second)


@linux_only
def test_a_view_of_the_image_keeps_the_slot(tmp_path):
    from train.batch_ring import BatchRing, RingBatch

    ring = BatchRing(workers=1, per_worker=2, batch_shape=(2, 4))
    slot = ring.acquire(0)
    ring.view(slot, (2, 4))[:] = 7
    batch = RingBatch(ring.id, slot, (2, 4), {"row": np.array([1, 2])}).to_batch()
    first_row = batch["image"][0]  # a torch view: shares the slot
    del batch
    gc.collect()
    assert ring.busy[slot] == 1 and first_row.tolist() == [7] * 4
    del first_row
    gc.collect()
    assert ring.busy[slot] == 0


def test_ring_slots_acquire_release_and_size_check():
    from train.batch_ring import PAGE, BatchRing

    ring = BatchRing(workers=2, per_worker=2, batch_shape=(3, 5))
    assert ring.slot_bytes == PAGE and ring.slots.ctypes.data % PAGE == 0  # page-aligned slots
    assert [ring.acquire(1), ring.acquire(1), ring.acquire(1)] == [2, 3, None]  # worker 1 owns slots 2 and 3 only
    assert ring.acquire(0) == 0
    ring.release(2)
    assert ring.acquire(1) == 2
    with pytest.raises(ValueError, match="does not fit"):
        ring.view(0, (PAGE + 1,))


def test_pin_memory_copies_then_frees_the_slot(monkeypatch):
    from train.batch_ring import BatchRing, RingBatch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(1) or self.clone())
    ring = BatchRing(workers=1, per_worker=1, batch_shape=(2, 3))
    slot = ring.acquire(0)
    ring.view(slot, (2, 3))[:] = np.arange(6).reshape(2, 3)
    from torch.utils.data._utils.pin_memory import pin_memory  # what the DataLoader's pin thread calls

    batch = pin_memory(RingBatch(ring.id, slot, (2, 3), {"label": np.array([0, 2])}))
    assert ring.busy[slot] == 0 and len(pinned) == 2  # freed as soon as the copy exists
    ring.view(slot, (2, 3))[:] = 0  # the next batch may land there: the pinned copy is unaffected
    assert batch["image"].tolist() == [[0, 1, 2], [3, 4, 5]] and batch["label"].tolist() == [0, 2]


def test_a_failed_read_frees_its_slot(tmp_path, monkeypatch):
    import train.data
    from cache import CacheError
    from train.batch_ring import BatchRing

    reader, ds = _dataset(tmp_path)
    ds.ring = BatchRing(workers=1, per_worker=2, batch_shape=(2, *ds.shape))
    monkeypatch.setattr(train.data, "get_worker_info", lambda: SimpleNamespace(id=0))

    def broken(i, out):
        raise CacheError(f"chunk {i}: checksum mismatch")

    monkeypatch.setattr(reader, "read_into", broken)
    with pytest.raises(CacheError, match="checksum"):
        ds.__getitems__([0, 1])
    assert ds.ring.busy.sum() == 0


@linux_only
def test_an_abandoned_epoch_gives_its_slots_back(tmp_path):
    """Stopping mid-epoch: the batches the workers had already sent are dropped by the DataLoader when the next epoch
    starts; their slots must come back, or the ring would silently stop being used."""
    from train.data import make_loader

    reader, ds = _dataset(tmp_path, n_studies=10)
    loader = make_loader(ds, 2, workers=2, train=True, seed=0)
    for _ in range(4):
        next(iter(loader))  # one batch, then the iterator is reset with the prefetched ones in flight
    gc.collect()
    before = int(loader.ring.fallbacks.sum())
    batches = 0
    for b in loader:
        batches += 1
        assert np.array_equal(b["image"].numpy(), _expected(reader, b))
    del b
    gc.collect()
    assert batches == 25 and int(loader.ring.fallbacks.sum()) == before  # a whole epoch in reused slots
    assert loader.ring.busy.sum() == 0


@linux_only
def test_a_forked_child_never_frees_the_parents_slots():
    """A fork inherits the finalizers and the shared flags: a child dropping its copy of a batch must not free the
    slot the parent still holds (the next batch would overwrite it)."""
    from train.batch_ring import BatchRing, RingBatch

    ring = BatchRing(workers=1, per_worker=1, batch_shape=(4,))
    slot = ring.acquire(0)
    batch = RingBatch(ring.id, slot, (4,), {})
    batch.__setstate__(dict(batch.__dict__))  # as received by the main process
    image = batch.to_batch()["image"]
    pid = os.fork()
    if pid == 0:  # the child: drop everything, collect, exit
        del image, batch
        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    assert ring.busy[slot] == 1  # still the parent's
    del image
    gc.collect()
    assert ring.busy[slot] == 0


def test_a_received_batch_that_is_never_handed_out_frees_its_slot():
    from train.batch_ring import BatchRing, RingBatch

    ring = BatchRing(workers=1, per_worker=2, batch_shape=(4,))
    slot = ring.acquire(0)
    sent = RingBatch(ring.id, slot, (4,), {})
    del sent  # the worker's copy: dropping it after sending frees nothing
    assert ring.busy[slot] == 1
    received = RingBatch(ring.id, slot, (4,), {})
    received.__setstate__(dict(received.__dict__))
    del received  # the DataLoader dropped it (iterator reset)
    assert ring.busy[slot] == 0


def test_the_ring_is_used_only_where_workers_fork(tmp_path, monkeypatch):
    import train.data

    _, ds = _dataset(tmp_path)
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    loader = train.data.make_loader(ds, 3, workers=1, train=True, seed=0)
    assert loader.ring is None and loader.multiprocessing_context is None  # the user's start method, untouched
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "fork")
    assert train.data.make_loader(ds, 3, workers=1, train=True, seed=0).ring is not None
