"""`lsdc bench train CACHE`: how many samples/s the real model trains at, and whether the loader keeps up.

  loader       train.data's loader alone (the configured workers, pinned memory on a GPU), steady state
  model        training steps on a few batches already on the device: what the GPU (or CPU) consumes
  end_to_end   training steps fed by the loader, as train.loop does it, with GPU utilisation sampled meanwhile
  headroom     loader samples/s / model samples/s (target >= 1.5 on a GPU: the GPU never waits on the CPU)

The step is train.loop's: uint8 -> float on the device, GPU augmentation, autocast (bf16 on GPUs that have it),
channels_last, weighted CE, grad-norm clip, AdamW.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from lsdc.bench.common import log, machine_info, ratio

TARGETS = {"loader_headroom": (">=", 1.5)}


class GpuSampler(threading.Thread):
    """Samples GPU utilisation (%) every `interval` s: torch.cuda.utilization (pynvml) or nvidia-smi."""

    def __init__(self, device_index: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.index, self.interval, self.samples = device_index, interval, []
        self.stop_event = threading.Event()

    def read(self) -> float | None:
        import torch

        try:
            return float(torch.cuda.utilization(self.index))
        except Exception:  # noqa: BLE001 - pynvml missing or NVML refusing (its own error types): ask the CLI
            if shutil.which("nvidia-smi") is None:
                return None
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", str(self.index)], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            value = self.read()
            if value is not None:
                self.samples.append(value)

    def stop(self) -> dict[str, Any]:
        self.stop_event.set()
        self.join(timeout=5)
        s = self.samples
        return {"mean": sum(s) / len(s), "min": min(s), "max": max(s), "n": len(s)} if s else {"n": 0}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: time only finished work


def bench_train(cache_path: str | Path, *, backbone: str = "tf_efficientnetv2_s", image_size: int | None = 256,
                batch_size: int = 12, steps: int = 20, warmup: int = 3, workers: int = 2, device: str = "auto",
                amp: str = "auto", channels_last: bool = True, compile: bool = False,
                conditions: tuple[str, ...] | None = None, command: str | None = None) -> dict[str, Any]:
    """Time `steps` training steps (after `warmup`) of the real model on an existing cache."""
    import torch

    import cache
    from train.config import TrainConfig
    from train.grade import GraderTask
    from train.loop import new_training
    from train.runtime import setup_runtime

    reader = cache.open(cache_path)
    conditions = conditions or tuple(dict.fromkeys(reader.index["condition"]))
    cfg = GraderTask.resolve_config(TrainConfig(
        conditions=conditions, backbone=backbone, pretrained=False, image_size=image_size, batch_size=batch_size,
        workers=workers, device=device, amp=amp, channels_last=channels_last, compile=compile, in_memory=False,
        freeze_epochs=0, swa_start=None), reader)
    rt = setup_runtime(cfg.device, cfg.amp)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    task = GraderTask(cfg, reader)
    positions = task.trained_positions()
    data = task.fold_data(positions, positions[:0], 0, 1, rt.device)  # every labelled sample trains
    loader, dataset = data.train_loader, data.train_loader.dataset
    training = new_training(task, data, cfg, rt)
    model = training.model
    step_fn = _Step(task, training, cfg, rt)
    result: dict[str, Any] = {
        "bench": "train", "command": command, "machine": machine_info(), "cache": str(Path(cache_path).resolve()),
        "device": str(rt.device), "device_name": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} torch threads)", "amp": str(rt.amp_dtype), "backbone": cfg.backbone,
        "image_size": cfg.image_size, "slices": cfg.slices, "batch_size": cfg.batch_size, "workers": cfg.workers,
        "channels_last": cfg.channels_last, "compile": cfg.compile, "samples_in_cache": len(dataset),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6, "steps": steps, "warmup": warmup}

    log("bench train: loader alone")
    result["loader"] = _loader_rate(loader, batches=max(steps, 2 * len(loader)))
    log("bench train: model on device-resident batches")
    batches = [b for _, b in zip(range(4), _forever(loader))]
    # An epoch ends in a smaller batch; its first step autotunes cuDNN afresh (new shapes, seconds on a GPU), which
    # the timed phases would otherwise pay whenever they cross an epoch's end. Warm that shape too.
    result["partial_batch"] = len(dataset) % cfg.batch_size
    result["model"] = _model_rate(step_fn, batches, steps, warmup, rt, result["partial_batch"])
    del batches  # on the CPU they are views of the loader's shared slots (train.batch_ring): give them back
    log("bench train: end to end")
    result["end_to_end"] = _end_to_end(step_fn, loader, steps, rt)
    result["loader"]["ring_fallbacks"] = loader.ring_fallbacks  # batches outside the reused slots (should be ~0)
    if rt.device.type == "cuda":
        result["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
    result["ratios"] = {
        "loader_headroom": ratio(result["loader"]["samples_per_s"], result["model"]["samples_per_s"]),
        "end_to_end_over_model": ratio(result["end_to_end"]["samples_per_s"], result["model"]["samples_per_s"]),
    }
    from lsdc.bench.prep_bench import _verdict

    verdict = _verdict(result["ratios"]["loader_headroom"], *TARGETS["loader_headroom"])
    verdict["applies"] = rt.device.type == "cuda"  # the target is about feeding a GPU; on a CPU it is informative
    result["targets"] = {"loader_headroom": verdict}
    result["machine_end"] = {"load_avg": machine_info()["load_avg"]}
    return result


class _Step:
    """One optimisation step exactly as the training loop takes it (train.loop.train_step)."""

    def __init__(self, task, training, cfg, rt):
        import torch

        self.task, self.training, self.cfg, self.rt = task, training, cfg, rt
        self.training.generator.manual_seed(cfg.seed)
        self.forward = torch.compile(training.model) if cfg.compile else training.model
        training.model.train()

    def __call__(self, batch: dict) -> None:
        from train.loop import train_step

        train_step(self.task, self.forward, self.training, batch, self.cfg, self.rt)


def _forever(loader):
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _loader_rate(loader, batches: int) -> dict[str, Any]:
    """Samples/s of the loader alone, after one batch (worker start-up) and with the real batch size."""
    it = _forever(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for _, batch in zip(range(batches), it):
        n += len(batch["image"])
    seconds = time.perf_counter() - t0
    return {"samples": n, "seconds": seconds, "samples_per_s": n / seconds}


def _model_rate(step_fn: _Step, batches: list[dict], steps: int, warmup: int, rt, partial: int = 0
                ) -> dict[str, Any]:
    # uint8 batches already on the device: the step's copy is a no-op, its float conversion (on the device, as in
    # training) is timed with the model
    on_device = [{k: v.to(rt.device) for k, v in b.items()} for b in batches]
    for i in range(warmup):  # cuDNN autotuning, allocator growth, compile
        step_fn(on_device[i % len(on_device)])
    if warmup and partial:
        step_fn({k: v[:partial] for k, v in on_device[0].items()})
    _sync(rt.device)
    t0, n = time.perf_counter(), 0
    for i in range(steps):
        b = on_device[i % len(on_device)]
        step_fn(b)
        n += len(b["image"])
    _sync(rt.device)
    seconds = time.perf_counter() - t0
    return {"samples": n, "seconds": seconds, "samples_per_s": n / seconds, "step_s": seconds / steps}


def _end_to_end(step_fn: _Step, loader, steps: int, rt) -> dict[str, Any]:
    sampler = GpuSampler(rt.device.index or 0) if rt.device.type == "cuda" else None
    it = _forever(loader)
    step_fn(next(it))  # the first batch pays the loader's start-up, as in any epoch
    _sync(rt.device)
    if sampler:
        sampler.start()
    t0, n = time.perf_counter(), 0
    for _, batch in zip(range(steps), it):
        step_fn(batch)
        n += len(batch["image"])
    _sync(rt.device)
    seconds = time.perf_counter() - t0
    out = {"samples": n, "seconds": seconds, "samples_per_s": n / seconds}
    if sampler:
        out["gpu_utilisation"] = sampler.stop()
    return out
