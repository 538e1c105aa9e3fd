"""Applying a micro-batch to its target's snapshot, and deciding what to skip.

Two rules decide, per key, whether a change is already contained in the snapshot:

- hand-off: the target's snapshot came from a bootstrap whose ``pg_current_snapshot()`` sees
  the change's transaction (``PgSnapshot.is_visible``). Applied only while the target has
  recorded no offset on the partition yet: once it has, every later event of the partition
  followed an applied one, so none of them can belong to the bootstrap.
- replay: the offset is at or below the offset the target recorded for that partition
  (the events published before a crash or a rebalance, read again from the commit).

A batch collapses each key to its last change, so the rules are applied to that change: if
it is contained in the snapshot, so is the row's final state.

A target without a snapshot is bootstrapped inline, on the poll loop, before its first
micro-batch is applied; its buffered changes then go through the hand-off rule. A TRUNCATE
re-bootstraps every known target of its dataset (see ``Applier.truncate``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import lru_cache

import psycopg

from bootstrap.snapshot import BootstrapResult, bootstrap_target
from consumer.batching import TargetBatch
from consumer.handoff import PgSnapshot
from consumer.offsets import advance, is_replay
from schemas.datasets import Target, get_dataset
from snapshots.manifest import Manifest, SourcePosition
from snapshots.packs import decode_delta
from snapshots.publish import DeltaPublish, Published, SnapshotWriter
from snapshots.registry import TargetState
from snapshots.segments import encode_segment
from storage_builder import metrics
from storage_builder.errors import PublishConflict, RegistryError, StorageBuilderError
from storage_builder.settings import Settings, SnapshotSettings

log = logging.getLogger(__name__)

HANDOFF = "handoff"
REPLAY = "replay"

PUBLISHED = "published"
CONTAINED = "contained"
CONFLICT = "conflict"


@dataclass(frozen=True)
class FlushOutcome:
    """What became of a flushed batch.

    ``published``: a new version holds it. ``contained``: the snapshot already held every
    change (nothing to publish). ``conflict``: another writer published first; the batch
    was discarded and its partition must be read again from ``first_offset``.
    """

    kind: str
    target: Target
    version: int | None
    first_offset: int | None
    changes: int = 0


@lru_cache(maxsize=4096)
def _pg_snapshot(text: str) -> PgSnapshot:
    return PgSnapshot.parse(text)


def skip_reason(
    state: TargetState | None, topic: str, partition: int, offset: int, tx_id: int | None
) -> str | None:
    """Why the change at ``offset`` is already in the target's snapshot, or None to apply it."""
    if state is None:
        return None
    position = state.source_position
    if position.offset(topic, partition) is not None:
        return REPLAY if is_replay(position, topic, partition, offset) else None
    visible = (
        position.pg_snapshot is not None
        and tx_id is not None
        and _pg_snapshot(position.pg_snapshot).is_visible(tx_id)
    )
    return HANDOFF if visible else None


def unappliable_rows(batch: TargetBatch, snapshot: SnapshotSettings) -> dict[int, str]:
    """The keys of ``batch`` whose row a segment cannot hold, each with the reason.

    Run only after a publish failed with an error that is not the infrastructure's: each
    upsert is encoded alone, so the rows to dead-letter are found without guessing.
    """
    dataset = get_dataset(batch.target.dataset)
    client_column = dataset.client_column
    refused: dict[int, str] = {}
    for key, change in batch.changes.items():
        if change.row is None:
            continue
        if change.row.get(client_column) != batch.target.client_id:
            refused[key] = f"{client_column}={change.row.get(client_column)!r} in the row"
            continue
        try:
            encode_segment(dataset, [change.row], codec="null", block_rows=snapshot.block_rows)
        except (ValueError, TypeError, OverflowError) as error:
            refused[key] = str(error)
    return refused


Bootstrapper = Callable[..., BootstrapResult]


# A flush's deltas go in packs of about this many buffered bytes at most: a backlog's flush
# then takes several PUTs rather than one pack that doubles the memory it holds.
_PACK_MAX_BYTES = 8 * 1024 * 1024


def pack_runs(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` runs of items whose sizes add up to at most ``limit``
    (an item larger than it alone)."""
    runs, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > limit:
            runs.append((start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        runs.append((start, len(sizes)))
    return runs


class KeptDeltas:
    """The delta of each target's current manifest, as bytes, kept within a byte budget:
    the target's next publish appends to it, and a compaction folds it, without reading it
    back. Over the budget, the target that published least recently loses its entry first.
    Thread-safe: compactions drop entries on the publisher threads."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._kept: OrderedDict[Target, tuple[int, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, target: Target, version: int) -> bytes | None:
        """The delta of ``version`` of the target, if kept."""
        kept = self._kept.get(target)
        return kept[1] if kept is not None and kept[0] == version else None

    def keep(self, target: Target, version: int, delta: bytes) -> None:
        with self._lock:
            self._drop(target)
            self._kept[target] = (version, delta)
            self._bytes += len(delta)
            while self._bytes > self.budget_bytes and self._kept:
                _, (_, evicted) = self._kept.popitem(last=False)
                self._bytes -= len(evicted)

    def drop(self, target: Target) -> None:
        with self._lock:
            self._drop(target)

    def _drop(self, target: Target) -> None:
        kept = self._kept.pop(target, None)
        if kept is not None:
            self._bytes -= len(kept[1])


class Applier:
    """Publishes micro-batches, with a cache of each target's registry state."""

    def __init__(
        self,
        settings: Settings,
        writer: SnapshotWriter,
        *,
        bootstrapper: Bootstrapper = bootstrap_target,
        on_published: Callable[[TargetBatch, float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.registry = writer.registry
        self._bootstrapper = bootstrapper
        self._on_published = on_published
        self._states: dict[Target, TargetState | None] = {}
        # The manifest of each target's last publish by this member: the next micro-batch
        # starts from it without reading it back from S3.
        self._manifests: dict[Target, Manifest] = {}
        # An eighth of the memory budget keeps those manifests' deltas.
        self._deltas = KeptDeltas(settings.consumer.memory_budget_mb * 1024 * 1024 // 8)
        self._conn: psycopg.Connection | None = None

    def state(self, target: Target) -> TargetState | None:
        """The target's registry state, read once and then kept current by our publishes."""
        if target not in self._states:
            self._states[target] = self.registry.get(target)
        return self._states[target]

    def known(self) -> set[Target]:
        """The targets whose state this member has read."""
        return set(self._states)

    def forget(self, targets: list[Target] | set[Target]) -> None:
        """Drop cached states (after a conflict, or when their partition went elsewhere)."""
        for target in targets:
            self._states.pop(target, None)
            self._manifests.pop(target, None)
            self._deltas.drop(target)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def flush(self, batch: TargetBatch) -> FlushOutcome:
        """Apply ``batch`` and publish, as numbered steps (see ``_publish``)."""
        target = batch.target
        state = self.state(target)
        if state is None:
            state = self.bootstrap(target)

        contained = self._drop_contained(batch, state)
        if batch.is_empty:
            log.debug("batch of %s fully contained in version %d", target, state.version)
            return FlushOutcome(CONTAINED, target, state.version, batch.first_offset, 0)
        if contained:
            log.debug("%d changes of %s already in version %d", contained, target, state.version)

        try:
            version = self._publish(batch, state)
        except PublishConflict as conflict:
            return self._lost(batch, conflict)
        return FlushOutcome(PUBLISHED, target, version, batch.first_offset, len(batch))

    def _lost(self, batch: TargetBatch, conflict: PublishConflict) -> FlushOutcome:
        # Another writer moved the target on: the new owner of the partition after a
        # rebalance, a reconciliation, a re-bootstrap. Publishing over it would lose its
        # changes, so this batch is dropped and its events are read again.
        target = batch.target
        self.forget([target])
        metrics.PUBLISH_CONFLICTS.labels(dataset=target.dataset).inc()
        log.warning(
            "publish of %s lost the compare-and-set (expected version %s, registry holds "
            "%s): %d changes discarded, to be read again from %s:%d@%d",
            target,
            conflict.expected,
            conflict.current,
            len(batch),
            batch.topic,
            batch.partition,
            batch.first_offset,
        )
        return FlushOutcome(CONFLICT, target, conflict.current, batch.first_offset, len(batch))

    def needs_compaction(self, batch: TargetBatch) -> bool:
        """Whether ``batch`` is published by rewriting segments rather than as a delta: its
        target's deltas (with this batch) are too many, too large or too old to keep."""
        settings = self.settings.consumer
        if len(batch) > settings.compact_changes:
            return True
        manifest = self.manifest(batch.target)
        if manifest is None or not manifest.deltas:
            return False
        delta = manifest.deltas[-1]
        return (
            delta.publishes >= settings.compact_deltas
            or manifest.delta_changes + len(batch) > settings.compact_changes
            or time.time() - delta.since > settings.compact_after_s
        )

    def manifest(self, target: Target) -> Manifest | None:
        """The manifest of the target's current state, kept after it is read once."""
        state = self.state(target)
        if state is None:
            return None
        manifest = self._manifests.get(target)
        if manifest is None or manifest.version != state.version:
            manifest = self.writer.load_manifest(state, target)
            self._manifests[target] = manifest
        return manifest

    def prefetch_manifests(self, targets: list[Target], pool: Executor) -> None:
        """Read the manifests not kept yet, concurrently: after a start or a rebalance,
        hundreds of targets publish for the first time in one flush. A failed read is
        left for the publish of its target to report."""
        missing = [target for target in targets if target not in self._manifests]
        if len(missing) < 2:
            return
        for future in [pool.submit(self.manifest, target) for target in missing]:
            with contextlib.suppress(StorageBuilderError):
                future.result()

    def flush_deltas(self, batches: list[TargetBatch]) -> dict[Target, FlushOutcome | Exception]:
        """Publish the batches of several targets (each with a snapshot) as deltas, in one
        pack: one PUT and one round trip to Redis for all of them."""
        outcomes: dict[Target, FlushOutcome | Exception] = {}
        items: list[tuple[TargetBatch, DeltaPublish]] = []
        started = time.monotonic()
        for batch in batches:
            target = batch.target
            try:
                state = self.state(target)
                manifest = self.manifest(target)
            except StorageBuilderError as error:
                outcomes[target] = error
                continue
            if state is None or manifest is None:
                outcomes[target] = RegistryError(f"{target} has no snapshot to add a delta to")
                continue
            self._drop_contained(batch, state)
            if batch.is_empty:
                outcomes[target] = FlushOutcome(CONTAINED, target, state.version, None, 0)
                continue
            upserts, deletes = batch.split()
            position = self._position(batch, state)
            previous = self._deltas.get(target, state.version)
            item = DeltaPublish(target, state, manifest, upserts, deletes, position, previous)
            items.append((batch, item))

        results: list[Published | Exception] = []
        for start, end in pack_runs([batch.nbytes for batch, _ in items], _PACK_MAX_BYTES):
            results += self.writer.publish_deltas([item for _, item in items[start:end]])
        published_at = time.time()
        for (batch, _), result in zip(items, results, strict=True):
            target = batch.target
            if isinstance(result, PublishConflict):
                outcomes[target] = self._lost(batch, result)
            elif isinstance(result, Exception):
                outcomes[target] = result
            else:
                manifest = result.manifest
                self._states[target] = TargetState.of(manifest, result.location)
                self._manifests[target] = manifest
                self._deltas.keep(target, manifest.version, result.delta)
                self._count(batch, manifest, published_at, 0, time.monotonic() - started)
                outcomes[target] = FlushOutcome(
                    PUBLISHED, target, manifest.version, batch.first_offset, len(batch)
                )
        return outcomes

    def _drop_contained(self, batch: TargetBatch, state: TargetState) -> int:
        skipped: dict[str, list[int]] = {}
        for key, change in batch.changes.items():
            reason = skip_reason(state, batch.topic, batch.partition, change.offset, change.tx_id)
            if reason is not None:
                skipped.setdefault(reason, []).append(key)
        for reason, keys in skipped.items():
            metrics.EVENTS_SKIPPED.labels(reason=reason).inc(len(keys))
            batch.drop(keys)
        return sum(len(keys) for keys in skipped.values())

    def _position(self, batch: TargetBatch, state: TargetState) -> SourcePosition:
        return advance(
            state.source_position,
            batch.topic,
            batch.partition,
            batch.last_offset,
            batch.newest_source_ts_ms,
        )

    def _publish(self, batch: TargetBatch, state: TargetState) -> int:
        """Publish by rewriting the segments the batch touches, folding in the deltas."""
        target = batch.target
        started = time.monotonic()
        upserts, deletes = batch.split()
        manifest = self._manifests.get(target)
        kept = self._deltas.get(target, state.version)
        delta_changes = None
        if kept is not None:
            delta_changes = decode_delta(get_dataset(target.dataset), kept, target, "kept")

        # Steps 1-3 of a publish happen inside apply_changes, in this order:
        # (1) write the rewritten segments: new, uniquely named objects no reader knows yet;
        # (2) write the manifest listing them, also unique, so still invisible;
        # (3) compare-and-set version and source position in Redis: the publish itself, and
        #     the fence against a stale writer. Only then may step (4), the Kafka commit of
        #     the loop, move the group past these events: a crash before (4) replays them,
        #     and the recorded offset in (3) makes the replay skip what (3) published.
        result = self.writer.apply_changes(
            target,
            upserts,
            deletes,
            self._position(batch, state),
            expected=state,
            manifest=manifest,
            delta_changes=delta_changes,
        )

        published_at = time.time()
        new_state = self.registry.get(target)
        if new_state is None or new_state.version < result.manifest.version:
            raise RegistryError(f"{target} version {result.manifest.version} vanished from Redis")
        self._states[target] = new_state
        self._deltas.drop(target)
        if new_state.version == result.manifest.version:
            self._manifests[target] = result.manifest
        else:
            self._manifests.pop(target, None)
        self._count(
            batch,
            result.manifest,
            published_at,
            result.segments_rewritten,
            time.monotonic() - started,
            result.bytes_written,
        )
        return result.manifest.version

    def _count(
        self,
        batch: TargetBatch,
        manifest: Manifest,
        published_at: float,
        segments_rewritten: int,
        seconds: float,
        bytes_written: int = 0,
    ) -> None:
        """Metrics, latency and the one INFO line of a publish."""
        target = batch.target
        dataset = target.dataset
        how = "delta" if manifest.deltas else "segments"
        metrics.BATCHES_APPLIED.labels(dataset=dataset, how=how).inc()
        metrics.SEGMENTS_WRITTEN.labels(dataset=dataset).inc(segments_rewritten)
        metrics.BYTES_WRITTEN.labels(dataset=dataset).inc(bytes_written)
        metrics.PUBLISH_DURATION.labels(dataset=dataset).observe(seconds)
        for change in batch.changes.values():
            metrics.CHANGES_APPLIED.labels(dataset=dataset, op=change.op).inc()
        for source_ts_ms, events in batch.source_ts_counts.items():
            latency = published_at - source_ts_ms / 1000
            for _ in range(events):
                metrics.COMMIT_TO_PUBLISH.observe(latency)
        if self._on_published is not None:
            self._on_published(batch, published_at)
        what = (
            f"delta of {manifest.deltas[-1].publishes} publishes"
            if manifest.deltas
            else f"{segments_rewritten} segments rewritten"
        )
        log.info(
            "published %s version %d (%d rows changed by %d events, %s, %.3fs)",
            target,
            manifest.version,
            len(batch),
            batch.events,
            what,
            seconds,
            extra={
                "dataset": target.dataset,
                "client_id": target.client_id,
                "version": manifest.version,
                "rows_changed": len(batch),
                "segments_rewritten": segments_rewritten,
                "delta_publishes": manifest.deltas[-1].publishes if manifest.deltas else 0,
                "seconds": round(seconds, 3),
            },
        )

    def bootstrap(self, target: Target, *, force: bool = False) -> TargetState:
        """Bootstrap ``target`` inline and return its new state (or a racing writer's)."""
        log.info("bootstrapping %s inline%s", target, " (forced)" if force else "")
        try:
            result = self._bootstrapper(
                target, self.settings, force=force, writer=self.writer, conn=self._connection()
            )
            log.info(
                "published %s version %s (bootstrapped inline: %d rows, %.3fs)",
                target,
                result.version,
                result.rows,
                result.seconds,
                extra={"target": str(target), "version": result.version},
            )
        except PublishConflict:
            # Someone else published a version while we read: theirs is as good a start.
            log.warning("bootstrap of %s lost to another writer; using its version", target)
        except psycopg.Error:
            self.close()
            raise
        self.forget([target])
        state = self.state(target)
        if state is None:
            raise RegistryError(f"{target} has no version in Redis right after its bootstrap")
        return state

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.settings.postgres.dsn.get_secret_value(), autocommit=True
            )
        return self._conn

    def truncate(
        self, dataset: str, extra: set[Target], clients: frozenset[int] = frozenset()
    ) -> list[Target]:
        """Re-bootstrap every known target of ``dataset`` after a TRUNCATE of its table.

        A truncate has no row, hence no client id, so Debezium sends it to one partition
        only, while the targets it empties live on every partition. Re-bootstrapping each
        known target (the registry's and ``extra``) with ``force`` gives it a new hand-off
        snapshot taken after the truncate: changes before it are skipped, later ones applied,
        on whichever member owns the target's partition. A member holding a batch of such a
        target loses its next compare-and-set and reads the batch's events again, which the
        new hand-off snapshot then sorts. Targets never bootstrapped need nothing: their first
        change bootstraps them. With ``clients`` (``consumer.clients``), only their targets.
        """
        targets = {target for target in self.registry.targets() if target.dataset == dataset}
        targets |= {target for target in extra if target.dataset == dataset}
        if clients:
            targets = {target for target in targets if target.client_id in clients}
        log.info("truncate of %s: re-bootstrapping its %d known targets", dataset, len(targets))
        for target in sorted(targets):
            self.bootstrap(target, force=True)
        return sorted(targets)
