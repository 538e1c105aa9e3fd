"""Manifests: the immutable JSON documents that list a snapshot's segments.

A manifest names its target (dataset and client), its version, when it was created, its
source position and its segments. Segments are sorted and contiguous: each owns the keys in
``[lo, hi)``, the first has ``lo = None`` and the last ``hi = None``, so every key has
exactly one segment and a change finds it by binary search. A manifest is validated
whenever it is loaded, including that it belongs to the target it was loaded for.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.datasets import Target
from snapshots.checksums import parse_checksum
from storage_builder.errors import SnapshotFormatError

# Format 1 summed an earlier row hash than :mod:`snapshots.checksums` computes: its
# checksums cannot be compared with the database, so reconciliation rebuilds such a target.
# Every other reader takes both formats alike.
FORMAT_VERSION: Literal[2] = 2
FormatVersion = Literal[1, 2]


class SourcePosition(BaseModel):
    """How far in the change stream a snapshot is complete.

    ``pg_snapshot`` is ``pg_current_snapshot()`` as text, taken by the bootstrap; ``offsets``
    maps ``"topic:partition"`` to the last offset applied (inclusive) for this target;
    ``source_ts_ms`` is the source commit time (epoch milliseconds) of the newest change
    applied, which per-target staleness is measured from (None until a change is applied;
    manifests written before the field existed load with None).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pg_snapshot: str | None = None
    offsets: dict[str, int] = Field(default_factory=dict)
    source_ts_ms: int | None = None

    def offset(self, topic: str, partition: int) -> int | None:
        """The last applied offset of this target on ``topic:partition``, if any."""
        return self.offsets.get(f"{topic}:{partition}")


class SegmentEntry(BaseModel):
    """One segment of a manifest: its object key, the key range it owns and its totals."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    lo: int | None
    hi: int | None
    min_key: int
    max_key: int
    rows: int = Field(ge=1)
    bytes: int = Field(ge=0)
    checksum: str
    block_keys: list[int]

    @model_validator(mode="after")
    def _consistent(self) -> SegmentEntry:
        parse_checksum(self.checksum)
        if self.min_key > self.max_key:
            raise ValueError(f"segment {self.key}: min_key {self.min_key} > max_key {self.max_key}")
        if self.lo is not None and self.min_key < self.lo:
            raise ValueError(f"segment {self.key}: min_key {self.min_key} below lo {self.lo}")
        if self.hi is not None and self.max_key >= self.hi:
            raise ValueError(f"segment {self.key}: max_key {self.max_key} not below hi {self.hi}")
        if self.block_keys != sorted(self.block_keys) or not self.block_keys:
            raise ValueError(f"segment {self.key}: block_keys are empty or not sorted")
        return self

    def owns(self, key: int) -> bool:
        """Whether ``key`` falls in this segment's range ``[lo, hi)``."""
        return (self.lo is None or key >= self.lo) and (self.hi is None or key < self.hi)


class DeltaEntry(BaseModel):
    """The delta of a manifest: where it sits (a pack location) and what it holds.

    A delta is cumulative: it holds every change published since the target's segments
    were last written, one Avro block per publish (see :mod:`snapshots.packs`).
    ``upserts`` and ``deletes`` count the changes published into it (a key changed twice
    counts twice), ``publishes`` its blocks; ``since`` is when the first was published.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    upserts: int = Field(ge=0)
    deletes: int = Field(ge=0)
    publishes: int = Field(ge=1)
    since: float
    created_at: float


class Manifest(BaseModel):
    """The content of one published snapshot version of a target.

    A version written over another keeps its ``format_version``: its segments' checksums
    are still partly the other's.

    ``deltas`` are applied over the segments in order, the later winning (see
    :mod:`snapshots.packs`); the consumer writes at most one, cumulative. ``rows`` counts
    the segments' rows alone.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: FormatVersion = FORMAT_VERSION
    dataset: str
    client_id: int
    version: int = Field(ge=1)
    created_at: float = Field(default_factory=time.time)
    source_position: SourcePosition
    segments: list[SegmentEntry]
    rows: int = Field(ge=0)
    deltas: list[DeltaEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _contiguous(self) -> Manifest:
        Target.parse(self.dataset, self.client_id)
        if self.segments:
            if self.segments[0].lo is not None or self.segments[-1].hi is not None:
                raise ValueError("the first segment must start at lo=None, the last end at None")
            for left, right in zip(self.segments, self.segments[1:], strict=False):
                if left.hi is None or left.hi != right.lo:
                    raise ValueError(
                        f"segments are not contiguous: {left.key} ends at {left.hi}, "
                        f"{right.key} starts at {right.lo}"
                    )
                if right.lo is not None and left.lo is not None and right.lo <= left.lo:
                    raise ValueError(f"segment {right.key} is not sorted after {left.key}")
        total = sum(segment.rows for segment in self.segments)
        if total != self.rows:
            raise ValueError(f"rows {self.rows} differ from the segments' sum {total}")
        return self

    @property
    def target(self) -> Target:
        return Target.parse(self.dataset, self.client_id)

    @property
    def delta_changes(self) -> int:
        """How many changes the deltas hold (a key changed twice counts twice)."""
        return sum(delta.upserts + delta.deletes for delta in self.deltas)

    @property
    def checksum(self) -> int:
        """The checksum of the whole snapshot: the sum of its segments' checksums."""
        return sum(parse_checksum(segment.checksum) for segment in self.segments)

    def segment_index(self, key: int) -> int:
        """The index of the segment owning ``key``; IndexError when there is no segment."""
        if not self.segments:
            raise IndexError(f"manifest of {self.target} version {self.version} has no segment")
        lows = [segment.lo for segment in self.segments[1:]]
        return bisect_right(lows, key)  # type: ignore[type-var]

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def load(cls, data: bytes, target: Target, key: str | None = None) -> Manifest:
        """Parse and validate a manifest, refusing one that belongs to another target."""
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as error:
            raise SnapshotFormatError(f"manifest {key!r} is invalid: {error}", key=key) from None
        if (manifest.dataset, manifest.client_id) != (target.dataset, target.client_id):
            # Tenants never mix: a manifest found under one target's name must describe it.
            raise SnapshotFormatError(
                f"manifest {key!r} describes {manifest.dataset}/{manifest.client_id}, "
                f"not {target}; refused",
                key=key,
            )
        return manifest
