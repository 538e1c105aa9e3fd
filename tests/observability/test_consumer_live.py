"""The real consumer, watched from outside: its /metrics, and `lag` while S3 is unreachable.

Each test runs `storage-builder consume` as a subprocess with its own group, S3 prefix,
Redis key prefix and client, writes changes to PostgreSQL that reach it through Debezium,
and checks what an operator would see: the scraped counters equal what the test did, and
a blocked apply path makes `lag` say STALL while nothing is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
import pytest
from confluent_kafka import Producer
from consumer_harness import ConsumerProcess, consumer_settings, insert_rows, wait_in_sync

from consumer.lag import EXIT_CODES
from schemas.datasets import Target
from snapshots.reader import open_snapshot
from storage_builder.settings import Settings

from .live import (
    Samples,
    TcpProxy,
    end_offsets,
    free_port,
    http_get,
    partition_of_client,
    run_lag,
    scrape,
    value,
)

Factory = Callable[[Settings, str], ConsumerProcess]
DATASET = "entities"


def _topic(settings: Settings) -> str:
    return f"{settings.kafka.topic_prefix}.{settings.kafka.schema_name}.{DATASET}"


def _wait_for(
    what: str, check: Callable[[], Any], member: ConsumerProcess, timeout: float = 120
) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        assert member.process is not None and member.process.poll() is None, (
            f"the consumer exited ({member.process and member.process.returncode}) while "
            f"waiting for {what}:\n{member.log()[-4000:]}"
        )
        time.sleep(0.5)
    pytest.fail(f"{what} not seen in {timeout}s (last: {last!r}):\n{member.log()[-4000:]}")


def _produce_poison(settings: Settings, client_id: int) -> tuple[int, int]:
    """One undecodable record keyed by the client; returns its partition and offset."""
    delivered: list[tuple[int, int]] = []

    def on_delivery(error: object, message: Any) -> None:
        assert error is None, error
        delivered.append((message.partition(), message.offset()))

    producer = Producer(settings.kafka.librdkafka())
    key = orjson.dumps({"schema": None, "payload": {"client_id": client_id}})
    producer.produce(
        _topic(settings),
        key=key,
        value=b'{"payload": {"op": "c", "after": [',
        on_delivery=on_delivery,
    )
    assert producer.flush(30) == 0
    return delivered[0]


def test_scraped_metrics_of_a_running_consumer_match_what_the_test_did(
    settings: Settings, pg: psycopg.Connection, client_id: int, consumers: Factory
) -> None:
    port = free_port()
    member = consumers(consumer_settings(settings, [client_id], metrics_port=port), "metrics")
    target = Target(DATASET, client_id)
    member.start()

    # Alive as soon as it polls; ready once assigned with a committed start, before any change.
    assert http_get(port, "/healthz")[0] == 200
    _wait_for("/readyz 200 of an idle, assigned consumer", lambda: _ready(port), member, 30)

    # The first change bootstraps the target: counted as a bootstrap, not as applied changes.
    insert_rows(pg, DATASET, client_id, [1])
    wait_in_sync(settings, [target], consumer=member)
    before = scrape(port)
    assert value(before, "storage_builder_changes_applied_total", dataset=DATASET, op="c") == 0

    inserted, updated, deleted = 7, 3, 2
    insert_rows(pg, DATASET, client_id, range(2, 2 + inserted))
    wait_in_sync(settings, [target], consumer=member)
    pg.execute(
        "UPDATE entities SET name = name || '!' WHERE client_id = %s AND id = ANY(%s)",
        (client_id, [2, 3, 4]),
    )
    wait_in_sync(settings, [target], consumer=member)
    pg.execute("DELETE FROM entities WHERE client_id = %s AND id IN (7, 8)", (client_id,))
    wait_in_sync(settings, [target], consumer=member)
    partition, poison_offset = _produce_poison(settings, client_id)

    changes = "storage_builder_changes_applied_total"
    dead = "storage_builder_dead_letter_events_total"
    committed = "storage_builder_consumer_committed_offset"
    topic = _topic(settings)

    def delta(now: Samples, name: str, **labels: str) -> float:
        return value(now, name, **labels) - value(before, name, **labels)

    def settled() -> Samples | None:
        # Everything the test did has been counted: then the counts must be exact.
        now = scrape(port)
        done = (
            delta(now, changes, dataset=DATASET, op="c") >= inserted
            and delta(now, changes, dataset=DATASET, op="u") >= updated
            and delta(now, changes, dataset=DATASET, op="d") >= deleted
            and value(now, dead, reason="malformed") >= 1
            and value(now, committed, topic=topic, partition=str(partition)) > poison_offset
        )
        return now if done else None

    after = _wait_for("every change applied and the poison event dead-lettered", settled, member)

    assert delta(after, changes, dataset=DATASET, op="c") == inserted
    assert delta(after, changes, dataset=DATASET, op="u") == updated
    assert delta(after, changes, dataset=DATASET, op="d") == deleted
    assert value(after, dead, reason="malformed") == 1
    assert sum(v for (name, _), v in after.items() if name == dead) == 1
    batches = "storage_builder_batches_applied_total"
    applied = sum(delta(after, batches, dataset=DATASET, how=how) for how in ("delta", "segments"))
    assert applied >= 2
    assert http_get(port, "/healthz")[0] == 200
    assert http_get(port, "/readyz") == (200, "ready\n")


def _ready(port: int) -> bool:
    return http_get(port, "/readyz")[0] == 200


def test_unreachable_s3_makes_lag_stall_and_nothing_is_lost_when_it_returns(
    settings: Settings,
    pg: psycopg.Connection,
    client_id: int,
    consumers: Factory,
    s3_proxy: TcpProxy,
) -> None:
    # The consumer reaches S3 only through the proxy; the test itself reads S3 directly.
    through_proxy = settings.model_copy(
        update={"s3": settings.s3.model_copy(update={"endpoint_url": s3_proxy.url})}
    )
    port = free_port()
    chosen = consumer_settings(through_proxy, [client_id], metrics_port=port)
    member = consumers(chosen, "s3-cut")
    target = Target(DATASET, client_id)
    topic = _topic(settings)
    member.start()
    insert_rows(pg, DATASET, client_id, range(1, 6))
    wait_in_sync(settings, [target], consumer=member)

    # Cut S3 after the first publish, then keep changing the target.
    s3_proxy.cut()
    since = end_offsets(settings, topic)
    insert_rows(pg, DATASET, client_id, range(6, 16))
    pg.execute(
        "UPDATE entities SET name = name || '?' WHERE client_id = %s AND id <= 3", (client_id,)
    )
    partition = partition_of_client(settings, topic, client_id, since)
    member.wait_for(f"publish of {target} failed", timeout=120)

    code, report = run_lag(member.config, "--topic", topic, "--window", "6", "--interval", "1.5")
    mine = _partition(report, topic, partition)
    assert mine["status"] == "STALL", mine
    assert mine["offset_lag"] > 0 and mine["owned"]
    assert report["group"]["status"] in ("STALL", "ERR"), report["group"]
    assert code == EXIT_CODES[report["status"]] and code != 0
    stuck_at = mine["committed_offset"]

    # Blocked, not dead: the process polls on, says why it is not ready, and retries.
    assert member.process is not None and member.process.poll() is None
    assert http_get(port, "/healthz")[0] == 200
    status, body = http_get(port, "/readyz")
    assert status == 503 and "s3:" in body, body
    assert member.new_log().count(f"publish of {target} failed, retrying") >= 2

    s3_proxy.restore()
    wait_in_sync(settings, [target], timeout=120, consumer=member)
    _assert_snapshot_equals_select(settings, pg, client_id)

    def moved_on() -> dict | None:
        _, again = run_lag(
            member.config, "--topic", topic, "--window", "2", "--interval", "1", "--no-history"
        )
        part = _partition(again, topic, partition)
        return part if (part["committed_offset"] or 0) > stuck_at else None

    recovered = _wait_for("the committed offset moving past the stall", moved_on, member, 60)
    assert recovered["status"] != "STALL", recovered
    assert member.process is not None and member.process.poll() is None
    assert "Traceback" not in member.log()


def _partition(report: dict, topic: str, partition: int) -> dict:
    for entry in report["partitions"]:
        if entry["topic"] == topic and entry["partition"] == partition:
            return dict(entry)
    raise AssertionError(f"{topic}:{partition} missing from the lag report: {report}")


def _assert_snapshot_equals_select(
    settings: Settings, pg: psycopg.Connection, client_id: int
) -> None:
    with open_snapshot(DATASET, client_id, settings) as snapshot:
        published = {row["id"]: (row["name"], row["kind"], row["active"]) for row in snapshot}
    rows = pg.execute(
        "SELECT id, name, kind, active FROM entities WHERE client_id = %s", (client_id,)
    ).fetchall()
    assert published == {key: (name, kind, active) for key, name, kind, active in rows}
    assert set(published) == set(range(1, 16))
