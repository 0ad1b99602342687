"""The training loop: folds -> epochs -> steps, validation every epoch, checkpoints that resume exactly.

One process, or one per GPU under torchrun (DDP). Only rank 0 validates and writes; every rank trains its shard.
Epoch indices are 0-based everywhere (config, metrics.jsonl, checkpoints).

    fit(cache_path, out_dir, cfg)      a new run          fit(cache_path, out_dir, resume=True)   continue it
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import cache
from cache.io import atomic_write, atomic_write_json, json_safe, progress_options, read_jsonl
from cache.rsna import LABELS, PROB_COLUMNS
from train import folds as folds_mod
from train.augment import augment_batch
from train.config import TrainConfig
from train.data import CacheDataset, make_loader, select_samples, to_device, want_in_memory
from train.infer import model_from_checkpoint, predict_probs, prediction_frame
from train.losses import WeightedFocalCE
from train.metrics import classification_metrics, passes_v8_rule, weighted_log_loss
from train.predict import smoothed_mix
from train.model import LSDCModel, WeightAverage, build_model
from train.runtime import (Runtime, all_reduce_sum, broadcast_flag, rng_state, seed_everything, set_deterministic,
                           set_rng_state, setup_runtime)
from train.score import competition_score

log = logging.getLogger("lsdc.train")


# ----------------------------------------------------------------------------- schedule and optimiser

def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig, base_lr: float) -> float:
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


def make_optimizer(model: LSDCModel, cfg: TrainConfig, steps_per_epoch: int):
    groups = [{"params": model.backbone_parameters(), "lr": cfg.lr_backbone, "name": "backbone"},
              {"params": model.head_parameters(), "lr": cfg.lr_head, "name": "head"}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [partial(lr_factor, steps_per_epoch=steps_per_epoch, cfg=cfg, base_lr=g["lr"]) for g in groups])
    return opt, sched


# ----------------------------------------------------------------------------- one epoch of training / validation

def train_one_epoch(model, raw: LSDCModel, loader, opt, sched, scaler, loss_fn, cfg: TrainConfig, rt: Runtime,
                    gen: torch.Generator, average: WeightAverage | None, desc: str) -> dict:
    model.train()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (loss * n, n) kept on the device: no sync
    t0 = time.time()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, **progress_options(None if rt.master else False))
    for step, batch in enumerate(bar):
        b = to_device(batch, rt.device, cfg.image_size)
        x, condition = augment_batch(b["image"], b["condition"], cfg, gen)
        with rt.autocast():
            logits = model(x, b["level"], condition)
        loss = loss_fn(logits, b["label"])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()  # per step: the warm-up and cosine are smooth, not staircase
        if average is not None and cfg.ema_decay is not None:
            average.update(raw)
        total[0] += loss.detach() * len(x)
        total[1] += len(x)
        if step % 10 == 0 and not bar.disable:  # .item() is a CPU-GPU sync point: not every step
            n = total[1].item()
            bar.set_postfix(loss=f"{total[0].item() / n:.4f}", samples_s=f"{n / (time.time() - t0):.1f}")
    loss_sum, n = all_reduce_sum(total.tolist(), rt)
    return {"train_loss": loss_sum / max(n, 1), "train_samples": int(n), "samples_per_s": n / (time.time() - t0)}


def validate(model: LSDCModel, loader, val_index: pd.DataFrame, cfg: TrainConfig, rt: Runtime) -> dict:
    """Loss, recall, BA, confusion matrix, dead classes and the official score on the validation fold."""
    probs, rows = predict_probs(model, loader, rt.device, cfg.image_size, autocast=rt.autocast())
    pred = prediction_frame(val_index, rows, probs)
    y = pred["label"].to_numpy(dtype=np.int64)
    out = classification_metrics(y, probs, cfg.dead_min_count)
    out["val_loss"] = weighted_log_loss(y, probs, cfg.class_weights)
    score = competition_score(pred)
    out["score"] = score.pop("score")
    out["score_parts"] = score
    return out


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, raw: LSDCModel, opt, sched, scaler, average: WeightAverage | None, gen, epoch: int,
                    cfg: TrainConfig, fold: int, state: dict, eval_with: str, meta: dict | None = None) -> None:
    """meta: what predict needs besides the weights, plain types only: `class_prior`, the fold's training label mix
    per condition (rows the model cannot answer get the metric-optimal value for it), and `crop_settings`, the
    training cache's crop settings (a test cache must match them; cache.crop_settings)."""
    ckpt = {"model": raw.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "ema": average.state_dict() if average is not None else None,
            "rng": rng_state(gen), "epoch": epoch, "config": cfg.to_dict(), "fold": fold, "state": state,
            "eval_with": eval_with, **(meta or {})}
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))  # a kill mid-save leaves the previous checkpoint intact


def load_checkpoint_into(path: Path, raw: LSDCModel, opt, sched, scaler, average: WeightAverage | None, gen,
                         rt: Runtime) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # load_state_dict copies onto the device
    raw.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if average is not None and ckpt["ema"] is not None:
        average.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"], gen)
    return ckpt


# ----------------------------------------------------------------------------- one fold

def fold_loaders(fold: int, reader, index: pd.DataFrame, sample_fold: np.ndarray, cfg: TrainConfig, rt: Runtime):
    """(train loader, validation loader, validation index rows) of one fold's labelled samples."""
    positions = select_samples(index, cfg.conditions)
    train_pos, val_pos = positions[sample_fold[positions] != fold], positions[sample_fold[positions] == fold]
    train_ds = CacheDataset(reader, train_pos, cfg.conditions)
    val_ds = CacheDataset(reader, val_pos, cfg.conditions)
    # every rank of a one-node DDP run holds its own copy
    if want_in_memory(cfg.in_memory, (train_ds.nbytes() + val_ds.nbytes()) * rt.world_size):
        train_ds.load_into_memory()
        val_ds.load_into_memory()
    pin = rt.device.type == "cuda"  # pinned host memory: the copy to the GPU overlaps compute (non_blocking)
    train_loader = make_loader(train_ds, cfg.batch_size, cfg.workers, True, cfg.seed, rt.rank, rt.world_size, pin)
    val_loader = make_loader(val_ds, cfg.batch_size * 2, cfg.workers, False, cfg.seed, pin_memory=pin)
    return train_loader, val_loader, index.iloc[val_pos]


def train_fold(fold: int, reader, index: pd.DataFrame, sample_fold: np.ndarray, cfg: TrainConfig, run_dir: Path,
               rt: Runtime, resume: bool) -> dict:
    fold_dir = run_dir / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    train_loader, val_loader, val_index = fold_loaders(fold, reader, index, sample_fold, cfg, rt)
    train_ds, val_ds = train_loader.dataset, val_loader.dataset

    # model, optimiser, schedule, loss: the same construction on a resume, then the checkpoint overwrites the state
    seed_everything(cfg.seed)
    counts = np.bincount(train_ds.label, minlength=3)
    raw = build_model(cfg, torch.tensor(counts / counts.sum())).to(rt.device)
    meta = {"class_prior": training_mix(train_ds, cfg.conditions),
            "crop_settings": cache.crop_settings(getattr(reader, "manifest", {}) or {})}
    steps_per_epoch = len(train_loader)
    opt, sched = make_optimizer(raw, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler)
    loss_fn = WeightedFocalCE(cfg.class_weights, cfg.focal_gamma).to(rt.device)
    average = WeightAverage(raw, cfg.ema_decay) if (cfg.ema_decay is not None or cfg.swa_start is not None) else None
    gen = torch.Generator(device=rt.device)
    state = {"best_key": None, "best_epoch": -1, "bad_epochs": 0, "dead_streak": 0}
    start = 0
    if resume and (fold_dir / "last.pt").exists():
        ckpt = load_checkpoint_into(fold_dir / "last.pt", raw, opt, sched, scaler, average, gen, rt)
        state, start = ckpt["state"], ckpt["epoch"] + 1
        if rt.master:
            print(f"fold {fold}: resumed from {fold_dir / 'last.pt'} at epoch {start}")
    if resume and rt.master:  # also with no last.pt: a kill in epoch 0 may have logged that epoch already
        _truncate_metrics(run_dir / "metrics.jsonl", fold, start)
    if rt.master:
        print(f"fold {fold}: {', '.join(cfg.conditions)}")
        print(f"fold {fold}: {len(train_ds)} train / {len(val_ds)} val samples, class counts {counts.tolist()}, "
              f"{steps_per_epoch} steps per epoch, device {rt.device} x{rt.world_size}, amp {rt.amp_dtype}")

    stop, model = state.get("stopped", False), None
    for epoch in range(start, cfg.epochs):
        if stop:
            break
        # seeds depend on (seed, epoch, rank) only: a resumed run draws exactly what the uninterrupted one drew
        torch.manual_seed(cfg.seed + 1000 * epoch + rt.rank)
        gen.manual_seed(cfg.seed + 1000 * epoch + rt.rank + 1)
        train_loader.sampler.set_epoch(epoch)
        if model is None or raw.backbone_frozen != (epoch < cfg.freeze_epochs):
            raw.freeze_backbone(epoch < cfg.freeze_epochs)
            model = _wrap(raw, cfg, rt)  # DDP syncs only the parameters that train: re-wrap when that set changes
        lrs = [g["lr"] for g in opt.param_groups]
        tr = train_one_epoch(model, raw, train_loader, opt, sched, scaler, loss_fn, cfg, rt, gen, average,
                             desc=f"fold {fold} epoch {epoch}")
        if average is not None and cfg.ema_decay is None and epoch >= cfg.swa_start:
            average.update(raw)  # SWA: one equal-weight snapshot per epoch
        eval_with = "ema" if average is not None and average.n_averaged > 0 else "model"
        if rt.master:
            val = validate(average.module if eval_with == "ema" else raw, val_loader, val_index, cfg, rt)
            record = {"type": "epoch", "fold": fold, "epoch": epoch, "lr_backbone": lrs[0], "lr_head": lrs[1],
                      "frozen": raw.backbone_frozen, "eval_with": eval_with, "world_size": rt.world_size, **tr, **val}
            reason = _select_and_monitor(record, state, cfg, run_dir)
            stop = reason is not None
            # best before last: a kill between the two resumes from the older last.pt and redoes this epoch
            for name in (["best.pt"] if record["best"] else []) + ["last.pt"]:
                save_checkpoint(fold_dir / name, raw, opt, sched, scaler, average, gen, epoch, cfg, fold,
                                {**state, "stopped": stop}, eval_with, meta)
            _summary_line(record, cfg)
            if stop:
                print(f"fold {fold}: stopping after epoch {epoch}: {reason}")
        stop = broadcast_flag(stop, rt)
        rt.barrier()  # nobody starts the next epoch (or a resume) before rank 0 has written the checkpoint

    result = {"fold": fold, "weights_sha256": _weights_hash(raw)}
    if rt.master:
        result.update(_write_fold_oof(fold, fold_dir, reader, val_loader, val_index, cfg, rt), state=state)
    return result


def _wrap(raw: LSDCModel, cfg: TrainConfig, rt: Runtime) -> torch.nn.Module:
    model = raw
    if rt.ddp:
        model = DistributedDataParallel(raw, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


def _select_and_monitor(record: dict, state: dict, cfg: TrainConfig, run_dir: Path) -> str | None:
    """Best-checkpoint rule, early stopping and the dead-class monitor; appends the epoch's records to
    metrics.jsonl. Returns why training should stop, or None."""
    if cfg.best_rule == "v8":  # an epoch passing the recall floor beats any that does not; then the higher BA
        key = [float(passes_v8_rule(record["recall"], cfg.best_min_recall)), _finite(record["ba"], -1.0)]
    else:
        key = [0.0, -_finite(record["score"], math.inf)]
    record["best"] = state["best_key"] is None or key > state["best_key"]
    if record["best"]:
        state.update(best_key=key, best_epoch=record["epoch"], bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    events = [record]
    dead = record["dead_classes"]
    state["dead_streak"] = state["dead_streak"] + 1 if dead else 0
    if dead:
        names = [LABELS[k] for k in dead]
        log.warning("fold %d epoch %d: dead class %s (predicted %s times on %d validation samples)", record["fold"],
                    record["epoch"], names, record["pred_counts"], sum(record["pred_counts"]))
        events.append({"type": "dead_class", "fold": record["fold"], "epoch": record["epoch"], "classes": names,
                       "pred_counts": record["pred_counts"], "streak": state["dead_streak"]})
    reason = None
    if cfg.patience is not None and state["bad_epochs"] >= cfg.patience:
        reason = f"no better {cfg.best_rule} selection metric for {cfg.patience} epochs"
    if cfg.dead_stop_after is not None and state["dead_streak"] >= cfg.dead_stop_after:
        reason = f"a dead class for {state['dead_streak']} consecutive epochs"
    if reason:
        events.append({"type": "stop", "fold": record["fold"], "epoch": record["epoch"], "reason": reason})
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(json_safe(e), allow_nan=False) + "\n" for e in events)
    return reason


def _write_fold_oof(fold: int, fold_dir: Path, reader, val_loader, val_index: pd.DataFrame, cfg: TrainConfig,
                    rt: Runtime) -> dict:
    """Out-of-fold probabilities of the best checkpoint (fold{K}/oof.parquet: also marks the fold as done)."""
    ckpt = torch.load(fold_dir / "best.pt", map_location="cpu", weights_only=True)
    model = model_from_checkpoint(ckpt).to(rt.device)
    probs, rows = predict_probs(model, val_loader, rt.device, cfg.image_size, cfg.tta, rt.autocast())
    oof = prediction_frame(val_index, rows, probs)
    oof.insert(oof.columns.get_loc("label") + 1, "fold", np.int64(fold))
    atomic_write(fold_dir / "oof.parquet", lambda tmp: oof.to_parquet(tmp, index=False))
    y = oof["label"].to_numpy(dtype=np.int64)
    best = classification_metrics(y, oof[list(PROB_COLUMNS)].to_numpy(), cfg.dead_min_count)
    return {"best_epoch": int(ckpt["epoch"]), "oof_ba": best["ba"], "oof_recall": best["recall"],
            "oof_score": competition_score(oof)["score"], "n_val": len(oof)}


# ----------------------------------------------------------------------------- the whole run

def resolve_config(cfg: TrainConfig, reader) -> TrainConfig:
    """Fill what the cache decides (slices, image size) and refuse what it cannot give."""
    index = reader.index
    missing = sorted(set(cfg.conditions) - set(index["condition"]))
    if missing:
        raise ValueError(f"the cache has no samples of {missing}; it holds {sorted(set(index['condition']))}")
    labelled = select_samples(index, cfg.conditions)
    if not len(labelled):
        split = ((getattr(reader, "manifest", {}) or {}).get("config") or {}).get("split")
        raise ValueError(f"the cache has no labelled samples of {list(cfg.conditions)}"
                         + (" (it was built from the test split)" if split == "test" else "")
                         + ": train needs a cache of the train split (lsdc prep without --split test)")
    first = int(labelled[0])
    s, c, h, w = reader[first].shape
    if cfg.slices is not None and cfg.slices != s:
        raise ValueError(f"config asks for {cfg.slices} slices but the cache stores {s}")
    d = cfg.to_dict()
    d.update(slices=s, image_size=cfg.image_size or h)
    return TrainConfig.from_dict(d)


def cache_config_hash(reader) -> str:
    """The cache's own config hash when its manifest has one, else a hash of its config."""
    manifest = getattr(reader, "manifest", {}) or {}
    if manifest.get("config_hash"):
        return str(manifest["config_hash"])
    return hashlib.sha256(json.dumps(manifest.get("config", {}), sort_keys=True, default=str).encode()).hexdigest()


def fit(cache_path: str | Path | None, out_dir: str | Path, cfg: TrainConfig | None = None, resume: bool = False
        ) -> dict:
    """Train every requested fold and write the run directory (docs/architecture.md); returns a per-fold summary.

    resume=True continues the run in out_dir with its own config.json (cache_path None = the cache it was made on).
    """
    run_dir = Path(out_dir)
    config_path = run_dir / "config.json"
    if resume:
        if not config_path.exists():
            raise FileNotFoundError(f"cannot resume: {config_path} does not exist")
        saved = json.loads(config_path.read_text())
        reader = cache.open(cache_path or saved["cache"])
        if saved.get("cache_config_hash") != cache_config_hash(reader):
            raise ValueError(f"{run_dir} was trained on a cache with another config; resume on the same cache")
        cfg = TrainConfig.from_file(config_path)
    else:
        if config_path.exists() and _has_progress(run_dir):
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or use a new OUT")
        if config_path.exists():  # a run that failed before its first checkpoint (e.g. no weights): nothing to keep
            log.warning("%s holds a run that never saved a checkpoint; starting it again with the new settings",
                        run_dir)
        reader = cache.open(cache_path)
        cfg = resolve_config(cfg or TrainConfig(), reader)
    rt = setup_runtime(cfg.device, cfg.amp)  # under torchrun: every rank has checked run_dir before any writes
    set_deterministic(cfg.deterministic)
    trained = select_samples(reader.index, cfg.conditions)  # labelled samples of the run's conditions
    if not resume and rt.master:
        folds_mod.save_folds(folds_mod.make_folds(reader.index.iloc[trained], cfg.folds, cfg.seed),
                             run_dir / "folds.parquet")
        atomic_write_json(config_path, {**cfg.to_dict(), "cache": str(Path(cache_path).resolve()),
                                        "cache_config_hash": cache_config_hash(reader)})
    rt.barrier()
    index = reader.index
    sample_fold = folds_mod.fold_of_samples(index, folds_mod.load_folds(run_dir / "folds.parquet"), trained)
    todo = range(cfg.folds) if cfg.fold is None else [cfg.fold]
    if resume and all((run_dir / f"fold{k}" / "oof.parquet").exists() for k in todo):
        log.info("%s: every requested fold has finished; nothing to resume", run_dir)
    results = {}
    for fold in todo:
        if (run_dir / f"fold{fold}" / "oof.parquet").exists():
            continue  # finished in an earlier invocation
        results[fold] = train_fold(fold, reader, index, sample_fold, cfg, run_dir, rt, resume)
    if rt.master:
        oof = pd.concat([pd.read_parquet(run_dir / f"fold{k}" / "oof.parquet") for k in todo], ignore_index=True)
        atomic_write(run_dir / "oof.parquet", lambda tmp: oof.to_parquet(tmp, index=False))
        from train.report import write_report  # matplotlib only once the run is done
        write_report(run_dir)
    rt.barrier()
    return results


# ----------------------------------------------------------------------------- small helpers

def training_mix(ds, conditions: tuple[str, ...]) -> dict[str, list[float]]:
    """Label fractions (Normal/Mild, Moderate, Severe) per condition among a dataset's labelled samples, with one
    pseudo-count per grade (train.predict.smoothed_mix)."""
    mix = {}
    for k, c in enumerate(conditions):
        fractions = smoothed_mix(np.bincount(ds.label[(ds.condition == k) & (ds.label >= 0)], minlength=3))
        if fractions is not None:
            mix[c] = fractions.tolist()
    return mix


def _has_progress(run_dir: Path) -> bool:
    """Whether a run directory holds anything worth keeping: a checkpoint or a finished fold."""
    return any(run_dir.glob("fold*/last.pt")) or any(run_dir.glob("fold*/oof.parquet"))


def _finite(x: float | None, default: float) -> float:
    return default if x is None or not math.isfinite(x) else float(x)


def _weights_hash(model: torch.nn.Module) -> str:
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


def _summary_line(r: dict, cfg: TrainConfig) -> None:
    recall = " ".join("-" if v is None else f"{v:.2f}" for v in r["recall"])
    print(f"fold {r['fold']} epoch {r['epoch']:>2}/{cfg.epochs} | train {r['train_loss']:.4f} | val {r['val_loss']:.4f}"
          f" | BA {r['ba']:.3f} | recall {recall} | score {r['score']:.4f} | preds {r['pred_counts']}"
          f" | {r['samples_per_s']:.1f} samples/s{' | best' if r['best'] else ''}", flush=True)
