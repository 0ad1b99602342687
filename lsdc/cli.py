"""`lsdc`: one console command, thin subcommands over plain functions a notebook can call.

Each subcommand module imports only typer, the standard library and the light config modules at import time; the
heavy stacks (pydicom, dask, torch, timm, zarr, pandas) are imported inside the command that needs them, so
`lsdc --help` is instant and `lsdc prep` runs on a box without torch.

Every command fails the same way (`LsdcGroup`): a mistake of the user's (`cache.errors.UserError`: a bad path,
setting, table, cache or checkpoint; or the machine's: a full or read-only disk) is one red line
`lsdc <command>: <what, and the fix>` and exit 2; a missing optional dependency names the role to install (exit 2);
anything else is a bug and keeps its traceback. `LSDC_DEBUG=1` shows the traceback for user errors too.
"""

from __future__ import annotations

import os

import click
import typer
from typer.core import TyperGroup

from lsdc.commands import bench, cache, demo, evaluate, locate, predict, prep, prep_volumes, synth, train


class LsdcGroup(TyperGroup):
    """The top-level group: the one place errors that escape a command become what the user reads."""

    def invoke(self, ctx: click.Context):
        words = [w for w in (*getattr(ctx, "_protected_args", ()), *ctx.args) if not w.startswith("-")]
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # typer's and click's own control flow and usage errors
        except Exception as e:  # noqa: BLE001 - sorted below: a bug is re-raised untouched
            message = user_message(e, command_name(words))
            if message is None or os.environ.get("LSDC_DEBUG", "") not in ("", "0"):
                raise
        typer.secho(message, fg="red", err=True)
        raise typer.Exit(2)


def command_name(words: list[str]) -> str:
    """'cache verify' for the sub-apps (cache, bench), else the command: what the error line starts with."""
    return " ".join(words[:2] if words[:1] in (["cache"], ["bench"]) else words[:1])


def user_message(e: Exception, command: str) -> str | None:
    """The one line a user reads for an exception, or None for a bug (which keeps its traceback)."""
    from cache.errors import is_user_error, one_line

    if isinstance(e, ModuleNotFoundError):
        return missing_module_message(e, command)
    return f"lsdc {command}: {one_line(e)}" if is_user_error(e) else None


app = typer.Typer(
    name="lsdc",
    cls=LsdcGroup,
    help="RSNA 2024 lumbar spine pipeline: [b]synth[/b] -> [b]prep[/b] (DICOM -> Zarr crop cache) -> "
    "[b]train[/b] -> [b]evaluate[/b] / [b]predict[/b]; [b]prep-volumes[/b] -> [b]train-locator[/b] -> [b]locate[/b] "
    "finds the points of studies without coordinates.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for module in (synth, prep, prep_volumes, train, locate, evaluate, predict, demo):
    module.register(app)
app.add_typer(cache.app, name="cache", help="Inspect and verify a crop cache.")
app.add_typer(bench.app, name="bench", help="Benchmarks: cache build, loader and training throughput.")


# Which install role brings each third-party module a command may import: running a command on the box that lacks
# its role (`lsdc train` on the prep box) is this workflow's likeliest mistake, and deserves one line, not a traceback.
ROLE_OF_MODULE = {
    **dict.fromkeys(("torch", "torchvision", "timm", "safetensors"), "train"),
    **dict.fromkeys(("scipy", "sklearn"), "eval"),
    **dict.fromkeys(("cv2", "pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle", "dask", "distributed", "psutil"),
                    "prep"),
    **dict.fromkeys(("matplotlib", "ipykernel", "nbclient", "nbformat"), "notebook"),
}
ROLE_HINT = {"train": "install the train role (in lsdc's clone: the torch build for your CUDA, then "
                      "pip install '.[train]')",
             "eval": "install the eval role (in lsdc's clone: pip install '.[eval]'; '.[train]' includes it)",
             "prep": "install the prep role (in lsdc's clone: pip install '.[prep]')",
             "notebook": "install the notebook role (in lsdc's clone: pip install '.[notebook]')"}


def missing_module_message(error: ModuleNotFoundError, command: str) -> str | None:
    """`lsdc <command>: needs <module>, not installed here: <how to install it>`, or None for a module no role
    provides (a bug, which keeps its traceback)."""
    import importlib.util

    top = (error.name or "").split(".")[0]
    role = ROLE_OF_MODULE.get(top)
    try:
        installed = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        installed = False
    if role is None or installed:
        return None  # not a role's module, or a broken install of one that is there: its traceback says more
    return f"lsdc {command}: needs {top}, which is not installed here; {ROLE_HINT[role]}"


def main() -> None:
    """The console command."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
