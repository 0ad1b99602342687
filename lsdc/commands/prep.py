"""`lsdc prep`: a thin wrapper over `prep.build.build`. Every pixel-deciding option is a PrepConfig field of the same
name, its default and help read from the dataclass (cache.settings), never typed here."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cache.settings import defaults, field_help
from lsdc.commands.options import BUILD, config_option
from prep.config import PrepConfig

_DEFAULT = defaults(PrepConfig)


def _opt(name: str, **kwargs):
    return config_option(PrepConfig, name, **kwargs)


def register(app: typer.Typer) -> None:
    """Add the `prep` command to the app."""

    @app.command("prep")
    def prep(
        data_dir: Path = typer.Argument(..., help="Competition layout: CSVs + {train,test}_images/."),
        out: Path = typer.Argument(..., help="Cache directory to create (or resume)."),
        split: str = _opt("split"),
        coords: Optional[Path] = typer.Option(None, help=field_help(PrepConfig, "coords", default=False)),
        conditions: Optional[str] = typer.Option(
            None, help="Comma list of conditions, slugs or groups (spinal, foraminal, subarticular); default all."),
        studies: Optional[int] = typer.Option(None, help=field_help(PrepConfig, "studies", default=False)),
        slices: int = _opt("slices"),
        size: int = _opt("size"),
        crop_scale: float = _opt("crop_scale"),
        crop_base_mm: float = _opt("crop_base_mm"),
        windows: str = typer.Option(",".join(f"{w.name}:{w.lo:g}:{w.hi:g}" for w in _DEFAULT["windows"]),
                                    help=field_help(PrepConfig, "windows", default=False)),
        clahe_clip: float = _opt("clahe_clip"),
        clahe_tiles: int = _opt("clahe_tiles"),
        percentile_stride: int = _opt("percentile_stride"),
        codec: str = _opt("codec"),
        workers: int = BUILD["workers"],
        scheduler: Optional[str] = BUILD["scheduler"],
        resume: bool = BUILD["resume"],
        strict: bool = BUILD["strict"],
        progress: bool = BUILD["progress"],
    ) -> None:
        """DICOM -> 7-slice, 3-window, CLAHE'd, mm-sized crops -> a Zarr cache (Dask, resumable)."""
        from cache.io import progress_enabled
        from prep.build import build
        from prep.config import parse_conditions, parse_windows

        config = PrepConfig(
            split=split, coords=str(coords.resolve()) if coords else None,
            conditions=parse_conditions(conditions) if conditions else _DEFAULT["conditions"], studies=studies,
            slices=slices, size=size, crop_scale=crop_scale, crop_base_mm=crop_base_mm, windows=parse_windows(windows),
            clahe_clip=clahe_clip, clahe_tiles=clahe_tiles, percentile_stride=percentile_stride, codec=codec)
        result = build(data_dir, out, config, workers=workers, scheduler=scheduler, clean=not resume,
                       progress=progress and progress_enabled())
        typer.echo(result.summary())
        raise typer.Exit(result.exit_code(strict))
