"""``lag`` against the real stack: Kafka, Kafka Connect with Debezium, PostgreSQL, Redis.

Consumers are simulated with confluent-kafka under group ids of each test's own, on topics
of their own where the test needs a partition nobody else writes to. The shared Debezium
connector is paused only briefly and always resumed.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from typer.testing import CliRunner, Result

from consumer.lag import (
    EXIT_CODES,
    LagCollector,
    Observation,
    connector_state,
    evaluate,
    register,
    run_lag,
)
from storage_builder import cli
from storage_builder.settings import Settings

from .live import run_lag as run_lag_cli

WINDOW = 6.0
INTERVAL = 1.5
DEBEZIUM_TOPIC = "sb.public.raw_data"
CONFIG = os.environ.get("SB_CONFIG", Path(__file__).resolve().parents[2] / "ops" / "local.toml")


@pytest.fixture
def group() -> str:
    return f"test-lag-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topic(settings: Settings) -> Iterator[str]:
    """A topic of this test's own with two partitions, deleted afterwards."""
    name = f"test-lag-{uuid.uuid4().hex[:10]}"
    admin = AdminClient(settings.kafka.librdkafka())
    admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1)])[name].result(30)
    yield name
    admin.delete_topics([name])[name].result(30)


def produce(settings: Settings, topic: str, count: int) -> None:
    producer = Producer(settings.kafka.librdkafka())
    for i in range(count):
        producer.produce(topic, key=str(i % 7).encode(), value=b"{}")
    assert producer.flush(30) == 0


class Member:
    """A consumer-group member that polls in a thread and commits only when told to."""

    def __init__(self, settings: Settings, group: str, topic: str, commit: bool) -> None:
        config = settings.kafka.librdkafka() | {
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
        self.consumer = Consumer(config)
        self.commit = commit
        self.assigned = threading.Event()
        self.stop = threading.Event()
        self.consumer.subscribe([topic], on_assign=lambda c, parts: self.assigned.set())
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            message = self.consumer.poll(0.2)
            if message is not None and message.error() is None and self.commit:
                self.consumer.commit(message=message, asynchronous=False)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.consumer.close()


def observe_for(collector: LagCollector, seconds: float, between: object = None) -> list:
    """Observations every INTERVAL for ``seconds``, calling ``between()`` before each."""
    history: list[Observation] = []
    deadline = time.time() + seconds
    while True:
        if callable(between):
            between()
        history.append(collector.observe())
        if time.time() >= deadline:
            return history
        time.sleep(INTERVAL)


def test_caught_up_quiet_partition_is_ok_and_exits_zero(
    settings: Settings, group: str, topic: str
) -> None:
    produce(settings, topic, 20)
    member = Member(settings, group, topic, commit=True)
    try:
        assert member.assigned.wait(30), "the simulated consumer was never assigned"
        _wait_committed(settings, group, topic, total=20)

        # Nothing more is written and nothing more is committed for the whole window.
        result = _cli(settings, group, topic)
    finally:
        member.close()

    assert result.stdout, f"no output; error: {result.exception!r}"
    report = orjson.loads(result.stdout)
    assert result.exit_code == 0, result.stdout
    assert report["group"]["status"] == "OK"
    assert [p["status"] for p in report["partitions"]] == ["OK", "OK"]
    assert sum(p["offset_lag"] for p in report["partitions"]) == 0
    assert all(p["owned"] for p in report["partitions"])


def test_member_that_consumes_without_committing_is_stall(
    settings: Settings, group: str, topic: str
) -> None:
    produce(settings, topic, 10)
    member = Member(settings, group, topic, commit=False)  # the apply path is blocked
    try:
        assert member.assigned.wait(30)
        collector = LagCollector(settings, group, [topic])
        history = observe_for(collector, WINDOW + INTERVAL, lambda: produce(settings, topic, 5))
        collector.close()
    finally:
        member.close()

    verdicts = evaluate(history, WINDOW)
    assert {v.status for v in verdicts.values()} == {"STALL"}, verdicts
    latest = history[-1]
    assert all(s.owned and s.offset_lag > 0 for s in latest.partitions)


def test_stopped_consumer_with_changes_flowing_grows_lag_then_stops(
    settings: Settings, group: str, pg: psycopg.Connection, client_id: int
) -> None:
    # The group committed the end of every partition, then its consumer went away.
    admin = AdminClient(settings.kafka.librdkafka())
    partitions = admin.list_topics(DEBEZIUM_TOPIC, timeout=10).topics[DEBEZIUM_TOPIC].partitions
    ends = _end_offsets(settings, DEBEZIUM_TOPIC, sorted(partitions))
    committer = Consumer(settings.kafka.librdkafka() | {"group.id": group})
    committer.commit(offsets=[TopicPartition(DEBEZIUM_TOPIC, p, o) for p, o in ends.items()],
                     asynchronous=False)  # fmt: skip
    committer.close()

    next_id = iter(range(1, 10_000))

    def change() -> None:
        _insert_raw_data(pg, client_id, [next(next_id) for _ in range(3)])

    collector = LagCollector(settings, group, [DEBEZIUM_TOPIC])
    try:
        change()
        mine = _partition_of(settings, client_id, ends)
        history = observe_for(collector, WINDOW + 2 * INTERVAL, change)
    finally:
        collector.close()
        pg.execute("DELETE FROM public.raw_data WHERE client_id = %s", (client_id,))

    series = [obs.sample(DEBEZIUM_TOPIC, mine) for obs in history]
    assert series[0] is not None and series[-1] is not None
    assert series[-1].offset_lag > series[0].offset_lag > 0
    first_time_lag = series[0].time_lag_s(history[0].ts)
    assert series[-1].time_lag_s(history[-1].ts) > first_time_lag > 0

    early = evaluate(history[:2], WINDOW)
    assert early[(DEBEZIUM_TOPIC, mine)].status == "WARN"
    verdicts = evaluate(history, WINDOW)
    assert {v.status for v in verdicts.values()} == {"STOP"}, verdicts


def test_paused_connector_makes_lag_not_ok(settings: Settings, group: str, topic: str) -> None:
    produce(settings, topic, 4)
    member = Member(settings, group, topic, commit=True)
    try:
        assert member.assigned.wait(30)
        _wait_committed(settings, group, topic, total=4)
        _connect(settings, "PUT", "pause")
        try:
            _wait_connector(settings, "PAUSED")
            report = run_lag(
                settings, group=group, topics=[topic], window_s=2, interval_s=1, persist=False
            )
        finally:
            _connect(settings, "PUT", "resume")
            _wait_connector(settings, "RUNNING")
    finally:
        member.close()

    data = report.to_dict()
    assert data["group"]["status"] == "OK"  # the consumer is fine: the source is not
    assert data["connector"]["state"] == "PAUSED"
    assert data["connector"]["status"] == "STOP"
    assert report.status != "OK"


def test_failed_connector_task_is_err_and_exits_non_zero(
    settings: Settings, group: str, config_file: Path, pg: psycopg.Connection
) -> None:
    # A throwaway connector whose task fails at start: its publication does not exist and
    # it may not create one. It fails before creating its slot or any topic.
    name = f"test-lag-failing-{uuid.uuid4().hex[:8]}"
    unique = name.replace("-", "_")
    live = _connect_json(settings, "GET", f"/connectors/{settings.kafka.connector_name}/config")
    config = {key: live[key] for key in live if key.startswith("database.")} | {
        "connector.class": live["connector.class"],
        "plugin.name": "pgoutput",
        "tasks.max": "1",
        "topic.prefix": unique,
        "slot.name": unique,
        "publication.name": unique,
        "publication.autocreate.mode": "disabled",
        "snapshot.mode": "no_data",
    }
    _connect_json(settings, "PUT", f"/connectors/{name}/config", config)
    try:
        failing = settings.model_copy(
            update={"kafka": settings.kafka.model_copy(update={"connector_name": name})}
        )
        _wait_connector(failing, "FAILED", tasks_only=True)
        code, report = run_lag_cli(
            config_file, "--connector", name, "--group", group, "--topic", DEBEZIUM_TOPIC,
            "--window", "1", "--interval", "0.5", "--no-history",
        )  # fmt: skip
    finally:
        _connect_json(settings, "DELETE", f"/connectors/{name}")
        pg.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s AND NOT active",
            (unique,),
        )

    connector = report["connector"]
    assert connector["name"] == name
    assert [task["state"] for task in connector["tasks"]] == ["FAILED"]
    assert connector["status"] == "ERR"
    assert "task 0 FAILED" in connector["reason"] and "ublication" in connector["reason"]
    assert report["status"] == "ERR"
    assert code == EXIT_CODES["ERR"] != 0


def test_unreachable_connect_is_err(settings: Settings) -> None:
    broken = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"connect_url": "http://127.0.0.1:9"})}
    )
    state = connector_state(broken)
    assert state.verdict().status == "ERR"
    assert "kafka.connect_url" in state.verdict().reason


# -- helpers -------------------------------------------------------------------------------


def _cli(settings: Settings, group: str, topic: str) -> Result:
    if "lag" not in {command.name for command in cli.app.registered_commands}:
        register(cli.app)
    args = ["--config", str(CONFIG), "lag", "--json", "--group", group, "--topic", topic,
            "--window", str(WINDOW), "--interval", str(INTERVAL)]  # fmt: skip
    # The history of observations goes under this test's own Redis key prefix.
    env = {"SB_REDIS__KEY_PREFIX": settings.redis.key_prefix}
    return CliRunner().invoke(cli.app, args, env=env)


def _end_offsets(settings: Settings, topic: str, partitions: list[int]) -> dict[int, int]:
    consumer = Consumer(settings.kafka.librdkafka() | {"group.id": "test-lag-offsets"})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
    finally:
        consumer.close()


def _wait_committed(settings: Settings, group: str, topic: str, total: int) -> None:
    collector = LagCollector(settings, group, [topic])
    deadline = time.time() + 30
    while time.time() < deadline:
        committed = sum(s.committed or 0 for s in collector.observe().partitions)
        if committed >= total:
            return
        time.sleep(0.5)
    pytest.fail(f"group {group} did not commit {total} messages of {topic} in 30 s")


def _insert_raw_data(pg: psycopg.Connection, client_id: int, ids: list[int]) -> None:
    now = dt.datetime.now(dt.UTC)
    with pg.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO public.raw_data (id, client_id, entity_id, data_item_id, period, value,"
            " currency, recorded_at) VALUES (%s, %s, 1, 1, %s, 1.5, 'EUR', %s)",
            [(key, client_id, now.date(), now) for key in ids],
        )


def _partition_of(settings: Settings, client_id: int, since: dict[int, int]) -> int:
    """The partition that carries this client's changes: the one its first event lands in."""
    consumer = Consumer(
        settings.kafka.librdkafka() | {"group.id": "test-lag-find", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(DEBEZIUM_TOPIC, p, o) for p, o in since.items()])
    needle = f'"client_id":{client_id}'.encode()
    # Debezium may be working through a backlog other writers left: give it time.
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            for message in consumer.consume(500, timeout=1):
                key = (message.key() or b"").replace(b" ", b"")
                if message.error() is None and needle in key:
                    return message.partition() or 0
    finally:
        consumer.close()
    pytest.fail(f"no Debezium event of client {client_id} reached {DEBEZIUM_TOPIC} in 240 s")


def _connect(settings: Settings, method: str, action: str) -> None:
    url = f"{settings.kafka.connect_url}/connectors/{settings.kafka.connector_name}/{action}"
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status in (200, 202, 204)


def _wait_connector(settings: Settings, state: str, tasks_only: bool = False) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        current = connector_state(settings)
        tasks_there = bool(current.tasks) and all(task[1] == state for task in current.tasks)
        if tasks_there and (tasks_only or current.state == state):
            return
        time.sleep(0.5)
    pytest.fail(f"connector did not reach {state} in 60 s (last: {current})")


def _connect_json(settings: Settings, method: str, path: str, body: dict | None = None) -> dict:
    """A call to Kafka Connect's REST API; the decoded reply ({} when it has none)."""
    request = urllib.request.Request(
        f"{settings.kafka.connect_url.rstrip('/')}{path}",
        data=None if body is None else orjson.dumps(body),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = response.read()
    return orjson.loads(payload) if payload else {}
