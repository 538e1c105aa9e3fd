"""Applying micro-batches against the real Redis, S3 and PostgreSQL (no Kafka needed).

A batch is built by hand as the poll loop would build it; the snapshot is then compared
with what the batch should have made of it.
"""

from __future__ import annotations

import logging

import psycopg
import pytest
from consumer_harness import insert_rows

from bootstrap.snapshot import bootstrap_target
from consumer.apply import (
    CONFLICT,
    CONTAINED,
    PUBLISHED,
    Applier,
    FlushOutcome,
    KeptDeltas,
    pack_runs,
    skip_reason,
)
from consumer.batching import TargetBatch
from consumer.decoding import ChangeEvent
from schemas.datasets import Target
from snapshots.manifest import SourcePosition
from snapshots.publish import SnapshotWriter
from snapshots.reader import open_snapshot
from snapshots.registry import TargetState
from storage_builder.settings import Settings

TOPIC = "sb.public.entities"


def _state(position: SourcePosition) -> TargetState:
    return TargetState(version=1, manifest_key="k", source_position=position, published_at=0.0)


def test_a_change_visible_in_the_bootstrap_snapshot_is_skipped_as_handoff() -> None:
    state = _state(SourcePosition(pg_snapshot="100:105:102"))

    assert skip_reason(state, TOPIC, 0, 7, 99) == "handoff"
    assert skip_reason(state, TOPIC, 0, 7, 101) == "handoff"
    assert skip_reason(state, TOPIC, 0, 7, 102) is None  # running when the bootstrap read
    assert skip_reason(state, TOPIC, 0, 7, 105) is None
    assert skip_reason(None, TOPIC, 0, 7, 99) is None


def test_once_a_partition_has_a_recorded_offset_only_offsets_decide() -> None:
    state = _state(SourcePosition(pg_snapshot="100:105:", offsets={f"{TOPIC}:0": 50}))

    assert skip_reason(state, TOPIC, 0, 50, 200) == "replay"
    assert skip_reason(state, TOPIC, 0, 51, 99) is None
    assert skip_reason(state, TOPIC, 1, 51, 99) == "handoff"


def _batch(
    target: Target, rows: dict[int, dict[str, object] | None], first: int, ts_ms: int = 0
) -> TargetBatch:
    batch = TargetBatch(target, TOPIC, 0)
    for offset, (key, row) in enumerate(rows.items(), start=first):
        op = "d" if row is None else "u"
        batch.add(key, op, row, offset=offset, tx_id=None, source_ts_ms=ts_ms + offset)
    return batch


@pytest.fixture
def bootstrapped(settings: Settings, pg: psycopg.Connection, client_id: int) -> Target:
    target = Target("entities", client_id)
    insert_rows(pg, "entities", client_id, range(1, 21))
    bootstrap_target(target, settings)
    return target


def _rows(settings: Settings, target: Target) -> dict[int, dict[str, object]]:
    with open_snapshot(target.dataset, target.client_id, settings) as snapshot:
        return {row["id"]: row for row in snapshot}


def test_a_batch_is_published_with_its_source_position(
    settings: Settings, bootstrapped: Target
) -> None:
    writer = SnapshotWriter.from_settings(settings)
    applier = Applier(settings, writer)
    rows = _rows(settings, bootstrapped)
    changed = dict(rows[3], name="changed")

    batch = _batch(bootstrapped, {3: changed, 4: None}, first=100, ts_ms=1_700_000_000_000)
    outcome = applier.flush(batch)

    assert outcome.kind == PUBLISHED and outcome.version == 2
    after = _rows(settings, bootstrapped)
    assert after[3]["name"] == "changed" and 4 not in after and len(after) == 19
    state = applier.registry.get(bootstrapped)
    assert state is not None and state.source_position.offsets == {f"{TOPIC}:0": 101}
    # The newest change's commit time, which the lag command measures staleness from.
    assert state.source_position.source_ts_ms == 1_700_000_000_101

    replayed = applier.flush(_batch(bootstrapped, {5: None}, first=101))
    assert replayed.kind == CONTAINED and 5 in _rows(settings, bootstrapped)
    writer.close()


def test_a_member_that_lost_the_target_cannot_publish(
    settings: Settings, bootstrapped: Target, caplog: pytest.LogCaptureFixture
) -> None:
    # Two members both believe they own the partition: the zombie read its state first.
    zombie = Applier(settings, SnapshotWriter.from_settings(settings))
    owner = Applier(settings, SnapshotWriter.from_settings(settings))
    zombie.state(bootstrapped)
    row = _rows(settings, bootstrapped)[7]

    assert owner.flush(_batch(bootstrapped, {7: dict(row, name="owner")}, 10)).kind == PUBLISHED
    with caplog.at_level(logging.WARNING, logger="consumer.apply"):
        outcome = zombie.flush(_batch(bootstrapped, {7: dict(row, name="zombie")}, 10))

    assert outcome.kind == CONFLICT and outcome.first_offset == 10
    assert _rows(settings, bootstrapped)[7]["name"] == "owner"
    assert "lost the compare-and-set" in caplog.text
    state = owner.registry.get(bootstrapped)
    assert state is not None and state.version == 2


def test_a_target_without_snapshot_is_bootstrapped_before_its_first_batch(
    settings: Settings, pg: psycopg.Connection, client_id: int
) -> None:
    target = Target("entities", client_id)
    insert_rows(pg, "entities", client_id, range(1, 6))
    applier = Applier(settings, SnapshotWriter.from_settings(settings))
    assert applier.state(target) is None

    outcome = applier.flush(_batch(target, {2: None}, first=0))

    assert outcome.kind == PUBLISHED and outcome.version == 2
    assert sorted(_rows(settings, target)) == [1, 3, 4, 5]


class _RecordedLetters:
    def __init__(self) -> None:
        self.letters: list[dict[str, object]] = []

    def send(self, **letter: object) -> None:
        self.letters.append(letter)

    def flush(self) -> None:
        pass


class _Record:
    def key(self) -> bytes:
        return b'{"client_id": 1}'

    def value(self) -> bytes:
        return b"original bytes"


def test_a_row_no_segment_can_hold_is_dead_lettered_and_the_rest_published(
    settings: Settings, bootstrapped: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    import consumer.app

    fetched: list[tuple[str, int, int]] = []

    def fetch(_kafka: object, topic: str, partition: int, offset: int) -> _Record:
        fetched.append((topic, partition, offset))
        return _Record()

    monkeypatch.setattr(consumer.app, "fetch_record", fetch)
    app = consumer.app.ConsumerApp(settings)
    letters = _RecordedLetters()
    app.dead_letters = letters  # type: ignore[assignment]
    app.offsets.assign(TOPIC, 0, start=0, committed=0)
    rows = _rows(settings, bootstrapped)
    good = ChangeEvent("u", bootstrapped, 3, dict(rows[3], name="good"), None, 1, 0, TOPIC, 0, 40)
    # Decoded, but the value does not fit the Avro long of row_version.
    bad_row = dict(rows[5], row_version=2**70)
    bad = ChangeEvent("u", bootstrapped, 5, bad_row, None, 1, 0, TOPIC, 0, 41)
    app._route(good)
    app._route(bad)

    outcome = app._flush(app.batches[bootstrapped])

    assert outcome is not None and outcome.kind == PUBLISHED
    after = _rows(settings, bootstrapped)
    assert after[3]["name"] == "good" and after[5] == rows[5]
    assert fetched == [(TOPIC, 0, 41)]
    (letter,) = letters.letters
    assert letter["reason"] == "unappliable" and letter["offset"] == 41
    assert letter["value"] == b"original bytes"
    assert "key 5" in str(letter["detail"])
    assert not app.batches and app.buffered_bytes == 0
    app.writer.close()


def test_batches_go_as_deltas_until_their_target_is_due_for_compaction(
    settings: Settings, bootstrapped: Target
) -> None:
    chosen = settings.model_copy(
        update={"consumer": settings.consumer.model_copy(update={"compact_deltas": 3})}
    )
    writer = SnapshotWriter.from_settings(chosen)
    applier = Applier(chosen, writer)
    rows = _rows(chosen, bootstrapped)
    reads: list[str] = []
    get = writer.store.get

    def counting_get(key: str) -> bytes:
        reads.append(key)
        return get(key)

    for offset, key in enumerate((3, 5, 3), start=100):
        batch = _batch(bootstrapped, {key: dict(rows[key], name=f"at {offset}")}, offset)
        assert not applier.needs_compaction(batch)
        outcome = applier.flush_deltas([batch])[bootstrapped]
        assert isinstance(outcome, FlushOutcome) and outcome.kind == PUBLISHED
    manifest = applier.manifest(bootstrapped)
    assert manifest is not None and manifest.deltas[-1].publishes == 3
    after = _rows(chosen, bootstrapped)
    assert (after[3]["name"], after[5]["name"]) == ("at 102", "at 101")

    writer.store.get = counting_get  # type: ignore[method-assign]
    batch = _batch(bootstrapped, {6: None}, 103)
    assert applier.needs_compaction(batch)
    assert applier.flush(batch).kind == PUBLISHED

    # The delta was folded from what the member kept, not read back from its pack.
    assert not [key for key in reads if "#" in key]
    compacted = applier.manifest(bootstrapped)
    assert compacted is not None and compacted.deltas == [] and compacted.version == 5
    assert _rows(chosen, bootstrapped) == {k: v for k, v in after.items() if k != 6}
    writer.close()


def test_a_zombie_loses_its_targets_in_a_pack_and_the_owner_keeps_its_own(
    settings: Settings, pg: psycopg.Connection, bootstrapped: Target, client_id: int
) -> None:
    other = Target("entities", client_id + 1)
    insert_rows(pg, "entities", other.client_id, range(1, 6))
    bootstrap_target(other, settings)
    zombie = Applier(settings, SnapshotWriter.from_settings(settings))
    owner = Applier(settings, SnapshotWriter.from_settings(settings))
    zombie.state(bootstrapped)
    row = _rows(settings, bootstrapped)[7]
    theirs = _rows(settings, other)[2]

    won = owner.flush_deltas([_batch(bootstrapped, {7: dict(row, name="owner")}, 10)])
    outcomes = zombie.flush_deltas(
        [
            _batch(bootstrapped, {7: dict(row, name="zombie")}, 10),
            _batch(other, {2: dict(theirs, name="still ours")}, 10),
        ]
    )

    assert isinstance(won[bootstrapped], FlushOutcome)
    lost, kept = outcomes[bootstrapped], outcomes[other]
    assert isinstance(lost, FlushOutcome) and lost.kind == CONFLICT and lost.first_offset == 10
    assert isinstance(kept, FlushOutcome) and kept.kind == PUBLISHED
    assert _rows(settings, bootstrapped)[7]["name"] == "owner"
    assert _rows(settings, other)[2]["name"] == "still ours"
    pg.execute("DELETE FROM entities WHERE client_id = %s", [other.client_id])


def test_a_flush_in_packs_of_bounded_size() -> None:
    assert pack_runs([], 10) == []
    assert pack_runs([4, 4, 4], 10) == [(0, 2), (2, 3)]
    assert pack_runs([12, 1, 1], 10) == [(0, 1), (1, 3)]
    assert pack_runs([3, 3, 3], 9) == [(0, 3)]


def test_kept_deltas_stay_within_their_budget() -> None:
    kept = KeptDeltas(budget_bytes=1_000)
    first, second = Target("entities", 1), Target("entities", 2)

    kept.keep(first, 2, b"a" * 400)
    assert kept.get(first, 2) == b"a" * 400 and kept.get(first, 1) is None
    kept.keep(second, 5, b"b" * 500)
    kept.keep(second, 6, b"c" * 500)  # replaces the target's earlier delta
    assert kept.get(second, 5) is None and kept.get(first, 2) is not None

    # Over the budget: the target that published least recently lost its entry.
    kept.keep(second, 7, b"d" * 700)
    assert kept.get(first, 2) is None and kept.get(second, 7) == b"d" * 700
