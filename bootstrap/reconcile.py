"""Reconciliation: prove each target's snapshot equals the database, and repair what drifted.

For each target, in this order:

1. The registry entry is read, and rebuilt from the newest manifest in S3 when Redis lost it.
2. The manifest is read and its segment objects are checked against a listing (the run's
   listing of the whole dataset, or one LIST of the target; no segment is read): a missing
   manifest, a missing segment object or one of the wrong size cannot be repaired in place,
   and the target is bootstrapped again instead. The check runs beside steps 3 and 4 and
   decides before step 5.
3. In a REPEATABLE READ transaction begun *after* step 1, one aggregate query asks
   PostgreSQL for the row count and checksum of every block's key range (a large target's
   is streamed in two halves, the upper one on a second connection importing the same
   database snapshot). Each segment is compared with the manifest as soon as its blocks'
   sums arrive. A target in sync ends here, having read no segment and written nothing.
4. A mismatching segment is read and its differing blocks decoded while the sums of the
   segments after it are still being computed; the differing blocks are bisected down to
   the rows that differ (:mod:`bootstrap.bisection`), whose values are read in the same
   transaction.
5. The repair rewrites just the segments holding those rows and publishes with the same
   compare-and-set on the version as the consumer, expecting the version compared in step 1.

Why this cannot lose a change the consumer streams meanwhile: the state of step 1 was
published before the database snapshot of step 3 was taken, so everything the snapshot holds
is also in the database snapshot, and the repair only writes values as of that consistent
point. The repaired manifest keeps the source position of step 1, so the consumer still
applies every change after it on top (re-applying a change it already had is harmless: an
event carries the whole row). If the consumer published in between, the compare-and-set
fails and the target is compared again from step 1, since that publish may hold the fix.

A difference can also be a change the consumer simply has not applied yet. With a grace
period, drift is confirmed by a second comparison after it: a row counts as drifted only if
it differed the same way both times; the others are left to the consumer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Annotated, Any, cast

import psycopg
import typer
from psycopg import sql
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bootstrap import source
from bootstrap.bisection import (
    EMPTY,
    KeyRange,
    RangeSum,
    RowDifference,
    SnapshotKeys,
    TooManyDifferences,
    find_differences,
    range_sums,
    segment_sums,
    stream_range_sums,
)
from bootstrap.reconcile_report import (
    BY_BOOTSTRAP,
    BY_REINDEX,
    BY_SEGMENTS,
    DRIFT,
    EXIT_FAILED,
    FAILED,
    IN_SYNC,
    REPAIRED,
    ReconcileReport,
    TargetReport,
    render_table,
    write_json,
)
from schemas.datasets import DATASETS, Target, get_dataset, parse_client_id
from snapshots import keys as object_keys
from snapshots.checksums import parse_checksum
from snapshots.manifest import FORMAT_VERSION, Manifest, SegmentEntry
from snapshots.publish import SnapshotWriter
from snapshots.registry import (
    TargetState,
    VersionRegistry,
    discover_targets,
    newest_manifest,
    reindex,
)
from snapshots.segment_cache import SegmentCache
from snapshots.segments import (
    META_BLOCKS,
    block_rows_of,
    iter_segment_rows,
    segment_metadata,
)
from snapshots.store import ObjectStore
from storage_builder.errors import (
    ConfigError,
    ObjectStoreError,
    PublishConflict,
    RegistryError,
    SnapshotFormatError,
    StorageBuilderError,
)
from storage_builder.settings import Settings

log = logging.getLogger(__name__)

Versions = tuple[int | None, int | None]

# Enough for the drifted segments of a few targets at once (by default a segment holds at
# most 20,000 rows).
_SEGMENT_CACHE_BYTES = 64 * 1024 * 1024

# The decoded rows a comparison keeps for its repair, at most (about 1 KB of memory each);
# the blocks of a larger drift are decoded again by the repair.
_KEEP_DECODED_ROWS = 20_000
# Segment reads in flight for all targets of a run, at most.
_FETCH_THREADS = 16
# How long a worker waits for the others to connect before the first target.
_CONNECT_TIMEOUT_S = 60.0

# A run over this many targets of a dataset lists the dataset's segment objects once...
_LIST_DATASET_FROM = 20
# ...unless it holds more than this many (about 150 bytes of memory each).
_LIST_DATASET_MAX_KEYS = 200_000

REGISTRY_MISSING = "registry entry missing; a run would rebuild it from S3"


@dataclass(frozen=True)
class ReconcileOptions:
    """How a reconciliation runs.

    ``grace_s``: how long a difference must persist to count as drift (0: repair what the
    first comparison finds). ``max_repair_rows``: more rows than this to compare row by row
    and the target is bootstrapped instead of repaired in place. ``split_rows``: a target
    with more rows than this has its aggregate run in two halves, on two connections sharing
    one database snapshot, so that one large target does not leave a core idle.
    """

    dry_run: bool = False
    grace_s: float = 0.0
    parallel: int = 4
    max_attempts: int = 5
    max_repair_rows: int = 100_000
    split_rows: int = 200_000


class _Rebuild(Exception):
    """The target cannot be repaired in place; the reason says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Comparison:
    """What one comparison of a target found."""

    state: TargetState | None
    manifest: Manifest | None = None
    rows: int = 0
    differences: list[RowDifference] = field(default_factory=list)
    segments_read: int = 0
    # Segments of the manifest with its deltas folded in, not uploaded (see _compare).
    pending: dict[str, bytes] = field(default_factory=dict)
    # The rows of the blocks the comparison decoded, by segment key and block index: the
    # repair rewrites those very blocks and need not decode them again.
    decoded: dict[str, dict[int, list[dict[str, Any]]]] = field(default_factory=dict)


class Reconciler:
    """Compares and repairs targets; one database connection per worker thread."""

    def __init__(
        self,
        settings: Settings,
        options: ReconcileOptions | None = None,
        writer: SnapshotWriter | None = None,
    ) -> None:
        self.settings = settings
        self.options = options or ReconcileOptions()
        self.root = settings.s3.prefix
        self.writer = writer or SnapshotWriter(
            # The segments a comparison reads are kept for the repair that rewrites them.
            cast(ObjectStore, SegmentCache(ObjectStore(settings.s3), _SEGMENT_CACHE_BYTES)),
            VersionRegistry(settings.redis),
            settings.snapshot,
            self.root,
        )
        self._own_writer = writer is None
        self._local = threading.local()
        self._connections: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        # The worker threads outlive a run, and with them their database connections: a
        # scheduler that reconciles again in the same process does not connect again.
        self._workers = ThreadPoolExecutor(self.options.parallel, thread_name_prefix="reconcile")
        # Work a target runs beside its own thread: an object check, the two halves of a sum.
        self._beside = ThreadPoolExecutor(3 * self.options.parallel, thread_name_prefix="beside")
        # Reads of mismatching segments, for all targets at once.
        self._fetchers = ThreadPoolExecutor(_FETCH_THREADS, thread_name_prefix="fetch")
        self._listed: dict[str, dict[str, int]] = {}

    @property
    def store(self) -> ObjectStore:
        return self.writer.store

    @property
    def registry(self) -> VersionRegistry:
        return self.writer.registry

    def close(self) -> None:
        self._workers.shutdown(wait=True)
        self._beside.shutdown(wait=True)
        self._fetchers.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        if self._own_writer:
            self.writer.close()
            self.registry.close()

    def __enter__(self) -> Reconciler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self, role: str = "conn") -> psycopg.Connection:
        """This worker thread's connection (``role`` "half": its second one, for halves)."""
        conn: psycopg.Connection | None = getattr(self._local, role, None)
        if conn is None or conn.closed:
            conn = source.connect(
                self.settings.postgres.dsn.get_secret_value(), snapshots_only=True
            )
            # The sums are plain arithmetic over an index scan: compiling them, as PostgreSQL
            # does for a query over a large target, costs more than it saves, and the first
            # compile of a connection also loads LLVM (0.1 s or more, measured here).
            conn.execute("SET jit = off")
            conn.commit()
            setattr(self._local, role, conn)
            with self._lock:
                self._connections.append(conn)
        return conn

    def connect(self) -> None:
        """Give every worker thread its two database connections, unless it has them: a run
        does so before its first target, so that a wrong ``postgres.dsn`` fails the run once
        rather than every target, and no target's time includes connecting."""
        parallel = self.options.parallel
        # Each call holds its thread at the barrier until all have connected, so that the
        # calls land on as many distinct threads.
        barrier = threading.Barrier(parallel)

        def connect_one(_: int) -> None:
            try:
                self._conn()
                self._conn("half")
            except BaseException:
                barrier.abort()
                raise
            # A broken barrier means another worker failed to connect: its error is raised.
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=_CONNECT_TIMEOUT_S)

        list(self._workers.map(connect_one, range(parallel)))

    def _drop_conn(self) -> None:
        for role in ("conn", "half"):
            conn = getattr(self._local, role, None)
            if conn is not None:
                conn.close()
                setattr(self._local, role, None)

    # The run: one pass, or two around the grace period.

    def run(
        self,
        targets: Sequence[Target],
        on_done: Callable[[TargetReport], None] | None = None,
    ) -> ReconcileReport:
        """Reconcile ``targets``; never raises for one target's failure (it is reported)."""
        options = self.options
        report = ReconcileReport([], options.dry_run, options.grace_s, time.time())
        requests_before = self.store.requests
        started = time.monotonic()
        self.registry.ping()
        self.connect()
        self._list_datasets(targets)
        reports = {target: TargetReport(target) for target in targets}

        confirm = not options.dry_run and options.grace_s > 0
        repair_now = not options.dry_run and not confirm
        found = self._pass(reports, repair=repair_now, confirm=None, on_done=on_done)
        if confirm and found:
            log.info(
                "%d targets differ; comparing them again in %.1fs, so that changes the "
                "consumer is still applying are not taken for drift",
                len(found),
                options.grace_s,
            )
            time.sleep(options.grace_s)
            again = {target: reports[target] for target in found}
            self._pass(again, repair=True, confirm=found, on_done=None)

        report.targets = [reports[target] for target in targets]
        report.seconds = time.monotonic() - started
        report.s3_requests = self.store.requests - requests_before
        return report

    def _pass(
        self,
        reports: dict[Target, TargetReport],
        *,
        repair: bool,
        confirm: dict[Target, dict[int, Versions] | None] | None,
        on_done: Callable[[TargetReport], None] | None,
    ) -> dict[Target, dict[int, Versions] | None]:
        """Run every target on the worker threads; returns the targets found drifted but
        not repaired, with the differences seen (None: the target needs a bootstrap)."""
        found: dict[Target, dict[int, Versions] | None] = {}

        def one(target: Target) -> None:
            report = reports[target]
            started = time.monotonic()
            candidates = confirm.get(target) if confirm is not None else None
            try:
                result = self.reconcile_target(target, report, repair=repair, confirm=candidates)
                if report.outcome == DRIFT:
                    found[target] = result
            except Exception as error:  # one target's failure must not stop the others
                self._failed(report, error)
            report.seconds += time.monotonic() - started
            if on_done is not None:
                on_done(report)

        list(self._workers.map(one, list(reports)))
        return found

    def _list_datasets(self, targets: Sequence[Target]) -> None:
        """List the segment objects of each dataset the run covers widely, once: a LIST per
        target costs more than the comparison of a small target. A dataset holding more
        objects than the cap is left to per-target LISTs, to keep memory bounded."""
        self._listed = {}
        per_dataset = Counter(target.dataset for target in targets)
        for dataset, count in sorted(per_dataset.items()):
            if count < _LIST_DATASET_FROM:
                continue
            sizes: dict[str, int] = {}
            for info in self.store.list(object_keys.dataset_prefix(self.root, dataset)):
                if f"/{object_keys.SEGMENTS}" in info.key:
                    sizes[info.key] = info.size
                if len(sizes) > _LIST_DATASET_MAX_KEYS:
                    log.info(
                        "%s holds over %d segment objects: listed by target instead",
                        dataset,
                        _LIST_DATASET_MAX_KEYS,
                    )
                    break
            else:
                self._listed[dataset] = sizes

    def _failed(self, report: TargetReport, error: Exception) -> None:
        report.outcome = FAILED
        report.reason = f"{type(error).__name__}: {error}"
        expected = isinstance(error, StorageBuilderError | psycopg.Error | OSError)
        log.warning(
            "reconciliation of %s failed: %s",
            report.target,
            report.reason,
            exc_info=not expected,
            extra={"target": str(report.target)},
        )
        if isinstance(error, psycopg.Error):
            self._drop_conn()

    # One target.

    def reconcile_target(
        self,
        target: Target,
        report: TargetReport,
        *,
        repair: bool = True,
        confirm: dict[int, Versions] | None = None,
    ) -> dict[int, Versions] | None:
        """Compare one target and, if ``repair``, repair it; the outcome goes to ``report``.

        With ``confirm`` (the differences an earlier comparison saw), only rows that differ
        the same way now count as drift. Returns the differences found when not repairing
        (None when the target needs a bootstrap).
        """
        state = self._restore_registry(target, report)
        for attempt in range(1, self.options.max_attempts + 1):
            report.attempts = attempt
            try:
                comparison = self._compare(target, report, state)
            except _Rebuild as rebuild:
                report.reason = rebuild.reason
                if not repair:
                    report.outcome, report.method = DRIFT, BY_BOOTSTRAP
                    return None
                self._bootstrap(target, report)
                return None

            differences = self._confirmed(comparison.differences, confirm, report)
            report.count(differences)
            if not differences:
                self._no_row_drift(report)
                return None
            if not repair:
                report.outcome = DRIFT
                return {difference.key: difference.versions for difference in differences}

            try:
                self._repair(target, comparison, differences, report)
            except PublishConflict as conflict:
                # The consumer published meanwhile: compare again, its publish may hold the fix.
                log.warning("%s; comparing %s again (attempt %d)", conflict, target, attempt)
                state = None
                continue
            return None
        raise _gave_up(target, self.options.max_attempts)

    def _confirmed(
        self,
        differences: list[RowDifference],
        confirm: dict[int, Versions] | None,
        report: TargetReport,
    ) -> list[RowDifference]:
        if confirm is None:
            return differences
        stable = [d for d in differences if confirm.get(d.key) == d.versions]
        report.rows_in_flight = len(differences) - len(stable)
        if report.rows_in_flight:
            log.info(
                "%s: %d differing rows changed during the grace period; left to the consumer",
                report.target,
                report.rows_in_flight,
            )
        return stable

    def _no_row_drift(self, report: TargetReport) -> None:
        """The outcome of a target whose rows all match: its registry entry may still not."""
        if report.registry_rebuilt:
            report.outcome, report.method = REPAIRED, BY_REINDEX
        elif report.reason == REGISTRY_MISSING:
            report.outcome, report.method = DRIFT, BY_REINDEX
        else:
            report.outcome, report.method = IN_SYNC, None

    def _restore_registry(self, target: Target, report: TargetReport) -> TargetState | None:
        """Step 1: rebuild the registry entry from S3 if Redis lost it (not in a dry run).

        Returns the entry as Redis held it, when it did: the first comparison starts there.
        """
        if self.options.dry_run:
            return None
        state = self.registry.get(target)
        if state is not None:
            return state
        if reindex(self.registry, self.store, self.root, [target]):
            report.registry_rebuilt = True
            log.warning("registry entry of %s was missing; rebuilt from S3", target)
        return None

    def _state(self, target: Target, report: TargetReport) -> TargetState | None:
        state = self.registry.get(target)
        if state is None and self.options.dry_run:
            # A dry run writes nothing, not even Redis: take the newest manifest as it stands.
            found = newest_manifest(self.store, self.root, target)
            if found is not None:
                manifest, key = found
                report.reason = REGISTRY_MISSING
                return TargetState.of(manifest, key)
        return state

    def _compare(
        self, target: Target, report: TargetReport, state: TargetState | None = None
    ) -> _Comparison:
        """Steps 2 to 4: the differences between the target's snapshot and the database,
        from ``state`` when the caller has just read it from Redis."""
        if state is None:
            state = self._state(target, report)
        manifest = self._manifest(target, state) if state is not None else None
        report.version_before = state.version if state is not None else None
        # A manifest with deltas is compared as if compacted: its deltas are folded into the
        # segments they touch, in memory. Nothing is uploaded unless a repair publishes.
        pending: dict[str, bytes] = {}
        if manifest is not None and manifest.deltas:
            manifest, pending = self._fold(target, manifest)
        # The objects are checked while PostgreSQL computes the sums and mismatching segments
        # are read: a LIST can take longer than the first sums (S3Proxy reads the whole
        # folder). A missing or truncated object still decides before anything is repaired.
        checked = None
        if manifest is not None:
            checked = self._beside.submit(self._check_objects, target, manifest, pending)

        conn = self._conn()
        split = manifest is not None and manifest.rows > self.options.split_rows
        with source.compare_transaction(conn, export=split) as exported_id:
            comparison = self._compare_in_snapshot(
                conn, target, state, manifest, exported_id, checked, pending
            )
        report.rows = comparison.rows
        report.segments_read += comparison.segments_read
        return comparison

    def _compare_in_snapshot(
        self,
        conn: psycopg.Connection,
        target: Target,
        state: TargetState | None,
        manifest: Manifest | None,
        exported_id: str | None,
        objects_checked: Future[None] | None,
        pending: dict[str, bytes],
    ) -> _Comparison:
        comparison = _Comparison(state, manifest, pending=pending)
        if manifest is not None and manifest.segments:
            ranges = self._mismatched_blocks(
                conn, target, manifest, exported_id, objects_checked, comparison
            )
        else:
            # No segment: the target's whole key range is one range.
            (whole,) = segment_sums(conn, target, [], extent=False)
            comparison.rows = whole.rows
            if manifest is None:
                if whole.rows:
                    raise _Rebuild("no snapshot (no registry entry, no manifest in S3)")
                return comparison
            if objects_checked is not None:
                objects_checked.result()
            ranges = [(KeyRange(None, None, SnapshotKeys([], [])), whole)] if whole.rows else []
        if not ranges:
            return comparison

        try:
            comparison.differences = find_differences(
                conn, target, ranges, max_rows=self.options.max_repair_rows
            )
        except TooManyDifferences as error:
            raise _Rebuild(str(error)) from None
        _check_headers(target, ranges, comparison.differences)
        return comparison

    def _mismatched_blocks(
        self,
        conn: psycopg.Connection,
        target: Target,
        manifest: Manifest,
        exported_id: str | None,
        objects_checked: Future[None] | None,
        comparison: _Comparison,
    ) -> list[tuple[KeyRange, RangeSum]]:
        """The blocks whose sums differ from the database's, with the snapshot's side read.

        PostgreSQL sums every block's key range (one bucket per block, so the same scan also
        gives the first level of the bisection), and the sums are compared as they arrive
        (see :class:`_BlockComparison`). With an exported snapshot the segments are summed
        in two halves, streamed: the lower one on this worker's connection, the upper one on
        its second connection, importing the snapshot.
        """
        segments = manifest.segments
        blocks = [_block_bounds(segment) for segment in segments]
        halves = _halves(segments) if exported_id is not None else [(0, len(segments))]
        events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        streams: list[Future[None]] = []
        shares = [[bounds for per in blocks[start:end] for bounds in per] for start, end in halves]
        if len(halves) == 1:
            events.put(("sums", 0, range_sums(conn, target, shares[0], extent=False)))
            events.put(("summed", 0, None))
        else:
            connections = [(conn, None), (self._conn("half"), exported_id)]
            for half, (share, (connection, import_id)) in enumerate(
                zip(shares, connections, strict=True)
            ):
                streams.append(
                    self._beside.submit(
                        _stream_sums, connection, import_id, target, share, half, events
                    )
                )
        try:
            return _BlockComparison(
                self, target, manifest, blocks, halves, objects_checked, events, comparison
            ).run()
        finally:
            # The lower half runs on this worker's connection, inside its transaction.
            futures.wait(streams)

    def _check_extent(
        self,
        manifest: Manifest,
        mismatched: Sequence[tuple[SegmentEntry, RangeSum]],
        db_rows: int,
    ) -> None:
        """A target whose drift spans more than the repair limit is rebuilt, not bisected."""
        spanned = sum(max(segment.rows, found.rows) for segment, found in mismatched)
        if spanned > self.options.max_repair_rows and spanned * 2 > max(db_rows, manifest.rows):
            raise _Rebuild(
                f"{len(mismatched)} of {len(manifest.segments)} segments differ, holding "
                f"{spanned} rows: rebuilding is cheaper than comparing them row by row"
            )

    def _manifest(self, target: Target, state: TargetState) -> Manifest:
        try:
            manifest = self.writer.load_manifest(state, target)
        except (ObjectStoreError, SnapshotFormatError) as error:
            raise _Rebuild(f"manifest {state.manifest_key} cannot be read: {error}") from None
        if manifest.format_version != FORMAT_VERSION:
            raise _Rebuild(
                f"manifest {state.manifest_key} is of format {manifest.format_version}, "
                f"whose checksums cannot be compared with the database's (format {FORMAT_VERSION})"
            )
        return manifest

    def _fold(self, target: Target, manifest: Manifest) -> tuple[Manifest, dict[str, bytes]]:
        try:
            return self.writer.fold(target, manifest)
        except (ObjectStoreError, SnapshotFormatError) as error:
            raise _Rebuild(
                f"the deltas of version {manifest.version} cannot be read: {error}"
            ) from None

    def _check_objects(
        self, target: Target, manifest: Manifest, pending: Collection[str] = ()
    ) -> None:
        """Every segment object the manifest names exists with its size: no segment is read.

        The run's listing of the dataset answers when it holds them all; otherwise a LIST of
        the target does (a segment may have been written after the run's listing), from the
        first to the last of the names: a name begins with the time the segment was written,
        and the superseded segments written before or after those the manifest names, which
        gc has not collected yet, are not listed.
        """
        stored = [segment for segment in manifest.segments if segment.key not in pending]
        sizes = self._listed.get(target.dataset, {})
        if stored and any(sizes.get(segment.key) != segment.bytes for segment in stored):
            prefix = object_keys.target_prefix(self.root, target) + object_keys.SEGMENTS
            names = sorted(segment.key for segment in stored)
            listed = self.store.list(prefix, start=names[0], stop=names[-1])
            sizes = {info.key: info.size for info in listed}
        for segment in stored:
            size = sizes.get(segment.key)
            if size is None:
                raise _Rebuild(f"segment {segment.key} is missing from S3")
            if size != segment.bytes:
                raise _Rebuild(
                    f"segment {segment.key} has {size} bytes, its manifest says {segment.bytes}"
                )

    def _segment_ranges(
        self,
        target: Target,
        segment: SegmentEntry,
        data: bytes | Exception,
        block_bounds: list[tuple[int | None, int | None]],
        found: list[RangeSum],
        decoded: dict[int, list[dict[str, Any]]],
    ) -> list[tuple[KeyRange, RangeSum]]:
        """The ranges of a mismatching segment that differ, with the snapshot's side read.

        The segment's header holds each block's key range and checksum, so the blocks are
        compared with the database's sums per block without decoding any; only blocks that
        differ are decoded, and their rows go to ``decoded``. A segment whose header does
        not describe its blocks as the manifest does is decoded whole and compared as one
        range.
        """
        try:
            if isinstance(data, Exception):
                raise data
            blocks = _header_blocks(data, segment)
        except (ObjectStoreError, SnapshotFormatError, ValueError, KeyError) as error:
            raise _Rebuild(f"segment {segment.key} cannot be read: {error}") from None
        if blocks is None or [b.min_key for b in blocks] != segment.block_keys:
            whole = self._decode(target, segment, data, None)
            return [(KeyRange(segment.lo, segment.hi, whole[0]), _total(found))]

        wanted = {i for i, block in enumerate(blocks) if not found[i].matches(block)}
        keys = self._decode(target, segment, data, wanted, decoded)
        for index in wanted:
            held, header = keys[index], blocks[index]
            if (len(held.keys), held.keys[:1], held.keys[-1:]) != (
                header.rows,
                [header.min_key],
                [header.max_key],
            ):
                raise _Rebuild(f"block {index} of segment {segment.key} differs from its header")
        # The header's checksums stand for the blocks' own: hashing their rows again would
        # cost more than the rest of the comparison. A header that misstates one is caught
        # after the row by row comparison (see _check_headers).
        return [
            (KeyRange(*block_bounds[i], keys[i], held=blocks[i]), found[i]) for i in sorted(wanted)
        ]

    def _decode(
        self,
        target: Target,
        segment: SegmentEntry,
        data: bytes,
        wanted: set[int] | None,
        decoded: dict[int, list[dict[str, Any]]] | None = None,
    ) -> dict[int, SnapshotKeys]:
        """Keys and versions of the wanted blocks (None: of the whole segment, as block 0);
        the rows of the wanted blocks go to ``decoded``."""
        dataset = get_dataset(target.dataset)
        try:
            if wanted is None:
                keys = SnapshotKeys.of_rows(dataset, iter_segment_rows(data))
                held = keys.total
                inside = not keys.keys or (
                    segment.owns(keys.keys[0]) and segment.owns(keys.keys[-1])
                )
                if not inside or not held.matches(_entry_sum(segment)):
                    raise _Rebuild(f"segment {segment.key} does not hold what its manifest says")
                return {0: keys}
            rows_of = block_rows_of(dataset, data, wanted)
            if decoded is not None:
                decoded.update(rows_of)
            return {index: SnapshotKeys.of_rows(dataset, rows) for index, rows in rows_of.items()}
        except (SnapshotFormatError, ValueError, KeyError, EOFError) as error:
            raise _Rebuild(f"segment {segment.key} cannot be read: {error}") from None

    def _repair(
        self,
        target: Target,
        comparison: _Comparison,
        differences: list[RowDifference],
        report: TargetReport,
    ) -> None:
        """Step 5: rewrite the segments holding the differences; publish over the compared
        state, from the manifest already read for the comparison."""
        state = comparison.state
        assert state is not None
        upserts = {d.key: d.row for d in differences if d.row is not None}
        deletes = [d.key for d in differences if d.row is None]
        # The source position stays the consumer's: every change after it is still applied.
        result = self.writer.apply_changes(
            target,
            upserts,
            deletes,
            state.source_position,
            expected=state,
            manifest=comparison.manifest,
            pending=comparison.pending,
            decoded=comparison.decoded,
        )
        report.outcome, report.method = REPAIRED, BY_SEGMENTS
        report.segments_rewritten = result.segments_rewritten
        report.version_after = result.manifest.version
        log.info(
            "repaired %s: %d rows added, %d changed, %d removed (first keys %s); "
            "%d segments rewritten, version %d",
            target,
            report.rows_added,
            report.rows_changed,
            report.rows_removed,
            [difference.key for difference in differences[:10]],
            result.segments_rewritten,
            result.manifest.version,
            extra={"target": str(target), "version": result.manifest.version},
        )

    def _bootstrap(self, target: Target, report: TargetReport) -> None:
        """The fallback: build the target again from the database."""
        from bootstrap.snapshot import BOOTSTRAPPED, bootstrap_target

        log.warning("%s cannot be repaired in place (%s); bootstrapping it", target, report.reason)
        for attempt in range(1, self.options.max_attempts + 1):
            force = self.registry.get(target) is not None
            try:
                result = bootstrap_target(
                    target, self.settings, force=force, writer=self.writer, conn=self._conn()
                )
            except PublishConflict as conflict:
                log.warning("%s; bootstrapping %s again (attempt %d)", conflict, target, attempt)
                continue
            if result.outcome != BOOTSTRAPPED:
                raise SnapshotFormatError(f"bootstrap of {target} ended {result.outcome}")
            report.outcome, report.method = REPAIRED, BY_BOOTSTRAP
            report.rows = result.rows
            report.version_after = result.version
            return
        raise _gave_up(target, self.options.max_attempts)


# What the comparison's queue carries: ("sums", half, sums), ("summed", half, None),
# ("failed", half, error) or ("read", segment index, bytes or error).
_Event = tuple[str, int, object]


class _BlockComparison:
    """A target's segments compared with the database's sums of their blocks as the sums
    arrive.

    A segment is compared as soon as the sums of all its blocks are in; a mismatching one
    is read from S3 and its differing blocks decoded while the database still sums the
    segments after it, so that the process's share of the comparison runs beside the
    database's rather than after it. Everything happens on the calling thread, which takes
    the sums and the segments read, in the order they come, from one queue of events.
    """

    def __init__(
        self,
        reconciler: Reconciler,
        target: Target,
        manifest: Manifest,
        blocks: list[list[tuple[int | None, int | None]]],
        halves: list[tuple[int, int]],
        objects_checked: Future[None] | None,
        events: queue.SimpleQueue[_Event],
        comparison: _Comparison,
    ) -> None:
        self._reconciler = reconciler
        self._events = events
        self._comparison = comparison
        self._reads = _Reads(reconciler, comparison.pending, events)
        self._target = target
        self._manifest = manifest
        self._blocks = blocks
        self._halves = len(halves)
        self._arrivals = _Arrivals(blocks, halves)
        self._objects_checked = objects_checked
        self._summed = 0
        self._mismatched: dict[int, RangeSum] = {}  # the database's sum of each, by segment
        self._spanned = 0
        self._held: list[int] = []  # mismatching segments to read once the extent is checked
        self._ranges: dict[int, list[tuple[KeyRange, RangeSum]]] = {}
        self._kept = _KEEP_DECODED_ROWS

    def run(self) -> list[tuple[KeyRange, RangeSum]]:
        """Take events until every block is summed and every mismatching segment read;
        returns the differing blocks in key order."""
        try:
            while self._summed < self._halves or self._reads.outstanding:
                kind, index, payload = self._events.get()
                if kind == "failed":
                    raise cast(Exception, payload)
                if kind == "summed":
                    self._on_summed()
                elif kind == "sums":
                    self._on_sums(index, cast(list[RangeSum], payload))
                else:
                    self._on_read(index, cast("bytes | Exception", payload))
        finally:
            self._reads.cancel()
        if self._objects_checked is not None:
            self._objects_checked.result()
        self._comparison.rows = self._arrivals.rows
        self._comparison.segments_read = len(self._mismatched)
        return [block for i in sorted(self._ranges) for block in self._ranges[i]]

    def _on_sums(self, half: int, sums: list[RangeSum]) -> None:
        segments = self._manifest.segments
        for index in self._arrivals.add(half, sums):
            found = _total(self._arrivals.of(index))
            if found.matches(_entry_sum(segments[index])):
                continue
            self._mismatched[index] = found
            self._spanned += max(segments[index].rows, found.rows)
            if self._spanned > self._reconciler.options.max_repair_rows:
                self._held.append(index)
            else:
                self._reads.start([(index, segments[index])])

    def _on_summed(self) -> None:
        """Once every block is summed, a drift too wide to repair in place is known."""
        self._summed += 1
        if self._summed < self._halves or not self._held:
            return
        segments = self._manifest.segments
        spans = [(segments[i], found) for i, found in self._mismatched.items()]
        self._reconciler._check_extent(self._manifest, spans, self._arrivals.rows)
        self._reads.start([(i, segments[i]) for i in self._held])
        self._held = []

    def _on_read(self, index: int, data: bytes | Exception) -> None:
        self._reads.outstanding -= 1
        segment = self._manifest.segments[index]
        decoded: dict[int, list[dict[str, Any]]] = {}
        try:
            self._ranges[index] = self._reconciler._segment_ranges(
                self._target,
                segment,
                data,
                self._blocks[index],
                self._arrivals.of(index),
                decoded,
            )
        except _Rebuild:
            # The segment is read without waiting for the check of every object, which
            # tells more precisely why a missing or truncated one cannot be read.
            if self._objects_checked is not None:
                self._objects_checked.result()
            raise
        # The decoded rows are kept for the repair, up to a bound on memory.
        self._kept -= sum(len(rows) for rows in decoded.values())
        if self._kept >= 0:
            self._comparison.decoded[segment.key] = decoded


def _stream_sums(
    conn: psycopg.Connection,
    import_id: str | None,
    target: Target,
    ranges: list[tuple[int | None, int | None]],
    half: int,
    events: queue.SimpleQueue[_Event],
) -> None:
    """Put the sums of ``ranges`` into ``events`` as the database sends them, then say the
    half is summed (or why it failed); with ``import_id``, in a transaction of its own
    importing that snapshot. Whatever fails, the comparison hears of it: it waits for one
    or the other."""
    try:
        transaction = (
            source.compare_transaction(conn, import_id=import_id)
            if import_id is not None
            else contextlib.nullcontext()
        )
        # The stream is closed on the way out, whatever happens: left open, it would hold
        # the connection.
        with transaction, contextlib.closing(stream_range_sums(conn, target, ranges)) as stream:
            for sums in stream:
                events.put(("sums", half, sums))
    except Exception as error:  # raised again by the comparison, in its own thread
        events.put(("failed", half, error))
    else:
        events.put(("summed", half, None))


def _halves(segments: Sequence[SegmentEntry]) -> list[tuple[int, int]]:
    """The segments cut into two runs ``[start, end)`` holding about as many rows each."""
    total = sum(segment.rows for segment in segments)
    running = [*accumulate(segment.rows for segment in segments[:-1])]
    if not running:
        return [(0, len(segments))]
    cut = 1 + min(range(len(running)), key=lambda i: abs(2 * running[i] - total))
    return [(0, cut), (cut, len(segments))]


class _Arrivals:
    """The sums of a target's blocks as they arrive, in key order within each half; tells
    which segments have the sums of all their blocks."""

    def __init__(
        self, blocks: list[list[tuple[int | None, int | None]]], halves: list[tuple[int, int]]
    ) -> None:
        self._first = [0, *accumulate(len(per_segment) for per_segment in blocks)]
        self._sums = [EMPTY] * self._first[-1]
        self._next = [start for start, _ in halves]
        self._ends = [end for _, end in halves]
        self._filled = [self._first[start] for start, _ in halves]

    def add(self, half: int, sums: list[RangeSum]) -> list[int]:
        """Take the next sums of ``half``; returns the segments they complete."""
        at = self._filled[half]
        self._sums[at : at + len(sums)] = sums
        self._filled[half] = at + len(sums)
        complete = []
        segment = self._next[half]
        while segment < self._ends[half] and self._first[segment + 1] <= self._filled[half]:
            complete.append(segment)
            segment += 1
        self._next[half] = segment
        return complete

    def of(self, segment: int) -> list[RangeSum]:
        return self._sums[self._first[segment] : self._first[segment + 1]]

    @property
    def rows(self) -> int:
        return sum(found.rows for found in self._sums)


class _Reads:
    """Reads of mismatching segments, concurrent, each put into the comparison's events
    when done: its bytes, or the error that stopped it."""

    def __init__(
        self, reconciler: Reconciler, pending: dict[str, bytes], events: queue.SimpleQueue[_Event]
    ) -> None:
        self._pool = reconciler._fetchers
        self._store = reconciler.store
        self._pending = pending
        self._events = events
        self._futures: list[Future[bytes]] = []
        self.outstanding = 0

    def start(self, segments: Iterable[tuple[int, SegmentEntry]]) -> None:
        for index, segment in segments:
            future = self._pool.submit(self._read, segment.key)
            future.add_done_callback(functools.partial(self._done, index))
            self._futures.append(future)
            self.outstanding += 1

    def _read(self, key: str) -> bytes:
        return self._pending.get(key) or self._store.get(key)

    def _done(self, index: int, future: Future[bytes]) -> None:
        if not future.cancelled():
            self._events.put(("read", index, future.exception() or future.result()))

    def cancel(self) -> None:
        """A comparison that stops early reads no further."""
        for future in self._futures:
            future.cancel()


def _header_blocks(data: bytes, segment: SegmentEntry) -> list[RangeSum] | None:
    """Each block's rows, checksum and keys from the segment's header, checked against the
    manifest entry; None when the header does not describe its blocks."""
    described = segment_metadata(data).get(META_BLOCKS)
    if not described:
        return None
    blocks = [
        RangeSum(rows, int(checksum), first, last)
        for first, last, rows, checksum in json.loads(described)
    ]
    total = RangeSum(sum(b.rows for b in blocks), sum(b.checksum for b in blocks))
    keys = [k for block in blocks for k in (block.min_key, block.max_key) if k is not None]
    inside = len(keys) == 2 * len(blocks) > 0 and segment.owns(keys[0]) and segment.owns(keys[-1])
    if not (inside and keys == sorted(keys) and total.matches(_entry_sum(segment))):
        raise SnapshotFormatError(f"the header of segment {segment.key} contradicts its manifest")
    return blocks


def _check_headers(
    target: Target,
    ranges: Sequence[tuple[KeyRange, RangeSum]],
    differences: Sequence[RowDifference],
) -> None:
    """A block whose sum in its segment header differs from the database's while none of
    its rows do has a header that misstates it: the target is rebuilt."""
    keys = [difference.key for difference in differences]  # sorted
    for key_range, _ in ranges:
        if key_range.held is None:
            continue
        lo, hi = key_range.bounds()
        start = bisect_left(keys, lo)
        if start == len(keys) or keys[start] > hi:
            raise _Rebuild(
                f"a segment header of {target} misstates the checksum of its block of keys "
                f"{lo} to {hi}: the rows themselves equal the database's"
            )


def _block_bounds(segment: SegmentEntry) -> list[tuple[int | None, int | None]]:
    """The key range ``[lo, hi)`` each block of a segment owns: from its first key (the
    first block: from the segment's lo) to the next block's first key."""
    edges = [segment.lo, *segment.block_keys[1:], segment.hi]
    return list(zip(edges, edges[1:], strict=False))


def _total(sums: Sequence[RangeSum]) -> RangeSum:
    return RangeSum(sum(s.rows for s in sums), sum(s.checksum for s in sums))


def _entry_sum(segment: SegmentEntry) -> RangeSum:
    return RangeSum(segment.rows, parse_checksum(segment.checksum))


def _gave_up(target: Target, attempts: int) -> RegistryError:
    return RegistryError(
        f"{target} lost the compare-and-set {attempts} times in a row: it changes faster than "
        "it can be compared; run the reconciliation again later"
    )


# Which targets a run covers.


def _clients_query(dataset_name: str) -> sql.Composed:
    """The distinct clients of a table, by skipping through the primary-key index."""
    dataset = get_dataset(dataset_name)
    return sql.SQL(
        "WITH RECURSIVE c(id) AS ("
        " (SELECT {client} FROM {table} ORDER BY {client} LIMIT 1)"
        " UNION ALL"
        " SELECT (SELECT {client} FROM {table} WHERE {client} > c.id ORDER BY {client} LIMIT 1)"
        " FROM c WHERE c.id IS NOT NULL)"
        " SELECT id FROM c WHERE id IS NOT NULL"
    ).format(
        client=sql.Identifier(dataset.client_column),
        table=sql.SQL("{}.{}").format(sql.Identifier(dataset.schema), sql.Identifier(dataset.name)),
    )


def select_targets(
    settings: Settings,
    *,
    datasets: Sequence[str] | None = None,
    clients: Sequence[object] | None = None,
    every: bool = False,
    store: ObjectStore | None = None,
    registry: VersionRegistry | None = None,
) -> list[Target]:
    """The targets named by ``--dataset``, ``--client`` and ``--all``.

    Named clients give every (dataset, client) pair. Otherwise every target known anywhere
    is taken: clients with rows in the database, targets in the registry and targets with
    objects in S3 (a snapshot whose rows were all deleted still has to be emptied).
    """
    if clients and every:
        raise ConfigError("--client and --all exclude each other; name clients or take all")
    if not (datasets or clients or every):
        raise ConfigError("name the targets to reconcile: --client ID, --dataset NAME or --all")
    names = sorted({get_dataset(name).name for name in datasets} if datasets else DATASETS)
    if clients:
        ids = sorted({parse_client_id(client) for client in clients})
        return [Target(name, client) for name in names for client in ids]

    found: set[Target] = set()
    with source.connect(settings.postgres.dsn.get_secret_value()) as conn:
        for name in names:
            found.update(Target(name, client) for (client,) in conn.execute(_clients_query(name)))
    registry = registry or VersionRegistry(settings.redis)
    store = store or ObjectStore(settings.s3)
    known: Iterable[Target] = [*registry.targets(), *discover_targets(store, settings.s3.prefix)]
    found.update(target for target in known if target.dataset in names)
    return sorted(found)


# The command.


def register(app: typer.Typer) -> None:
    """Add ``reconcile`` to the app and ``reconcile`` to ``bench``."""
    app.command("reconcile")(reconcile_command)

    from bootstrap.reconcile_bench import bench_reconcile_command
    from storage_builder.bench import bench_app

    bench_app.command("reconcile")(bench_reconcile_command)


def reconcile_command(
    ctx: typer.Context,
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", help="A dataset (repeatable); default all.")
    ] = None,
    client: Annotated[
        list[str] | None, typer.Option("--client", help="A client id (repeatable).")
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Every target in the database, Redis or S3.")
    ] = False,
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=64)] = 4,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report drift; write nothing, not even Redis.")
    ] = False,
    grace: Annotated[
        float,
        typer.Option(
            "--grace",
            min=0,
            help="Seconds a difference must persist to count as drift (0: repair at once).",
        ),
    ] = 5.0,
    report_file: Annotated[
        Path | None, typer.Option("--report", help="Write the report as JSON to this file.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Prove snapshots equal the database by checksums; repair only what drifted.

    Exit code: 0 every target in sync, 3 drift found (and repaired, unless --dry-run),
    1 any target failed (failure wins over drift), 2 bad arguments or settings.
    """
    from storage_builder.cli import settings_of
    from storage_builder.metrics import write_job_metrics

    settings = settings_of(ctx)
    options = ReconcileOptions(dry_run=dry_run, grace_s=grace, parallel=parallel)
    console = Console(stderr=True)
    with Reconciler(settings, options) as reconciler:
        targets = select_targets(
            settings,
            datasets=dataset,
            clients=client,
            every=every,
            store=reconciler.store,
            registry=reconciler.registry,
        )
        log.info("reconciling %d targets (parallel %d, grace %.1fs)", len(targets), parallel, grace)
        progress = Progress(
            TextColumn("reconcile"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[drift]}"),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
        )
        task = progress.add_task("reconcile", total=len(targets), drift="")
        drifted = {"targets": 0}

        def on_done(target: TargetReport) -> None:
            drifted["targets"] += target.outcome != IN_SYNC
            progress.update(task, advance=1, drift=f"{drifted['targets']} not in sync")

        with progress:
            report = reconciler.run(targets, on_done=on_done)

    # A log file or a scheduler's mail is not a terminal: keep the table readable there.
    out = Console()
    render_table(report, out if out.is_terminal else Console(width=160))
    if report_file is not None:
        write_json(report, report_file)
    if not dry_run:
        write_job_metrics(
            "reconcile",
            succeeded=report.exit_code != EXIT_FAILED,
            duration_s=report.seconds,
            targets=report.counts(),
            drift_rows=report.drift_rows(),
        )
    raise typer.Exit(report.exit_code)
