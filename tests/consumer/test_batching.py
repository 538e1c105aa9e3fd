"""Micro-batches: collapse by key in source order, size and age accounting, the flush window."""

from __future__ import annotations

import pytest

from consumer.batching import FlushWindow, TargetBatch, estimate_size
from schemas.datasets import Target

TARGET = Target("entities", 7)


def _batch() -> TargetBatch:
    return TargetBatch(TARGET, "sb.public.entities", 3)


def test_changes_to_one_key_collapse_to_the_last_in_source_order() -> None:
    batch = _batch()
    batch.add(1, "c", {"id": 1, "name": "a"}, offset=10, tx_id=100, source_ts_ms=1, now=0.0)
    batch.add(2, "c", {"id": 2, "name": "b"}, offset=11, tx_id=100, source_ts_ms=1, now=0.1)
    batch.add(1, "u", {"id": 1, "name": "a2"}, offset=12, tx_id=101, source_ts_ms=2, now=0.2)
    batch.add(2, "d", None, offset=13, tx_id=102, source_ts_ms=3, now=0.3)

    upserts, deletes = batch.split()

    assert upserts == {1: {"id": 1, "name": "a2"}}
    assert deletes == {2}
    assert batch.events == 4
    assert len(batch) == 2
    assert (batch.first_offset, batch.last_offset) == (10, 13)
    assert batch.changes[1].tx_id == 101 and batch.changes[2].offset == 13


def test_a_delete_then_an_insert_of_one_key_ends_as_an_upsert() -> None:
    batch = _batch()
    batch.add(5, "d", None, offset=1, tx_id=1, source_ts_ms=0, now=0.0)
    batch.add(5, "c", {"id": 5}, offset=2, tx_id=2, source_ts_ms=0, now=0.0)

    assert batch.split() == ({5: {"id": 5}}, set())


def test_out_of_order_offsets_are_refused() -> None:
    batch = _batch()
    batch.add(1, "c", {"id": 1}, offset=10, tx_id=1, source_ts_ms=0, now=0.0)

    with pytest.raises(ValueError, match="not after 10"):
        batch.add(2, "c", {"id": 2}, offset=10, tx_id=1, source_ts_ms=0, now=0.0)


def test_bytes_are_accounted_once_per_key() -> None:
    batch = _batch()
    row = {"id": 1, "name": "x" * 100}
    batch.add(1, "c", row, offset=1, tx_id=1, source_ts_ms=0, now=0.0)
    batch.add(1, "u", row, offset=2, tx_id=2, source_ts_ms=0, now=0.0)

    assert batch.nbytes == estimate_size(row)

    batch.drop([1])
    assert batch.nbytes == 0 and batch.is_empty


def test_a_batch_is_due_by_size_or_by_the_age_of_its_oldest_change() -> None:
    batch = _batch()
    assert not batch.is_due(1.0, 2, now=100.0)

    batch.add(1, "c", {"id": 1}, offset=1, tx_id=1, source_ts_ms=0, now=10.0)
    assert not batch.is_due(1.0, 2, now=10.5)
    assert batch.is_due(1.0, 2, now=11.0)

    batch.add(2, "c", {"id": 2}, offset=2, tx_id=1, source_ts_ms=0, now=10.6)
    assert batch.is_due(1.0, 2, now=10.6)


def test_the_flush_window_widens_under_load_and_narrows_after() -> None:
    window = FlushWindow(1.0, 8.0, period_s=2.0)

    now = 0.0
    for _ in range(6):
        now += 2.0
        window.record(1.8, now=now)
    widened = window.current_s
    assert 1.0 < widened <= 8.0

    for _ in range(20):
        now += 2.0
        window.record(0.1, now=now)
    assert window.current_s == 1.0


def test_the_flush_window_never_passes_its_cap() -> None:
    window = FlushWindow(1.0, 3.0, period_s=1.0)
    now = 0.0
    for _ in range(50):
        now += 1.0
        window.record(1.0, now=now)

    assert window.current_s == 3.0
