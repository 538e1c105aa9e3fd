"""Rebuilding Redis from S3 after it lost its keys, and collecting superseded objects."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from schemas.datasets import DATASETS, Target
from snapshots import keys as object_keys
from snapshots.manifest import Manifest, SourcePosition
from snapshots.publish import SnapshotWriter
from snapshots.reader import open_snapshot
from snapshots.registry import reindex
from snapshots.retention import collect_garbage
from storage_builder.errors import InvalidTargetError
from storage_builder.settings import Settings

RAW = DATASETS["raw_data"]


def _flush(redis_client: redis.Redis, settings: Settings) -> None:
    """Lose every key of this test's registry, as FLUSHDB would (the database is shared)."""
    for key in redis_client.scan_iter(match=f"{settings.redis.key_prefix}*"):
        redis_client.delete(key)


def _advance(writer: SnapshotWriter, target: Target, make_row: Any, key: int) -> None:
    state = writer.registry.get(target)
    assert state is not None
    upserts = {key: make_row(RAW, key, target.client_id, version=state.version + 1)}
    position = SourcePosition(offsets={"sb.public.raw_data:0": state.version * 10})
    writer.apply_changes(target, upserts, [], position, state)


def test_reindex_after_a_flush_restores_the_same_state(
    small_writer: SnapshotWriter,
    seed: Any,
    make_row: Any,
    settings: Settings,
    redis_client: redis.Redis,
    client_id: int,
) -> None:
    targets = [Target("raw_data", client_id), Target("raw_data", client_id + 1)]
    for target in targets:
        seed(target, list(range(1, 50)))
    for key in (5, 45, 25):
        _advance(small_writer, targets[0], make_row, key)
    before = small_writer.registry.get_many(targets)

    _flush(redis_client, settings)
    assert small_writer.registry.get(targets[0]) is None
    restored = reindex(small_writer.registry, small_writer.store, settings.s3.prefix)

    assert restored == 2
    assert small_writer.registry.get_many(targets) == before
    assert sorted(small_writer.registry.targets()) == sorted(targets)
    assert reindex(small_writer.registry, small_writer.store, settings.s3.prefix) == 0


def test_of_two_manifests_claiming_a_version_the_newest_wins(
    writer: SnapshotWriter, seed: Any, settings: Settings, redis_client: redis.Redis, target: Target
) -> None:
    published = seed(target, [1, 2])
    state = writer.registry.get(target)
    assert state is not None
    # A fenced writer's leftover: the same version, written earlier.
    leftover = published.model_copy(update={"created_at": published.created_at - 60})
    writer.store.put(object_keys.manifest_key(writer.root, target, 1), leftover.to_json())

    _flush(redis_client, settings)
    reindex(writer.registry, writer.store, settings.s3.prefix, [target])
    assert writer.registry.get(target) == state


def test_a_reader_falls_back_to_s3_when_redis_lost_the_target(
    writer: SnapshotWriter,
    seed: Any,
    settings: Settings,
    redis_client: redis.Redis,
    target: Target,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed(target, [1, 2, 3])
    _flush(redis_client, settings)
    with open_snapshot(target.dataset, target.client_id, settings) as snapshot:
        assert snapshot.version == 1
        assert [row["id"] for row in snapshot] == [1, 2, 3]
    assert "Redis has no version of" in caplog.text


def _objects(writer: SnapshotWriter, target: Target) -> set[str]:
    return {info.key for info in writer.store.list(object_keys.target_prefix(writer.root, target))}


def test_gc_keeps_what_the_current_manifest_references(
    small_writer: SnapshotWriter, seed: Any, make_row: Any, settings: Settings, target: Target
) -> None:
    seed(target, list(range(1, 50)))  # 3 segments
    for key in (5, 6, 45):
        _advance(small_writer, target, make_row, key)
    state = small_writer.registry.get(target)
    assert state is not None
    current = small_writer.load_manifest(state, target)
    wanted = {state.manifest_key} | {segment.key for segment in current.segments}
    stray = object_keys.target_prefix(small_writer.root, target) + "notes.txt"
    small_writer.store.put(stray, b"not ours to delete")
    everything = _objects(small_writer, target)

    def gc(retention_s: float, dry_run: bool = False, now: float | None = None) -> Any:
        return collect_garbage(
            small_writer.store,
            small_writer.registry,
            settings.s3.prefix,
            retention_s,
            targets=[target],
            dry_run=dry_run,
            now=now,
        )

    assert gc(3600).deleted == []  # everything is younger than the retention
    dry = gc(0, dry_run=True, now=time.time() + 5)
    assert set(dry.deleted) == everything - wanted - {stray}
    assert _objects(small_writer, target) == everything

    report = gc(0, now=time.time() + 5)
    assert _objects(small_writer, target) == wanted | {stray}
    assert len(report.deleted) == 3 + 3  # three superseded manifests, three replaced segments
    with open_snapshot(target.dataset, target.client_id, settings) as snapshot:
        assert len(list(snapshot)) == 49


def test_gc_keeps_a_manifest_that_was_current_within_the_retention(
    writer: SnapshotWriter, seed: Any, make_row: Any, settings: Settings, target: Target
) -> None:
    seed(target, [1, 2, 3])
    _advance(writer, target, make_row, 2)
    first = {key for key in _objects(writer, target) if object_keys.manifest_version(key) == 1}
    # Version 1 was current until version 2 was written a moment ago: a reader that
    # resolved it may still be reading, so a retention reaching back past that keeps it.
    report = collect_garbage(
        writer.store,
        writer.registry,
        settings.s3.prefix,
        30,
        targets=[target],
        now=time.time() + 20,
    )
    assert report.deleted == []
    assert first <= _objects(writer, target)


def test_gc_skips_a_target_redis_does_not_know(
    writer: SnapshotWriter, seed: Any, settings: Settings, redis_client: redis.Redis, target: Target
) -> None:
    seed(target, [1])
    seed(target, [1, 2], expected=1)
    _flush(redis_client, settings)
    report = collect_garbage(
        writer.store, writer.registry, settings.s3.prefix, 0, now=time.time() + 5
    )
    assert report.skipped == [str(target)] and report.deleted == []


def test_a_manifest_naming_objects_of_another_client_is_refused(
    writer: SnapshotWriter, seed: Any, target: Target
) -> None:
    manifest = seed(target, [1, 2])
    victim = Target("raw_data", target.client_id + 1)
    forged = Manifest(
        dataset=victim.dataset,
        client_id=victim.client_id,
        version=1,
        source_position=SourcePosition(),
        segments=manifest.segments,
        rows=manifest.rows,
    )
    key = object_keys.manifest_key(writer.root, victim, 1)
    writer.store.put(key, forged.to_json())
    from snapshots.registry import TargetState

    with pytest.raises(InvalidTargetError, match="is not a segment or manifest below"):
        writer.load_manifest(TargetState.of(forged, key), victim)
