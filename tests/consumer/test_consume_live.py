"""`storage-builder consume` against the real stack: PostgreSQL -> Debezium -> Kafka -> S3/Redis.

Every test runs the consumer as a subprocess with its own group, S3 prefix and Redis prefix,
changes the database, waits until the snapshots converge and compares them with the
database row by row (`snapshot verify`).
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections.abc import Callable

import orjson
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from consumer_harness import (
    ConsumerProcess,
    consumer_settings,
    insert_rows,
    state_of,
    wait_in_sync,
)

from schemas.datasets import DATASETS, Target
from snapshots.manifest import Manifest
from snapshots.reader import open_snapshot
from snapshots.registry import manifest_keys
from snapshots.store import ObjectStore
from storage_builder.settings import Settings

Factory = Callable[[Settings, str], ConsumerProcess]


def _topic(settings: Settings, dataset: str) -> str:
    return f"{settings.kafka.topic_prefix}.{settings.kafka.schema_name}.{dataset}"


def _churn_target(pg: psycopg.Connection, target: Target, rounds: int, rng: random.Random) -> None:
    """Inserts, updates, deletes and multi-row transactions on one target."""
    dataset = DATASETS[target.dataset]
    for round_ in range(rounds):
        with pg.transaction(), pg.cursor() as cursor:
            keys = rng.sample(range(1, 41), 5)
            cursor.execute(
                f"UPDATE {dataset.table} SET {dataset.client_column} = {dataset.client_column} "
                f"WHERE {dataset.client_column} = %s AND {dataset.key_column} = ANY(%s)",
                (target.client_id, keys),
            )
            cursor.execute(
                f"DELETE FROM {dataset.table} WHERE {dataset.client_column} = %s "
                f"AND {dataset.key_column} = %s",
                (target.client_id, rng.randrange(1, 41)),
            )
        insert_rows(pg, target.dataset, target.client_id, [100 + round_], seed=round_)


@pytest.mark.slow
def test_changes_on_every_dataset_end_in_equal_snapshots(
    settings: Settings, pg: psycopg.Connection, client_id: int, consumers: Factory
) -> None:
    member = consumers(consumer_settings(settings, [client_id]), "all-datasets")
    member.start()
    targets = [Target(name, client_id) for name in DATASETS]
    rng = random.Random(client_id)
    for target in targets:
        insert_rows(pg, target.dataset, client_id, range(1, 41), seed=1)
    # The first change of each target bootstraps it; what follows is applied by micro-batches.
    bootstrapped = wait_in_sync(settings, targets, consumer=member)

    for target in targets:
        _churn_target(pg, target, rounds=4, rng=rng)

    versions = wait_in_sync(settings, targets, consumer=member)
    assert all(versions[t] > bootstrapped[t] for t in targets), (bootstrapped, versions)
    assert "bootstrapping" in member.log()


def test_poison_events_go_to_the_dead_letter_topic_and_the_partition_moves_on(
    settings: Settings, pg: psycopg.Connection, client_id: int, consumers: Factory
) -> None:
    unknown_topic = (
        f"{settings.kafka.topic_prefix}.{settings.kafka.schema_name}.t{uuid.uuid4().hex[:8]}"
    )
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers})
    admin.create_topics([NewTopic(unknown_topic, 1, 1)])[unknown_topic].result(30)

    try:
        _poison_and_check(settings, pg, client_id, consumers, unknown_topic)
    finally:
        admin.delete_topics([unknown_topic])


def _poison_and_check(
    settings: Settings,
    pg: psycopg.Connection,
    client_id: int,
    consumers: Factory,
    unknown_topic: str,
) -> None:
    dead_topic = settings.kafka.dead_letter_topic
    dead_start = _high_watermarks(settings, dead_topic)
    member = consumers(consumer_settings(settings, [client_id]), "poison")
    member.start()
    # Envelopes as the connector writes them: JSON without embedded schemas.
    key = orjson.dumps({"client_id": client_id})
    producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
    topic = _topic(settings, "entities")
    producer.produce(topic, key=key, value=b'{"op": "c", "after": [}')
    unknown = {"op": "c", "after": {"id": 1}, "source": {"ts_ms": 1}}
    producer.produce(unknown_topic, key=key, value=orjson.dumps(unknown))
    assert producer.flush(30) == 0

    # A real change after the poison: the partition must move past it.
    target = Target("entities", client_id)
    insert_rows(pg, "entities", client_id, range(1, 6))
    wait_in_sync(settings, [target], consumer=member)

    letters = _read_from(settings, dead_topic, dead_start, want=2, client_key=key)
    reasons = {letter["sb-source-topic"]: letter for letter in letters}
    assert set(reasons) == {topic, unknown_topic}
    assert reasons[topic]["value"] == b'{"op": "c", "after": [}'
    assert reasons[topic]["sb-reason"] == "malformed"
    assert reasons[unknown_topic]["sb-reason"] == "unknown_table"
    assert reasons[unknown_topic]["key"] == key
    assert all(str(letter["sb-source-offset"]).isdigit() for letter in letters)


def _high_watermarks(settings: Settings, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": "x"})
    try:
        metadata = consumer.list_topics(topic, timeout=30)
        partitions = metadata.topics[topic].partitions
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in partitions
        }
    finally:
        consumer.close()


def _read_from(
    settings: Settings, topic: str, start: dict[int, int], want: int, client_key: bytes
) -> list[dict[str, object]]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": f"test-read-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, offset) for p, offset in start.items()])
    found: list[dict[str, object]] = []
    deadline = time.monotonic() + 60
    try:
        while len(found) < want and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None or message.error() or message.key() != client_key:
                continue
            headers: list[tuple[str, bytes]] = message.headers() or []  # type: ignore[assignment]
            letter: dict[str, object] = {name: value.decode() for name, value in headers}
            letter["key"] = message.key()
            letter["value"] = message.value()
            found.append(letter)
    finally:
        consumer.close()
    assert len(found) == want, f"found {len(found)} dead letters, expected {want}: {found}"
    return found


# A micro-batch is published as a delta in a pack (steps 1 and 2 are one PUT) unless its
# target is due for compaction, which rewrites segments (steps 1 and 2 are separate PUTs):
# both are crashed at every step.
PUBLISH_PATHS = {"delta": {}, "compaction": {"compact_changes": 0}}


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(PUBLISH_PATHS))
@pytest.mark.parametrize(
    "crash_at", ["after_segments", "after_manifest", "after_registry", "before_commit"]
)
def test_a_crash_at_each_step_of_a_publish_loses_and_doubles_nothing(
    settings: Settings,
    pg: psycopg.Connection,
    client_id: int,
    consumers: Factory,
    crash_at: str,
    path: str,
) -> None:
    chosen = consumer_settings(settings, [client_id], **PUBLISH_PATHS[path])
    member = consumers(chosen, f"crash-{crash_at}-{path}")
    target = Target("formulas", client_id)
    insert_rows(pg, "formulas", client_id, range(1, 21))
    # The first start bootstraps nothing yet; its first publish is the bootstrap, the crash
    # comes at the second publish, the first micro-batch of changes.
    member.start()
    insert_rows(pg, "formulas", client_id, range(21, 31))
    wait_in_sync(settings, [target], consumer=member)
    member.stop()

    member.start(env={"SB_CRASH_AT": crash_at})
    insert_rows(pg, "formulas", client_id, range(31, 41))
    with pg.cursor() as cursor:
        cursor.execute(
            "UPDATE formulas SET name = name || '!' WHERE client_id = %s AND id <= 5", (client_id,)
        )
        cursor.execute("DELETE FROM formulas WHERE client_id = %s AND id > 35", (client_id,))
    assert member.wait_exit(timeout=90) == -signal.SIGKILL
    assert f"crash injected at {crash_at}" in member.new_log()
    version_at_crash = state_of(settings, target)

    member.start()
    insert_rows(pg, "formulas", client_id, range(41, 46))
    wait_in_sync(settings, [target], consumer=member)

    # A crash after writing a manifest leaves that manifest unpublished (the restart
    # publishes the same version anew); versions still grow by one at each publish.
    versions = sorted(set(_manifest_versions(settings, target)))
    assert versions == list(range(1, versions[-1] + 1)), versions
    assert version_at_crash is not None
    final = state_of(settings, target)
    assert final is not None and final.version >= version_at_crash.version
    # Not applied twice: every published version's offsets move strictly forward, so the
    # events each publish applied, (previous offset, its offset], never overlap.
    chain = _published_chain(settings, target)
    assert [m.version for m in chain] == list(range(1, final.version + 1))
    # Only a crash after a manifest was written leaves a second manifest of one version
    # (a delta's manifest is written with its delta, in the same pack).
    if crash_at != "after_manifest" and (crash_at, path) != ("after_segments", "delta"):
        assert len(_manifest_versions(settings, target)) == len(versions)
    if path == "delta":
        assert any(m.deltas for m in chain), "no publish went as a delta"
    else:
        assert not any(m.deltas for m in chain), "a publish went as a delta"


def _manifest_keys(settings: Settings, target: Target) -> dict[int, list[str]]:
    return manifest_keys(ObjectStore(settings.s3), settings.s3.prefix, target)


def _manifest_versions(settings: Settings, target: Target) -> list[int]:
    return [v for v, keys in _manifest_keys(settings, target).items() for _ in keys]


def _published_chain(settings: Settings, target: Target) -> list[Manifest]:
    """The manifests of the published versions, newest back to version 1, checking that
    each publish moved the source position strictly forward.

    The newest is the one Redis names; below it, a version with several manifests (one
    written and never published before a crash) contributes the one its successor builds
    on. A replayed batch, or a stale writer's publish, would show as a position that does
    not move forward.
    """
    store = ObjectStore(settings.s3)
    by_version: dict[int, list[Manifest]] = {}
    for version, keys in _manifest_keys(settings, target).items():
        for key in keys:
            by_version.setdefault(version, []).append(Manifest.load(store.get(key), target, key))
    state = state_of(settings, target)
    assert state is not None
    newest = Manifest.load(store.get(state.manifest_key), target, state.manifest_key)
    chain = [newest]
    for version in range(newest.version - 1, 0, -1):
        later = chain[-1]
        before = [m for m in by_version.get(version, []) if _moves_forward(m, later)]
        assert before, (
            f"{target}: version {later.version} ({later.source_position}) does not move "
            f"forward from any manifest of version {version}: "
            f"{[m.source_position for m in by_version.get(version, [])]}"
        )
        chain.append(before[0])
    return chain[::-1]


def _moves_forward(earlier: Manifest, later: Manifest) -> bool:
    """Whether ``later`` applied at least one event past ``earlier`` and none below it."""
    if later.source_position.pg_snapshot != earlier.source_position.pg_snapshot:
        return False
    old, new = earlier.source_position.offsets, later.source_position.offsets
    if any(new.get(partition, -1) < offset for partition, offset in old.items()):
        return False
    return any(offset > old.get(partition, -1) for partition, offset in new.items())


def test_sigterm_publishes_pending_batches_commits_and_leaves(
    settings: Settings, pg: psycopg.Connection, client_id: int, consumers: Factory
) -> None:
    # A flush window far longer than the test: only the shutdown can publish the batch.
    chosen = consumer_settings(
        settings, [client_id], flush_max_age_s=600.0, flush_max_age_cap_s=600.0
    )
    member = consumers(chosen, "sigterm")
    target = Target("data_items", client_id)
    insert_rows(pg, "data_items", client_id, range(1, 11))
    member.start()
    insert_rows(pg, "data_items", client_id, range(11, 21))
    # Let Debezium deliver the events, then stop.
    _wait_for_offsets_of(settings, "data_items", client_id, member)

    member.signal(signal.SIGTERM)
    assert member.wait_exit(timeout=60) == 0
    assert "stopped:" in member.new_log()
    wait_in_sync(settings, [target], timeout=5, consumer=member)


def _wait_for_offsets_of(
    settings: Settings, dataset: str, client_id: int, member: ConsumerProcess
) -> None:
    """Wait until the consumer has buffered an event of the client (DEBUG is off: use Kafka)."""
    deadline = time.monotonic() + 60
    topic = _topic(settings, dataset)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": f"test-peek-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    high = _high_watermarks(settings, topic)
    consumer.assign([TopicPartition(topic, p, max(0, h - 2000)) for p, h in high.items()])
    needle = f'"client_id":{client_id}'.encode()
    seen = 0
    try:
        while time.monotonic() < deadline and seen < 10:
            message = consumer.poll(0.5)
            if message is not None and not message.error() and needle in (message.key() or b""):
                seen += 1
    finally:
        consumer.close()
    assert seen >= 10, "Debezium did not deliver the inserts within 60s"
    time.sleep(2)  # the consumer polls every 0.2s


@pytest.mark.slow
def test_writes_during_the_inline_bootstrap_hand_off_exactly(
    settings: Settings, pg: psycopg.Connection, client_id: int, consumers: Factory
) -> None:
    dataset = "raw_data"
    target = Target(dataset, client_id)
    insert_rows(pg, dataset, client_id, range(1, 20_001))
    member = consumers(consumer_settings(settings, [client_id]), "handoff")
    member.start()

    stop = threading.Event()
    writer = threading.Thread(target=_keep_writing, args=(settings, target, stop), daemon=True)
    writer.start()
    try:
        # The first change bootstraps the target inline, while the writes go on, and the
        # first micro-batch after it must sort the changes the bootstrap already holds.
        member.wait_for(f"published {target} version 1 ", timeout=120)
        _wait_for_version(settings, target, 2, timeout=120)
    finally:
        stop.set()
        writer.join(30)

    wait_in_sync(settings, [target], timeout=180, consumer=member)
    assert f"bootstrapping {target}" in member.log()


def _keep_writing(settings: Settings, target: Target, stop: threading.Event) -> None:
    rng = random.Random(target.client_id)
    next_key = 30_000
    dsn = settings.postgres.dsn.get_secret_value()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            with conn.transaction(), conn.cursor() as cursor:
                cursor.execute(
                    "UPDATE raw_data SET value = value + 1 WHERE client_id = %s AND id = ANY(%s)",
                    (target.client_id, rng.sample(range(1, 20_001), 20)),
                )
                cursor.execute(
                    "DELETE FROM raw_data WHERE client_id = %s AND id = %s",
                    (target.client_id, rng.randrange(1, 20_001)),
                )
            insert_rows(conn, target.dataset, target.client_id, [next_key], seed=next_key)
            next_key += 1
            time.sleep(0.02)


@pytest.mark.slow
def test_two_consumers_and_a_rebalance_during_churn_stay_exact(
    settings: Settings, pg: psycopg.Connection, consumers: Factory
) -> None:
    base = random.randrange(10**9, 2**61)
    clients = [base + i for i in range(8)]
    targets = [Target("entities", client) for client in clients]
    for target in targets:
        insert_rows(pg, target.dataset, target.client_id, range(1, 31))
    shared = consumer_settings(settings, clients)
    first = consumers(shared, "member-1")
    second = consumers(shared, "member-2")
    first.start()

    stop = threading.Event()
    # Two writers on disjoint clients: a delete and re-insert of one key never race.
    writers = [
        threading.Thread(
            target=_churn_entities, args=(settings, clients[half::2], stop), daemon=True
        )
        for half in range(2)
    ]
    for writer in writers:
        writer.start()
    time.sleep(4)
    second.start(wait_ready=False)  # a rebalance in the middle of the churn
    second.wait_for("assigned ", timeout=90)
    time.sleep(4)
    first.signal(signal.SIGTERM)  # and another one when the first member leaves
    assert first.wait_exit(timeout=90) == 0
    time.sleep(3)
    stop.set()
    for writer in writers:
        writer.join(30)

    wait_in_sync(settings, targets, timeout=180, consumer=second)
    for target in targets:
        # A publish that lost its compare-and-set deleted its manifest: one per version,
        # and each one's source position moves forward (no stale or replayed publish).
        versions = sorted(_manifest_versions(settings, target))
        assert versions == list(range(1, versions[-1] + 1)), f"{target}: {versions}"
        assert len(_published_chain(settings, target)) == len(versions)
    combined = first.log() + second.log()
    assert "Traceback" not in combined


def _churn_entities(settings: Settings, clients: list[int], stop: threading.Event) -> None:
    rng = random.Random()
    dsn = settings.postgres.dsn.get_secret_value()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            client = rng.choice(clients)
            with conn.transaction(), conn.cursor() as cursor:
                cursor.execute(
                    "UPDATE entities SET name = %s WHERE client_id = %s AND id = ANY(%s)",
                    (uuid.uuid4().hex, client, rng.sample(range(1, 31), 3)),
                )
                key = rng.randrange(1, 31)
                cursor.execute(
                    "DELETE FROM entities WHERE client_id = %s AND id = %s", (client, key)
                )
            insert_rows(conn, "entities", client, [key], seed=rng.randrange(1000))
            time.sleep(0.01)


@pytest.mark.slow
def test_a_burst_of_50000_changes_in_one_transaction(
    settings: Settings, pg: psycopg.Connection, client_id: int, consumers: Factory
) -> None:
    target = Target("raw_data", client_id)
    insert_rows(pg, "raw_data", client_id, range(1, 11))
    member = consumers(consumer_settings(settings, [client_id]), "burst")
    member.start()

    insert_rows(pg, "raw_data", client_id, range(11, 50_011))

    wait_in_sync(settings, [target], timeout=300, consumer=member)


@pytest.mark.slow
def test_a_column_added_while_streaming_is_ignored_and_nothing_is_lost(
    settings: Settings, pg: psycopg.Connection, client_id: int, consumers: Factory
) -> None:
    target = Target("data_items", client_id)
    insert_rows(pg, "data_items", client_id, range(1, 11))
    member = consumers(consumer_settings(settings, [client_id]), "new-column")
    member.start()
    insert_rows(pg, "data_items", client_id, range(11, 21))
    column = f"extra_{uuid.uuid4().hex[:8]}"
    pg.execute(f"ALTER TABLE data_items ADD COLUMN {column} text")
    try:
        insert_rows(pg, "data_items", client_id, range(21, 31))
        pg.execute(
            f"UPDATE data_items SET {column} = 'x', name = 'renamed' "
            "WHERE client_id = %s AND id <= 25",
            (client_id,),
        )
        wait_in_sync(settings, [target], consumer=member)
    finally:
        pg.execute(f"ALTER TABLE data_items DROP COLUMN IF EXISTS {column}")
    assert "dead-lettered" not in member.log()


def test_a_truncate_event_re_bootstraps_the_targets_of_its_dataset(
    settings: Settings, pg: psycopg.Connection, client_id: int, consumers: Factory
) -> None:
    target = Target("formula_associations", client_id)
    member = consumers(consumer_settings(settings, [client_id]), "truncate")
    member.start()
    insert_rows(pg, target.dataset, client_id, range(1, 11))
    wait_in_sync(settings, [target], consumer=member)
    insert_rows(pg, target.dataset, client_id, range(11, 21))
    _wait_for_version(settings, target, 2)
    wait_in_sync(settings, [target], consumer=member)
    before = state_of(settings, target)
    assert before is not None and before.source_position.offsets

    # Debezium sends a truncate without a key (so to any partition) and without rows.
    envelope = {
        "op": "t",
        "before": None,
        "after": None,
        "source": {"txId": 3, "lsn": 1, "ts_ms": int(time.time() * 1000)},
        "ts_ms": int(time.time() * 1000),
    }
    producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
    producer.produce(_topic(settings, target.dataset), value=orjson.dumps(envelope))
    assert producer.flush(30) == 0
    member.wait_for(f"truncate of {target.dataset}", timeout=60)

    insert_rows(pg, target.dataset, client_id, range(21, 26))
    wait_in_sync(settings, [target], consumer=member)
    after = state_of(settings, target)
    assert after is not None and after.version > before.version
    assert after.source_position.pg_snapshot != before.source_position.pg_snapshot


def _wait_for_version(
    settings: Settings, target: Target, version: int, timeout: float = 300
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = state_of(settings, target)
        if state is not None and state.version >= version:
            return
        time.sleep(0.5)
    pytest.fail(f"{target} did not reach version {version} in {timeout}s")


@pytest.mark.slow
def test_a_real_truncate_empties_the_snapshots_of_its_dataset(
    private_source: Settings, client_id: int, consumers: Factory
) -> None:
    settings = private_source
    target = Target("formula_associations", client_id)
    member = consumers(consumer_settings(settings, [client_id]), "real-truncate")
    member.start()
    dsn = settings.postgres.dsn.get_secret_value()
    with psycopg.connect(dsn, autocommit=True) as conn:
        insert_rows(conn, target.dataset, client_id, range(1, 11))
        wait_in_sync(settings, [target], consumer=member)
        insert_rows(conn, target.dataset, client_id, range(11, 21))
        _wait_for_version(settings, target, 2)
        before = state_of(settings, target)
        assert before is not None

        conn.execute(f"TRUNCATE {DATASETS[target.dataset].table}")
        insert_rows(conn, target.dataset, client_id, range(21, 26))
        member.wait_for(f"truncate of {target.dataset}", timeout=90)
        wait_in_sync(settings, [target], consumer=member)

    after = state_of(settings, target)
    assert after is not None and after.version > before.version
    with open_snapshot(target.dataset, target.client_id, settings) as snapshot:
        assert [row["id"] for row in snapshot] == list(range(21, 26))
    assert "dead-lettered" not in member.log()
