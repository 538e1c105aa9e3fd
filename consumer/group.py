"""A thin, lazy wrapper over ``confluent_kafka.Consumer`` for the consumer group.

Nothing touches the network until ``start``. The librdkafka configuration is merged in one
fixed order: our defaults, then ``kafka.client`` pass-through settings (``settings.kafka``),
then the few settings correctness depends on (manual commits, cooperative-sticky
assignment), which nobody may change. Rebalance callbacks are handed to a listener; an
unexpected error inside one is kept and raised from the next ``consume`` as one
``RebalanceError`` saying which callback failed, instead of being lost inside librdkafka.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, Message, TopicPartition

from storage_builder.errors import ConfigError, StorageBuilderError
from storage_builder.settings import Settings

log = logging.getLogger(__name__)

Partition = tuple[str, int]

# Correctness depends on these: offsets move only when a publish made them safe.
_REQUIRED: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "partition.assignment.strategy": "cooperative-sticky",
}


class RebalanceError(StorageBuilderError):
    """A rebalance callback failed; the member cannot know what it owns and must stop."""


class RebalanceListener(Protocol):
    def on_assign(self, partitions: list[Partition]) -> Mapping[Partition, int | None]:
        """Called with newly assigned partitions; returns where each starts (None: Kafka's)."""

    def on_revoke(self, partitions: list[Partition]) -> None:
        """Called before partitions go to another member: flush their pending batches."""

    def on_lost(self, partitions: list[Partition]) -> None:
        """Called when partitions were already taken away: abandon their pending batches."""


def consumer_config(settings: Settings, client_id: str | None = None) -> dict[str, Any]:
    """The librdkafka configuration of a member: defaults < ``kafka.client`` < required."""
    config: dict[str, Any] = {
        "group.id": settings.kafka.group_id,
        "client.id": client_id or f"storage-builder-{socket.gethostname()}-{os.getpid()}",
        "auto.offset.reset": settings.consumer.initial_position,
        # Debezium writes without transactions, but a transactional writer's aborted
        # records must never reach a snapshot.
        "isolation.level": "read_committed",
        # An inline bootstrap of a large target can keep the loop from polling for a while.
        "max.poll.interval.ms": 900_000,
        # A member killed without leaving is noticed within the session timeout, and only
        # then do its partitions move: 10 s (heartbeats every 3 s) instead of librdkafka's
        # 45 s. Planned restarts can keep their partitions with no rebalance at all by
        # setting a stable kafka.client["group.instance.id"] per member (static membership).
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 3_000,
        # Bounded prefetch: librdkafka queues up to this much per assigned partition, and
        # that memory is the member's too (30 partitions x 1 MiB at most). 1 MiB holds
        # about 1,500 schema-less envelopes, over a second of a busy partition.
        "queued.max.messages.kbytes": 1_024,
        "fetch.max.bytes": 4 * 1024 * 1024,
        "max.partition.fetch.bytes": 1024 * 1024,
        "enable.partition.eof": False,
    }
    config.update(settings.kafka.librdkafka())

    for name, value in _REQUIRED.items():
        given = settings.kafka.client.get(name)
        if given is not None and str(given).lower() != str(value).lower():
            raise ConfigError(
                f"kafka.client[{name!r}] = {given!r} is not allowed for consume: offsets are "
                f"committed only after a publish; remove it (it must be {value!r})"
            )
        config[name] = value
    return config


class GroupMember:
    """One member of the consumer group, subscribed to the Debezium topics."""

    def __init__(
        self,
        settings: Settings,
        topics: Sequence[str],
        listener: RebalanceListener,
        client_id: str | None = None,
    ) -> None:
        self.topics = list(topics)
        self.config = consumer_config(settings, client_id)
        self._listener = listener
        self._consumer: Consumer | None = None
        self._callback_error: RebalanceError | None = None

    @property
    def started(self) -> bool:
        return self._consumer is not None

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("GroupMember.start() was not called")
        return self._consumer

    def start(self) -> None:
        """Connect and join the group; partitions arrive through the listener while polling."""
        self._consumer = Consumer(self.config)
        self._consumer.subscribe(
            self.topics,
            on_assign=self._wrap("assign", self._assign),
            on_revoke=self._wrap("revoke", self._revoke),
            on_lost=self._wrap("lost", self._lost),
        )
        log.info(
            "joining group %r as %r on %d topics",
            self.config["group.id"],
            self.config["client.id"],
            len(self.topics),
        )

    def _wrap(
        self, kind: str, callback: Callable[[list[TopicPartition]], None]
    ) -> Callable[[Consumer, list[TopicPartition]], None]:
        def handler(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
            if self._callback_error is not None:
                return
            try:
                callback(partitions)
            except Exception as error:
                names = ", ".join(f"{tp.topic}:{tp.partition}" for tp in partitions)
                self._callback_error = RebalanceError(
                    f"the {kind} callback failed for {names or 'no partitions'}: {error}"
                )
                self._callback_error.__cause__ = error
                log.error("rebalance %s callback failed", kind, exc_info=True)

        return handler

    def _assign(self, partitions: list[TopicPartition]) -> None:
        starts = self._listener.on_assign([(tp.topic, tp.partition) for tp in partitions])
        chosen = []
        for tp in partitions:
            start = starts.get((tp.topic, tp.partition))
            offset = OFFSET_INVALID if start is None else start
            chosen.append(TopicPartition(tp.topic, tp.partition, offset))
        self.consumer.incremental_assign(chosen)

    def _revoke(self, partitions: list[TopicPartition]) -> None:
        self._listener.on_revoke([(tp.topic, tp.partition) for tp in partitions])

    def _lost(self, partitions: list[TopicPartition]) -> None:
        self._listener.on_lost([(tp.topic, tp.partition) for tp in partitions])

    def _raise_callback_error(self) -> None:
        if self._callback_error is not None:
            error, self._callback_error = self._callback_error, None
            raise error

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Up to ``max_messages`` messages; rebalance callbacks run inside this call."""
        messages = self.consumer.consume(max_messages, timeout_s)
        self._raise_callback_error()
        return messages

    def committed(
        self, partitions: Sequence[Partition], timeout_s: float = 30.0
    ) -> dict[Partition, int | None]:
        """The group's committed offset of each partition; None where there is none."""
        asked = [TopicPartition(topic, partition) for topic, partition in partitions]
        answer = self.consumer.committed(asked, timeout=timeout_s)
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in answer}

    def watermarks(self, topic: str, partition: int, timeout_s: float = 30.0) -> tuple[int, int]:
        """The (low, high) offsets of a partition: the first kept and one past the last."""
        low, high = self.consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=timeout_s
        )
        return int(low), int(high)

    def cached_high(self, topic: str, partition: int) -> int | None:
        """The partition's high watermark as of the last fetch (no request); None if unknown."""
        try:
            _, high = self.consumer.get_watermark_offsets(
                TopicPartition(topic, partition), cached=True
            )
        except KafkaException:
            return None
        return int(high) if high is not None and high >= 0 else None

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Commit synchronously; offsets are the next offset to read, Kafka's convention."""
        if not offsets:
            return
        chosen = [TopicPartition(t, p, offset) for (t, p), offset in offsets.items()]
        self.consumer.commit(offsets=chosen, asynchronous=False)

    def pause(self, partitions: Sequence[Partition]) -> None:
        self.consumer.pause([TopicPartition(t, p) for t, p in partitions])

    def resume(self, partitions: Sequence[Partition]) -> None:
        self.consumer.resume([TopicPartition(t, p) for t, p in partitions])

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Read ``topic:partition`` again from ``offset`` (an assigned partition only)."""
        self.consumer.seek(TopicPartition(topic, partition, offset))

    def close(self) -> None:
        """Leave the group (revoking what is still assigned, through the listener)."""
        if self._consumer is None:
            return
        try:
            self._consumer.close()
        except KafkaException as error:
            log.warning("leaving the group failed, the group will time this member out: %s", error)
        self._consumer = None
        self._raise_callback_error()
