"""Debezium PostgreSQL change envelopes as the JSON converter writes them, for unit tests.

The shapes follow the connector's output for pgoutput (recorded from 3.6): the row schema
(``<prefix>.public.<table>.Value``), the source block of the PostgreSQL connector, the
transaction block, and ``ts_ms``/``ts_us``/``ts_ns``. Values are given in their wire form
(decimals as strings, dates as days, timestamps as ISO text), exactly as the test states them.
"""

from __future__ import annotations

import base64
from decimal import Decimal
from typing import Any

import orjson

from schemas.datasets import DATASETS, Column

TOPIC_PREFIX = "sb"

_SIMPLE_TYPES: dict[str, dict[str, Any]] = {
    "bigint": {"type": "int64"},
    "integer": {"type": "int32"},
    "boolean": {"type": "boolean"},
    "text": {"type": "string"},
    "jsonb": {"type": "string", "name": "io.debezium.data.Json", "version": 1},
    "date": {"type": "int32", "name": "io.debezium.time.Date", "version": 1},
    "timestamptz": {"type": "string", "name": "io.debezium.time.ZonedTimestamp", "version": 1},
}


def field_schema(column: Column, decimal_mode: str = "string") -> dict[str, Any]:
    numeric = column.numeric_scale
    if numeric is None:
        base = dict(_SIMPLE_TYPES[column.pg_type])
    elif decimal_mode == "string":
        base = {"type": "string"}
    elif decimal_mode == "double":
        base = {"type": "double"}
    else:
        base = {
            "type": "bytes",
            "name": "org.apache.kafka.connect.data.Decimal",
            "version": 1,
            "parameters": {"scale": str(numeric[1]), "connect.decimal.precision": str(numeric[0])},
        }
    return {**base, "optional": column.nullable, "field": column.name}


def value_schema(
    dataset: str, decimal_mode: str = "string", extra: tuple[dict[str, Any], ...] = ()
) -> dict[str, Any]:
    fields = [field_schema(c, decimal_mode) for c in DATASETS[dataset].columns] + list(extra)
    row = {
        "type": "struct",
        "fields": fields,
        "optional": True,
        "name": f"{TOPIC_PREFIX}.public.{dataset}.Value",
    }
    source = {
        "type": "struct",
        "fields": [
            {"type": "string", "optional": False, "field": "version"},
            {"type": "string", "optional": False, "field": "connector"},
            {"type": "string", "optional": False, "field": "name"},
            {"type": "int64", "optional": False, "field": "ts_ms"},
            {
                "type": "string",
                "optional": True,
                "name": "io.debezium.data.Enum",
                "version": 1,
                "parameters": {
                    "allowed": "true,first,first_in_data_collection,last_in_data_collection,"
                    "last,false,incremental"
                },
                "default": "false",
                "field": "snapshot",
            },
            {"type": "string", "optional": False, "field": "db"},
            {"type": "string", "optional": True, "field": "sequence"},
            {"type": "int64", "optional": True, "field": "ts_us"},
            {"type": "int64", "optional": True, "field": "ts_ns"},
            {"type": "string", "optional": False, "field": "schema"},
            {"type": "string", "optional": False, "field": "table"},
            {"type": "int64", "optional": True, "field": "txId"},
            {"type": "int64", "optional": True, "field": "lsn"},
            {"type": "int64", "optional": True, "field": "xmin"},
            {"type": "string", "optional": True, "field": "origin"},
            {"type": "int64", "optional": True, "field": "origin_lsn"},
        ],
        "optional": False,
        "name": "io.debezium.connector.postgresql.Source",
        "version": 1,
        "field": "source",
    }
    transaction = {
        "type": "struct",
        "fields": [
            {"type": "string", "optional": False, "field": "id"},
            {"type": "int64", "optional": False, "field": "total_order"},
            {"type": "int64", "optional": False, "field": "data_collection_order"},
        ],
        "optional": True,
        "name": "event.block",
        "version": 1,
        "field": "transaction",
    }
    return {
        "type": "struct",
        "fields": [
            {**row, "field": "before"},
            {**row, "field": "after"},
            source,
            transaction,
            {"type": "string", "optional": False, "field": "op"},
            {"type": "int64", "optional": True, "field": "ts_ms"},
            {"type": "int64", "optional": True, "field": "ts_us"},
            {"type": "int64", "optional": True, "field": "ts_ns"},
        ],
        "optional": False,
        "name": f"{TOPIC_PREFIX}.public.{dataset}.Envelope",
        "version": 2,
    }


def payload(
    dataset: str,
    op: str,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    tx_id: int | None = 771,
    lsn: int | None = 24_023_128,
    ts_ms: int = 1_717_171_717_000,
) -> dict[str, Any]:
    return {
        "before": before,
        "after": after,
        "source": {
            "version": "3.6.1.Final",
            "connector": "postgresql",
            "name": TOPIC_PREFIX,
            "ts_ms": ts_ms,
            "snapshot": "false",
            "db": "storage_builder",
            "sequence": f'["{lsn - 160 if lsn else 0}","{lsn}"]',
            "ts_us": ts_ms * 1000,
            "ts_ns": ts_ms * 1_000_000,
            "schema": "public",
            "table": dataset,
            "txId": tx_id,
            "lsn": lsn,
            "xmin": None,
            "origin": None,
            "origin_lsn": None,
        },
        "transaction": None,
        "op": op,
        "ts_ms": ts_ms + 37,
        "ts_us": (ts_ms + 37) * 1000 + 412,
        "ts_ns": (ts_ms + 37) * 1_000_000 + 412_733,
    }


def envelope(
    dataset: str,
    op: str,
    *,
    schemas: bool = True,
    decimal_mode: str = "string",
    extra_fields: tuple[dict[str, Any], ...] = (),
    **kwargs: Any,
) -> bytes:
    """The bytes of one change record's value."""
    body = payload(dataset, op, **kwargs)
    if not schemas:
        return orjson.dumps(body)
    return orjson.dumps(
        {"schema": value_schema(dataset, decimal_mode, extra_fields), "payload": body}
    )


def key(dataset: str, client_id: Any, *, schemas: bool = True) -> bytes:
    body = {"client_id": client_id}
    if not schemas:
        return orjson.dumps(body)
    schema = {
        "type": "struct",
        "fields": [{"type": "int64", "optional": False, "field": "client_id"}],
        "optional": False,
        "name": f"{TOPIC_PREFIX}.public.{dataset}.Key",
    }
    return orjson.dumps({"schema": schema, "payload": body})


def precise(value: str, scale: int) -> str:
    """A decimal as Connect's Decimal bytes (big-endian two's complement), base64 as in JSON."""
    unscaled = int(Decimal(value).scaleb(scale))
    length = max(1, (unscaled.bit_length() + 8) // 8)
    return base64.b64encode(unscaled.to_bytes(length, "big", signed=True)).decode()


def topic(dataset: str) -> str:
    return f"{TOPIC_PREFIX}.public.{dataset}"


RAW_DATA_ROW: dict[str, Any] = {
    "id": 90_000_000_123,
    "client_id": 42,
    "entity_id": 7_001,
    "data_item_id": 3_004,
    "period": 19_875,  # 2024-06-01
    "value": "-1234.500000",
    "currency": "EUR",
    "recorded_at": "2024-06-01T08:15:30.123456Z",
    "row_version": 5_551_212,
}
