"""`lsdc predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `predict` command to the app."""

    @app.command()
    def predict(
        checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoint files, or run directories (all their "
                                                          "fold*/best.pt). Each condition's rows come from the "
                                                          "models trained on it; folds are averaged.")],
        cache: Annotated[Optional[Path], typer.Option("--cache", help="Test crop cache built by `lsdc prep --split "
                                                      "test` (points known), or ...")] = None,
        locator: Annotated[Optional[Path], typer.Option("--locator", help="... a locator directory (`lsdc "
                                                        "train-locator`) with --data: no coordinates needed.")] = None,
        data: Annotated[Optional[Path], typer.Option("--data", help="With --locator: the competition folder whose "
                                                     "{split}_images/ to grade.")] = None,
        split: Annotated[str, typer.Option(help="With --locator: the split to grade.")] = "test",
        out: Annotated[Path, typer.Option("--out", help="Submission CSV to write.")] = Path("submission.csv"),
        sample_submission: Annotated[Optional[Path], typer.Option(help="Row order to follow and check "
                                                                  "(sample_submission.csv).")] = None,
        tta: Annotated[bool, typer.Option(help="Average plain and test-time-augmented passes.")] = False,
        device: Annotated[str, typer.Option(help="'auto', 'cpu', 'cuda' or 'cuda:N'.")] = "auto",
        temperature: Annotated[Optional[Path], typer.Option(help="temperature.json from `lsdc evaluate "
                                                            "--calibrate`.")] = None,
    ) -> None:
        """Fold-ensemble inference -> row_id,normal_mild,moderate,severe for every study x 25: on a crop cache, or
        from DICOMs alone with --locator and --data (locate, crop at the found points, grade; intermediates in
        <stem>_work/, reused by a rerun)."""
        import pandas as pd

        from cache.errors import SettingError
        from train.predict import missing_log
        from train.predict import predict as run_predict

        if (cache is None) == (locator is None) or (locator is not None) != (data is not None):
            raise SettingError("give --cache CACHE (points known), or --locator LOCATOR with --data DATA (none)")
        if locator is not None:
            if temperature is not None:
                raise SettingError("--temperature goes with --cache for now")
            from lsdc.locate import predict_from_dicoms, work_dir

            sub = predict_from_dicoms(checkpoints, locator, data, out, split, sample_submission, device, tta=tta)
            typer.echo(f"intermediates (coords.csv and its log, volumes, crops) in {work_dir(out)}")
        else:
            sub = run_predict(checkpoints, cache, out, sample_submission=sample_submission, tta=tta, device=device,
                              temperature=temperature)
        missing = pd.read_csv(missing_log(out))
        filled = (f"{len(missing)} filled with a prior, listed with its source in {missing_log(out)}" if len(missing)
                  else "every one from the models")
        typer.echo(f"wrote {out}: {len(sub)} rows ({filled})")
