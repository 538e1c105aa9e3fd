"""Comparing a target's snapshot with the database, for the reconciliation tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from bootstrap.source import range_query
from schemas.datasets import Target, get_dataset
from snapshots.reader import open_snapshot
from storage_builder.settings import Settings

ROWS = 300
SEGMENT_ROWS = 50


def database_rows(pg: psycopg.Connection, target: Target) -> list[dict[str, Any]]:
    """The target's rows in the database, as exact values in key order."""
    dataset = get_dataset(target.dataset)
    query, params = range_query(dataset, exact=True)
    cursor = pg.execute(query, [target.client_id, *params])
    return [dict(zip(dataset.column_names, row, strict=True)) for row in cursor]


def change_rows(
    pg: psycopg.Connection, client_id: int, keys: Sequence[int], currency: str = "XTS"
) -> None:
    """Drift made on purpose: new values for rows of a client's ``raw_data``, behind the
    consumer's back (the database gives the rows new versions)."""
    pg.execute(
        "UPDATE raw_data SET currency = %s WHERE client_id = %s AND id = ANY(%s)",
        [currency, client_id, list(keys)],
    )


def snapshot_rows(settings: Settings, target: Target) -> list[dict[str, Any]]:
    with open_snapshot(target.dataset, target.client_id, settings) as snapshot:
        return list(snapshot)


def assert_snapshot_equals_database(
    pg: psycopg.Connection, settings: Settings, target: Target
) -> None:
    expected = database_rows(pg, target)
    actual = snapshot_rows(settings, target)
    assert [row["id"] for row in actual] == [row["id"] for row in expected]
    assert actual == expected
