"""The dead-letter topic: where events that cannot be decoded or applied go, unchanged.

A poison event is produced with its original key and value bytes and headers saying why it
was refused and where it came from, and counted by reason. The partition then goes on. The
loop flushes this producer before it commits an offset past a poison event, so a crash can
never lose an event that was neither applied nor dead-lettered.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from storage_builder import metrics
from storage_builder.errors import StorageBuilderError
from storage_builder.settings import KafkaSettings

log = logging.getLogger(__name__)

_MAX_REASON = 1000
_FETCH_TIMEOUT_S = 15.0


class DeadLetterError(StorageBuilderError):
    """The dead-letter topic could not take an event; the partition must not move past it."""


class DeadLetters:
    """A lazy producer to ``kafka.dead_letter_topic``; no network until the first event."""

    def __init__(
        self, kafka: KafkaSettings, client_id: str = "storage-builder-dead-letter"
    ) -> None:
        self.topic = kafka.dead_letter_topic
        self._config: dict[str, Any] = {
            "client.id": client_id,
            "acks": "all",
            "linger.ms": 50,
        }
        self._config.update(kafka.librdkafka())
        self._producer: Producer | None = None
        self._errors: list[str] = []
        self.pending = 0

    def _ensure(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self._config)
        return self._producer

    def send(
        self,
        *,
        reason: str,
        detail: str,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        timestamp_ms: int | None,
    ) -> None:
        """Produce one poison event, as it was read, with headers saying why and from where."""
        headers: list[tuple[str, str | bytes | None]] = [
            ("sb-reason", reason.encode()),
            ("sb-detail", detail[:_MAX_REASON].encode()),
            ("sb-source-topic", topic.encode()),
            ("sb-source-partition", str(partition).encode()),
            ("sb-source-offset", str(offset).encode()),
            ("sb-source-timestamp-ms", str(timestamp_ms or 0).encode()),
            ("sb-dead-lettered-at-ms", str(int(time.time() * 1000)).encode()),
        ]
        producer = self._ensure()
        producer.produce(
            self.topic, value=value, key=key, headers=headers, on_delivery=self._delivered
        )
        producer.poll(0)
        self.pending += 1
        metrics.DEAD_LETTER_EVENTS.labels(reason=reason).inc()
        log.warning(
            "dead-lettered %s:%d@%d (%s): %s", topic, partition, offset, reason, detail[:300]
        )

    def _delivered(self, error: KafkaError | None, _message: Any) -> None:
        if error is not None:
            self._errors.append(str(error))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every dead letter is acknowledged; raise if one was not."""
        if self._producer is None or self.pending == 0:
            return
        remaining = self._producer.flush(timeout_s)
        if remaining or self._errors:
            errors, self._errors = self._errors, []
            raise DeadLetterError(
                f"{remaining} dead letters to {self.topic!r} not acknowledged "
                f"({'; '.join(errors[:3]) or 'timed out'}); check kafka.dead_letter_topic "
                "exists and the brokers at kafka.bootstrap_servers accept writes"
            )
        self.pending = 0


def fetch_record(kafka: KafkaSettings, topic: str, partition: int, offset: int) -> Message | None:
    """The record at ``topic:partition@offset``, read again for its original bytes.

    Needed when an event decoded fine but its row cannot be applied: by then the batch
    holds only the decoded row. None when the record is gone (retention) or unreachable.
    """
    config: dict[str, Any] = {
        "group.id": "storage-builder-dead-letter-fetch",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    }
    config.update(kafka.librdkafka())
    consumer = Consumer(config)
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + _FETCH_TIMEOUT_S
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    break
                continue
            if message.offset() == offset:
                return message
            if (message.offset() or 0) > offset:
                break
    finally:
        consumer.close()
    log.warning("could not read %s:%d@%d again for its dead letter", topic, partition, offset)
    return None
