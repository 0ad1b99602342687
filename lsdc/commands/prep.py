"""`lsdc prep`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `prep` command to the app."""

    @app.command("prep")
    def prep(
        data_dir: Path = typer.Argument(..., help="Competition layout: CSVs + {train,test}_images/."),
        out: Path = typer.Argument(..., help="Cache directory to create (or resume)."),
        split: str = typer.Option("train", help="'train' or 'test' (test needs --coords)."),
        coords: Optional[Path] = typer.Option(None, help="Coordinates CSV (train_label_coordinates.csv columns)."),
        conditions: Optional[str] = typer.Option(
            None, help="Comma list of conditions, slugs or groups (spinal, foraminal, subarticular); default all."),
        studies: Optional[int] = typer.Option(None, help="Only the first N studies (ascending id)."),
        slices: int = typer.Option(7, help="Slices per stack, centred on the labelled one."),
        size: int = typer.Option(256, help="Output crop side in pixels."),
        crop_scale: float = typer.Option(0.75, help="Half-side = crop-scale x crop-mm (seed: 0.75)."),
        crop_mm: float = typer.Option(170.0, help="Base half-side in mm (170: the seed's 192 px on a 0.66 mm scan)."),
        windows: Optional[str] = typer.Option(
            None, help="Three NAME:LO:HI percentile windows, comma-separated; default soft:50:99.5, "
                       "wide:0.5:99.5, full:0:100."),
        clahe_clip: float = typer.Option(2.0, help="CLAHE clip limit per window channel (0 = off)."),
        clahe_tiles: int = typer.Option(8, help="CLAHE tiles per side."),
        codec: str = typer.Option("crc32c", help="Chunk codec: crc32c (raw + checksum), zstd-1, zstd-3, lz4, none."),
        workers: int = typer.Option(2, help="Local worker processes (one thread each)."),
        scheduler: Optional[str] = typer.Option(
            None, help="dask.distributed scheduler address (tcp://host:8786), or processes/threads/synchronous."),
        resume: bool = typer.Option(True, "--resume/--clean", help="Continue an interrupted build, or start over."),
        strict: bool = typer.Option(False, help="Exit non-zero when any sample or file failed."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar (LSDC_NO_PROGRESS=1 off)."),
    ) -> None:
        """DICOM -> 7-slice, 3-window, CLAHE'd, mm-sized crops -> a Zarr cache (Dask, resumable)."""

        from prep.build import build
        from prep.config import DEFAULT_WINDOWS, PrepConfig, parse_conditions, parse_windows
        from prep.samples import TableError

        from cache import CacheError
        from cache.io import progress_enabled

        try:
            config = PrepConfig(
                split=split, coords=str(coords.resolve()) if coords else None,
                conditions=parse_conditions(conditions) if conditions else PrepConfig().conditions,
                studies=studies, slices=slices, size=size, crop_scale=crop_scale, crop_base_mm=crop_mm,
                windows=parse_windows(windows) if windows else DEFAULT_WINDOWS, clahe_clip=clahe_clip,
                clahe_tiles=clahe_tiles, codec=codec)
            show = progress and progress_enabled()
            result = build(data_dir, out, config, workers=workers, scheduler=scheduler, clean=not resume,
                           progress=show)
        except (ValueError, TableError, CacheError) as e:
            typer.echo(f"lsdc prep: {e}", err=True)
            raise typer.Exit(2) from None
        typer.echo(result.summary())
        raise typer.Exit(result.exit_code(strict))
