"""`lsdc cache ...`: info, verify, show. Thin wrappers over `cache.open`, `cache.verify` and `CacheReader.show`."""

from __future__ import annotations

import json
from pathlib import Path
import typer

app = typer.Typer(no_args_is_help=True)

PATH_ARG = typer.Argument(..., help="Cache directory (or a URL zarr understands, e.g. file://...).")


def _open(path: str, volumes: bool = False):
    """The crop cache at `path`, or (where a command takes both kinds) the volume cache there. A CacheError is a
    UserError: one line (lsdc.cli.LsdcGroup)."""
    import cache
    from cache.format import WrongCacheKind

    try:
        return cache.open(path)
    except WrongCacheKind:
        if not volumes:
            raise
    from cache.volumes import open_volumes

    return open_volumes(path)


def _volume_info(v) -> None:
    counts = v.manifest["counts"]
    typer.echo(f"volume cache {v.path}  (format {v.manifest['format_version']}, created {v.manifest['created']})")
    typer.echo(f"volumes {counts['volumes']} ({counts['slices']} slices of {v.grid}x{v.grid} uint8) from "
               f"{counts['studies']} studies, {counts['series']} series; targets {counts.get('targets')}; "
               f"errors {counts['errors']}")
    typer.echo(_table("by series description:", counts["by_series_description"]))
    if len(v.targets):
        typer.echo(_table("targets by condition:", v.targets["condition"].value_counts().sort_index().to_dict()))
    if len(v.errors):
        typer.echo(_table("errors by stage:", v.errors["stage"].value_counts().sort_index().to_dict()))
    typer.echo(f"config (hash {v.manifest['config_hash']}):")
    typer.echo(json.dumps(v.manifest["config"], indent=2, sort_keys=True, default=str))


def _table(title: str, counts: dict) -> str:
    width = max((len(str(k)) for k in counts), default=0)
    return "\n".join([title] + [f"  {str(k):<{width}}  {v:>7}" for k, v in counts.items()])


@app.command()
def info(path: str = PATH_ARG) -> None:
    """Counts by condition, label and series type; size on disk; compression ratio; the prep config. A volume
    cache: volumes, slices, targets and errors by kind."""
    from cache.reader import _label_names

    c = _open(path, volumes=True)
    if not hasattr(c, "summary"):
        _volume_info(c)
        return
    s = c.summary()
    index = c.index
    ratio = f"{s['compression_ratio']:.2f}" if s["compression_ratio"] else "n/a"
    typer.echo(f"cache {s['path']}  (format {s['format_version']}, created {s['created']})")
    studies = f"{s['studies']} stud{'y' if s['studies'] == 1 else 'ies'}"
    typer.echo(f"samples {s['samples']} of shape {tuple(s['sample_shape'])} uint8 from {studies}; errors {s['errors']}")
    typer.echo(f"size on disk {s['bytes_on_disk'] / 1e6:.1f} MB; codec {s['codec']}; compression ratio {ratio} "
               "(raw bytes / bytes on disk)")
    typer.echo(_table("by condition:", index["condition"].value_counts().sort_index().to_dict()))
    typer.echo(_table("by label:", _label_names(index["label"]).value_counts().sort_index().to_dict()))
    typer.echo(_table("by series description:", index["series_description"].value_counts().sort_index().to_dict()))
    if len(c.errors):
        typer.echo(_table("errors by stage:", c.errors["stage"].value_counts().sort_index().to_dict()))
    typer.echo(f"config (hash {s['config_hash']}):")
    typer.echo(json.dumps(c.manifest["config"], indent=2, sort_keys=True, default=str))


@app.command()
def verify(path: str = PATH_ARG) -> None:
    """Check that every index row has its data and its checksum matches; exit 1 and list the bad rows otherwise."""
    import cache
    from tqdm import tqdm

    from cache.io import progress_options

    c = _open(path, volumes=True)
    unit = "sample" if hasattr(c, "summary") else "volume"
    with tqdm(total=len(c), desc="verify", unit=unit, **progress_options()) as bar:
        if unit == "sample":
            bad = cache.verify(c, on_row=lambda n: bar.update(1))
        else:
            from cache.volumes import verify_volumes

            bad = verify_volumes(c, on_row=lambda n: bar.update(1))
    if len(bad) == 0:
        typer.echo(f"ok: all {len(c)} {unit}s present and matching their checksums")
        return
    typer.secho(f"{len(bad)} of {len(c)} {unit}s are bad:", fg="red", err=True)
    typer.echo(bad.to_string(index=False))
    raise typer.Exit(1)


@app.command()
def show(
    path: str = PATH_ARG,
    study: int = typer.Option(..., help="study_id"),
    condition: str = typer.Option(..., help="e.g. 'Spinal Canal Stenosis', spinal_canal_stenosis or spinal"),
    level: str = typer.Option(..., help="e.g. 'L4/L5'"),
    row: int = typer.Option(0, help="which match, when several samples match (e.g. two series)"),
    out: Path | None = typer.Option(None, help="PNG to write (default: show_<study>_<condition>_<level>.png)"),
) -> None:
    """Draw one sample as a grid of slices x windows and save it as a PNG."""
    from cache.errors import InputError
    from cache.io import atomic_write
    from cache.rsna import parse_condition, parse_level, slug

    condition, level = parse_condition(condition), parse_level(level)
    c = _open(path)
    view = c.select(study_id=study, condition=condition, level=level)
    if not 0 <= row < len(view):
        studies = c.index["study_id"].drop_duplicates()
        if study not in set(studies):
            why = f"study {study} is not in this cache ({len(studies)} studies, e.g. {studies.head(3).tolist()})"
        elif not len(view):
            why = f"study {study} has no {condition} {level} sample (no coordinate, or it failed: see the errors)"
        else:
            why = f"{len(view)} samples match study {study}, {condition} {level}; --row {row} is out of range"
        raise InputError(why)
    out = out or Path(f"show_{study}_{slug(condition)}_{slug(level)}.png")
    fig = view.show(row)  # without matplotlib: the missing module's role is named (lsdc.cli)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    typer.echo(f"wrote {out}")
