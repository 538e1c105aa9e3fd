"""Seeding the demo source: bulk-loading sample rows for many clients with ``COPY``.

``seed`` creates the schema when it is missing, then streams each dataset's rows to
PostgreSQL in one ``COPY`` per dataset (one transaction each), so the rows of a dataset
appear all at once and generating them in Python overlaps with the server storing them.
New rows take the ids after the client's current largest id, so seeding twice adds rows.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from schemas.datasets import DATASETS, Dataset, get_dataset, parse_client_id
from schemas.sample import SampleRows, client_row_counts
from schemas.source import ConnectionLike, connection, ensure_schema
from storage_builder.errors import ConfigError, InvalidTargetError, SourceError

log = logging.getLogger(__name__)


@dataclass
class SeedResult:
    """What a seed loaded: rows per dataset and per target, and how long it took."""

    rows: dict[str, int] = field(default_factory=dict)
    target_rows: dict[tuple[str, int], int] = field(default_factory=dict)
    load_seconds: float = 0.0
    vacuum_seconds: float = 0.0

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def rows_per_second(self) -> float:
        return self.total_rows / self.load_seconds if self.load_seconds > 0 else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "rows": dict(self.rows),
            "total_rows": self.total_rows,
            "load_seconds": round(self.load_seconds, 3),
            "vacuum_seconds": round(self.vacuum_seconds, 3),
            "rows_per_second": round(self.rows_per_second),
        }


def validate_clients(clients: Sequence[object], argument: str = "clients") -> list[int]:
    """Client ids as plain integers, without duplicates; errors name ``argument``."""
    if isinstance(clients, str | bytes) or not isinstance(clients, Sequence):
        raise ConfigError(f"{argument} must be a list of client ids, got {clients!r}")
    ids: list[int] = []
    for client in clients:
        try:
            client_id = parse_client_id(client)
        except InvalidTargetError as error:
            raise InvalidTargetError(f"{argument}: {error}") from None
        if client_id in ids:
            raise ConfigError(f"{argument}: client id {client_id} is given twice")
        ids.append(client_id)
    return ids


def validate_datasets(datasets: Sequence[str] | None, argument: str = "datasets") -> list[Dataset]:
    """The datasets named, in their order (all of them for None); errors name ``argument``."""
    if datasets is None:
        return list(DATASETS.values())
    chosen: list[Dataset] = []
    for name in datasets:
        try:
            dataset = get_dataset(name)
        except InvalidTargetError as error:
            raise InvalidTargetError(f"{argument}: {error}") from None
        if dataset not in chosen:
            chosen.append(dataset)
    if not chosen:
        raise ConfigError(f"{argument} is empty; name at least one dataset")
    return chosen


def validate_skew(skew: float, argument: str = "skew") -> float:
    if not isinstance(skew, int | float) or not math.isfinite(skew) or skew < 0:
        raise ConfigError(f"{argument} must be a finite number >= 0, got {skew!r}")
    return float(skew)


def _row_counts(
    clients: list[int], rows_per_client: Mapping[int, int] | int, skew: float
) -> dict[int, int]:
    if isinstance(rows_per_client, Mapping):
        counts = {parse_client_id(client): count for client, count in rows_per_client.items()}
        if set(counts) != set(clients):
            raise ConfigError(
                f"rows_per_client names clients {sorted(counts)} but clients is {clients}"
            )
        counts = {client: counts[client] for client in clients}
    elif isinstance(rows_per_client, int) and not isinstance(rows_per_client, bool):
        if rows_per_client < 0:
            raise ConfigError(f"rows_per_client must be >= 0, got {rows_per_client!r}")
        counts = client_row_counts(clients, rows_per_client, skew)
    else:
        raise ConfigError(f"rows_per_client must be an integer, got {rows_per_client!r}")
    for client, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"rows_per_client[{client}] must be an integer >= 0, got {count!r}")
    return counts


def seed(
    conn_or_dsn: ConnectionLike,
    clients: Sequence[object],
    rows_per_client: Mapping[int, int] | int,
    *,
    datasets: Sequence[str] | None = None,
    skew: float = 0.0,
    seed: int = 0,
    reset: bool = False,
    truncate: bool = False,
    vacuum: bool = True,
) -> SeedResult:
    """Load sample rows: for every dataset, ``rows_per_client`` rows per client.

    ``rows_per_client`` is a count per client (a mapping) or an average that ``skew`` shares
    out like tenants' sizes (see ``client_row_counts``). ``reset`` first deletes these
    clients' rows of the chosen datasets; ``truncate`` empties the chosen datasets entirely.
    ``vacuum`` runs VACUUM ANALYZE afterwards (on an autocommit connection), so the key-range
    scans of bootstrap and reconciliation start from fresh statistics and visibility maps.
    """
    client_ids = validate_clients(clients)
    chosen = validate_datasets(datasets)
    counts = _row_counts(client_ids, rows_per_client, validate_skew(skew))
    result = SeedResult()

    with connection(conn_or_dsn) as conn:
        ensure_schema(conn)
        if truncate:
            _truncate(conn, chosen)
        started = time.perf_counter()
        for dataset in chosen:
            loaded = _load_dataset(conn, dataset, counts, seed=seed, reset=reset)
            result.target_rows.update(loaded)
            result.rows[dataset.name] = sum(loaded.values())
        result.load_seconds = time.perf_counter() - started

        if vacuum:
            started = time.perf_counter()
            _vacuum(conn, chosen)
            result.vacuum_seconds = time.perf_counter() - started

    log.info(
        "seeded %d rows for %d clients in %.1f s (%.0f rows/s)",
        result.total_rows,
        len(client_ids),
        result.load_seconds,
        result.rows_per_second,
    )
    return result


def _truncate(conn: psycopg.Connection, datasets: list[Dataset]) -> None:
    tables = sql.SQL(", ").join(sql.Identifier(d.schema, d.name) for d in datasets)
    conn.execute(sql.SQL("TRUNCATE {}").format(tables))
    log.info("truncated %s", ", ".join(d.name for d in datasets))


def _load_dataset(
    conn: psycopg.Connection,
    dataset: Dataset,
    counts: Mapping[int, int],
    *,
    seed: int,
    reset: bool,
) -> dict[tuple[str, int], int]:
    table = sql.Identifier(dataset.schema, dataset.name)
    loaded: dict[tuple[str, int], int] = {}
    try:
        with conn.transaction():
            if reset:
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE client_id = ANY(%s)").format(table),
                    [list(counts)],
                )
            first_ids = _next_ids(conn, dataset, list(counts))
            columns = SampleRows(dataset, 1).columns
            copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
                table, sql.SQL(", ").join(map(sql.Identifier, columns))
            )
            with conn.cursor().copy(copy_sql) as copy:
                for client_id, count in counts.items():
                    sample = SampleRows(dataset, client_id, seed)
                    for row in sample.rows(first_ids[client_id], count):
                        copy.write_row(row)
                    loaded[(dataset.name, client_id)] = count
    except psycopg.Error as error:
        raise SourceError(f"seeding {dataset.table} failed: {error}") from error
    log.info("loaded %d rows into %s", sum(loaded.values()), dataset.table)
    return loaded


def _next_ids(conn: psycopg.Connection, dataset: Dataset, clients: list[int]) -> dict[int, int]:
    """The first free id of each client: one past its largest (found through the key)."""
    query = sql.SQL(
        "SELECT c, coalesce((SELECT max(id) FROM {} WHERE client_id = c), 0) + 1"
        " FROM unnest(%s::bigint[]) AS c"
    ).format(sql.Identifier(dataset.schema, dataset.name))
    return dict(conn.execute(query, [clients]).fetchall())


def _vacuum(conn: psycopg.Connection, datasets: list[Dataset]) -> None:
    command = "VACUUM (ANALYZE) {}" if conn.autocommit else "ANALYZE {}"
    for dataset in datasets:
        table = sql.Identifier(dataset.schema, dataset.name)
        conn.execute(sql.SQL(command).format(table))
