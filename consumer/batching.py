"""Micro-batches: the changes of one target gathered between two publishes.

A ``TargetBatch`` keeps, per key, only the last change in source order (the order of the
target's partition), because a snapshot holds each row's final state, not its history. It
remembers the offset and transaction id of that last change, so the hand-off and replay
rules can still be applied per key when the batch is flushed, and it accounts for its size
and age so the poll loop knows when to flush it. ``FlushWindow`` is the age limit, which
widens while publishing eats most of the loop's time and narrows again when it does not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from schemas.datasets import Target

# A rough cost of one buffered row in Python objects: the dict, its slots, boxed values.
_ROW_OVERHEAD = 240
_VALUE_OVERHEAD = 72


@dataclass(frozen=True, slots=True)
class PendingChange:
    """The last change of one key in a batch: an upsert (``row``) or a delete (``row`` None)."""

    op: str
    row: dict[str, Any] | None
    offset: int
    tx_id: int | None
    source_ts_ms: int
    size: int

    @property
    def is_delete(self) -> bool:
        return self.row is None


def estimate_size(row: dict[str, Any] | None) -> int:
    """Bytes a buffered row costs, roughly; what the memory budget is counted in."""
    if row is None:
        return _ROW_OVERHEAD
    size = _ROW_OVERHEAD + _VALUE_OVERHEAD * len(row)
    for value in row.values():
        if isinstance(value, str):
            size += len(value)
    return size


@dataclass
class TargetBatch:
    """The pending changes of one target, collapsed by key to the last one in source order."""

    target: Target
    topic: str
    partition: int
    changes: dict[int, PendingChange] = field(default_factory=dict)
    first_offset: int | None = None
    last_offset: int = -1
    opened_at: float = 0.0
    oldest_source_ts_ms: int | None = None
    newest_source_ts_ms: int | None = None
    events: int = 0
    nbytes: int = 0
    # Events per source commit time (ms): one entry per transaction, mostly, so the
    # commit-to-publish latency of every event is known at publish for a few dict entries.
    source_ts_counts: dict[int, int] = field(default_factory=dict)

    def add(
        self,
        key: int,
        op: str,
        row: dict[str, Any] | None,
        *,
        offset: int,
        tx_id: int | None,
        source_ts_ms: int,
        now: float | None = None,
    ) -> None:
        """Add one change; a later change to the same key replaces the earlier one."""
        if offset <= self.last_offset:
            raise ValueError(
                f"{self.target}: offset {offset} of {self.topic}:{self.partition} is not after "
                f"{self.last_offset}; changes must arrive in source order"
            )
        if self.first_offset is None:
            self.first_offset = offset
            self.opened_at = time.monotonic() if now is None else now
            self.oldest_source_ts_ms = source_ts_ms

        change = PendingChange(op, row, offset, tx_id, source_ts_ms, estimate_size(row))
        previous = self.changes.pop(key, None)
        if previous is not None:
            self.nbytes -= previous.size
        # Re-inserted, so iteration order stays the source order of each key's last change.
        self.changes[key] = change
        self.nbytes += change.size
        self.last_offset = offset
        self.events += 1
        counts = self.source_ts_counts
        counts[source_ts_ms] = counts.get(source_ts_ms, 0) + 1
        if self.newest_source_ts_ms is None or source_ts_ms > self.newest_source_ts_ms:
            self.newest_source_ts_ms = source_ts_ms

    def note_offset(self, offset: int) -> None:
        """Record that an event of this target at ``offset`` was read but needs no change."""
        if offset > self.last_offset:
            self.last_offset = offset

    def __len__(self) -> int:
        return len(self.changes)

    @property
    def is_empty(self) -> bool:
        return not self.changes

    def age(self, now: float | None = None) -> float:
        """Seconds since the oldest change of the batch arrived; 0 for an empty batch."""
        if self.first_offset is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.opened_at

    def is_due(self, max_age_s: float, max_changes: int, now: float | None = None) -> bool:
        """Whether the batch should be published now: big enough, or its oldest change is old."""
        if self.is_empty:
            return False
        return len(self.changes) >= max_changes or self.age(now) >= max_age_s

    def split(self) -> tuple[dict[int, dict[str, Any]], set[int]]:
        """The batch as the snapshot writer takes it: upserts by key, and deleted keys."""
        upserts: dict[int, dict[str, Any]] = {}
        deletes: set[int] = set()
        for key, change in self.changes.items():
            if change.row is None:
                deletes.add(key)
            else:
                upserts[key] = change.row
        return upserts, deletes

    def drop(self, keys: list[int]) -> None:
        """Forget these keys' changes (already contained in the snapshot)."""
        for key in keys:
            change = self.changes.pop(key)
            self.nbytes -= change.size


class FlushWindow:
    """The age at which a batch is flushed, adapted to how busy publishing keeps the loop.

    Under light load a target publishes within ``base_s`` of its oldest change. When the
    share of wall time spent publishing passes ``high``, the window grows (batches grow,
    publishes per second fall); when it drops under ``low``, the window shrinks back. Latency
    then grows gracefully with load while the backlog does not.
    """

    def __init__(
        self,
        base_s: float,
        cap_s: float,
        *,
        high: float = 0.6,
        low: float = 0.3,
        period_s: float = 2.0,
    ) -> None:
        self.base_s = base_s
        self.cap_s = max(cap_s, base_s)
        self.current_s = base_s
        self.high = high
        self.low = low
        self.period_s = period_s
        self._period_start: float | None = None
        self._busy_s = 0.0

    def record(self, busy_s: float, now: float | None = None) -> float:
        """Account ``busy_s`` seconds spent publishing; returns the (possibly new) window."""
        now = time.monotonic() if now is None else now
        if self._period_start is None:
            self._period_start = now - busy_s
        self._busy_s += busy_s

        elapsed = now - self._period_start
        if elapsed < self.period_s:
            return self.current_s

        share = self._busy_s / elapsed
        if share > self.high:
            self.current_s = min(self.cap_s, self.current_s * 1.5)
        elif share < self.low:
            self.current_s = max(self.base_s, self.current_s / 1.5)
        self._period_start = now
        self._busy_s = 0.0
        return self.current_s
