"""`lsdc prep`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `prep` command to the app (filled in by the prep work)."""
