"""Packs and deltas: the format alone, then publishing, reading, compacting, rebuilding the
registry and collecting garbage against the stack."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from schemas.datasets import DATASETS, Target
from snapshots import _container
from snapshots import keys as object_keys
from snapshots.manifest import FORMAT_VERSION, Manifest, SourcePosition
from snapshots.packs import (
    IndexTooLong,
    Location,
    PackBuilder,
    decode_delta,
    encode_delta,
    merge_rows,
    parse_index,
)
from snapshots.publish import DeltaPublish, SnapshotWriter
from snapshots.reader import open_snapshot
from snapshots.registry import TargetState, manifest_keys, reindex
from snapshots.retention import collect_garbage
from storage_builder import metrics
from storage_builder.errors import PublishConflict, SnapshotFormatError
from storage_builder.settings import Settings

RAW = DATASETS["raw_data"]


# The format alone.


def test_a_location_names_a_byte_range_and_a_plain_key_names_a_whole_object() -> None:
    where = Location.parse("root/_packs/1-ab.pack#120+34")
    assert (where.key, where.offset, where.length) == ("root/_packs/1-ab.pack", 120, 34)
    assert str(where) == "root/_packs/1-ab.pack#120+34"
    whole = Location.parse("root/raw_data/client=7/manifests/000000000001-1-ab.json")
    assert whole.offset is None and str(whole) == whole.key


def test_a_pack_index_lists_each_target_with_its_manifest_range() -> None:
    pack = PackBuilder("p.pack")
    first = pack.add(b"delta one")
    manifest = pack.add(b'{"manifest": 1}')
    pack.index(Target("raw_data", 7), 3, 1700000000.5, manifest)
    data = pack.build()

    assert first == Location("p.pack", 0, 9)
    assert data[manifest.offset : manifest.offset + manifest.length] == b'{"manifest": 1}'
    [entry] = parse_index(data, "p.pack")
    assert (entry.target, entry.version) == (Target("raw_data", 7), 3)
    assert entry.created_at == 1700000000.5
    assert entry.manifest == (manifest.offset, manifest.length)
    with pytest.raises(IndexTooLong) as short:
        parse_index(data[-20:], "p.pack")
    assert parse_index(data[-short.value.needed :], "p.pack") == [entry]
    with pytest.raises(SnapshotFormatError, match="footer"):
        parse_index(data[:-1], "p.pack")


def test_a_delta_round_trips_every_value_and_names_its_client(make_row: Any) -> None:
    target = Target("raw_data", 42)
    upserts = {key: make_row(RAW, key, 42, version=9) for key in (3, 1, 20)}
    data = encode_delta(RAW, upserts, [5, 2], 42)

    assert decode_delta(RAW, data, target, "d") == {**upserts, 5: None, 2: None}
    assert decode_delta(RAW, encode_delta(RAW, {}, [8], 42), target, "d") == {8: None}
    with pytest.raises(SnapshotFormatError, match="not raw_data/43"):
        decode_delta(RAW, data, Target("raw_data", 43), "d")


def test_a_delta_appends_to_the_previous_one_and_the_last_change_of_a_key_wins(
    make_row: Any,
) -> None:
    target = Target("raw_data", 42)
    first = encode_delta(RAW, {key: make_row(RAW, key, 42, 2) for key in (1, 2, 3)}, [9], 42)
    # 1 changes again, 2 is deleted, 9 (deleted before) comes back, 4 is new.
    again = {key: make_row(RAW, key, 42, 3) for key in (1, 9, 4)}
    second = encode_delta(RAW, again, [2], 42, previous=first)

    # The first delta's block is copied byte for byte; the second publish adds one block.
    blocks = _container.parse(second).blocks
    assert [block.raw for block in blocks[:1]] == [b.raw for b in _container.parse(first).blocks]
    assert len(blocks) == 2
    assert decode_delta(RAW, second, target, "d") == {
        1: make_row(RAW, 1, 42, 3),
        2: None,
        3: make_row(RAW, 3, 42, 2),
        4: make_row(RAW, 4, 42, 3),
        9: make_row(RAW, 9, 42, 3),
    }


def test_merging_inserts_replaces_and_removes_in_key_order() -> None:
    rows = [{"id": key, "v": "old"} for key in (2, 4, 6, 8)]
    changes: dict[int, dict[str, Any] | None] = {
        1: {"id": 1, "v": "new"},
        4: {"id": 4, "v": "changed"},
        5: {"id": 5, "v": "new"},
        6: None,
        9: {"id": 9, "v": "new"},
        10: None,
    }
    merged = list(merge_rows(rows, changes, "id"))
    assert [(row["id"], row["v"]) for row in merged] == [
        (1, "new"),
        (2, "old"),
        (4, "changed"),
        (5, "new"),
        (8, "old"),
        (9, "new"),
    ]


# Against the stack.


def _state(writer: SnapshotWriter, target: Target) -> TargetState:
    state = writer.registry.get(target)
    assert state is not None
    return state


def _delta(
    writer: SnapshotWriter, target: Target, upserts: dict[int, Any], deletes: list[int], at: int
) -> DeltaPublish:
    state = _state(writer, target)
    position = SourcePosition(pg_snapshot="100:105:101,103", offsets={"sb.public.raw_data:0": at})
    manifest = writer.load_manifest(state, target)
    return DeltaPublish(target, state, manifest, upserts, deletes, position)


def _rows(settings: Settings, target: Target) -> list[dict[str, Any]]:
    with open_snapshot(target.dataset, target.client_id, settings) as snapshot:
        return list(snapshot)


def _sample(name: str) -> float:
    return metrics.REGISTRY.get_sample_value(name) or 0.0


def _packs(writer: SnapshotWriter) -> list[str]:
    return [info.key for info in writer.store.list(object_keys.pack_prefix(writer.root))]


@pytest.fixture
def two_targets(small_writer: SnapshotWriter, seed: Any, client_id: int) -> list[Target]:
    targets = [Target("raw_data", client_id), Target("raw_data", client_id + 1)]
    for target in targets:
        seed(target, list(range(1, 50)))
    return targets


def test_deltas_of_several_targets_go_in_one_pack_and_read_back_merged(
    small_writer: SnapshotWriter, two_targets: list[Target], make_row: Any, settings: Settings
) -> None:
    first, second = two_targets
    items = [
        _delta(small_writer, first, {7: make_row(RAW, 7, first.client_id, 2)}, [30], 1),
        _delta(small_writer, second, {60: make_row(RAW, 60, second.client_id, 2)}, [], 1),
    ]
    requests = small_writer.store.requests
    packs_before = _sample("storage_builder_packs_written_total")

    results = small_writer.publish_deltas(items)

    assert small_writer.store.requests - requests == 1  # the pack; the manifests are in it
    assert len(_packs(small_writer)) == 1
    assert _sample("storage_builder_packs_written_total") == packs_before + 1
    for result in results:
        assert not isinstance(result, Exception)
        assert result.manifest.version == 2 and len(result.manifest.deltas) == 1
        state = _state(small_writer, result.manifest.target)
        assert (state.version, state.manifest_key) == (2, result.location)
    with open_snapshot(first.dataset, first.client_id, settings) as snapshot:
        assert snapshot.manifest_key == results[0].location  # type: ignore[union-attr]
        assert snapshot.version == 2
    expected_first = [make_row(RAW, k, first.client_id, 2 if k == 7 else 1) for k in range(1, 50)]
    assert _rows(settings, first) == [row for row in expected_first if row["id"] != 30]
    expected_second = [make_row(RAW, k, second.client_id) for k in range(1, 50)]
    assert _rows(settings, second) == [*expected_second, make_row(RAW, 60, second.client_id, 2)]


def test_a_compaction_folds_the_deltas_into_segments(
    small_writer: SnapshotWriter, two_targets: list[Target], make_row: Any, settings: Settings
) -> None:
    target = two_targets[0]
    for at, key in enumerate((3, 25, 3), start=1):
        row = make_row(RAW, key, target.client_id, at + 1)
        [result] = small_writer.publish_deltas([_delta(small_writer, target, {key: row}, [], at)])
        assert not isinstance(result, Exception)
    [delta] = result.manifest.deltas
    assert (delta.publishes, delta.upserts, delta.deletes) == (3, 3, 0)
    before = _rows(settings, target)
    state = _state(small_writer, target)

    compacted = small_writer.apply_changes(target, {}, [48], state.source_position, state)

    assert compacted.manifest.deltas == [] and compacted.manifest.version == 5
    # Keys 3, 25 and 48 lie in the three segments (1-20, 21-40, 41-49): each is rewritten once.
    assert compacted.segments_rewritten == 3
    assert _rows(settings, target) == [row for row in before if row["id"] != 48]
    assert "#" not in _state(small_writer, target).manifest_key


def test_versions_written_over_the_earlier_checksum_format_keep_it(
    small_writer: SnapshotWriter, two_targets: list[Target], make_row: Any
) -> None:
    # Their untouched segments still hold checksums of format 1: calling the result format 2
    # would make reconciliation compare them with the database as if they were current.
    target = two_targets[0]
    state = _state(small_writer, target)
    manifest = small_writer.load_manifest(state, target)
    small_writer.publish(
        target, state.version, manifest.segments, manifest.source_position, format_version=1
    )
    row = make_row(RAW, 3, target.client_id, 2)

    [result] = small_writer.publish_deltas([_delta(small_writer, target, {3: row}, [], 1)])
    assert not isinstance(result, Exception)
    state = _state(small_writer, target)
    compacted = small_writer.apply_changes(target, {}, [48], state.source_position, state)

    assert result.manifest.format_version == 1
    assert compacted.manifest.format_version == 1
    assert compacted.segments_rewritten == 2
    # A publish that names no format, as a bootstrap's, is of the current one.
    other = _state(small_writer, two_targets[1])
    rebuilt = small_writer.publish(two_targets[1], other.version, [], other.source_position)
    assert rebuilt.format_version == FORMAT_VERSION == 2


def test_a_lost_publish_in_a_pack_costs_only_its_target_and_is_never_restored(
    small_writer: SnapshotWriter,
    two_targets: list[Target],
    make_row: Any,
    settings: Settings,
    redis_client: redis.Redis,
) -> None:
    first, second = two_targets
    stale = _delta(small_writer, first, {7: make_row(RAW, 7, first.client_id, 2)}, [], 1)
    # Another writer publishes version 2 of the first target meanwhile.
    [won] = small_writer.publish_deltas(
        [_delta(small_writer, first, {8: make_row(RAW, 8, first.client_id, 3)}, [], 2)]
    )
    assert not isinstance(won, Exception)
    other = _delta(small_writer, second, {9: make_row(RAW, 9, second.client_id, 2)}, [], 1)

    lost, published = small_writer.publish_deltas([stale, other])

    assert isinstance(lost, PublishConflict) and (lost.expected, lost.current) == (1, 2)
    assert not isinstance(published, Exception) and published.manifest.version == 2
    assert _state(small_writer, first).manifest_key == won.location
    # Both manifests of version 2 of the first target are in packs; only the winner counts.
    assert manifest_keys(small_writer.store, small_writer.root, first)[2] == [won.location]

    for key in redis_client.scan_iter(match=f"{settings.redis.key_prefix}*"):
        redis_client.delete(key)
    assert reindex(small_writer.registry, small_writer.store, small_writer.root) == 2
    assert _state(small_writer, first).manifest_key == won.location
    assert _state(small_writer, second).manifest_key == published.location


def test_gc_deletes_old_packs_no_usable_manifest_refers_to(
    small_writer: SnapshotWriter, two_targets: list[Target], make_row: Any, settings: Settings
) -> None:
    first, second = two_targets

    def publish(at: int, targets: list[Target]) -> None:
        items = [
            _delta(small_writer, target, {at: make_row(RAW, at, target.client_id, at + 1)}, [], at)
            for target in targets
        ]
        assert not any(isinstance(r, Exception) for r in small_writer.publish_deltas(items))

    def gc(now: float) -> Any:
        return collect_garbage(
            small_writer.store, small_writer.registry, settings.s3.prefix, 0, now=now
        )

    publish(1, two_targets)
    [both] = _packs(small_writer)
    publish(2, [first])
    # The second target's current manifest and delta are still in the first pack.
    assert gc(time.time() + 5).packs == 0 and both in _packs(small_writer)

    publish(3, [second])
    report = gc(time.time() + 5)

    # Deltas are cumulative: the current manifests name only the two newer packs.
    assert report.packs == 1 and both not in _packs(small_writer)
    assert len(_packs(small_writer)) == 2
    expected = {1: 2, 2: 3}
    assert {r["id"]: r["row_version"] for r in _rows(settings, first) if r["id"] < 3} == expected
    versions = {row["id"]: row["row_version"] for row in _rows(settings, second)}
    assert len(versions) == 49 and (versions[1], versions[3]) == (2, 4)
    state = _state(small_writer, first)
    small_writer.apply_changes(first, {}, [], state.source_position, state)
    state = _state(small_writer, second)
    small_writer.apply_changes(second, {}, [], state.source_position, state)
    assert gc(time.time() + 5).packs == 2 and _packs(small_writer) == []


def test_a_manifest_naming_a_delta_of_another_client_is_refused(
    small_writer: SnapshotWriter, two_targets: list[Target], make_row: Any, settings: Settings
) -> None:
    first, second = two_targets
    [theirs] = small_writer.publish_deltas(
        [_delta(small_writer, second, {5: make_row(RAW, 5, second.client_id, 2)}, [], 1)]
    )
    assert not isinstance(theirs, Exception)
    state = _state(small_writer, first)
    manifest = small_writer.load_manifest(state, first)
    forged = Manifest(
        **{
            **manifest.model_dump(),
            "version": 2,
            "deltas": [delta.model_dump() for delta in theirs.manifest.deltas],
        }
    )
    key = object_keys.manifest_key(small_writer.root, first, 2)
    small_writer.store.put(key, forged.to_json())
    small_writer.registry.compare_and_set(first, 1, TargetState.of(forged, key))

    with pytest.raises(SnapshotFormatError, match="refused"):
        _rows(settings, first)


def test_gc_keeps_a_pack_of_a_target_it_cannot_examine(
    small_writer: SnapshotWriter,
    two_targets: list[Target],
    make_row: Any,
    settings: Settings,
    redis_client: redis.Redis,
) -> None:
    first, second = two_targets
    items = [
        _delta(small_writer, t, {1: make_row(RAW, 1, t.client_id, 2)}, [], 1)
        for t in (first, second)
    ]
    assert not any(isinstance(r, Exception) for r in small_writer.publish_deltas(items))
    [pack] = _packs(small_writer)
    for target in two_targets:
        state = _state(small_writer, target)
        small_writer.apply_changes(target, {}, [], state.source_position, state)
    redis_client.delete(small_writer.registry.target_key(second))

    def gc(targets: list[Target] | None) -> Any:
        return collect_garbage(
            small_writer.store,
            small_writer.registry,
            settings.s3.prefix,
            0,
            targets=targets,
            now=time.time() + 5,
        )

    # Redis lost the second target: whether a reader may still need the pack is unknown.
    assert gc(None).packs == 0 and _packs(small_writer) == [pack]
    reindex(small_writer.registry, small_writer.store, small_writer.root)
    # Only the first target examined: the second's part of the pack is not its to judge.
    assert gc([first]).packs == 0
    assert gc(None).packs == 1 and _packs(small_writer) == []
