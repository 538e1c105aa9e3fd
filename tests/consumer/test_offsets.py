"""The safe commit offset of a partition shared by many targets, and per-target replay."""

from __future__ import annotations

from consumer.offsets import OffsetTracker, advance, is_replay
from schemas.datasets import Target
from snapshots.manifest import SourcePosition

TOPIC = "sb.public.raw_data"
A = Target("raw_data", 1)
B = Target("raw_data", 2)


def _tracker(start: int | None = 100, committed: int | None = None) -> OffsetTracker:
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0, start=start, committed=committed)
    return tracker


def test_with_nothing_pending_the_safe_offset_is_one_past_the_last_consumed() -> None:
    tracker = _tracker()
    tracker.consumed(TOPIC, 0, 100)
    tracker.consumed(TOPIC, 0, 101)

    assert tracker.commits_due() == {(TOPIC, 0): 102}


def test_the_safe_offset_is_the_lowest_first_unpublished_offset() -> None:
    tracker = _tracker()
    tracker.opened(A, TOPIC, 0, 100)
    tracker.consumed(TOPIC, 0, 100)
    tracker.opened(B, TOPIC, 0, 101)
    tracker.consumed(TOPIC, 0, 101)
    tracker.opened(A, TOPIC, 0, 102)  # a later change of A keeps A's first offset
    tracker.consumed(TOPIC, 0, 102)

    assert tracker.commits_due() == {(TOPIC, 0): 100}

    tracker.closed(A, TOPIC, 0)
    assert tracker.commits_due() == {(TOPIC, 0): 101}

    tracker.closed(B, TOPIC, 0)
    assert tracker.commits_due() == {(TOPIC, 0): 103}


def test_nothing_is_due_when_the_safe_offset_was_already_committed() -> None:
    tracker = _tracker(start=100, committed=100)
    assert tracker.commits_due() == {}

    tracker.consumed(TOPIC, 0, 100)
    tracker.committed(TOPIC, 0, 101)
    assert tracker.commits_due() == {}


def test_a_fresh_partition_commits_its_start_once() -> None:
    tracker = _tracker(start=42, committed=None)

    assert tracker.commits_due() == {(TOPIC, 0): 42}


def test_a_rewind_holds_the_safe_offset_below_the_events_read_again() -> None:
    tracker = _tracker()
    for offset in range(100, 110):
        tracker.consumed(TOPIC, 0, offset)
    tracker.opened(B, TOPIC, 0, 105)

    tracker.rewound(TOPIC, 0, 102)

    assert tracker.commits_due() == {(TOPIC, 0): 102}


def test_a_second_rewind_never_skips_what_the_first_made_unread() -> None:
    tracker = _tracker()
    for offset in range(100, 120):
        tracker.consumed(TOPIC, 0, offset)

    # Two targets of the partition lose their publish in one flush: A from 103, B from 110.
    assert tracker.rewound(TOPIC, 0, 103) == 103
    assert tracker.rewound(TOPIC, 0, 110) == 103  # seeking to 110 would lose A's 103..109

    for offset in range(103, 107):
        tracker.consumed(TOPIC, 0, offset)
    assert tracker.rewound(TOPIC, 0, 112) == 107  # never ahead of where reading stands
    assert tracker.rewound(TOPIC, 0, 104) == 104
    assert tracker.commits_due() == {(TOPIC, 0): 104}


def test_a_revoked_partition_is_forgotten() -> None:
    tracker = _tracker()
    tracker.consumed(TOPIC, 0, 100)
    tracker.revoke(TOPIC, 0)

    assert tracker.commits_due() == {}
    assert not tracker.owns(TOPIC, 0)


def test_events_at_or_below_the_recorded_offset_are_replays() -> None:
    position = SourcePosition(pg_snapshot="10:10:", offsets={f"{TOPIC}:0": 50})

    assert is_replay(position, TOPIC, 0, 49)
    assert is_replay(position, TOPIC, 0, 50)
    assert not is_replay(position, TOPIC, 0, 51)
    assert not is_replay(position, TOPIC, 1, 0)
    assert not is_replay(None, TOPIC, 0, 0)


def test_advancing_a_position_keeps_the_bootstrap_snapshot_and_other_partitions() -> None:
    position = SourcePosition(pg_snapshot="10:12:11", offsets={"other:1": 7, f"{TOPIC}:0": 50})

    moved = advance(position, TOPIC, 0, 60)

    assert moved.pg_snapshot == "10:12:11"
    assert moved.offsets == {"other:1": 7, f"{TOPIC}:0": 60}
    assert advance(moved, TOPIC, 0, 55).offsets[f"{TOPIC}:0"] == 60


def test_a_position_keeps_the_newest_source_time_and_old_positions_still_load() -> None:
    position = SourcePosition.model_validate_json('{"pg_snapshot": "10:10:", "offsets": {}}')
    assert position.source_ts_ms is None

    moved = advance(position, TOPIC, 0, 5, source_ts_ms=2_000)
    assert moved.source_ts_ms == 2_000
    assert advance(moved, TOPIC, 0, 6, source_ts_ms=1_000).source_ts_ms == 2_000
    assert advance(moved, TOPIC, 0, 7).source_ts_ms == 2_000
