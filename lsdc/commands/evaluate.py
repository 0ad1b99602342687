"""`lsdc evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command to the app."""

    @app.command()
    def evaluate(
        inputs: Annotated[list[Path], typer.Argument(help="Run directories (their oof.parquet), OOF .parquet files or "
                                                   "submission .csv files (with --labels); several are pooled, "
                                                   "repeated samples averaged.")],
        labels: Annotated[Optional[Path], typer.Option(help="train.csv-format labels: override the OOF's; the "
                                                       "solution a submission .csv is scored against.")] = None,
        out: Annotated[Optional[Path], typer.Option(help="Where score.json / score.md go (default: the run "
                                                    "directory when exactly one is given).")] = None,
        calibrate: Annotated[bool, typer.Option(help="Fit one temperature per condition group on these predictions; "
                                                "report before/after and write temperature.json.")] = False,
    ) -> None:
        """The official competition score of out-of-fold predictions or of a submission, plus balanced accuracy,
        recall and confusion."""
        from train.evaluate import evaluate as run_evaluate

        result = run_evaluate(inputs, labels_csv=labels, out_dir=out, calibrate=calibrate)
        s = result["score"]
        parts = "  ".join(f"{k} {s[k]:.4f}" for k in ("spinal", "foraminal", "subarticular", "any_severe_spinal"))
        typer.echo(f"score {s['score']:.4f}{' (partial)' if s['partial'] else ''}  |  {parts}")
        if "temperature" in result:
            t = result["temperature"]
            temps = "  ".join(f"{g} T={v:.3f}" for g, v in t["temperature"].items())
            typer.echo(f"temperature-scaled score {t['after']['score']:.4f}  |  {temps}")
        ba = result["overall"]["balanced_accuracy"]
        typer.echo(f"balanced accuracy {ba:.3f} over {result['n_scored']} labelled samples"
                   if ba is not None else "no labelled samples")
        if "written_to" in result:
            files = "score.json, score.md" + (", temperature.json" if "temperature" in result else "")
            typer.echo(f"wrote {files} (recall, confusion, per level and fold) to {result['written_to']}")
        else:
            typer.echo("nothing written: pass --out DIR for score.json and score.md")
