"""The poll loop of ``storage-builder consume``: one member of the consumer group.

Each turn reads a batch of records, decodes them and routes each change to its target's
micro-batch; then publishes the batches that are due (by size, by the age of their oldest
change, by memory), commits the offsets those publishes made safe, and pauses or resumes
partitions for backpressure. Records that cannot be decoded go to the dead-letter topic.

A publish, end to end, is four steps in this order:
(1) write segments, (2) write the manifest, (3) compare-and-set version and source position
in Redis (all three in ``Applier.flush``), (4) commit offsets to Kafka (``_commit``). Each
step only makes sense after the previous one: a manifest must never name a missing
segment; Redis must never point at a missing manifest; and Kafka must never move past an
event before a published snapshot holds it. A crash between any two steps is repaired by
reading again from the last commit, where each target skips what it already recorded.

Partitions start where the group committed; a partition the group never committed starts
where the registry's targets say they stand, or else at ``consumer.initial_position``, and
that start is committed at once so a crash cannot lose it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import time
from array import array
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, cast

import orjson
import psycopg
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message

from consumer.apply import CONFLICT, Applier, FlushOutcome, skip_reason, unappliable_rows
from consumer.batching import FlushWindow, TargetBatch
from consumer.deadletter import DeadLetters, fetch_record
from consumer.decoding import ChangeEvent, EventDecodeError, JsonDecoder, TruncateEvent
from consumer.group import GroupMember, Partition
from consumer.offsets import OffsetTracker
from schemas.datasets import DATASETS, Target
from snapshots.faults import crash_point
from snapshots.publish import SnapshotWriter
from snapshots.registry import VersionRegistry
from snapshots.segment_cache import SegmentCache
from snapshots.store import ObjectStore
from storage_builder import metrics
from storage_builder.errors import (
    DecodeError,
    InvalidTargetError,
    ObjectStoreError,
    RegistryError,
    StorageBuilderError,
)
from storage_builder.settings import Settings

log = logging.getLogger(__name__)

_POLL_TIMEOUT_S = 0.2
_POLL_TIMEOUT_MIN_S = 0.01
_COMMIT_INTERVAL_S = 1.0
_LAG_INTERVAL_S = 1.0
_RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
# After this many failed publishes in a row a target is stuck: /readyz says so.
_STALLED_AFTER = 3


def topic_pattern(settings: Settings) -> str:
    """Every change topic of the connector's schema: unknown tables reach the dead letters."""
    prefix = re.escape(f"{settings.kafka.topic_prefix}.{settings.kafka.schema_name}.")
    return f"^{prefix}[^.]+$"


def dataset_topics(settings: Settings) -> list[str]:
    base = f"{settings.kafka.topic_prefix}.{settings.kafka.schema_name}."
    return [base + name for name in DATASETS]


@dataclass
class LoopStats:
    """Counters of one run, for logs and benchmarks."""

    events: int = 0
    skipped: int = 0
    dead_letters: int = 0
    publishes: int = 0
    conflicts: int = 0
    commits: int = 0
    changes_published: int = 0
    rejected_rows: int = 0
    flush_window_max_s: float = 0.0
    latencies_ms: array = field(default_factory=lambda: array("d"))


class ConsumerApp:
    """A member of the consumer group that keeps its targets' snapshots current."""

    def __init__(
        self,
        settings: Settings,
        *,
        client_id: str | None = None,
        writer: SnapshotWriter | None = None,
        health: metrics.HealthState | None = None,
        track_latency: bool = False,
    ) -> None:
        self.settings = settings
        self.consumer_settings = settings.consumer
        self.writer = writer or _writer(settings)
        self.stats = LoopStats()
        self.applier = Applier(
            settings, self.writer, on_published=self._published if track_latency else None
        )
        self.decoder = JsonDecoder(settings.kafka)
        self.dead_letters = DeadLetters(settings.kafka)
        self.offsets = OffsetTracker()
        self.health = health or metrics.HealthState()
        self.window = FlushWindow(
            self.consumer_settings.flush_max_age_s, self.consumer_settings.flush_max_age_cap_s
        )
        self.member = GroupMember(settings, [topic_pattern(settings)], self, client_id)
        self.clients = frozenset(self.consumer_settings.clients)
        self.budget_bytes = self.consumer_settings.memory_budget_mb * 1024 * 1024

        self.batches: dict[Target, TargetBatch] = {}
        self.by_partition: dict[Partition, set[Target]] = {}
        self.buffered_bytes = 0
        self.paused: set[Partition] = set()
        self._retry_at: dict[Target, tuple[float, int]] = {}
        self._stopping = False
        self._closing = False
        self._published_since_commit = 0
        self._last_commit = 0.0
        self._last_lag = 0.0
        self._announced_ready = False
        self._track_latency = track_latency
        self._revoking: set[Partition] = set()
        self._publishers = ThreadPoolExecutor(
            max_workers=self.consumer_settings.publish_threads, thread_name_prefix="publish"
        )

    @property
    def is_ready(self) -> bool:
        """Assigned, with a committed start for every partition: changes from now on count."""
        return self._announced_ready

    # The loop.

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("received %s: stopping", signal.Signals(signum).name)
        self._stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self, *, until: Callable[[], bool] | None = None) -> LoopStats:
        """Consume until stopped (a signal, or ``until()`` turning true), then shut down."""
        self._check_services()
        self.member.start()
        try:
            while not self._stopping and not (until is not None and until()):
                self.turn()
        finally:
            self.shutdown()
        return self.stats

    def _check_services(self) -> None:
        """Contact S3 and Redis once at start-up, so /readyz knows them before a publish."""
        checks: list[tuple[str, Callable[[], object]]] = [
            ("s3", self.writer.store.ensure_bucket),
            ("redis", self.writer.registry.ping),
        ]
        for service, check in checks:
            try:
                check()
            except StorageBuilderError as error:
                self.health.contact_failed(service, str(error))
                raise
            self.health.contact_ok(service)

    def turn(self) -> None:
        """One pass: read, route, publish what is due, commit, adjust backpressure."""
        messages = self.member.consume(self.consumer_settings.poll_batch, self._poll_timeout())
        self.health.polled()
        if messages:
            self.health.contact_ok("kafka")
        for message in messages:
            self._handle(message)

        self._flush_due()
        self._commit()
        self._backpressure()
        self._report_offset_lag()
        metrics.BUFFERED_CHANGES.set(sum(len(batch) for batch in self.batches.values()))
        metrics.BUFFERED_BYTES.set(self.buffered_bytes)

    def _poll_timeout(self) -> float:
        """How long the next poll may wait: never past the moment the oldest batch is due,
        which would add the wait to that batch's latency."""
        waiting = [b.opened_at for t, b in self.batches.items() if t not in self._retry_at]
        if not waiting:
            return _POLL_TIMEOUT_S
        due_in = min(waiting) + self.window.current_s - time.monotonic()
        return min(_POLL_TIMEOUT_S, max(_POLL_TIMEOUT_MIN_S, due_in))

    # Routing.

    def _handle(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("kafka reported %s", error)
                self.health.contact_failed("kafka", str(error))
            return
        topic, partition, offset = _where(message)
        if not self.offsets.owns(topic, partition):
            return  # read just before its partition was revoked
        self.stats.events += 1
        timestamp_type, timestamp_ms = message.timestamp()
        if timestamp_ms > 0:
            metrics.CONSUMER_TIME_LAG.labels(topic=topic, partition=str(partition)).set(
                max(0.0, time.time() - timestamp_ms / 1000)
            )

        if self.clients and not self._wanted_key(message.key()):
            self.offsets.consumed(topic, partition, offset)
            return
        try:
            event = self.decoder.decode(message.value(), topic, partition, offset, message.key())
        except DecodeError as refused:
            self._dead_letter(message, refused, topic, partition, offset)
            self.offsets.consumed(topic, partition, offset)
            return

        if isinstance(event, ChangeEvent):
            self._route(event)
        elif isinstance(event, TruncateEvent):
            self._truncate(event)
        self.offsets.consumed(topic, partition, offset)

    def _wanted_key(self, key: bytes | None) -> bool:
        """Whether the record's key names a client of ``consumer.clients`` (or cannot tell)."""
        try:
            document = orjson.loads(key) if key else None
            if isinstance(document, dict) and "payload" in document:
                document = document["payload"]
            client = document["client_id"] if isinstance(document, dict) else None
        except (orjson.JSONDecodeError, KeyError):
            return True
        return client is None or client in self.clients

    def _route(self, event: ChangeEvent) -> None:
        target = event.target
        if self.clients and target.client_id not in self.clients:
            return
        batch = self.batches.get(target)
        if batch is not None and event.offset <= batch.last_offset:
            return  # read again after a rewind, and already in the batch
        if batch is not None and batch.partition != event.partition:
            # The topic's partition count changed: the old batch goes first, in order.
            self._flush(batch)
            batch = None

        reason = skip_reason(
            self.applier.state(target), event.topic, event.partition, event.offset, event.tx_id
        )
        if reason is not None:
            metrics.EVENTS_SKIPPED.labels(reason=reason).inc()
            self.stats.skipped += 1
            log.debug("skipped %s@%d of %s (%s)", event.topic, event.offset, target, reason)
            return

        if batch is None:
            batch = self.batches[target] = TargetBatch(target, event.topic, event.partition)
            self.by_partition.setdefault((event.topic, event.partition), set()).add(target)
            self.offsets.opened(target, event.topic, event.partition, event.offset)
        before = batch.nbytes
        batch.add(
            event.key,
            event.op,
            event.row,
            offset=event.offset,
            tx_id=event.tx_id,
            source_ts_ms=event.source_ts_ms,
        )
        self.buffered_bytes += batch.nbytes - before

    def _dead_letter(
        self, message: Message, refused: DecodeError, topic: str, partition: int, offset: int
    ) -> None:
        reason = refused.reason if isinstance(refused, EventDecodeError) else "undecodable"
        _, timestamp_ms = message.timestamp()
        self.dead_letters.send(
            reason=reason,
            detail=str(refused),
            topic=topic,
            partition=partition,
            offset=offset,
            key=message.key(),
            value=message.value(),
            timestamp_ms=timestamp_ms,
        )
        self.stats.dead_letters += 1

    def _truncate(self, event: TruncateEvent) -> None:
        # Whatever of the dataset is buffered was committed before the truncate on its own
        # partition; publish it first, then re-bootstrap every target of the dataset.
        for batch in [b for b in self.batches.values() if b.target.dataset == event.dataset]:
            self._flush(batch)
        known = {target for target in self.applier.known() if target.dataset == event.dataset}
        self.applier.truncate(event.dataset, known, self.clients)

    # Publishing.

    def _flush_due(self) -> None:
        now = time.monotonic()
        window = self.window.current_s
        max_changes = self.consumer_settings.flush_max_changes
        due = [
            batch
            for batch in self.batches.values()
            if batch.is_due(window, max_changes, now)
            and self._retry_at.get(batch.target, (0,))[0] <= now
        ]
        if self.buffered_bytes > self.budget_bytes:
            due = self._add_largest(due)
        if not due:
            return

        started = time.monotonic()
        self._flush_many(due)
        window = self.window.record(time.monotonic() - started)
        self.stats.flush_window_max_s = max(self.stats.flush_window_max_s, window)

    def _add_largest(self, due: list[TargetBatch]) -> list[TargetBatch]:
        """Due batches, plus the largest others until half the memory budget would be free."""
        chosen = {batch.target for batch in due}
        freed = sum(batch.nbytes for batch in due)
        for batch in sorted(self.batches.values(), key=lambda b: b.nbytes, reverse=True):
            if self.buffered_bytes - freed <= self.budget_bytes // 2:
                break
            if batch.target not in chosen:
                due.append(batch)
                chosen.add(batch.target)
                freed += batch.nbytes
        return due

    def _flush_many(self, batches: list[TargetBatch]) -> None:
        """Publish several targets' batches: most as deltas in one pack, some by compaction.

        The batches of targets whose deltas are due for compaction rewrite their segments on
        the publisher threads (a publish mostly waits on S3) while the others go as deltas
        in one pack from this thread. A target without a snapshot is bootstrapped on this
        thread, one at a time, as it reads PostgreSQL on the loop's connection. The
        bookkeeping after each publish (offsets, retries) stays here too.
        """
        ready = [b for b in batches if self.applier.state(b.target) is not None]
        self.applier.prefetch_manifests([b.target for b in ready], self._publishers)
        compacting: list[TargetBatch] = []
        as_deltas: list[TargetBatch] = []
        for batch in ready:
            try:
                due = self.applier.needs_compaction(batch)
            except StorageBuilderError:
                due = True  # its manifest could not be read: the per-target path says why
            (compacting if due else as_deltas).append(batch)
        running = [(b, self._publishers.submit(self.applier.flush, b)) for b in compacting]
        if as_deltas:
            outcomes = self.applier.flush_deltas(as_deltas)
            for batch in as_deltas:
                self._flush(batch, result=_settled(outcomes[batch.target]))
        for batch, future in running:
            self._flush(batch, result=future)
        started = {b.target for b in ready}
        for batch in batches:
            if batch.target not in started:
                self._flush(batch)

    def _flush(
        self,
        batch: TargetBatch,
        *,
        rejected: bool = False,
        result: Future[FlushOutcome] | None = None,
    ) -> FlushOutcome | None:
        """Publish one batch (or take the outcome of its publish started elsewhere); on an
        infrastructure error keep it and retry later; rows no segment can hold go to the
        dead-letter topic and the rest is published."""
        try:
            outcome = result.result() if result is not None else self.applier.flush(batch)
        except (InvalidTargetError, ValueError, TypeError, OverflowError) as error:
            if rejected or not self._reject_rows(batch, error):
                raise
            if batch.is_empty:
                self._forget_batch(batch)
                return None
            return self._flush(batch, rejected=True)
        except (StorageBuilderError, psycopg.Error) as error:
            self._publish_failed(batch, error)
            return None
        self._publish_succeeded(batch)
        self._forget_batch(batch)

        if outcome.kind == CONFLICT:
            self.stats.conflicts += 1
            self._rewind(batch.topic, batch.partition, outcome.first_offset)
        elif outcome.kind == "published":
            self.stats.publishes += 1
            self.stats.changes_published += outcome.changes
            self._published_since_commit += 1
        return outcome

    def _publish_failed(self, batch: TargetBatch, error: Exception) -> None:
        attempt = self._retry_at.get(batch.target, (0.0, 0))[1] + 1
        delay = _RETRY_BACKOFF_S[min(attempt - 1, len(_RETRY_BACKOFF_S) - 1)]
        self._retry_at[batch.target] = (time.monotonic() + delay, attempt)
        if isinstance(error, RegistryError):
            self.health.contact_failed("redis", str(error))
        elif isinstance(error, ObjectStoreError):
            self.health.contact_failed("s3", str(error))
        if attempt >= _STALLED_AFTER:
            self.health.stalled(
                True, f"publish of {batch.target} failed {attempt} times in a row: {error}"
            )
        log.warning("publish of %s failed, retrying in %.1fs: %s", batch.target, delay, error)

    def _publish_succeeded(self, batch: TargetBatch) -> None:
        self._retry_at.pop(batch.target, None)
        self.health.contact_ok("s3")
        self.health.contact_ok("redis")
        if self.health.is_stalled and not any(
            attempt >= _STALLED_AFTER for _, attempt in self._retry_at.values()
        ):
            self.health.stalled(False)

    def _reject_rows(self, batch: TargetBatch, error: Exception) -> bool:
        """Dead-letter the rows of ``batch`` that made its publish fail; False if none did.

        Their events decoded, but a segment cannot hold their row (a value out of the Avro
        type's range, say). Each goes to the dead-letter topic with its original bytes,
        read again from Kafka, and the rest of the batch is published without it.
        """
        refused = unappliable_rows(batch, self.settings.snapshot)
        if not refused:
            log.error("publish of %s failed, and no single row explains it", batch.target)
            return False
        before = batch.nbytes
        for key, reason in sorted(refused.items()):
            change = batch.changes[key]
            record = fetch_record(self.settings.kafka, batch.topic, batch.partition, change.offset)
            self.dead_letters.send(
                reason="unappliable",
                detail=f"{batch.target} key {key}: {reason} (the publish failed with: {error})",
                topic=batch.topic,
                partition=batch.partition,
                offset=change.offset,
                key=record.key() if record is not None else None,
                value=record.value() if record is not None else None,
                timestamp_ms=change.source_ts_ms,
            )
            self.stats.dead_letters += 1
            self.stats.rejected_rows += 1
        batch.drop(list(refused))
        self.buffered_bytes -= before - batch.nbytes
        return True

    def _forget_batch(self, batch: TargetBatch) -> None:
        self.batches.pop(batch.target, None)
        partition = (batch.topic, batch.partition)
        targets = self.by_partition.get(partition)
        if targets is not None:
            targets.discard(batch.target)
        self.offsets.closed(batch.target, batch.topic, batch.partition)
        self.buffered_bytes -= batch.nbytes
        if self.buffered_bytes < 0 or not self.batches:
            self.buffered_bytes = sum(b.nbytes for b in self.batches.values())

    def _rewind(self, topic: str, partition: int, offset: int | None) -> None:
        """Read a partition again from ``offset``, after its batch lost a compare-and-set."""
        if offset is None or not self.offsets.owns(topic, partition) or self._closing:
            return
        if (topic, partition) in self._revoking:
            return
        start = self.offsets.rewound(topic, partition, offset)
        try:
            self.member.seek(topic, partition, start)
        except Exception as error:  # noqa: BLE001 (librdkafka raises KafkaException subtypes)
            # Without the seek the events would be lost to this member: stop consuming, so
            # the group re-reads them from the last commit, which is below them.
            raise StorageBuilderError(
                f"cannot read {topic}:{partition} again from {start}: {error}"
            ) from error
        log.info("reading %s:%d again from offset %d", topic, partition, start)

    def _published(self, batch: TargetBatch, published_at: float) -> None:
        now_ms = published_at * 1000
        latencies = self.stats.latencies_ms
        for source_ms, events in batch.source_ts_counts.items():
            latencies.extend(array("d", [now_ms - source_ms]) * events)

    # Committing.

    def _commit(self, *, force: bool = False) -> None:
        due = self.offsets.commits_due()
        if not due:
            self._announce_ready()
            return
        first_commit = any(self._never_committed(partition) for partition in due)
        now = time.monotonic()
        hurry = force or first_commit or self._published_since_commit
        if not hurry and now - self._last_commit < _COMMIT_INTERVAL_S:
            return

        # Step 4 of a publish. Dead letters first: an offset may move past a poison event
        # only once the dead-letter topic holds it.
        self.dead_letters.flush()
        if self._published_since_commit:
            crash_point("before_commit")
        try:
            self.member.commit(due)
        except KafkaException as error:
            # A rebalance in progress, or this member was fenced: the offsets stay where
            # they were, so the events are replayed (and skipped by their targets) later.
            log.warning("commit failed, will be retried after the rebalance: %s", error)
            self._last_commit = now
            return
        self.health.contact_ok("kafka")
        for (topic, partition), offset in due.items():
            self.offsets.committed(topic, partition, offset)
            metrics.CONSUMER_COMMITTED_OFFSET.labels(topic=topic, partition=str(partition)).set(
                offset
            )
        log.debug("committed %s", due)
        self.stats.commits += 1
        self._published_since_commit = 0
        self._last_commit = now
        self._announce_ready()

    def _report_offset_lag(self) -> None:
        """Set consumer_offset_lag from the high watermarks librdkafka caches while fetching."""
        now = time.monotonic()
        if now - self._last_lag < _LAG_INTERVAL_S:
            return
        self._last_lag = now
        for topic, partition in self.offsets.partitions():
            offsets = self.offsets.get(topic, partition)
            high = self.member.cached_high(topic, partition)
            if offsets is None or high is None:
                continue
            position = offsets.committed if offsets.committed is not None else offsets.start
            if position is None or position < 0:
                continue
            metrics.CONSUMER_OFFSET_LAG.labels(topic=topic, partition=str(partition)).set(
                max(0, high - position)
            )

    def _never_committed(self, partition: Partition) -> bool:
        offsets = self.offsets.get(*partition)
        return offsets is not None and offsets.committed is None

    def _announce_ready(self) -> None:
        if self._announced_ready or not self.offsets.partitions():
            return
        if any(self._never_committed(partition) for partition in self.offsets.partitions()):
            return
        self._announced_ready = True
        log.info(
            "ready: %d partitions assigned, each with a committed start",
            len(self.offsets.partitions()),
        )

    # Backpressure.

    def _backpressure(self) -> None:
        assigned = set(self.offsets.partitions())
        if self.buffered_bytes > self.budget_bytes:
            to_pause = sorted(assigned - self.paused)
            if to_pause:
                self.member.pause(to_pause)
                self.paused |= set(to_pause)
                log.info(
                    "paused %d partitions: %d buffered bytes over the budget of %d MB",
                    len(to_pause),
                    self.buffered_bytes,
                    self.consumer_settings.memory_budget_mb,
                )
        elif self.paused and self.buffered_bytes <= self.budget_bytes // 2:
            to_resume = sorted(self.paused & assigned)
            if to_resume:
                self.member.resume(to_resume)
            log.info("resumed %d partitions after a flush", len(to_resume))
            self.paused.clear()
        metrics.PAUSED_PARTITIONS.set(len(self.paused))

    # Rebalances (called by librdkafka from inside consume).

    def on_assign(self, partitions: list[Partition]) -> Mapping[Partition, int | None]:
        metrics.REBALANCES.labels(kind="assign").inc()
        committed = self.member.committed(partitions)
        starts: dict[Partition, int | None] = {}
        from_registry = self._registry_starts([p for p in partitions if committed.get(p) is None])
        for partition in partitions:
            start = committed.get(partition)
            if start is None:
                start = from_registry.get(partition)
            if start is None:
                start = self._initial_position(partition)
            starts[partition] = start
            self.offsets.assign(*partition, start=start, committed=committed.get(partition))
        self.health.assigned(self.offsets.partitions())
        self.health.contact_ok("kafka")
        log.info(
            "assigned %d partitions: %s",
            len(partitions),
            ", ".join(f"{t}:{p}@{starts[(t, p)]}" for t, p in sorted(partitions)),
        )
        self._announced_ready = False
        return starts

    def _initial_position(self, partition: Partition) -> int:
        low, high = self.member.watermarks(*partition)
        if self.consumer_settings.initial_position == "latest":
            return high
        return low if low >= 0 else OFFSET_BEGINNING

    def _registry_starts(self, partitions: list[Partition]) -> dict[Partition, int]:
        """Where never-committed partitions start from the registry's view, when it has one.

        Only when every known target of the partition's dataset has recorded an offset on
        that topic: a target with only a bootstrap position could have events anywhere, and
        then the safe start is ``consumer.initial_position``.
        """
        if not partitions:
            return {}
        targets = list(self.writer.registry.targets())
        states = self.writer.registry.get_many(targets)
        starts: dict[Partition, int] = {}
        for topic, partition in partitions:
            dataset = topic.rsplit(".", 1)[-1]
            relevant = [s for t, s in states.items() if t.dataset == dataset and s is not None]
            recorded = []
            for state in relevant:
                on_topic = {
                    k: v
                    for k, v in state.source_position.offsets.items()
                    if k.startswith(topic + ":")
                }
                if not on_topic:
                    break
                if f"{topic}:{partition}" in on_topic:
                    recorded.append(on_topic[f"{topic}:{partition}"] + 1)
            else:
                if recorded:
                    starts[(topic, partition)] = min(recorded)
        return starts

    def on_revoke(self, partitions: list[Partition]) -> None:
        metrics.REBALANCES.labels(kind="revoke").inc()
        targets = self._targets_of(partitions)
        self._revoking = set(partitions)
        try:
            if not self._closing:
                for target in targets:
                    batch = self.batches.get(target)
                    if batch is not None:
                        self._flush(batch)
            self._abandon(partitions, "revoked")
            self._commit_partitions(partitions)
            self._release(partitions)
        finally:
            self._revoking = set()

    def on_lost(self, partitions: list[Partition]) -> None:
        metrics.REBALANCES.labels(kind="lost").inc()
        self._abandon(partitions, "lost")
        self._release(partitions)

    def _targets_of(self, partitions: list[Partition]) -> list[Target]:
        return sorted({t for p in partitions for t in self.by_partition.get(p, ())})

    def _abandon(self, partitions: list[Partition], why: str) -> None:
        abandoned = [self.batches[t] for t in self._targets_of(partitions) if t in self.batches]
        for batch in abandoned:
            log.warning(
                "abandoned the batch of %s (%d changes) of %s partition %s:%d; its new owner "
                "reads them again from the last commit",
                batch.target,
                len(batch),
                why,
                batch.topic,
                batch.partition,
            )
            self._forget_batch(batch)

    def _commit_partitions(self, partitions: list[Partition]) -> None:
        due = {p: o for p, o in self.offsets.commits_due().items() if p in set(partitions)}
        if not due:
            return
        try:
            self.dead_letters.flush()
            if self._published_since_commit:
                crash_point("before_commit")
            self.member.commit(due)
        except Exception as error:  # noqa: BLE001 (the partition goes either way)
            log.warning("commit of revoked partitions failed; their new owner replays: %s", error)

    def _release(self, partitions: list[Partition]) -> None:
        targets = self._targets_of(partitions)
        self.applier.forget(targets)
        for partition in partitions:
            self.offsets.revoke(*partition)
            self.by_partition.pop(partition, None)
            self.paused.discard(partition)
            for gauge in (metrics.CONSUMER_OFFSET_LAG, metrics.CONSUMER_TIME_LAG):
                with contextlib.suppress(KeyError):  # never set for this partition
                    gauge.remove(partition[0], str(partition[1]))
        self.health.assigned(self.offsets.partitions())
        log.info("released %d partitions", len(partitions))

    # Shutdown.

    def shutdown(self) -> None:
        """Flush what can be flushed within the deadline, commit, leave the group."""
        deadline = time.monotonic() + self.consumer_settings.shutdown_deadline_s
        log.info("shutting down: %d batches pending", len(self.batches))
        for batch in sorted(self.batches.values(), key=lambda b: b.first_offset or 0):
            if time.monotonic() >= deadline:
                break
            if self.member.started:
                self._flush(batch)
        if self.batches:
            log.warning(
                "shutdown deadline reached: %d batches not published; they are read again on "
                "the next start",
                len(self.batches),
            )
        try:
            if self.member.started:
                self._commit(force=True)
        except Exception as error:  # noqa: BLE001
            log.warning("final commit failed; the next start replays from the last one: %s", error)
        self._closing = True
        self.member.close()
        self._publishers.shutdown(wait=True)
        self.applier.close()
        self.writer.close()
        log.info(
            "stopped: %d events, %d publishes, %d skipped, %d dead letters, %d conflicts",
            self.stats.events,
            self.stats.publishes,
            self.stats.skipped,
            self.stats.dead_letters,
            self.stats.conflicts,
        )


def _writer(settings: Settings) -> SnapshotWriter:
    """A snapshot writer whose store keeps recent segments, in a sixth of the memory budget
    (enough for the small segments of a few hundred busy targets)."""
    budget = settings.consumer.memory_budget_mb * 1024 * 1024 // 6
    store = SegmentCache(ObjectStore(settings.s3), budget)
    return SnapshotWriter(
        cast(ObjectStore, store),
        VersionRegistry(settings.redis),
        settings.snapshot,
        settings.s3.prefix,
    )


def _settled(outcome: FlushOutcome | Exception) -> Future[FlushOutcome]:
    """A future already holding ``outcome``, for the bookkeeping publishes share."""
    future: Future[FlushOutcome] = Future()
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
    return future


def _where(message: Message) -> tuple[str, int, int]:
    """A record's topic, partition and offset (never None for a record without error)."""
    return str(message.topic()), int(message.partition() or 0), int(message.offset() or 0)


def run_consumer(settings: Settings, **options: Any) -> LoopStats:
    """Run one member until SIGTERM or SIGINT."""
    app = ConsumerApp(settings, **options)
    app.install_signal_handlers()
    return app.run()
