"""Publishing against the stack: the order segments, manifest, compare-and-set; fencing of
stale writers; failures of S3 or Redis in the middle leave the previous snapshot intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from pydantic import SecretStr
from settings_file import write_settings

from schemas.datasets import DATASETS, Target
from snapshots import keys as object_keys
from snapshots.checksums import row_hash
from snapshots.manifest import SourcePosition
from snapshots.publish import SnapshotWriter
from snapshots.reader import open_snapshot
from snapshots.registry import TargetState, VersionRegistry
from storage_builder.errors import (
    InvalidTargetError,
    ObjectStoreError,
    PublishConflict,
    RegistryError,
)
from storage_builder.settings import Settings

RAW = DATASETS["raw_data"]
POSITION = SourcePosition(pg_snapshot=None, offsets={"sb.public.raw_data:2": 17})


def _manifest_keys(writer: SnapshotWriter, target: Target) -> list[str]:
    prefix = object_keys.target_prefix(writer.root, target) + object_keys.MANIFESTS
    return [info.key for info in writer.store.list(prefix)]


def _current(writer: SnapshotWriter, target: Target) -> TargetState:
    state = writer.registry.get(target)
    assert state is not None
    return state


def _rows(settings: Settings, target: Target) -> list[dict[str, Any]]:
    with open_snapshot(target.dataset, target.client_id, settings) as snapshot:
        return list(snapshot)


def test_a_published_snapshot_reads_back_exactly(
    small_writer: SnapshotWriter, seed: Any, settings: Settings, target: Target, make_row: Any
) -> None:
    manifest = seed(target, list(range(1, 48)))

    assert manifest.version == 1 and manifest.rows == 47
    assert [s.rows for s in manifest.segments] == [20, 20, 7]
    assert [(s.lo, s.hi) for s in manifest.segments] == [(None, 21), (21, 41), (41, None)]
    assert manifest.checksum == sum(row_hash(k, 1) for k in range(1, 48))
    state = small_writer.registry.get(target)
    assert state is not None and state.version == 1
    assert state.manifest_key == _manifest_keys(small_writer, target)[0]
    expected = [make_row(RAW, key, target.client_id) for key in range(1, 48)]
    assert _rows(settings, target) == expected


def test_a_stale_writer_cannot_publish_and_its_manifest_is_removed(
    writer: SnapshotWriter, seed: Any, settings: Settings, target: Target
) -> None:
    seed(target, [1, 2, 3])
    other = SnapshotWriter.from_settings(settings)
    entries = writer.load_manifest(_current(writer, target), target).segments
    put = writer.store.put

    def put_then_lose_the_race(key: str, data: bytes) -> None:
        put(key, data)
        if "/manifests/" in key:
            # Another writer publishes version 2 between our manifest and our compare-and-set.
            other.publish(target, 1, entries, POSITION)

    writer.store.put = put_then_lose_the_race  # type: ignore[method-assign]
    with pytest.raises(PublishConflict, match="expected version 1 but the registry holds 2"):
        writer.publish(target, 1, entries, POSITION)

    state = writer.registry.get(target)
    assert state is not None and state.version == 2
    versions = [object_keys.manifest_version(key) for key in _manifest_keys(writer, target)]
    assert versions == [1, 2]  # the loser's version-2 manifest is gone
    with pytest.raises(PublishConflict, match="expected version 1 but the registry holds 2"):
        other.publish(target, 1, entries, POSITION)
    other.close()


def _fail_puts_after(writer: SnapshotWriter, successes: int, match: str) -> None:
    """Make S3 refuse connections for every PutObject whose key contains ``match``
    once ``successes`` of them went through (a botocore event hook, below the retries)."""
    seen = {"count": 0}

    def hook(params: dict[str, Any], **_: Any) -> None:
        if match in params["Key"]:
            seen["count"] += 1
            if seen["count"] > successes:
                raise botocore.exceptions.EndpointConnectionError(endpoint_url="s3://injected")

    writer.store.client.meta.events.register("before-parameter-build.s3.PutObject", hook)


@pytest.mark.parametrize(("successes", "match"), [(1, "/segments/"), (0, "/manifests/")])
def test_s3_failing_mid_publish_leaves_the_previous_snapshot(
    small_writer: SnapshotWriter,
    seed: Any,
    settings: Settings,
    target: Target,
    make_row: Any,
    successes: int,
    match: str,
) -> None:
    seed(target, list(range(1, 30)))
    before = _rows(settings, target)
    _fail_puts_after(small_writer, successes, match)

    with pytest.raises(ObjectStoreError, match="cannot reach"):
        seed(target, list(range(1, 60)), version=2, expected=1)

    state = small_writer.registry.get(target)
    assert state is not None and state.version == 1
    assert [object_keys.manifest_version(k) for k in _manifest_keys(small_writer, target)] == [1]
    assert _rows(settings, target) == before


def test_redis_unreachable_publishes_nothing(
    writer: SnapshotWriter, seed: Any, settings: Settings, target: Target
) -> None:
    seed(target, [1, 2, 3])
    broken = settings.redis.model_copy(update={"url": SecretStr("redis://:pw@127.0.0.1:1/0")})
    cut_off = SnapshotWriter(writer.store, VersionRegistry(broken), writer.snapshot, writer.root)
    entries = writer.load_manifest(_current(writer, target), target).segments

    with pytest.raises(RegistryError, match="127.0.0.1:1"):
        cut_off.publish(target, 1, entries, POSITION)

    state = writer.registry.get(target)
    assert state is not None and state.version == 1
    assert len(_manifest_keys(writer, target)) == 1
    cut_off.close()


def test_apply_changes_rewrites_only_the_touched_segment(
    small_writer: SnapshotWriter, seed: Any, settings: Settings, target: Target, make_row: Any
) -> None:
    first = seed(target, list(range(1, 61)))  # three segments of 20
    state = _current(small_writer, target)
    upserts = {k: make_row(RAW, k, target.client_id, version=2) for k in (25, 26)}

    result = small_writer.apply_changes(target, upserts, [30], POSITION, state)

    assert result.segments_rewritten == 1
    assert result.manifest.version == 2
    assert result.manifest.source_position == POSITION
    before, after = first.segments, result.manifest.segments
    assert [after[0].key, after[2].key] == [before[0].key, before[2].key]
    assert after[1].key != before[1].key and after[1].rows == 19
    expected = [make_row(RAW, k, target.client_id, 2 if k in upserts else 1) for k in range(1, 61)]
    expected = [row for row in expected if row["id"] != 30]
    assert _rows(settings, target) == expected
    assert result.bytes_written > after[1].bytes  # the segment plus the manifest


def test_apply_changes_splits_and_merges_keeping_ranges_contiguous(
    small_writer: SnapshotWriter, seed: Any, settings: Settings, target: Target, make_row: Any
) -> None:
    seed(target, list(range(10, 70)))  # [None,30) [30,50) [50,None)
    inserts = {k: make_row(RAW, k, target.client_id) for k in range(-30, 10)}  # first: 60 rows
    deletes = list(range(30, 50))  # the middle segment empties
    state = _current(small_writer, target)

    manifest = small_writer.apply_changes(target, inserts, deletes, POSITION, state).manifest

    assert all(segment.rows <= 20 for segment in manifest.segments)
    assert manifest.segments[0].lo is None and manifest.segments[-1].hi is None
    for left, right in zip(manifest.segments, manifest.segments[1:], strict=False):
        assert left.hi == right.lo
    keys = [row["id"] for row in _rows(settings, target)]
    assert keys == [k for k in range(-30, 70) if not 30 <= k < 50]
    assert manifest.segments[manifest.segment_index(40)].max_key < 50  # the gap was merged


def test_apply_changes_on_an_empty_target_creates_its_first_segments(
    small_writer: SnapshotWriter, seed: Any, settings: Settings, target: Target, make_row: Any
) -> None:
    seed(target, [])
    state = small_writer.registry.get(target)
    assert state is not None
    upserts = {k: make_row(RAW, k, target.client_id) for k in range(5, 30)}
    manifest = small_writer.apply_changes(target, upserts, [], POSITION, state).manifest
    assert manifest.rows == 25 and len(manifest.segments) == 2
    assert [row["id"] for row in _rows(settings, target)] == list(range(5, 30))


def test_rows_of_another_client_never_reach_a_snapshot(
    writer: SnapshotWriter, seed: Any, target: Target, make_row: Any
) -> None:
    seed(target, [1, 2])
    state = writer.registry.get(target)
    assert state is not None
    stranger = {3: make_row(RAW, 3, client_id=target.client_id + 1)}
    with pytest.raises(InvalidTargetError, match="refused"):
        writer.apply_changes(target, stranger, [], POSITION, state)
    assert writer.registry.get(target) == state


def test_segments_of_another_target_are_refused_in_a_manifest(
    writer: SnapshotWriter, seed: Any, target: Target
) -> None:
    manifest = seed(target, [1, 2])
    other = Target("raw_data", target.client_id + 1)
    with pytest.raises(InvalidTargetError, match="is not a segment or manifest below"):
        writer.publish(other, None, manifest.segments, POSITION)


_CRASHING_PUBLISH = """
import sys
from schemas.datasets import Target, get_dataset
from snapshots.manifest import SourcePosition
from snapshots.publish import SnapshotWriter
from snapshots.reader import open_snapshot
from snapshots.segments import encode_segments
from storage_builder.settings import load_settings

settings = load_settings(sys.argv[1])
writer = SnapshotWriter.from_settings(settings)
target = Target("raw_data", int(sys.argv[2]))
state = writer.registry.get(target)
with open_snapshot(target.dataset, target.client_id, settings) as snapshot:
    rows = list(snapshot)
encoded = encode_segments(
    get_dataset("raw_data"), rows, codec="zstandard", block_rows=2, max_rows=2
)
entries = writer.upload_segments(target, encoded)
writer.publish(target, state.version, entries, SourcePosition(offsets={"t:0": 99}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_segments", "after_manifest", "after_registry"])
def test_a_crash_at_any_point_leaves_one_complete_snapshot(
    writer: SnapshotWriter,
    seed: Any,
    settings: Settings,
    target: Target,
    tmp_path: Path,
    point: str,
) -> None:
    seed(target, [1, 2, 3])
    config_file = write_settings(settings, tmp_path / "services.toml")
    result = subprocess.run(
        [sys.executable, "-c", _CRASHING_PUBLISH, str(config_file), str(target.client_id)],
        env={"SB_CRASH_AT": point, "PATH": ""},
        capture_output=True,
        timeout=60,
    )
    state = writer.registry.get(target)
    assert state is not None

    assert result.returncode == -9, result.stderr.decode()
    assert state.version == (2 if point == "after_registry" else 1)
    # Whatever the crash left, the next writer publishes on top of the registry's version.
    manifest = writer.load_manifest(state, target)
    writer.publish(target, state.version, manifest.segments, POSITION)
    assert [row["id"] for row in _rows(settings, target)] == [1, 2, 3]
