"""`lsdc`: one console command, thin subcommands over plain functions a notebook can call.

Each subcommand module imports only typer and the standard library at import time; the heavy stacks (pydicom,
dask, torch, timm) are imported inside the command that needs them, so `lsdc --help` is instant and
`lsdc prep` runs on a box without torch.
"""

from __future__ import annotations

import typer

from lsdc.commands import bench, cache, demo, evaluate, predict, prep, synth, train

app = typer.Typer(
    name="lsdc",
    help="RSNA 2024 lumbar spine pipeline: [b]synth[/b] -> [b]prep[/b] (DICOM -> Zarr crop cache) -> "
    "[b]train[/b] -> [b]evaluate[/b] / [b]predict[/b].",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for module in (synth, prep, train, evaluate, predict, demo):
    module.register(app)
app.add_typer(cache.app, name="cache", help="Inspect and verify a crop cache.")
app.add_typer(bench.app, name="bench", help="Benchmarks: cache build, loader and training throughput.")


if __name__ == "__main__":  # pragma: no cover
    app()
