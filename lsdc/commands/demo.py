"""`lsdc demo`: synth -> prep -> train -> evaluate -> predict -> report, small, on the CPU."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_command(
        out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for the data, caches, run and report."),
        studies: int = typer.Option(60, "--studies", help="Synthetic training studies."),
        epochs: int = typer.Option(8, "--epochs"),
        seed: int = typer.Option(0, "--seed"),
        backbone: str = typer.Option("efficientnet_b0", "--backbone", help="timm model name (trained from scratch)."),
    ) -> None:
        """Run the whole pipeline on built-in synthetic data and write OUT/demo_report.md (about 10 min on 2 cores)."""
        from lsdc.demo import DemoConfig, run_demo

        run_demo(out, DemoConfig(studies=studies, epochs=epochs, seed=seed, backbone=backbone))
