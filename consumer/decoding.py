"""Decoding of Debezium change events (JSON converter) into change events of targets.

A Kafka record of a change topic ``<topic_prefix>.<schema>.<dataset>`` becomes a
``ChangeEvent`` (insert, update, snapshot read, delete of one row of one target) or a
``TruncateEvent``; heartbeats, logical decoding messages and tombstones become None. The
envelope may carry its Connect schema (``{"schema": ..., "payload": ...}``,
``schemas.enable=true``) or not (the payload's fields at the top level).

Row images are converted by the dataset definitions, not by the event's schema, so every
value comes out as the exact Python value a segment stores (see ``debezium_types``). The
embedded schema is read only for what the payload alone cannot say: how numeric columns
are encoded (``decimal.handling.mode``) and the scale of "precise" decimal bytes.

What the decoder refuses, with an ``EventDecodeError`` naming topic, partition, offset and
field (the consumer sends it to the dead-letter topic): bytes that are not a Debezium
envelope, an unknown table, a missing column, NULL in a NOT NULL column, a value that does
not fit its column, a client id that is not a positive integer, and a row whose client
differs from the message key's (tenants never mix). Columns present in the event but not
in the dataset, such as a column added to the table while streaming, are ignored and
logged at DEBUG: a snapshot keeps its dataset's schema until the dataset changes.

``Decoder`` is the seam for other formats (Avro with a schema registry, say): the
consumer depends on the protocol only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from consumer.debezium_types import DECIMAL_MODES, Converter, InvalidValue, column_converter
from schemas.datasets import DATASETS, Dataset, Target, parse_client_id
from storage_builder.errors import DecodeError, InvalidTargetError
from storage_builder.settings import KafkaSettings

logger = logging.getLogger(__name__)

HEARTBEAT_TOPIC_PREFIX = "__debezium-heartbeat"
UPSERT_OPS = frozenset("cur")
_MAX_CACHED_TARGETS = 100_000


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One row change of one target, with its source position.

    ``op`` is 'c' (insert), 'u' (update), 'r' (read by a connector snapshot: an upsert like
    'c') or 'd' (delete, ``row`` None). ``row`` holds every column of the dataset as an
    exact value. ``tx_id`` is ``source.txId`` as reported (a 32-bit xid, see
    ``consumer.handoff``), ``lsn`` the WAL position of the change.
    """

    op: str
    target: Target
    key: int
    row: dict[str, Any] | None
    tx_id: int | None
    lsn: int | None
    source_ts_ms: int
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class TruncateEvent:
    """A TRUNCATE of a whole source table: every target of the dataset loses its rows."""

    dataset: str
    tx_id: int | None
    lsn: int | None
    source_ts_ms: int
    topic: str
    partition: int
    offset: int


class EventDecodeError(DecodeError):
    """An event that cannot be decoded, located by topic, partition, offset and field.

    ``reason`` is a short fixed word (a metric label); the message says the rest.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        topic: str,
        partition: int,
        offset: int,
        field: str | None = None,
    ) -> None:
        where = f"topic {topic!r} partition {partition} offset {offset}"
        if field:
            where += f" field {field!r}"
        super().__init__(f"cannot decode event at {where}: {detail}")
        self.reason = reason
        self.detail = detail
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.field = field


class Decoder(Protocol):
    """Turns the bytes of a Kafka record into a change of a target."""

    def decode(
        self,
        value: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None = None,
    ) -> ChangeEvent | TruncateEvent | None:
        """The change in ``value``; None for records that carry no change.

        ``key``, when given, is the record's key; its client id must match the row's.
        Raises DecodeError for anything that cannot be decoded.
        """
        ...


class _Invalid(Exception):
    """Raised inside decoding; ``JsonDecoder.decode`` adds the record's location."""

    def __init__(self, reason: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.field = field


class _RowConverter:
    """Converts one row image of a dataset with converters built once."""

    def __init__(self, dataset: Dataset, decimal_modes: dict[str, tuple[str, int | None]]) -> None:
        self.dataset = dataset
        self.columns: tuple[tuple[str, Converter, bool], ...] = tuple(
            (
                column.name,
                column_converter(column, *decimal_modes.get(column.name, ("string", None))),
                column.nullable,
            )
            for column in dataset.columns
        )
        self.width = len(self.columns)

    def convert(self, image: dict[str, Any], side: str) -> dict[str, Any]:
        row: dict[str, Any] = {}
        name = ""
        try:
            for name, convert, nullable in self.columns:
                value = image[name]
                if value is not None:
                    row[name] = convert(value)
                elif nullable:
                    row[name] = None
                else:
                    raise _Invalid(
                        "null_value", f"NULL in NOT NULL column {name!r}", f"{side}.{name}"
                    )
        except KeyError:
            raise _Invalid(
                "missing_column",
                f"column {name!r} of dataset {self.dataset.name!r} is missing from the event",
                f"{side}.{name}",
            ) from None
        except InvalidValue as error:
            raise _Invalid("bad_value", f"column {name!r}: {error}", f"{side}.{name}") from None

        if len(image) > self.width:
            self._log_extra_columns(image)
        return row

    def _log_extra_columns(self, image: dict[str, Any]) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            extra = sorted(set(image) - set(self.dataset.column_names))
            logger.debug("ignoring columns %s not in dataset %s", extra, self.dataset.name)


class JsonDecoder:
    """Decodes envelopes of Debezium's JSON converter, with or without embedded schemas.

    ``decimal_mode`` is the connector's ``decimal.handling.mode``; it is needed only for
    envelopes without schemas, since an embedded schema says how each decimal is encoded.
    """

    def __init__(self, kafka: KafkaSettings, *, decimal_mode: str = "string") -> None:
        if decimal_mode not in DECIMAL_MODES:
            raise ValueError(
                f"decimal mode {decimal_mode!r} is not one of {', '.join(DECIMAL_MODES)}"
            )
        self._topic_prefix = f"{kafka.topic_prefix}."
        self._prefix = f"{kafka.topic_prefix}.{kafka.schema_name}."
        self._datasets = {self._prefix + name: dataset for name, dataset in DATASETS.items()}
        self._plain = {
            name: _RowConverter(dataset, _uniform_modes(dataset, decimal_mode))
            for name, dataset in DATASETS.items()
        }
        self._numeric_columns = {
            name: frozenset(c.name for c in dataset.columns if c.numeric_scale is not None)
            for name, dataset in DATASETS.items()
        }
        self._by_schema: dict[tuple[str, tuple[tuple[str, Any, Any], ...]], _RowConverter] = {}
        self._targets: dict[tuple[str, int], Target] = {}

    def decode(
        self,
        value: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None = None,
    ) -> ChangeEvent | TruncateEvent | None:
        """The change in one Kafka record; None for tombstones, heartbeats and messages."""
        if value is None or topic.startswith(HEARTBEAT_TOPIC_PREFIX):
            return None
        try:
            return self._decode(value, topic, partition, offset, key)
        except _Invalid as error:
            raise EventDecodeError(
                error.reason, error.detail, topic, partition, offset, error.field
            ) from None

    def _decode(
        self, value: bytes, topic: str, partition: int, offset: int, key: bytes | None
    ) -> ChangeEvent | TruncateEvent | None:
        # Step 1: the envelope, with or without its schema.
        schema, payload = _envelope(value)
        if payload is None:
            return None
        op = payload.get("op")
        if op == "m":
            return None

        # Step 2: where the change comes from.
        dataset = self._dataset(topic)
        source = payload.get("source")
        if type(source) is not dict:
            raise _Invalid("malformed", "the envelope has no source block", "source")
        tx_id = _optional_int(source, "txId")
        lsn = _optional_int(source, "lsn")
        ts_ms = source.get("ts_ms")
        if type(ts_ms) is not int:
            raise _Invalid("malformed", f"source.ts_ms {ts_ms!r} is not an integer", "source.ts_ms")

        if op == "t":
            return TruncateEvent(dataset.name, tx_id, lsn, ts_ms, topic, partition, offset)
        if op == "d":
            client, row_key = self._delete_key(payload, dataset)
            row = None
        elif op in UPSERT_OPS:
            row = self._row(payload, dataset, schema)
            client = _client_of(row[dataset.client_column], f"after.{dataset.client_column}")
            row_key = row[dataset.key_column]
        else:
            raise _Invalid("malformed", f"unknown op {op!r} (expected c, u, d, r, t or m)", "op")

        # Step 3: the row's client must be the message key's, or tenants would mix.
        if key is not None:
            key_client = self._key_client(key, dataset)
            if key_client != client:
                raise _Invalid(
                    "client_mismatch",
                    f"the row belongs to client {client} but the message key names client "
                    f"{key_client}",
                    "key",
                )

        logger.debug("decoded %s of %s/%s key %s", op, dataset.name, client, row_key)
        return ChangeEvent(
            op,
            self._target(dataset.name, client),
            row_key,
            row,
            tx_id,
            lsn,
            ts_ms,
            topic,
            partition,
            offset,
        )

    def _dataset(self, topic: str) -> Dataset:
        dataset = self._datasets.get(topic)
        if dataset is not None:
            return dataset
        if topic.startswith(self._topic_prefix):
            table = topic[len(self._topic_prefix) :]
            known = ", ".join(sorted(DATASETS))
            raise _Invalid(
                "unknown_table",
                f"unknown table {table!r}: no dataset reads it (known: {known}); the "
                "connector's table.include.list captures more than storage-builder reads",
            )
        raise _Invalid(
            "unknown_table",
            f"unknown table: topic is not named {self._prefix}<dataset> "
            "(settings kafka.topic_prefix and kafka.schema_name)",
        )

    def _row(
        self, payload: dict[str, Any], dataset: Dataset, schema: dict[str, Any] | None
    ) -> dict[str, Any]:
        image = payload.get("after")
        if type(image) is not dict:
            raise _Invalid("malformed", f"the row image 'after' is {image!r}, not a row", "after")
        converter = self._converter(dataset, schema)
        row = converter.convert(image, "after")
        _key_of(row[dataset.key_column], "after." + dataset.key_column)
        return row

    def _delete_key(self, payload: dict[str, Any], dataset: Dataset) -> tuple[int, int]:
        # A delete's 'before' holds at least the primary key (client, id), whatever the
        # table's replica identity; the other columns are not needed.
        image = payload.get("before")
        if type(image) is not dict:
            raise _Invalid(
                "malformed", f"the delete's row image 'before' is {image!r}, not a row", "before"
            )
        for column in (dataset.client_column, dataset.key_column):
            if column not in image:
                raise _Invalid(
                    "missing_column",
                    f"the delete lacks its key column {column!r}",
                    f"before.{column}",
                )
        client = _client_of(image[dataset.client_column], f"before.{dataset.client_column}")
        row_key = _key_of(image[dataset.key_column], "before." + dataset.key_column)
        return client, row_key

    def _converter(self, dataset: Dataset, schema: dict[str, Any] | None) -> _RowConverter:
        numeric = self._numeric_columns[dataset.name]
        if schema is None or not numeric:
            return self._plain[dataset.name]

        signature = _decimal_signature(schema, numeric)
        cache_key = (dataset.name, signature)
        converter = self._by_schema.get(cache_key)
        if converter is None:
            modes = {name: _decimal_mode_of(name, kind, scale) for name, kind, scale in signature}
            converter = _RowConverter(dataset, modes)
            self._by_schema[cache_key] = converter
        return converter

    def _key_client(self, key: bytes, dataset: Dataset) -> int:
        try:
            document = orjson.loads(key)
        except orjson.JSONDecodeError as error:
            raise _Invalid("bad_key", f"the message key is not JSON: {error}", "key") from None
        if type(document) is dict and "schema" in document and "payload" in document:
            document = document["payload"]
        if type(document) is not dict or dataset.client_column not in document:
            raise _Invalid(
                "bad_key",
                f"the message key {key[:200]!r} does not hold {dataset.client_column!r}",
                "key",
            )
        return _client_of(document[dataset.client_column], f"key.{dataset.client_column}")

    def _target(self, dataset: str, client: int) -> Target:
        target = self._targets.get((dataset, client))
        if target is None:
            if len(self._targets) >= _MAX_CACHED_TARGETS:
                self._targets.clear()
            target = self._targets[(dataset, client)] = Target(dataset, client)
        return target


def _envelope(value: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(schema, payload) of an envelope; the schema is None when none is embedded."""
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        raise _Invalid("malformed", f"the value is not JSON: {error}") from None
    if type(document) is not dict:
        raise _Invalid("malformed", f"the value is a JSON {type(document).__name__}, not an object")

    if "schema" not in document:
        if "op" not in document:
            raise _Invalid(
                "malformed", "the value is neither a Debezium envelope nor a schema and payload"
            )
        return None, document
    if "payload" not in document:
        raise _Invalid("malformed", "the value has a schema but no payload", "payload")

    schema, payload = document["schema"], document["payload"]
    if payload is not None and type(payload) is not dict:
        raise _Invalid("malformed", f"the payload is {payload!r}, not an object", "payload")
    if payload is not None and "op" not in payload:
        raise _Invalid("malformed", "the payload has no op", "payload.op")
    return (schema if type(schema) is dict else None), payload


def _decimal_signature(
    schema: dict[str, Any], numeric: frozenset[str]
) -> tuple[tuple[str, Any, Any], ...]:
    """(column, Connect type, scale parameter) of each numeric column in the row schema."""
    for block in schema.get("fields") or ():
        if type(block) is dict and block.get("field") == "after":
            fields = block.get("fields") or ()
            return tuple(
                (field["field"], field.get("type"), (field.get("parameters") or {}).get("scale"))
                for field in fields
                if type(field) is dict and field.get("field") in numeric
            )
    raise _Invalid("malformed", "the schema describes no 'after' row", "schema")


def _decimal_mode_of(name: str, kind: Any, scale: Any) -> tuple[str, int | None]:
    if kind == "string":
        return "string", None
    if kind == "double":
        return "double", None
    if kind == "bytes":
        if scale is None:
            return "precise", None
        if (isinstance(scale, str) and scale.isdigit()) or type(scale) is int:
            return "precise", int(scale)
    raise _Invalid(
        "bad_value",
        f"numeric column {name!r} is encoded as {kind!r} (scale {scale!r}); expected the "
        "connector's decimal.handling.mode string, precise or double",
        f"schema.{name}",
    )


def _uniform_modes(dataset: Dataset, mode: str) -> dict[str, tuple[str, int | None]]:
    return {c.name: (mode, None) for c in dataset.columns if c.numeric_scale is not None}


def _optional_int(source: dict[str, Any], name: str) -> int | None:
    value = source.get(name)
    if value is None or type(value) is int:
        return value
    raise _Invalid("malformed", f"source.{name} {value!r} is not an integer", f"source.{name}")


def _client_of(value: Any, field: str) -> int:
    if type(value) is not int:
        raise _Invalid("bad_key", f"client id {value!r} is not an integer", field)
    try:
        return parse_client_id(value)
    except InvalidTargetError as error:
        raise _Invalid("bad_key", str(error), field) from None


def _key_of(value: Any, field: str) -> int:
    if type(value) is not int:
        raise _Invalid("bad_key", f"row key {value!r} is not an integer", field)
    return value
