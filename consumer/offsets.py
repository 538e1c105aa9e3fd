"""Which Kafka offset is safe to commit, and which events a target has already applied.

A partition carries many targets, and they publish at different moments. Committing offset
``n`` tells the group that every event below ``n`` is durable in some snapshot, so the offset
safe to commit for a partition is the lowest first-unpublished offset among its targets'
pending batches, or, when none is pending, one past the last offset consumed.

The reverse question comes after a restart or a rebalance: the partition is read again
from the committed offset, and each target skips the events at or below its own recorded
offset in its source position (the events it published before the commit could happen).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.datasets import Target
from snapshots.manifest import SourcePosition

TopicPartition = tuple[str, int]


def position_key(topic: str, partition: int) -> str:
    """How a partition is named in a source position's offsets."""
    return f"{topic}:{partition}"


def is_replay(position: SourcePosition | None, topic: str, partition: int, offset: int) -> bool:
    """Whether the event at ``offset`` is at or below the target's recorded offset."""
    if position is None:
        return False
    recorded = position.offsets.get(position_key(topic, partition))
    return recorded is not None and offset <= recorded


def advance(
    position: SourcePosition,
    topic: str,
    partition: int,
    last: int,
    source_ts_ms: int | None = None,
) -> SourcePosition:
    """The source position after applying the events up to ``last`` (inclusive), the newest
    of them committed at ``source_ts_ms`` in the source database."""
    offsets = dict(position.offsets)
    name = position_key(topic, partition)
    offsets[name] = max(last, offsets.get(name, -1))
    newest = position.source_ts_ms
    if source_ts_ms is not None and (newest is None or source_ts_ms > newest):
        newest = source_ts_ms
    return SourcePosition(pg_snapshot=position.pg_snapshot, offsets=offsets, source_ts_ms=newest)


@dataclass
class PartitionOffsets:
    """The consumed, pending and committed offsets of one assigned partition."""

    topic: str
    partition: int
    start: int | None = None
    consumed: int | None = None
    committed: int | None = None
    pending: dict[Target, int] = field(default_factory=dict)

    def safe_offset(self) -> int | None:
        """The offset to commit: nothing at or above it is owed to a pending batch."""
        # After a rewind, consumed + 1 can be lower than every pending batch's first offset:
        # the events in between are being read again and are owed to nobody yet.
        candidates = list(self.pending.values())
        if self.consumed is not None:
            candidates.append(self.consumed + 1)
        elif self.start is not None:
            candidates.append(self.start)
        return min(candidates) if candidates else None


class OffsetTracker:
    """The offsets of every partition this member owns."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, PartitionOffsets] = {}

    def assign(self, topic: str, partition: int, start: int | None, committed: int | None) -> None:
        self._partitions[(topic, partition)] = PartitionOffsets(
            topic, partition, start=start, committed=committed
        )

    def revoke(self, topic: str, partition: int) -> PartitionOffsets | None:
        return self._partitions.pop((topic, partition), None)

    def get(self, topic: str, partition: int) -> PartitionOffsets | None:
        return self._partitions.get((topic, partition))

    def owns(self, topic: str, partition: int) -> bool:
        return (topic, partition) in self._partitions

    def partitions(self) -> list[TopicPartition]:
        return list(self._partitions)

    def consumed(self, topic: str, partition: int, offset: int) -> None:
        """Record that the event at ``offset`` was read (and routed, skipped or dead-lettered)."""
        offsets = self._partitions.get((topic, partition))
        if offsets is None:
            return
        if offsets.consumed is None or offset > offsets.consumed:
            offsets.consumed = offset

    def opened(self, target: Target, topic: str, partition: int, first_offset: int) -> None:
        """A batch of ``target`` now holds changes from ``first_offset`` on, unpublished."""
        offsets = self._partitions.get((topic, partition))
        if offsets is not None:
            offsets.pending.setdefault(target, first_offset)

    def closed(self, target: Target, topic: str, partition: int) -> None:
        """The batch of ``target`` was published, or found already contained, or abandoned."""
        offsets = self._partitions.get((topic, partition))
        if offsets is not None:
            offsets.pending.pop(target, None)

    def rewound(self, topic: str, partition: int, offset: int) -> int:
        """Where the partition is read again from: ``offset``, or where reading stands when
        that is lower, since a rewind must never skip what was not consumed yet (two batches
        of one partition can lose their publish in one flush, the later one second).
        Nothing at or above the returned offset counts as consumed any more."""
        offsets = self._partitions.get((topic, partition))
        if offsets is None or offsets.consumed is None:
            return offset
        start = min(offset, offsets.consumed + 1)
        offsets.consumed = start - 1
        return start

    def commits_due(self) -> dict[TopicPartition, int]:
        """The partitions whose safe offset moved past what was last committed."""
        due = {}
        for key, offsets in self._partitions.items():
            safe = offsets.safe_offset()
            if safe is not None and (offsets.committed is None or safe > offsets.committed):
                due[key] = safe
        return due

    def committed(self, topic: str, partition: int, offset: int) -> None:
        offsets = self._partitions.get((topic, partition))
        if offsets is not None:
            offsets.committed = offset
