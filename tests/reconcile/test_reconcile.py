"""Reconciliation against the real stack: drift made on purpose is found and repaired.

Each test bootstraps a 300-row target in six segments, breaks it one way, reconciles, and
checks the outcome, what was written, and that the snapshot then equals the database.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr
from reconcile_helpers import (
    ROWS,
    SEGMENT_ROWS,
    assert_snapshot_equals_database,
    change_rows,
    database_rows,
    snapshot_rows,
)

from bootstrap import reconcile
from bootstrap.bench import seed_target
from bootstrap.bisection import RangeSum
from bootstrap.reconcile import ReconcileOptions, Reconciler
from bootstrap.reconcile_report import (
    BY_BOOTSTRAP,
    BY_REINDEX,
    BY_SEGMENTS,
    DRIFT,
    EXIT_DRIFT,
    EXIT_IN_SYNC,
    FAILED,
    IN_SYNC,
    REPAIRED,
    TargetReport,
)
from bootstrap.snapshot import bootstrap_target
from schemas.datasets import Target, get_dataset
from snapshots import _container
from snapshots import keys as object_keys
from snapshots.manifest import FORMAT_VERSION, SegmentEntry, SourcePosition
from snapshots.publish import DeltaPublish, SnapshotWriter
from snapshots.segments import META_BLOCKS, encode_segment, iter_segment_rows
from storage_builder.errors import SourceError
from storage_builder.settings import Settings

CONSUMER_OFFSETS = {"sb.public.raw_data:3": 41_000}


def _move_offsets_past(writer: SnapshotWriter, target: Target) -> None:
    """Publish the same segments with the consumer's offsets far ahead, as if it had
    streamed past changes it never applied."""
    state = writer.registry.get(target)
    assert state is not None
    manifest = writer.load_manifest(state, target)
    position = SourcePosition(
        pg_snapshot=state.source_position.pg_snapshot, offsets=CONSUMER_OFFSETS
    )
    writer.publish(target, state.version, manifest.segments, position)


def _version(writer: SnapshotWriter, target: Target) -> int:
    state = writer.registry.get(target)
    assert state is not None
    return state.version


def _segment(writer: SnapshotWriter, target: Target, index: int) -> SegmentEntry:
    """The manifest entry of the target's published segment ``index``."""
    state = writer.registry.get(target)
    assert state is not None
    return writer.load_manifest(state, target).segments[index]


def test_a_target_in_sync_reads_no_segment_and_writes_nothing(
    bootstrapped: Target, reconciler: Reconciler, writer: SnapshotWriter
) -> None:
    version = _version(writer, bootstrapped)
    read: list[str] = []
    get = reconciler.store.get

    def recording_get(key: str) -> bytes:
        read.append(key)
        return get(key)

    reconciler.store.get = recording_get  # type: ignore[method-assign]

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.rows, target.segments_read) == (IN_SYNC, ROWS, 0)
    assert [key for key in read if "/segments/" in key] == []
    assert reconciler.store.bytes_written == 0
    assert _version(writer, bootstrapped) == version
    assert report.exit_code == EXIT_IN_SYNC


def test_rows_changed_behind_the_consumers_offsets_are_repaired_in_place(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
) -> None:
    _move_offsets_past(writer, bootstrapped)
    client = bootstrapped.client_id
    # Keys 12, 13 and 14 share the first segment (1-50), 120 is in the third, 280 and the
    # new 5000 in the last (251 on); 120 is deleted and inserted again with other values.
    change_rows(pg, client, [12, 280])
    pg.execute("DELETE FROM raw_data WHERE client_id = %s AND id IN (13, 14)", [client])
    pg.execute(
        "INSERT INTO raw_data (id, client_id, entity_id, data_item_id, period, value, currency, "
        "recorded_at) VALUES (5000, %s, 1, 2, '2024-02-29', NULL, NULL, now())",
        [client],
    )
    pg.execute("DELETE FROM raw_data WHERE client_id = %s AND id = 120", [client])
    pg.execute(
        "INSERT INTO raw_data (id, client_id, entity_id, data_item_id, period, value, currency, "
        "recorded_at) VALUES (120, %s, 9, 9, '1999-12-31', -0.000001, 'é€', now())",
        [client],
    )
    version = _version(writer, bootstrapped)

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.method) == (REPAIRED, BY_SEGMENTS)
    assert (target.rows_added, target.rows_changed, target.rows_removed) == (1, 3, 2)
    # Segments 1-50, 101-150 and 251-: three of six, the others are carried over.
    assert target.segments_rewritten == 3
    assert target.segments_read == 3
    assert report.exit_code == EXIT_DRIFT
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)

    state = writer.registry.get(bootstrapped)
    assert state is not None and state.version == version + 1
    assert state.source_position.offsets == CONSUMER_OFFSETS

    again = reconciler.run([bootstrapped])
    assert again.targets[0].outcome == IN_SYNC


def test_a_deleted_segment_object_is_found_without_reading_and_rebuilt(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
) -> None:
    segment = _segment(writer, bootstrapped, 2)
    writer.store.delete_many([segment.key])

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.method) == (REPAIRED, BY_BOOTSTRAP)
    assert segment.key in (target.reason or "") and "missing" in (target.reason or "")
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)
    assert reconciler.run([bootstrapped]).targets[0].outcome == IN_SYNC


def test_a_drifted_segment_whose_object_is_gone_is_rebuilt_as_missing(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
) -> None:
    # Its sums differ, so it is read without waiting for the check of every object; the
    # read fails, and the reason is the check's: the object is missing.
    segment = _segment(writer, bootstrapped, 2)
    change_rows(pg, bootstrapped.client_id, [120])
    writer.store.delete_many([segment.key])

    target = reconciler.run([bootstrapped]).targets[0]

    assert (target.outcome, target.method) == (REPAIRED, BY_BOOTSTRAP)
    assert segment.key in (target.reason or "") and "missing" in (target.reason or "")
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


@pytest.mark.parametrize("named", ["first", "last"])
def test_a_deleted_segment_is_found_among_superseded_objects_named_around_it(
    named: str,
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
) -> None:
    # A second bootstrap leaves the first one's segments behind, named before its own; an
    # upload that lost its publish leaves one named after them. The target's LIST spans only
    # the names its manifest holds, so the first and the last of them are its edges.
    bootstrap_target(bootstrapped, small_settings, force=True, writer=writer)
    writer.store.put(object_keys.segment_key(writer.root, bootstrapped), b"never published")
    state = writer.registry.get(bootstrapped)
    assert state is not None
    names = sorted(segment.key for segment in writer.load_manifest(state, bootstrapped).segments)
    deleted = names[0] if named == "first" else names[-1]
    writer.store.delete_many([deleted])

    target = reconciler.run([bootstrapped]).targets[0]

    assert (target.outcome, target.method) == (REPAIRED, BY_BOOTSTRAP)
    assert deleted in (target.reason or "") and "missing" in (target.reason or "")
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


def test_a_segment_with_an_extra_row_loses_it(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
) -> None:
    # A published segment holding a row the database never had (a delete that was lost).
    extra = dict(database_rows(pg, bootstrapped)[60], id=10_000, row_version=1)
    state = writer.registry.get(bootstrapped)
    assert state is not None
    writer.apply_changes(bootstrapped, {10_000: extra}, [], state.source_position, expected=state)
    assert len(snapshot_rows(small_settings, bootstrapped)) == ROWS + 1

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.method) == (REPAIRED, BY_SEGMENTS)
    assert (target.rows_added, target.rows_changed, target.rows_removed) == (0, 0, 1)
    assert target.segments_rewritten == 1
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


def test_a_segment_object_that_does_not_match_its_manifest_is_rebuilt(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
) -> None:
    # The object under a published key is replaced by one holding an extra row.
    segment = _segment(writer, bootstrapped, 1)
    rows = list(iter_segment_rows(writer.store.get(segment.key)))
    rows.insert(1, dict(rows[0], id=rows[0]["id"] + 1_000_000_000, row_version=1))
    rows.sort(key=lambda row: row["id"])
    forged = encode_segment(
        get_dataset("raw_data"), rows, codec="null", block_rows=10, client_id=bootstrapped.client_id
    )
    writer.store.put(segment.key, forged.data)

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.method) == (REPAIRED, BY_BOOTSTRAP)
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


def _misstated_header(data: bytes, delta: int) -> bytes:
    """The segment with its first block's checksum in the header raised by ``delta`` and
    its second's lowered as much: the same total, the same size, the same rows."""
    container = _container.parse(data)
    blocks = json.loads(container.metadata[META_BLOCKS])
    blocks[0][3] = str(int(blocks[0][3]) + delta)
    blocks[1][3] = str(int(blocks[1][3]) - delta)
    described = json.dumps(blocks, separators=(",", ":")).encode()
    metadata = dict(container.metadata, **{META_BLOCKS: described})
    body = b"".join(block.raw for block in container.blocks)
    return _container.build_header(metadata, container.sync) + body


def test_a_segment_header_that_misstates_a_block_checksum_is_rebuilt(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
) -> None:
    # The header's account of two blocks is wrong though their rows are right, which a
    # repair in place would carry over forever; a row of another block of the segment has
    # drifted, so that the segment is compared block by block.
    segment = _segment(writer, bootstrapped, 2)
    data = writer.store.get(segment.key)
    candidates = (_misstated_header(data, delta) for delta in range(1, 100))
    forged = next(candidate for candidate in candidates if len(candidate) == len(data))
    writer.store.put(segment.key, forged)
    drifted = segment.min_key + 35
    change_rows(pg, bootstrapped.client_id, [drifted])

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.method) == (REPAIRED, BY_BOOTSTRAP)
    assert "misstates the checksum" in (target.reason or "")
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)
    assert reconciler.run([bootstrapped]).targets[0].outcome == IN_SYNC


def test_a_manifest_of_the_earlier_checksum_format_is_rebuilt_in_the_current_one(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
) -> None:
    # A snapshot written before the row hash changed: its checksums mean nothing now.
    state = writer.registry.get(bootstrapped)
    assert state is not None
    manifest = writer.load_manifest(state, bootstrapped)
    writer.publish(
        bootstrapped, state.version, manifest.segments, manifest.source_position, format_version=1
    )

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.method) == (REPAIRED, BY_BOOTSTRAP)
    assert "of format 1" in (target.reason or "")
    state = writer.registry.get(bootstrapped)
    assert state is not None
    assert writer.load_manifest(state, bootstrapped).format_version == FORMAT_VERSION
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


def test_a_deleted_manifest_falls_back_to_a_bootstrap(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
) -> None:
    change_rows(pg, bootstrapped.client_id, [7])
    state = writer.registry.get(bootstrapped)
    assert state is not None
    writer.store.delete_many([state.manifest_key])

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.method) == (REPAIRED, BY_BOOTSTRAP)
    assert state.manifest_key in (target.reason or "")
    assert _version(writer, bootstrapped) == state.version + 1
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


def test_a_flushed_registry_is_rebuilt_from_s3_before_comparing(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
) -> None:
    before = writer.registry.get(bootstrapped)
    change_rows(pg, bootstrapped.client_id, [77])
    client = writer.registry.client
    client.delete(*client.keys(small_settings.redis.key_prefix + "*"))
    assert writer.registry.get(bootstrapped) is None

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert target.registry_rebuilt
    assert (target.outcome, target.method, target.rows_changed) == (REPAIRED, BY_SEGMENTS, 1)
    assert before is not None and target.version_before == before.version
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)
    assert list(writer.registry.targets()) == [bootstrapped]


def test_a_flushed_registry_alone_counts_as_repaired(
    bootstrapped: Target, reconciler: Reconciler, writer: SnapshotWriter, small_settings: Settings
) -> None:
    client = writer.registry.client
    client.delete(*client.keys(small_settings.redis.key_prefix + "*"))

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.method, target.drift_rows) == (REPAIRED, BY_REINDEX, 0)
    assert report.exit_code == EXIT_DRIFT
    assert writer.registry.get(bootstrapped) is not None


def test_a_dry_run_reports_drift_and_writes_nothing(
    bootstrapped: Target, pg: psycopg.Connection, small_settings: Settings, writer: SnapshotWriter
) -> None:
    before = snapshot_rows(small_settings, bootstrapped)
    version = _version(writer, bootstrapped)
    pg.execute("DELETE FROM raw_data WHERE client_id = %s AND id = 200", [bootstrapped.client_id])

    with Reconciler(small_settings, ReconcileOptions(dry_run=True)) as reconciler:
        report = reconciler.run([bootstrapped])
        written = reconciler.store.bytes_written

    target = report.targets[0]
    assert (target.outcome, target.rows_removed) == (DRIFT, 1)
    assert report.exit_code == EXIT_DRIFT
    assert written == 0
    assert _version(writer, bootstrapped) == version
    assert snapshot_rows(small_settings, bootstrapped) == before


def test_a_target_without_a_snapshot_is_bootstrapped(
    target: Target, pg: psycopg.Connection, reconciler: Reconciler, small_settings: Settings
) -> None:
    report = reconciler.run([target])

    result = report.targets[0]
    assert (result.outcome, result.method, result.rows) == (REPAIRED, BY_BOOTSTRAP, ROWS)
    assert_snapshot_equals_database(pg, small_settings, target)


def test_a_target_whose_rows_were_all_deleted_is_emptied(
    bootstrapped: Target, pg: psycopg.Connection, reconciler: Reconciler, small_settings: Settings
) -> None:
    pg.execute("DELETE FROM raw_data WHERE client_id = %s", [bootstrapped.client_id])

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.rows_removed) == (REPAIRED, ROWS)
    assert snapshot_rows(small_settings, bootstrapped) == []


def test_a_target_empty_on_both_sides_is_in_sync(client_id: int, reconciler: Reconciler) -> None:
    report = reconciler.run([Target("formulas", client_id)])

    assert report.targets[0].outcome == IN_SYNC
    assert reconciler.store.bytes_written == 0


def test_a_publish_racing_the_repair_is_never_overwritten(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = bootstrapped.client_id
    change_rows(pg, client, [30])
    apply_changes = reconciler.writer.apply_changes
    raced: list[int] = []

    def consumer_publishes_first(target, upserts, deletes, position, expected, **options):
        if not raced:
            # The consumer applies a change of its own and publishes, with a newer offset,
            # between the reconciliation's comparison and its publish.
            change_rows(pg, client, [31], "XAU")
            row = next(r for r in database_rows(pg, target) if r["id"] == 31)
            moved = SourcePosition(offsets={"sb.public.raw_data:0": 99})
            result = writer.apply_changes(target, {31: row}, [], moved, expected=expected)
            raced.append(result.manifest.version)
        return apply_changes(target, upserts, deletes, position, expected, **options)

    monkeypatch.setattr(reconciler.writer, "apply_changes", consumer_publishes_first)

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.attempts, target.rows_changed) == (REPAIRED, 2, 1)
    assert target.version_after == raced[0] + 1
    state = writer.registry.get(bootstrapped)
    assert state is not None
    assert state.source_position.offsets == {"sb.public.raw_data:0": 99}
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


def test_rows_that_change_during_the_grace_period_are_left_to_the_consumer(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    small_settings: Settings,
) -> None:
    client = bootstrapped.client_id
    change_rows(pg, client, [3, 4])
    first = TargetReport(bootstrapped)
    seen = reconciler.reconcile_target(bootstrapped, first, repair=False)
    assert first.outcome == DRIFT and seen is not None and sorted(seen) == [3, 4]

    # Row 4 changes again: a change still on its way through the stream, not drift.
    change_rows(pg, client, [4], "XAG")
    second = TargetReport(bootstrapped)
    reconciler.reconcile_target(bootstrapped, second, repair=True, confirm=seen)

    assert (second.outcome, second.rows_changed, second.rows_in_flight) == (REPAIRED, 1, 1)
    snapshot = {row["id"]: row for row in snapshot_rows(small_settings, bootstrapped)}
    database = {row["id"]: row for row in database_rows(pg, bootstrapped)}
    assert snapshot[3] == database[3]
    assert snapshot[4] != database[4]


def test_bisection_narrows_to_the_rows_in_a_large_segment(
    target: Target, pg: psycopg.Connection, settings: Settings, writer: SnapshotWriter
) -> None:
    pg.execute("DELETE FROM raw_data WHERE client_id = %s", [target.client_id])
    seed_target(pg, target, 20_000)
    bootstrap_target(target, settings)
    change_rows(pg, target.client_id, [5, 17777])

    with Reconciler(settings, ReconcileOptions(parallel=1)) as reconciler:
        report = reconciler.run([target])

    result = report.targets[0]
    assert (result.outcome, result.rows_changed, result.segments_rewritten) == (REPAIRED, 2, 1)
    assert_snapshot_equals_database(pg, settings, target)


def test_segments_are_small_enough_to_tell_rewrites_apart(
    bootstrapped: Target, writer: SnapshotWriter
) -> None:
    state = writer.registry.get(bootstrapped)
    assert state is not None
    segments = writer.load_manifest(state, bootstrapped).segments
    assert len(segments) == ROWS // SEGMENT_ROWS


def test_a_dry_run_reports_a_flushed_registry_without_rebuilding_it(
    bootstrapped: Target, small_settings: Settings, writer: SnapshotWriter
) -> None:
    client = writer.registry.client
    client.delete(*client.keys(small_settings.redis.key_prefix + "*"))

    with Reconciler(small_settings, ReconcileOptions(dry_run=True)) as reconciler:
        report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.method, target.rows) == (DRIFT, BY_REINDEX, ROWS)
    assert writer.registry.get(bootstrapped) is None


def test_a_large_target_compared_in_two_halves_finds_the_same_drift(
    bootstrapped: Target,
    pg: psycopg.Connection,
    small_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    halves: list[tuple[bool, int]] = []
    stream_sums = reconcile._stream_sums

    def recording(*args: Any) -> None:
        halves.append((args[1] is not None, len(args[3])))  # (imports the snapshot, ranges)
        stream_sums(*args)

    monkeypatch.setattr(reconcile, "_stream_sums", recording)
    client = bootstrapped.client_id
    # Key 20 is in the lower half of the target's blocks, 290 in the upper half.
    change_rows(pg, client, [20, 290])

    options = ReconcileOptions(parallel=2, split_rows=ROWS - 1)
    with Reconciler(small_settings, options) as reconciler:
        report = reconciler.run([bootstrapped])
        again = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.method, target.rows_changed) == (REPAIRED, BY_SEGMENTS, 2)
    assert target.segments_rewritten == 2
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)
    assert again.targets[0].outcome == IN_SYNC
    # 6 segments of 5 blocks: the upper three went to the second connection, each run.
    assert sorted(halves) == [(False, 15), (False, 15), (True, 15), (True, 15)]


def test_block_sums_complete_a_segment_only_when_all_its_blocks_arrived() -> None:
    one = RangeSum(1, 1)
    # Segments of 2, 3 and 1 blocks; the first two summed on one connection, the last on
    # the other, each half arriving in key order and in batches of any size.
    arrivals = reconcile._Arrivals([[(None, 1)] * 2, [(1, 2)] * 3, [(2, None)]], [(0, 2), (2, 3)])

    assert arrivals.add(0, [one]) == []
    assert arrivals.add(1, [one]) == [2]
    assert arrivals.add(0, [one, one]) == [0]
    assert arrivals.add(0, [one, one]) == [1]
    assert arrivals.of(1) == [one, one, one] and arrivals.rows == 6


@pytest.mark.parametrize("split_rows", [ROWS - 1, 200_000], ids=["two halves", "one query"])
def test_drift_wider_than_the_repair_limit_is_rebuilt_not_bisected(
    split_rows: int,
    bootstrapped: Target,
    pg: psycopg.Connection,
    small_settings: Settings,
) -> None:
    # Four of the six 50-row segments differ: 200 rows to compare, over half the target.
    keys = [10, 60, 110, 160]
    change_rows(pg, bootstrapped.client_id, keys)

    options = ReconcileOptions(parallel=2, split_rows=split_rows, max_repair_rows=100)
    with Reconciler(small_settings, options) as reconciler:
        target = reconciler.run([bootstrapped]).targets[0]

    assert (target.outcome, target.method) == (REPAIRED, BY_BOOTSTRAP)
    assert "4 of 6 segments differ, holding 200 rows" in (target.reason or "")
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


@pytest.mark.parametrize("split_rows", [ROWS - 1, 200_000], ids=["two halves", "one query"])
def test_drift_past_the_repair_limit_in_a_small_share_of_the_target_is_repaired_in_place(
    split_rows: int,
    bootstrapped: Target,
    pg: psycopg.Connection,
    small_settings: Settings,
) -> None:
    # Two segments differ: 100 rows to compare, over the limit of 60 but a third of the
    # target, so the segment held back until every sum is in is read after all.
    change_rows(pg, bootstrapped.client_id, [10, 160])

    options = ReconcileOptions(parallel=2, split_rows=split_rows, max_repair_rows=60)
    with Reconciler(small_settings, options) as reconciler:
        target = reconciler.run([bootstrapped]).targets[0]

    assert (target.outcome, target.method) == (REPAIRED, BY_SEGMENTS)
    assert (target.rows_changed, target.segments_read, target.segments_rewritten) == (2, 2, 2)
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


def test_a_half_whose_sums_fail_fails_the_target_and_the_next_run_recovers(
    bootstrapped: Target,
    pg: psycopg.Connection,
    small_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    change_rows(pg, bootstrapped.client_id, [290])
    stream = reconcile.stream_range_sums

    def cut_off(
        conn: psycopg.Connection, target: Target, ranges: list[Any], **kwargs: Any
    ) -> Iterator[Any]:
        with contextlib.closing(stream(conn, target, ranges, batch=4)) as sums:
            yield next(sums)
            if ranges[0][0] is not None:  # the upper half, after its first sums
                raise psycopg.OperationalError("connection cut while summing")
            yield from sums

    monkeypatch.setattr(reconcile, "stream_range_sums", cut_off)
    options = ReconcileOptions(parallel=2, split_rows=ROWS - 1)
    with Reconciler(small_settings, options) as reconciler:
        failed = reconciler.run([bootstrapped]).targets[0]
        monkeypatch.setattr(reconcile, "stream_range_sums", stream)
        again = reconciler.run([bootstrapped]).targets[0]

    assert failed.outcome == FAILED
    assert "connection cut while summing" in (failed.reason or "")
    assert (again.outcome, again.method, again.rows_changed) == (REPAIRED, BY_SEGMENTS, 1)
    assert again.attempts == 1
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


def test_a_listed_dataset_still_sees_segments_written_after_its_listing(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconcile, "_LIST_DATASET_FROM", 1)
    list_datasets = reconciler._list_datasets

    def list_then_publish(targets: list[Target]) -> None:
        list_datasets(targets)
        assert reconciler._listed["raw_data"], "the dataset was not listed"
        # A publish the run's listing cannot know: the consumer rewriting a segment.
        state = writer.registry.get(bootstrapped)
        assert state is not None
        writer.apply_changes(bootstrapped, {}, [7], state.source_position, expected=state)
        pg.execute("DELETE FROM raw_data WHERE client_id = %s AND id = 7", [bootstrapped.client_id])

    monkeypatch.setattr(reconciler, "_list_datasets", list_then_publish)

    report = reconciler.run([bootstrapped])

    assert report.targets[0].outcome == IN_SYNC, report.targets[0].reason


def test_a_listed_dataset_still_finds_a_deleted_segment_object(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconcile, "_LIST_DATASET_FROM", 1)
    segment = _segment(writer, bootstrapped, 4)
    writer.store.delete_many([segment.key])

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert reconciler._listed["raw_data"], "the dataset was not listed"
    assert (target.outcome, target.method) == (REPAIRED, BY_BOOTSTRAP)
    assert segment.key in (target.reason or "") and "missing" in (target.reason or "")
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)


def _publish_as_delta(
    writer: SnapshotWriter, pg: psycopg.Connection, target: Target, changed: list[int]
) -> None:
    """Publish the database's current rows of ``changed`` keys as a delta, as the consumer
    does (a key gone from the database is deleted)."""
    state = writer.registry.get(target)
    assert state is not None
    rows = {row["id"]: row for row in database_rows(pg, target) if row["id"] in changed}
    deletes = [key for key in changed if key not in rows]
    item = DeltaPublish(
        target, state, writer.load_manifest(state, target), rows, deletes, state.source_position
    )
    [result] = writer.publish_deltas([item])
    assert not isinstance(result, Exception), result


def test_a_target_with_deltas_in_sync_is_compared_folded_and_writes_nothing(
    bootstrapped: Target, pg: psycopg.Connection, reconciler: Reconciler, writer: SnapshotWriter
) -> None:
    client = bootstrapped.client_id
    change_rows(pg, client, [60])
    pg.execute("DELETE FROM raw_data WHERE client_id = %s AND id = 61", [client])
    _publish_as_delta(writer, pg, bootstrapped, [60, 61])
    version = _version(writer, bootstrapped)

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.rows, target.segments_read) == (IN_SYNC, ROWS - 1, 0)
    assert reconciler.store.bytes_written == 0
    assert _version(writer, bootstrapped) == version


def test_drift_under_deltas_is_repaired_with_the_deltas_folded_in(
    bootstrapped: Target,
    pg: psycopg.Connection,
    reconciler: Reconciler,
    writer: SnapshotWriter,
    small_settings: Settings,
) -> None:
    client = bootstrapped.client_id
    change_rows(pg, client, [60, 160])
    _publish_as_delta(writer, pg, bootstrapped, [60, 160])
    # Drift the consumer never saw: in one segment the delta touched (51-100), and in one
    # it did not (201-250). The other folded segment (151-200) is uploaded by the repair.
    change_rows(pg, client, [70, 210], "XAU")

    report = reconciler.run([bootstrapped])

    target = report.targets[0]
    assert (target.outcome, target.method, target.rows_changed) == (REPAIRED, BY_SEGMENTS, 2)
    assert_snapshot_equals_database(pg, small_settings, bootstrapped)
    state = writer.registry.get(bootstrapped)
    assert state is not None and "#" not in state.manifest_key
    assert writer.load_manifest(state, bootstrapped).deltas == []
    assert reconciler.run([bootstrapped]).targets[0].outcome == IN_SYNC


def test_a_wrong_database_address_fails_the_run_once_naming_the_setting(
    bootstrapped: Target, small_settings: Settings
) -> None:
    # Port 1 on loopback: nothing listens there, so connecting is refused at once.
    postgres = small_settings.postgres.model_copy(
        update={"dsn": SecretStr("postgresql://storage_builder@127.0.0.1:1/storage_builder")}
    )
    settings = small_settings.model_copy(update={"postgres": postgres})
    done: list[TargetReport] = []

    with (
        Reconciler(settings, ReconcileOptions(parallel=3)) as broken,
        pytest.raises(SourceError, match=r"postgres\.dsn"),
    ):
        broken.run([bootstrapped], on_done=done.append)

    assert done == []
    assert broken.store.requests == 0
