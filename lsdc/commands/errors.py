"""One way for every command to report a user's mistake: a one-line `lsdc <command>: reason` and exit code 2.

Bad paths, refused settings and unusable inputs are the user's to fix, so a traceback through our code only hides
the sentence that says what to do. LSDC_DEBUG=1 re-raises with the full traceback (for bug reports).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import typer


@contextmanager
def user_errors(command: str) -> Iterator[None]:
    from cache.format import CacheError  # light: cache imports no heavy stack

    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError, CacheError) as e:
        if os.environ.get("LSDC_DEBUG", "") not in ("", "0"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        typer.secho(f"lsdc {command}: {message}", fg="red", err=True)
        raise typer.Exit(2) from None
