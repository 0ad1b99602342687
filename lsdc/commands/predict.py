"""`lsdc predict`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `predict` command to the app (filled in by the predict work)."""
