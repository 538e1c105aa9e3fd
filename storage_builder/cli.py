"""The ``storage-builder`` command: one console script, a subcommand per job.

The jobs themselves live in their packages; this module only wires options that every
command shares (settings file, log level and format) and turns errors into exit codes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer

from storage_builder.errors import StorageBuilderError
from storage_builder.logs import setup_logging
from storage_builder.process import bound_malloc_arenas
from storage_builder.settings import Settings, load_settings

log = logging.getLogger(__name__)

app = typer.Typer(
    name="storage-builder",
    help="Per-tenant snapshots of PostgreSQL in S3, kept current from change data capture.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class AppState:
    """What the top-level options decided, handed to every subcommand through the context."""

    def __init__(self, config_file: Path | None) -> None:
        self.config_file = config_file
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        # Loaded lazily, so `--help` works without a valid configuration.
        if self._settings is None:
            self._settings = load_settings(self.config_file)
        return self._settings


@app.callback()
def _common(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", envvar="SB_CONFIG", help="TOML settings file.")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", envvar="SB_LOG_LEVEL")] = "INFO",
    log_format: Annotated[
        str, typer.Option("--log-format", envvar="SB_LOG_FORMAT", help="text or json")
    ] = "text",
) -> None:
    if log_format not in ("text", "json"):
        raise typer.BadParameter(f"{log_format!r} is not text or json", param_hint="--log-format")
    setup_logging(log_level, log_format)
    ctx.obj = AppState(config)


def settings_of(ctx: typer.Context) -> Settings:
    """The settings of this invocation; subcommands call this instead of loading their own."""
    state = ctx.find_root().obj
    assert isinstance(state, AppState)
    return state.settings


@app.command("config")
def show_config(ctx: typer.Context) -> None:
    """Print the effective settings as JSON, secrets masked."""
    typer.echo(orjson.dumps(settings_of(ctx).redacted(), option=orjson.OPT_INDENT_2).decode())


def _register_subcommands() -> None:
    # Imported here so each package keeps its own commands next to its code.
    from bootstrap.cli import register as register_bootstrap
    from bootstrap.reconcile import register as register_reconcile
    from consumer.cli import register as register_consumer
    from consumer.lag import register as register_lag
    from schemas.demo import register as register_demo
    from snapshots.cli import register as register_snapshots
    from storage_builder.bench import register as register_bench

    for register in (
        register_bootstrap,
        register_reconcile,
        register_consumer,
        register_lag,
        register_demo,
        register_snapshots,
        register_bench,
    ):
        register(app)


def main() -> None:
    """Entry point of the console script: errors we raise on purpose exit 2 with one line."""
    bound_malloc_arenas()
    _register_subcommands()
    try:
        app()
    except StorageBuilderError as error:
        log.debug("command failed", exc_info=True)
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
