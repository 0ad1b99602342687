"""`lsdc`: one console command, thin subcommands over plain functions a notebook can call.

Each subcommand module imports only typer and the standard library at import time; the heavy stacks (pydicom,
dask, torch, timm) are imported inside the command that needs them, so `lsdc --help` is instant and
`lsdc prep` runs on a box without torch.
"""

from __future__ import annotations

import os
import sys

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


def missing_module_message(error: ModuleNotFoundError, argv: list[str]) -> str | None:
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
    words = [a for a in argv[1:3] if not a.startswith("-")]
    command = " ".join(words[:2] if words[:1] in (["cache"], ["bench"]) else words[:1])
    return f"lsdc {command}: needs {top}, which is not installed here; {ROLE_HINT[role]}"


def main() -> None:
    """The console command: the typer app, with a missing optional dependency told as the role to install."""
    try:
        app()
    except ModuleNotFoundError as e:
        message = missing_module_message(e, sys.argv)
        if message is None or os.environ.get("LSDC_DEBUG", "") not in ("", "0"):
            raise
        typer.secho(message, fg="red", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
