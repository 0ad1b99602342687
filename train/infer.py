"""The grader's predictions from a checkpoint (or a model in memory) over a crop cache: the OOF writer and predict
use it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cache.errors import InputError
from cache.rsna import PROB_COLUMNS
from train.augment import tta_views
from train.config import TrainConfig
from train.data import CacheDataset, make_loader, select_samples, to_device
from train.checkpoint import model_from_checkpoint
from train.model import LSDCModel

INDEX_COLUMNS = ["row", "study_id", "series_id", "condition", "level", "label"]


@torch.no_grad()
def predict_probs(model: nn.Module, loader, device: torch.device, image_size: int | None = None, tta: bool = False,
                  autocast: contextlib.AbstractContextManager | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, 3) float64, cache rows (N,)) in loader order."""
    model.eval()
    probs, rows = [], []
    for batch in loader:
        b = to_device(batch, device, image_size)
        views = tta_views(b["image"]) if tta else [b["image"]]
        with autocast or contextlib.nullcontext():
            p = torch.stack([model(v, b["level"], b["condition"]).float().softmax(1) for v in views]).mean(0)
        probs.append(p.cpu().double().numpy())
        rows.append(batch["row"].numpy())
    if not probs:
        return np.zeros((0, 3)), np.zeros(0, dtype=np.int64)
    return np.concatenate(probs), np.concatenate(rows)


def prediction_frame(index: pd.DataFrame, rows: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """Index columns of the predicted rows + normal_mild, moderate, severe (each row sums to 1)."""
    cols = [c for c in INDEX_COLUMNS if c in index.columns]
    out = index.set_index("row", drop=False).loc[rows, cols].reset_index(drop=True)
    out[list(PROB_COLUMNS)] = probs / probs.sum(axis=1, keepdims=True)
    return out


def predict_cache(checkpoint_or_model: str | Path | dict | LSDCModel, reader, device: str | torch.device = "cpu",
                  tta: bool = False, batch_size: int = 32, workers: int = 0, labelled_only: bool = False
                  ) -> pd.DataFrame:
    """Probabilities for every sample of the model's conditions in `reader` (a cache or a cache view)."""
    model = checkpoint_or_model if isinstance(checkpoint_or_model, nn.Module) else model_from_checkpoint(
        checkpoint_or_model)
    cfg: TrainConfig = model.config
    device = torch.device(device)
    positions = select_samples(reader.index, cfg.conditions, labelled=labelled_only)
    if len(positions) == 0:
        raise InputError(f"the cache has no samples of the model's conditions {list(cfg.conditions)}")
    ds = CacheDataset(reader, positions, cfg.conditions)
    if ds.shape[0] < cfg.slices or (ds.shape[0] - cfg.slices) % 2:
        raise InputError(f"the model reads {cfg.slices} slices, the cache has {ds.shape[0]} (it needs {cfg.slices}, or "
                         "more by an even number: the centre ones are read)")
    loader = make_loader(ds, batch_size, workers, train=False, seed=0, pin_memory=device.type == "cuda")
    probs, rows = predict_probs(model.to(device), loader, device, cfg.image_size, tta)
    return prediction_frame(reader.index, rows, probs)
