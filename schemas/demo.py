"""``storage-builder demo ...``: a sample source database to try and measure the system on.

``demo schema`` creates the tables, version triggers and publication; ``demo seed`` bulk-loads
skewed, realistic rows for many clients; ``demo churn`` keeps changing them at a steady rate
until stopped, so the consumer has a change stream to follow.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Annotated, TypeVar

import orjson
import typer

from schemas.churn import CommittedChange, churn, validate_rate
from schemas.seed import seed, validate_clients, validate_datasets, validate_skew
from schemas.source import apply_schema
from storage_builder.errors import StorageBuilderError

log = logging.getLogger(__name__)

T = TypeVar("T")

demo_app = typer.Typer(
    help="A sample source database: schema, seed data and steady churn.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add this package's commands to the ``storage-builder`` app."""
    app.add_typer(demo_app, name="demo")


def _dsn(ctx: typer.Context) -> str:
    from storage_builder.cli import settings_of

    return settings_of(ctx).postgres.dsn.get_secret_value()


def _split(values: list[str] | None) -> list[str] | None:
    """Values of a repeatable option, each of which may also be a comma-separated list."""
    if values is None:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _checked(check: Callable[..., T], *args: object) -> T:
    """Run a validator given the option's name; its error becomes a usage error."""
    try:
        return check(*args)
    except StorageBuilderError as error:
        raise typer.BadParameter(str(error)) from None


DatasetsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--datasets", "--dataset", help="Datasets to use (repeat or comma-separate); all if unset."
    ),
]


@demo_app.command("schema")
def schema_command(ctx: typer.Context) -> None:
    """Create the source tables, version triggers and publication (idempotent)."""
    apply_schema(_dsn(ctx))
    typer.echo("source schema applied")


@demo_app.command("seed")
def seed_command(
    ctx: typer.Context,
    clients: Annotated[int, typer.Option("--clients", help="How many clients to seed.")] = 10,
    rows_per_client: Annotated[
        int, typer.Option("--rows-per-client", help="Average rows per client, per dataset.")
    ] = 1000,
    skew: Annotated[
        float, typer.Option("--skew", help="Power-law skew of client sizes; 0 = equal.")
    ] = 1.0,
    datasets: DatasetsOption = None,
    first_client: Annotated[
        str, typer.Option("--first-client", help="Id of the first client; ids are consecutive.")
    ] = "1",
    client_ids: Annotated[
        list[str] | None,
        typer.Option("--client-ids", help="Explicit client ids (repeat or comma-separate)."),
    ] = None,
    random_seed: Annotated[int, typer.Option("--seed", help="Seed of the sample values.")] = 0,
    reset: Annotated[
        bool, typer.Option("--reset", help="Delete these clients' rows first.")
    ] = False,
    truncate: Annotated[
        bool, typer.Option("--truncate", help="Empty the datasets first (all clients).")
    ] = False,
    vacuum: Annotated[
        bool, typer.Option("--vacuum/--no-vacuum", help="VACUUM ANALYZE after loading.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Bulk-load sample rows for many clients with COPY."""
    ids = _client_ids(clients, first_client, client_ids)
    if rows_per_client < 0:
        raise typer.BadParameter(f"--rows-per-client must be >= 0, got {rows_per_client}")
    _checked(validate_skew, skew, "--skew")
    names = _split(datasets)
    _checked(validate_datasets, names, "--datasets")

    result = seed(
        _dsn(ctx),
        ids,
        rows_per_client,
        datasets=names,
        skew=skew,
        seed=random_seed,
        reset=reset,
        truncate=truncate,
        vacuum=vacuum,
    )

    if as_json:
        typer.echo(orjson.dumps(result.summary()).decode())
        return
    for name, rows in result.rows.items():
        typer.echo(f"{name:<22} {rows:>12,} rows")
    typer.echo(
        f"{'total':<22} {result.total_rows:>12,} rows for {len(ids)} clients in "
        f"{result.load_seconds:.1f} s ({result.rows_per_second:,.0f} rows/s)"
        + (f"; vacuum {result.vacuum_seconds:.1f} s" if vacuum else "")
    )


def _client_ids(count: int, first_client: str, explicit: list[str] | None) -> list[int]:
    if explicit:
        return _checked(validate_clients, _split(explicit), "--client-ids")
    if count < 1:
        raise typer.BadParameter(f"--clients must be >= 1, got {count}")
    first = _checked(validate_clients, [first_client], "--first-client")[0]
    return _checked(validate_clients, list(range(first, first + count)), "--first-client")


@demo_app.command("churn")
def churn_command(
    ctx: typer.Context,
    rate: Annotated[float, typer.Option("--rate", help="Changes per second.")] = 100.0,
    duration: Annotated[
        float | None, typer.Option("--duration", help="Seconds to run; until stopped if unset.")
    ] = None,
    clients: Annotated[
        list[str] | None,
        typer.Option(
            "--clients",
            "--client-ids",
            help="Client ids to change (repeat or comma-separate); all with rows if unset.",
        ),
    ] = None,
    datasets: DatasetsOption = None,
    skew: Annotated[
        float, typer.Option("--skew", help="Power-law skew of changes over clients.")
    ] = 1.0,
    max_changes: Annotated[
        int, typer.Option("--max-changes-per-transaction", help="Largest transaction.")
    ] = 20,
    random_seed: Annotated[int | None, typer.Option("--seed")] = None,
    log_changes: Annotated[
        Path | None,
        typer.Option("--log-changes", help="Write every committed change as a JSON line."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the totals as JSON.")] = False,
) -> None:
    """Insert, update and delete rows at a steady rate until stopped (Ctrl-C) or --duration."""
    _checked(validate_rate, rate, "--rate")
    if duration is not None and not duration > 0:
        raise typer.BadParameter(f"--duration must be > 0 seconds, got {duration}")
    if max_changes < 1:
        raise typer.BadParameter(f"--max-changes-per-transaction must be >= 1, got {max_changes}")
    ids = _checked(validate_clients, _split(clients), "--clients") if clients else None
    names = _split(datasets)
    _checked(validate_datasets, names, "--datasets")
    _checked(validate_skew, skew, "--skew")

    stop = threading.Event()
    with _stop_on_signals(stop), _change_log(log_changes) as on_commit:
        stats = churn(
            _dsn(ctx),
            rate,
            duration,
            ids,
            datasets=names,
            skew=skew,
            seed=random_seed,
            max_changes_per_transaction=max_changes,
            on_commit=on_commit,
            stop=stop,
        )

    summary = stats.summary()
    if as_json:
        typer.echo(orjson.dumps(summary).decode())
        return
    typer.echo(
        f"committed {stats.inserts} inserts, {stats.updates} updates, {stats.deletes} deletes "
        f"in {stats.transactions} transactions ({stats.multi_change_transactions} with several "
        f"changes, {stats.failed_transactions} rolled back) over {stats.seconds:.1f} s: "
        f"{stats.rate:.1f} changes/s"
    )


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop``: the running transaction finishes, then churn returns."""

    def handle(signum: int, frame: object) -> None:
        log.info("received %s, stopping after the current transaction", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _change_log(
    path: Path | None,
) -> Iterator[Callable[[list[CommittedChange]], None] | None]:
    """A commit callback writing each change as one JSON line to ``path`` (None: no callback)."""
    if path is None:
        yield None
        return
    with path.open("ab") as out:
        yield lambda changes: _write_changes(out, changes)


def _write_changes(out: IO[bytes], changes: list[CommittedChange]) -> None:
    for change in changes:
        out.write(orjson.dumps(change) + b"\n")
    out.flush()
