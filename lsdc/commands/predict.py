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
        cache: Annotated[Path, typer.Option("--cache", help="Test crop cache built by `lsdc prep --split test`.")],
        out: Annotated[Path, typer.Option("--out", help="Submission CSV to write.")] = Path("submission.csv"),
        sample_submission: Annotated[Optional[Path], typer.Option(help="Row order to follow and check "
                                                                  "(sample_submission.csv).")] = None,
        tta: Annotated[bool, typer.Option(help="Average plain and test-time-augmented passes.")] = False,
        device: Annotated[str, typer.Option(help="'auto', 'cpu', 'cuda' or 'cuda:N'.")] = "auto",
        temperature: Annotated[Optional[Path], typer.Option(help="temperature.json from `lsdc evaluate "
                                                            "--calibrate`.")] = None,
    ) -> None:
        """Fold-ensemble inference on a test cache -> row_id,normal_mild,moderate,severe for every study x 25."""
        import pandas as pd

        from train.predict import missing_log
        from train.predict import predict as run_predict

        sub = run_predict(checkpoints, cache, out, sample_submission=sample_submission, tta=tta, device=device,
                          temperature=temperature)
        missing = pd.read_csv(missing_log(out))
        filled = (f"{len(missing)} filled with a prior, listed with its source in {missing_log(out)}" if len(missing)
                  else "every one from the models")
        typer.echo(f"wrote {out}: {len(sub)} rows ({filled})")
