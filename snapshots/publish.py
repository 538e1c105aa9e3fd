"""Writing snapshots: upload segments, write the manifest, publish by compare-and-set.

The publish order is what makes a snapshot appear atomically:

1. the segments are written (new, uniquely named, immutable objects nobody refers to yet);
2. the manifest is written, naming them (still invisible: Redis does not point at it);
3. the compare-and-set in Redis switches the target to the new manifest.

A reader resolves the version in Redis first, so it sees either the old manifest or the new
one, never a partial snapshot. A writer that loses step 3 (a newer version exists) deletes
the manifest it wrote and re-raises; its segments are left to the garbage collection.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from schemas.datasets import Target, get_dataset
from snapshots import keys as object_keys
from snapshots.checksums import format_checksum
from snapshots.faults import crash_point
from snapshots.manifest import Manifest, SegmentEntry, SourcePosition
from snapshots.registry import TargetState, VersionRegistry
from snapshots.segments import EncodedSegment, encode_segments, rewrite_segment
from snapshots.store import ObjectStore
from storage_builder.errors import InvalidTargetError, PublishConflict, StorageBuilderError
from storage_builder.settings import Settings, SnapshotSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyResult:
    """What a micro-batch did to a target's snapshot."""

    manifest: Manifest
    segments_rewritten: int
    bytes_written: int
    rows_upserted: int
    rows_deleted: int


@dataclass(frozen=True)
class _Upload:
    encoded: EncodedSegment
    key: str


class SnapshotWriter:
    """Writes the snapshots of any number of targets; thread-safe for distinct targets."""

    def __init__(
        self,
        store: ObjectStore,
        registry: VersionRegistry,
        snapshot: SnapshotSettings,
        root: str,
    ) -> None:
        self.store = store
        self.registry = registry
        self.snapshot = snapshot
        self.root = root
        self._pool = ThreadPoolExecutor(
            max_workers=store.settings.upload_threads, thread_name_prefix="segment-upload"
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> SnapshotWriter:
        """A writer on the object store and registry the settings name (no network yet)."""
        return cls(
            ObjectStore(settings.s3),
            VersionRegistry(settings.redis),
            settings.snapshot,
            settings.s3.prefix,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def upload_segments(
        self,
        target: Target,
        encoded: Iterable[EncodedSegment],
        lo_bounds: Sequence[int | None] | None = None,
    ) -> list[SegmentEntry]:
        """Upload segments concurrently and return their manifest entries, in order.

        ``encoded`` is consumed lazily, with at most twice the upload threads in flight, so
        a generator of segments streams. ``lo_bounds`` gives each segment's ``lo``; one more
        bound at the end gives the last segment's ``hi`` (else None). Without ``lo_bounds``
        the segments cover the whole key range: the first starts at None and each next one
        at its own first key.
        """
        window = 2 * self.store.settings.upload_threads
        in_flight: deque[tuple[EncodedSegment, str, Future[None]]] = deque()
        done: list[_Upload] = []
        for segment in encoded:
            key = object_keys.segment_key(self.root, target)
            in_flight.append((segment, key, self._pool.submit(self.store.put, key, segment.data)))
            while len(in_flight) >= window:
                done.append(self._finish(in_flight.popleft()))
        while in_flight:
            done.append(self._finish(in_flight.popleft()))

        entries = self._entries(target, done, lo_bounds)
        crash_point("after_segments")
        return entries

    @staticmethod
    def _finish(item: tuple[EncodedSegment, str, Future[None]]) -> _Upload:
        segment, key, future = item
        future.result()
        return _Upload(segment, key)

    def _entries(
        self, target: Target, uploads: list[_Upload], lo_bounds: Sequence[int | None] | None
    ) -> list[SegmentEntry]:
        if not uploads:
            return []
        if lo_bounds is None:
            lows: list[int | None] = [None] + [u.encoded.min_key for u in uploads[1:]]
            his: list[int | None] = lows[1:] + [None]
        elif len(lo_bounds) in (len(uploads), len(uploads) + 1):
            lows = list(lo_bounds[: len(uploads)])
            last = lo_bounds[len(uploads)] if len(lo_bounds) > len(uploads) else None
            his = lows[1:] + [last]
        else:
            raise ValueError(f"{len(lo_bounds)} lo bounds for {len(uploads)} segments of {target}")
        return [
            SegmentEntry(
                key=upload.key,
                lo=lo,
                hi=hi,
                min_key=upload.encoded.min_key,
                max_key=upload.encoded.max_key,
                rows=upload.encoded.rows,
                bytes=len(upload.encoded.data),
                checksum=format_checksum(upload.encoded.checksum),
                block_keys=upload.encoded.block_keys,
            )
            for upload, lo, hi in zip(uploads, lows, his, strict=True)
        ]

    def publish(
        self,
        target: Target,
        expected_version: int | None,
        segments: list[SegmentEntry],
        position: SourcePosition,
    ) -> Manifest:
        """Publish a new version of ``target`` made of ``segments`` (already uploaded).

        Raises PublishConflict, having deleted its manifest, when ``expected_version`` is no
        longer the target's current version.
        """
        for segment in segments:
            object_keys.check_key(self.root, target, segment.key)
        version = (expected_version or 0) + 1
        manifest = Manifest(
            dataset=target.dataset,
            client_id=target.client_id,
            version=version,
            created_at=time.time(),
            source_position=position,
            segments=segments,
            rows=sum(segment.rows for segment in segments),
        )

        # Step 1, the segments, is done. A stale writer is usually told here, before it
        # writes anything more; the compare-and-set below is what actually fences it.
        current = self.registry.get(target)
        current_version = current.version if current else None
        if current_version != expected_version:
            raise PublishConflict(str(target), expected_version, current_version)

        # Step 2: the manifest. Unique name, so it can be written before it is published.
        key = object_keys.manifest_key(self.root, target, version)
        self.store.put(key, manifest.to_json())
        crash_point("after_manifest")

        # Step 3: the publish itself, a compare-and-set on the version.
        try:
            self.registry.compare_and_set(target, expected_version, TargetState.of(manifest, key))
        except PublishConflict:
            self._discard(key, target)
            raise
        crash_point("after_registry")
        # The job that publishes logs the one INFO line per publish, with what it changed.
        log.debug(
            "published %s version %d (%d segments, %d rows)",
            target,
            version,
            len(segments),
            manifest.rows,
            extra={"target": str(target), "version": version},
        )
        return manifest

    def _discard(self, key: str, target: Target) -> None:
        try:
            self.store.delete_many([key])
        except StorageBuilderError as error:
            log.warning(
                "could not delete the unpublished manifest %s of %s: %s", key, target, error
            )

    def load_manifest(self, state: TargetState, target: Target | None = None) -> Manifest:
        """The manifest a registry state points at, validated (for ``target`` when given)."""
        target = target or _target_of(self.root, state.manifest_key)
        object_keys.check_key(self.root, target, state.manifest_key)
        manifest = Manifest.load(self.store.get(state.manifest_key), target, state.manifest_key)
        for segment in manifest.segments:
            object_keys.check_key(self.root, target, segment.key)
        return manifest

    def apply_changes(
        self,
        target: Target,
        upserts: Mapping[int, dict[str, Any]],
        deletes: Collection[int],
        position: SourcePosition,
        expected: TargetState,
        manifest: Manifest | None = None,
    ) -> ApplyResult:
        """Apply a micro-batch of changes and publish the next version.

        Only the segments whose key ranges the changes touch are read and rewritten; every
        other segment entry is carried over unchanged. ``manifest``, when the caller kept
        the manifest of ``expected`` (it published or read it), saves reading it again.
        """
        dataset = get_dataset(target.dataset)
        _check_rows(target, dataset.client_column, upserts)
        if manifest is None or manifest.version != expected.version:
            manifest = self.load_manifest(expected, target)
        written_before = self.store.bytes_written

        if manifest.segments:
            segments, rewritten = self._rewrite(target, manifest, upserts, deletes)
        else:
            segments, rewritten = self._first_segments(target, upserts)

        published = self.publish(target, expected.version, segments, position)
        return ApplyResult(
            manifest=published,
            segments_rewritten=rewritten,
            bytes_written=self.store.bytes_written - written_before,
            rows_upserted=len(upserts),
            rows_deleted=len(deletes),
        )

    def _first_segments(
        self, target: Target, upserts: Mapping[int, dict[str, Any]]
    ) -> tuple[list[SegmentEntry], int]:
        rows = (upserts[key] for key in sorted(upserts))
        encoded = encode_segments(
            get_dataset(target.dataset),
            rows,
            codec=self.snapshot.codec,
            block_rows=self.snapshot.block_rows,
            max_rows=self.snapshot.segment_max_rows,
            client_id=target.client_id,
        )
        entries = self.upload_segments(target, encoded)
        return entries, len(entries)

    def _rewrite(
        self,
        target: Target,
        manifest: Manifest,
        upserts: Mapping[int, dict[str, Any]],
        deletes: Collection[int],
    ) -> tuple[list[SegmentEntry], int]:
        by_segment: dict[int, tuple[dict[int, dict[str, Any]], list[int]]] = {}
        for key, row in upserts.items():
            by_segment.setdefault(manifest.segment_index(key), ({}, []))[0][key] = row
        for key in deletes:
            by_segment.setdefault(manifest.segment_index(key), ({}, []))[1].append(key)

        # Read and rewrite the touched segments concurrently; each keeps its own range.
        futures = {
            index: self._pool.submit(self._rewrite_one, target, manifest.segments[index], *changes)
            for index, changes in sorted(by_segment.items())
        }
        replaced = {index: future.result() for index, future in futures.items()}
        crash_point("after_segments")

        entries: list[SegmentEntry] = []
        for index, segment in enumerate(manifest.segments):
            entries.extend(replaced.get(index, [segment]))
        return _contiguous(entries), len(by_segment)

    def _rewrite_one(
        self,
        target: Target,
        segment: SegmentEntry,
        upserts: dict[int, dict[str, Any]],
        deletes: list[int],
    ) -> list[SegmentEntry]:
        data = self.store.get(segment.key)
        parts = rewrite_segment(
            get_dataset(target.dataset),
            data,
            upserts,
            deletes,
            codec=self.snapshot.codec,
            block_rows=self.snapshot.block_rows,
            max_rows=self.snapshot.segment_max_rows,
            client_id=target.client_id,
        )
        if not parts:
            log.debug("segment %s of %s is empty now; dropped", segment.key, target)
            return []
        lows: list[int | None] = [segment.lo] + [part.min_key for part in parts[1:]]
        uploads = []
        for part in parts:
            key = object_keys.segment_key(self.root, target)
            self.store.put(key, part.data)
            uploads.append(_Upload(part, key))
        return self._entries(target, uploads, [*lows, segment.hi])


def _contiguous(entries: list[SegmentEntry]) -> list[SegmentEntry]:
    """Close the gaps dropped segments left: a gap joins the range of the segment before it
    (or, at the start, of the segment after it), so every key still has one segment."""
    if not entries:
        return []
    fixed: list[SegmentEntry] = []
    for entry in entries:
        if fixed and fixed[-1].hi != entry.lo:
            fixed[-1] = fixed[-1].model_copy(update={"hi": entry.lo})
        fixed.append(entry)
    if fixed[0].lo is not None:
        fixed[0] = fixed[0].model_copy(update={"lo": None})
    if fixed[-1].hi is not None:
        fixed[-1] = fixed[-1].model_copy(update={"hi": None})
    return fixed


def _check_rows(target: Target, client_column: str, upserts: Mapping[int, dict[str, Any]]) -> None:
    for key, row in upserts.items():
        if row.get(client_column) != target.client_id:
            raise InvalidTargetError(
                f"upsert of key {key} for {target} holds {client_column}="
                f"{row.get(client_column)!r}; refused"
            )


def _target_of(root: str, key: str) -> Target:
    marker = "/" + object_keys.MANIFESTS
    prefix = key[: key.rfind(marker) + 1] if marker in key else ""
    target = object_keys.parse_target_prefix(root, prefix)
    if target is None:
        raise InvalidTargetError(f"manifest key {key!r} is not below a target prefix of {root!r}")
    return target
