"""The grader's task for the training loop: crop cache in, Normal/Mild / Moderate / Severe per condition-level out.

Its loss is the class-weighted cross entropy (1, 2, 4); its epoch metrics are per-class recall, balanced accuracy,
the confusion matrix, the dead-class monitor and the official competition score; its selection rule is v8's (best
balanced accuracy among epochs whose Moderate and Severe recall reach a floor) or the lowest score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import cache
from cache.errors import InputError
from cache.io import atomic_write
from cache.rsna import LABELS, PROB_COLUMNS
from train.augment import augment_batch
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import TrainConfig
from train.data import CacheDataset, make_loader, select_samples, to_device, want_in_memory
from train.infer import predict_probs, prediction_frame
from train.losses import WeightedFocalCE
from train.metrics import classification_metrics, finite, passes_v8_rule, smoothed_mix
from train.model import LSDCModel, build_model
from train.score import competition_score, weighted_log_loss
from train.tasks import FoldData, Task


class GraderTask(Task):
    config_class = TrainConfig
    cfg: TrainConfig

    def __init__(self, cfg: TrainConfig, reader: Any):
        super().__init__(cfg, reader)
        self.selection = f"{cfg.best_rule} selection metric"
        self.loss_fn: WeightedFocalCE | None = None
        # aug_jitter_mm as a fraction of the crop's side, which the cache's config gives in mm
        crop = (getattr(reader, "manifest", None) or {}).get("config") or {}
        side_mm = 2 * float(crop.get("crop_scale", 1.0)) * float(crop.get("crop_base_mm", 1.0))
        self.jitter = cfg.aug_jitter_mm / side_mm if cfg.aug_jitter_mm else 0.0

    @classmethod
    def resolve_config(cls, cfg: TrainConfig, reader: Any) -> TrainConfig:
        """Fill what the cache decides (slices, image size) and refuse what it cannot give."""
        index = reader.index
        missing = sorted(set(cfg.conditions) - set(index["condition"]))
        if missing:
            raise InputError(f"the cache has no samples of {missing}; it holds {sorted(set(index['condition']))}")
        labelled = select_samples(index, cfg.conditions)
        if not len(labelled):
            split = ((getattr(reader, "manifest", {}) or {}).get("config") or {}).get("split")
            raise InputError(f"the cache has no labelled samples of {list(cfg.conditions)}"
                             + (" (it was built from the test split)" if split == "test" else "")
                             + ": train needs a cache of the train split (lsdc prep without --split test)")
        s, c, h, w = reader[int(labelled[0])].shape
        slices = cfg.slices if cfg.slices is not None else s - 2 * cfg.aug_slice_shift
        if slices < 1 or s < slices + 2 * cfg.aug_slice_shift or (s - slices) % 2:
            raise InputError(f"the cache stores {s} slices per sample; a model of {slices} slices with a slice shift "
                             f"of +-{cfg.aug_slice_shift} needs {slices + 2 * cfg.aug_slice_shift} (build the cache "
                             f"with --slices {slices + 2 * cfg.aug_slice_shift})")
        return TrainConfig.from_dict({**cfg.to_dict(), "slices": slices, "image_size": cfg.image_size or h})

    def trained_positions(self) -> np.ndarray:
        return select_samples(self.reader.index, self.cfg.conditions)  # labelled samples of the trained conditions

    def fold_data(self, train_pos: np.ndarray, val_pos: np.ndarray, rank: int, world_size: int,
                  device: torch.device) -> FoldData:
        cfg = self.cfg
        train_ds = CacheDataset(self.reader, train_pos, cfg.conditions)
        val_ds = CacheDataset(self.reader, val_pos, cfg.conditions)
        # every rank of a one-node DDP run holds its own copy
        if want_in_memory(cfg.in_memory, (train_ds.nbytes() + val_ds.nbytes()) * world_size):
            train_ds.load_into_memory()
            val_ds.load_into_memory()
        pin = device.type == "cuda"  # pinned host memory: the copy to the GPU overlaps compute (non_blocking)
        train_loader = make_loader(train_ds, cfg.batch_size, cfg.workers, True, cfg.seed, rank, world_size, pin)
        val_loader = make_loader(val_ds, cfg.batch_size * 2, cfg.workers, False, cfg.seed, pin_memory=pin)
        return FoldData(train_loader, val_loader, np.asarray(val_pos))

    def describe(self, data: FoldData) -> str:
        counts = np.bincount(data.train_loader.dataset.label, minlength=3)
        return (f"{', '.join(self.cfg.conditions)}: {len(data.train_loader.dataset)} train / "
                f"{len(data.val_loader.dataset)} val samples, class counts {counts.tolist()}")

    # --- model ---
    @classmethod
    def model_from_config(cls, config: dict[str, Any]) -> LSDCModel:
        return build_model(TrainConfig.from_dict(config), pretrained=False)

    def build_model(self, data: FoldData) -> LSDCModel:
        counts = np.bincount(data.train_loader.dataset.label, minlength=3)
        self.loss_fn = WeightedFocalCE(self.cfg.class_weights, self.cfg.focal_gamma)
        return build_model(self.cfg, torch.tensor(counts / counts.sum()))

    def checkpoint_meta(self, data: FoldData) -> dict[str, Any]:
        """`class_prior`: the fold's training label mix per condition (rows the model cannot answer get the
        metric-optimal value for it); `crop_settings`: the training cache's (a test cache must match them)."""
        return {"class_prior": training_mix(data.train_loader.dataset, self.cfg.conditions),
                "crop_settings": cache.crop_settings(getattr(self.reader, "manifest", {}) or {})}

    def loss(self, model, batch, generator, device) -> tuple[torch.Tensor, int]:
        b = to_device(batch, device, self.cfg.image_size)
        x, condition = augment_batch(b["image"], b["condition"], self.cfg, generator, self.jitter)
        logits = model(x, b["level"], condition)
        return self.loss_fn.to(device)(logits, b["label"]), len(x)

    # --- validation and selection ---
    def validate(self, model, data: FoldData, device, autocast) -> dict[str, Any]:
        """Loss, recall, BA, confusion matrix, dead classes and the official score on the validation fold."""
        probs, rows = predict_probs(model, data.val_loader, device, self.cfg.image_size, autocast=autocast)
        pred = prediction_frame(self.reader.index.iloc[data.val_positions], rows, probs)
        y = pred["label"].to_numpy(dtype=np.int64)
        out = classification_metrics(y, probs, self.cfg.dead_min_count)
        out["val_loss"] = weighted_log_loss(y, probs, self.cfg.class_weights)
        score = competition_score(pred)
        out["score"] = score.pop("score")
        out["score_parts"] = score
        return out

    def selection_key(self, record: dict[str, Any]) -> list[float]:
        if self.cfg.best_rule == "v8":  # an epoch passing the recall floor beats any that does not; then higher BA
            return [float(passes_v8_rule(record["recall"], self.cfg.best_min_recall)), finite(record["ba"], -1.0)]
        return [0.0, -finite(record["score"], float("inf"))]

    def monitor(self, record: dict[str, Any], counters: dict[str, int]) -> tuple[list[dict[str, Any]], str | None]:
        """The dead-class monitor: a class predicted (almost) never on validation is logged, and may stop the run."""
        import logging

        dead = record["dead_classes"]
        counters["dead_streak"] = counters.get("dead_streak", 0) + 1 if dead else 0
        events = []
        if dead:
            names = [LABELS[k] for k in dead]
            logging.getLogger("lsdc.train").warning(
                "fold %d epoch %d: dead class %s (predicted %s times on %d validation samples)", record["fold"],
                record["epoch"], names, record["pred_counts"], sum(record["pred_counts"]))
            events.append({"type": "dead_class", "fold": record["fold"], "epoch": record["epoch"], "classes": names,
                           "pred_counts": record["pred_counts"], "streak": counters["dead_streak"]})
        stop = self.cfg.dead_stop_after is not None and counters["dead_streak"] >= self.cfg.dead_stop_after
        return events, f"a dead class for {counters['dead_streak']} consecutive epochs" if stop else None

    def summary_line(self, r: dict[str, Any]) -> str:
        recall = " ".join("-" if v is None else f"{v:.2f}" for v in r["recall"])
        return (f"fold {r['fold']} epoch {r['epoch']:>2}/{self.cfg.epochs} | train {r['train_loss']:.4f} | val "
                f"{r['val_loss']:.4f} | BA {r['ba']:.3f} | recall {recall} | score {r['score']:.4f} | preds "
                f"{r['pred_counts']} | {r['samples_per_s']:.1f} samples/s{' | best' if r['best'] else ''}")

    # --- outputs ---
    def fold_outputs(self, fold: int, fold_dir: Path, data: FoldData, device, autocast) -> dict[str, Any]:
        """Out-of-fold probabilities of the best checkpoint (fold{K}/oof.parquet: also marks the fold as done)."""
        ckpt = load_checkpoint(fold_dir / "best.pt")
        model = model_from_checkpoint(ckpt).to(device)
        probs, rows = predict_probs(model, data.val_loader, device, self.cfg.image_size, self.cfg.tta, autocast)
        oof = prediction_frame(self.reader.index.iloc[data.val_positions], rows, probs)
        oof.insert(oof.columns.get_loc("label") + 1, "fold", np.int64(fold))
        atomic_write(fold_dir / "oof.parquet", lambda tmp: oof.to_parquet(tmp, index=False))
        y = oof["label"].to_numpy(dtype=np.int64)
        best = classification_metrics(y, oof[list(PROB_COLUMNS)].to_numpy(), self.cfg.dead_min_count)
        return {"best_epoch": int(ckpt["epoch"]), "oof_ba": best["ba"], "oof_recall": best["recall"],
                "oof_score": competition_score(oof)["score"], "n_val": len(oof)}

    def finish(self, run_dir: Path, folds: list[int]) -> None:
        oof = pd.concat([pd.read_parquet(run_dir / f"fold{k}" / "oof.parquet") for k in folds], ignore_index=True)
        atomic_write(run_dir / "oof.parquet", lambda tmp: oof.to_parquet(tmp, index=False))
        from train.report import write_report  # matplotlib only once the run is done

        write_report(run_dir)


def training_mix(ds: CacheDataset, conditions: tuple[str, ...]) -> dict[str, list[float]]:
    """Label fractions (Normal/Mild, Moderate, Severe) per condition among a dataset's labelled samples, with one
    pseudo-count per grade (train.metrics.smoothed_mix)."""
    mix = {}
    for k, c in enumerate(conditions):
        fractions = smoothed_mix(np.bincount(ds.label[(ds.condition == k) & (ds.label >= 0)], minlength=3))
        if fractions is not None:
            mix[c] = fractions.tolist()
    return mix
