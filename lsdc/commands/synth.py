"""`lsdc synth`."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def parse_size(text: str) -> tuple[int, int]:
    """'320,640' -> (320, 640); '128' -> (128, 128)."""
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise typer.BadParameter(f"expected 'LO,HI' pixels, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not 16 <= values[0] <= values[1]:
        raise typer.BadParameter(f"expected 'LO,HI' with 16 <= LO <= HI, got {text!r}")
    return values[0], values[1]


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth_command(
        out: Path = typer.Argument(..., help="Output folder (competition layout)."),
        studies: int = typer.Option(50, "--studies", "-n", min=1, help="Train studies (the test split adds 10 %)."),
        seed: int = typer.Option(0, "--seed", help="Same seed and options -> byte-identical files."),
        image_size: str = typer.Option("320,640", "--image-size", help="Image size range in pixels: 'LO,HI'."),
        difficulty: float = typer.Option(0.5, "--difficulty", min=0.0, max=1.0,
                                         help="0 = clean and well-separated grades, 1 = noisy and overlapping."),
        from_tables: Path | None = typer.Option(None, "--from-tables", exists=True, file_okay=False,
                                                help="Reuse the first N studies of real competition tables."),
        faults: bool = typer.Option(False, "--faults", help="Add fault studies and faults.json."),
        workers: int = typer.Option(1, "--workers", "-j", min=1, help="Processes rendering studies in parallel."),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="Replace a synthetic dataset made with other options."),
    ) -> None:
        """Write a synthetic dataset in the RSNA 2024 lumbar spine layout: CSVs + DICOM series from 3D phantoms."""
        from prep.synth import synth

        summary = synth(out, studies=studies, seed=seed, image_size=parse_size(image_size),
                        difficulty=difficulty, from_tables=from_tables, faults=faults, workers=workers,
                        overwrite=overwrite)
        typer.echo(json.dumps(summary, indent=2))
