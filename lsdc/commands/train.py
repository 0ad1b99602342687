"""`lsdc train`: a thin wrapper over `train.loop.fit` (torch is imported inside the command only)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


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
        weights: Optional[Path] = typer.Option(None, "--weights", help="Local backbone weights (.safetensors/.pth)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs per fold (v8: 25)."),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="timm model name."),
        aggregator: Optional[str] = typer.Option(None, "--aggregator", help="weighted | attention | bigru."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per step (v8: 12)."),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:1."),
    ) -> None:
        """Train the per-slice model on a cache (v8 defaults). Multi-GPU: torchrun --nproc_per_node N -m lsdc train."""
        import logging

        from lsdc.commands.errors import user_errors
        from train.config import TrainConfig
        from train.loop import fit

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        named = {"epochs": epochs, "backbone": backbone, "aggregator": aggregator, "batch_size": batch_size,
                 "device": device, "weights": str(weights) if weights is not None else None}
        if resume is not None:
            given = [f"--{k.replace('_', '-')}" for k, v in named.items() if v is not None]
            given += ["OUT"] * (out is not None) + ["--config"] * (config is not None) + ["--set"] * bool(set_)
            given += ["--fold"] * (fold is not None)
            if given:
                raise typer.BadParameter("--resume continues a run exactly with its own config.json, so "
                                         f"{', '.join(given)} cannot change it: give only CACHE (optional) with "
                                         "--resume")
            with user_errors("train"):
                fit(cache, resume, resume=True)
            return
        if cache is None or out is None:
            raise typer.BadParameter("give CACHE and OUT (or --resume RUN_DIR)")
        try:  # a bad or missing --config file: one line, not a traceback
            cfg = TrainConfig.from_file(config) if config is not None else TrainConfig()
        except (ValueError, OSError) as e:
            raise typer.BadParameter(f"--config {config}: {e}") from None
        d = cfg.to_dict()
        d.update({k: v for k, v in named.items() if v is not None})
        if fold is not None:
            d["fold"] = None if fold.lower() == "all" else int(fold)
        try:
            cfg = TrainConfig.from_dict(d).with_overrides(set_)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        with user_errors("train"):
            fit(cache, out, cfg)
