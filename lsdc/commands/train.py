"""`lsdc train`: a thin wrapper over `train.loop.fit` (torch is imported inside the command only).

The named options are TrainConfig fields of the same name; their help and defaults come from the dataclass, and
`TrainConfig.resolve` merges them with --config and --set (defaults < file < options < --set), as a notebook would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lsdc.commands.options import config_option, refuse_changes_on_resume
from train.config import TrainConfig


def _opt(name: str, *flags: str):
    return config_option(TrainConfig, name, *flags, given_only=True)


def register(app: typer.Typer) -> None:
    """Add the `train` command to the app."""

    @app.command("train")
    def train_command(
        cache: Optional[Path] = typer.Argument(None, help="Crop cache made by `lsdc prep` (optional with --resume)."),
        out: Optional[Path] = typer.Argument(None, help="New run directory."),
        config: Optional[Path] = typer.Option(None, "--config", help="TrainConfig as .json or .toml."),
        set_: list[str] = typer.Option([], "--set", help="Override any setting: --set lr_head=3e-4 (repeatable; "
                                       "every setting: docs/training.md#settings)."),
        fold: Optional[str] = typer.Option(None, "--fold", help="Fold to train (0-based), or 'all'. Default: 0."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run directory exactly."),
        weights: Optional[Path] = _opt("weights", "--weights"),
        epochs: Optional[int] = _opt("epochs", "--epochs"),
        backbone: Optional[str] = _opt("backbone", "--backbone"),
        aggregator: Optional[str] = _opt("aggregator", "--aggregator"),
        batch_size: Optional[int] = _opt("batch_size", "--batch-size"),
        device: Optional[str] = _opt("device", "--device"),
    ) -> None:
        """Train the per-slice model on a cache (v8 defaults). Multi-GPU: torchrun --nproc_per_node N -m lsdc train."""
        import logging

        from cache.errors import SettingError
        from train.loop import fit

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        named = {"epochs": epochs, "backbone": backbone, "aggregator": aggregator, "batch_size": batch_size,
                 "device": device, "weights": str(weights) if weights is not None else None, "fold": fold}
        if resume is not None:
            refuse_changes_on_resume(named, OUT=out is not None, **{"--config": config is not None,
                                                                   "--set": bool(set_)})
            fit(cache, resume, resume=True)
            return
        if cache is None or out is None:
            raise SettingError("give CACHE and OUT (or --resume RUN_DIR)")
        fit(cache, out, TrainConfig.resolve(config, named, set_))
