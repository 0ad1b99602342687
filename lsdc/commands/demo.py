"""`lsdc demo`: synth -> prep -> train -> evaluate -> predict -> report, small, on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_command(
        out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for the data, caches, run and report."),
        studies: Optional[int] = typer.Option(None, "--studies", help="Synthetic training studies (default 80)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (default 30)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the synthetic data (default 0)."),
        backbone: Optional[str] = typer.Option(
            None, "--backbone", help="timm model, trained from scratch (default mobilenetv3_small_050)."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Processes for synth and prep (default 2)."),
    ) -> None:
        """Run the whole pipeline on built-in synthetic data; writes OUT/demo_report.md (a few minutes on 2 cores).

        Rerunning with the same settings continues an interrupted demo; a finished one reuses its data, caches and
        model and redoes evaluation, prediction and the report."""
        from lsdc.demo import DemoConfig, DemoSettingsDiffer, run_demo

        given = dict(studies=studies, epochs=epochs, seed=seed, backbone=backbone, workers=workers)
        try:
            run_demo(out, DemoConfig(**{k: v for k, v in given.items() if v is not None}))
        except DemoSettingsDiffer as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(2) from None
