"""Seeding: exact row counts per client, values that round-trip, clear errors."""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal

import psycopg
import pytest
from psycopg import sql

from schemas.datasets import DATASETS, Dataset
from schemas.sample import SampleRows, client_row_counts
from schemas.seed import seed
from storage_builder.errors import ConfigError, InvalidTargetError


def _counts(conn: psycopg.Connection, dataset: str, clients: list[int]) -> dict[int, int]:
    rows = conn.execute(
        sql.SQL(
            "SELECT client_id, count(*) FROM {} WHERE client_id = ANY(%s) GROUP BY client_id"
        ).format(sql.Identifier("public", dataset)),
        [clients],
    ).fetchall()
    return {client: 0 for client in clients} | dict(rows)


def _expected(dataset: Dataset, column: str, text: str | None) -> object:
    """What psycopg should give back for the text a sample row sent."""
    if text is None:
        return None
    pg_type = dataset.column(column).pg_type
    if pg_type in ("bigint", "integer"):
        return int(text)
    if pg_type.startswith("numeric"):
        return Decimal(text)
    if pg_type == "date":
        return date.fromisoformat(text)
    if pg_type == "timestamptz":
        return datetime.fromisoformat(text)
    if pg_type == "boolean":
        return text == "t"
    if pg_type == "jsonb":
        return json.loads(text)
    return text


def test_row_counts_follow_the_skew() -> None:
    assert client_row_counts([1, 2, 3], 10, 0.0) == {1: 10, 2: 10, 3: 10}

    skewed = client_row_counts(list(range(1, 21)), 1000, 1.2)
    sizes = list(skewed.values())
    assert sum(sizes) == 20_000
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] > 5 * sizes[-1]


def test_sample_rows_are_deterministic() -> None:
    first = list(SampleRows("raw_data", 7, seed=3).rows(1, 50))

    assert first == list(SampleRows("raw_data", 7, seed=3).rows(1, 50))
    assert first != list(SampleRows("raw_data", 7, seed=4).rows(1, 50))
    assert first != list(SampleRows("raw_data", 8, seed=3).rows(1, 50))


def test_seed_loads_exactly_the_requested_rows(source: psycopg.Connection, client_id: int) -> None:
    clients = [client_id, client_id + 1, client_id + 2]

    result = seed(source, clients, {clients[0]: 120, clients[1]: 0, clients[2]: 7}, vacuum=False)
    again = seed(source, clients, 10, skew=1.0, datasets=["entities"], vacuum=False)

    for name in DATASETS:
        expected = {clients[0]: 120, clients[1]: 0, clients[2]: 7}
        if name == "entities":
            expected = {c: expected[c] + again.target_rows[(name, c)] for c in clients}
        assert _counts(source, name, clients) == expected, name
    assert result.rows == {name: 127 for name in DATASETS}
    assert again.rows == {"entities": 30}
    assert [again.target_rows[("entities", c)] for c in clients] == [16, 8, 6]


def test_reset_replaces_the_clients_rows(source: psycopg.Connection, client_id: int) -> None:
    seed(source, [client_id], 50, datasets=["formulas"], vacuum=False)

    seed(source, [client_id], 20, datasets=["formulas"], reset=True, vacuum=False)

    ids = source.execute(
        "SELECT min(id), max(id), count(*) FROM public.formulas WHERE client_id = %s",
        [client_id],
    ).fetchone()
    assert ids == (1, 20, 20)


@pytest.mark.parametrize("dataset", DATASETS.values(), ids=lambda d: d.name)
def test_values_round_trip(source: psycopg.Connection, client_id: int, dataset: Dataset) -> None:
    sample = SampleRows(dataset, client_id, seed=11)
    sent = list(sample.rows(1, 400))

    seed(source, [client_id], 400, datasets=[dataset.name], seed=11, vacuum=False)

    stored = source.execute(
        sql.SQL("SELECT {} FROM {} WHERE client_id = %s ORDER BY id").format(
            sql.SQL(", ").join(map(sql.Identifier, sample.columns)),
            sql.Identifier(dataset.schema, dataset.name),
        ),
        [client_id],
    ).fetchall()
    assert len(stored) == len(sent)
    for texts, values in zip(sent, stored, strict=True):
        for column, text, value in zip(sample.columns, texts, values, strict=True):
            expected = _expected(dataset, column, text)
            assert value == expected, (column, text)
            if isinstance(expected, Decimal):
                assert value.as_tuple().exponent == expected.as_tuple().exponent, (column, text)

    nullable = [i for i, c in enumerate(sample.columns) if dataset.column(c).nullable]
    assert all(any(row[i] is None for row in sent) for i in nullable), "every nullable has NULLs"
    assert all(any(row[i] is not None for row in sent) for i in nullable)


def test_unicode_and_control_characters_round_trip(
    source: psycopg.Connection, client_id: int
) -> None:
    seed(source, [client_id], 600, datasets=["entities"], vacuum=False)

    names = {
        row[0]
        for row in source.execute(
            "SELECT name FROM public.entities WHERE client_id = %s", [client_id]
        )
    }
    text = "".join(names)
    for needle in (
        "🚀",
        "👨‍👩‍👧‍👦",
        "売上高",
        "الإيرادات",
        "Выручка",
        "\t",
        "\n",
        "\r",
        "\\",
        "\x1b",
    ):
        assert needle in text, repr(needle)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"clients": ["12x"]}, InvalidTargetError, "clients"),
        ({"clients": [-3]}, InvalidTargetError, "clients"),
        ({"clients": [5, 5]}, ConfigError, "clients"),
        ({"datasets": ["ledger"]}, InvalidTargetError, "datasets"),
        ({"rows_per_client": -1}, ConfigError, "rows_per_client"),
        ({"rows_per_client": {99: 1}}, ConfigError, "rows_per_client"),
        ({"skew": -0.5}, ConfigError, "skew"),
    ],
)
def test_bad_arguments_are_named(
    dsn: str, kwargs: dict[str, object], error: type[Exception], names: str
) -> None:
    arguments: dict[str, object] = {"clients": [5], "rows_per_client": 1} | kwargs
    clients = arguments.pop("clients")
    rows = arguments.pop("rows_per_client")

    with pytest.raises(error, match=names):
        seed(dsn, clients, rows, **arguments)  # type: ignore[arg-type]
