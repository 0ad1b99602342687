"""The `lsdc` command: thin wiring above the three packages (cache, prep, train)."""

__version__ = "0.1.0"
