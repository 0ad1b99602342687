"""`lsdc demo`: synth -> prep -> train -> evaluate -> predict -> report, small, on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lsdc.commands.options import config_option
from lsdc.demo import DemoConfig


def _opt(name: str):
    return config_option(DemoConfig, name, f"--{name}", given_only=True)


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_command(
        out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for the data, caches, run and report."),
        studies: Optional[int] = _opt("studies"),
        epochs: Optional[int] = _opt("epochs"),
        seed: Optional[int] = _opt("seed"),
        backbone: Optional[str] = _opt("backbone"),
        workers: Optional[int] = _opt("workers"),
    ) -> None:
        """Run the whole pipeline on built-in synthetic data; writes OUT/demo_report.md (about 12 minutes on 2 cores).

        Rerunning with the same settings continues an interrupted demo; a finished one reuses its data, caches and
        model and redoes evaluation, prediction and the report."""
        from lsdc.demo import run_demo

        given = dict(studies=studies, epochs=epochs, seed=seed, backbone=backbone, workers=workers)
        run_demo(out, DemoConfig(**{k: v for k, v in given.items() if v is not None}))
