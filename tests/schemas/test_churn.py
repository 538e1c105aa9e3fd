"""Churn: what it reports committed is exactly what changed in the tables."""

from __future__ import annotations

import threading

import psycopg
import pytest
from psycopg import sql

from schemas.churn import CommittedChange, churn
from schemas.datasets import DATASETS
from schemas.seed import seed
from storage_builder.errors import ConfigError, InvalidTargetError

_ROWS_PER_TARGET = 30


def _table_state(conn: psycopg.Connection, clients: list[int]) -> dict[tuple, int]:
    """(dataset, client_id, id) -> row_version of every row of these clients."""
    state = {}
    for name in DATASETS:
        rows = conn.execute(
            sql.SQL("SELECT client_id, id, row_version FROM {} WHERE client_id = ANY(%s)").format(
                sql.Identifier("public", name)
            ),
            [clients],
        )
        state.update({(name, client, key): version for client, key, version in rows})
    return state


def test_churn_commits_what_it_counts(source: psycopg.Connection, dsn: str, client_id: int) -> None:
    clients = [client_id, client_id + 1, client_id + 2]
    seed(source, clients, _ROWS_PER_TARGET, vacuum=False)
    before = _table_state(source, clients)
    reported: list[list[CommittedChange]] = []

    stats = churn(dsn, 60, 3.0, clients, seed=5, record=True, on_commit=reported.append)

    assert stats.inserts > 0 and stats.updates > 0 and stats.deletes > 0
    assert stats.multi_change_transactions > 0
    assert stats.failed_transactions == 0
    assert stats.transactions == len(reported)
    assert stats.changes == [change for batch in reported for change in batch]
    assert stats.total == len(stats.changes)
    assert {change.client_id for change in stats.changes} <= set(clients)
    assert all(len({c.commit_ts for c in batch}) == 1 for batch in reported)

    # Replaying the recorded changes over the state before gives the state after.
    expected = dict(before)
    for change in stats.changes:
        key = (change.dataset, change.client_id, change.id)
        if change.op == "d":
            assert expected.pop(key) == change.row_version
        else:
            assert (key in expected) == (change.op == "u")
            assert change.row_version > expected.get(key, 0)
            expected[key] = change.row_version
    assert _table_state(source, clients) == expected


def test_churn_stops_when_asked(source: psycopg.Connection, dsn: str, client_id: int) -> None:
    seed(source, [client_id], 5, datasets=["raw_data"], vacuum=False)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()

    stats = churn(dsn, 20, None, [client_id], datasets=["raw_data"], stop=stop)

    assert 0.9 < stats.seconds < 5
    assert stats.total > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"rate": -5}, ConfigError, "rate"),
        ({"rate": 0}, ConfigError, "rate"),
        ({"rate": float("nan")}, ConfigError, "rate"),
        ({"duration": -1}, ConfigError, "duration"),
        ({"clients": ["7 "]}, InvalidTargetError, "clients"),
        ({"clients": [True]}, InvalidTargetError, "clients"),
        ({"datasets": ["ledger"]}, InvalidTargetError, "datasets"),
        ({"max_changes_per_transaction": 0}, ConfigError, "max_changes_per_transaction"),
        ({"mix": {"upsert": 1.0}}, ConfigError, "mix"),
    ],
)
def test_bad_arguments_are_named(
    dsn: str, kwargs: dict[str, object], error: type[Exception], names: str
) -> None:
    arguments: dict[str, object] = {"rate": 10, "duration": 1, "clients": [5]} | kwargs

    with pytest.raises(error, match=names):
        churn(dsn, **arguments)  # type: ignore[arg-type]
