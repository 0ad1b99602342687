"""The training loop of every lsdc model: folds -> epochs -> steps, validation every epoch, checkpoints that resume
exactly. What differs between models (data, model, loss, metrics, selection rule) comes from a task (train/tasks.py).

One process, or one per GPU under torchrun (DDP). Only rank 0 validates and writes; every rank trains its shard.
Epoch indices are 0-based everywhere (config, metrics.jsonl, checkpoints).

    fit(cache_path, out_dir, cfg)      a new run          fit(cache_path, out_dir, resume=True)   continue it
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import cache
from cache.errors import InputError, MissingInput, UserError
from cache.io import atomic_write, atomic_write_json, json_safe, progress_options, read_jsonl
from train import folds as folds_mod
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import LoopConfig
from train.model import WeightAverage
from train.runtime import (Runtime, all_reduce_sum, broadcast_flag, rng_state, seed_everything, set_deterministic,
                           set_rng_state, setup_runtime)
from train.tasks import FoldData, Task, task_class

log = logging.getLogger("lsdc.train")


class RunExists(UserError, FileExistsError):
    """OUT already holds a run with a checkpoint: resume it or choose another folder."""


# ----------------------------------------------------------------------------- schedule and optimiser

def lr_factor(step: int, steps_per_epoch: int, cfg: LoopConfig, base_lr: float) -> float:
    """Linear warm-up, cosine to 0 at the end (or at swa_start), then SWA's constant swa_lr."""
    epoch = step / steps_per_epoch
    if cfg.swa_start is not None and epoch >= cfg.swa_start:
        return cfg.swa_lr / base_lr
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    end = (cfg.swa_start if cfg.swa_start is not None else cfg.epochs) * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1.0, end - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: LoopConfig, steps_per_epoch: int):
    groups = [{"params": model.backbone_parameters(), "lr": cfg.lr_backbone, "name": "backbone"},
              {"params": model.head_parameters(), "lr": cfg.lr_head, "name": "head"}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    # a group at lr 0 (a backbone kept fixed) stays at 0: its factor is never used
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [partial(lr_factor, steps_per_epoch=steps_per_epoch, cfg=cfg, base_lr=g["lr"] or 1.0) for g in groups])
    return opt, sched


# ----------------------------------------------------------------------------- what a checkpoint restores

@dataclass
class Training:
    """Everything with state that an exact resume restores, besides the fold's selection state."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    average: WeightAverage | None  # EMA or SWA of the weights, or None
    generator: torch.Generator  # augmentation draws

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.average.state_dict() if self.average is not None else None,
                "rng": rng_state(self.generator)}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])  # copies onto the model's device
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.average is not None and ckpt["ema"] is not None:
            self.average.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"], self.generator)

    def eval_model(self) -> tuple[nn.Module, str]:
        """The weights validation and the best checkpoint use: the average once it holds any, else the model."""
        if self.average is not None and self.average.n_averaged > 0:
            return self.average.module, "ema"
        return self.model, "model"


@dataclass
class FoldState:
    """Selection and stopping: the best epoch so far and the counters early stopping reads."""

    best_key: list[float] | None = None
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best one
    stopped: bool = False
    counters: dict[str, int] = field(default_factory=dict)  # the task's monitors (the grader: dead-class streak)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FoldState:
        d = dict(d)
        counters = dict(d.pop("counters", {}))
        if "dead_streak" in d:  # checkpoints written before the task split kept it at the top level
            counters["dead_streak"] = d.pop("dead_streak")
        return cls(**d, counters=counters)


def select(key: list[float], epoch: int, state: FoldState, patience: int | None, what: str) -> tuple[bool, str | None]:
    """Is this epoch the best so far, and has patience run out? Updates `state`."""
    best = state.best_key is None or key > state.best_key
    if best:
        state.best_key, state.best_epoch, state.bad_epochs = key, epoch, 0
    else:
        state.bad_epochs += 1
    stop = patience is not None and state.bad_epochs >= patience
    return best, f"no better {what} for {patience} epochs" if stop else None


def log_records(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Append to metrics.jsonl (strict JSON: NaN written as null)."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in records)


# ----------------------------------------------------------------------------- one step, one epoch of training

def train_step(task: Task, model: nn.Module, training: Training, batch: dict[str, torch.Tensor], cfg: LoopConfig,
               rt: Runtime) -> tuple[torch.Tensor, int]:
    """One optimisation step (also what `lsdc bench train` times): forward and loss under autocast, backward through
    the scaler, clip, step, schedule, average. -> (the batch's loss on the device, its sample count)."""
    with rt.autocast():
        loss, n = task.loss(model, batch, training.generator, rt.device)
    opt = training.optimizer
    opt.zero_grad(set_to_none=True)
    training.scaler.scale(loss).backward()
    if cfg.grad_clip:
        training.scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(training.model.parameters(), cfg.grad_clip)
    training.scaler.step(opt)
    training.scaler.update()
    training.scheduler.step()  # per step: the warm-up and cosine are smooth, not staircase
    if training.average is not None and cfg.ema_decay is not None:
        training.average.update(training.model)
    return loss, n


def train_one_epoch(task: Task, model: nn.Module, training: Training, loader, cfg: LoopConfig, rt: Runtime,
                    desc: str) -> dict[str, Any]:
    model.train()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (loss * n, n) kept on the device: no sync
    t0 = time.time()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, **progress_options(None if rt.master else False))
    for step, batch in enumerate(bar):
        loss, n = train_step(task, model, training, batch, cfg, rt)
        total[0] += loss.detach() * n
        total[1] += n
        if step % 10 == 0 and not bar.disable:  # .item() is a CPU-GPU sync point: not every step
            seen = total[1].item()
            bar.set_postfix(loss=f"{total[0].item() / seen:.4f}", samples_s=f"{seen / (time.time() - t0):.1f}")
    loss_sum, n = all_reduce_sum(total.tolist(), rt)
    return {"train_loss": loss_sum / max(n, 1), "train_samples": int(n), "samples_per_s": n / (time.time() - t0)}


# ----------------------------------------------------------------------------- one fold

def new_training(task: Task, data: FoldData, cfg: LoopConfig, rt: Runtime) -> Training:
    """Model, optimiser, schedule, scaler, average, generator: built the same way on a resume, then overwritten."""
    seed_everything(cfg.seed)
    raw = task.build_model(data).to(rt.device)
    opt, sched = make_optimizer(raw, cfg, len(data.train_loader))
    average = WeightAverage(raw, cfg.ema_decay) if (cfg.ema_decay is not None or cfg.swa_start is not None) else None
    return Training(raw, opt, sched, torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler), average,
                    torch.Generator(device=rt.device))


def train_fold(task: Task, fold: int, data: FoldData, run_dir: Path, rt: Runtime, resume: bool) -> dict[str, Any]:
    cfg = task.cfg
    fold_dir = run_dir / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    training = new_training(task, data, cfg, rt)
    meta = {"kind": cfg.kind, **task.checkpoint_meta(data)}
    state, start = FoldState(), 0
    if resume and (fold_dir / "last.pt").exists():
        ckpt = load_checkpoint(fold_dir / "last.pt")
        training.load_state_dict(ckpt)
        state, start = FoldState.from_dict(ckpt["state"]), ckpt["epoch"] + 1
        if rt.master:
            print(f"fold {fold}: resumed from {fold_dir / 'last.pt'} at epoch {start}")
    if resume and rt.master:  # also with no last.pt: a kill in epoch 0 may have logged that epoch already
        _truncate_metrics(run_dir / "metrics.jsonl", fold, start)
    if rt.master:
        print(f"fold {fold}: {task.describe(data)}, {len(data.train_loader)} steps per epoch, device {rt.device} "
              f"x{rt.world_size}, amp {rt.amp_dtype}")

    raw, model = training.model, None
    for epoch in range(start, cfg.epochs):
        if state.stopped:
            break
        # seeds depend on (seed, epoch, rank) only: a resumed run draws exactly what the uninterrupted one drew
        torch.manual_seed(cfg.seed + 1000 * epoch + rt.rank)
        training.generator.manual_seed(cfg.seed + 1000 * epoch + rt.rank + 1)
        data.train_loader.sampler.set_epoch(epoch)
        if model is None or raw.backbone_frozen != (epoch < cfg.freeze_epochs):
            raw.freeze_backbone(epoch < cfg.freeze_epochs)
            model = _wrap(raw, cfg, rt)  # DDP syncs only the parameters that train: re-wrap when that set changes
        lrs = [g["lr"] for g in training.optimizer.param_groups]
        tr = train_one_epoch(task, model, training, data.train_loader, cfg, rt, desc=f"fold {fold} epoch {epoch}")
        if training.average is not None and cfg.ema_decay is None and epoch >= cfg.swa_start:
            training.average.update(raw)  # SWA: one equal-weight snapshot per epoch
        if rt.master:
            evaluated, eval_with = training.eval_model()
            val = task.validate(evaluated, data, rt.device, rt.autocast())
            record = {"type": "epoch", "fold": fold, "epoch": epoch, "lr_backbone": lrs[0], "lr_head": lrs[1],
                      "frozen": raw.backbone_frozen, "eval_with": eval_with, "world_size": rt.world_size, **tr, **val}
            record["best"], reason = select(task.selection_key(record), epoch, state, cfg.patience, task.selection)
            events, monitor_reason = task.monitor(record, state.counters)
            reason = monitor_reason or reason
            state.stopped = reason is not None
            stop_event = [{"type": "stop", "fold": fold, "epoch": epoch, "reason": reason}] if reason else []
            log_records(run_dir, [record, *events, *stop_event])
            # best before last: a kill between the two resumes from the older last.pt and redoes this epoch
            ckpt = {**training.state_dict(), "epoch": epoch, "config": cfg.to_dict(), "fold": fold,
                    "state": dataclasses.asdict(state), "eval_with": eval_with, **meta}
            for name in (["best.pt"] if record["best"] else []) + ["last.pt"]:
                save_checkpoint(fold_dir / name, ckpt)
            print(task.summary_line(record), flush=True)
            if reason:
                print(f"fold {fold}: stopping after epoch {epoch}: {reason}")
        state.stopped = broadcast_flag(state.stopped, rt)
        rt.barrier()  # nobody starts the next epoch (or a resume) before rank 0 has written the checkpoint

    result = {"fold": fold, "weights_sha256": _weights_hash(raw)}
    if rt.master:
        result.update(task.fold_outputs(fold, fold_dir, data, rt.device, rt.autocast()),
                      state=dataclasses.asdict(state))
    return result


def _wrap(raw: nn.Module, cfg: LoopConfig, rt: Runtime) -> nn.Module:
    model = raw
    if rt.ddp:
        model = DistributedDataParallel(raw, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


# ----------------------------------------------------------------------------- the whole run

def cache_config_hash(reader) -> str:
    """The cache's own config hash when its manifest has one, else a hash of its config."""
    manifest = getattr(reader, "manifest", {}) or {}
    if manifest.get("config_hash"):
        return str(manifest["config_hash"])
    return hashlib.sha256(json.dumps(manifest.get("config", {}), sort_keys=True, default=str).encode()).hexdigest()


def open_reader(path: str | Path, kind: str):
    """The cache a model of `kind` trains on: the crop cache (grader) or the series-volume cache (localiser)."""
    if kind == "localiser":
        from cache.volumes import open_volumes

        return open_volumes(path)
    return cache.open(path)


def fit(cache_path: str | Path | None, out_dir: str | Path, cfg: LoopConfig | None = None, resume: bool = False
        ) -> dict:
    """Train every requested fold and write the run directory (docs/architecture.md); returns a per-fold summary.

    The model is chosen by the config's class (TrainConfig: the grader; LocateConfig: the localiser). resume=True
    continues the run in out_dir with its own config.json (cache_path None = the cache it was made on).
    """
    run_dir = Path(out_dir)
    config_path = run_dir / "config.json"
    if resume:
        if not config_path.exists():
            raise MissingInput(f"cannot resume: {config_path} does not exist")
        saved = json.loads(config_path.read_text())
        task_cls = task_class(saved.get("kind", "grader"))
        reader = open_reader(cache_path or saved["cache"], task_cls.config_class.kind)
        if saved.get("cache_config_hash") != cache_config_hash(reader):
            raise InputError(f"{run_dir} was trained on a cache with another config; resume on the same cache")
        cfg = task_cls.config_class.from_file(config_path)
    else:
        cfg = cfg if cfg is not None else task_class("grader").config_class()
        task_cls = task_class(cfg.kind)
        if config_path.exists() and _has_progress(run_dir):
            raise RunExists(f"{run_dir} already holds a run: pass --resume to continue it, or use a new OUT")
        if config_path.exists():  # a run that failed before its first checkpoint (e.g. no weights): nothing to keep
            log.warning("%s holds a run that never saved a checkpoint; starting it again with the new settings",
                        run_dir)
        reader = open_reader(cache_path, cfg.kind)
        cfg = task_cls.resolve_config(cfg, reader)
    task = task_cls(cfg, reader)
    rt = setup_runtime(cfg.device, cfg.amp)  # under torchrun: every rank has checked run_dir before any writes
    set_deterministic(cfg.deterministic)
    trained = task.trained_positions()
    if not resume and rt.master:
        folds_mod.save_folds(folds_mod.make_folds(task.index.iloc[trained], cfg.folds, cfg.seed),
                             run_dir / "folds.parquet")
        atomic_write_json(config_path, {**cfg.to_dict(), "kind": cfg.kind, "cache": str(Path(cache_path).resolve()),
                                        "cache_config_hash": cache_config_hash(reader)})
    rt.barrier()
    sample_fold = folds_mod.fold_of_samples(task.index, folds_mod.load_folds(run_dir / "folds.parquet"), trained)
    todo = list(range(cfg.folds)) if cfg.fold is None else [cfg.fold]
    if resume and all((run_dir / f"fold{k}" / "oof.parquet").exists() for k in todo):
        log.info("%s: every requested fold has finished; nothing to resume", run_dir)
    results = {}
    for fold in todo:
        if (run_dir / f"fold{fold}" / "oof.parquet").exists():
            continue  # finished in an earlier invocation
        in_fold = sample_fold[trained] == fold
        data = task.fold_data(trained[~in_fold], trained[in_fold], rt.rank, rt.world_size, rt.device)
        results[fold] = train_fold(task, fold, data, run_dir, rt, resume)
    if rt.master:
        task.finish(run_dir, todo)
    rt.barrier()
    return results


# ----------------------------------------------------------------------------- small helpers

def _has_progress(run_dir: Path) -> bool:
    """Whether a run directory holds anything worth keeping: a checkpoint or a finished fold."""
    return any(run_dir.glob("fold*/last.pt")) or any(run_dir.glob("fold*/oof.parquet"))


def _weights_hash(model: nn.Module) -> str:
    """Of the parameters only: BatchNorm running statistics are per rank under DDP (rank 0's are saved)."""
    h = hashlib.sha256()
    for v in model.parameters():
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _truncate_metrics(path: Path, fold: int, start: int) -> None:
    """Drop this fold's records from epochs a resume will redo (written after the last checkpoint)."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if not (r["fold"] == fold and r["epoch"] >= start)]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in keep)))
