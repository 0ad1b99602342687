"""`lsdc train-locator` and `lsdc locate`: thin wrappers over `lsdc.locate.train_locator` and `lsdc.locate.locate`.
LocateConfig's named options take their help and defaults from the dataclass; any setting goes with --set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lsdc.commands.options import config_option, refuse_changes_on_resume
from train.config import LOCATE_TARGETS, LocateConfig


def _opt(name: str, *flags: str):
    return config_option(LocateConfig, name, *flags, given_only=True)


def register(app: typer.Typer) -> None:
    """Add `train-locator` and `locate` to the app."""

    @app.command("train-locator")
    def train_locator_command(
        volumes: Path = typer.Argument(..., help="Volume cache of the train split (`lsdc prep-volumes`)."),
        out: Path = typer.Argument(..., help="Locator directory: one run per target in OUT/spinal, OUT/foraminal, "
                                             "OUT/subarticular."),
        targets: str = typer.Option(",".join(LOCATE_TARGETS), help="Which localisers to train."),
        config: Optional[Path] = typer.Option(None, "--config", help="LocateConfig as .json or .toml."),
        set_: list[str] = typer.Option([], "--set", help="Override any setting: --set sigma_mm=2.5 (repeatable; "
                                       "every setting: docs/locate.md#settings)."),
        fold: Optional[str] = typer.Option(None, "--fold", help="Fold to train (0-based), or 'all'. Default: 0."),
        resume: bool = typer.Option(False, "--resume", help="Continue the runs in OUT exactly."),
        weights: Optional[Path] = _opt("weights", "--weights"),
        epochs: Optional[int] = _opt("epochs", "--epochs"),
        backbone: Optional[str] = _opt("backbone", "--backbone"),
        image_size: Optional[int] = _opt("image_size", "--image-size"),
        device: Optional[str] = _opt("device", "--device"),
    ) -> None:
        """Train the localisers (canal, foramina, recesses) on a volume cache, each through the training loop."""
        import logging

        from cache.errors import SettingError
        from lsdc.locate import TARGET_ORDER, train_locator

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        chosen = [t.strip() for t in targets.split(",") if t.strip()]
        if bad := sorted(set(chosen) - set(LOCATE_TARGETS)):
            raise SettingError(f"unknown targets {bad}; choose from {LOCATE_TARGETS}")
        named = {"epochs": epochs, "backbone": backbone, "image_size": image_size, "device": device, "fold": fold,
                 "weights": str(weights) if weights is not None else None}
        if resume:
            refuse_changes_on_resume(named, **{"--config": config is not None, "--set": bool(set_)})
        train_locator(volumes, out, config, named, set_, [t for t in TARGET_ORDER if t in chosen], resume)

    @app.command("locate")
    def locate_command(
        locator: Path = typer.Argument(..., help="Locator directory from `lsdc train-locator`."),
        data_dir: Path = typer.Argument(..., help="Competition layout: CSVs + {split}_images/ (no coordinates "
                                                  "needed)."),
        split: str = typer.Option("test", help="'test' or 'train'."),
        out: Path = typer.Option(Path("coords.csv"), "--out", help="Coordinates CSV to write "
                                 "(train_label_coordinates.csv's columns + confidence)."),
        volumes: Optional[Path] = typer.Option(None, help="Where the split's volume cache is built or reused "
                                               "(default: beside OUT, <stem>_volumes/)."),
        studies: Optional[int] = typer.Option(None, help="Only the first N studies (ascending id)."),
        workers: int = typer.Option(2, help="Processes building the volumes."),
        device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    ) -> None:
        """Find every condition-level's slice and point from the DICOM series alone -> coords.csv."""
        from lsdc.locate import locate, side_files

        coords, log = locate(locator, data_dir, split, out, volumes, studies, workers, device=device,
                             progress=progress)
        missing = log[log["what"] == "missing"]
        typer.echo(f"wrote {out}: {len(coords)} points of {coords['study_id'].nunique() if len(coords) else 0} "
                   f"studies; {len(missing)} condition-levels not found, {int((log['what'] == 'chosen').sum())} "
                   f"choices among several series: {side_files(out)[0]}")
