"""Debezium streams a dataset table's changes to its Kafka topic, as the consumer expects them.

One row of ``public.raw_data`` is inserted, updated and deleted under a fresh client id; the
three events must arrive on one partition of ``sb.public.raw_data``, in commit order, keyed by
the client, with the row images, the writing transaction's id and the WAL position.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from storage_builder.settings import Settings

pytestmark = pytest.mark.smoke

TOPIC = "sb.public.raw_data"
PARTITIONS = 6
# The events may queue behind another test's bulk load on the shared stack: wait as long as
# the connector's replication slot keeps moving, and fail once it stalls this long.
STALL_S = 60.0
WAIT_CAP_S = 900.0
SLOT_POSITION = """
    SELECT confirmed_flush_lsn::text FROM pg_replication_slots
    WHERE slot_name = 'storage_builder_slot'
"""

INSERT = """
    INSERT INTO public.raw_data
        (id, client_id, entity_id, data_item_id, period, value, currency, recorded_at)
    VALUES (1, %s, 7, 9, DATE '2024-01-31', 12.5, 'EUR', TIMESTAMPTZ '2024-02-01 10:00:00Z')
"""
UPDATE = "UPDATE public.raw_data SET value = 13.25 WHERE client_id = %s AND id = 1"
DELETE = "DELETE FROM public.raw_data WHERE client_id = %s AND id = 1"


@pytest.fixture
def change_consumer(base_settings: Settings) -> Iterator[Consumer]:
    """A consumer positioned at the current end of every partition of the topic."""
    consumer = Consumer(
        base_settings.kafka.librdkafka()
        | {"group.id": "smoke-debezium", "enable.auto.commit": False}
    )
    partitions = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    ends = []
    for partition in partitions:
        _, high = consumer.get_watermark_offsets(partition, timeout=10)
        ends.append(TopicPartition(TOPIC, partition.partition, high))
    consumer.assign(ends)
    yield consumer
    consumer.close()


def write(pg: psycopg.Connection, statement: str, client_id: int) -> int:
    """Run one statement in its own transaction; return that transaction's 64-bit id."""
    with pg.transaction():
        row = pg.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        assert row is not None
        pg.execute(statement, (client_id,))
    return int(row[0])


def slot_position(pg: psycopg.Connection) -> str | None:
    row = pg.execute(SLOT_POSITION).fetchone()
    return None if row is None else str(row[0])


def events_of(
    consumer: Consumer, pg: psycopg.Connection, client_id: int, count: int
) -> list[tuple[int, Any, Any]]:
    """(partition, key, value) of the next `count` events of this client, in arrival order."""
    events: list[tuple[int, Any, Any]] = []
    cap = time.monotonic() + WAIT_CAP_S
    position, moved_at, checked_at = slot_position(pg), time.monotonic(), time.monotonic()
    while len(events) < count:
        now = time.monotonic()
        if now - checked_at > 2:
            checked_at, latest = now, slot_position(pg)
            if latest != position:
                position, moved_at = latest, now
        if now - moved_at > STALL_S or now > cap:
            break

        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        raw_key, raw_value, partition = message.key(), message.value(), message.partition()
        if raw_key is None or raw_value is None or partition is None:
            continue  # a truncate of another test: keyed by no client
        key = json.loads(raw_key)
        if key.get("client_id") == client_id:
            events.append((partition, key, json.loads(raw_value)))
    return events


def test_insert_update_delete_arrive_as_debezium_events(
    pg: psycopg.Connection, change_consumer: Consumer, client_id: int
) -> None:
    xids = [write(pg, sql, client_id) for sql in (INSERT, UPDATE, DELETE)]

    events = events_of(change_consumer, pg, client_id, 3)

    assert len(events) == 3, f"expected 3 events of client {client_id} on {TOPIC}, got {events}"
    assert len({partition for partition, _, _ in events}) == 1, "a client's changes span partitions"
    # The connector sends JSON without embedded schemas: the envelope is the whole value and
    # the key is the client column alone.
    assert [value["op"] for _, _, value in events] == ["c", "u", "d"]
    for _, key, value in events:
        assert key == {"client_id": client_id}
        assert "schema" not in value

    created, updated, deleted = (value for _, _, value in events)
    assert created["before"] is None
    assert created["after"]["id"] == 1
    assert created["after"]["client_id"] == client_id
    assert created["after"]["value"] == "12.500000"
    assert updated["after"]["value"] == "13.250000"
    assert updated["after"]["row_version"] > created["after"]["row_version"]
    assert deleted["after"] is None
    assert (deleted["before"]["id"], deleted["before"]["client_id"]) == (1, client_id)

    # Debezium reports the 32-bit xid of the writing transaction; pg_current_xact_id() is the
    # 64-bit xid8 (epoch in the high half). They agree once the epoch is masked off.
    for payload, xid8 in zip((created, updated, deleted), xids, strict=True):
        source = payload["source"]
        assert source["table"] == "raw_data"
        assert source["txId"] == xid8 % 2**32
    lsns = [payload["source"]["lsn"] for payload in (created, updated, deleted)]
    assert lsns == sorted(lsns) and lsns[0] > 0
