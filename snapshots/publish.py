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

import json
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
from snapshots.manifest import (
    FORMAT_VERSION,
    DeltaEntry,
    FormatVersion,
    Manifest,
    SegmentEntry,
    SourcePosition,
)
from snapshots.packs import Changes, PackBuilder, encode_delta
from snapshots.reader import read_delta_changes
from snapshots.registry import TargetState, VersionRegistry
from snapshots.segments import EncodedSegment, encode_segments, rewrite_segment
from snapshots.store import ObjectStore
from storage_builder import metrics
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
class DeltaPublish:
    """One target's micro-batch to publish as a delta, over the manifest of ``expected``."""

    target: Target
    expected: TargetState
    manifest: Manifest
    upserts: Mapping[int, dict[str, Any]]
    deletes: Collection[int]
    position: SourcePosition
    # The bytes of the manifest's delta, when the caller kept them (else they are read).
    previous: bytes | None = None


# The outcome of an item a failed pack never reached.
_NOT_WRITTEN = StorageBuilderError("the pack holding this delta was not written")


@dataclass(frozen=True)
class Published:
    """A delta published: the new manifest, where it sits, and the delta's bytes (which the
    next publish of the target appends to)."""

    manifest: Manifest
    location: str
    delta: bytes


def _entry(item: DeltaPublish, key: str, now: float) -> DeltaEntry:
    """The delta entry of a publish: the previous delta's counts with this batch's added."""
    before = item.manifest.deltas[-1] if item.manifest.deltas else None
    return DeltaEntry(
        key=key,
        upserts=len(item.upserts) + (before.upserts if before else 0),
        deletes=len(item.deletes) + (before.deletes if before else 0),
        publishes=1 + (before.publishes if before else 0),
        since=before.since if before else now,
        created_at=now,
    )


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
        format_version: FormatVersion = FORMAT_VERSION,
    ) -> Manifest:
        """Publish a new version of ``target`` made of ``segments`` (already uploaded);
        ``format_version`` is the checksum format of the version it replaces, if any.

        Raises PublishConflict, having deleted its manifest, when ``expected_version`` is no
        longer the target's current version.
        """
        for segment in segments:
            object_keys.check_key(self.root, target, segment.key)
        version = (expected_version or 0) + 1
        manifest = Manifest(
            format_version=format_version,
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

    def publish_deltas(self, items: Sequence[DeltaPublish]) -> list[Published | Exception]:
        """Publish several targets' micro-batches as deltas, all in one pack: one PUT.

        Steps 1 and 2 of a publish are that PUT (each target's delta, which is its previous
        delta with this batch appended, and its new manifest, which lists its segments and
        the new delta); step 3 is one compare-and-set per target, sent in one round trip,
        each winning or losing alone. Returns per item, in order, its published manifest,
        the manifest's location and the delta's bytes, or the error it failed with: the
        rows it could not encode, or the PublishConflict it lost (whose manifest is then
        marked discarded, so a rebuild of the registry never takes it).
        """
        pack = PackBuilder(object_keys.pack_key(self.root))
        now = time.time()
        results: list[Published | Exception] = [_NOT_WRITTEN] * len(items)
        planned: list[tuple[int, DeltaPublish, Manifest, str, bytes]] = []
        previous = self._previous_deltas(items)
        for index, item in enumerate(items):
            target = item.target
            dataset = get_dataset(target.dataset)
            try:
                earlier = previous[index]
                if isinstance(earlier, Exception):
                    raise earlier
                _check_rows(target, dataset.client_column, item.upserts)
                delta = encode_delta(dataset, item.upserts, item.deletes, target.client_id, earlier)
            except (StorageBuilderError, ValueError, TypeError, OverflowError) as error:
                results[index] = error
                continue
            manifest = Manifest(
                format_version=item.manifest.format_version,
                dataset=target.dataset,
                client_id=target.client_id,
                version=item.expected.version + 1,
                created_at=now,
                source_position=item.position,
                segments=item.manifest.segments,
                rows=item.manifest.rows,
                deltas=[_entry(item, str(pack.add(delta)), now)],
            )
            part = pack.add(manifest.to_json())
            pack.index(target, manifest.version, now, part)
            planned.append((index, item, manifest, str(part), delta))
        if not planned:
            return results

        data = pack.build()
        try:
            self.store.put(pack.key, data)
        except StorageBuilderError as error:
            for index, *_ in planned:
                results[index] = error
            return results
        metrics.PACKS_WRITTEN.inc()
        metrics.PACK_BYTES.inc(len(data))
        crash_point("after_segments")
        crash_point("after_manifest")
        try:
            outcomes = self.registry.compare_and_set_many(
                [
                    (item.target, item.expected.version, TargetState.of(manifest, location))
                    for _, item, manifest, location, _ in planned
                ]
            )
        except StorageBuilderError as error:
            for index, *_ in planned:
                results[index] = error
            return results
        crash_point("after_registry")
        for (index, item, manifest, location, delta), lost in zip(planned, outcomes, strict=True):
            if lost is None:
                results[index] = Published(manifest, location, delta)
            else:
                self._mark_discarded(item.target, manifest.version, location)
                results[index] = lost
        return results

    def _previous_deltas(self, items: Sequence[DeltaPublish]) -> list[bytes | Exception | None]:
        """Each item's current delta: kept by the caller, or read (concurrently)."""
        found: list[bytes | Exception | None] = [item.previous for item in items]
        wanted = {
            index: item.manifest.deltas[-1].key
            for index, item in enumerate(items)
            if item.previous is None and item.manifest.deltas
        }

        def read(key: str) -> bytes | Exception:
            try:
                return self.store.get(key)
            except StorageBuilderError as error:
                return error

        for index, data in zip(wanted, self._pool.map(read, wanted.values()), strict=True):
            found[index] = data
        return found

    def _mark_discarded(self, target: Target, version: int, location: str) -> None:
        """Note that the manifest at ``location`` lost its publish: a part of a pack cannot
        be deleted, and a rebuild of the registry must not take it (see ``reindex``)."""
        key = object_keys.discarded_key(self.root, target, version)
        try:
            self.store.put(key, json.dumps({"manifest_key": location}).encode())
        except StorageBuilderError as error:
            log.warning(
                "could not mark the unpublished manifest %s of %s version %d: %s",
                location,
                target,
                version,
                error,
            )

    def fold(self, target: Target, manifest: Manifest) -> tuple[Manifest, dict[str, bytes]]:
        """The manifest's deltas folded into its segments, in memory: a manifest without
        deltas (same version and position) and the bytes of its rewritten segments, which
        are not uploaded (a comparison reads them; a repair passes them as ``pending``)."""
        if not manifest.deltas:
            return manifest, {}
        changes = read_delta_changes(self.store, target, manifest)
        upserts = {key: row for key, row in changes.items() if row is not None}
        deletes = [key for key, row in changes.items() if row is None]
        pending: dict[str, bytes] = {}
        if manifest.segments:
            segments, _ = self._rewrite(target, manifest, upserts, deletes, keep=pending)
        else:
            encoded = list(
                encode_segments(
                    get_dataset(target.dataset),
                    (upserts[key] for key in sorted(upserts)),
                    codec=self.snapshot.codec,
                    block_rows=self.snapshot.block_rows,
                    max_rows=self.snapshot.segment_max_rows,
                    client_id=target.client_id,
                )
            )
            uploads = [_Upload(e, object_keys.segment_key(self.root, target)) for e in encoded]
            pending.update({upload.key: upload.encoded.data for upload in uploads})
            segments = self._entries(target, uploads, None)
        folded = manifest.model_copy(
            update={"segments": segments, "rows": sum(s.rows for s in segments), "deltas": []}
        )
        return folded, pending

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
        *,
        delta_changes: Changes | None = None,
        pending: Mapping[str, bytes] | None = None,
        decoded: Mapping[str, Mapping[int, list[dict[str, Any]]]] | None = None,
    ) -> ApplyResult:
        """Apply a micro-batch of changes and publish the next version, without deltas.

        Only the segments whose key ranges the changes touch are read and rewritten; every
        other segment entry is carried over unchanged. ``manifest``, when the caller kept
        the manifest of ``expected`` (it published or read it), saves reading it again. The
        manifest's deltas are folded in first (a compaction): ``delta_changes``, when the
        caller kept what they change, saves reading them. ``pending`` holds segments the
        manifest names that are not uploaded yet (see :meth:`fold`); those still named
        after the rewrite are uploaded before the manifest. ``decoded`` holds the rows of
        blocks the caller decoded already, by segment key and block index.
        """
        dataset = get_dataset(target.dataset)
        _check_rows(target, dataset.client_column, upserts)
        if manifest is None or manifest.version != expected.version:
            manifest = self.load_manifest(expected, target)
        written_before = self.store.bytes_written
        if manifest.deltas:
            if delta_changes is None:
                delta_changes = read_delta_changes(self.store, target, manifest)
            upserts, deletes = _on_top(delta_changes, upserts, deletes)

        if manifest.segments:
            segments, rewritten = self._rewrite(
                target, manifest, upserts, deletes, source=pending, decoded=decoded
            )
        else:
            segments, rewritten = self._first_segments(target, upserts)
        for segment in segments:
            if pending is not None and segment.key in pending:
                self.store.put(segment.key, pending[segment.key])

        published = self.publish(
            target, expected.version, segments, position, manifest.format_version
        )
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
        *,
        source: Mapping[str, bytes] | None = None,
        keep: dict[str, bytes] | None = None,
        decoded: Mapping[str, Mapping[int, list[dict[str, Any]]]] | None = None,
    ) -> tuple[list[SegmentEntry], int]:
        """The segments after the changes: those they touch rewritten, the others carried
        over. A segment is read from ``source`` when there, else from S3; the rewritten ones
        are uploaded, or with ``keep`` kept there instead. Blocks in ``decoded`` are not
        decoded again."""
        by_segment: dict[int, tuple[dict[int, dict[str, Any]], list[int]]] = {}
        for key, row in upserts.items():
            by_segment.setdefault(manifest.segment_index(key), ({}, []))[0][key] = row
        for key in deletes:
            by_segment.setdefault(manifest.segment_index(key), ({}, []))[1].append(key)

        # Read and rewrite the touched segments concurrently; each keeps its own range.
        decoded = decoded or {}
        futures = {
            index: self._pool.submit(
                self._rewrite_one,
                target,
                manifest.segments[index],
                *changes,
                source,
                keep,
                decoded.get(manifest.segments[index].key),
            )
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
        source: Mapping[str, bytes] | None = None,
        keep: dict[str, bytes] | None = None,
        decoded: Mapping[int, list[dict[str, Any]]] | None = None,
    ) -> list[SegmentEntry]:
        data = source.get(segment.key) if source is not None else None
        if data is None:
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
            decoded=decoded,
        )
        if not parts:
            log.debug("segment %s of %s is empty now; dropped", segment.key, target)
            return []
        lows: list[int | None] = [segment.lo] + [part.min_key for part in parts[1:]]
        uploads = []
        for part in parts:
            key = object_keys.segment_key(self.root, target)
            if keep is None:
                self.store.put(key, part.data)
            else:
                keep[key] = part.data
            uploads.append(_Upload(part, key))
        return self._entries(target, uploads, [*lows, segment.hi])


def _on_top(
    below: Changes, upserts: Mapping[int, dict[str, Any]], deletes: Collection[int]
) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """Upserts and deletes of ``below`` with the later changes applied over them."""
    changes = dict(below)
    changes.update({key: None for key in deletes})
    changes.update(upserts)
    merged = {key: row for key, row in changes.items() if row is not None}
    return merged, [key for key, row in changes.items() if row is None]


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
