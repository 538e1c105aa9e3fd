"""``storage-builder bootstrap``, ``snapshot verify`` and ``bench bootstrap|rebuild``.

The commands resolve and validate targets, show progress, print the summary and turn the
outcome into an exit code; the work itself is in :mod:`bootstrap.snapshot`,
:mod:`bootstrap.verify` and :mod:`bootstrap.bench`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bootstrap import source
from bootstrap.snapshot import FAILED, BootstrapResult, bootstrap_targets
from schemas.datasets import DATASETS, Target, get_dataset, parse_client_id
from storage_builder.errors import ConfigError, InvalidTargetError
from storage_builder.settings import Settings

log = logging.getLogger(__name__)

_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add ``bootstrap`` to the app, ``verify`` to ``snapshot`` and two benchmarks."""
    app.command("bootstrap")(bootstrap_command)

    from bootstrap.verify import verify_command
    from snapshots import cli as snapshots_cli

    snapshot_app = getattr(snapshots_cli, "snapshot_app", None)
    if snapshot_app is not None:
        snapshot_app.command("verify")(verify_command)
    else:
        log.debug("snapshots.cli has no snapshot_app; `snapshot verify` is not registered")

    from bootstrap.bench import register_benchmarks
    from storage_builder.bench import bench_app

    register_benchmarks(bench_app)


def resolve_targets(
    settings: Settings, dataset: str | None, client: str | None, every: bool
) -> list[Target]:
    """The targets a command names; unknown datasets and clients are refused by name."""
    if every and (dataset or client):
        raise ConfigError("--all cannot be combined with --dataset or --client")
    if not every and not dataset and not client:
        raise ConfigError("name --dataset and/or --client, or --all")
    datasets = [get_dataset(dataset).name] if dataset else sorted(DATASETS)
    client_id = parse_client_id(client) if client is not None else None

    with source.connect(settings.postgres.dsn.get_secret_value()) as conn:
        known = set()
        for name in sorted(DATASETS):
            known.update(source.client_ids(conn, get_dataset(name)))
    if client_id is not None:
        if client_id not in known:
            raise InvalidTargetError(
                f"client {client_id} does not exist: it has no rows in any dataset"
            )
        return [Target(name, client_id) for name in datasets]
    return [Target(name, known_id) for name in datasets for known_id in sorted(known)]


@contextmanager
def _progress_bar(
    quiet: bool,
) -> Iterator[tuple[Callable[[int, int], None], Callable[[int], None], Callable[[], None]]]:
    """Targets done, rows/s and ETA on stderr; yields the on_plan, on_rows and on_target
    callbacks."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[targets]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=_console,
        disable=quiet,
    )
    task = progress.add_task("bootstrap", total=None, targets="", rate="")
    started = time.monotonic()
    state = {"rows": 0, "targets": 0, "total_targets": 0}

    def on_plan(targets: int, rows: int) -> None:
        state["total_targets"] = targets
        progress.update(task, total=max(rows, 1), targets=f"0/{targets} targets")

    def on_rows(rows: int) -> None:
        state["rows"] += rows
        rate = state["rows"] / max(time.monotonic() - started, 1e-6)
        progress.update(task, advance=rows, rate=f"{rate:,.0f} rows/s")

    def on_target() -> None:
        state["targets"] += 1
        progress.update(task, targets=f"{state['targets']}/{state['total_targets']} targets")

    with progress:
        yield on_plan, on_rows, on_target


def print_summary(results: Sequence[BootstrapResult]) -> None:
    """One line per target: rows, bytes, seconds, outcome (and the error when it failed)."""
    table = Table(title="bootstrap summary")
    for heading in ("target", "outcome", "rows", "bytes", "seconds", "version", "error"):
        table.add_column(heading, justify="right" if heading in ("rows", "bytes") else "left")
    for result in sorted(results, key=lambda r: (r.outcome != FAILED, str(r.target))):
        table.add_row(
            str(result.target),
            result.outcome,
            f"{result.rows:,}",
            f"{result.bytes:,}",
            f"{result.seconds:.2f}",
            "" if result.version is None else str(result.version),
            result.error or "",
        )
    Console().print(table)


def _write_metrics(results: Sequence[BootstrapResult], seconds: float) -> None:
    try:
        from storage_builder.metrics import write_job_metrics
    except ImportError:
        return
    outcomes: dict[str, int] = {}
    for result in results:
        outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
    write_job_metrics(
        "bootstrap",
        succeeded=not outcomes.get(FAILED),
        duration_s=seconds,
        targets=outcomes,
    )


def bootstrap_command(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option("--dataset", help="One dataset.")] = None,
    client: Annotated[str | None, typer.Option("--client", help="One client id.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every dataset of every client.")] = False,
    parallel: Annotated[
        int, typer.Option("--parallel", min=1, max=64, help="Worker processes.")
    ] = os.cpu_count() or 2,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild targets that already have a snapshot.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Build full snapshots of targets straight from PostgreSQL and publish them.

    Targets that already have a snapshot are skipped unless --force, so an interrupted
    --all resumes. Exits 1 when any target failed, naming them.
    """
    from storage_builder.cli import settings_of

    settings = settings_of(ctx)
    targets = resolve_targets(settings, dataset, client, every)
    started = time.monotonic()
    with _progress_bar(quiet) as (on_plan, on_rows, on_target):
        results = bootstrap_targets(
            targets,
            settings,
            parallel=parallel,
            force=force,
            on_rows=on_rows,
            on_plan=on_plan,
            on_result=lambda _result: on_target(),
        )
    seconds = time.monotonic() - started
    print_summary(results)
    _write_metrics(results, seconds)

    failed = [result for result in results if result.outcome == FAILED]
    if failed:
        names = ", ".join(str(result.target) for result in failed)
        typer.echo(f"error: {len(failed)} of {len(results)} targets failed: {names}", err=True)
        raise typer.Exit(1)
