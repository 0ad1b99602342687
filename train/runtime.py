"""Where the process runs: device, DDP (torchrun), AMP, seeds, and the RNG states a checkpoint carries."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None  # None = full precision
    use_scaler: bool = False  # fp16 needs loss scaling; bf16 has fp32's range and does not

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()


def setup_runtime(device: str = "auto", amp: str = "auto") -> Runtime:
    """Joins the process group when launched by torchrun (RANK/WORLD_SIZE set): nccl on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    rt = Runtime(dev, rank, world_size)
    rt.amp_dtype, rt.use_scaler = amp_policy(amp, dev)
    return rt


def amp_policy(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """'auto': bf16 on GPUs that have it, fp16 + GradScaler on older GPUs, full precision on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None, False
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, device.type == "cuda"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_deterministic(on: bool) -> None:
    """Bit-identical reruns (and resumes), at some speed cost on GPUs."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs this to be deterministic
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG the run draws from, as tensors and plain lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "augment": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    generator.set_state(state["augment"])


def all_reduce_sum(values: list[float], rt: Runtime) -> list[float]:
    """Sum numbers over the ranks (identity on one process)."""
    if not rt.ddp:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_flag(flag: bool, rt: Runtime) -> bool:
    """Rank 0's decision (e.g. early stop) for every rank."""
    if not rt.ddp:
        return flag
    t = torch.tensor([int(flag)], device=rt.device)
    dist.broadcast(t, 0)
    return bool(t.item())
