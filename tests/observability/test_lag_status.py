"""The status rules of ``lag`` over synthetic series of observations (pure, no services)."""

from __future__ import annotations

from typing import Any

import pytest

from consumer.lag import (
    EXIT_CODES,
    ConnectorState,
    Observation,
    PartitionSample,
    SlotState,
    evaluate,
    window_covered,
    worst,
)

TOPIC = "sb.public.raw_data"
WINDOW = 60.0


def sample(
    committed: int | None, end: int, owned: bool = True, start: int = 0, **extra: Any
) -> PartitionSample:
    return PartitionSample(TOPIC, 0, committed, start, end, owned, **extra)


def series(*points: tuple[float, PartitionSample]) -> list[Observation]:
    return [Observation(ts, "STABLE", (s,)) for ts, s in points]


def status(history: list[Observation]) -> str:
    return evaluate(history, WINDOW)[(TOPIC, 0)].status


def every(step: float, *samples: PartitionSample) -> list[Observation]:
    return series(*((1000.0 + i * step, s) for i, s in enumerate(samples)))


def test_quiet_caught_up_partition_is_ok_without_any_commit() -> None:
    # Nothing new arrives and nothing is committed for longer than the window.
    history = every(30, *(sample(500, 500) for _ in range(10)))
    assert status(history) == "OK"


def test_partition_that_consumes_is_ok_even_with_lag() -> None:
    history = every(20, sample(100, 150), sample(150, 180), sample(180, 200), sample(200, 230))
    assert status(history) == "OK"


def test_lag_growing_through_the_window_while_committing_is_warn() -> None:
    history = every(20, sample(100, 150), sample(110, 170), sample(120, 190), sample(130, 210))
    assert status(history) == "WARN"


def test_lag_that_fell_once_in_the_window_is_not_warn() -> None:
    history = every(20, sample(100, 150), sample(110, 170), sample(160, 171), sample(165, 200))
    assert status(history) == "OK"


def test_owned_partition_with_lag_and_a_committed_offset_that_does_not_move_is_stall() -> None:
    history = every(20, sample(100, 120), sample(100, 150), sample(100, 190), sample(100, 190))
    assert status(history) == "STALL"


def test_stall_needs_lag_through_the_whole_window() -> None:
    # The first observation was caught up: a batch in flight is not a stall yet.
    history = every(20, sample(100, 100), sample(100, 150), sample(100, 190), sample(100, 190))
    assert status(history) == "WARN"


def test_never_committed_owned_partition_with_lag_is_stall() -> None:
    history = every(20, sample(None, 50), sample(None, 60), sample(None, 70), sample(None, 70))
    assert status(history) == "STALL"


def test_unowned_partition_is_stop_once_the_window_is_covered() -> None:
    history = every(20, *(sample(100, 100 + 10 * i, owned=False) for i in range(4)))
    assert status(history) == "STOP"


def test_unowned_partition_is_warn_before_the_window_is_covered() -> None:
    history = every(20, sample(100, 100, owned=False), sample(100, 110, owned=False))
    assert window_covered(history, WINDOW) is False
    assert status(history) == "WARN"


def test_a_member_seen_once_in_the_window_is_not_stop() -> None:
    # A rebalance: the partition had no owner for a moment only.
    history = every(
        20,
        sample(100, 100, owned=True),
        sample(100, 100, owned=False),
        sample(100, 100, owned=True),
        sample(100, 100, owned=False),
    )
    assert status(history) == "OK"


def test_observations_older_than_the_window_do_not_count() -> None:
    # It was stopped long ago; within the last window it has an owner and is caught up.
    stopped = [(1000.0 + 20 * i, sample(100, 100 + i, owned=False)) for i in range(10)]
    running = [(1200.0 + 20 * i, sample(110, 110, owned=True)) for i in range(5)]
    assert status(series(*stopped, *running)) == "OK"


def test_committed_offset_past_the_end_is_err() -> None:
    history = every(20, *(sample(900, 100) for _ in range(4)))
    assert status(history) == "ERR"


def test_unreadable_partition_is_err_at_once() -> None:
    history = every(20, sample(100, 150, error="oldest message not readable"))
    assert status(history) == "ERR"


def test_time_lag_is_the_age_of_the_oldest_unapplied_message() -> None:
    lagging = sample(100, 150, oldest_ts_ms=1_000_000)
    assert lagging.offset_lag == 50
    assert lagging.time_lag_s(now=1_030.5) == pytest.approx(30.5)
    assert sample(150, 150, oldest_ts_ms=1_000_000).time_lag_s(now=2_000.0) == 0.0


def test_offset_lag_counts_from_the_retained_start_when_nothing_was_committed() -> None:
    assert sample(None, 150, start=40).offset_lag == 110
    assert sample(10, 150, start=40).offset_lag == 110


@pytest.mark.parametrize(
    ("state", "tasks", "expected"),
    [
        ("RUNNING", ((0, "RUNNING", ""),), "OK"),
        ("PAUSED", ((0, "PAUSED", ""),), "STOP"),
        ("RUNNING", ((0, "FAILED", "org.postgresql.util.PSQLException"),), "ERR"),
        ("FAILED", (), "ERR"),
        ("RUNNING", (), "ERR"),
        ("RUNNING", ((0, "UNASSIGNED", ""),), "WARN"),
    ],
)
def test_connector_states(state: str, tasks: tuple, expected: str) -> None:
    assert ConnectorState("src", state, tasks).verdict().status == expected


def test_unreachable_connect_is_err_and_names_the_setting() -> None:
    verdict = ConnectorState("src", "UNREACHABLE", error="Kafka Connect at x (kafka.connect_url)")
    assert verdict.verdict().status == "ERR"
    assert "kafka.connect_url" in verdict.verdict().reason


def test_slot_states() -> None:
    assert SlotState("s", active=True, lag_bytes=10).verdict(1000).status == "OK"
    assert SlotState("s", active=True, lag_bytes=2000).verdict(1000).status == "WARN"
    assert SlotState("s", active=False, lag_bytes=0).verdict(1000).status == "WARN"
    assert SlotState("s", error="does not exist").verdict(1000).status == "ERR"


def test_worst_and_exit_codes_order() -> None:
    assert worst(["OK", "STALL", "WARN"]) == "STALL"
    assert worst(["STOP", "ERR"]) == "ERR"
    assert worst([]) == "OK"
    assert EXIT_CODES["OK"] == 0
    assert all(code != 0 for status, code in EXIT_CODES.items() if status != "OK")


def test_observation_round_trips_through_json() -> None:
    observation = Observation(5.5, "STABLE", (sample(1, 2, oldest_ts_ms=7),))
    assert Observation.from_json(observation.to_json()) == observation
