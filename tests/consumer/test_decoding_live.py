"""Decoding against the real stack: rows written to PostgreSQL, streamed by Debezium, decoded.

Every test writes rows of its own client id, reads the change topics from the offsets they
had before the writes, keeps the records keyed by that client, and compares the decoded
rows with what PostgreSQL returns for the same rows.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from consumer.decoding import ChangeEvent, JsonDecoder
from consumer.handoff import PgSnapshot
from schemas.datasets import DATASETS
from storage_builder.settings import Settings

WAIT_S = 90.0
PARTITIONS = 6


class ChangeReader:
    """Reads the change topics of some datasets from their current ends, for one client."""

    def __init__(self, settings: Settings, datasets: list[str], client_id: int) -> None:
        self.decoder = JsonDecoder(settings.kafka)
        self.client_marker = str(client_id).encode()
        self.topics = [f"{settings.kafka.topic_prefix}.public.{name}" for name in datasets]
        config = settings.kafka.librdkafka() | {
            "group.id": f"test-decoding-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
        _ensure_topics(config, self.topics)
        self.consumer = Consumer(config)
        self.consumer.assign(
            [
                TopicPartition(topic, partition, self._end(topic, partition))
                for topic in self.topics
                for partition in range(PARTITIONS)
            ]
        )

    def _end(self, topic: str, partition: int) -> int:
        _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        return high

    def read(self, count: int) -> list[ChangeEvent]:
        """The next ``count`` change events of the client, in the order of their partition."""
        events: list[ChangeEvent] = []
        deadline = time.monotonic() + WAIT_S
        while len(events) < count:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"only {len(events)} of {count} change events arrived within {WAIT_S}s on "
                    f"{self.topics}: is the connector running (ops/stack status)?"
                )
            record = self.consumer.poll(1.0)
            if record is None:
                continue
            if record.error():
                raise KafkaException(record.error())
            if self.client_marker not in (record.key() or b""):
                continue
            topic, partition, offset = record.topic(), record.partition(), record.offset()
            assert topic is not None and partition is not None and offset is not None
            event = self.decoder.decode(record.value(), topic, partition, offset, record.key())
            assert isinstance(event, ChangeEvent)
            events.append(event)
        return events

    def close(self) -> None:
        self.consumer.close()


def _ensure_topics(config: dict[str, Any], topics: list[str]) -> None:
    """Create missing change topics as the connector would, so their ends can be read first."""
    admin = AdminClient({"bootstrap.servers": config["bootstrap.servers"]})
    existing = admin.list_topics(timeout=10).topics
    missing = [
        NewTopic(topic, PARTITIONS, 1, config={"cleanup.policy": "delete"})
        for topic in topics
        if topic not in existing
    ]
    for future in admin.create_topics(missing).values() if missing else ():
        try:
            future.result()
        except KafkaException as error:
            if "TOPIC_ALREADY_EXISTS" not in str(error):
                raise


@pytest.fixture
def reader_factory(settings: Settings, client_id: int) -> Iterator[Any]:
    readers: list[ChangeReader] = []

    def make(*datasets: str) -> ChangeReader:
        reader = ChangeReader(settings, list(datasets), client_id)
        readers.append(reader)
        return reader

    yield make
    for reader in readers:
        reader.close()


def rows_in_postgres(pg: psycopg.Connection, dataset: str, client_id: int) -> dict[int, dict]:
    """The rows of one target as PostgreSQL returns them; jsonb as its text."""
    columns = ", ".join(
        f"{c.name}::text AS {c.name}" if c.pg_type == "jsonb" else c.name
        for c in DATASETS[dataset].columns
    )
    cursor = pg.cursor(row_factory=psycopg.rows.dict_row)
    cursor.execute(f"SELECT {columns} FROM public.{dataset} WHERE client_id = %s", (client_id,))
    return {row["id"]: row for row in cursor.fetchall()}


def assert_exactly_equal(decoded: dict[str, Any], expected: dict[str, Any]) -> None:
    assert decoded == expected
    for name, value in decoded.items():
        assert type(value) is type(expected[name]), name
        if isinstance(value, Decimal):
            assert str(value) == str(expected[name]), name  # same scale, not just equal
        if hasattr(value, "utcoffset") and value.tzinfo is not None:
            assert value.utcoffset() == timedelta(0), name


WEIRD_TEXT = 'Zürich 🏦 \u0001\u001f\t\n\r \u2028 "q" \\ \' 𝔘𝔫𝔦 \ufeff end'
WEIRD_JSON = '{"名前": "東京", "emoji": "😀", "n": 1.50, "big": 12345678901234567890.5, "z": null}'

INSERTS: dict[str, tuple[str, list[tuple[Any, ...]]]] = {
    "raw_data": (
        "INSERT INTO raw_data (id, client_id, entity_id, data_item_id, period, value, currency,"
        " recorded_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (
                1,
                9_007_199_254_740_993,
                -5,
                "1969-12-31",
                "-99999999999999.999999",
                WEIRD_TEXT,
                "2024-06-01 10:15:30.123456+02",
            ),
            (2, 2**63 - 1, 0, "0001-01-01", "1.5", None, "1901-12-13 20:45:52-05:30"),
            (3, 1, 2, "9999-12-31", None, "", "2024-02-29 23:59:59.999999+00"),
            (4, 1, 2, "2000-02-29", "0.000001", "EUR", "1970-01-01 00:00:00+00"),
        ],
    ),
    "entities": (
        "INSERT INTO entities (id, client_id, parent_id, name, kind, attributes, active,"
        " valid_from, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (1, None, WEIRD_TEXT, "k", WEIRD_JSON, True, "1960-02-29", "2024-03-31 23:59:59.5+02"),
            (2, 1, "n", "k", None, False, "2024-01-01", "2024-01-01 00:00:00.000001+14"),
        ],
    ),
    "data_items": (
        "INSERT INTO data_items (id, client_id, code, name, unit, decimals, is_input, metadata,"
        " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (1, "c", WEIRD_TEXT, None, -2_147_483_648, True, "[]", "2024-01-01 00:00:00-12"),
            (2, "d", "n", "kg", 2_147_483_647, False, '"just a string"', "2024-01-01 12:00+00"),
        ],
    ),
    "formulas": (
        "INSERT INTO formulas (id, client_id, name, expression, weight, valid_from, valid_to,"
        " enabled, parameters, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (
                1,
                "f",
                "a * b / 100",
                "-9999999999.99999999",
                "2024-01-01",
                None,
                True,
                '{"a": [1, 2.0, -3e5]}',
                "2024-05-05 05:05:05.5+05:30",
            ),
            (
                2,
                "g",
                WEIRD_TEXT,
                "0.10000000",
                "1950-01-01",
                "2050-12-31",
                False,
                None,
                "1999-12-31 23:59:59.999999-01",
            ),
        ],
    ),
    "formula_associations": (
        "INSERT INTO formula_associations (id, client_id, formula_id, entity_id, data_item_id,"
        " priority, factor, effective_on, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (1, 1, 2, None, -1, "-99999999.9999", "1800-01-01", "2024-01-01 00:00:00+00"),
            (2, 1, 2, 3, 0, "12.5", "2200-01-01", "2024-01-01 00:00:00.1+03"),
        ],
    ),
}


def scalar(conn: psycopg.Connection, query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def insert_rows(pg: psycopg.Connection, dataset: str, client_id: int) -> None:
    statement, rows = INSERTS[dataset]
    with pg.transaction():
        for row in rows:
            pg.execute(statement, (row[0], client_id, *row[1:]))


@pytest.mark.smoke
def test_every_type_of_every_dataset_round_trips(
    pg: psycopg.Connection, client_id: int, reader_factory: Any
) -> None:
    reader = reader_factory(*DATASETS)
    for dataset in DATASETS:
        insert_rows(pg, dataset, client_id)

    events = reader.read(sum(len(rows) for _, rows in INSERTS.values()))

    for dataset in DATASETS:
        expected = rows_in_postgres(pg, dataset, client_id)
        decoded = {e.key: e.row for e in events if e.target.dataset == dataset}
        assert set(decoded) == set(expected), dataset
        for key, row in decoded.items():
            assert row is not None
            assert_exactly_equal(row, expected[key])
    assert {e.op for e in events} == {"c"}
    assert {e.target.client_id for e in events} == {client_id}


@pytest.mark.smoke
def test_updates_and_deletes(pg: psycopg.Connection, client_id: int, reader_factory: Any) -> None:
    reader = reader_factory("raw_data")
    insert_rows(pg, "raw_data", client_id)
    pg.execute(
        "UPDATE raw_data SET value = '-0.5', currency = NULL WHERE client_id = %s AND id = 2",
        (client_id,),
    )
    pg.execute("DELETE FROM raw_data WHERE client_id = %s AND id = 3", (client_id,))

    events = reader.read(len(INSERTS["raw_data"][1]) + 2)

    update, delete = events[-2], events[-1]
    assert (update.op, update.key) == ("u", 2)
    assert_exactly_equal(update.row, rows_in_postgres(pg, "raw_data", client_id)[2])
    assert str(update.row["value"]) == "-0.500000"
    assert (delete.op, delete.key, delete.row) == ("d", 3, None)
    assert delete.target.client_id == client_id
    assert len({e.partition for e in events}) == 1  # one target, one partition, commit order


@pytest.mark.smoke
def test_tx_id_hands_off_at_the_bootstrap_snapshot(
    pg: psycopg.Connection, base_settings: Settings, client_id: int, reader_factory: Any
) -> None:
    reader = reader_factory("entities")
    statement, rows = INSERTS["entities"]
    dsn = base_settings.postgres.dsn.get_secret_value()

    def insert(conn: psycopg.Connection, key: int) -> int:
        conn.execute(statement, (key, client_id, *rows[1][1:]))
        return scalar(conn, "SELECT pg_current_xact_id()::text::bigint")

    # before: committed before the snapshot; during: running while it is taken; after: later.
    with pg.transaction():
        before_xid = insert(pg, 10)
    with psycopg.connect(dsn) as running:
        during_xid = insert(running, 11)
        with psycopg.connect(dsn) as bootstrap:
            bootstrap.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            text = scalar(bootstrap, "SELECT pg_current_snapshot()::text")
            bootstrap.execute("COMMIT")
        running.commit()
    with pg.transaction():
        after_xid = insert(pg, 12)

    snapshot = PgSnapshot.parse(text)
    events = {event.key: event for event in reader.read(3)}

    for key, xid8 in ((10, before_xid), (11, during_xid), (12, after_xid)):
        assert events[key].tx_id is not None
        # Debezium reports the 32-bit xid; widened with the snapshot's epoch it is the xid8.
        assert events[key].tx_id == xid8 % 2**32
        assert snapshot.widen(events[key].tx_id) == xid8
    assert snapshot.is_visible(events[10].tx_id)
    assert not snapshot.is_visible(events[11].tx_id)
    assert not snapshot.is_visible(events[12].tx_id)
