"""Reading a target from PostgreSQL: the queries, their snapshot, and the key ranges.

Two row shapes are read. The *encoder* shape is what PostgreSQL can send most cheaply and
the segment encoder turns into Avro with integer arithmetic, never building a ``date``,
``datetime`` or ``Decimal``: it is read in binary, with dates as PostgreSQL's own binary
form (days since 2000-01-01) and timestamps with time zone likewise (microseconds since
2000-01-01 UTC), both loaded as plain integers by psycopg's C loaders; numerics as their
text, which at the column's fixed scale is the unscaled integer with a point in it; jsonb
as its canonical text. After the columns comes one more value, the row's hash
(:mod:`snapshots.checksums`), which PostgreSQL computes in a fraction of the time Python
would. The *exact* shape reads the values as Python objects, for comparing
a snapshot with the database.

Every read of a target happens in one REPEATABLE READ transaction, whose
``pg_current_snapshot()`` becomes the snapshot's source position; several processes share
one database snapshot through ``pg_export_snapshot()`` / ``SET TRANSACTION SNAPSHOT``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.numeric import Int4BinaryLoader, Int8BinaryLoader

from schemas.datasets import DATASETS, Column, Dataset, Target, get_dataset
from snapshots.checksums import sql_row_hash
from storage_builder.errors import SourceError

log = logging.getLogger(__name__)

# Rows per FETCH of the server-side cursor: a few megabytes of Python objects at most.
FETCH_ROWS = 2_000

# PostgreSQL's binary dates and timestamps count from 2000-01-01; Avro's from 1970-01-01.
PG_EPOCH_DAYS = 10_957
PG_EPOCH_MICROS = PG_EPOCH_DAYS * 86_400 * 1_000_000


@dataclass(frozen=True)
class TargetSnapshot:
    """The database snapshot a target is read in: its text form and, when exported, its id."""

    pg_snapshot: str
    exported_id: str | None = None


def _encoder_expression(column: Column) -> sql.Composable:
    name = sql.Identifier(column.name)
    if column.numeric_scale is not None or column.pg_type == "jsonb":
        return sql.SQL("{}::text").format(name)
    return name


def _exact_expression(column: Column) -> sql.Composable:
    # jsonb is kept as PostgreSQL's canonical text, the form snapshots store.
    if column.pg_type == "jsonb":
        return sql.SQL("{}::text").format(sql.Identifier(column.name))
    return sql.Identifier(column.name)


def range_query(
    dataset: Dataset, *, exact: bool = False, lo: int | None = None, hi: int | None = None
) -> tuple[sql.Composed, list[Any]]:
    """The rows of one client in ``[lo, hi)`` in key order, and the query's parameters."""
    expression = _exact_expression if exact else _encoder_expression
    selected = [expression(column) for column in dataset.columns]
    if not exact:
        row_hash = sql_row_hash(f'"{dataset.key_column}"', f'"{dataset.version_column}"')
        selected.append(sql.SQL(row_hash))
    columns = sql.SQL(", ").join(selected)
    key = sql.Identifier(dataset.key_column)
    conditions = [sql.SQL("{} = %s").format(sql.Identifier(dataset.client_column))]
    params: list[Any] = []
    if lo is not None:
        conditions.append(sql.SQL("{} >= %s").format(key))
        params.append(lo)
    if hi is not None:
        conditions.append(sql.SQL("{} < %s").format(key))
        params.append(hi)
    query = sql.SQL("SELECT {} FROM {}.{} WHERE {} ORDER BY {}").format(
        columns,
        sql.Identifier(dataset.schema),
        sql.Identifier(dataset.name),
        sql.SQL(" AND ").join(conditions),
        key,
    )
    return query, params


def versions_query(dataset: Dataset) -> sql.Composed:
    """Key and version of each row of one client in any of the given inclusive key ranges,
    in no particular order: index range scans of the primary key, which INCLUDEs the
    version."""
    key = sql.Identifier(dataset.key_column)
    return sql.SQL(
        "SELECT t.{key}, t.{version} "
        "FROM unnest(%s::bigint[], %s::bigint[]) AS r(lo, hi) "
        "JOIN {schema}.{table} AS t ON t.{key} BETWEEN r.lo AND r.hi "
        "WHERE t.{client} = %s"
    ).format(
        key=key,
        version=sql.Identifier(dataset.version_column),
        schema=sql.Identifier(dataset.schema),
        table=sql.Identifier(dataset.name),
        client=sql.Identifier(dataset.client_column),
    )


def rows_by_key_query(dataset: Dataset) -> sql.Composed:
    """The exact rows of one client with any of the given keys, in key order."""
    columns = sql.SQL(", ").join(_exact_expression(column) for column in dataset.columns)
    key = sql.Identifier(dataset.key_column)
    return sql.SQL("SELECT {} FROM {}.{} WHERE {} = %s AND {} = ANY(%s) ORDER BY {}").format(
        columns,
        sql.Identifier(dataset.schema),
        sql.Identifier(dataset.name),
        sql.Identifier(dataset.client_column),
        key,
        key,
    )


def connect(dsn: str, *, snapshots_only: bool = False) -> psycopg.Connection:
    """A connection for reading targets; failures name the setting to check.

    With ``snapshots_only`` every transaction is a read-only REPEATABLE READ one from its
    BEGIN, which saves a round trip per transaction to a caller that runs many small ones.
    """
    try:
        conn = psycopg.connect(dsn, connect_timeout=10)
    except psycopg.Error as error:
        raise SourceError(f"cannot connect to PostgreSQL (postgres.dsn): {error}") from None
    if snapshots_only:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
    return conn


def _snapshots_only(conn: psycopg.Connection) -> bool:
    return conn.isolation_level == psycopg.IsolationLevel.REPEATABLE_READ and bool(conn.read_only)


@contextmanager
def snapshot_transaction(
    conn: psycopg.Connection, *, import_id: str | None = None, export: bool = False
) -> Iterator[TargetSnapshot]:
    """A read-only REPEATABLE READ transaction, importing or exporting its snapshot.

    The transaction stays open for the whole block: an exported snapshot can be imported
    only while the transaction that exported it is still open.
    """
    with conn.transaction():
        if not _snapshots_only(conn):
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if import_id is not None:
            _import_snapshot(conn, import_id)
        query = "SELECT pg_current_snapshot()::text" + (", pg_export_snapshot()" if export else "")
        row = conn.execute(query).fetchone()
        assert row is not None
        yield TargetSnapshot(pg_snapshot=row[0], exported_id=row[1] if export else None)


@contextmanager
def compare_transaction(
    conn: psycopg.Connection, *, export: bool = False, import_id: str | None = None
) -> Iterator[str | None]:
    """A read-only REPEATABLE READ transaction for comparing a target; yields the id of its
    exported snapshot when ``export``, or imports the snapshot ``import_id``.

    Unlike :func:`snapshot_transaction` it does not ask for the snapshot's text form, which
    only a bootstrap records: on a connection made with ``snapshots_only``, a comparison that
    exports nothing costs no round trip beyond its own queries, and one that imports a
    snapshot one.
    """
    if export or not _snapshots_only(conn):
        with snapshot_transaction(conn, export=export, import_id=import_id) as snapshot:
            yield snapshot.exported_id
        return
    with conn.transaction():
        if import_id is not None:
            _import_snapshot(conn, import_id)
        yield None


def _import_snapshot(conn: psycopg.Connection, import_id: str) -> None:
    """The transaction just begun sees the database as the exporting transaction does."""
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(import_id)))


def stream_batches(
    conn: psycopg.Connection,
    target: Target,
    *,
    exact: bool = False,
    lo: int | None = None,
    hi: int | None = None,
) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of ``target`` in ``[lo, hi)`` in key order, in batches of ``FETCH_ROWS``.

    Must run inside :func:`snapshot_transaction`; a server-side cursor keeps at most one
    batch in memory, whatever the size of the target.
    """
    dataset = get_dataset(target.dataset)
    query, params = range_query(dataset, exact=exact, lo=lo, hi=hi)
    name = f"sb_{target.dataset}_{target.client_id}"
    with conn.cursor(name=name, binary=not exact) as cursor:
        if not exact:
            # Dates and timestamps stay the integers PostgreSQL sends (see the module doc).
            cursor.adapters.register_loader("date", Int4BinaryLoader)
            cursor.adapters.register_loader("timestamptz", Int8BinaryLoader)
        cursor.itersize = FETCH_ROWS
        cursor.execute(query, [target.client_id, *params])
        while batch := cursor.fetchmany(FETCH_ROWS):
            yield batch


def stream_rows(
    conn: psycopg.Connection,
    target: Target,
    *,
    exact: bool = False,
    lo: int | None = None,
    hi: int | None = None,
) -> Iterator[tuple[Any, ...]]:
    """The rows of ``target`` in ``[lo, hi)`` in key order, one by one (see stream_batches)."""
    for batch in stream_batches(conn, target, exact=exact, lo=lo, hi=hi):
        yield from batch


def split_points(conn: psycopg.Connection, target: Target, parts: int) -> list[int]:
    """Keys that cut ``target`` into ``parts`` ranges of about equal row counts.

    Reads only the primary-key index (an index-only scan over one client's keys).
    """
    if parts < 2:
        return []
    dataset = get_dataset(target.dataset)
    fractions = [i / parts for i in range(1, parts)]
    query = sql.SQL(
        "SELECT percentile_disc(%s::float8[]) WITHIN GROUP (ORDER BY {key}) "
        "FROM {schema}.{table} WHERE {client} = %s"
    ).format(
        key=sql.Identifier(dataset.key_column),
        schema=sql.Identifier(dataset.schema),
        table=sql.Identifier(dataset.name),
        client=sql.Identifier(dataset.client_column),
    )
    row = conn.execute(query, [fractions, target.client_id]).fetchone()
    points = row[0] if row and row[0] else []
    return sorted(set(points))


def row_counts(
    conn: psycopg.Connection, dataset: Dataset, clients: Sequence[int] | None = None
) -> dict[int, int]:
    """Rows per client of one dataset, of every client or the given ones (absent: 0 rows)."""
    query = sql.SQL("SELECT {client}, count(*) FROM {schema}.{table} {where} GROUP BY {client}")
    where = sql.SQL("WHERE {} = ANY(%s)").format(sql.Identifier(dataset.client_column))
    composed = query.format(
        client=sql.Identifier(dataset.client_column),
        schema=sql.Identifier(dataset.schema),
        table=sql.Identifier(dataset.name),
        where=where if clients is not None else sql.SQL(""),
    )
    params = [list(clients)] if clients is not None else []
    return {client: count for client, count in conn.execute(composed, params).fetchall()}


def client_ids(conn: psycopg.Connection, dataset: Dataset) -> list[int]:
    """Every client with rows in ``dataset``."""
    query = sql.SQL("SELECT DISTINCT {} FROM {}.{}").format(
        sql.Identifier(dataset.client_column),
        sql.Identifier(dataset.schema),
        sql.Identifier(dataset.name),
    )
    return sorted(row[0] for row in conn.execute(query).fetchall())


def client_row_counts(conn: psycopg.Connection, client_id: int) -> dict[str, int]:
    """Rows of one client in each dataset."""
    counts = {}
    for dataset in DATASETS.values():
        query = sql.SQL("SELECT count(*) FROM {}.{} WHERE {} = %s").format(
            sql.Identifier(dataset.schema),
            sql.Identifier(dataset.name),
            sql.Identifier(dataset.client_column),
        )
        row = conn.execute(query, [client_id]).fetchone()
        counts[dataset.name] = row[0] if row else 0
    return counts
