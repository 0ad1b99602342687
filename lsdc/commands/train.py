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
        set_: list[str] = typer.Option([], "--set", help="Override any setting: --set lr_head=3e-4 (repeatable)."),
        fold: Optional[str] = typer.Option(None, "--fold", help="Fold to train (0-based), or 'all'. Default: 0."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run directory exactly."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Local backbone weights (.safetensors/.pth)."),
        epochs: Optional[int] = typer.Option(None, "--epochs"),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="timm model name."),
        aggregator: Optional[str] = typer.Option(None, "--aggregator", help="weighted | attention | bigru."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size"),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:1."),
    ) -> None:
        """Train the per-slice model on a cache (v8 defaults). Multi-GPU: torchrun --nproc_per_node N -m lsdc train."""
        import logging

        from train.config import TrainConfig
        from train.loop import fit

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if resume is not None:
            if out is not None or config is not None or set_:
                raise typer.BadParameter("--resume continues a run with its own config.json: give only CACHE "
                                         "(optional) with it")
            fit(cache, resume, resume=True)
            return
        if cache is None or out is None:
            raise typer.BadParameter("give CACHE and OUT (or --resume RUN_DIR)")
        cfg = TrainConfig.from_file(config) if config is not None else TrainConfig()
        named = {"epochs": epochs, "backbone": backbone, "aggregator": aggregator, "batch_size": batch_size,
                 "device": device, "weights": str(weights) if weights is not None else None}
        d = cfg.to_dict()
        d.update({k: v for k, v in named.items() if v is not None})
        if fold is not None:
            d["fold"] = None if fold.lower() == "all" else int(fold)
        try:
            cfg = TrainConfig.from_dict(d).with_overrides(set_)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        fit(cache, out, cfg)
