"""`lsdc bench prep|load|train`: throughput figures as ratios measured in one run (docs/benchmarks.md)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from cache.settings import defaults
from lsdc.commands.options import config_option
from prep.config import PrepConfig
from train.config import TrainConfig

_PREP, _TRAIN = defaults(PrepConfig), defaults(TrainConfig)

app = typer.Typer(no_args_is_help=True, help="Benchmarks: cache build, loader and training throughput.")

OUT_HELP = "Write the full result as JSON here."
REPORT_HELP = "Update this Markdown file's section for this bench (e.g. docs/benchmarks.md)."
SECTION_HELP = "Name of the report's section (default: the bench's, e.g. 'prep'); one per machine keeps both."


def _command_line(ctx: typer.Context) -> str:
    """The command that reproduces a result: the real argv when run from the shell, else the parameters."""
    words = ctx.command_path.split()[1:]  # e.g. ['bench', 'prep']
    if sys.argv[1:1 + len(words)] == words:
        return shlex.join(["lsdc", *sys.argv[1:]])
    args = [f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in ctx.params.items()
            if v not in (None, False) and k not in ("data_dir", "cache_path")]
    first = ctx.params.get("data_dir") or ctx.params.get("cache_path")
    return " ".join(["lsdc", *words, shlex.quote(str(first)), *args])


def _finish(result: dict, out: Optional[Path], report: Optional[Path], section: Optional[str] = None) -> None:
    from lsdc.bench.common import write_json
    from lsdc.bench.report import summary, update_report

    if out is not None:
        write_json(out, result)
    if report is not None:
        update_report(report, result, section)
    typer.echo(summary(result))


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@app.command("prep")
def prep(
    ctx: typer.Context,
    data_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Competition layout (e.g. lsdc synth)."),
    studies: Optional[int] = typer.Option(None, help="Only the first N studies."),
    conditions: Optional[str] = typer.Option(None, help="Conditions, slugs or groups (default all)."),
    slices: int = config_option(PrepConfig, "slices"),
    size: int = config_option(PrepConfig, "size"),
    workers: int = typer.Option(2, min=1, help="Workers of the parallel build (compared with 1)."),
    repeat: int = typer.Option(1, min=1, help="Repeat the timed runs; the result gives each ratio's spread."),
    v8_samples: Optional[int] = typer.Option(None, help="Time the v8-style epoch on N samples and extrapolate."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Also build half the studies: memory growth."),
    dask_env: bool = typer.Option(True, "--dask-env/--no-dask-env",
                                  help="Also build once with dask's default worker environment (what it costs)."),
    work: Optional[Path] = typer.Option(None, help="Folder for the bench caches (default: a temp folder)."),
    keep: bool = typer.Option(False, help="Keep the bench caches."),
    out: Optional[Path] = typer.Option(None, help=OUT_HELP),
    report: Optional[Path] = typer.Option(None, help=REPORT_HELP),
    section: Optional[str] = typer.Option(None, help=SECTION_HELP),
) -> None:
    """Cache build samples/s vs its unavoidable work and a v8-style epoch; 1 vs N workers; worker memory."""
    from lsdc.bench.prep_bench import bench_prep
    from prep.config import parse_conditions

    config = PrepConfig(studies=studies, slices=slices, size=size,
                        conditions=parse_conditions(conditions) if conditions else PrepConfig().conditions)
    result = bench_prep(data_dir, config, workers=workers, repeat=repeat, v8_samples=v8_samples, memory_check=memory,
                        dask_env_check=dask_env, work_dir=work, keep=keep, command=_command_line(ctx))
    _finish(result, out, report, section)


@app.command("load")
def load(
    ctx: typer.Context,
    cache_path: Path = typer.Argument(..., exists=True, file_okay=False, help="A finalised cache."),
    workers: str = typer.Option("0,1,2", help="DataLoader worker counts to measure."),
    batch_size: int = config_option(TrainConfig, "batch_size", min=1),
    samples: Optional[int] = typer.Option(None, help="Read only N samples (default all)."),
    v8_samples: int = typer.Option(48, min=0, help="Samples for the v8-style loader (0 = skip it)."),
    v8_workers: Optional[str] = typer.Option(None, help="Worker counts for the v8-style loader (default --workers)."),
    data: Optional[Path] = typer.Option(None, help="DICOM folder for the v8-style loader (default: the manifest's)."),
    repeat: int = typer.Option(1, min=1, help="Repeat the runs; the result gives each ratio's spread."),
    passes: int = typer.Option(3, min=1, help="Passes per run; each figure keeps its best (noisy machines)."),
    in_memory: bool = typer.Option(True, "--in-memory/--no-in-memory", help="Also time train's in-memory mode."),
    out: Optional[Path] = typer.Option(None, help=OUT_HELP),
    report: Optional[Path] = typer.Option(None, help=REPORT_HELP),
    section: Optional[str] = typer.Option(None, help=SECTION_HELP),
) -> None:
    """train.data's loader for 0..N workers vs a raw read of the same chunks vs a v8-style on-the-fly loader."""
    from lsdc.bench.load_bench import bench_load

    result = bench_load(cache_path, workers=_ints(workers), batch_size=batch_size, samples=samples,
                        v8_samples=v8_samples, v8_workers=_ints(v8_workers) if v8_workers else None, data_dir=data,
                        repeat=repeat, passes=passes, in_memory=in_memory, command=_command_line(ctx))
    _finish(result, out, report, section)


@app.command("train")
def train(
    ctx: typer.Context,
    cache_path: Path = typer.Argument(..., exists=True, file_okay=False, help="A finalised cache."),
    backbone: str = typer.Option(_TRAIN["backbone"], help="timm backbone (random weights: speed only)."),
    image_size: int = typer.Option(_PREP["size"], min=16, help="Input size (resized on the device when not the "
                                   "cache's)."),
    batch_size: int = config_option(TrainConfig, "batch_size", min=1),
    steps: int = typer.Option(20, min=1, help="Timed training steps."),
    warmup: int = typer.Option(3, min=0, help="Untimed steps first (cuDNN autotuning, allocator, compile)."),
    workers: int = config_option(TrainConfig, "workers", min=0),
    device: str = config_option(TrainConfig, "device"),
    amp: str = config_option(TrainConfig, "amp"),
    channels_last: bool = config_option(TrainConfig, "channels_last", "--channels-last/--no-channels-last"),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model."),
    conditions: Optional[str] = typer.Option(None, help="Conditions to train (default: all in the cache)."),
    out: Optional[Path] = typer.Option(None, help=OUT_HELP),
    report: Optional[Path] = typer.Option(None, help=REPORT_HELP),
    section: Optional[str] = typer.Option(None, help=SECTION_HELP),
) -> None:
    """Training samples/s of the real model, and loader headroom (loader samples/s / what the model consumes)."""
    from lsdc.bench.train_bench import bench_train

    from cache.rsna import expand_conditions

    chosen = expand_conditions(conditions) if conditions else None
    result = bench_train(cache_path, backbone=backbone, image_size=image_size, batch_size=batch_size, steps=steps,
                         warmup=warmup, workers=workers, device=device, amp=amp, channels_last=channels_last,
                         compile=compile, conditions=chosen, command=_command_line(ctx))
    _finish(result, out, report, section)


@app.command("predict")
def predict(
    ctx: typer.Context,
    grader: Path = typer.Argument(..., exists=True, help="Grader run directory (or checkpoint)."),
    locator: Path = typer.Argument(..., exists=True, file_okay=False, help="Locator directory."),
    data_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Competition layout."),
    split: str = typer.Option("test", help="The split to grade from its DICOMs."),
    workers: int = typer.Option(1, min=1, help="Build workers (with --scheduler, a local cluster of them)."),
    scheduler: Optional[str] = typer.Option("synchronous", help="Builds' scheduler: 'synchronous' (in this "
                                            "process: per-study cost, no cluster start), processes, or an address."),
    device: str = typer.Option("cpu", help="'cpu', 'cuda' or 'auto'."),
    out: Optional[Path] = typer.Option(None, help=OUT_HELP),
    report: Optional[Path] = typer.Option(None, help=REPORT_HELP),
    section: Optional[str] = typer.Option(None, help=SECTION_HELP),
) -> None:
    """Coordinate-free prediction: seconds per study by stage (volumes, localisers, crops, grading); volume build
    series/s against crop build samples/s."""
    from lsdc.bench.predict_bench import bench_predict

    result = bench_predict([grader], locator, data_dir, split=split, workers=workers, scheduler=scheduler,
                           device=device, command=_command_line(ctx))
    _finish(result, out, report, section)
