"""source.sql against the real PostgreSQL: idempotent, faithful to datasets.py, and the
database, not the writer, deciding every row version."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from schemas.datasets import DATASETS, Dataset
from schemas.source import PUBLICATION, apply_schema, schema_is_applied

# format_type() spells a few types out in full.
_CATALOG_NAMES = {"timestamptz": "timestamp with time zone"}


def test_schema_applies_twice(pg: psycopg.Connection) -> None:
    apply_schema(pg)
    apply_schema(pg)

    assert schema_is_applied(pg)


@pytest.mark.parametrize("dataset", DATASETS.values(), ids=lambda d: d.name)
def test_table_matches_dataset(source: psycopg.Connection, dataset: Dataset) -> None:
    columns = source.execute(
        """
        SELECT attname, format_type(atttypid, atttypmod), attnotnull
        FROM pg_attribute
        WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped
        ORDER BY attnum
        """,
        [dataset.table],
    ).fetchall()

    assert columns == [
        (column.name, _CATALOG_NAMES.get(column.pg_type, column.pg_type), not column.nullable)
        for column in dataset.columns
    ]


@pytest.mark.parametrize("dataset", DATASETS.values(), ids=lambda d: d.name)
def test_key_identity_and_publication(source: psycopg.Connection, dataset: Dataset) -> None:
    index = source.execute(
        """
        SELECT (SELECT array_agg(attname::text ORDER BY n)
                FROM unnest(i.indkey[:i.indnkeyatts - 1]) WITH ORDINALITY AS k(att, n)
                JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.att),
               (SELECT array_agg(attname::text)
                FROM unnest(i.indkey[i.indnkeyatts:]) AS k(att)
                JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.att),
               c.relreplident
        FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
        WHERE i.indrelid = %s::regclass AND i.indisprimary
        """,
        [dataset.table],
    ).fetchone()
    assert index is not None, f"{dataset.table} has no primary key"
    key_columns, included, identity = index
    published = source.execute(
        """
        SELECT p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate
        FROM pg_publication p JOIN pg_publication_tables t USING (pubname)
        WHERE p.pubname = %s AND t.schemaname = %s AND t.tablename = %s
        """,
        [PUBLICATION, dataset.schema, dataset.name],
    ).fetchone()

    assert key_columns == [dataset.client_column, dataset.key_column]
    assert included == [dataset.version_column]
    # DEFAULT: a delete event carries the primary key's key columns, client id included.
    assert identity == "d"
    assert published == (True,)


def _scalar(conn: psycopg.Connection, query: str) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def _version(conn: psycopg.Connection, client_id: int, key: int) -> int:
    row = conn.execute(
        "SELECT row_version FROM public.formulas WHERE client_id = %s AND id = %s",
        [client_id, key],
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_version_is_assigned_on_insert_even_when_given(
    source: psycopg.Connection, client_id: int
) -> None:
    before = _scalar(source, "SELECT nextval('public.row_version_seq')")

    source.execute(
        """
        INSERT INTO public.formulas
            (id, client_id, name, expression, valid_from, enabled, updated_at, row_version)
        VALUES (1, %s, 'a', 'x', '2024-01-01', true, now(), 1),
               (2, %s, 'b', 'y', '2024-01-01', true, now(), DEFAULT)
        """,
        [client_id, client_id],
    )

    forged, defaulted = _version(source, client_id, 1), _version(source, client_id, 2)
    assert forged > before and defaulted > before
    assert forged != defaulted


@pytest.mark.parametrize(
    "assignment",
    ["name = 'renamed'", "name = name", "row_version = row_version", "row_version = 1"],
)
def test_version_bumps_on_every_update(
    source: psycopg.Connection, client_id: int, assignment: str
) -> None:
    source.execute(
        """
        INSERT INTO public.formulas
            (id, client_id, name, expression, valid_from, enabled, updated_at)
        VALUES (1, %s, 'a', 'x', '2024-01-01', true, now())
        """,
        [client_id],
    )
    versions = [_version(source, client_id, 1)]

    for _ in range(3):
        source.execute(
            sql.SQL("UPDATE public.formulas SET {} WHERE client_id = %s AND id = 1").format(
                sql.SQL(assignment)
            ),
            [client_id],
        )
        versions.append(_version(source, client_id, 1))

    assert versions == sorted(set(versions)), f"{assignment} left the version at {versions}"
