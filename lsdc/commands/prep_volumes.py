"""`lsdc prep-volumes`: a thin wrapper over `prep.volumes.build_volumes` (the localiser's series-volume cache).
Every voxel-deciding option is a VolumeConfig field of the same name; default and help come from the dataclass."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cache.settings import defaults, field_help
from lsdc.commands.options import BUILD, config_option
from prep.config import VolumeConfig

_DEFAULT = defaults(VolumeConfig)


def _opt(name: str, **kwargs):
    return config_option(VolumeConfig, name, **kwargs)


def register(app: typer.Typer) -> None:
    """Add the `prep-volumes` command to the app."""

    @app.command("prep-volumes")
    def prep_volumes(
        data_dir: Path = typer.Argument(..., help="Competition layout: CSVs + {train,test}_images/."),
        out: Path = typer.Argument(..., help="Volume cache directory to create (or resume)."),
        split: str = _opt("split"),
        coords: Optional[Path] = typer.Option(None, help=field_help(VolumeConfig, "coords", default=False)),
        studies: Optional[int] = typer.Option(None, help=field_help(VolumeConfig, "studies", default=False)),
        descriptions: str = typer.Option(",".join(_DEFAULT["descriptions"]),
                                         help=field_help(VolumeConfig, "descriptions", default=False)),
        grid: int = _opt("grid"),
        window: str = typer.Option("{name}:{lo:g}:{hi:g}".format(**vars(_DEFAULT["window"])),
                                   help=field_help(VolumeConfig, "window", default=False) + " (NAME:LO:HI)"),
        percentile_stride: int = _opt("percentile_stride"),
        codec: str = _opt("codec"),
        workers: int = BUILD["workers"],
        scheduler: Optional[str] = BUILD["scheduler"],
        resume: bool = BUILD["resume"],
        strict: bool = BUILD["strict"],
        progress: bool = BUILD["progress"],
    ) -> None:
        """DICOM series -> one volume per sub-stack, slices in spatial order on one G x G grid -> a Zarr volume
        cache with its geometry and the coordinates as targets (the localiser's input; docs/locate.md)."""
        from prep.config import Window
        from prep.volumes import build_volumes

        config = VolumeConfig(split=split, coords=str(coords.resolve()) if coords else None, studies=studies,
                              descriptions=tuple(d.strip() for d in descriptions.split(",") if d.strip()), grid=grid,
                              window=Window.parse(window), percentile_stride=percentile_stride, codec=codec)
        result = build_volumes(data_dir, out, config, workers=workers, scheduler=scheduler, clean=not resume,
                               progress=progress)
        typer.echo(result.summary())
        raise typer.Exit(result.exit_code(strict))
