"""Building and publishing the full snapshot of targets straight from PostgreSQL.

A target is read in one REPEATABLE READ transaction; its ``pg_current_snapshot()`` becomes
the source position the stream hands off from. Rows stream from a server-side cursor into
the segment encoder and the uploads, so memory holds one batch and the segments in flight,
never the target.

Many targets run on a few long-lived worker processes (:mod:`bootstrap.worker`), each with
its own connection, so small targets pay no start-up cost. Workers read and encode; this
process, the coordinator, uploads their segments as they arrive and publishes. A large
target is cut into key ranges read by several workers that import one exported database
snapshot; the coordinator keeps the exporting transaction open until every range is read,
then publishes the contiguous manifest with a compare-and-set (expected version: none, or
the current one with force).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import IO, Any

import psycopg

from bootstrap import source
from bootstrap.worker import RangeTask, describe, range_segments
from schemas.datasets import Target, get_dataset
from snapshots import keys as object_keys
from snapshots.checksums import format_checksum
from snapshots.faults import crash_point
from snapshots.manifest import SegmentEntry, SourcePosition
from snapshots.publish import SnapshotWriter
from snapshots.registry import VersionRegistry
from snapshots.segments import EncodedSegment
from snapshots.store import ObjectStore
from storage_builder.errors import StorageBuilderError
from storage_builder.settings import Settings, SnapshotSettings

log = logging.getLogger(__name__)

BOOTSTRAPPED = "bootstrapped"
SKIPPED = "skipped"
FAILED = "failed"

# A target above this many rows is read by several workers in key ranges of about this size.
SPLIT_ROWS = 250_000

# The coordinator's segment uploads: threads, and segments held in memory at most (across
# every worker) while they upload. Enough to keep S3 busy while the workers encode; a
# worker whose segment finds no slot waits, blocked on its pipe.
UPLOAD_THREADS = 3
UPLOADS_IN_FLIGHT = 4


@dataclass
class BootstrapResult:
    """What happened to one target."""

    target: Target
    outcome: str
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    version: int | None = None
    error: str | None = None


@dataclass
class _RangeResult:
    """The segments a worker wrote for one key range of a target."""

    segments: list[SegmentEntry]
    rows: int
    bytes: int
    pg_snapshot: str


@dataclass
class _Plan:
    target: Target
    rows: int
    expected: int | None
    parts: int = 1
    ranges: list[tuple[int | None, int | None]] = field(default_factory=list)


def open_writer(settings: Settings) -> SnapshotWriter:
    """A snapshot writer on the configured S3 store and Redis registry (no network yet)."""
    return SnapshotWriter(
        ObjectStore(settings.s3),
        VersionRegistry(settings.redis),
        settings.snapshot,
        settings.s3.prefix,
    )


def _expected_version(writer: SnapshotWriter, target: Target, force: bool) -> int | None | str:
    """The version a publish must replace, or SKIPPED when the target exists and not force."""
    state = writer.registry.get(target)
    if state is None:
        return None
    return state.version if force else SKIPPED


def _range_task(
    snapshot: SnapshotSettings,
    target: Target,
    lo: int | None = None,
    hi: int | None = None,
    import_id: str | None = None,
) -> RangeTask:
    return RangeTask(
        target=target,
        lo=lo,
        hi=hi,
        import_id=import_id,
        codec=snapshot.codec,
        block_rows=snapshot.block_rows,
        max_rows=snapshot.segment_max_rows,
    )


def _counting(
    segments: Iterator[EncodedSegment],
    counted: dict[str, int],
    on_rows: Callable[[int], None] | None,
) -> Iterator[EncodedSegment]:
    for segment in segments:
        counted["rows"] += segment.rows
        if on_rows is not None:
            on_rows(segment.rows)
        yield segment


def read_range(
    conn: psycopg.Connection,
    writer: SnapshotWriter,
    target: Target,
    *,
    lo: int | None = None,
    hi: int | None = None,
    import_id: str | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> _RangeResult:
    """Read ``[lo, hi)`` of a target in this process, in one snapshot transaction; encode
    and upload it."""
    task = _range_task(writer.snapshot, target, lo, hi, import_id)
    counted = {"rows": 0}
    uploads = _Uploads(writer)
    try:
        with range_segments(conn, task) as (pg_snapshot, segments):
            # Bounds are set when the ranges are joined (see contiguous); a range with no
            # rows has no segment (an empty target publishes a manifest without segments).
            entries = uploads.upload(target, _counting(segments, counted, on_rows))
    finally:
        uploads.close()
    crash_point("after_segments")
    return _RangeResult(
        segments=entries,
        rows=counted["rows"],
        bytes=sum(entry.bytes for entry in entries),
        pg_snapshot=pg_snapshot,
    )


def contiguous(parts: Sequence[list[SegmentEntry]]) -> list[SegmentEntry]:
    """Join the segments of consecutive key ranges into one contiguous manifest list.

    Each segment owns the keys from its own first key (the first segment: from None) up to
    the next segment's first key (the last: to None), so every key has exactly one segment.
    """
    entries = [entry for part in parts for entry in part]
    fixed = []
    for index, entry in enumerate(entries):
        lo = None if index == 0 else entry.min_key
        hi = entries[index + 1].min_key if index + 1 < len(entries) else None
        fixed.append(entry.model_copy(update={"lo": lo, "hi": hi}))
    return fixed


def bootstrap_target(
    target: Target,
    settings: Settings,
    *,
    force: bool = False,
    writer: SnapshotWriter | None = None,
    conn: psycopg.Connection | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> BootstrapResult:
    """Build and publish the full snapshot of one target, in this process.

    Skipped when the target already has a version, unless ``force``. Errors propagate;
    nothing is published unless every segment was written.
    """
    started = time.monotonic()
    own_writer = writer is None
    own_conn = conn is None
    writer = writer or open_writer(settings)
    conn = conn or source.connect(settings.postgres.dsn.get_secret_value())
    try:
        expected = _expected_version(writer, target, force)
        if expected == SKIPPED:
            return BootstrapResult(target, SKIPPED, seconds=time.monotonic() - started)
        assert expected is None or isinstance(expected, int)
        result = read_range(conn, writer, target, on_rows=on_rows)
        manifest = writer.publish(
            target,
            expected,
            contiguous([result.segments]),
            SourcePosition(pg_snapshot=result.pg_snapshot),
        )
    finally:
        if own_conn:
            conn.close()
        if own_writer:
            writer.close()
    return BootstrapResult(
        target,
        BOOTSTRAPPED,
        rows=result.rows,
        bytes=result.bytes,
        seconds=time.monotonic() - started,
        version=manifest.version,
    )


# The worker processes and the coordinator.


class WorkerFailed(StorageBuilderError):
    """A worker process could not read a range: it failed or died."""


# glibc's malloc raises its mmap threshold after the first large buffer is freed, and then
# keeps the freed segment buffers of every thread's arena instead of returning them: a
# fixed threshold returns each segment's memory as soon as it is uploaded.
_MMAP_THRESHOLD = 256 * 1024
_M_MMAP_THRESHOLD = -3


def _return_large_buffers() -> None:
    """Fix this process's malloc mmap threshold (glibc only; elsewhere nothing changes)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    except (OSError, AttributeError):
        log.debug("mallopt is not available; malloc keeps its defaults")


def _worker_environment() -> dict[str, str]:
    # The same for the workers, through glibc's environment tunables, and few arenas.
    return {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD),
        "MALLOC_ARENA_MAX": "2",
    }


class _Worker:
    """One worker process (see :mod:`bootstrap.worker`), running one task at a time."""

    def __init__(self, dsn: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bootstrap.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_worker_environment(),
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._inbox: IO[bytes] = self.process.stdin
        self._outbox: IO[bytes] = self.process.stdout
        self._send(("hello", dsn))

    def _send(self, message: Any) -> None:
        pickle.dump(message, self._inbox, protocol=pickle.HIGHEST_PROTOCOL)
        self._inbox.flush()

    def _receive(self) -> tuple[Any, ...]:
        try:
            message: tuple[Any, ...] = pickle.load(self._outbox)
        except (EOFError, pickle.UnpicklingError) as error:
            code = self.process.poll()
            raise WorkerFailed(f"bootstrap worker died (exit code {code}): {error!r}") from None
        return message

    def run(self, task: RangeTask, result: dict[str, Any]) -> Iterator[EncodedSegment]:
        """The segments of ``task`` as the worker sends them; then ``result`` holds its rows
        and pg_snapshot. A failure of the task raises WorkerFailed once its segments end."""
        self._send(task)
        while True:
            message = self._receive()
            if message[0] == "segment":
                yield message[1]
            elif message[0] == "done":
                result["rows"], result["pg_snapshot"] = message[1], message[2]
                return
            else:
                raise WorkerFailed(message[1])

    def stop(self) -> None:
        try:
            self._send(None)
            self._inbox.close()
        except OSError:
            pass  # it is gone already
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("bootstrap worker %d did not stop; killed", self.process.pid)
            self.process.kill()
            self.process.wait()


class _Uploads:
    """The coordinator's segment uploads, for every worker, with a bound on memory.

    Unlike :meth:`SnapshotWriter.upload_segments`, a segment's bytes are released as soon
    as it is written, and the bound holds across all the targets being read at once.
    """

    def __init__(self, writer: SnapshotWriter) -> None:
        self.store = writer.store
        self.root = writer.root
        self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="segment-upload")
        self._slots = threading.BoundedSemaphore(UPLOADS_IN_FLIGHT)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _put(self, key: str, data: bytes) -> None:
        try:
            self.store.put(key, data)
        finally:
            self._slots.release()

    def upload(self, target: Target, segments: Iterator[EncodedSegment]) -> list[SegmentEntry]:
        """Upload segments as they come; their manifest entries, in order (bounds unset:
        see :func:`contiguous`). The first failed upload stops the reading."""
        pending: list[tuple[SegmentEntry, Future[None]]] = []
        for segment in segments:
            self._slots.acquire()
            key = object_keys.segment_key(self.root, target)
            pending.append((_entry(key, segment), self._pool.submit(self._put, key, segment.data)))
            del segment
            failed = next((f for _, f in pending if f.done() and f.exception()), None)
            if failed is not None:
                failed.result()
        for _, future in pending:
            future.result()
        return [entry for entry, _ in pending]


def _entry(key: str, segment: EncodedSegment) -> SegmentEntry:
    return SegmentEntry(
        key=key,
        lo=None,
        hi=None,
        min_key=segment.min_key,
        max_key=segment.max_key,
        rows=segment.rows,
        bytes=len(segment.data),
        checksum=format_checksum(segment.checksum),
        block_keys=segment.block_keys,
    )


class Coordinator:
    """Runs the bootstrap of many targets on ``parallel`` worker processes."""

    def __init__(
        self,
        settings: Settings,
        *,
        parallel: int,
        force: bool = False,
        on_rows: Callable[[int], None] | None = None,
        on_result: Callable[[BootstrapResult], None] | None = None,
    ) -> None:
        self.settings = settings
        self.parallel = max(1, parallel)
        self.force = force
        self.on_rows = on_rows
        self.on_result = on_result
        self.registry = VersionRegistry(settings.redis)
        self._dsn = settings.postgres.dsn.get_secret_value()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._uploads: _Uploads | None = None
        self._progress = threading.Lock()

    def plan(self, targets: Sequence[Target]) -> tuple[list[_Plan], list[BootstrapResult]]:
        """Which targets to build (biggest first) and which to skip; checks Redis first, so
        an unreachable Redis fails the command before anything is written."""
        self.registry.ping()
        states = self.registry.get_many(targets)
        with source.connect(self._dsn) as conn:
            counts = _row_counts(conn, targets)
        plans, skipped = [], []
        for target in targets:
            state = states.get(target)
            if state is not None and not self.force:
                skipped.append(BootstrapResult(target, SKIPPED, version=state.version))
                continue
            rows = counts.get(target, 0)
            parts = min(math.ceil(rows / SPLIT_ROWS), 2 * self.parallel) if self.parallel > 1 else 1
            plans.append(_Plan(target, rows, state.version if state else None, max(parts, 1)))
        plans.sort(key=lambda plan: -plan.rows)
        return plans, skipped

    def run(
        self, plans: Sequence[_Plan], writer: SnapshotWriter | None = None
    ) -> list[BootstrapResult]:
        """Bootstrap the planned targets; every one ends as bootstrapped or failed."""
        if not plans:
            return []
        _return_large_buffers()
        own_writer = writer is None
        writer = writer or open_writer(self.settings)
        self._uploads = _Uploads(writer)
        workers = [_Worker(self._dsn) for _ in range(min(self.parallel, _ranges(plans)))]
        for worker in workers:
            self._idle.put(worker)
        results: list[BootstrapResult] = []
        try:
            # Targets outnumber workers two to one, so a worker never waits for a publish.
            with ThreadPoolExecutor(2 * len(workers), thread_name_prefix="bootstrap") as pool:
                futures = [pool.submit(self._drive, writer, plan) for plan in plans]
                for future in as_completed(futures):
                    result = future.result()
                    results.append(result)
                    if result.outcome == BOOTSTRAPPED:
                        log.info(
                            "bootstrapped %s: version %s, %d rows, %d bytes, %.2fs",
                            result.target,
                            result.version,
                            result.rows,
                            result.bytes,
                            result.seconds,
                            extra={"target": str(result.target), "version": result.version},
                        )
                    if self.on_result is not None:
                        self.on_result(result)
        finally:
            for worker in workers:
                worker.stop()
            self._uploads.close()
            if own_writer:
                writer.close()
        return results

    def _report(self, rows: int) -> None:
        if self.on_rows is not None:
            with self._progress:
                self.on_rows(rows)

    def _read(self, writer: SnapshotWriter, task: RangeTask) -> _RangeResult:
        """One range on an idle worker, its segments uploaded as they come."""
        worker = self._idle.get()
        try:
            result: dict[str, Any] = {}
            counted = {"rows": 0}
            segments = _counting(worker.run(task, result), counted, self._report)
            assert self._uploads is not None, "uploads are set up by run()"
            entries = self._uploads.upload(task.target, segments)
        except WorkerFailed:
            # A task that failed leaves its worker ready for the next; a dead one is replaced.
            self._idle.put(worker if worker.process.poll() is None else _Worker(self._dsn))
            raise
        except BaseException:
            # An upload failed mid-task: the worker still has segments to send, so it
            # cannot take another task; a fresh one replaces it.
            worker.process.kill()
            worker.process.wait()
            self._idle.put(_Worker(self._dsn))
            raise
        self._idle.put(worker)
        return _RangeResult(
            segments=entries,
            rows=result["rows"],
            bytes=sum(entry.bytes for entry in entries),
            pg_snapshot=result["pg_snapshot"],
        )

    def _drive(self, writer: SnapshotWriter, plan: _Plan) -> BootstrapResult:
        started = time.monotonic()
        try:
            result = self._bootstrap(writer, plan)
        except (StorageBuilderError, psycopg.Error, ValueError, OSError) as error:
            result = BootstrapResult(plan.target, FAILED, error=describe(error))
        except Exception as error:  # one target's surprise must not hide the other targets
            log.exception("bootstrap of %s failed unexpectedly", plan.target)
            result = BootstrapResult(plan.target, FAILED, error=describe(error))
        result.seconds = time.monotonic() - started
        if result.outcome == FAILED:
            log.warning("bootstrap of %s failed: %s", plan.target, result.error)
        return result

    def _bootstrap(self, writer: SnapshotWriter, plan: _Plan) -> BootstrapResult:
        snapshot = self.settings.snapshot
        if plan.parts <= 1:
            ranges = [self._read(writer, _range_task(snapshot, plan.target))]
            pg_snapshot = ranges[0].pg_snapshot
        else:
            ranges, pg_snapshot = self._split(writer, plan)
        crash_point("after_segments")
        manifest = writer.publish(
            plan.target,
            plan.expected,
            contiguous([part.segments for part in ranges]),
            SourcePosition(pg_snapshot=pg_snapshot),
        )
        return BootstrapResult(
            plan.target,
            BOOTSTRAPPED,
            rows=sum(part.rows for part in ranges),
            bytes=sum(part.bytes for part in ranges),
            version=manifest.version,
        )

    def _split(self, writer: SnapshotWriter, plan: _Plan) -> tuple[list[_RangeResult], str]:
        """A large target: ranges read by several workers in one exported snapshot."""
        target = plan.target
        with (
            source.connect(self._dsn) as conn,
            source.snapshot_transaction(conn, export=True) as snap,
        ):
            points = source.split_points(conn, target, plan.parts)
            bounds: list[int | None] = [None, *points, None]
            tasks = [
                _range_task(self.settings.snapshot, target, lo, hi, snap.exported_id)
                for lo, hi in zip(bounds, bounds[1:], strict=False)
            ]
            # The exporting transaction stays open until every range has been read.
            with ThreadPoolExecutor(len(tasks), thread_name_prefix="bootstrap-range") as pool:
                ranges = list(pool.map(lambda task: self._read(writer, task), tasks))
        return ranges, snap.pg_snapshot


def _ranges(plans: Sequence[_Plan]) -> int:
    return sum(plan.parts for plan in plans)


def _row_counts(conn: psycopg.Connection, targets: Sequence[Target]) -> dict[Target, int]:
    counts: dict[Target, int] = {}
    by_dataset: dict[str, list[int]] = {}
    for target in targets:
        by_dataset.setdefault(target.dataset, []).append(target.client_id)
    for dataset, clients in by_dataset.items():
        for client, rows in source.row_counts(conn, get_dataset(dataset), clients).items():
            counts[Target(dataset, client)] = rows
    return counts


def bootstrap_targets(
    targets: Sequence[Target],
    settings: Settings,
    *,
    parallel: int,
    force: bool = False,
    on_rows: Callable[[int], None] | None = None,
    on_result: Callable[[BootstrapResult], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    writer: SnapshotWriter | None = None,
) -> list[BootstrapResult]:
    """Bootstrap ``targets`` on ``parallel`` worker processes; skipped ones are included.

    ``writer`` is used for the uploads and publishes instead of a new one (left open).
    """
    coordinator = Coordinator(
        settings, parallel=parallel, force=force, on_rows=on_rows, on_result=on_result
    )
    plans, skipped = coordinator.plan(targets)
    if on_plan is not None:
        on_plan(len(plans), sum(plan.rows for plan in plans))
    for result in skipped:
        log.info("%s already bootstrapped (version %s); skipped", result.target, result.version)
        if on_result is not None:
            on_result(result)
    return skipped + coordinator.run(plans, writer)
