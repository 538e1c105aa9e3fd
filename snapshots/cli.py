"""Commands of this package (filled in by its own issue)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the ``storage-builder`` app."""
