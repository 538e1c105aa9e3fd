"""Reading snapshots: exact values in key order, and refusal of anything not the target's."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.datasets import DATASETS, Target
from snapshots import keys as object_keys
from snapshots.manifest import SourcePosition
from snapshots.publish import SnapshotWriter
from snapshots.reader import open_snapshot
from snapshots.segments import encode_segment
from storage_builder.errors import InvalidTargetError, SnapshotFormatError, SnapshotNotFoundError
from storage_builder.settings import Settings


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_rows_come_back_exactly_in_key_order(
    small_writer: SnapshotWriter,
    seed: Any,
    make_row: Any,
    settings: Settings,
    client_id: int,
    name: str,
) -> None:
    target = Target(name, client_id)
    keys = [9, 1, 2**33, 33, 7, 8, 100, *range(200, 230)]
    seed(target, keys)
    with open_snapshot(name, str(client_id), settings) as snapshot:
        rows = list(snapshot)
    assert rows == [make_row(name, key, client_id) for key in sorted(keys)]


def test_a_target_without_snapshot_says_so(settings: Settings, client_id: int) -> None:
    with pytest.raises(SnapshotNotFoundError, match="has no snapshot"):
        open_snapshot("entities", client_id, settings)


def test_rows_of_another_client_inside_a_segment_are_refused(
    writer: SnapshotWriter, make_row: Any, settings: Settings, target: Target
) -> None:
    dataset = DATASETS[target.dataset]
    smuggled = encode_segment(
        dataset,
        [make_row(dataset, 1, client_id=target.client_id + 1)],
        codec="null",
        block_rows=10,
    )
    entries = writer.upload_segments(target, [smuggled])
    writer.publish(target, None, entries, SourcePosition())
    with (
        open_snapshot(target.dataset, target.client_id, settings) as snapshot,
        pytest.raises(SnapshotFormatError, match="outside its range; refused"),
    ):
        list(snapshot)


def test_a_registry_entry_pointing_outside_the_target_is_refused(
    writer: SnapshotWriter, seed: Any, settings: Settings, target: Target
) -> None:
    victim = Target("raw_data", target.client_id + 1)
    seed(victim, [1])
    stolen = writer.registry.get(victim)
    assert stolen is not None
    writer.registry.restore(target, stolen)
    with pytest.raises(InvalidTargetError, match="is not a segment or manifest below"):
        open_snapshot(target.dataset, target.client_id, settings)
    assert object_keys.target_prefix(writer.root, victim) in stolen.manifest_key
