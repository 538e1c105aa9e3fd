"""Building and publishing the full snapshot of targets straight from PostgreSQL.

A target is read in one REPEATABLE READ transaction; its ``pg_current_snapshot()`` becomes
the source position the stream hands off from. Rows stream from a server-side cursor into
the segment encoder and the uploads, so memory holds one batch and the segments in flight,
never the target.

Many targets run on a pool of long-lived worker processes, each with its own connection
and S3 client, so small targets pay no start-up cost. A large target is cut into key ranges
read by several workers that import one exported database snapshot; the coordinator keeps
the exporting transaction open until every range is read, then publishes the contiguous
manifest with a compare-and-set (expected version: none, or the current one with force).
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bootstrap import encode, source
from schemas.datasets import Target, get_dataset
from snapshots.manifest import SegmentEntry, SourcePosition
from snapshots.publish import SnapshotWriter
from snapshots.registry import VersionRegistry
from snapshots.store import ObjectStore
from storage_builder.errors import StorageBuilderError
from storage_builder.settings import Settings

log = logging.getLogger(__name__)

BOOTSTRAPPED = "bootstrapped"
SKIPPED = "skipped"
FAILED = "failed"

# A target above this many rows is read by several workers in key ranges of about this size.
SPLIT_ROWS = 250_000


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
    """Read ``[lo, hi)`` of a target in one snapshot transaction; encode and upload it."""
    dataset = get_dataset(target.dataset)
    settings = writer.snapshot
    counted = {"rows": 0}

    def counting(segments: Iterator[Any]) -> Iterator[Any]:
        for segment in segments:
            counted["rows"] += segment.rows
            if on_rows is not None:
                on_rows(segment.rows)
            yield segment

    with source.snapshot_transaction(conn, import_id=import_id) as snapshot:
        rows = source.stream_rows(conn, target, lo=lo, hi=hi)
        segments = encode.encode_segments(
            dataset,
            rows,
            client_id=target.client_id,
            codec=settings.codec,
            block_rows=settings.block_rows,
            max_rows=settings.segment_max_rows,
        )
        first = next(segments, None)
        # Bounds are set when the ranges are joined (see contiguous); a range with no rows
        # has no segment (an empty target publishes a manifest without segments).
        entries = (
            []
            if first is None
            else writer.upload_segments(target, counting(itertools.chain([first], segments)))
        )
    return _RangeResult(
        segments=entries,
        rows=counted["rows"],
        bytes=sum(entry.bytes for entry in entries),
        pg_snapshot=snapshot.pg_snapshot,
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


# Worker processes: one connection and one writer each, kept for the life of the pool.


class _WorkerState:
    def __init__(self, settings: Settings, progress: Any) -> None:
        self.settings = settings
        self.progress = progress
        self.writer = open_writer(settings)
        self._conn: psycopg.Connection | None = None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = source.connect(self.settings.postgres.dsn.get_secret_value())
        return self._conn

    def report(self, rows: int) -> None:
        if self.progress is not None:
            self.progress.put(rows)


_worker: _WorkerState | None = None


# Segments in flight per worker are twice its upload threads; a few keep S3 busy while
# bounding memory, since every worker uploads at once.
WORKER_UPLOAD_THREADS = 3


def _init_worker(settings: Settings, progress: Any) -> None:
    global _worker
    threads = min(settings.s3.upload_threads, WORKER_UPLOAD_THREADS)
    s3 = settings.s3.model_copy(update={"upload_threads": threads})
    _worker = _WorkerState(settings.model_copy(update={"s3": s3}), progress)


def _state() -> _WorkerState:
    assert _worker is not None, "bootstrap worker used before its initializer ran"
    return _worker


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _target_task(target: Target, expected: int | None) -> BootstrapResult:
    """A whole target in one worker; failures come back as data (they must pickle)."""
    state = _state()
    started = time.monotonic()
    try:
        result = read_range(state.conn, state.writer, target, on_rows=state.report)
        manifest = state.writer.publish(
            target,
            expected,
            contiguous([result.segments]),
            SourcePosition(pg_snapshot=result.pg_snapshot),
        )
    except (StorageBuilderError, psycopg.Error, ValueError, OSError) as error:
        _reset_after(state, error)
        return BootstrapResult(target, FAILED, error=_describe(error))
    return BootstrapResult(
        target,
        BOOTSTRAPPED,
        rows=result.rows,
        bytes=result.bytes,
        seconds=time.monotonic() - started,
        version=manifest.version,
    )


def _range_task(
    target: Target, lo: int | None, hi: int | None, import_id: str | None
) -> _RangeResult | str:
    """One key range of a large target, in the coordinator's exported snapshot."""
    state = _state()
    try:
        return read_range(
            state.conn,
            state.writer,
            target,
            lo=lo,
            hi=hi,
            import_id=import_id,
            on_rows=state.report,
        )
    except (StorageBuilderError, psycopg.Error, ValueError, OSError) as error:
        _reset_after(state, error)
        return _describe(error)


def _publish_task(
    target: Target, expected: int | None, segments: list[SegmentEntry], pg_snapshot: str
) -> int | str:
    state = _state()
    try:
        manifest = state.writer.publish(
            target, expected, segments, SourcePosition(pg_snapshot=pg_snapshot)
        )
    except (StorageBuilderError, ValueError, OSError) as error:
        return _describe(error)
    return manifest.version


def _reset_after(state: _WorkerState, error: BaseException) -> None:
    if isinstance(error, psycopg.Error) and state._conn is not None:
        # A broken connection is replaced on the next task rather than reused.
        state._conn.close()
    log.warning("bootstrap task failed: %s", _describe(error))


# The coordinator.


class Coordinator:
    """Runs the bootstrap of many targets on a pool of ``parallel`` worker processes."""

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
        # forkserver, not fork: the coordinator runs threads, and a fork copies their locks.
        # The server preloads this module, so workers start fast and share its pages.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([__name__])
        self._progress = self._context.SimpleQueue()

    def plan(self, targets: Sequence[Target]) -> tuple[list[_Plan], list[BootstrapResult]]:
        """Which targets to build (biggest first) and which to skip; checks Redis first, so
        an unreachable Redis fails the command before anything is written."""
        self.registry.ping()
        states = self.registry.get_many(targets)
        with source.connect(self.settings.postgres.dsn.get_secret_value()) as conn:
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

    def run(self, plans: Sequence[_Plan]) -> list[BootstrapResult]:
        """Bootstrap the planned targets; every one ends as bootstrapped or failed."""
        results: list[BootstrapResult] = []
        with (
            ProcessPoolExecutor(
                self.parallel,
                mp_context=self._context,
                initializer=_init_worker,
                initargs=(self.settings, self._progress),
            ) as pool,
            ThreadPoolExecutor(2 * self.parallel) as drivers,
        ):
            stop = _drain_progress(self._progress, self.on_rows)
            futures = [drivers.submit(self._drive, pool, plan) for plan in plans]
            for future in as_completed(futures):
                result = future.result()
                results.append(result)
                if self.on_result is not None:
                    self.on_result(result)
            stop()
        return results

    def _drive(self, pool: ProcessPoolExecutor, plan: _Plan) -> BootstrapResult:
        started = time.monotonic()
        try:
            if plan.parts <= 1:
                result = pool.submit(_target_task, plan.target, plan.expected).result()
            else:
                result = self._split(pool, plan)
        except Exception as error:  # a crashed worker must not hide the other targets
            log.warning("bootstrap of %s failed: %s", plan.target, _describe(error))
            result = BootstrapResult(plan.target, FAILED, error=_describe(error))
        result.seconds = time.monotonic() - started
        if result.outcome == FAILED:
            log.warning("bootstrap of %s failed: %s", plan.target, result.error)
        return result

    def _split(self, pool: ProcessPoolExecutor, plan: _Plan) -> BootstrapResult:
        """A large target: ranges read by several workers in one exported snapshot."""
        target = plan.target
        dsn = self.settings.postgres.dsn.get_secret_value()
        with source.connect(dsn) as conn, source.snapshot_transaction(conn, export=True) as snap:
            points = source.split_points(conn, target, plan.parts)
            bounds: list[int | None] = [None, *points, None]
            futures: list[Future[Any]] = [
                pool.submit(_range_task, target, lo, hi, snap.exported_id)
                for lo, hi in zip(bounds, bounds[1:], strict=False)
            ]
            # The exporting transaction stays open until every range has been read.
            parts = [future.result() for future in futures]
        errors = [part for part in parts if isinstance(part, str)]
        if errors:
            return BootstrapResult(target, FAILED, error=errors[0])
        ranges = [part for part in parts if isinstance(part, _RangeResult)]
        segments = contiguous([part.segments for part in ranges])
        version = pool.submit(
            _publish_task, target, plan.expected, segments, snap.pg_snapshot
        ).result()
        if isinstance(version, str):
            return BootstrapResult(target, FAILED, error=version)
        return BootstrapResult(
            target,
            BOOTSTRAPPED,
            rows=sum(part.rows for part in ranges),
            bytes=sum(part.bytes for part in ranges),
            version=version,
        )


def _row_counts(conn: psycopg.Connection, targets: Sequence[Target]) -> dict[Target, int]:
    counts: dict[Target, int] = {}
    by_dataset: dict[str, list[int]] = {}
    for target in targets:
        by_dataset.setdefault(target.dataset, []).append(target.client_id)
    for dataset, clients in by_dataset.items():
        for client, rows in source.row_counts(conn, get_dataset(dataset), clients).items():
            counts[Target(dataset, client)] = rows
    return counts


def _drain_progress(queue: Any, on_rows: Callable[[int], None] | None) -> Callable[[], None]:
    """Forward the workers' row counts to ``on_rows`` from a thread; returns its stopper."""
    import threading

    def drain() -> None:
        while True:
            rows = queue.get()
            if rows is None:
                return
            if on_rows is not None:
                on_rows(rows)

    thread = threading.Thread(target=drain, name="bootstrap-progress", daemon=True)
    thread.start()

    def stop() -> None:
        queue.put(None)
        thread.join(timeout=5)

    return stop


def bootstrap_targets(
    targets: Sequence[Target],
    settings: Settings,
    *,
    parallel: int,
    force: bool = False,
    on_rows: Callable[[int], None] | None = None,
    on_result: Callable[[BootstrapResult], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> list[BootstrapResult]:
    """Bootstrap ``targets`` on ``parallel`` worker processes; skipped ones are included."""
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
    return skipped + coordinator.run(plans)
