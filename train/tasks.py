"""What one kind of model brings to the one training loop (train/loop.py), and the registry of those kinds.

The loop owns what every model needs done the same way: folds by study, epochs and steps, AMP, the learning-rate
schedule, weight averaging, checkpoints, exact resume, selection bookkeeping, early stopping and metrics.jsonl. A
task owns what differs: its cache and data loaders, its model, its loss, its validation metrics, its selection rule,
what a checkpoint must carry for inference, and the run's outputs (out-of-fold predictions, report).

    grader     train.grade.GraderTask     crop cache -> Normal/Mild, Moderate, Severe per condition-level
    localiser  train.locate.LocaliserTask volume cache -> slice and point per condition-level (docs/locate.md)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cache.errors import InputError
from train.config import LoopConfig

KINDS: dict[str, str] = {"grader": "train.grade:GraderTask", "localiser": "train.locate:LocaliserTask"}


def task_class(kind: str) -> type[Task]:
    if kind not in KINDS:
        raise InputError(f"unknown model kind {kind!r}; lsdc trains {sorted(KINDS)}")
    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class FoldData:
    """One fold's loaders and which reader positions it validates on."""

    train_loader: Any
    val_loader: Any
    val_positions: np.ndarray


class Task:
    """Base of every model's task. The model a task builds must offer `backbone_parameters()`,
    `head_parameters()`, `freeze_backbone(frozen)` and `backbone_frozen` (two learning rates, frozen epochs)."""

    config_class: type[LoopConfig] = LoopConfig
    selection: str = "selection metric"  # what the selection key measures, for the early-stop message

    def __init__(self, cfg: LoopConfig, reader: Any):
        self.cfg, self.reader = cfg, reader

    # --- configuration and data ---
    @classmethod
    def resolve_config(cls, cfg: LoopConfig, reader: Any) -> LoopConfig:
        """Fill what the cache decides and refuse what it cannot give."""
        return cfg

    @property
    def index(self) -> pd.DataFrame:
        """The rows the folds are made from and positions point into: needs study_id (and label to stratify)."""
        return self.reader.index

    def trained_positions(self) -> np.ndarray:
        """Positions of `index` this run trains and validates on."""
        raise NotImplementedError

    def fold_data(self, train_pos: np.ndarray, val_pos: np.ndarray, rank: int, world_size: int,
                  device: torch.device) -> FoldData:
        raise NotImplementedError

    def describe(self, data: FoldData) -> str:
        """One line for the log: what this fold trains on."""
        return f"{len(data.train_loader.dataset)} train / {len(data.val_loader.dataset)} val samples"

    # --- model ---
    @classmethod
    def model_from_config(cls, config: dict[str, Any]) -> nn.Module:
        """The model for a checkpoint's config, weights not loaded (the checkpoint has them)."""
        raise NotImplementedError

    def build_model(self, data: FoldData) -> nn.Module:
        raise NotImplementedError

    def checkpoint_meta(self, data: FoldData) -> dict[str, Any]:
        """What inference needs besides the weights (plain types only)."""
        return {}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator,
             device: torch.device) -> tuple[torch.Tensor, int]:
        """(mean loss of the batch, its sample count); runs under the loop's autocast."""
        raise NotImplementedError

    # --- validation and selection ---
    def validate(self, model: nn.Module, data: FoldData, device: torch.device, autocast: Any) -> dict[str, Any]:
        raise NotImplementedError

    def selection_key(self, record: dict[str, Any]) -> list[float]:
        """Higher is better; compared as a list (the first element decides first)."""
        raise NotImplementedError

    def monitor(self, record: dict[str, Any], counters: dict[str, int]) -> tuple[list[dict[str, Any]], str | None]:
        """Extra events for metrics.jsonl and a reason to stop, from an epoch's record (e.g. a dead class)."""
        return [], None

    def summary_line(self, record: dict[str, Any]) -> str:
        raise NotImplementedError

    # --- outputs ---
    def fold_outputs(self, fold: int, fold_dir: Path, data: FoldData, device: torch.device,
                     autocast: Any) -> dict[str, Any]:
        """Write fold{K}/oof.parquet from best.pt (it also marks the fold as done); return its summary."""
        raise NotImplementedError

    def finish(self, run_dir: Path, folds: list[int]) -> None:
        """After every requested fold: pooled out-of-fold outputs, the report."""
