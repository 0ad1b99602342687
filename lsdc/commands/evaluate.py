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
        oracle: Annotated[Optional[Path], typer.Option(help="The submission made from the true points of the same "
                                                       "studies: also its score, and the gap.")] = None,
        truth: Annotated[Optional[Path], typer.Option(help="True coordinates (e.g. synthetic "
                                                      "test_label_coordinates.csv) to score a coords.csv from "
                                                      "`lsdc locate` against.")] = None,
        volumes: Annotated[Optional[Path], typer.Option(
            help="The volume cache of a coords.csv's series (default: <stem>_volumes/ beside it, where lsdc locate "
                 "put it).")] = None,
    ) -> None:
        """The official competition score of out-of-fold predictions or of a submission, plus balanced accuracy,
        recall and confusion; or the localisation figures of a localiser run, a locator directory, or a coords.csv
        against --truth (slice exact/±1, point error in mm, level identity, axial level)."""
        from cache.errors import SettingError
        from train.locate_metrics import is_coordinates, is_locator

        if any(is_locator(p) or is_coordinates(p) for p in inputs):
            if len(inputs) != 1:
                raise SettingError("evaluate one localiser run, locator directory or coords.csv at a time")
            _localisation(inputs[0], truth, volumes, out)
            return
        from train.evaluate import evaluate as run_evaluate

        result = run_evaluate(inputs, labels_csv=labels, out_dir=out, calibrate=calibrate)
        s = result["score"]
        parts = "  ".join(f"{k} {s[k]:.4f}" for k in ("spinal", "foraminal", "subarticular", "any_severe_spinal"))
        typer.echo(f"score {s['score']:.4f}{' (partial)' if s['partial'] else ''}  |  {parts}")
        if oracle is not None:
            from train.score import oracle_gap

            if labels is None:
                raise SettingError("--oracle scores a submission: give --labels too")
            g = oracle_gap(labels, inputs[0], oracle)
            typer.echo(f"oracle score {g['oracle']:.4f} (true points); the price of locating them: {g['gap']:+.4f} "
                       f"(90 % interval over {g['studies']} studies: {g['low']:+.4f} .. {g['high']:+.4f})")
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


def _localisation(path: Path, truth: Optional[Path], volumes: Optional[Path], out: Optional[Path]) -> None:
    """Print (and for a coords.csv, write) the localisation figures."""
    from cache.errors import SettingError
    from cache.io import atomic_write_json, json_safe
    from train.locate_metrics import is_locator, metrics_markdown, run_metrics, score_coordinates

    if is_locator(path):
        for name, metrics in run_metrics(path).items():
            typer.echo(f"{name} (out-of-fold):")
            typer.echo("\n".join(metrics_markdown(metrics)))
        return
    if truth is None:
        raise SettingError(f"{path} holds located coordinates: give --truth TRUE_COORDS.csv to score them")
    metrics = score_coordinates(path, truth, volumes)
    typer.echo("\n".join(metrics_markdown(metrics)))
    target = (out or path.parent) / f"{path.stem}_metrics.json"
    atomic_write_json(target, json_safe(metrics))
    typer.echo(f"wrote {target}")
