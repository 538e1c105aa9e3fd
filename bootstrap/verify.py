"""``storage-builder snapshot verify``: compare a snapshot with the database, row by row.

The snapshot and the database are both read in key order and merged like a join, so
memory holds one segment and one batch of rows whatever the size of the target. Every
missing, extra and different row is reported, with the columns that differ.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from bootstrap import source
from schemas.datasets import Target, get_dataset
from snapshots.reader import open_snapshot
from storage_builder.settings import Settings

log = logging.getLogger(__name__)

MISSING = "missing"  # in the database, not in the snapshot
EXTRA = "extra"  # in the snapshot, not in the database
DIFFERENT = "different"


@dataclass(frozen=True)
class Difference:
    """One row on which the snapshot and the database disagree."""

    kind: str
    key: int
    columns: tuple[str, ...] = ()
    snapshot: dict[str, Any] | None = None
    database: dict[str, Any] | None = None

    def describe(self) -> str:
        if self.kind != DIFFERENT:
            return f"{self.kind} row {self.key}"
        assert self.snapshot is not None and self.database is not None
        changes = ", ".join(
            f"{name}: snapshot {self.snapshot[name]!r} database {self.database[name]!r}"
            for name in self.columns
        )
        return f"different row {self.key}: {changes}"


@dataclass
class VerifyReport:
    """The outcome of comparing one target."""

    target: Target
    version: int
    rows_compared: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return not self.differences


def compare_rows(
    key_column: str,
    snapshot_rows: Iterable[dict[str, Any]],
    database_rows: Iterable[dict[str, Any]],
) -> Iterator[Difference]:
    """Merge two key-ordered row streams and yield every difference."""
    snapshot_iter, database_iter = iter(snapshot_rows), iter(database_rows)
    left, right = next(snapshot_iter, None), next(database_iter, None)
    while left is not None or right is not None:
        if right is None or (left is not None and left[key_column] < right[key_column]):
            assert left is not None
            yield Difference(EXTRA, left[key_column], snapshot=left)
            left = next(snapshot_iter, None)
        elif left is None or right[key_column] < left[key_column]:
            yield Difference(MISSING, right[key_column], database=right)
            right = next(database_iter, None)
        else:
            columns = tuple(name for name in right if not _same(left.get(name), right[name]))
            if columns:
                yield Difference(DIFFERENT, right[key_column], columns, left, right)
            left, right = next(snapshot_iter, None), next(database_iter, None)


def _same(snapshot_value: Any, database_value: Any) -> bool:
    # Exact: a Decimal keeps its scale in the comparison of str forms, a timestamp compares
    # as an instant whatever its zone, and True is not 1.
    if type(snapshot_value) is not type(database_value):
        same_instant = hasattr(snapshot_value, "tzinfo") and hasattr(database_value, "tzinfo")
        return same_instant and snapshot_value == database_value
    if hasattr(snapshot_value, "as_tuple"):
        return str(snapshot_value) == str(database_value)
    return bool(snapshot_value == database_value)


def verify_target(target: Target, settings: Settings) -> VerifyReport:
    """Compare the published snapshot of ``target`` with the database, as of now."""
    dataset = get_dataset(target.dataset)
    names = dataset.column_names
    with open_snapshot(target.dataset, target.client_id, settings) as snapshot:
        report = VerifyReport(target, snapshot.version)
        conn = source.connect(settings.postgres.dsn.get_secret_value())
        with conn, source.snapshot_transaction(conn):
            database_rows = (
                dict(zip(names, row, strict=True))
                for row in source.stream_rows(conn, target, exact=True)
            )
            counted = _counted(database_rows, report)
            report.differences.extend(compare_rows(dataset.key_column, snapshot, counted))
    return report


def _counted(rows: Iterable[dict[str, Any]], report: VerifyReport) -> Iterator[dict[str, Any]]:
    for row in rows:
        report.rows_compared += 1
        yield row


def verify_command(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option("--dataset", help="One dataset.")] = None,
    client: Annotated[str | None, typer.Option("--client", help="One client id.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every target.")] = False,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Differences shown per target.")
    ] = 1000,
) -> None:
    """Compare snapshots with the database row by row; exit 1 on any difference."""
    from bootstrap.cli import resolve_targets
    from storage_builder.cli import settings_of

    settings = settings_of(ctx)
    differing = []
    for target in resolve_targets(settings, dataset, client, every):
        report = verify_target(target, settings)
        for difference in report.differences[:limit]:
            typer.echo(f"{target} version {report.version}: {difference.describe()}")
        hidden = len(report.differences) - limit
        if hidden > 0:
            typer.echo(f"{target}: {hidden} more differences not shown")
        state = "in sync" if report.in_sync else f"{len(report.differences)} differences"
        typer.echo(f"{target} version {report.version}: {report.rows_compared} rows, {state}")
        if not report.in_sync:
            differing.append(str(target))
    if differing:
        typer.echo(f"error: snapshots differ from the database: {', '.join(differing)}", err=True)
        raise typer.Exit(1)
