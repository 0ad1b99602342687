"""Options several commands share: a config field as an option (default and help from its dataclass, never typed
here), the build options of the two caches, and the one rule for a resumed run."""

from __future__ import annotations

from typing import Any

import typer

from cache.settings import defaults, field_help


def config_option(cls: type, name: str, *flags: str, given_only: bool = False, **kwargs: Any):
    """An option for `cls.<name>`: with the field's default, or (given_only) None unless given, so that a --config
    file's value is not overridden by a default; the help is the field's comment (with the default when given_only).
    """
    if given_only:
        return typer.Option(None, *flags, help=field_help(cls, name), **kwargs)
    return typer.Option(defaults(cls)[name], *flags, help=field_help(cls, name, default=False), **kwargs)


def build_options() -> dict[str, Any]:
    """The run-time options of a cache build (they decide no pixel, so no config holds them)."""
    return dict(
        workers=typer.Option(2, help="Local worker processes (one thread each)."),
        scheduler=typer.Option(None, help="dask.distributed scheduler address (tcp://host:8786), or "
                                          "processes/threads/synchronous."),
        resume=typer.Option(True, "--resume/--clean", help="Continue an interrupted build, or start over."),
        strict=typer.Option(False, help="Exit non-zero when anything failed (see the errors table)."),
        progress=typer.Option(True, "--progress/--no-progress", help="Progress bar (LSDC_NO_PROGRESS=1 off)."),
    )


BUILD = build_options()


def refuse_changes_on_resume(named: dict[str, Any], **given: bool) -> None:
    """A resumed run continues with its own config.json: any option that would change it is refused, by name."""
    from cache.errors import SettingError

    changed = [f"--{k.replace('_', '-')}" for k, v in named.items() if v is not None]
    changed += [name for name, on in given.items() if on]
    if changed:
        raise SettingError("--resume continues a run exactly with its own config.json, so "
                           f"{', '.join(changed)} cannot change it")
